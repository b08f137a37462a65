"""The FP8 tensor-core attention variant (prefill FP8_DOT / decode fp8_dot, kernels/attention/fp8_dot.py): e4m3 x e4m3
dots,
q rounded to e4m3 with a per-(token, head) scale, the probabilities (x 256) rounded to e4m3.

Tolerance, derived: e4m3 keeps 3 mantissa bits, so rounding a value is off by at most 2^-4 of it (~0.026 rms over a
binade). Rounded q moves each score by ~that fraction of its size; rounded p weighs each V row off by ~that
fraction; the output, a sum of V rows, is then off by about the rms (random V: the errors add like the values). The
bound is the per-value worst case, 2^-4 of the output's norm, against the fp32 reference on the dequantized cache
and against the widening kernel, on scores of about unit spread (wider ones: q's share grows with them, see
test_decode_fp8_q2_keeps_spread_scores_accurate); a single-tile case (the running max is the row max) is checked
much tighter against a torch emulation of the same roundings. CPU: Triton interpreter, small odd sizes, fp32 / fp16
q (its e4m3 cast is emulated: fp8_dot._round_e4m3, checked bit for bit against torch here)."""

from __future__ import annotations

import json
import os
from functools import partial

import pytest
import torch
import triton
import triton.language as tl

from tests.sm90 import run_sm90_probe

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kernels.attention.config as acfg  # noqa: E402
from kernels.attention.decode import paged_attention_decode, paged_attention_decode_ref  # noqa: E402
from kernels.attention.fp8_dot import _round_e4m3, _to_e4m3  # noqa: E402
from kernels.attention.prefill import paged_attention_prefill, paged_attention_prefill_ref  # noqa: E402
from tests.test_kernels_attention import _fp8_cache, _make_cache, _rel_err  # noqa: E402

FP8 = torch.float8_e4m3fn
TOL = 2**-4  # the output's relative (norm) error: see the module docstring
# the FP8 dots' K (BLOCK_N for PV, head_dim for QK^T) is at least 32 on the GPU: the tests run such tiles only
DECODE_CFG = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2, "min_split_tokens": 32}
PREFILL_CFGS = [{"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "MASK_FREE": 1},
                {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}]


@triton.jit
def _round_kernel(x_ptr, out_ptr, out8_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    tl.store(out_ptr + tl.arange(0, N), _round_e4m3(x))
    tl.store(out8_ptr + tl.arange(0, N), _to_e4m3(x, True))


def test_e4m3_rounding_matches_torch():
    # every e4m3 value, the midpoints between neighbours (ties: to even), just off them, and random values over the
    # whole range (normal and subnormal): the kernels' rounding equals torch's cast bit for bit
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()  # 0 .. 448
    mid = (grid[1:] + grid[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-12, 8, (4096,), generator=g).float())
    x = torch.cat([grid, mid, mid * (1 + 2**-12), mid * (1 - 2**-12), rand.clamp(-448, 448)])
    x = torch.cat([x, -x])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())])
    out, out8 = torch.empty_like(x), torch.empty(n, dtype=FP8)
    _round_kernel[(1,)](x, out, out8, N=n)
    want = x.to(FP8)
    assert torch.equal(out, want.float())
    assert torch.equal(out8.float(), want.float())  # (as values: the interpreter's cast writes -0 as +0)


