"""Weight-only FP8 (W8A16) dense GEMV (kernels/linear/gemv.py gemv_linear_fp8): kernel vs the dequantized weight's
product, its FP8 table and the model's gate between it and the W8A8 linear, the tuner's FP8 shapes and dry run, and
the sm90 code of the FP8 tiles. CPU: Triton's interpreter on fp32 / fp16 (it computes bf16 wrongly)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.fp8 import FP8_DTYPE, quantize_weight_block  # noqa: E402
from kernels.linear import gemv as linear_gemv  # noqa: E402
from kernels.linear import gemv_config as linear_gemv_config  # noqa: E402
from kernels.linear import w8a8 as fp8_linear  # noqa: E402
from kernels.linear.gemv import dispatch_config, gemv_linear_fp8, gemv_linear_fp8_ref  # noqa: E402
from kernels.moe_config import device_name  # noqa: E402
from models.args import ModelArgs  # noqa: E402
from models.parallel_layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear  # noqa: E402
from tests.sm90 import run_sm90_probe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")


def _cfg(bn: int = 32, bk: int = 64, split: int = 1, dot: int = 0, warps: int = 4, stages: int = 1) -> dict:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps, "num_stages": stages, "DOT": dot}


def _problem(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    # e4m3 weight with uneven block scales (x0.25..4 per [128, 128] block: a scale applied to the wrong block or
    # row shows), x and bias in dtype
    gen = torch.Generator().manual_seed(seed)
    q, s = quantize_weight_block(torch.randn(n, k, generator=gen) / k**0.5)
    s = s * 4.0 ** (torch.rand(s.shape, generator=gen) * 2 - 1)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, q.to(DEVICE), s.to(DEVICE), b


def _dequantized(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # written out here (not kernels.fp8.dequantize_weight_block): w[n, k] = q[n, k] * s[n // 128, k // 128]
    rows = torch.arange(q.shape[0], device=q.device) // 128
    cols = torch.arange(q.shape[1], device=q.device) // 128
    return q.float() * s[rows[:, None], cols[None, :]]


@pytest.mark.parametrize("m,n,k,bias,cfg,dtype", [
    (1, 200, 257, True, _cfg(bk=64), torch.float32),  # 2 K steps per scale block, a partial last block
    (2, 200, 300, False, _cfg(bk=256, split=2), torch.float32),  # two scale blocks per K step, the second partial
    (3, 97, 130, True, _cfg(bn=16, bk=128, split=2), torch.float16),  # one block per step, K = 128 + 2
    (5, 200, 257, False, _cfg(bn=64, bk=512), torch.float32),  # one K step over all 3 blocks (masked 4th)
    (8, 264, 384, True, _cfg(bn=128, bk=128, split=3), torch.float16),  # N = 2 tiles + 8 rows, split per block
    (16, 97, 257, True, _cfg(bn=16, bk=64, split=3), torch.float32),
    (2, 22, 2100, True, _cfg(bn=4, bk=1024, split=2, warps=2), torch.float32),  # the tuner's narrow, long-K tile
    (4, 200, 257, True, _cfg(bn=32, bk=64, split=2, dot=1), torch.float32),  # tl.dot, fp32 (ieee)
    (16, 200, 130, False, _cfg(bn=64, bk=128, dot=1, stages=2), torch.float16),
    (1, 97, 384, False, _cfg(bn=16, bk=32, split=4, dot=1), torch.float16),
    (11, 264, 300, True, _cfg(bn=128, bk=128, split=2, dot=1), torch.float32),
])
def test_fp8_gemv_matches_dequantized_product(m: int, n: int, k: int, bias: bool, cfg: dict,
                                              dtype: torch.dtype) -> None:
    x, q, s, b = _problem(m, n, k, dtype, bias, seed=m + n + k)
    y = gemv_linear_fp8(x, q, s, b, cfg)
    assert y.dtype == dtype and y.shape == (m, n)
    want = x.float() @ _dequantized(q, s).t() + (b.float() if b is not None else 0)  # W8A16: x not quantized
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.float(), want, atol=tol * want.abs().max().item(), rtol=tol)
    torch.testing.assert_close(gemv_linear_fp8_ref(x, q, s, b).float(), want, atol=tol * want.abs().max().item(),
                               rtol=tol)


def test_fp8_gemv_leading_dims_split_bits_and_counters() -> None:
    x, q, s, b = _problem(6, 256, 384, torch.float32, True, seed=3)
    y = gemv_linear_fp8(x.view(2, 3, 384), q, s, b, _cfg(bn=16, split=3))
    assert y.shape == (2, 3, 256)
    torch.testing.assert_close(y.view(6, 256), gemv_linear_fp8_ref(x, q, s, b), atol=1e-5, rtol=1e-5)
    runs = [gemv_linear_fp8(x, q, s, b, _cfg(bn=32, bk=64, split=6, dot=dot)) for dot in (0, 0, 1, 1)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])
    assert not linear_gemv._COUNTERS[x.device].any()  # the last program of each tile reset its counter


def test_fp8_bad_inputs_and_configs_fail_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, q, s, _ = _problem(17, 200, 257, torch.float32, False)
    with pytest.raises(ValueError, match="at most 16 rows, got 17: use w8a8_block_linear"):
        gemv_linear_fp8(x, q, s, None, _cfg())
    with pytest.raises(ValueError, match="weight_scale_inv of shape \\[2, 3\\]"):
        gemv_linear_fp8(x[:2], q, s[:, :2], None, _cfg())
    with pytest.raises(ValueError, match="weight_scale_inv of shape"):
        gemv_linear_fp8(x[:2], q, s.double(), None, _cfg())
    with pytest.raises(ValueError, match="needs a 2-D torch.float8_e4m3fn weight"):
        gemv_linear_fp8(x[:2], q.float(), s, None, _cfg())
    with pytest.raises(ValueError, match="does not match the weight"):
        gemv_linear_fp8(x[:2, :100], q, s, None, _cfg())
    with pytest.raises(ValueError, match="FP8 DOT tile takes BLOCK_K <= 128"):
        gemv_linear_fp8(x[:2], q, s, None, _cfg(bk=256, dot=1))
    linear_gemv_config.check_config(_cfg(bk=256, dot=1))  # fine for 16-bit weights
    monkeypatch.setattr(linear_gemv_config, "CONFIG_DIR", tmp_path)
    linear_gemv_config.clear_cache()
    with pytest.raises(ValueError, match="no measured config for M=2 \\[200, 257\\].*use w8a8_block_linear"):
        gemv_linear_fp8(x[:2], q, s)
    linear_gemv_config.clear_cache()


@pytest.fixture
def tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Writes the 16-bit and FP8 linear GEMV tables for this device into a temp CONFIG_DIR."""
    monkeypatch.setattr(linear_gemv_config, "CONFIG_DIR", tmp_path)

    def write(entries: dict, fp8: bool) -> None:
        name = linear_gemv_config.config_file_name(device_name(torch.device(DEVICE)), fp8)
        (tmp_path / name).write_text(json.dumps(entries))
        linear_gemv_config.clear_cache()

    yield write
    linear_gemv_config.clear_cache()


