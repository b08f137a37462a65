"""16-bit dense GEMV linear (kernels/linear/gemv.py): kernel vs torch, its measured-table gate in the model's linears,
and the tuner's dry run. CPU: Triton's interpreter on fp32 / fp16 (it computes bf16 wrongly)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.linear import gemv as linear_gemv  # noqa: E402
from kernels.linear import gemv_config as linear_gemv_config  # noqa: E402
from kernels.linear.gemv import gemv_linear, gemv_linear_ref  # noqa: E402
from kernels.moe_config import device_name  # noqa: E402
from models.args import ModelArgs  # noqa: E402
from models.parallel_layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear  # noqa: E402
from tests.sm90 import run_sm90_probe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cfg(bn: int = 32, bk: int = 64, split: int = 1, dot: int = 0, warps: int = 4, stages: int = 1) -> dict:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps, "num_stages": stages, "DOT": dot}


def _problem(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("m,n,k,bias,split,dot,dtype", [
    (1, 97, 130, True, 1, 0, torch.float32),
    (3, 200, 257, False, 3, 0, torch.float32),
    (16, 97, 257, True, 2, 0, torch.float16),
    (1, 200, 130, False, 2, 0, torch.float16),
    (3, 97, 257, True, 1, 1, torch.float16),
    (16, 200, 130, False, 3, 1, torch.float32),
    (5, 97, 257, True, 4, 1, torch.float32),
])
def test_gemv_matches_torch(m: int, n: int, k: int, bias: bool, split: int, dot: int, dtype: torch.dtype) -> None:
    x, w, b = _problem(m, n, k, dtype, bias, seed=m + n + k)
    # BLOCK_K 64 over K 130 / 257: a partial last step; split 3 of 5 steps: uneven shares
    y = gemv_linear(x, w, b, _cfg(split=split, dot=dot))
    assert y.dtype == dtype and y.shape == (m, n)
    ref = gemv_linear_ref(x, w, b)  # fp32 math, rounded once
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), None if b is None else b.float()),
                               atol=tol * 4, rtol=tol * 4)


def test_gemv_leading_dims_and_strided_rows() -> None:
    x, w, b = _problem(6, 97, 130, torch.float32, True)
    x3 = x.view(2, 3, 130)
    y = gemv_linear(x3, w, b, _cfg(bn=16, split=2))
    assert y.shape == (2, 3, 97)
    torch.testing.assert_close(y, F.linear(x3, w, b), atol=1e-5, rtol=1e-5)
    wide = torch.randn(4, 200, device=DEVICE)  # rows with a stride of 200: x [4, 130] is a view
    torch.testing.assert_close(gemv_linear(wide[:, :130], w, None, _cfg()), F.linear(wide[:, :130], w),
                               atol=1e-5, rtol=1e-5)


def test_split_k_is_bit_reproducible_and_leaves_counters_at_zero() -> None:
    x, w, b = _problem(3, 200, 257, torch.float32, True, seed=7)
    runs = [gemv_linear(x, w, b, _cfg(bn=16, bk=32, split=5, dot=dot)) for dot in (0, 0, 1, 1)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])
    assert not linear_gemv._COUNTERS[x.device].any()  # the last program of each tile reset its counter


def test_bad_inputs_and_configs_fail_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, _ = _problem(17, 97, 130, torch.float32, False)
    with pytest.raises(ValueError, match="at most 16 rows, got 17"):
        gemv_linear(x, w, None, _cfg())
    with pytest.raises(ValueError, match="does not match the weight"):
        gemv_linear(x[:2].half(), w, None, _cfg())
    for bad, msg in [(dict(_cfg(), BLOCK_N=24), "BLOCK_N=24 must be a power of two"),
                     (dict(_cfg(), SPLIT_K=0), "SPLIT_K=0"), ({"BLOCK_N": 16}, "missing"),
                     (dict(_cfg(), GROUP_M=8), "unknown \\['GROUP_M'\\]"), (_cfg(bn=8, dot=1), "BLOCK_N with DOT")]:
        with pytest.raises(ValueError, match=msg):
            linear_gemv_config.check_config(bad)
    monkeypatch.setattr(linear_gemv_config, "CONFIG_DIR", tmp_path)  # no table: no config, a clear error
    linear_gemv_config.clear_cache()
    with pytest.raises(ValueError, match="no measured config for M=2 \\[97, 130\\]"):
        gemv_linear(x[:2], w)
    (tmp_path / linear_gemv_config.config_file_name(device_name(x.device))).write_text(
        json.dumps({"n97_k130": {"32": _cfg()}}))
    linear_gemv_config.clear_cache()
    with pytest.raises(ValueError, match="n97_k130 bucket 32 is not a power of two in 1..16"):
        linear_gemv_config.table_config(1, 97, 130, x.device)
    linear_gemv_config.clear_cache()


def test_bucket_rule() -> None:
    pick = linear_gemv_config.pick_bucket
    buckets = [1, 2, 4, 16]
    assert [pick(buckets, m) for m in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, None, None, 16, 16, None]
    assert pick([8], 5) == 8 and pick([2], 1) is None


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Writes a linear GEMV table for this device into a temp CONFIG_DIR."""
    monkeypatch.setattr(linear_gemv_config, "CONFIG_DIR", tmp_path)

    def write(entries: dict) -> None:
        name = linear_gemv_config.config_file_name(device_name(torch.device(DEVICE)))
        (tmp_path / name).write_text(json.dumps(entries))
        linear_gemv_config.clear_cache()

    yield write
    linear_gemv_config.clear_cache()


