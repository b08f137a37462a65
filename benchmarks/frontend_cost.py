"""The API server's CPU time per streamed token at concurrency 1: the host path from an engine output on the socket to
the SSE chunk on the wire (ZMQ read, routing, detokenization, JSON, HTTP), with no model.

The model-free engine of tests/fake_engine.py (its own process) emits one token per --tick-ms; the real API server
serves one /v1/completions stream of --tokens tokens (the demo model's tokenizer, a text prompt) at a time. The
server's CPU time is read from /proc (every thread, scheduler nanoseconds), so the other jobs of a shared machine
do not count. At concurrency 1 this cost is latency added to every token, not TPOT: the server runs beside the
engine rank, in its own process.

    python benchmarks/frontend_cost.py [--tokens 1800] [--tick-ms 2] [--reps 3] [--profile server.prof]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILED = "import cProfile, sys; from tests.fake_engine import main; cProfile.run('main(sys.argv[2:])', sys.argv[1])"


def cpu_seconds(pid: int) -> float:
    """Run time of every thread of pid (Linux schedstat, ns)."""
    tasks = f"/proc/{pid}/task"
    return sum(int(open(f"{tasks}/{t}/schedstat").read().split()[0]) for t in os.listdir(tasks)) / 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1800, help="tokens per stream (prompt + tokens <= 2048)")
    parser.add_argument("--tick-ms", type=float, default=2.0, help="the fake engine's step")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", default=None, help="cProfile the API server into this file")
    parser.add_argument("--out", default="frontend_cost.json")
    args = parser.parse_args()
    port = free_port()
    entry = ["-c", PROFILED, args.profile] if args.profile else ["-m", "tests.fake_engine"]
    server = subprocess.Popen([sys.executable, *entry, "--port", str(port), "--tick-ms", str(args.tick_ms)], cwd=ROOT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    with open(os.path.join(ROOT, "models", "demo", "heldout.txt")) as f:
        prompt = f.read()[:600]  # ~150 tokens of text: real detokenization
    body = {"model": "demo", "prompt": prompt, "max_tokens": args.tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    reps = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the API server with the fake engine did not start")
            time.sleep(0.2)
        with httpx.Client(timeout=120) as client:
            for _ in range(args.reps):
                cpu0 = cpu_seconds(server.pid)
                arrivals = []
                with client.stream("POST", f"{base}/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.perf_counter())
                time.sleep(0.3)  # the end of the request's handling
                cpu_us = (cpu_seconds(server.pid) - cpu0) / args.tokens * 1e6
                gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
                reps.append({"cpu_us_per_token": cpu_us, "chunks": len(arrivals),
                             "cpu_us_per_chunk": cpu_us * args.tokens / max(len(arrivals), 1),
                             "chunk_gap_p50_ms": gaps[len(gaps) // 2] * 1e3 if gaps else float("nan")})
                print(f"front end: {cpu_us:.1f} us CPU per token ({reps[-1]['cpu_us_per_chunk']:.1f} per chunk), "
                      f"{len(arrivals)} chunks for {args.tokens} tokens (a lagging server merges tokens), "
                      f"chunk gap p50 {reps[-1]['chunk_gap_p50_ms']:.3f} ms", flush=True)
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn stops cleanly (and a profile gets written)
        server.wait(60)
    best = min(r["cpu_us_per_token"] for r in reps)
    with open(args.out, "w") as f:
        json.dump({"tokens": args.tokens, "tick_ms": args.tick_ms, "reps": reps}, f, indent=1)
    print(f"SUMMARY frontend_cost c=1: {best:.1f} us CPU per streamed token (best of {len(reps)}), tick "
          f"{args.tick_ms} ms")


if __name__ == "__main__":
    main()
