"""Decode attention's long-context knobs (Triton interpreter, small odd sizes, fp32 / fp16 inputs, bf16-like and
FP8 caches): more than 64 splits per (sequence, KV head) merged in chunks of 64 with an online log-sum-exp, the
config's max_splits cap on the split rule, the merge's column width (merge_block_d), a config of its own at small
batch (small_batch, small_batch_config; the tuner's pick of it), and fp8_widen (its PTX path compiled for sm90
here, run by the GPU test)."""

import os
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kernels.attention.config as acfg  # noqa: E402
import kernels.attention.decode as dec  # noqa: E402
import kernels.attention.decode_plan as plan  # noqa: E402
from kernels.attention.config import DECODE_KEYS, DECODE_KNOB_DEFAULTS, check_config  # noqa: E402
from kernels.attention.decode import paged_attention_decode, paged_attention_decode_ref  # noqa: E402
from kernels.fp8 import widen_e4m3  # noqa: E402
from tests.sm90 import run_sm90_probe  # noqa: E402
from tests.test_kernels_attention import _fp8_cache, _make_cache, _rel_err  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# 16-token tiles and 16 tokens per split at least: a 1100-token sequence fills 69 splits
CFG = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "programs_per_sm": 2, "min_split_tokens": 16}


def _inputs(dtype: torch.dtype, kv: str = "float", seq_lens: tuple = (1100, 0, 70)):
    heads, kv_heads, head_dim, block_size = 3, 1, 24, 16  # GQA group 3, head_dim not a power of two
    scales = (0.5, 2.0) if kv == "fp8" else (1.0, 1.0)
    if kv == "fp8":
        k, v, tables = _fp8_cache(list(seq_lens), block_size, kv_heads, head_dim, scales)
    else:
        k, v, tables = _make_cache(list(seq_lens), block_size, kv_heads, head_dim, dtype, "cpu")
    q = torch.randn(len(seq_lens), heads, head_dim, generator=torch.Generator().manual_seed(5)).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return (q, k, v, lens, tables, head_dim**-0.5, *scales)


@pytest.mark.parametrize("dtype,kv,num_splits", [(torch.float32, "float", 130), (torch.float16, "float", 69),
                                                  (torch.float16, "fp8", 100)])
def test_more_than_64_splits(dtype, kv, num_splits):
    # 69 / 100 / 130 splits: two or three 64-split chunks in the merge, the last ones partly masked, some splits
    # of the short rows empty (lse -inf); a 0-length row stays zeros
    args = _inputs(dtype, kv)
    ref = paged_attention_decode_ref(*args)
    out = paged_attention_decode(*args, num_splits=num_splits, config=CFG)
    assert out[1].abs().max() == 0
    assert _rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


def test_fused_merge_more_than_64_splits():
    args = _inputs(torch.float32)
    for _ in range(2):  # the counters are back at zero after the first launch
        out = paged_attention_decode(*args, num_splits=70, fused_merge=True, config=CFG)
        assert _rel_err(out, paged_attention_decode_ref(*args)) < 1e-5
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention_decode(*args, num_splits=plan.MAX_SPLITS + 1, config=CFG)


