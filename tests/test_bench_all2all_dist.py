"""benchmarks/bench_all2all_dist.py on 2 gloo CPU ranks at tiny sizes: it runs, its --check passes (the round
trip through the engine's backends and their byte accounting), and the JSON rows hold what a plot needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_all2all_dist_two_gloo_ranks(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "a2a.json"
    # static max 16 and capacity factor 0.5: T=8 and 16 run the fixed-size mode with fewer slots than tokens
    # (the flag word; an overflow is re-run exactly), T=24 the dynamic mode; sparse_exact is dynamic throughout;
    # hidden 40: FP8 dispatch with a partial 128-channel scale group
    backends = ("sparse", "sparse_exact", "sparse_fp8", "allgather")
    cmd = [sys.executable, "benchmarks/bench_all2all_dist.py", "--world", "2", "--device", "cpu", "--hidden", "40",
           "--experts", "8", "--top-k", "2", "--tokens", "1,16,24", "--backends", ",".join(backends),
           "--static-max-tokens", "16", "--capacity-factor", "0.5", "--reps", "2", "--warmup", "1",
           "--dtype", "float32", "--check", "--timeout-s", "60", "--host-cost", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "CHECK FAILED" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("bench_all2all_dist summary: world=2")
    data = json.loads(out.read_text())
    assert data["check"] == "ok" and data["world"] == 2
    rows = {(r["backend"], r["tokens"]): r for r in data["rows"] if r["mode"] != "host"}
    host = {(r["backend"], r["tokens"]): r for r in data["rows"] if r["mode"] == "host"}
    assert set(host) == {(f"{b}_host", t) for b in backends for t in (1, 16, 24)}
    for t in (16, 24):  # --host-cost: an eager (dynamic) dispatch + combine reads the host once, nothing else
        row = host[("sparse_exact_host", t)]
        assert row["syncs"] == {"reads": 1} and row["num_ops"] > 0 and row["total_us"] > 0, row
        # the host time split by op (and Triton kernel on a GPU), largest first; the collectives among them
        op_us = row["op_us"]
        assert list(op_us.values()) == sorted(op_us.values(), reverse=True) and sum(op_us.values()) > 0, row
        assert {"allreduce_", "alltoall_base_"} <= set(op_us), op_us
    assert set(rows) == {(b, t) for b in ("nccl_exact", *backends) for t in (1, 16, 24)}
    assert [rows[("sparse", t)]["mode"] for t in (1, 16, 24)] == ["static", "static", "dynamic"]
    assert rows[("sparse", 16)]["slots"] < 16 and rows[("sparse_exact", 16)]["mode"] == "dynamic"
    for (backend, tokens), row in rows.items():
        assert row["dispatch_us"] > 0 and row["combine_us"] > 0 and row["total_us"] > 0
        if tokens > 1:
            assert row["dispatch_bytes"] > 0 and row["combine_bytes"] > 0, row
            assert row["dispatch_gbps"] > 0 and row["combine_gbps"] > 0
        if backend != "nccl_exact":
            assert row["nccl_even_dispatch_us"] > 0 and row["nccl_even_combine_us"] > 0
    for t in (16, 24):
        # the dynamic mode moves exactly the routing's rows: the uneven all_to_all_single's bytes
        exact, dynamic, allgather = rows[("nccl_exact", t)], rows[("sparse_exact", t)], rows[("allgather", t)]
        assert (dynamic["dispatch_bytes"], dynamic["combine_bytes"]) == (exact["dispatch_bytes"],
                                                                          exact["combine_bytes"])
        assert dynamic["dispatch_bytes"] <= allgather["dispatch_bytes"]
    # FP8 dispatch: the same rows, a byte per channel (plus scales) out; the combine unchanged
    fp8, sparse = rows[("sparse_fp8", 24)], rows[("sparse", 24)]
    assert fp8["mode"] == sparse["mode"] == "dynamic" and fp8["combine_bytes"] == sparse["combine_bytes"]
    assert fp8["dispatch_bytes"] < sparse["dispatch_bytes"]
    # C < T slots: the fixed-size rows carry the flag word, and fewer of them than allgather's
    assert rows[("sparse", 16)]["combine_bytes"] < rows[("allgather", 16)]["combine_bytes"]
