"""Weight-only FP8 experts in fp16 MMA (config "w8_mma": "f16" / "f16_swap") vs the torch reference and the old
"dequant" mode, and the exact power-of-two row split that keeps 16-bit activations inside fp16's range."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.fp8 import f16_pow2_split, quantize_weight_block  # noqa: E402
from kernels.fused_moe import fused_experts, fused_experts_ref  # noqa: E402
from kernels.moe_config import default_config  # noqa: E402
from kernels.moe_w8 import W8_MMA_MODES  # noqa: E402
from tests.sm90 import run_sm90_probe  # noqa: E402
from tests.tiny import tiny_moe_inputs  # noqa: E402

MODES = ("f16", "f16_swap")  # (the "_cast" variants differ only where the PTX runs, not in the interpreter)


@triton.jit
def _split_kernel(x_ptr, q_ptr, s_ptr, R, C, R_PAD: tl.constexpr, C_PAD: tl.constexpr):
    r = tl.arange(0, R_PAD)
    c = tl.arange(0, C_PAD)
    mask = (r < R)[:, None] & (c < C)[None, :]
    x = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=mask, other=0.0)
    q, s = f16_pow2_split(x)
    tl.store(q_ptr + r[:, None] * C + c[None, :], q, mask=mask)
    tl.store(s_ptr + r, s, mask=r < R)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=torch.float16)
    s = torch.empty(x.shape[0], dtype=torch.float32)
    r, c = x.shape
    _split_kernel[(1,)](x, q, s, r, c, R_PAD=triton.next_power_of_2(r), C_PAD=triton.next_power_of_2(c))
    return q, s


def test_f16_pow2_split_is_exact_at_any_range():
    # bf16-valued rows from 1e-35 to 3e38 (and a zero row): fp16 values below 2^14 whose product with the row's power
    # of two gives every input back bit for bit, where a plain fp16 cast gives inf or 0
    torch.manual_seed(0)
    mags = torch.tensor([1e-35, 1e-20, 1e-6, 1.0, 7e4, 3e5, 1e20, 3e38, 0.0])
    x = (torch.randn(len(mags), 40).clamp(-1.1, 1.1) * mags[:, None]).to(torch.bfloat16).float()
    q, s = _split(x)
    assert torch.isfinite(q).all() and q.abs().max() < 2**15 and q[3].abs().max() >= 2**13
    assert torch.equal(q.float() * s[:, None], x)
    assert (s.log2() == s.log2().round()).all()  # powers of two
    assert not torch.isfinite(x[5].half()).all()  # what the split avoids


def test_f16_pow2_split_every_bf16_value():
    # each of the 65536 bf16 bit patterns (both zeros, subnormals, the extremes, inf, nan) alone in a row, then beside
    # a row max 2^30 times larger: x16 * s gives it back bit for bit (inf / nan stay so), |x16| < 2^15, and s is a
    # normal power of two (the exponent clamp: without it a zero or subnormal row gets s = 0 and 1 / s = inf)
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    q, s = _split(torch.stack([v, torch.zeros_like(v)], 1))
    num = ~v.isnan()
    assert torch.equal(q[num, 0].float() * s[num], v[num]) and q[~num, 0].isnan().all() and (q[:, 1] == 0).all()
    assert torch.equal(q[num, 0].signbit(), v[num].signbit())  # -0.0 stays -0.0
    assert q[v.isfinite()].float().abs().max() < 2**15
    assert ((s >= 2.0**-126) & (s < 2.0**127)).all() and (s.log2() == s.log2().round()).all()
    big = (v * 2.0**30).to(torch.bfloat16).float()
    x = torch.stack([v, big], 1)[v.isfinite() & big.isfinite()]
    q, s = _split(x)
    assert torch.equal(q.float() * s[:, None], x)


def _blocky(shape, block=128):
    # per-[128, 128]-block magnitudes 2^-3..2^3: a scale taken from the wrong block, or applied twice or never, shows
    w = torch.randn(shape)
    nb, kb = -(-shape[-2] // block), -(-shape[-1] // block)
    mag = 2.0 ** torch.randint(-3, 4, (*shape[:-2], nb, kb)).float()
    return w * mag.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., : shape[-2], : shape[-1]]


def _experts(num_experts, hidden, inter, seed):
    torch.manual_seed(seed)
    w13, s13 = quantize_weight_block(_blocky((num_experts, 2 * inter, hidden)) / hidden**0.5)
    w2, s2 = quantize_weight_block(_blocky((num_experts, hidden, inter)) / inter**0.5)
    return w13, s13, w2, s2


def _routing(num_tokens, num_experts, top_k):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
    ids[::3, 0] = -1  # slots another rank handles
    return torch.rand(num_tokens, top_k) + 0.1, ids


def _config(num_tokens, num_experts, top_k, mode, block_m=16, bn_up=64, bn_down=64, block_k=128):
    cfg = default_config(num_tokens, num_experts, top_k, True)
    up = dict(cfg["up"], BLOCK_N=bn_up, BLOCK_K=block_k, w8_mma=mode)
    return dict(cfg, BLOCK_M=block_m, act_fp8=False, up=up, down=dict(up, BLOCK_N=bn_down))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,hidden,inter,block_m,bn_up,bn_down", [
    (9, 256, 192, 16, 128, 64),  # up: EVEN_K, N masked (192 of 256); down: K 192 uneven, N even
    (13, 200, 128, 32, 64, 128),  # up: K 200 uneven, N even; down: EVEN_K, N masked (200 of 256)
    (1, 200, 192, 16, 64, 64),  # one token: the no-align path
])
def test_w8_f16_vs_reference_and_dequant(mode, dtype, num_tokens, hidden, inter, block_m, bn_up, bn_down):
    num_experts, top_k = 5, 3
    w13, s13, w2, s2 = _experts(num_experts, hidden, inter, seed=num_tokens)
    x = torch.randn(num_tokens, hidden).to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k)
    kw = {"w13_scale": s13, "w2_scale": s2}
    ref = fused_experts_ref(x, w13, w2, weights, ids, act_fp8=False, **kw)
    old = fused_experts(x, w13, w2, weights, ids, config=_config(num_tokens, num_experts, top_k, "dequant", block_m,
                                                                   bn_up, bn_down), **kw)
    new = fused_experts(x, w13, w2, weights, ids, config=_config(num_tokens, num_experts, top_k, mode, block_m,
                                                                   bn_up, bn_down), **kw)
    tol = 2e-3 if dtype == torch.float16 else 1e-3  # fp32 inputs are rounded to fp16 for the MMA
    assert new.dtype == dtype and _rel_err(new, ref) < tol and _rel_err(new, old) < tol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_k", [32, 64])
def test_w8_f16_block_k_below_128_and_wide_tiles(mode, block_k):
    # BLOCK_K 64 / 32 (the tuner's LARGE tiles, BLOCK_M >= 64): one 128-block's scale serves 2-4 K steps and each
    # step's is fetched a step ahead; BLOCK_N 256 (W8_EXTRA): a column tile spans two or three scale blocks. Up: K 320
    # (EVEN_K, the last block half full), N 200 (gate and up blocks 0-3 in one tile); down: K 200 uneven, N 320
    num_tokens, num_experts, hidden, inter, top_k = 11, 4, 320, 200, 2
    w13, s13, w2, s2 = _experts(num_experts, hidden, inter, seed=11)
    x = torch.randn(num_tokens, hidden).half()
    weights, ids = _routing(num_tokens, num_experts, top_k)
    kw = {"w13_scale": s13, "w2_scale": s2}
    ref = fused_experts_ref(x, w13, w2, weights, ids, act_fp8=False, **kw)
    cfg = _config(num_tokens, num_experts, top_k, mode, 16, 256, 256, block_k)
    assert _rel_err(fused_experts(x, w13, w2, weights, ids, config=cfg, **kw), ref) < 2e-3


@pytest.mark.parametrize("mode", ("dequant",) + MODES)
def test_w8_block_scale_applied_once(mode):
    # the output is linear in the down's scales and in the up half's (silu(g) * u): scaling those by 2 and 4 must
    # scale the output by exactly 8 (powers of two: no rounding moves); applied twice it would be 64, never 1
    num_tokens, num_experts, hidden, inter, top_k = 6, 4, 200, 128, 2
    w13, s13, w2, s2 = _experts(num_experts, hidden, inter, seed=7)
    x = torch.randn(num_tokens, hidden)
    weights, ids = _routing(num_tokens, num_experts, top_k)
    cfg = _config(num_tokens, num_experts, top_k, mode)
    out = fused_experts(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, config=cfg)
    s13_up = s13.clone()
    s13_up[:, inter // 128:] *= 4  # the up rows' blocks (inter is a multiple of 128: no block mixes gate and up)
    out8 = fused_experts(x, w13, w2, weights, ids, w13_scale=s13_up, w2_scale=s2 * 2, config=cfg)
    assert out.abs().max() > 0 and torch.allclose(out8, 8 * out, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [3e5, 1e-7])
def test_w8_f16_activations_beyond_fp16_range(mode, scale):
    # fp32 hidden states past fp16's 65504 (and the down's input silu(g) * u ~ scale^2), or so small that fp16 would
    # flush them: the per-row powers of two keep both GEMMs at the reference's accuracy
    num_tokens, num_experts, hidden, inter, top_k = 7, 4, 256, 128, 2
    w13, s13, w2, s2 = _experts(num_experts, hidden, inter, seed=3)
    x = torch.randn(num_tokens, hidden) * scale
    weights, ids = _routing(num_tokens, num_experts, top_k)
    kw = {"w13_scale": s13, "w2_scale": s2}
    ref = fused_experts_ref(x, w13, w2, weights, ids, act_fp8=False, **kw)
    out = fused_experts(x, w13, w2, weights, ids, config=_config(num_tokens, num_experts, top_k, mode), **kw)
    assert torch.isfinite(out).all() and _rel_err(out, ref) < 1e-3


def test_w8_mma_config_errors():
    num_experts, hidden, inter, top_k = 4, 128, 128, 2
    w13, s13, w2, s2 = _experts(num_experts, hidden, inter, seed=1)
    x = torch.randn(3, hidden)
    weights, ids = _routing(3, num_experts, top_k)
    cfg = _config(3, num_experts, top_k, "f16")
    with pytest.raises(ValueError, match="act_fp8 false"):
        fused_experts(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, config=dict(cfg, act_fp8=True))
    with pytest.raises(ValueError, match="act_fp8 false"):  # 16-bit weights
        fused_experts(x, torch.randn(num_experts, 2 * inter, hidden), torch.randn(num_experts, hidden, inter),
                      weights, ids, config=cfg)
    with pytest.raises(ValueError, match="w8_mma must be one of"):
        fused_experts(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2,
                      config=dict(cfg, down=dict(cfg["down"], w8_mma="fp16")))
    for bad13, bad2 in ((s13.bfloat16(), s2), (s13, s2.bfloat16())):  # the kernels read scales as fp32 per block
        with pytest.raises(ValueError, match="contiguous fp32"):
            fused_experts(x, w13, w2, weights, ids, w13_scale=bad13, w2_scale=bad2, config=cfg)


def test_tuner_times_every_w8_mode_and_keeps_the_table(monkeypatch, tmp_path):
    # tune_moe on a tiny FP8 shape in the interpreter: weight-only plans time each tile in every w8_mma mode (each
    # launch runs), the fastest per GEMM lands in the table, and the table in use keeps its other buckets and "gemv"
    import functools
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_moe

    import kernels.moe_config as mc

    launched = []

    class Recorded(tune_moe.Problem):
        def launches(self, kind, g, bm, act_fp8):
            launched.append((kind, g))
            return super().launches(kind, g, bm, act_fp8)

    def fake_time(run, n):  # runs the candidate; up fastest in f16_swap, down in f16, narrow tiles first
        run()
        kind, g = launched[-1]
        fastest = "f16_swap" if kind == "up" else "f16"
        return (1.0 if g["w8_mma"] == fastest else 2.0) + g["BLOCK_N"] / 1000

    monkeypatch.setitem(tune_moe.SHAPES, "tiny", (4, 160, 96, 2))
    monkeypatch.setattr(tune_moe, "SMALL", [(16, 128, 4, 2)])
    monkeypatch.setattr(tune_moe, "W8_EXTRA", [(64, 128, 4, 2)])
    monkeypatch.setattr(tune_moe, "make_inputs", tiny_moe_inputs)
    monkeypatch.setattr(tune_moe, "bench_graph", lambda fn, rep_ms=60: (fn(), 1.0)[1])
    monkeypatch.setattr(tune_moe, "time_run", fake_time)
    monkeypatch.setattr(tune_moe, "Problem", functools.partial(Recorded, device="cpu"))
    monkeypatch.setattr(tune_moe, "CONFIG_DIR", tmp_path)
    name = mc.config_file_name(4, 160, 96, "fp8", mc.device_name())
    old = {"1": {"BLOCK_M": 16, "gemv": {"max_tokens": 1}}, "4": {"BLOCK_M": 64, "gemv": {"max_tokens": 4}}}
    (tmp_path / name).write_text(json.dumps(old))
    tune_moe.tune_shape("tiny", [4], "fp8", tmp_path / "out")
    assert sorted((k, g["BLOCK_N"], g["w8_mma"]) for k, g in launched) == sorted(
        (k, bn, mode) for k in ("up", "down") for bn in (16, 64)
        for mode in ("dequant", "f16", "f16_swap", "f16_cast", "f16_swap_cast"))
    table = json.loads((tmp_path / "out" / "configs" / name).read_text())
    assert table["1"] == old["1"] and table["4"]["gemv"] == old["4"]["gemv"]
    assert table["4"]["act_fp8"] is False and table["4"]["BLOCK_M"] == 16
    assert (table["4"]["up"]["w8_mma"], table["4"]["up"]["BLOCK_N"]) == ("f16_swap", 16)
    assert (table["4"]["down"]["w8_mma"], table["4"]["down"]["BLOCK_N"]) == ("f16", 16)


def test_tuner_starts_from_another_gpus_table(monkeypatch, tmp_path):
    # a GPU without its own table runs on another GPU's (moe_config's fallback, "tma" off): a tune over a few M must
    # start from that one, not write a table of those buckets alone (whose nearest bucket would then serve every M)
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_moe

    import kernels.moe_config as mc

    monkeypatch.setattr(tune_moe, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tune_moe, "device_name", lambda: "GPU_B")
    other = {"1": {"BLOCK_M": 16, "gemv": {"max_tokens": 1}}, "64": {"BLOCK_M": 16, "tma": {"min_rows": 9}},
             "4096": {"BLOCK_M": 64, "tma": {"min_rows": 8192}}}
    (tmp_path / mc.config_file_name(4, 160, 96, "fp8", "GPU_A")).write_text(json.dumps(other))
    path, foreign = tune_moe.table_in_use(4, 160, 96, "fp8")
    assert foreign and tune_moe.table_in_use(4, 160, 96, "bfloat16") == (
        tmp_path / mc.config_file_name(4, 160, 96, "bfloat16", "GPU_B"), False)
    table = tune_moe.keep_tma_entries({"64": {"BLOCK_M": 32}}, path, foreign)
    assert table == {"1": other["1"], "64": {"BLOCK_M": 32}, "4096": {"BLOCK_M": 64}}
    (tmp_path / mc.config_file_name(4, 160, 96, "fp8", "GPU_B")).write_text(json.dumps(other))  # its own: all kept
    assert tune_moe.keep_tma_entries({"64": {"BLOCK_M": 32}}, *tune_moe.table_in_use(4, 160, 96, "fp8")) == dict(
        other, **{"64": {"BLOCK_M": 32, "tma": {"min_rows": 9}}})


def test_bench_moe_times_each_w8_mode(monkeypatch):
    # bench_moe's FP8 weight-only rows: the layer in each w8_mma mode with the same tiles, each near the reference
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_moe

    monkeypatch.setitem(bench_moe.SHAPES, "tiny", (4, 160, 96, 2))
    monkeypatch.setattr(bench_moe, "NUM_ROT", 1)
    monkeypatch.setattr(bench_moe, "make_inputs", tiny_moe_inputs)
    monkeypatch.setattr(bench_moe, "bench_graph", lambda fn, rep_ms=60: (fn(), 1.0)[1])
    w13, s13, w2, s2 = _experts(4, 160, 96, seed=2)
    row = bench_moe.bench_one("tiny", 3, "fp8", {"w13": w13, "w2": w2, "s13": s13, "s2": s2},
                              {"copy_tbps": 1.0, "bf16_tflops": 1.0, "fp8_tflops": 1.0}, with_ref=False)
    assert row["config"]["act_fp8"] is False and set(row["w8_mma_us"]) == set(W8_MMA_MODES)
    assert max(row["w8_mma_err"].values()) < 2e-3


_SM90_PROBE = """
import json, sys
sys.path.insert(0, "benchmarks")
from moe_ir import inspect_moe
print(json.dumps({f"{kind} {mode}": inspect_moe(kind, 128, 8, 4, mode) for kind in ("up", "down")
                  for mode in ("dequant", "f16", "f16_swap", "f16_cast", "f16_swap_cast")}))