def _decode_case(heads: int, kv_heads: int, head_dim: int, seq_lens: list[int], dtype: torch.dtype, seed: int = 9):
    scales = (0.5, 2.0)
    k, v, tables = _fp8_cache(seq_lens, 16, kv_heads, head_dim, scales)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return (q, k, v, torch.tensor(seq_lens, dtype=torch.int32), tables, head_dim**-0.5, *scales)


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim", [(torch.float16, 6, 2, 48), (torch.float32, 8, 1, 32)])
def test_decode_fp8_dot(dtype, heads, kv_heads, head_dim):
    # GQA group 3 / 8, head_dim not a power of two; a padding row, one-token and multi-tile sequences; one split,
    # and a count that leaves some empty (the merge reads p's scale out of each split's lse)
    # fp8_dot 1 (query rows padded to 64) and 2 / 3 (transposed: tokens as rows), each its own arithmetic layout
    args = _decode_case(heads, kv_heads, head_dim, [77, 0, 1, 200, 33], dtype)
    ref = paged_attention_decode_ref(*args)
    for splits, fp8_dot in ((1, 1), (5, 1), (1, 2), (5, 2), (5, 3)):
        widen = paged_attention_decode(*args, num_splits=splits, config=DECODE_CFG)
        out = paged_attention_decode(*args, num_splits=splits, config={**DECODE_CFG, "fp8_dot": fp8_dot})
        assert out[1].abs().max() == 0
        err = _rel_err(out, ref)
        print(f"decode fp8_dot={fp8_dot} splits={splits} rel err vs ref {err:.4f}, vs widen {_rel_err(out, widen):.4f}")
        assert err < TOL and _rel_err(out, widen) < TOL, (splits, fp8_dot, err)
        assert _rel_err(out, widen) > 1e-3  # q and p really are rounded to e4m3 (the widening kernel is exact)
        assert _rel_err(widen, ref) < 3e-3
    # the fused merge (the last split merges in the same launch) reads the same lse: the same output
    two = paged_attention_decode(*args, num_splits=5, config={**DECODE_CFG, "fp8_dot": 1})
    fused = paged_attention_decode(*args, num_splits=5, fused_merge=True, config={**DECODE_CFG, "fp8_dot": 1})
    assert _rel_err(fused, two) < 1e-5
    # the key belongs to an FP8 cache's config: on a float cache it changes nothing (bit for bit)
    k, v, tables = _make_cache([40, 7], 16, 2, 32, torch.float32, "cpu")
    q = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(2))
    args = (q, k, v, torch.tensor([40, 7], dtype=torch.int32), tables, 32**-0.5)
    assert torch.equal(paged_attention_decode(*args, config={**DECODE_CFG, "fp8_dot": 2}),
                       paged_attention_decode(*args, config=DECODE_CFG))


@pytest.mark.parametrize("cfg,dtype,heads", [(PREFILL_CFGS[0], torch.float32, 8), (PREFILL_CFGS[1], torch.float16, 6)])
def test_prefill_fp8_dot(cfg, dtype, heads):
    # group 4 packs into the tile, group 3 does not; a chunk over a cached prefix, a 1-token chunk, an empty one
    kv_heads, head_dim = 2, 32
    q_lens, seq_lens = [5, 1, 0, 70], [5, 40, 9, 131]
    scales = (0.5, 2.0)
    k, v, tables = _fp8_cache(seq_lens, 16, kv_heads, head_dim, scales)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    cu = torch.tensor([0, 5, 6, 6, 76], dtype=torch.int32)
    args = (q, k, v, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, head_dim**-0.5, max(q_lens), *scales)
    ref = paged_attention_prefill_ref(*args)
    widen = paged_attention_prefill(*args, config=cfg)
    out = paged_attention_prefill(*args, config={**cfg, "FP8_DOT": 1})
    print(f"prefill rel err vs ref {_rel_err(out, ref):.4f}, vs widen {_rel_err(out, widen):.4f}")
    assert _rel_err(out, ref) < TOL and _rel_err(out, widen) < TOL, _rel_err(out, ref)
    assert _rel_err(out, widen) > 1e-3
    per_token = (out - ref).float().norm(dim=(1, 2)) / ref.float().norm(dim=(1, 2)).clamp_min(1e-6)
    assert per_token.max() < 2 * TOL, per_token.max()  # no token far off (a lone token's sum averages less)


