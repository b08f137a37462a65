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

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NORM = "triton:_rms_norm_kernel"
MOE_SUM = "triton:_moe_sum_kernel"


def _logits(arch: str, defer: bool, dtype: torch.dtype = torch.float32,
            **overrides: Any) -> tuple[torch.Tensor, list[str], list[bool]]:
    """(logits of a 2-sequence prefill and a 1-token decode step, the Triton path's launches, each layer's
    defer_moe_sum); tiny model (overrides: config.json keys, e.g. hidden_size), the Triton kernels (interpreter on
    the CPU)."""
    from benchmarks.count_launches import CONFIGS, count_launches
    from models.args import ModelArgs
    from models.forward_batch import ForwardBatch
    from models.loader import load_model
    from runtime.engine.attention_backend import triton_attention

    cfg = dict(CONFIGS[arch], num_hidden_layers=3 if arch == "glm4_moe" else 2, **overrides)  # GLM: dense, MoE, MoE
    model = load_model("", cfg, ModelArgs(dtype=dtype, device=DEV, use_triton=True, seed=3), "dummy")
    for layer in model.model.layers:
        layer.defer_moe_sum = layer.defer_moe_sum and defer
    page = 4
    kv = [tuple(torch.zeros(6, page, model.num_kv_heads, model.head_dim, device=DEV, dtype=dtype) for _ in "kv")
          for _ in range(model.num_layers)]
    tables = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32, device=DEV)
    slot = lambda b, pos: int(tables[b, pos // page]) * page + pos % page  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    lens = [5, 7]
    toks = [torch.randint(0, cfg["vocab_size"], (n + 1,), generator=gen).tolist() for n in lens]

    def step(ids: list[int], pos: list[int], slots: list[int], seq_lens: list[int], decode: bool) -> torch.Tensor:
        i32 = dict(dtype=torch.int32, device=DEV)
        cu = list(range(len(ids) + 1)) if decode else [0, *torch.tensor(seq_lens).cumsum(0).tolist()]
        batch = ForwardBatch(slot_mapping=torch.tensor(slots, device=DEV), cu_seqlens_q=torch.tensor(cu, **i32),
                             seq_lens=torch.tensor(seq_lens, **i32), block_tables=tables[: len(seq_lens)],
                             max_seqlen_q=1 if decode else max(seq_lens), max_seqlen_k=max(seq_lens), is_decode=decode,
                             kv_caches=kv, attn_backend=triton_attention())
        with torch.no_grad():
            return model.compute_logits(model(torch.tensor(ids, device=DEV), torch.tensor(pos, device=DEV), batch))

    prefill_args = ([t for p, n in zip(toks, lens) for t in p[:n]], [i for n in lens for i in range(n)],
                    [slot(b, i) for b, n in enumerate(lens) for i in range(n)], lens)
    decode_args = ([toks[1][lens[1]]], [lens[1]], [slot(1, lens[1])], [lens[1] + 1])
    step(*prefill_args, decode=False)  # warm (the same KV writes again): lazily made workspaces are not launches
    step(*decode_args, decode=True)
    with count_launches() as log:
        prefill = step(*prefill_args, decode=False)
        decode = step(*decode_args, decode=True)
    return torch.cat([prefill, decode]), log.events, [layer.defer_moe_sum for layer in model.model.layers]

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