def test_fp8_table_is_its_own_key_space(tables) -> None:
    dev = torch.device(DEVICE)
    assert linear_gemv_config.config_file_name("NVIDIA_H200", True) == "linear_gemv_fp8_NVIDIA_H200.json"
    tables({"n256_k384": {"1": _cfg(bn=16)}}, fp8=False)
    tables({"n256_k384": {"4": _cfg(bn=64, split=2)}, "n128_k256": {"16": _cfg(bk=128, dot=1)}}, fp8=True)
    get = linear_gemv_config.table_config
    assert get(1, 256, 384, dev) == _cfg(bn=16) and get(1, 256, 384, dev, True) is None
    assert get(3, 256, 384, dev, True) == _cfg(bn=64, split=2) and get(3, 256, 384, dev) is None
    x16, x32 = torch.zeros(9, 256, dtype=torch.float16), torch.zeros(9, 256)
    w8, w16 = torch.zeros(128, 256, dtype=FP8_DTYPE), torch.zeros(128, 256, dtype=torch.float16)
    assert dispatch_config(x16, w8) == _cfg(bk=128, dot=1)
    assert dispatch_config(x32, w8) is None and dispatch_config(x16, w16) is None  # fp32 x; the 16-bit table
    assert dispatch_config(x16[:8], w8) is None  # bucket 8 not measured
    # an FP8 DOT entry with BLOCK_K 256 is refused when the table loads
    tables({"n128_k256": {"16": _cfg(bk=256, dot=1)}}, fp8=True)
    with pytest.raises(ValueError, match="n128_k256 bucket 16: .*FP8 DOT tile takes BLOCK_K <= 128"):
        get(16, 128, 256, dev, True)