def test_fp8_dot_saturates_a_16bit_q_as_the_widening_kernels():
    # a bf16 q with an inf, or values past fp16's range, in some heads: saturated to +-65504 before the row's absmax
    # scale, as the widening kernels saturate it for their fp16 dots, the output stays finite (unsaturated: the row's
    # scale is inf, or its scores overflow, and its output NaN or, through the split merge, zeros)
    seq_lens = [45, 20]
    k, v, tables = _fp8_cache(seq_lens, 16, 2, 32, (0.5, 2.0))
    q = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    q[0, 1, 3] = float("inf")
    q[1, 2] = 1e38  # every score past fp32's range unsaturated; saturated, one key wins in both kernels
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = (q, k, v, lens, tables, 32**-0.5, 0.5, 2.0)
    plain = torch.ones(2, 4, dtype=torch.bool)
    plain[0, 1] = plain[1, 2] = False
    for splits, fp8_dot in ((1, 1), (3, 2)):
        out = paged_attention_decode(*args, num_splits=splits, config={**DECODE_CFG, "fp8_dot": fp8_dot})
        widen = paged_attention_decode(*args, num_splits=splits, config=DECODE_CFG)
        assert torch.isfinite(out.float()).all() and out[0, 1].abs().max() > 0, (splits, fp8_dot)
        assert _rel_err(out[plain], widen[plain]) < TOL and _rel_err(out[1, 2], widen[1, 2]) < 1e-2
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    pre = (q, k, v, cu, lens, tables, 32**-0.5, 1, 0.5, 2.0)
    out = paged_attention_prefill(*pre, config={**PREFILL_CFGS[1], "FP8_DOT": 1})
    widen = paged_attention_prefill(*pre, config=PREFILL_CFGS[1])
    assert torch.isfinite(out.float()).all() and _rel_err(out[plain], widen[plain]) < TOL


def _emulate_one_tile(q, k8, v8, seq_len, scale, k_scale, v_scale, q2=False):
    # the kernels' arithmetic for one sequence whose keys fit one tile (the running max is the row max), in torch:
    # q [H, D] (one decode token), k8 / v8 [seq_len, KVH, D] e4m3 as stored; q2: decode's fp8_q2 (q as e4m3 plus
    # what that rounding left, x 16, in e4m3 too)
    q = q.float()
    amax = q.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 448.0 / amax, torch.ones_like(amax))
    qs = (q * inv).clamp(-448, 448)
    q8 = qs.to(FP8).float()
    if q2:
        q8 = q8 + ((qs - q8) * 16).to(FP8).float() / 16
    group = q.shape[0] // k8.shape[1]
    k = k8.float().repeat_interleave(group, 1)  # [seq_len, H, D]
    v = v8.float().repeat_interleave(group, 1)
    s = torch.einsum("hd,nhd->hn", q8, k) * (scale * k_scale * 1.4426950408889634 / inv)
    p = torch.exp2(s - (s.amax(-1, keepdim=True) - 8))
    return torch.einsum("hn,nhd->hd", p.to(FP8).float(), v) * v_scale / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("fp8_dot,fp8_q2", [(1, 0), (2, 0), (1, 1), (2, 1)])
def test_decode_fp8_dot_single_tile_matches_emulation(fp8_dot, fp8_q2):
    # seq lens within one BLOCK_N tile and one split: the kernel's output equals the torch emulation of the same
    # roundings up to fp32 summation order (a rounding flip of one p would show as ~1e-2)
    heads, kv_heads, head_dim = 6, 2, 48
    args = _decode_case(heads, kv_heads, head_dim, [13, 16, 1], torch.float32, seed=4)
    q, k8, v8, lens, tables, scale, k_scale, v_scale = args
    out = paged_attention_decode(*args, num_splits=1, config={**DECODE_CFG, "fp8_dot": fp8_dot, "fp8_q2": fp8_q2})
    for b, n in enumerate(lens.tolist()):
        rows = k8[tables[b, :1].long()].flatten(0, 1)[:n], v8[tables[b, :1].long()].flatten(0, 1)[:n]
        want = _emulate_one_tile(q[b], *rows, n, scale, k_scale, v_scale, bool(fp8_q2))
        assert _rel_err(out[b], want) < 1e-5, b


