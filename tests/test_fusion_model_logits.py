"""Whole models' logits with the fusions off and on (tiny models, the Triton path: the interpreter on the CPU): the
MoE top-k sum fused into the next RMSNorm (kernels/norm.py with kernels/moe_sum.py TopKSlots) and, on top of it,
the post-attention residual add + RMSNorm fused into the router (kernels/router_norm.py). Three engines per
architecture, each claim checked against the engine before it: unfused == sum-fused == sum + router-norm-fused,
bit for bit, with exactly the fused launches gone."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import models.moe  # noqa: E402
from tests.model_steps import two_sequence_logits  # noqa: E402

NORM = "triton:_rms_norm_kernel"
MOE_SUM = "triton:_moe_sum_kernel"


def _logits(arch: str, defer: bool, dtype: torch.dtype = torch.float32,
            **overrides: Any) -> tuple[torch.Tensor, list[str], list[bool]]:
    """(logits of a 2-sequence prefill and a 1-token decode step of the second sequence, the Triton path's
    launches, each layer's defer_moe_sum); tiny model (overrides: config.json keys, e.g. hidden_size), the Triton
    kernels (interpreter on the CPU)."""

    def setup(model: torch.nn.Module) -> None:
        for layer in model.model.layers:
            layer.defer_moe_sum = layer.defer_moe_sum and defer

    logits, launches, model = two_sequence_logits(arch, decode_rows=[1], dtype=dtype, setup=setup, **overrides)
    return logits, launches, [layer.defer_moe_sum for layer in model.model.layers]


@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe", "llama"])
def test_model_logits_unchanged_by_fusions(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Qwen3-MoE (every layer MoE), GLM-4.5 (a leading dense layer, shared experts: the sum's extra term; an fp32
    # router), Llama (dense: nothing to fuse). Prefill takes the aligned experts, the one-token decode the direct path
    monkeypatch.setenv("MOE_RT_FUSE_ROUTER_NORM", "0")
    plain, plain_launches, _ = _logits(arch, defer=False)
    summed, summed_launches, deferred = _logits(arch, defer=True)

    # 1. the MoE sum fused into the next norm
    assert torch.equal(summed, plain)
    assert summed.abs().max() > 1e-3 and summed.argmax(-1).unique().numel() > 1  # a real signal
    num_moe = {"qwen3_moe": 2, "glm4_moe": 2, "llama": 0}[arch]
    assert sum(deferred) == num_moe
    # each MoE layer's separate top-k sum (and GLM's shared-experts add) is gone from both steps
    assert plain_launches.count(MOE_SUM) == 2 * num_moe
    assert MOE_SUM not in summed_launches
    # and nothing else changed: GLM's torch add of the shared experts' output is gone too
    gone = {MOE_SUM} | ({"torch:add"} if arch == "glm4_moe" else set())
    assert summed_launches == [e for e in plain_launches if e not in gone], (summed_launches, plain_launches)
    if not num_moe:
        return  # a dense model has no router to fuse a norm into

    # 2. on top of it (the sum deferred, as by default), the residual add + norm fused into the router. Qwen3-MoE
    # (2 MoE layers) fuses both steps (the row limit raised to take the prefill: 12 rows in one token block); GLM-4.5
    # (dense, MoE, MoE; an fp32 router: fused up to 8 rows) only the decode step
    monkeypatch.setattr(models.moe, "FUSED_NORM_MAX_TOKENS", 16)
    monkeypatch.setenv("MOE_RT_FUSE_ROUTER_NORM", "1")
    fused, fused_launches, _ = _logits(arch, defer=True)
    assert torch.equal(fused, summed)
    fused_norms = {"qwen3_moe": 2 * 2, "glm4_moe": 2}[arch]
    assert summed_launches.count(NORM) - fused_launches.count(NORM) == fused_norms
    # nothing else changed: the same launches in the same order, less the fused norms
    assert [e for e in fused_launches if e != NORM] == [e for e in summed_launches if e != NORM]
