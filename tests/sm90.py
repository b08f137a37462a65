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