def test_h200_fp8_table_holds_every_measured_win() -> None:
    # the checked-in table against the tuner reports it was made from (session 8: call 5 tuned Qwen3-30B-A3B's qkv,
    # call 6 its o_proj and merged it into the table on the GPU machine): every case the GEMV won is an entry with the
    # measured tile, every case it lost is absent (the W8A8 linear)
    results = Path(BENCH) / "results" / "session8_h200x2"
    reports = [results / "call5" / "tune_linear_gemv.json", results / "call6" / "tune_linear_gemv_o.json"]
    table = json.loads((Path(linear_gemv_config.CONFIG_DIR) / "linear_gemv_fp8_NVIDIA_H200.json").read_text())
    won = {}
    for path in reports:
        data = json.loads(path.read_text())
        assert data["device"] == "NVIDIA_H200"
        for row in data["report"]:
            if row["cfg"] is not None:  # timed (not skipped by the budget)
                won[(linear_gemv_config.shape_key(row["n"], row["k"]), str(row["m"]))] = row["cfg"] if row["entry"] \
                    else None
    assert ("n2048_k4096", "1") in won  # Qwen3-30B-A3B o_proj at B=1 (RESULTS.md: 7.67 -> 5.49 us)
    for (key, m), cfg in won.items():
        assert table.get(key, {}).get(m) == cfg, (key, m)


def _fp8_layers(args: ModelArgs) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    col = ColumnParallelLinear(256, [256], True, args).to(DEVICE)  # [256, 256] + bias
    qkv = QKVParallelLinear(128, 64, 4, 2, False, args).to(DEVICE)  # (4 + 2 * 2) * 64 = 512 rows: q 256, k 128, v 128
    row = RowParallelLinear(384, 128, False, args).to(DEVICE)  # [128, 384]
    for mod in (col, qkv, row):
        assert mod.weight.dtype == FP8_DTYPE, type(mod).__name__
        q, s = quantize_weight_block(torch.randn(mod.weight.shape) / mod.weight.shape[1] ** 0.5)
        mod.weight.data.copy_(q.to(DEVICE))
        mod.weight_scale_inv.data.copy_((s * 4.0 ** (torch.rand(s.shape) * 2 - 1)).to(DEVICE))
        if mod.bias is not None:
            mod.bias.data.normal_()
    return [col, qkv, row]


