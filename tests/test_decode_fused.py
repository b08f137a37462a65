"""Decode attention with the attention prologue fused in (kernels/attention/decode_fused.py) against the two launches
it replaces (qkv_prologue, then paged_attention_decode): the same output and the same cache contents, bit for bit
under the interpreter; GQA groups 1 / 2 / 4, partial rotary, with and without q/k norm, one and several splits,
contexts ending mid-page, float and FP8 caches, padding rows."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.attention.decode import paged_attention_decode  # noqa: E402
from kernels.attention.decode_fused import (  # noqa: E402
    fused_decode_supported,
    paged_attention_decode_fused,
    paged_attention_decode_fused_ref,
)
from kernels.attention.qkv_prologue import qkv_prologue  # noqa: E402
from kernels.fp8 import FP8_DTYPE  # noqa: E402
from kernels.rope import rope_cos_sin  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PAGE = 4
# small tiles: several tiles per split and the new token inside a tile, at the interpreter's speed
SMALL = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "programs_per_sm": 2, "min_split_tokens": 16}


def _inputs(seq_lens: list[int], heads: int, kv_heads: int, head_dim: int, rotary_dim: int, dtype: torch.dtype,
            cache_dtype: torch.dtype, qk_norm: bool = True, seed: int = 0, device: str = DEV, page: int = PAGE) -> dict:
    # one decode step: row b's new token at position seq_lens[b] - 1 (seq_len 0: a padding row, slot -1), its
    # earlier tokens already in the (random) cache; the rows of qkv a strided view, as a slice of a wider output
    gen = torch.Generator().manual_seed(seed)
    batch, width = len(seq_lens), (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(batch, width + head_dim, generator=gen) * 2).to(dtype).to(device)[:, :width]
    pages = max(1, -(-max(seq_lens) // page))
    num_blocks = batch * pages + 3
    tables = torch.randperm(num_blocks, generator=gen)[: batch * pages].view(batch, pages).to(torch.int32)
    pos = torch.tensor([max(n - 1, 0) for n in seq_lens])
    slots = torch.where(torch.tensor(seq_lens) > 0, tables[torch.arange(batch), pos // page].long() * page + pos % page,
                        -1)
    k_cache = torch.randn(num_blocks, page, kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_cache = (torch.randn(num_blocks, page, kv_heads, head_dim, generator=gen) * 0.5).to(cache_dtype)
    weights = [(torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(device) if qk_norm else None for _ in "qk"]
    return dict(qkv=qkv, positions=pos.to(device), cos_sin=rope_cos_sin(rotary_dim, max(seq_lens) + 8, 10000.0,
                                                                        device=device),
                q_norm_weight=weights[0], k_norm_weight=weights[1], eps=1e-6, k_cache=k_cache.to(device),
                v_cache=v_cache.to(device), slot_mapping=slots.to(device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=tables.to(device),
                scale=head_dim**-0.5)


def _two_launches(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                  seq_lens, block_tables, scale, k_scale=1.0, v_scale=1.0, **decode_kw) -> torch.Tensor:
    q = qkv_prologue(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                     k_scale, v_scale)
    return paged_attention_decode(q, k_cache, v_cache, seq_lens, block_tables, scale, k_scale, v_scale, **decode_kw)


def _run(fn, kw: dict, **extra) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kw = dict(kw, k_cache=kw["k_cache"].clone(), v_cache=kw["v_cache"].clone(), **extra)
    return fn(**kw), kw["k_cache"], kw["v_cache"]


def _same(got: tuple, want: tuple) -> None:
    for g, w, what in zip(got, want, ("output", "k cache", "v cache")):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        assert torch.equal(g.float(), w.float()), (what, (g.float() - w.float()).abs().max().item())


@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(3, 3, 16, 16), (4, 2, 24, 16), (8, 2, 32, 8)])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_fused_equals_prologue_then_decode(heads, kv_heads, head_dim, rotary_dim, qk_norm):
    # GQA groups 1 / 2 / 4; head_dim 24: a partial rotary with channels past the tile's power of two; contexts that
    # end mid-page (37, 50) and on a page boundary (20), the new token first in its page and tile (17) or alone (1),
    # a padding row; one split and three (the new token in the last non-empty split, an empty split at 20 tokens)
    kw = _inputs([37, 0, 20, 50, 17, 1], heads, kv_heads, head_dim, rotary_dim, torch.float32, torch.float32, qk_norm)
    for splits in (1, 3):
        got = _run(paged_attention_decode_fused, kw, num_splits=splits, config=SMALL)
        _same(got, _run(_two_launches, kw, num_splits=splits, config=SMALL))
        ref = _run(paged_attention_decode_fused_ref, kw)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
        assert not torch.equal(got[1], kw["k_cache"]) and not torch.equal(got[2], kw["v_cache"])  # it stored
        assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))  # the padding row


@pytest.mark.parametrize("cache", ["fp16", "bf16", "fp8"])
def test_fused_16_bit_and_fp8_cache(cache):
    # fp16 / bf16 activations into a cache of their dtype, and fp16 into an FP8 one (scaled, some values saturated at
    # 448: the prologue's quantization; the decode's fp16 widening path), several splits, the default tiles
    dtype = torch.bfloat16 if cache == "bf16" else torch.float16
    cache_dtype = FP8_DTYPE if cache == "fp8" else dtype
    kw = _inputs([70, 9, 0], 4, 2, 32, 32, dtype, cache_dtype, seed=1)
    scales = dict(k_scale=0.02, v_scale=0.05) if cache == "fp8" else {}
    if cache == "fp8":
        kw["qkv"] = kw["qkv"] * 20  # past 448 * v_scale: saturated, not NaN
    got = _run(paged_attention_decode_fused, kw, num_splits=2, **scales)
    _same(got, _run(_two_launches, kw, num_splits=2, **scales))
    assert not got[0].isnan().any()
    if cache == "fp8":
        assert got[2].float().abs().max() == 448


def test_fused_merge_and_many_splits():
    # the one-launch merge and more splits than tiles (empty splits after the new token's)
    kw = _inputs([45, 3], 4, 1, 16, 16, torch.float32, torch.float32, seed=2)
    for fused_merge in (False, True):
        got = _run(paged_attention_decode_fused, kw, num_splits=7, fused_merge=fused_merge, config=SMALL)
        _same(got, _run(_two_launches, kw, num_splits=7, fused_merge=fused_merge, config=SMALL))


@pytest.mark.parametrize("cache", ["fp16", "fp8"])
def test_early_inputs_reach_the_kernel(cache, monkeypatch):
    # the config's early_inputs (the step's lengths, table row and first page ids before the PDL wait) is compiled
    # into the split kernel, fused prologue (fp16 cache) and the two launches with e4m3 dots (FP8 cache, the H200
    # table's small-batch config). On the CPU there is no wait to move the loads across, so the outputs are the same
    # by construction; the bits with a real wait: test_early_inputs_gpu_bit_exact_in_graphs
    import kernels.attention.decode as decode

    seen = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["EARLY_INPUTS"])
                return self.kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(decode, "_decode_kernel", Recorder(decode._decode_kernel))
    fp8 = cache == "fp8"
    kw = _inputs([45, 17, 0], 4, 2, 32, 32, torch.float16, FP8_DTYPE if fp8 else torch.float16, seed=5)
    cfg = dict(SMALL, BLOCK_N=32, fp8_dot=2, fp8_q2=1) if fp8 else SMALL
    scales = dict(k_scale=0.02, v_scale=0.05) if fp8 else {}
    for early in (0, 1):
        seen.clear()
        _run(paged_attention_decode_fused, kw, num_splits=3, config=dict(cfg, early_inputs=early), **scales)
        assert seen == [bool(early)]


def test_fp8_dot_config_runs_the_separate_prologue():
    # FP8 tensor-core decode (fp8_dot) runs the two launches unless FUSED_FP8_DOT is on (off by default): same results
    kw = _inputs([21, 6], 4, 2, 32, 32, torch.float16, FP8_DTYPE, seed=3)
    cfg = dict(SMALL, BLOCK_N=32, fp8_dot=2)
    assert not fused_decode_supported(32, FP8_DTYPE, torch.device(DEV), 2, cfg)
    assert fused_decode_supported(32, FP8_DTYPE, torch.device(DEV), 2, SMALL)
    assert fused_decode_supported(32, torch.float16, torch.device(DEV), 2, cfg)
    _same(_run(paged_attention_decode_fused, kw, config=cfg), _run(_two_launches, kw, config=cfg))


@pytest.mark.parametrize("fp8_dot,q2", [(1, False), (2, True), (3, False)])
def test_fused_fp8_dot_equals_two_launches(fp8_dot, q2, monkeypatch):
    # the fused kernel's FP8 tensor-core path (FUSED_FP8_DOT, off by default: it lost on an H200): the new token's tile
    # peeled with e4m3 dots, plain (1), transposed (2, with q's second e4m3 term) and transposed with V staged (3);
    # the new token alone in its split's last tile (a context of 33 in 32-token tiles), mid-tile, and a padding row
    import kernels.attention.decode_fused as decode_fused

    monkeypatch.setattr(decode_fused, "FUSED_FP8_DOT", True)
    kw = _inputs([33, 21, 0], 4, 2, 32, 32, torch.float16, FP8_DTYPE, seed=4)
    cfg = dict(SMALL, BLOCK_N=32, fp8_dot=fp8_dot, fp8_q2=int(q2))
    assert fused_decode_supported(32, FP8_DTYPE, torch.device(DEV), 3, cfg)
    scales = dict(k_scale=0.02, v_scale=0.05)
    for splits in (1, 2):
        got = _run(paged_attention_decode_fused, kw, num_splits=splits, config=cfg, **scales)
        _same(got, _run(_two_launches, kw, num_splits=splits, config=cfg, **scales))
        assert not got[0].isnan().any()


def test_fused_checks_inputs():
    kw = _inputs([5, 6], 4, 2, 16, 16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="qkv"):
        paged_attention_decode_fused(**dict(kw, qkv=kw["qkv"][:, :-16]))
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention_decode_fused(**dict(kw, seq_lens=kw["seq_lens"][:1]))
    with pytest.raises(ValueError, match="go together"):
        paged_attention_decode_fused(**dict(kw, k_norm_weight=None))
    empty = dict(kw, qkv=kw["qkv"][:0], positions=kw["positions"][:0], slot_mapping=kw["slot_mapping"][:0],
                 seq_lens=kw["seq_lens"][:0], block_tables=kw["block_tables"][:0])
    assert paged_attention_decode_fused(**empty).shape == (0, 4, 16)


def qwen3_gpu_case(batch: int, cache: str, monkeypatch) -> tuple[dict, dict, dict]:
    """(inputs, this GPU's config, KV scales) of one decode step of Qwen3-30B-A3B's attention: contexts around 1k
    ending anywhere in a page and two padding rows; "fp8dot": the FP8 table as is with FUSED_FP8_DOT on."""
    import kernels.attention.decode_fused as decode_fused
    from kernels.attention.config import decode_config, with_fp8_dot

    lens = [1000 + 37 * b for b in range(batch)] + [0, 0]
    cache_dtype = torch.bfloat16 if cache == "bf16" else FP8_DTYPE
    kw = _inputs(lens, 32, 4, 128, 128, torch.bfloat16, cache_dtype, seed=batch, page=16)
    cfg = decode_config(128, cache_dtype, torch.device("cuda"))
    if cache == "fp8dot":
        monkeypatch.setattr(decode_fused, "FUSED_FP8_DOT", True)
    else:
        cfg = with_fp8_dot(cfg, "decode", 0)
    return kw, cfg, dict(k_scale=0.05, v_scale=0.02) if cache != "bf16" else {}


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("cache", ["bf16", "fp8", "fp8dot"])
def test_fused_gpu_bit_exact_and_graph_safe(batch, cache, monkeypatch):
    # Qwen3-30B-A3B's attention (32 q / 4 KV heads of 128, q/k norm, full rotary, 16-token pages), contexts around 1k
    # ending anywhere in a page, padding rows as a graph bucket has them, this GPU's tiles and split rule; "fp8": the
    # widening decode; "fp8dot": this GPU's FP8 table as is (the H200's: fp8_dot 2 with q's two terms) with
    # FUSED_FP8_DOT on (off by default: it lost on an H200). Bit for bit the two launches: the
    # prologue's math is layout-independent (fp64 RMS statistic, explicit FMAs: kernels/attention/prologue_rows.py)
    # and the decode's tiles are the same. Then 20 CUDA-graph replays on new rows give the eager results
    kw, cfg, scales = qwen3_gpu_case(batch, cache, monkeypatch)
    got = _run(paged_attention_decode_fused, kw, config=cfg, **scales)
    _same(got, _run(_two_launches, kw, config=cfg, **scales))
    ref = _run(paged_attention_decode_fused_ref, kw, **scales)
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=0.05 if cache != "bf16" else 2e-2, atol=2e-2)
    k_cache, v_cache = kw["k_cache"].clone(), kw["v_cache"].clone()
    graph_kw = dict(kw, k_cache=k_cache, v_cache=v_cache)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention_decode_fused(**graph_kw, config=cfg, **scales)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(20):
        kw["qkv"].copy_(torch.randn(kw["qkv"].shape, device="cuda", generator=gen) * 2)
        graph.replay()
        want = _run(_two_launches, kw, config=cfg, **scales)
        _same((out, k_cache, v_cache), want)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_early_inputs_gpu_bit_exact_in_graphs(batch, monkeypatch):
    # this GPU's FP8-cache tiles with early_inputs forced off and on, the two launches served with fp8_dot (the qkv
    # prologue, a PDL kernel, then the decode that may start under its tail), eager and replayed from a CUDA graph:
    # bit for bit, output and cache
    kw, cfg, scales = qwen3_gpu_case(batch, "fp8dot", monkeypatch)
    results = []
    for early in (0, 1):
        config = dict(cfg, early_inputs=early)
        eager = _run(_two_launches, kw, config=config, **scales)
        k_cache, v_cache = kw["k_cache"].clone(), kw["v_cache"].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _two_launches(**dict(kw, k_cache=k_cache, v_cache=v_cache), config=config, **scales)
        graph.replay()
        _same((out, k_cache, v_cache), eager)
        results.append(eager)
    _same(results[1], results[0])


def test_fused_sm90_registers_and_no_spills():
    # the fused variant compiled for Hopper (no GPU needed) next to the plain kernel, Qwen3-30B-A3B heads, the H200
    # table's small-batch tiles (BLOCK_N 64) and its batch tiles (32): no spills, the same shared memory (the new
    # token's tile is peeled out of the loop, so K/V stay double-buffered as before), registers well under the
    # 255 limit (measured: 116 -> 166 at BLOCK_N 64, 80 -> 128 at 32; an FP8 cache, fp8_widen 1: 106 -> 168; the
    # H200 table's FP8-KV tiles, fp8_dot 2 with q's two terms: 126 -> 130)
    from tests.sm90 import run_sm90_probe

    probe = """
import json, sys
sys.path.insert(0, "benchmarks")
from attention_ir import inspect
cases = [("bf16", 64, 0, 0), ("bf16", 32, 0, 0), ("fp8", 64, 1, 0), ("fp8", 64, 0, 2)]
print(json.dumps([[inspect("decode", kv, block_n=n, stages=3, fp8_widen=w, fp8_dot=dot, fp8_q2=dot > 0, prologue=p)
                   for p in (False, True)] for kv, n, w, dot in cases]))
"""
    for plain, fused in run_sm90_probe(probe):
        assert fused["spill_bytes"] == 0 and fused["registers"] <= 192, fused
        assert fused["shared_bytes"] == plain["shared_bytes"], (plain, fused)
        assert fused["kv_buffer_depths"] == plain["kv_buffer_depths"], (plain, fused)


@pytest.mark.parametrize("cache", ["fp32", "fp8"])
def test_fused_pages_unaligned_to_tiles(cache):
    # pages of 24 tokens (--block-size: any multiple of 8) against 16-token tiles: tiles start inside pages (the
    # unaligned row offsets), the new token last in its page (24, 48), first in a new one (25, 49), first in a split's
    # tile (33 at 3 splits: chunks of 16), alone (1); no q/k norm with a partial rotary; "fp8": bf16 activations into an
    # FP8 cache (q saturated to fp16 for the widening dots), some values saturated at 448
    dtype = torch.bfloat16 if cache == "fp8" else torch.float32
    cache_dtype = FP8_DTYPE if cache == "fp8" else dtype
    kw = _inputs([24, 25, 48, 49, 33, 0, 1], 4, 2, 32, 16, dtype, cache_dtype, qk_norm=False, seed=4, page=24)
    scales = dict(k_scale=0.02, v_scale=0.05) if cache == "fp8" else {}
    if cache == "fp8":
        kw["qkv"] = kw["qkv"] * 20
    for splits in (1, 3):
        got = _run(paged_attention_decode_fused, kw, num_splits=splits, config=SMALL, **scales)
        _same(got, _run(_two_launches, kw, num_splits=splits, config=SMALL, **scales))
        if cache == "fp32":  # (FP8: the torch prologue's k rounds to other e4m3 values now and then)
            ref = _run(paged_attention_decode_fused_ref, kw)
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
