"""Prefill attention variant keys (kernels/attention/config.py: MASK_FREE, LPT_GRID, RAGGED) and the eager
output that starts empty: the same attention as the torch reference at odd sizes (Triton interpreter, fp32 /
fp16), this step's K/V really read on the ragged path, and what each variant changes in the Hopper binary."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.sm90 import run_sm90_probe

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.attention.prefill import paged_attention_prefill, paged_attention_prefill_ref, ragged_kv_ok  # noqa: E402
from tests.test_kernels_attention import _fp8_cache, _make_cache, _rel_err  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

ALL = {"MASK_FREE": 1, "LPT_GRID": 1, "RAGGED": 1}


def _chunk_kv(cache: torch.Tensor, tables: torch.Tensor, q_lens: list[int], seq_lens: list[int],
              num_tokens: int) -> torch.Tensor:
    # [num_tokens, kv_heads, head_dim]: each sequence's last q_len positions, as the model has them before the
    # cache store; padding tokens (and sequences without keys) get large values that must never be read
    out = torch.full((num_tokens, *cache.shape[2:]), 1e4, dtype=torch.float32)
    t = 0
    block_size = cache.shape[1]
    for b, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
        for i in range(ql):
            pos = sl - ql + i
            if sl:
                out[t + i] = cache[int(tables[b, pos // block_size]), pos % block_size].float()
        t += ql
    return out.to(cache.dtype if cache.dtype != torch.float8_e4m3fn else torch.float16)


def _batch(dtype, heads=8, kv_heads=2, head_dim=32, block_size=16, seed=0):
    # odd lengths: a plain prefill, chunks over cached prefixes (one not page-aligned), a 1-token chunk, an empty
    # row, a row with query tokens but no keys, and three padding tokens at the end
    q_lens, seq_lens = [21, 1, 0, 45, 3, 20], [21, 40, 9, 100, 0, 53]  # tokens 67-69: the row with no keys
    k, v, tables = _make_cache(seq_lens, block_size, kv_heads, head_dim, dtype, "cpu")
    num_tokens = sum(q_lens) + 3
    q = torch.randn(num_tokens, heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    cu = torch.tensor([0] + np.cumsum(q_lens).tolist(), dtype=torch.int32)
    args = (q, k, v, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, head_dim**-0.5, max(q_lens))
    return args, _chunk_kv(k, tables, q_lens, seq_lens, num_tokens), _chunk_kv(v, tables, q_lens, seq_lens,
                                                                               num_tokens)


@pytest.mark.parametrize("dtype,head_dim,block_size,variant", [
    (torch.float32, 32, 16, ALL), (torch.float32, 32, 16, {"RAGGED": 1}),
    (torch.float32, 32, 16, {"MASK_FREE": 1, "LPT_GRID": 1}), (torch.float16, 32, 16, ALL),
    (torch.float16, 32, 64, ALL), (torch.float16, 48, 16, ALL), (torch.float16, 48, 16, {"MASK_FREE": 1})])
def test_prefill_variants_match_reference(dtype, head_dim, block_size, variant):
    # head_dim 48: not a power of two, so MASK_FREE keeps the head-dim mask and RAGGED falls back to the pages;
    # 64-token pages: key tiles start inside pages
    args, k_new, v_new = _batch(dtype, head_dim=head_dim, block_size=block_size)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2, **variant}
    out = paged_attention_prefill(*args, config=cfg, k=k_new, v=v_new)
    assert out[-3:].abs().max() == 0 and out[67:70].abs().max() == 0  # padding; the row with no keys
    assert _rel_err(out, paged_attention_prefill_ref(*args)) < (1e-4 if dtype == torch.float32 else 3e-3)


def test_ragged_reads_the_chunk_from_the_passed_kv():
    # this step's K/V changed (the cache keeps the old values): the ragged path sees the new chunk keys and the
    # old prefix, the paged path the old ones throughout
    args, k_new, v_new = _batch(torch.float32)
    q, k, v, cu, lens, tables = args[:6]
    k_new, v_new = k_new + 0.5, 2 * v_new
    cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
    assert ragged_kv_ok(q, k, k_new, v_new)
    paged = paged_attention_prefill(*args, config=cfg, k=k_new, v=v_new)
    ragged = paged_attention_prefill(*args, config=dict(cfg, RAGGED=1), k=k_new, v=v_new)
    assert _rel_err(paged, paged_attention_prefill_ref(*args)) < 1e-4
    # the reference over a cache that holds the new values for the chunk's positions
    k2, v2 = k.clone(), v.clone()
    t = 0
    for b, (ql, sl) in enumerate(zip((cu[1:] - cu[:-1]).tolist(), lens.tolist())):
        for i in range(ql if sl else 0):
            pos = sl - ql + i
            k2[int(tables[b, pos // 16]), pos % 16] = k_new[t + i]
            v2[int(tables[b, pos // 16]), pos % 16] = v_new[t + i]
        t += ql
    ref2 = paged_attention_prefill_ref(q, k2, v2, *args[3:])
    assert _rel_err(ragged, ref2) < 1e-4 and _rel_err(paged, ref2) > 1e-2


def test_ragged_kv_ok_only_where_a_descriptor_fits():
    args, k_new, v_new = _batch(torch.float16)
    q, k = args[0], args[1]
    assert ragged_kv_ok(q, k, k_new, v_new)
    assert not ragged_kv_ok(q, k, None, v_new)
    assert not ragged_kv_ok(q, k, k_new.float(), v_new)  # another dtype than q
    assert not ragged_kv_ok(q, k, k_new[:-1], v_new[:-1])  # not one row per token
    wide = torch.zeros(k_new.shape[0], 2, 40, dtype=k_new.dtype)[:, :, :32]  # head stride 40: no 2-D view
    assert not ragged_kv_ok(q, k, wide, v_new)
    k8, _, _ = _fp8_cache([20], 16, 2, 32, (1.0, 1.0))
    assert not ragged_kv_ok(q, k8, k_new, v_new)  # an FP8 cache is read back as stored


@pytest.mark.parametrize("variant", [{}, {"MASK_FREE": 1, "LPT_GRID": 1}])
def test_prefill_fp8_variants(variant):
    q_lens, seq_lens, scales = [5, 1, 37, 2], [5, 20, 101, 0], (2.0, 0.125)
    k8, v8, tables = _fp8_cache(seq_lens, 16, 2, 32, scales)
    q = torch.randn(sum(q_lens) + 1, 4, 32, generator=torch.Generator().manual_seed(7)).to(torch.float16)
    cu = torch.tensor([0] + np.cumsum(q_lens).tolist(), dtype=torch.int32)
    args = (q, k8, v8, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, 32**-0.5, max(q_lens), *scales)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "RAGGED": 1, **variant}
    out = paged_attention_prefill(*args, config=cfg, k=q[:, :2], v=q[:, :2])  # K/V ignored: an FP8 cache
    assert out[-3:].abs().max() == 0
    assert _rel_err(out, paged_attention_prefill_ref(*args)) < 3e-3


def test_q_f16_with_an_fp8_cache_under_a_bf16_q():
    # Q_F16: the wrapper casts q to fp16 (saturating) before the launch instead of the kernel: the same values
    q_lens, seq_lens, scales = [5, 37], [20, 101], (2.0, 0.125)
    k8, v8, tables = _fp8_cache(seq_lens, 16, 2, 32, scales)
    q = torch.randn(sum(q_lens), 4, 32, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    q[3, 1, :4] = 1e5  # beyond fp16: saturates, no inf / NaN
    cu = torch.tensor([0] + np.cumsum(q_lens).tolist(), dtype=torch.int32)
    args = (q, k8, v8, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, 32**-0.5, max(q_lens), *scales)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
    plain = paged_attention_prefill(*args, config=cfg)
    cast = paged_attention_prefill(*args, config=dict(cfg, Q_F16=1, MASK_FREE=1))
    assert torch.isfinite(cast.float()).all() and torch.equal(cast, plain)
    keep = torch.ones(q.shape[0], dtype=torch.bool)
    keep[3] = False
    ref = paged_attention_prefill_ref(*args)
    assert _rel_err(cast[keep], ref[keep]) < 1e-2  # a bf16 output


def test_eager_prefill_needs_no_memset_of_out(monkeypatch):
    # the eager grid writes every token itself (zeros where no sequence's rows are): out starts as garbage and
    # no zeros_like (a memset of all of out, ~25 us of a 4 x 2k prefill on an H200) is launched
    args, _, _ = _batch(torch.float32)
    ref = paged_attention_prefill_ref(*args)
    real_empty = torch.empty_like
    zeroed = []
    monkeypatch.setattr(torch, "empty_like", lambda x: real_empty(x).fill_(float("nan")))
    monkeypatch.setattr(torch, "zeros_like", lambda x: zeroed.append(x) or real_empty(x).zero_())
    for lpt in (0, 1):
        cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "LPT_GRID": lpt}
        out = paged_attention_prefill(*args, config=cfg)
        assert not torch.isnan(out).any() and _rel_err(out, ref) < 1e-4
    assert not zeroed


def test_ragged_with_a_tile_map():
    # the graph path (a fixed grid from a tile map, out zeroed beforehand) on the ragged path
    from kernels.attention.config import prefill_config
    from kernels.attention.prefill import prefill_tile_q
    from runtime.engine.mixed_graphs import fill_tile_map

    args, k_new, v_new = _batch(torch.float16)
    q, k = args[0], args[1]
    tile_q = prefill_tile_q(q.shape[1], k.shape[2], q.shape[2], k.dtype)
    cu, lens = args[3], args[4]
    tiles = np.zeros((q.shape[0] // tile_q + 8, 2), dtype=np.int32)
    fill_tile_map(tiles, (cu[1:] - cu[:-1]).numpy(), lens.numpy(), tile_q)
    cfg = dict(prefill_config(q.shape[2], k.dtype), BLOCK_N=16, RAGGED=1, MASK_FREE=1)
    out = paged_attention_prefill(*args, config=cfg, tile_map=torch.from_numpy(tiles), k=k_new, v=v_new)
    assert out[-3:].abs().max() == 0
    assert _rel_err(out, paged_attention_prefill_ref(*args)) < 3e-3


_SM90_PROBE = """
import json, sys
sys.path.insert(0, "benchmarks")
from attention_ir import inspect
base = dict(kv="bf16", block_m=128, block_n=128, warps=8, stages=3)
fp8 = dict(base, kv="fp8", stages=5)
print(json.dumps([inspect("prefill", **base), inspect("prefill", **base, variants=("MASK_FREE",)),
                  inspect("prefill", **base, variants=("RAGGED",)), inspect("prefill", **fp8),
                  inspect("prefill", **fp8, variants=("Q_F16",))]))
