"""Inter-token latency of a decoding stream on rank 0 while rank 1 prefills a long prompt (DP=2 + EP, lockstep).

  python benchmarks/bench_mixed_itl.py [--long-len 8000] [--budgets 0,512] [--out mixed_itl.json]

Each budget gets its own `python -m runtime.serve --headless` (tiny random Qwen3-MoE on CPU gloo ranks, or
--model M --device cuda on GPUs). The front end here places the requests itself (data_parallel_rank): a
stream on rank 0 decodes; once it runs, a --long-len prompt goes to rank 1. The window is from that submit to
the long prompt's first token; we report the stream's gaps between tokens in it (p50 / p99 / max), the
tokens it got in it, and the long prompt's time to first token. Budget 0 is the old behaviour (the whole
prompt in one step every rank waits for); --mixed-step-token-budget N cuts it into chunks of N tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.headless import HeadlessServer  # noqa: E402
from runtime.messages import (  # noqa: E402
    AbortRequest,
    AddRequest,
    ClusterStats,
    OutputBatch,
    decode,
    encode,
)
from runtime.sampling_params import SamplingParams  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run_once(model: str, budget: int, long_len: int, device: str = "cpu", timeout_s: float = 300.0,
             extra: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="rt-itl-") as d:
        max_len = long_len + 64
        srv = HeadlessServer(d, 2, ["--model", model, "--enable-expert-parallel", "--max-model-len", str(max_len),
                                    "--max-num-batched-tokens", str(max(8192, long_len)), "--max-num-seqs", "8",
                                    "--mixed-step-token-budget", str(budget), "--log-stats-interval", "1",
                                    *(extra or [])], device, 256 << 20)
        pull, push, proc = srv.pull, srv.push, srv.proc
        times: dict[str, list[float]] = {"stream": [], "long": []}
        health: list[tuple[float, bool]] = []  # the coordinator's verdict over time (/health follows it)
        deadline = time.monotonic() + timeout_s

        def poll(ms: int) -> None:
            if pull.poll(ms):
                while True:
                    try:
                        msg = decode(pull.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        return
                    if isinstance(msg, ClusterStats):
                        health.append((time.monotonic(), msg.healthy))
                    elif isinstance(msg, OutputBatch):
                        now = time.monotonic()
                        for delta in msg.outputs:
                            times[delta.request_id].extend([now] * len(delta.new_token_ids))

        def wait(pred, what: str) -> None:  # noqa: ANN001
            while not pred():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                assert proc.poll() is None, f"runtime.serve exited with {proc.returncode}"
                poll(50)

        try:
            params = SamplingParams(temperature=0.0, max_tokens=max_len - 16, ignore_eos=True)
            push.send(encode(AddRequest("stream", [5, 6, 7, 8], params, data_parallel_rank=0)))
            wait(lambda: len(times["stream"]) >= 20, "the stream to decode")
            t0 = time.monotonic()
            long_prompt = [(i * 7919) % 400 + 3 for i in range(long_len)]
            push.send(encode(AddRequest("long", long_prompt, SamplingParams(temperature=0.0, max_tokens=1,
                                                                            ignore_eos=True), data_parallel_rank=1)))
            wait(lambda: len(times["long"]) >= 1, "the long prompt's first token")
            t1 = times["long"][0]
            push.send(encode(AbortRequest(["stream"])))
        finally:
            srv.close()
        inside = [t for t in times["stream"] if t0 <= t <= t1]
        before = [t for t in times["stream"] if t < t0]
        marks = [before[-1], *inside, t1] if before else [t0, *inside, t1]
        gaps = [b - a for a, b in zip(marks, marks[1:])]  # the last one: until the window closes
        verdicts = [ok for t, ok in health if t0 <= t <= t1]
        return {"budget": budget, "long_len": long_len, "ttft_long_s": t1 - t0, "tokens_in_window": len(inside),
                "itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99),
                "itl_max_ms": 1e3 * max(gaps), "health_reports_in_window": len(verdicts),
                "unhealthy_reports_in_window": verdicts.count(False), "itl_before_p50_ms": 1e3 * percentile(
                    [b - a for a, b in zip(before, before[1:])], 50)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: a tiny random Qwen3-MoE written to a temp folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--long-len", type=int, default=8000)
    ap.add_argument("--budgets", default="0,512")
    ap.add_argument("--engine-hang-timeout", type=float, default=None,
                    help="pass it on: a long step must not be taken for a hang")
    ap.add_argument("--serve-args", default="", help="more runtime.serve flags, e.g. '--load-format dummy'")
    ap.add_argument("--out", default="mixed_itl.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model = args.model
        if model is None:
            from tests.tiny import make_tiny_checkpoint

            model = make_tiny_checkpoint(os.path.join(d, "tiny"), "Qwen3MoeForCausalLM",
                                         max_position_embeddings=args.long_len + 128)
        extra = ["--engine-hang-timeout", str(args.engine_hang_timeout)] if args.engine_hang_timeout else []
        extra += args.serve_args.split()
        rows = [run_once(model, int(b), args.long_len, args.device, extra=extra) for b in args.budgets.split(",")]
    for r in rows:
        print(f"mixed_itl budget={r['budget']} long_len={r['long_len']} ttft_long_s={r['ttft_long_s']:.2f} "
              f"tokens_in_window={r['tokens_in_window']} itl_p50_ms={r['itl_p50_ms']:.1f} "
              f"itl_p99_ms={r['itl_p99_ms']:.1f} itl_max_ms={r['itl_max_ms']:.1f} "
              f"unhealthy={r['unhealthy_reports_in_window']}/{r['health_reports_in_window']} "
              f"(before the long prompt: p50 {r['itl_before_p50_ms']:.1f} ms)")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