def _spy_splits(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = plan.decode_num_splits

    def spy(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(plan, "decode_num_splits", spy)
    return seen


def test_max_splits_caps_the_split_rule(monkeypatch):
    # 8 programs per SM on 132 SMs with one 1100-token sequence in a table of 70 pages: 264 splits wanted,
    # 70 pages of 16 tokens allow 70; max_splits caps that at 64 by default and at 67 here
    seen = _spy_splits(monkeypatch)
    args = _inputs(torch.float32, seq_lens=(1100,))
    ref = paged_attention_decode_ref(*args)
    cfg = dict(CFG, programs_per_sm=8)
    out = paged_attention_decode(*args, config=cfg)
    assert seen[-1] == 64 and _rel_err(out, ref) < 1e-5
    out = paged_attention_decode(*args, config=dict(cfg, max_splits=67))
    assert seen[-1] == 67 and _rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="max_splits"):
        paged_attention_decode(*args, config=dict(cfg, max_splits=0))


def test_small_batch_config(monkeypatch):
    # batch <= small_batch runs small_batch_config, its own tiles and split rule: here 32-token tiles and splits
    # (35 over the 70-page table) where the batch's own rule says 1 program per SM (66 splits for 2 (sequence,
    # KV head) pairs on 132 SMs)
    seen = _spy_splits(monkeypatch)
    args = _inputs(torch.float32, seq_lens=(1100, 0))  # a table of 70 pages: 70 splits of 16 tokens at most
    ref = paged_attention_decode_ref(*args)
    small = dict(CFG, BLOCK_N=32, num_stages=3, programs_per_sm=2, min_split_tokens=32, max_splits=128)  # 35 splits
    cfg = dict(CFG, programs_per_sm=1, max_splits=128, small_batch_config=small)
    for small_batch, splits in ((0, 66), (1, 66), (2, 35)):
        out = paged_attention_decode(*args, config=dict(cfg, small_batch=small_batch))
        assert seen[-1] == splits and _rel_err(out, ref) < 1e-5
    assert acfg.decode_config_for(dict(cfg, small_batch=2), 2)["BLOCK_N"] == 32
    assert acfg.decode_config_for(dict(cfg, small_batch=2), 3) == {**acfg.DECODE_KNOB_DEFAULTS, **cfg, "small_batch": 2}
    with pytest.raises(ValueError, match="small_batch"):
        paged_attention_decode(*args, config=dict(cfg, small_batch=-1))
    with pytest.raises(ValueError, match="small_batch_config"):  # not nested
        nested = dict(small, small_batch_config=small)
        paged_attention_decode(*args, config=dict(cfg, small_batch=2, small_batch_config=nested))
    with pytest.raises(ValueError, match="power of two"):  # checked as a config of its own
        paged_attention_decode(*args, config=dict(cfg, small_batch=2, small_batch_config=dict(small, BLOCK_N=48)))


def test_tuner_picks_a_small_batch_config():
    # the tuner's table entry: the best config over the larger batches, with the best over batch <= 4 inside it
    import tune_attention as ta

    a, b = ta.decode_cfg((64, 4, 3), (2, 64)), ta.decode_cfg((64, 4, 3), (8, 64, {"max_splits": 256}))
    rows = [{"kind": "decode", "case": f"B={batch}", "batch": batch, "kv": "bf16", "cfg": cfg, "frac": frac}
            for batch, cfg, frac in ((1, a, 0.6), (1, b, 0.8), (16, a, 0.9), (16, b, 0.7))]
    table = ta.pick_small_batch(rows, ta.pick(rows))
    entry = table["decode"][f"d{ta.HEAD_DIM}_bf16"]
    assert entry["small_batch"] == ta.SMALL_BATCH and entry["small_batch_config"] == b
    assert {k: entry[k] for k in a if k not in ("small_batch", "small_batch_config")} == {
        k: v for k, v in a.items() if k not in ("small_batch", "small_batch_config")}
    acfg.check_config({k: v for k, v in entry.items() if not k.endswith("geomean_frac")}, acfg.DECODE_KEYS, 128)
    # one batch class only: pick's choice, unchanged
    assert ta.pick_small_batch(rows[:2], ta.pick(rows[:2]))["decode"][f"d{ta.HEAD_DIM}_bf16"]["programs_per_sm"] == 8


def test_merge_block_d(monkeypatch):
    # the merge's grid is (batch, heads, head_dim / merge columns): 0 keeps the rule (32 columns at small batch,
    # one tile of 32 for head_dim 24), 8 gives three programs per head
    grids: list[tuple] = []
    real = dec._reduce_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(dec, "_reduce_kernel", Spy())
    args = _inputs(torch.float16)
    ref = paged_attention_decode_ref(*args)
    for merge_d, cols in ((0, 1), (8, 3), (16, 2)):
        out = paged_attention_decode(*args, num_splits=5, config=dict(CFG, merge_block_d=merge_d))
        assert grids[-1] == (3, 3, cols) and _rel_err(out, ref) < 3e-3
    with pytest.raises(ValueError, match="merge_block_d"):
        check_config({**CFG, **DECODE_KNOB_DEFAULTS, "merge_block_d": 12}, DECODE_KEYS, 24)


@pytest.mark.parametrize("fp8_widen", [1, 2])
def test_fp8_widen_config_runs_everywhere(fp8_widen):
    # off sm89+ (here: the interpreter) the knob falls back to Triton's cast: same attention; a bad value is refused
    args = _inputs(torch.float16, "fp8", seq_lens=(150, 0, 33))
    out = paged_attention_decode(*args, num_splits=3, config=dict(CFG, fp8_widen=fp8_widen))
    assert _rel_err(out, paged_attention_decode_ref(*args)) < 3e-3
    with pytest.raises(ValueError, match="fp8_widen"):
        paged_attention_decode(*args, config=dict(CFG, fp8_widen=3))


_SM90_WIDEN_PROBE = """
import json, sys
sys.path.insert(0, "benchmarks")
from attention_ir import inspect
print(json.dumps([inspect("decode", "fp8", block_n=n, stages=3, fp8_widen=w) for n in (64,) for w in (0, 1, 2)]))
"""


def test_fp8_widen_compiles_for_sm90_without_byte_gathers():
    # compiled for Hopper (no GPU needed): the V tile widened before its layout change reaches the PV dot through
    # ldmatrix, not one shared-memory byte load per value, in fewer instructions and registers; still double-buffered
    # K / V with the next copy in flight, no F2F, no spills
    for cast, v_only, k_and_v in zip(*[iter(run_sm90_probe(_SM90_WIDEN_PROBE))] * 3):
        assert cast["sass_ops"]["LDS_U8"] > 0
        for r in (v_only, k_and_v):
            assert r["sass_ops"]["LDS_U8"] == 0 and r["sass_ops"]["F2F"] == 0 and r["spill_bytes"] == 0
            assert r["sass_total"] < 0.8 * cast["sass_total"] and r["registers"] < cast["registers"]
            assert min(r["kv_buffer_depths"]) >= 2 and max(r["async_wait_in_flight"]) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("kv,head_dim", [("bf16", 128), ("fp8", 128), ("fp8", 80)])
def test_long_context_knobs_gpu(kv, head_dim):
    # Qwen3-30B-A3B heads at real lengths: 66 splits (8 programs per SM) with a narrow merge, each fp8_widen variant
    # (its PTX conversion runs here only), vs the torch reference; the same bits on a second call
    torch.manual_seed(3)
    seq_lens = [32768, 0, 4000, 17]
    k, v, tables = _make_cache(seq_lens, 16, 4, head_dim, torch.bfloat16, "cuda")
    scales = (1.0, 1.0)
    if kv == "fp8":
        scales = (k.abs().max().item() / 448, v.abs().max().item() / 448)
        k, v = (c.float().div(s).to(torch.float8_e4m3fn) for c, s in zip((k, v), scales))
    q = torch.randn(len(seq_lens), 32, head_dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    args = (q, k, v, lens, tables, head_dim**-0.5, *scales)
    ref = paged_attention_decode_ref(*args)
    base = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 8, "min_split_tokens": 64}
    small = dict(base, BLOCK_N=128, programs_per_sm=16, max_splits=256, fp8_widen=1)
    for knobs in ({"max_splits": 256}, {"max_splits": 512, "merge_block_d": 16}, {"fp8_widen": 1},
                  {"fp8_widen": 2, "max_splits": 256}, {"small_batch": 4, "small_batch_config": small}):
        cfg = dict(base, **knobs)
        out = paged_attention_decode(*args, config=cfg)
        assert _rel_err(out, ref) < 1e-2 and out[1].abs().max() == 0, knobs
        assert torch.equal(out, paged_attention_decode(*args, config=cfg))



@triton.jit
def _widen_tile(x_ptr, out_ptr, N: tl.constexpr, D: tl.constexpr):
    offs = tl.arange(0, N)[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(out_ptr + offs, widen_e4m3(tl.load(x_ptr + offs)))


@pytest.mark.gpu
def test_fp8_widen_is_exact_for_every_byte_gpu():
    # widen_e4m3's PTX against torch's e4m3 -> fp16 for all 256 bit patterns at every position of a decode tile
    # [64, 128] (the asm packs four bytes per register: a swapped byte order or half would move values): the same
    # fp16 bits (subnormals, +-0, +-448), NaN where torch has NaN
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("cvt.f16x2.e4m3x2 is sm89+ PTX")
    bits = torch.randperm(64 * 128, device="cuda") % 256  # every pattern 32 times, at scattered positions
    x = bits.to(torch.uint8).view(torch.float8_e4m3fn).view(64, 128)
    out = torch.empty(64, 128, dtype=torch.float16, device="cuda")
    _widen_tile[(1,)](x, out, N=64, D=128, num_warps=4)
    want = x.to(torch.float16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