def test_fp8_model_linears_take_the_gemv_only_where_the_fp8_table_says(tables,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gemv_calls, w8a8_calls = [], []
    real_gemv, real_w8a8 = linear_gemv.gemv_linear_fp8, fp8_linear.w8a8_block_linear
    monkeypatch.setattr(linear_gemv, "gemv_linear_fp8",
                        lambda *a, **kw: gemv_calls.append(a[1].shape) or real_gemv(*a, **kw))
    monkeypatch.setattr(fp8_linear, "w8a8_block_linear",
                        lambda *a, **kw: w8a8_calls.append(a[1].shape) or real_w8a8(*a, **kw))
    dtype = torch.float16
    col, qkv, row = _fp8_layers(ModelArgs(dtype=dtype, device=DEVICE, use_triton=True, quantization="fp8"))
    # a 16-bit table entry for the FP8 layer's shape does not count: only the FP8 table's
    tables({"n256_k256": {"1": _cfg(), "2": _cfg(), "4": _cfg(), "16": _cfg()}}, fp8=False)
    tables({"n256_k256": {"1": _cfg(bn=16), "4": _cfg(bn=64, bk=128, split=2, dot=1)},
            "n512_k128": {"16": _cfg(bn=64, bk=128)}, "n128_k384": {"2": _cfg(bk=256, split=2)}}, fp8=True)
    for mod, m, taken in [(col, 1, True), (col, 3, True), (col, 2, False), (col, 16, False), (qkv, 12, True),
                          (qkv, 8, False), (row, 2, True), (row, 1, False)]:
        gemv_calls.clear()
        w8a8_calls.clear()
        x = torch.randn(m, mod.weight.shape[1], device=DEVICE).to(dtype)
        y = mod(x)
        assert (len(gemv_calls), len(w8a8_calls)) == ((1, 0) if taken else (0, 1)), (type(mod).__name__, m)
        want = gemv_linear_fp8_ref(x, mod.weight, mod.weight_scale_inv, mod.bias).float()
        # the GEMV: W8A16, fp16 rounding only; the W8A8 linear also rounds x to e4m3 per 128 columns
        tol = 2e-3 if taken else 0.1
        torch.testing.assert_close(y.float(), want, atol=tol * want.abs().max().item(), rtol=tol)
    # no Triton, or fp32 activations (no 16-bit GEMV dtype): the W8A8 linear / its reference whatever the table says
    for args in (ModelArgs(dtype=dtype, device=DEVICE, use_triton=False, quantization="fp8"),
                 ModelArgs(dtype=torch.float32, device=DEVICE, use_triton=True, quantization="fp8")):
        gemv_calls.clear()
        col = _fp8_layers(args)[0]
        col(torch.randn(1, 256, device=DEVICE).to(args.dtype))
        assert not gemv_calls


def test_tuner_fp8_shapes_and_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, BENCH)
    import tune_linear_gemv as tune

    # the linears the model keeps in FP8: every merged part and the columns in whole 128-blocks (GLM-4.5-Air's dense
    # layer, intermediate 10944, stays 16-bit; at tp=2 its shared expert's 704 rows per part too)
    shapes = {(n, k, bias) for _, n, k, bias in tune.parse_shapes("qwen3,glm45air", [1], fp8=True)}
    assert shapes == {(5120, 2048, False), (2048, 4096, False), (14336, 4096, True), (4096, 12288, False),
                      (2816, 4096, False), (4096, 1408, False)}
    tp2 = {(n, k) for _, n, k, _ in tune.parse_shapes("qwen3,glm45air", [2], fp8=True)}
    assert tp2 == {(2560, 2048), (2048, 2048), (7168, 4096), (4096, 6144)}
    assert len(tune.parse_shapes("qwen3,glm45air", [1])) == 8  # 16-bit: all of them
    with pytest.raises(SystemExit, match="whole 128-blocks"):
        tune.parse_shapes("200x256", [1], fp8=True)
    for m in (1, 4, 16):
        for cfg in tune.candidates(m, 5120, 2048, 132, fp8=True):
            linear_gemv_config.check_config(cfg, fp8=True)
    # the FP8 dry run (--min-speedup 0: every case is entered) writes only the FP8 table, which then serves its shapes
    tune.main(["--dry-run", "--weights", "fp8", "--out-dir", str(tmp_path), "--m", "1,4", "--min-speedup", "0",
               "--jobs", "1"])
    report = json.loads((tmp_path / "tune_linear_gemv.json").read_text())["report"]
    assert {(r["shape"], r["m"]) for r in report} == {(s, m) for s, *_ in tune.DRY_FP8_SHAPES for m in (1, 4)}
    for r in report:
        assert r["weights"] == "fp8" and r["base"] == "w8a8" and r["entry"] and r["err"] < 1e-4, r
        assert 0 < r["base_err"] < 0.2 and r["base_us"] > 0 and r["floor_us"] > 0  # W8A8 rounds x to e4m3
    gpu = device_name(torch.device(DEVICE))
    assert sorted(p.name for p in (tmp_path / "configs").iterdir()) == [f"linear_gemv_fp8_{gpu}.json"]
    monkeypatch.setattr(linear_gemv_config, "CONFIG_DIR", tmp_path / "configs")
    linear_gemv_config.clear_cache()
    for _, n, k, _ in tune.DRY_FP8_SHAPES:
        for m in (1, 2, 3, 4):  # 2: no bucket 2
            assert (linear_gemv_config.table_config(m, n, k, torch.device(DEVICE), True) is None) == (m == 2)
            assert linear_gemv_config.table_config(m, n, k, torch.device(DEVICE)) is None
    linear_gemv_config.clear_cache()
    with pytest.raises(SystemExit, match="--weights takes bf16 and/or fp8"):
        tune.main(["--dry-run", "--weights", "int4", "--out-dir", str(tmp_path)])