"""


def test_w8_modes_compile_for_sm90():
    # Qwen3-30B-A3B's GEMMs compiled for Hopper (no GPU needed): every mode builds (the interpreter accepts code that
    # Triton's compiler refuses), "_swap" runs wgmma instead of mma.sync, the fp16 modes convert with about half the
    # F2FP instructions of "dequant" and fewer instructions in all, "_cast" stages no fp16 tile in shared memory
    r = run_sm90_probe(_SM90_PROBE)
    for kind in ("up", "down"):
        old = r[f"{kind} dequant"]
        for mode in ("f16", "f16_swap", "f16_cast", "f16_swap_cast"):
            new = r[f"{kind} {mode}"]
            assert new["mma"] == ("wgmma" if "_swap" in mode else "mma.sync") and new["spill_bytes"] == 0, mode
            assert new["sass_ops"]["F2FP"] <= 0.6 * old["sass_ops"]["F2FP"], mode
            assert new["sass_total"] < old["sass_total"] if mode != "f16_swap_cast" else True, mode
        assert r[f"{kind} f16_cast"]["shared_bytes"] < r[f"{kind} f16"]["shared_bytes"]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["f16", "f16_swap", "f16_cast", "f16_swap_cast"])
@pytest.mark.parametrize("num_tokens", [1, 64, 777])
@pytest.mark.parametrize("scale", [1.0, 1e6])
def test_w8_f16_gpu(mode, num_tokens, scale):
    # Qwen3-30B-A3B shapes, bf16 activations (scale 1e6: past fp16's range, the down's input ~1e12), the PTX widening
    # where it runs: as close to the reference as the old mode, with the old mode's tiles
    num_experts, hidden, inter, top_k = 128, 2048, 768, 8
    torch.manual_seed(num_tokens)
    w13, s13 = quantize_weight_block(torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden**0.5)
    w2, s2 = quantize_weight_block(torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5)
    x = (torch.randn(num_tokens, hidden, device="cuda") * scale).to(torch.bfloat16)
    weights, ids = _routing(num_tokens, num_experts, top_k)
    weights, ids = weights.cuda(), ids.cuda()
    kw = {"w13_scale": s13, "w2_scale": s2}
    ref = fused_experts_ref(x, w13, w2, weights, ids, act_fp8=False, **kw)
    cfg = _config(num_tokens, num_experts, top_k, "dequant", bn_up=128, bn_down=128)
    old = fused_experts(x, w13, w2, weights, ids, config=cfg, **kw)
    cfg = dict(cfg, up=dict(cfg["up"], w8_mma=mode), down=dict(cfg["down"], w8_mma=mode))
    new = fused_experts(x, w13, w2, weights, ids, config=cfg, **kw)
    assert torch.isfinite(new).all() and _rel_err(new, ref) < max(1e-2, 1.5 * _rel_err(old, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("swap", [False, True])
def test_w8_widen_asm_matches_cast_gpu(swap):
    # the PTX widening (cvt.rn.f16x2.e4m3x2, "f16") and Triton's cast ("f16_cast", also the interpreter's path) give
    # the same fp16 weights: the two layers agree to accumulation-order noise, every e4m3 byte value in the weights
    num_experts, hidden, inter, top_k, num_tokens = 8, 512, 256, 2, 40
    torch.manual_seed(0)
    w13 = torch.arange(256, dtype=torch.uint8).repeat(num_experts * 2 * inter * hidden // 256)
    w13[(w13 & 0x7F) == 0x7F] = 0  # (e4m3's nan bytes)
    w13 = w13.view(torch.float8_e4m3fn).view(num_experts, 2 * inter, hidden).cuda()
    s13 = torch.rand(num_experts, 2 * inter // 128, hidden // 128, device="cuda") / 448
    w2, s2 = quantize_weight_block(torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weights, ids = _routing(num_tokens, num_experts, top_k)
    weights, ids = weights.cuda(), ids.cuda()
    kw = {"w13_scale": s13, "w2_scale": s2}
    mode = "f16_swap" if swap else "f16"
    asm, cast = (fused_experts(x, w13, w2, weights, ids, config=_config(num_tokens, num_experts, top_k, m, 16, 64, 64),
                               **kw) for m in (mode, mode + "_cast"))
    ref = fused_experts_ref(x, w13, w2, weights, ids, act_fp8=False, **kw)
    assert _rel_err(cast, ref) < 1e-2 and _rel_err(asm, cast) < 1e-5
