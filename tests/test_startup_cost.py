"""What an engine rank pays at start-up: a model load that imports no more than it needs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("startup") / "moe"), "Qwen3MoeForCausalLM")


def test_to_empty_matches_torch() -> None:
    from models.loader import _to_empty

    def build() -> nn.Module:
        with torch.device("meta"):
            m = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Embedding(5, 3).half())
            m.register_buffer("transposed", torch.empty(3, 7).t())  # not contiguous: kept as torch keeps it
        return m

    ours, theirs = build(), build()
    _to_empty(ours, torch.device("cpu"))
    theirs.to_empty(device=torch.device("cpu"))
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert isinstance(a[name], nn.Parameter) and a[name].requires_grad == b[name].requires_grad
    for (name, x), (_, y) in zip([*ours.named_parameters(), *ours.named_buffers()],
                                 [*theirs.named_parameters(), *theirs.named_buffers()], strict=True):
        assert (x.device, x.dtype, x.shape, x.stride()) == (y.device, y.dtype, y.shape, y.stride()), name


def test_engine_start_imports_no_sympy(checkpoint: str) -> None:
    """nn.Module.to_empty of a meta model imports sympy (~0.25 s) through torch's Python references; the loader
    avoids it, so a rank that builds its engine and serves a request never imports it."""
    code = (
        "import sys\n"
        "from runtime.config import EngineConfig\n"
        "from runtime.engine.llm_engine import LLMEngine\n"
        "from runtime.messages import AddRequest\n"
        "from runtime.sampling_params import SamplingParams\n"
        f"engine = LLMEngine(EngineConfig(model={checkpoint!r}, device='cpu', kv_cache_memory=8 << 20))\n"
        "engine.add_request(AddRequest('a', [1, 2, 3], SamplingParams(temperature=0.7, top_k=5, max_tokens=3)))\n"
        "while engine.has_unfinished():\n"
        "    engine.step()\n"
        "assert 'sympy' not in sys.modules, 'sympy was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]


def test_launch_checks_import_no_torch(checkpoint: str) -> None:
    """python -m runtime.serve --device cpu checks its layout before any process starts, without torch (~1 s):
    a bad layout is a one-line error at once, and the control plane starts before the launcher loads torch."""
    code = (
        "import sys\n"
        "from runtime.serve import parse_args\n"
        f"parse_args(['--model', {checkpoint!r}, '--device', 'cpu', '-dp', '2', '--enable-expert-parallel',\n"
        "            '--headless'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