def test_decode_fp8_q2_keeps_spread_scores_accurate():
    # scores that spread over several units (q x 4: score std ~4, as in a trained model's peaked heads): q's rounding
    # to e4m3 moves them by ~2^-4 of their size and the output by ~5% (past 2^-4 at other spreads: the module
    # docstring of kernels/attention/decode.py); fp8_q2 (q as two e4m3 terms) leaves p's rounding, well under 1e-2.
    # GLM-4.5-Air's GQA group of 12 (query rows padded to 16 / 64)
    args = list(_decode_case(24, 2, 64, [300, 77], torch.float16, seed=3))
    args[0] = args[0] * 4
    ref = paged_attention_decode_ref(*args)
    for fp8_dot in (1, 2):
        one = paged_attention_decode(*args, num_splits=3, config={**DECODE_CFG, "fp8_dot": fp8_dot})
        two = paged_attention_decode(*args, num_splits=3, config={**DECODE_CFG, "fp8_dot": fp8_dot, "fp8_q2": 1})
        assert _rel_err(one, ref) > 3e-2 and _rel_err(two, ref) < 1e-2, (fp8_dot, _rel_err(one, ref))


def test_fp8_dot_config_keys():
    # default off (the kernels without a table: on the CPU, or another GPU); 0 / 1 only
    cpu = torch.device("cpu")  # (no device: the current GPU's table where there is one)
    for dtype in (FP8, torch.bfloat16):
        assert acfg.decode_config(128, dtype, cpu)["fp8_dot"] == 0
        assert not acfg.prefill_config(128, dtype, cpu).get("FP8_DOT")
    default = acfg.default_decode_config(128)
    with pytest.raises(ValueError, match="fp8_dot=4"):
        acfg.check_config(dict(default, fp8_dot=4), acfg.DECODE_KEYS, 128)
    with pytest.raises(ValueError, match="variant keys are 0 or 1"):
        acfg.check_config(dict(acfg.default_prefill_config(128), FP8_DOT=3), acfg.PREFILL_KEYS, 128)
    with pytest.raises(ValueError, match="need BLOCK_N >= 32 and head_dim > 16"):
        acfg.check_config(dict(default, BLOCK_N=16, fp8_dot=2), acfg.DECODE_KEYS, 128)
    with pytest.raises(ValueError, match="need BLOCK_N >= 32 and head_dim > 16"):
        acfg.check_config(dict(acfg.default_prefill_config(16), FP8_DOT=1), acfg.PREFILL_KEYS, 16)
    small = dict(default, small_batch=4, small_batch_config=dict(default, BLOCK_N=32))
    on = acfg.with_fp8_dot(small, "decode")
    assert on["fp8_dot"] == 1 and on["small_batch_config"]["fp8_dot"] == 1 and small["fp8_dot"] == 0
    assert acfg.decode_config_for(on, 1)["fp8_dot"] == 1 and acfg.decode_config_for(on, 1)["BLOCK_N"] == 32
    assert acfg.with_fp8_dot(acfg.default_prefill_config(128), "prefill")["FP8_DOT"] == 1
    with pytest.raises(ValueError, match="fp8_q2=2"):
        acfg.check_config(dict(default, fp8_q2=2), acfg.DECODE_KEYS, 128)
    q2 = acfg.with_fp8_dot(small, "decode", 2, 1)
    assert q2["fp8_q2"] == 1 and q2["small_batch_config"]["fp8_q2"] == 1 and on["fp8_q2"] == 0
    off = acfg.with_fp8_dot(on, "decode", 0)
    assert off["fp8_dot"] == 0 and off["small_batch_config"]["fp8_dot"] == 0
    assert acfg.with_fp8_dot({**acfg.default_prefill_config(128), "FP8_DOT": 1}, "prefill", 0)["FP8_DOT"] == 0


