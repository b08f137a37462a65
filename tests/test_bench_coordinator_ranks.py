"""benchmarks/bench_coordinator_ranks.py: the real coordinator process clocks 2 rank processes (the real rank loop
over an idle engine) in lockstep and look-ahead; every step is stamped and the JSON holds the per-step costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_coordinator_ranks_two_ranks(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "coord.json"
    cmd = [sys.executable, "benchmarks/bench_coordinator_ranks.py", "--ranks", "2", "--steps", "40", "--warmup", "5",
           "--work-us", "0,2000", "--timeout-s", "60", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("bench_coordinator_ranks summary:")
    rows = {(r["mode"], r["work_us"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(m, w) for m in ("free", "lockstep", "lookahead") for w in (0.0, 2000.0)}
    for (mode, work), row in rows.items():
        assert row["ranks"] == 2 and 0 < row["gap_us_p50"] <= row["gap_us_p90"]
        assert row["period_us_p50"] >= work  # every step waited its stand-in device time
        assert (row["rtt_us_p50"] is not None) == (mode == "lockstep")
        assert (row["coordinator_overhead_us"] is None) == (mode == "free")
    # lockstep: each step waits for the StepCommand (a round trip through the coordinator process)
    assert rows[("lockstep", 0.0)]["rtt_us_p50"] > 0
