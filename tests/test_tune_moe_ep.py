"""The MoE tuner under expert parallelism (benchmarks/tune_moe.py --ep): the received rows it times on, and the local
shape's table it writes (what get_moe_config loads on an EP rank)."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.fused_moe import fused_experts, fused_experts_ref  # noqa: E402
from runtime.distributed.all2all_sparse import capacity_slots, rank_hit_fraction  # noqa: E402


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_moe
    import tune_moe
    import tune_moe_tma

    return bench_moe, tune_moe, tune_moe_tma


def _cpu_inputs(make_inputs, *args, **kwargs):
    # make_inputs on the CPU, fp16 rows (the weights' dtype here)
    x, w, ids = make_inputs(*args, **dict(kwargs, device="cpu"))
    return x.half(), w, ids


@pytest.mark.parametrize("ep_size", [8, 2])
def test_received_rows_statistics(bench, ep_size):
    # Qwen3-30B-A3B's routing (top-8 of 128): the rows rank 0 gets hold its 128 / ep experts' slots, ~k / (ep f) of
    # them a row (ep 8: ~1.5, ep 2: ~4), -1 (weight 0) elsewhere
    bench_moe = bench[0]
    num_experts, top_k, num_tokens = 128, 8, 512
    num_local, f = num_experts // ep_size, rank_hit_fraction(num_experts, ep_size, top_k)
    x, w, ids = bench_moe.make_inputs(num_tokens, num_experts, 16, top_k, 0, ep_size=ep_size, device="cpu")
    valid = ids >= 0
    assert x.shape == (round(ep_size * num_tokens * f), 16) and ids.shape == w.shape == (x.shape[0], top_k)
    assert valid.any(dim=1).all() and ids.max() < num_local and ids.min() >= -1
    assert (w[~valid] == 0).all() and (w[valid] > 0).all()
    assert valid.sum(1).float().mean().item() == pytest.approx(top_k / (ep_size * f), rel=0.03)

    # the static exchange: ep blocks of C slots, a source's rows first, then padding rows (all -1)
    slots = capacity_slots(num_tokens, num_experts, ep_size, top_k, 1.25)
    x, w, ids = bench_moe.make_inputs(num_tokens, num_experts, 16, top_k, 0, ep_size=ep_size, slots=slots,
                                      device="cpu")
    assert x.shape[0] == ep_size * slots
    real = (ids >= 0).any(dim=1).view(ep_size, slots)
    assert (real.int().diff(dim=1) <= 0).all()  # per block: no real row after a padding row
    assert real.float().mean().item() == pytest.approx(min(1.0, f * num_tokens / slots), abs=0.03)
    assert (w[~real.view(-1)] == 0).all()


def test_ep_slots_follow_the_engine_defaults(bench):
    tune_moe = bench[1]
    assert tune_moe.EP_STATIC_MAX_TOKENS == 2048  # the mixed graphs' cap: the static exchange's bound by default
    assert tune_moe.ep_slots(2048, 128, 8, 8) == capacity_slots(2048, 128, 8, 8, 1.25) < 2048
    assert tune_moe.ep_slots(4096, 128, 8, 8) == 0  # dynamic: the exact rows


def test_ep_tune_writes_the_local_table(bench, monkeypatch, tmp_path):
    # a tiny EP tune in the interpreter (8 experts over 2 ranks): every candidate runs on the received rows, and the
    # table lands under the local shape's name (4 experts) with buckets N that get_moe_config returns for N rows
    bench_moe, tune_moe, _ = bench
    import kernels.moe_config as mc

    num_experts, hidden, inter, top_k, ep = 8, 64, 32, 2, 2
    monkeypatch.setitem(tune_moe.SHAPES, "tiny", (num_experts, hidden, inter, top_k))
    monkeypatch.setattr(tune_moe, "SMALL", [(32, 64, 4, 2), (64, 64, 4, 2)])
    monkeypatch.setattr(tune_moe, "LARGE", [(32, 64, 4, 2)])
    monkeypatch.setattr(tune_moe, "EP_STATIC_MAX_TOKENS", 8)  # T=4 static (padding rows), T=12 dynamic
    monkeypatch.setattr(tune_moe, "Problem", functools.partial(tune_moe.Problem, device="cpu"))  # bf16 throughout
    monkeypatch.setattr(tune_moe, "time_run", lambda run, n: (run(), 1.0)[1])
    monkeypatch.setattr(tune_moe, "CONFIG_DIR", tmp_path / "in_use")
    out = tmp_path / "out"
    tune_moe.tune_shape("tiny", [4, 12], "bf16", out, ep_size=ep)

    f = rank_hit_fraction(num_experts, ep, top_k)
    static_rows = ep * capacity_slots(4, num_experts, ep, top_k, 1.25)
    dynamic_rows = round(ep * 12 * f)
    name = mc.config_file_name(num_experts // ep, hidden, inter, "bfloat16", mc.device_name())
    assert [p.name for p in (out / "configs").iterdir()] == [name]
    table = json.loads((out / "configs" / name).read_text())
    assert sorted(table, key=int) == [str(static_rows), str(dynamic_rows)]
    monkeypatch.setattr(mc, "CONFIG_DIR", out / "configs")
    mc._load.cache_clear()
    try:
        for rows in (static_rows, dynamic_rows):
            assert mc.get_moe_config(rows, num_experts // ep, hidden, inter, top_k, "bfloat16") == table[str(rows)]
    finally:
        mc._load.cache_clear()


def test_fused_experts_on_received_rows(bench):
    # the slots the kernels skip (-1: other ranks' experts, padding rows) are the reference's too: the tuned
    # configs run the same answer as fused_experts_ref on the rows the EP tuner times
    bench_moe = bench[0]
    torch.manual_seed(0)
    num_local, hidden, inter = 4, 64, 32
    w13 = (torch.randn(num_local, 2 * inter, hidden) / hidden**0.5).half()
    w2 = (torch.randn(num_local, hidden, inter) / inter**0.5).half()
    x, w, ids = _cpu_inputs(bench_moe.make_inputs, 6, 4 * num_local, hidden, 4, 0, ep_size=4, slots=6)
    assert (ids < 0).all(dim=1).any() and ((ids >= 0).sum(1) == 1).any()  # padding rows, one-slot rows
    cfg = {"BLOCK_M": 16, "up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
           "down": {"BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}}
    out = fused_experts(x, w13, w2, w, ids, config=cfg)
    ref = fused_experts_ref(x, w13, w2, w, ids)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3
    assert (out[(ids < 0).all(dim=1)] == 0).all()


def test_tma_tuner_under_ep(bench, monkeypatch, tmp_path):
    # tune_moe --tma --ep: the TMA path against the old one on received rows (-1 slots, padding rows) agrees, the
    # row's M is the received row count, and the entries go into the local shape's table, min_rows from N x top-k;
    # without that table (tune_moe --ep first) it refuses
    bench_moe, tune_moe, tune_moe_tma = bench
    import kernels.moe_config as mc

    num_experts, hidden, inter, top_k, ep = 8, 64, 32, 2, 2
    monkeypatch.setitem(bench_moe.SHAPES, "tiny", (num_experts, hidden, inter, top_k))
    monkeypatch.setattr(bench_moe, "make_inputs", functools.partial(_cpu_inputs, bench_moe.make_inputs))
    monkeypatch.setattr(bench_moe, "bench_graph", lambda fn, rep_ms=60: (fn(), 1.0)[1])
    monkeypatch.setattr(tune_moe, "time_run", lambda run, n: (run(), 1.0)[1])
    monkeypatch.setattr(tune_moe_tma, "TMA_CANDIDATES", [(16, 32, 32, 4, 2, False)])
    monkeypatch.setattr(mc, "CONFIG_DIR", tmp_path)
    mc._load.cache_clear()
    with pytest.raises(SystemExit, match="run tune_moe.py --ep 2 first"):
        tune_moe_tma.tune_tma("tiny", "bf16", [4], tmp_path / "out", jobs=1, gluon=False, ep_size=ep)
    num_local = num_experts // ep
    w13 = (torch.randn(num_local, 2 * inter, hidden) / hidden**0.5).half()
    w2 = (torch.randn(num_local, hidden, inter) / inter**0.5).half()
    row = tune_moe_tma._measure_m("tiny", "bf16", 4, {"w13": w13, "w2": w2}, {"copy_tbps": 1.0, "bf16_tflops": 1.0},
                                  ep_size=ep)
    num_rows = ep * capacity_slots(4, num_experts, ep, top_k, 1.25)
    assert (row["M"], row["step_tokens"]) == (num_rows, 4) and row["err_vs_old"] < 2e-3
    name, table = tune_moe_tma.with_tma_entries("tiny", "bf16", [dict(row, old_us=10.0, tma_us=5.0)], ep)
    assert name == mc.config_file_name(num_local, hidden, inter, "bfloat16", mc.device_name())
    assert list(table) == [str(num_rows)] and table[str(num_rows)]["tma"]["min_rows"] == num_rows * top_k
    mc._load.cache_clear()


def test_gemv_refuses_ep(bench, monkeypatch):
    tune_moe = bench[1]
    monkeypatch.setattr("sys.argv", ["tune_moe.py", "--gemv", "--ep", "2", "--shapes", "qwen3"])
    with pytest.raises(SystemExit):
        tune_moe.main()
    monkeypatch.setattr("sys.argv", ["tune_moe.py", "--ep", "3", "--shapes", "qwen3"])
    with pytest.raises(SystemExit):
        tune_moe.main()


def test_non_ep_benches_import_without_msgspec():
    # a bare GPU machine has no msgspec (the runtime's import chain needs it; the wheelhouse brings it): the MoE
    # benches and tuners import the sparse all2all's arithmetic only on their EP paths
    root = Path(__file__).resolve().parents[1]
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'msgspec':\n"
            "            raise ImportError('no msgspec here')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import bench_moe, bench_moe_gluon, tune_moe, tune_moe_tma\n")
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'benchmarks'}")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