def test_h200_table_runs_fp8_decode_dots_only_with_the_two_term_q(monkeypatch):
    # the checked-in H200 table (read as this GPU's): decode on an FP8 cache runs the e4m3 dots at every batch, and
    # only with the two-term q (fp8_q2): one-term q loses accuracy as scores spread (DECODE_TILES_FP8_DOT in
    # benchmarks/tune_attention.py). Measured 2026-11-30: fp8_dot 2 + fp8_q2 at B=1 128k 0.76 of copy bandwidth,
    # the widening kernels 0.63
    monkeypatch.setattr(acfg, "device_name", lambda device=None: "NVIDIA_H200")
    acfg.clear_cache()
    try:
        entry = acfg.decode_config(128, FP8)
        picked = [acfg.decode_config_for(entry, b) for b in (1, 4, 5, 256)]
        assert [(c["fp8_dot"], c["fp8_q2"]) for c in picked] == [(2, 1)] * 4
        assert entry["small_batch"] > 0 and entry["small_batch_config"]["fp8_q2"] == 1
        assert acfg.decode_config(128, torch.bfloat16)["fp8_dot"] == 0
        for head_dim in (64, 96, 256):
            assert acfg.decode_config(head_dim, FP8) == acfg.default_decode_config(head_dim)
        assert not acfg.prefill_config(128, FP8).get("FP8_DOT")
    finally:
        acfg.clear_cache()


def test_tuner_sweeps_only_the_two_term_q_for_the_table():
    # a table pick of a one-term-q tile would trade accuracy the tuner's flat random scores cannot show
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_attention as ta

    assert ta.DECODE_TILES_FP8_DOT and all(len(t) == 6 and t[4] > 0 and t[5] == 1 for t in ta.DECODE_TILES_FP8_DOT)
    assert ta.PREFILL_FP8_DOT_TILES == []
    assert all(c["fp8_q2"] == 1 for c in ta.decode_cfgs("fp8", fp8_dot_only=True)[1:])


def test_bench_fp8_rows_keep_the_widening_kernels_measurable(monkeypatch, tmp_path):
    # with a table that turns decode's fp8_dot on (H200's), bench_attention's kv "fp8" runs the table as it is and
    # "fp8widen" the widening kernels (fp8_dot 0 at every batch), so the two stay side by side
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_attention as ba

    table = {"decode": {"d128_fp8": acfg.with_fp8_dot(acfg.default_decode_config(128), "decode", 2)},
             "prefill": {"d128_fp8": {**acfg.default_prefill_config(128), "FP8_DOT": 1}}}
    (tmp_path / acfg.config_file_name("cpu")).write_text(json.dumps(table))
    monkeypatch.setattr(acfg, "CONFIG_DIR", tmp_path)
    acfg.clear_cache()
    try:
        assert ba.kernel_config("decode", "fp8") is None  # the kernels' own lookup: fp8_dot 2 here
        widen = ba.kernel_config("decode", "fp8widen")
        assert widen["fp8_dot"] == 0 and widen == {**table["decode"]["d128_fp8"], "fp8_dot": 0}
        assert ba.kernel_config("prefill", "fp8widen")["FP8_DOT"] == 0
        assert ba.kernel_config("decode", "fp8dot3")["fp8_dot"] == 3
        assert ba.kernel_config("prefill", "fp8dot")["FP8_DOT"] == 1
        assert ba.kernel_config("decode", "fp8dot2q2")["fp8_q2"] == 1
        assert ba.kernel_config("decode", "fp8dot2")["fp8_q2"] == 0
    finally:
        acfg.clear_cache()


