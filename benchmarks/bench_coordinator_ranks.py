"""What the DP coordinator costs per lockstep step with 2-8 ranks: the real coordinator process against N rank
processes running the real rank loop (runtime/cluster/rank_loop.py RankLoop) over an engine that does nothing.

  python benchmarks/bench_coordinator_ranks.py [--ranks 2,4,8] [--steps 500] [--work-us 0,5000]
      [--modes free,lockstep,lookahead] [--out benchmarks/results/coordinator_ranks.json]

As under runtime.serve: the coordinator is `python -m runtime.cluster.coordinator` (no torch, CUDA hidden), each
rank its own process, ipc:// sockets in a private folder, every frame HMAC-signed with a fresh deployment
secret, each rank's heartbeat thread on. A rank's engine schedules one decode token every step and its
execute() only waits --work-us (a stand-in for the device time of a step; sleeping, so N ranks do not fight
for the cores). Per step s and rank r the engine stamps execute start and end (CLOCK_MONOTONIC, one clock
for every process on the host). Reported per (N, mode, work), over --steps steps after --warmup:
  gap     the slowest rank's idle time between two executes, max_r (start[r][s] - end[r][s-1]): what the
          device would wait each step (rank loop + StepReport -> coordinator -> StepCommand);
  period  step to step, max_r start[r][s] - max_r start[r][s-1] (= work + gap when the ranks keep pace);
  rtt     lockstep: max_r (start[r][s] - schedule[r][s]): report sent -> command back -> execute;
modes: free (no clock: the ranks run alone; the rank loop's own cost), lockstep, lookahead
(--lockstep-lookahead: step s+1 is reported while step s runs, so with work > rtt the gap hides).
coordinator_overhead_us = median gap of lockstep (or lookahead) minus that of free at the same N and work.
Prints one line per run and 'bench_coordinator_ranks summary' last.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.cluster.coordinator import CoordinatorSpec  # noqa: E402
from runtime.messages import SECRET_ENV, Addresses, RankStats, TokenDelta  # noqa: E402


class _Seq:  # what runtime/cluster/lookahead.py estimate_next_step reads of a running sequence: one decode token
    is_finished = False
    num_uncomputed_tokens = 1


class _Scheduler:  # the attributes the look-ahead loop reads and sets
    def __init__(self) -> None:
        self.running = [_Seq()]
        self.waiting: list[Any] = []
        self.max_num_batched_tokens = 8192
        self.mixed_step_token_budget = 0
        self.step_token_budget = 0


class IdleEngine:
    """A SteppedEngine (rank_loop.py) that always has one decode token and runs nothing: the rank loop and the
    coordinator are all that is left. Stamps each step; writes them once it has warmup + steps + 1."""

    def __init__(self, rank: int, work_s: float, num_stamps: int, result_path: str) -> None:
        self.rank, self.work_s, self.num_stamps, self.result_path = rank, work_s, num_stamps, result_path
        self.scheduler = _Scheduler()
        self.schedules: list[int] = []  # ns: schedule() returned (the step report follows at once)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.num_steps = 0

    def add_request(self, req: Any) -> None: ...
    def abort_requests(self, ids: list[str]) -> None: ...

    def has_unfinished(self) -> bool:
        return True

    def schedule(self) -> int:
        self.schedules.append(time.monotonic_ns())
        return 1

    def padded_size(self, pad_to: int) -> int:
        return pad_to

    def execute(self, pad_to: int | None = None, on_launched: Any = None) -> list[TokenDelta]:
        self.starts.append(time.monotonic_ns())
        if on_launched is not None:  # the engine calls it once the step is queued on the device
            on_launched()
        if self.work_s > 0:
            time.sleep(self.work_s)
        self.num_steps += 1
        self.ends.append(time.monotonic_ns())
        if len(self.ends) == self.num_stamps:
            with open(self.result_path + ".tmp", "w") as f:
                json.dump({"schedules": self.schedules, "starts": self.starts, "ends": self.ends}, f)
            os.replace(self.result_path + ".tmp", self.result_path)
        return []

    def stats(self) -> RankStats:
        return RankStats(self.rank, 1, 0, 0.0, 0, 0, self.num_steps, 0)


def rank_main(args: argparse.Namespace) -> None:
    from runtime.cluster.rank_loop import RankLoop
    from runtime.messages import secret_from_env, use_secret

    use_secret(secret_from_env())
    addrs = msgspec.json.decode(args.addrs, type=Addresses)
    engine = IdleEngine(args.rank_proc, args.work_s, args.warmup + args.steps + 1, args.result)
    RankLoop(engine, args.rank_proc, addrs, lockstep=args.mode != "free", stats_interval=5.0,
             lookahead=args.mode == "lookahead").run()  # until the coordinator's Shutdown


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def analyse(stamps: list[dict[str, list[int]]], warmup: int, steps: int) -> dict[str, float]:
    idx = range(warmup + 1, warmup + steps + 1)
    gap = [max(r["starts"][s] - r["ends"][s - 1] for r in stamps) / 1e3 for s in idx]
    period = [(max(r["starts"][s] for r in stamps) - max(r["starts"][s - 1] for r in stamps)) / 1e3 for s in idx]
    rtt = [max(r["starts"][s] - r["schedules"][s] for r in stamps) / 1e3 for s in idx]
    out = {}
    for name, xs in (("gap", gap), ("period", period), ("rtt", rtt)):
        out[f"{name}_us_p50"], out[f"{name}_us_p90"] = statistics.median(xs), pct(xs, 0.9)
    return out


def bench(num_ranks: int, mode: str, work_us: float, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-coord-ranks-") as d:
        os.chmod(d, 0o700)
        addrs = Addresses.ipc(d, num_ranks)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), **{SECRET_ENV: secrets.token_hex(32)})
        ctx = zmq.Context()
        front = ctx.socket(zmq.PULL)  # the front end's socket: the coordinator pushes its stats here
        front.bind(addrs.to_frontend)
        spec = CoordinatorSpec(num_ranks=num_ranks, lockstep=mode != "free", log_stats=False)
        log_path = os.path.join(d, "coordinator.log")
        log = open(log_path, "w")  # its INFO lines would drown the table; shown if the run fails
        coord = subprocess.Popen([sys.executable, "-m", "runtime.cluster.coordinator",
                                  msgspec.json.encode(spec).decode(), msgspec.json.encode(addrs).decode()],
                                 cwd=ROOT, env=env, stderr=log)
        results = [os.path.join(d, f"rank{r}.json") for r in range(num_ranks)]
        ranks = [subprocess.Popen([sys.executable, __file__, "--rank-proc", str(r), "--addrs",
                                   msgspec.json.encode(addrs).decode(), "--mode", mode, "--work-s", str(work_us / 1e6),
                                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", results[r]],
                                  cwd=ROOT, env=env) for r in range(num_ranks)]
        try:
            deadline = time.monotonic() + args.timeout_s
            coordinator_up = False  # its first stats push: its SIGTERM handler is in place (before that, SIGTERM
            # kills it without the Shutdown the ranks wait for; free-running ranks can finish that early)
            while not (coordinator_up and all(os.path.exists(p) for p in results)):
                if time.monotonic() > deadline or any(p.poll() is not None for p in [coord, *ranks]):
                    with open(log_path) as f:
                        sys.stderr.write(f.read()[-3000:])
                    raise RuntimeError(f"N={num_ranks} {mode}: no result in {args.timeout_s}s or a process died")
                while front.poll(0):
                    front.recv()
                    coordinator_up = True
                time.sleep(0.05)
            coord.send_signal(signal.SIGTERM)  # it sends every rank Shutdown
            for p in [coord, *ranks]:
                p.wait(15)
        finally:
            for p in [coord, *ranks]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            ctx.destroy(linger=0)
            log.close()
        stamps = []
        for path in results:
            with open(path) as f:
                stamps.append(json.load(f))
    row: dict[str, Any] = {"ranks": num_ranks, "mode": mode, "work_us": work_us}
    row.update(analyse(stamps, args.warmup, args.steps))
    if mode != "lockstep":  # free: no report to wait for; lookahead: it leaves during the step
        row["rtt_us_p50"] = row["rtt_us_p90"] = None
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--modes", default="free,lockstep,lookahead")
    p.add_argument("--work-us", default="0", help="each step's stand-in device time, comma-separated values")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--timeout-s", type=float, default=120.0, help="per run")
    p.add_argument("--out", default="benchmarks/results/coordinator_ranks.json")
    # internal: one rank process
    p.add_argument("--rank-proc", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--addrs", default="", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="lockstep", help=argparse.SUPPRESS)
    p.add_argument("--work-s", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_proc is not None:
        rank_main(args)
        return
    modes = args.modes.split(",")
    if set(modes) - {"free", "lockstep", "lookahead"}:
        p.error(f"--modes: free, lockstep, lookahead; got {args.modes!r}")
    try:
        rank_counts = [int(n) for n in args.ranks.split(",")]
        works = [float(w) for w in args.work_us.split(",")]
    except ValueError:
        p.error("--ranks and --work-us take comma-separated numbers")
    if min(rank_counts) < 1 or args.steps < 2:
        p.error("--ranks must be >= 1 and --steps >= 2")
    rows = []
    for work_us in works:
        for n in rank_counts:
            for mode in modes:
                row = bench(n, mode, work_us, args)
                rows.append(row)
                rtt = f" rtt p50 {row['rtt_us_p50']:7.1f}us p90 {row['rtt_us_p90']:7.1f}us" if row["rtt_us_p50"] else ""
                print(f"coordinator_ranks N={n} {mode:9s} work={work_us:6.0f}us gap p50 {row['gap_us_p50']:7.1f}us "
                      f"p90 {row['gap_us_p90']:7.1f}us period p50 {row['period_us_p50']:7.1f}us{rtt}", flush=True)
    free = {(r["ranks"], r["work_us"]): r["gap_us_p50"] for r in rows if r["mode"] == "free"}
    for r in rows:
        base = free.get((r["ranks"], r["work_us"]))
        r["coordinator_overhead_us"] = r["gap_us_p50"] - base if base is not None and r["mode"] != "free" else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    parts = [f"N={r['ranks']} {r['mode']} work={r['work_us']:.0f}us +{r['coordinator_overhead_us']:.0f}us/step"
             for r in rows if r["coordinator_overhead_us"] is not None]
    print(f"bench_coordinator_ranks summary: {os.cpu_count()} cores; gap over free-running: " + "; ".join(parts)
          + f"; rows in {args.out}")


if __name__ == "__main__":
    main()