def test_model_linears_take_the_gemv_only_where_the_table_says(table, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(*a, **kw):
        calls.append(a[1].shape)
        return real(*a, **kw)

    real = linear_gemv.gemv_linear
    monkeypatch.setattr(linear_gemv, "gemv_linear", spy)
    dtype = torch.float16
    args = ModelArgs(dtype=dtype, device=DEVICE, use_triton=True)
    torch.manual_seed(0)
    col = ColumnParallelLinear(130, [97], True, args).to(DEVICE)  # (layers are built on the CPU, then moved)
    qkv = QKVParallelLinear(64, 16, 4, 2, True, args).to(DEVICE)  # N = (4 + 2 * 2) * 16 = 128
    row = RowParallelLinear(257, 200, False, args).to(DEVICE)
    for mod in (col, qkv, row):
        mod.weight.data.copy_(torch.randn_like(mod.weight, dtype=torch.float32) / mod.weight.shape[1] ** 0.5)
        if mod.bias is not None:
            mod.bias.data.normal_()
    table({"n97_k130": {"1": _cfg(bn=16), "4": _cfg(split=2, dot=1)}, "n128_k64": {"16": _cfg(bn=64, split=2)},
           "n200_k257": {"2": _cfg(bk=128, split=2)}})
    for mod, m, taken in [(col, 1, True), (col, 3, True), (col, 2, False), (col, 5, False), (qkv, 12, True),
                          (qkv, 17, False), (row, 2, True), (row, 1, False)]:
        calls.clear()
        x = torch.randn(m, mod.weight.shape[1], device=DEVICE).to(dtype)
        y = mod(x)
        assert len(calls) == int(taken), (type(mod).__name__, m)
        ref = F.linear(x.float(), mod.weight.float(), None if mod.bias is None else mod.bias.float())
        torch.testing.assert_close(y.float(), ref, atol=5e-3, rtol=5e-3)
    # not 16-bit or not use_triton: cuBLAS whatever the table says
    for other in (ModelArgs(dtype=torch.float32, device=DEVICE, use_triton=True),
                  ModelArgs(dtype=dtype, device=DEVICE, use_triton=False)):
        calls.clear()
        lin = ColumnParallelLinear(130, [97], False, other).to(DEVICE)
        lin.weight.data.normal_()
        lin(torch.randn(1, 130, device=DEVICE).to(other.dtype))
        assert not calls


def test_tuner_dry_run_writes_a_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the tuner end to end on tiny shapes (--min-speedup 0: every case is entered); the table loads and serves its
    # shapes; with the default 3% the interpreter, never faster than cuBLAS, enters nothing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_linear_gemv as tune

    with pytest.raises(SystemExit, match="powers of two"):
        tune.main(["--dry-run", "--out-dir", str(tmp_path / "c"), "--m", "1,3"])
    tune.main(["--dry-run", "--out-dir", str(tmp_path / "a"), "--m", "1,4", "--min-speedup", "0", "--jobs", "1"])
    report = json.loads((tmp_path / "a" / "tune_linear_gemv.json").read_text())["report"]
    assert {(r["shape"], r["m"]) for r in report} == {(s, m) for s, *_ in tune.DRY_SHAPES for m in (1, 4)}
    for r in report:
        assert r["entry"] and r["err"] < 1e-4 and r["floor_us"] > 0 and r["base_us"] > 0 and r["gemv_us"] > 0
    monkeypatch.setattr(linear_gemv_config, "CONFIG_DIR", tmp_path / "a" / "configs")
    linear_gemv_config.clear_cache()
    for _, n, k, _ in tune.DRY_SHAPES:
        for m in (1, 2, 3, 4):  # 2: no bucket 2
            cfg = linear_gemv_config.table_config(m, n, k, torch.device(DEVICE))
            assert (cfg is None) == (m == 2)
            if cfg:
                linear_gemv_config.check_config(cfg)
    linear_gemv_config.clear_cache()
    if DEVICE == "cpu":  # from an empty checked-in table: no entry where the GEMV lost
        monkeypatch.setattr(linear_gemv_config, "CONFIG_DIR", tmp_path / "none")
        tune.main(["--dry-run", "--out-dir", str(tmp_path / "b"), "--m", "1"])
        assert json.loads((tmp_path / "b" / "configs" / "linear_gemv_cpu.json").read_text()) == {}


def test_tuner_model_shapes() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_linear_gemv as tune

    shapes = {(n, k, bias) for _, n, k, bias in tune.parse_shapes("qwen3,glm45air,5120x2048", [1, 2])}
    assert {(5120, 2048, False), (2048, 4096, False), (2560, 2048, False), (2048, 2048, False)} <= shapes
    assert {(14336, 4096, True), (4096, 12288, False), (2816, 4096, False), (4096, 1408, False),
            (21888, 4096, False), (4096, 10944, False), (7168, 4096, True), (4096, 6144, False)} <= shapes
    assert len(shapes) == 16  # 5120x2048 is qwen3's qkv


_SM90_PROBE = """
import json, sys
sys.path.insert(0, "benchmarks")
from attention_ir import compile_sm90, report
from kernels.linear.gemv import _gemv_linear_kernel
N, K = 5120, 2048  # Qwen3-30B-A3B qkv
out = []
for bm, bn, bk, warps, stages, split, dot in ((1, 32, 256, 4, 1, 4, 0), (16, 64, 128, 4, 3, 4, 1)):
    args = dict(x_ptr="bf16", w_ptr="bf16", ws_ptr="fp32", bias_ptr="bf16", out_ptr="bf16", part_ptr="fp32",
                counter_ptr="i32", M=bm, N=N, K=K, k_per_split=K // split, stride_xm=K, stride_wn=K, stride_wsn=0,
                stride_om=N)
    k = compile_sm90(_gemv_linear_kernel, args, dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                     EVEN_K=True, DOT=dot, IEEE=False, NUM_STAGES=stages), warps, stages)
    out.append(dict(report(k), vec_loads="ld.global.v4" in k.asm["ptx"]))
print(json.dumps(out))
"""


def test_gemv_compiles_for_sm90() -> None:
    # no GPU needed: Triton's ptxas for Hopper. The FMA tile: no MMA, no shared-memory staging at 1 stage, 16-byte
    # weight loads, few registers (many programs per SM keep the weight stream in flight); the dot tile: wgmma
    # fed by a cp.async ring. Neither spills.
    fma, dot = run_sm90_probe(_SM90_PROBE)
    assert fma["spill_bytes"] == 0 and fma["mma"] is None and fma["vec_loads"] and fma["registers"] <= 96, fma
    assert fma["sass_ops"]["LDGSTS"] == 0, fma
    assert dot["spill_bytes"] == 0 and dot["mma"] == "wgmma" and dot["sass_ops"]["LDGSTS"] > 0, dot


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k,bias", [(5120, 2048, False), (2048, 4096, False), (14336, 4096, True)])
def test_gemv_bf16_real_shapes_and_cuda_graph(n: int, k: int, bias: bool) -> None:
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if bias else None
    for m in (1, 3, 8, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = F.linear(x, w, b).float()
        for cfg in (_cfg(bn=32, bk=256), _cfg(bn=16, bk=256, split=4), _cfg(bn=64, bk=128, split=4, dot=1, stages=3)):
            err = ((gemv_linear(x, w, b, cfg).float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (m, cfg, err)
    # captured with split K (the arrival counters) and replayed on new inputs: equal to F.linear, bit-stable
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = _cfg(bn=32, bk=256, split=4)
    gemv_linear(x, w, b, cfg)  # eager first: compiles, allocates the counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv_linear(x, w, b, cfg)
    for _ in range(3):
        x.copy_(torch.randn(4, k, device="cuda", dtype=torch.bfloat16, generator=gen))
        graph.replay()
        first = y.clone()
        graph.replay()
        assert torch.equal(first, y)
        ref = F.linear(x, w, b).float()
        assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_linear_takes_the_gemv_in_a_cuda_graph(table, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ModelArgs(dtype=torch.bfloat16, device="cuda", use_triton=True)
    o = RowParallelLinear(4096, 2048, False, args).to("cuda")
    o.weight.data.normal_(std=4096**-0.5)
    table({"n2048_k4096": {"1": _cfg(bn=32, bk=256, split=4), "8": _cfg(bn=64, bk=128, split=4, dot=1, stages=3)}})
    calls = []
    real = linear_gemv.gemv_linear
    monkeypatch.setattr(linear_gemv, "gemv_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for m in (1, 8):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        o(x)  # eager warm-up, as the model runner does before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = o(x)
        x.normal_()
        graph.replay()
        ref = F.linear(x, o.weight).float()
        assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert len(calls) == 4