_SM90_PROBE = """
import json, sys
sys.path.insert(0, "benchmarks")
from attention_ir import inspect
dec = {f"decode {n} {w} {f}": inspect("decode", "fp8", block_n=n, warps=w, stages=3, fp8_dot=f)
       for n, w, f in ((64, 4, 1), (128, 8, 1), (64, 4, 2), (128, 8, 2), (128, 4, 3))}
dec |= {f"decode {n} {w} q2 {f}": inspect("decode", "fp8", block_n=n, warps=w, stages=3, fp8_dot=f, fp8_q2=True)
        for n, w, f in ((128, 4, 2), (64, 4, 1))}
pre = {"prefill": inspect("prefill", "fp8", block_m=128, block_n=128, warps=8, stages=3,
                          variants=("MASK_FREE", "FP8_DOT"))}
print(json.dumps(dec | pre))
"""


def test_fp8_dot_compiles_to_fp8_wgmma_for_sm90():
    # no GPU needed: both dots of both kernels are e4m3 x e4m3 wgmma (SASS QGMMA; decode's fp8_dot 1 pads the query
    # rows to 64, 2 / 3 make the tokens the rows: 16 query rows would be mma.sync, which Triton runs on sm90 in fp16
    # after widening), no spills, no e4m3 -> fp16 widening, K copied ahead asynchronously. V: copied ahead too (a
    # ring of its own; without fp8_dot._hold_fp8 V was a plain load waited for before the dots, its
    # register-staged copy into the K-major layout wgmma needs sitting at the load), never gathered byte by byte
    # as a B operand (fp8_dot 1, prefill); as fp8_dot 2's A operand it is (LDS.U8), 3 trades that for the blocking load
    for name, r in run_sm90_probe(_SM90_PROBE).items():
        assert r["mma"] == "wgmma" and r["qgmma"] > 0 and r["hgmma"] == 0, (name, r)
        assert r["spill_bytes"] == 0 and r["sass_ops"]["HMMA"] == 0 and r["sass_ops"]["F2F"] == 0, (name, r)
        assert min(r["kv_buffer_depths"]) >= 2 and max(r["async_wait_in_flight"]) > 0, (name, r)
        pipelined_v = not name.endswith(" 3")
        assert len(r["kv_buffer_depths"]) == (1 + pipelined_v) * (2 if name == "prefill" else 1), (name, r)
        assert (r["sass_ops"]["LDS_U8"] > 0) == (name.endswith(" 2")), (name, r)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("fp8dot") / "qwen3"), "Qwen3ForCausalLM")


def test_tiny_model_logits_and_greedy_with_fp8_dot(tiny_qwen3: str):
    # the Triton kernels (interpreted) through a tiny Qwen3 on an FP8 cache: a prefill of 3 prompts, then greedy
    # decode steps (decode's fp8_dot 2; 1 computes the same roundings in another layout: test_decode_fp8_dot); the
    # variant's logits vs the widening kernels' within a stated tolerance (logits' std ~0.65: cosine > 0.99 per
    # token, no logit off by more than 0.25), the same greedy tokens
    from kernels.attention.prefill import store_kv
    from runtime.engine.attention_backend import PagedAttention
    from tests.test_models import PagedRun, load

    model = load(tiny_qwen3)
    scales = [(0.5, 0.25)] * model.num_layers
    g = torch.Generator().manual_seed(1)
    toks = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (40, 9, 17)]

    def run(fp8_dot: int) -> tuple[torch.Tensor, list[list[int]]]:
        pre = acfg.prefill_config(model.head_dim, FP8)
        dec = acfg.decode_config(model.head_dim, FP8)
        if fp8_dot:
            pre, dec = acfg.with_fp8_dot(pre, "prefill"), acfg.with_fp8_dot(dec, "decode", fp8_dot)
        backend = PagedAttention(store_kv, partial(paged_attention_prefill, config=pre),
                                 partial(paged_attention_decode, config=dec), scales)
        paged = PagedRun(model, 64, len(toks), backend)
        paged.kv_caches = [(k.to(FP8), v.to(FP8)) for k, v in paged.kv_caches]
        logits, greedy = [], [[] for _ in toks]
        with torch.no_grad():
            step = paged.step(toks, [0] * len(toks))
            ends = torch.tensor([len(t) for t in toks]).cumsum(0) - 1
            last = step[ends]
            logits.append(step)
            for i in range(3):
                nxt = last.argmax(-1).tolist()
                for b, t in enumerate(nxt):
                    greedy[b].append(t)
                last = paged.step([[t] for t in nxt], [len(t) + i for t in toks])
                logits.append(last)
        return torch.cat(logits), greedy

    ref, ref_greedy = run(0)
    out, greedy = run(2)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    print(f"tiny model: cos min {cos.min():.5f}, max |logit diff| {(ref - out).abs().max():.4f}")
    assert cos.min() > 0.99 and (ref - out).abs().max() < 0.25, (cos.min(), (ref - out).abs().max())
    assert greedy == ref_greedy
    assert not torch.equal(ref, out)  # the variant ran


