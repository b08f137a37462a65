"""Compile probes for Hopper without a GPU: a script run in a fresh interpreter-free Python (Triton's own
ptxas / cuobjdump for sm90) whose last stdout line is JSON. Tests assert on what the compiled code holds
(MMA kind, spills, async copies, ...), the part of a kernel change the CPU interpreter cannot see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# a probe's first lines where it launches a kernel through Triton's JIT (warmup only, nothing runs): the active
# driver a launch asks for its target, device and stream, standing in for an H100/H200
SM90_DRIVER_PRELUDE = """import json
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class SM90:  # the active driver a launch asks for its target, device and stream: an H100/H200, no GPU here
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


driver.set_active(SM90())
"""


def run_sm90_probe(probe: str, timeout_s: int = 300) -> Any:
    """Run probe (Python source) with TRITON_INTERPRET unset and the repo on the path; its last line, parsed.
    Skips when this Triton build has no NVIDIA backend tools."""
    bin_dir = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "cuobjdump").exists():
        pytest.skip("this Triton build has no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    res = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True,
                         timeout=timeout_s)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