"""


def test_prefill_variants_compile_for_sm90():
    # no GPU needed: MASK_FREE drops the K/V copies' predicates (fewer instructions), RAGGED adds a TMA-fed
    # chunk loop beside the paged one, Q_F16 keeps q in shared memory under an FP8 cache (no reload of q into
    # registers every tile: fewer ldmatrix); all within shared memory and without spills at the table's tiles
    base, mask_free, ragged, fp8, fp8_q16 = run_sm90_probe(_SM90_PROBE)
    for r in (base, mask_free, ragged, fp8, fp8_q16):
        assert r["spill_bytes"] == 0 and r["shared_bytes"] <= 232448, r
    assert mask_free["sass_total"] < base["sass_total"]
    assert ragged["tma_loads"] > 0 and base["tma_loads"] == 0
    assert fp8_q16["sass_ops"]["LDSM"] < fp8["sass_ops"]["LDSM"] and fp8_q16["registers"] < fp8["registers"]


def test_backend_forward_passes_this_steps_kv_to_prefill():
    # the unfused path (store_kv, then attention) hands its K/V on, so a RAGGED config can read the chunk from them
    from models.forward_batch import ForwardBatch
    from runtime.engine.attention_backend import PagedAttention

    seen = {}

    def prefill(q, *args, tile_map=None, k=None, v=None):
        seen.update(k=k, v=v, tile_map=tile_map)
        return torch.zeros_like(q)

    backend = PagedAttention(lambda *a: None, prefill, None)
    cache = torch.zeros(4, 16, 2, 32)
    i32 = torch.int32
    batch = ForwardBatch(slot_mapping=torch.arange(5), cu_seqlens_q=torch.tensor([0, 5], dtype=i32),
                         seq_lens=torch.tensor([5], dtype=i32), block_tables=torch.zeros(1, 4, dtype=i32),
                         max_seqlen_q=5, max_seqlen_k=5, is_decode=False, kv_caches=[(cache, cache)],
                         attn_backend=backend)
    k, v = torch.randn(2, 5, 2, 32)
    backend.forward(torch.randn(5, 8, 32), k, v, 0, batch, 0.2)
    assert seen["k"] is k and seen["v"] is v


@pytest.mark.gpu
@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("heads,kv_heads", [(32, 4), (96, 8)])
def test_prefill_variants_gpu(kv, heads, kv_heads):
    # every variant the tuner sweeps, on the table's tile, compiled for this GPU (TMA on the ragged path, the
    # pipelined loops), at real head shapes: plain prefills, chunks over cached prefixes (one not page-aligned), a
    # 1-token chunk, a row with no keys and padding, vs the fp32 torch reference
    import tune_attention as ta

    torch.manual_seed(6)
    q_lens, seq_lens = [1000, 1, 300, 2048, 3, 77], [1000, 901, 4396, 2048, 0, 1077]
    scales = (1.0, 0.5) if kv != torch.bfloat16 else (1.0, 1.0)
    k, v, tables = _make_cache(seq_lens, 16, kv_heads, 128, torch.bfloat16, "cuda")
    k_new = _chunk_kv(k.cpu(), tables.cpu(), q_lens, seq_lens, sum(q_lens) + 5).cuda()
    v_new = _chunk_kv(v.cpu(), tables.cpu(), q_lens, seq_lens, sum(q_lens) + 5).cuda()
    k, v = k.to(kv), v.to(kv)
    q = torch.randn(sum(q_lens) + 5, heads, 128, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0] + np.cumsum(q_lens).tolist(), dtype=torch.int32, device="cuda")
    args = (q, k, v, cu, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), tables, 128**-0.5, max(q_lens),
            *scales)
    ref = paged_attention_prefill_ref(*args)
    kv_name = "bf16" if kv == torch.bfloat16 else "fp8"
    tile = ta.PREFILL_VARIANT_TILES[kv_name][0]  # the table's tile (the tuner checks the others)
    for cfg in [ta.prefill_cfg(tile, var) for var in [{}, *ta.PREFILL_VARIANTS]]:
        try:
            out = paged_attention_prefill(*args, config=cfg, k=k_new, v=v_new)
        except Exception as exc:  # noqa: BLE001  a tile beyond this GPU's shared memory: the tuner skips it too
            assert "OutOfResources" in type(exc).__name__ or "shared memory" in str(exc), exc
            continue
        assert out[-5:].abs().max() == 0 and out[sum(q_lens[:4]) : sum(q_lens[:5])].abs().max() == 0, cfg
        assert _rel_err(out, ref) < 1e-2, cfg