@pytest.mark.gpu
def test_fp8_dot_gpu():
    # compiled for this GPU at Qwen3-30B-A3B heads (32 q / 4 KV, head_dim 128) on a bf16 q: decode (splits from the
    # table's rule, and one) and an extend over a cached prefix, vs the fp32 reference and the widening kernels
    torch.manual_seed(5)
    seq_lens = [3000, 1, 700, 0]
    scales = (1.0, 0.5)
    k, v, tables = _make_cache(seq_lens, 16, 4, 128, torch.bfloat16, "cuda")
    k, v = (k.float() / scales[0]).to(FP8), (v.float() / scales[1]).to(FP8)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(seq_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    args = (q, k, v, lens, tables, 128**-0.5, *scales)
    ref = paged_attention_decode_ref(*args)
    table = acfg.decode_config(128, FP8, q.device)
    for block_n, warps, fp8_dot, q2 in ((64, 4, 1, 0), (128, 8, 1, 0), (64, 4, 2, 0), (128, 4, 2, 0), (128, 8, 2, 0),
                                        (64, 4, 3, 0), (128, 4, 3, 0), (128, 4, 2, 1), (64, 4, 1, 1)):
        cfg = acfg.with_fp8_dot(dict(table, BLOCK_N=block_n, num_warps=warps, num_stages=3, small_batch=0), "decode",
                                fp8_dot, q2)
        for splits in (None, 1):
            out = paged_attention_decode(*args, num_splits=splits, config=cfg)
            widen = paged_attention_decode(*args, num_splits=splits, config=dict(cfg, fp8_dot=0))
            assert out[3].abs().max() == 0
            assert _rel_err(out, ref) < TOL and _rel_err(out, widen) < TOL, (block_n, warps, fp8_dot, q2, splits)
            assert _rel_err(out, widen) > 1e-3
    q_ext = torch.randn(600, 32, 128, device="cuda", dtype=torch.bfloat16)
    ext = (q_ext, k, v, torch.tensor([0, 600], dtype=torch.int32, device="cuda"), lens[:1], tables[:1], 128**-0.5,
           600, *scales)
    ref = paged_attention_prefill_ref(*ext)
    for tile in ((128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2)):
        cfg = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tile), MASK_FREE=1, FP8_DOT=1)
        out = paged_attention_prefill(*ext, config=cfg)
        # the widening baseline at 2 stages: its fp16 K / V tiles at 4 stages of 128 x 128 need 295 KB of shared
        # memory (the H200 has 227 KB); stages do not change its numbers
        widen = paged_attention_prefill(*ext, config=dict(cfg, FP8_DOT=0, num_stages=2))
        assert _rel_err(out, ref) < TOL and _rel_err(out, widen) < TOL, tile
        assert _rel_err(out, widen) > 1e-3, tile
