"""Kernel launches per decode layer (the fused attention prologue, padding masked inside the router's top-k),
and the Triton path of a whole model (interpreter) against its torch reference path, padding rows included."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.count_launches import CONFIGS, count_launches, decode_launches  # noqa: E402
from kernels.fp8 import FP8_DTYPE  # noqa: E402
from models import layers  # noqa: E402
from models.args import ModelArgs  # noqa: E402
from models.forward_batch import ForwardBatch  # noqa: E402
from models.loader import load_model  # noqa: E402
from runtime.engine.attention_backend import torch_attention, triton_attention  # noqa: E402

BLOCK_SIZE = 4
# what the fused kernels replace: any of these in a decode layer is a launch too many
REPLACED = {"triton:_rope_kernel", "triton:_store_kv_kernel", "torch:lt", "torch:masked_fill", "torch:clone",
            "triton:_topk_softmax_kernel", "triton:_topk_sigmoid_grouped_kernel", "torch:_to_copy"}


@pytest.mark.parametrize("router_norm,decode_prologue", [(0, 0), (1, 0), (1, 1)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_qwen3_moe_decode_layer_launches(batch_size: int, router_norm: int, decode_prologue: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_RT_FUSE_ROUTER_NORM", str(router_norm))  # models/args.py fusion_switch
    monkeypatch.setenv("MOE_RT_FUSE_DECODE_PROLOGUE", str(decode_prologue))
    layers = decode_launches(CONFIGS["qwen3_moe"], batch_size, ctx=40)
    for name in ("layer0", "layer1"):
        launches = layers[name]
        assert not REPLACED & set(launches), launches
        # input norm (+ the previous layer's top-k sum), qkv, prologue (inside the decode attention with
        # decode_prologue), decode attention (+ split merge), o, the post norm (inside the router with router_norm),
        # router GEMM + top-k in one launch, (align when B > 1), up GEMM, down GEMM
        assert launches.count("triton:_qkv_prologue_kernel") == 1 - decode_prologue
        assert launches.count("triton:_decode_kernel") == 1, launches
        assert launches.count("triton:_rms_norm_kernel") == 2 - router_norm, launches
        assert launches.count("triton:_route_fused_kernel") == 1, launches
        assert len(launches) <= 11 - router_norm - decode_prologue + (batch_size > 1), launches


def _step(model: torch.nn.Module, backend: Any, kv_caches: list, ids: list[int], positions: list[int],
          slots: list[int], seq_lens: list[int], block_tables: torch.Tensor, decode: bool) -> torch.Tensor:
    dev = block_tables.device
    i32 = dict(dtype=torch.int32, device=dev)
    cu = list(range(len(ids) + 1)) if decode else [0, *torch.tensor(seq_lens).cumsum(0).tolist()]
    batch = ForwardBatch(
        slot_mapping=torch.tensor(slots, device=dev), cu_seqlens_q=torch.tensor(cu, **i32),
        seq_lens=torch.tensor(seq_lens, **i32), block_tables=block_tables, max_seqlen_q=1 if decode else max(seq_lens),
        max_seqlen_k=max(seq_lens), is_decode=decode, kv_caches=kv_caches, attn_backend=backend,
    )
    with torch.no_grad():  # the hidden states: the caller takes the logits outside its launch count (bf16 logits
        # are cast to fp32 there, a torch:_to_copy that is not a decode layer's)
        return model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), batch)


def _both_paths(arch: str, dtype: torch.dtype, kv_dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(reference logits, Triton logits, reference KV, Triton KV): two sequences prefilled, then a decode step
    padded with a third row (slot -1, seq_len 0); the Triton path must run the fused kernels only."""
    cfg = dict(CONFIGS[arch], num_hidden_layers=2)
    lens = [5, 7]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg["vocab_size"], (n + 1,), generator=gen).tolist() for n in lens]
    block_tables = torch.tensor([[3, 0, 5], [1, 4, 2], [0, 0, 0]], dtype=torch.int32, device=device)
    slot = lambda b, pos: int(block_tables[b, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE  # noqa: E731
    kv_scales = [(0.05, 0.02)] * cfg["num_hidden_layers"] if kv_dtype == FP8_DTYPE else None
    outs, caches = [], []
    for use_triton, backend in ((False, torch_attention(kv_scales)), (True, triton_attention(kv_scales))):
        model = load_model("", cfg, ModelArgs(dtype=dtype, device=device, use_triton=use_triton, seed=1), "dummy")
        shape = (6, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
        kv = [tuple(torch.zeros(shape, device=device).to(kv_dtype) for _ in "kv") for _ in range(model.num_layers)]
        prefill = _step(model, backend, kv, [t for p, n in zip(prompts, lens) for t in p[:n]],
                        [i for n in lens for i in range(n)], [slot(b, i) for b, n in enumerate(lens) for i in range(n)],
                        lens, block_tables[:2], decode=False)
        with count_launches() as log:
            decode = _step(model, backend, kv, [p[n] for p, n in zip(prompts, lens)] + [0], [*lens, 0],
                           [slot(b, n) for b, n in enumerate(lens)] + [-1], [n + 1 for n in lens] + [0],
                           block_tables, decode=True)
        with torch.no_grad():
            prefill, decode = model.compute_logits(prefill), model.compute_logits(decode)
        if use_triton:  # the fused kernels ran, not the ones they replace (the prologue: inside the decode kernel
            # by default, MOE_RT_FUSE_DECODE_PROLOGUE)
            fused = ModelArgs().fuse_decode_prologue and 3 <= layers.FUSED_DECODE_MAX_ROWS  # the step's 3 rows
            assert log.events.count("triton:_qkv_prologue_kernel") == (0 if fused else model.num_layers)
            assert not REPLACED & set(log.events), log.events
        outs.append(torch.cat([prefill, decode[:2]]).float())
        caches.append(torch.stack([torch.stack(c).float() for c in kv]))
    assert outs[0].abs().max() > 1e-3 and caches[0].abs().max() > 0.1  # a real signal, not zeros everywhere
    return (*outs, *caches)


@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe"])
def test_triton_path_matches_reference(arch: str) -> None:
    ref, fast, ref_kv, fast_kv = _both_paths(arch, torch.float32, torch.float32)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_kv, ref_kv, rtol=1e-4, atol=1e-5)  # block 0's unused slots stay zero too


def test_decode_steps_past_the_fused_prologue_rows_keep_two_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    # a decode step of more rows than FUSED_DECODE_MAX_ROWS (here 2; the step has 3) runs the separate prologue
    # (_both_paths asserts which kernels ran), with the same results; the fusion switched on, so that the cap, not
    # the switch, is what keeps the separate prologue (an environment with MOE_RT_FUSE_DECODE_PROLOGUE=0 would pass
    # this test without any cap)
    monkeypatch.setenv("MOE_RT_FUSE_DECODE_PROLOGUE", "1")
    monkeypatch.setattr(layers, "FUSED_DECODE_MAX_ROWS", 2)
    ref, fast, ref_kv, fast_kv = _both_paths("qwen3_moe", torch.float32, torch.float32)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_kv, ref_kv, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe"])
def test_triton_path_fp8_kv_gpu(arch: str) -> None:
    # bf16 and an FP8 KV cache with per-layer scales (on the CPU the interpreter's own fp32 -> e4m3 cast can
    # lose a rounding carry, so this one runs on the GPU; tests/test_kernels_qkv_prologue.py covers FP8 there)
    ref, fast, ref_kv, fast_kv = _both_paths(arch, torch.bfloat16, FP8_DTYPE, "cuda")
    # layer 0's K/V come from the embeddings alone: equal but for x * (1 / scale) vs x / scale (or a bf16 ulp of
    # the input norm) putting a value one e4m3 step away; later layers inherit bf16 and router near-ties
    assert (fast_kv[0] == ref_kv[0]).float().mean() > 0.95
    torch.testing.assert_close(fast_kv[0], ref_kv[0], rtol=0.13, atol=2.0**-9)
    cos = torch.nn.functional.cosine_similarity(fast, ref, dim=-1)
    assert (cos > 0.99).float().mean() > 0.9, cos