_SM90_PROBE = """
import json, sys
sys.path.insert(0, "benchmarks")
from attention_ir import compile_sm90, report
from kernels.linear.gemv import _gemv_linear_kernel
N, K = 5120, 2048  # Qwen3-30B-A3B qkv
out = []
for bm, bn, bk, warps, stages, split, dot in ((1, 32, 256, 4, 1, 4, 0), (16, 64, 128, 4, 3, 4, 1)):
    args = dict(x_ptr="bf16", w_ptr="fp8e4nv", ws_ptr="fp32", bias_ptr="bf16", out_ptr="bf16", part_ptr="fp32",
                counter_ptr="i32", M=bm, N=N, K=K, k_per_split=K // split, stride_xm=K, stride_wn=K,
                stride_wsn=K // 128, stride_om=N)
    k = compile_sm90(_gemv_linear_kernel, args, dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                     EVEN_K=True, DOT=dot, IEEE=False, NUM_STAGES=stages, FP8=True, WIDEN_ASM=True), warps, stages)
    out.append(dict(report(k), vec_loads="ld.global.v4" in k.asm["ptx"], packed="cvt.rn.f16x2.e4m3x2" in k.asm["ptx"]))
print(json.dumps(out))
"""


def test_fp8_gemv_compiles_for_sm90() -> None:
    # no GPU needed: Triton's ptxas for Hopper. Both tiles widen e4m3 two values per packed conversion; the FMA
    # tile: no MMA, no shared-memory staging, 16-byte weight loads, few registers; the dot tile: wgmma fed by a
    # cp.async ring, its widened tile moved as fp16 (no byte-wide shared loads, no per-value F2F conversion)
    fma, dot = run_sm90_probe(_SM90_PROBE)
    assert fma["spill_bytes"] == 0 and fma["mma"] is None and fma["vec_loads"] and fma["registers"] <= 96, fma
    assert fma["packed"] and fma["sass_ops"]["LDGSTS"] == 0 and fma["sass_ops"]["F2F"] == 0, fma
    assert dot["spill_bytes"] == 0 and dot["mma"] == "wgmma" and dot["sass_ops"]["LDGSTS"] > 0, dot
    assert dot["packed"] and dot["sass_ops"]["LDS_U8"] == 0 and dot["sass_ops"]["F2F"] == 0, dot


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k,bias", [(5120, 2048, False), (2048, 4096, False), (14336, 4096, True)])
def test_fp8_gemv_real_shapes_and_cuda_graph(n: int, k: int, bias: bool) -> None:
    # bf16 activations (the inline-PTX widening on sm89+) at Qwen3-30B-A3B's qkv / o and GLM-4.5-Air's qkv
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    q, s = quantize_weight_block(torch.randn(n, k, device="cuda", generator=gen) / k**0.5)
    s = s * 4.0 ** (torch.rand(s.shape, device="cuda", generator=gen) * 2 - 1)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if bias else None
    for m in (1, 3, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = gemv_linear_fp8_ref(x, q, s, b).float()
        for cfg in (_cfg(bn=32, bk=256), _cfg(bn=32, bk=256, split=4), _cfg(bn=64, bk=128, split=8),
                    _cfg(bn=64, bk=128, split=4, dot=1, stages=3), _cfg(bn=128, bk=128, split=2, dot=1, stages=3)):
            assert _rel(gemv_linear_fp8(x, q, s, b, cfg), ref) < 1e-2, (m, cfg)
    # captured with split K (the arrival counters) and replayed on new inputs: equal to the reference, bit-stable
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    for cfg in (_cfg(bn=32, bk=256, split=4), _cfg(bn=64, bk=128, split=4, dot=1, stages=3)):
        gemv_linear_fp8(x, q, s, b, cfg)  # eager first: compiles, allocates the counters
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = gemv_linear_fp8(x, q, s, b, cfg)
        for _ in range(3):
            x.copy_(torch.randn(4, k, device="cuda", dtype=torch.bfloat16, generator=gen))
            graph.replay()
            first = y.clone()
            graph.replay()
            assert torch.equal(first, y)
            assert _rel(y, gemv_linear_fp8_ref(x, q, s, b)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_model_linear_takes_the_gemv_in_a_cuda_graph(tables, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ModelArgs(dtype=torch.bfloat16, device="cuda", use_triton=True, quantization="fp8")
    o = RowParallelLinear(4096, 2048, False, args).to("cuda")
    q, s = quantize_weight_block(torch.randn(2048, 4096, device="cuda") / 64)
    o.weight.data.copy_(q)
    o.weight_scale_inv.data.copy_(s)
    tables({"n2048_k4096": {"1": _cfg(bn=32, bk=256, split=4), "8": _cfg(bn=64, bk=128, split=4, dot=1, stages=3)}},
           fp8=True)
    calls = []
    real = linear_gemv.gemv_linear_fp8
    monkeypatch.setattr(linear_gemv, "gemv_linear_fp8", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for m in (1, 8):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        o(x)  # eager warm-up, as the model runner does before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = o(x)
        x.normal_()
        graph.replay()
        assert _rel(y, gemv_linear_fp8_ref(x, o.weight, o.weight_scale_inv)) < 1e-2
    assert len(calls) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_tiny_model_decodes_through_the_gemv(tables, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a tiny dense FP8 checkpoint in bf16 with the Triton kernels and an FP8 table for all its linears, fed one token
    # per sequence and step (3 rows: bucket 4, every linear through the GEMV), vs the same checkpoint dequantized at
    # load (the very weight values in bf16, cuBLAS): W8A16 leaves only rounding between the two
    import models.parallel_layers as parallel_layers
    from runtime.engine.attention_backend import ATTENTION_BACKENDS
    from tests.test_models import PagedRun, _fp8_checkpoint, load, prompts
    from tests.tiny import make_tiny_checkpoint

    src = make_tiny_checkpoint(str(tmp_path / "f32"), "Qwen3ForCausalLM", hidden_size=256, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=64, intermediate_size=256, num_hidden_layers=2)
    _fp8_checkpoint(src, str(tmp_path / "fp8"))
    fma, dot = _cfg(bn=16, bk=128, split=2), _cfg(bn=32, bk=128, split=2, dot=1, stages=2)
    # qkv and gate_up [512, 256], o and down [256, 256]
    tables({"n512_k256": {"4": fma}, "n256_k256": {"4": dot}}, fp8=True)
    calls = []
    real = linear_gemv.gemv_linear_fp8
    monkeypatch.setattr(linear_gemv, "gemv_linear_fp8", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    toks = prompts(512)  # 3 prompts; their first 5 tokens
    logits = []
    for fp8 in (True, False):
        if not fp8:
            monkeypatch.setattr(parallel_layers, "_use_fp8", lambda *a: False)
        model = load(str(tmp_path / "fp8"), dtype=torch.bfloat16, device="cuda", use_triton=True)
        assert (model.model.layers[0].self_attn.o_proj.weight.dtype == FP8_DTYPE) == fp8
        run = PagedRun(model, 8, len(toks), ATTENTION_BACKENDS["triton"]())
        with torch.no_grad():
            logits.append(torch.stack([run.step([[t[i]] for t in toks], [i] * len(toks)) for i in range(5)]).float())
        assert len(calls) == 5 * 2 * 4  # 5 steps x 2 layers x (qkv, o, gate_up, down), all from the FP8 model
    cos = torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1)
    assert cos.min() > 0.999, cos  # fp16 in the interpreter: 1.0000, max |diff| 0.15% of the largest logit
    assert (logits[0] - logits[1]).abs().max() < 0.05 * logits[1].abs().max()


def test_tuner_table_keeps_what_the_run_did_not_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a run over one shape starts from the checked-in table: its own buckets replaced (a loss removes one), the other
    # shapes and buckets kept (session 8 lost o_proj's entries when tables were merged by hand)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_linear_gemv as tune

    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "out" / "configs").mkdir(parents=True)
    monkeypatch.setattr(linear_gemv_config, "CONFIG_DIR", base)
    old = _cfg(bn=32, bk=256, split=4)
    name = linear_gemv_config.config_file_name("gpu_x", True)
    (base / name).write_text(json.dumps({"n5120_k2048": {"1": old, "2": old}, "n2048_k4096": {"1": old, "4": old}}))
    new = _cfg(bn=4, bk=2048, split=1)
    cases = [dict(n=2048, k=4096, m=1, bias=False, entry=True, cfg=new),
             dict(n=2048, k=4096, m=4, bias=False, entry=False, cfg=None)]
    path = tune.write_table(tmp_path / "out", "gpu_x", cases, True)
    assert json.loads(path.read_text()) == {"n5120_k2048": {"1": old, "2": old}, "n2048_k4096": {"1": new}}
