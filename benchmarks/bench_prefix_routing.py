"""Prefix-cache hit rate of a multi-turn workload under DP=2, by routing policy.

  python benchmarks/bench_prefix_routing.py [--conversations 64] [--turns 4] [--system-len 512] [--out routing.json]

Each policy gets its own `python -m runtime.serve --headless -dp 2 --dp-routing POLICY` (a tiny random dense
model on CPU ranks by default). Every conversation shares one long system prompt; turn k's prompt is the
system prompt + the earlier user messages and answers + a new user message, sent when turn k-1 finished
(all conversations at once, in a random order per turn: clients do not arrive in a fixed order). We report
the ranks' prefix-cache hit rate (hit tokens / prompt tokens) and how often a turn ran on the rank of the
conversation's previous turn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.headless import HeadlessServer  # noqa: E402
from runtime.messages import (  # noqa: E402
    AddRequest,
    ClusterStats,
    OutputBatch,
    decode,
    encode,
)
from runtime.sampling_params import SamplingParams  # noqa: E402


def run_policy(model: str, policy: str, conversations: int, turns: int, system_len: int, user_len: int,
               answer_len: int, timeout_s: float = 600.0, device: str = "cpu", extra: list[str] | None = None) -> dict:
    rng = random.Random(0)
    system = [rng.randrange(3, 500) for _ in range(system_len)]
    users = [[[rng.randrange(3, 500) for _ in range(user_len)] for _ in range(turns)] for _ in range(conversations)]
    max_len = system_len + turns * (user_len + answer_len) + 16
    with tempfile.TemporaryDirectory(prefix="rt-route-") as d:
        srv = HeadlessServer(d, 2, ["--model", model, "--dp-routing", policy, "--max-model-len", str(max_len),
                                    "--max-num-seqs", str(conversations), "--max-num-batched-tokens", "4096",
                                    "--log-stats-interval", "0.5", *(extra or [])], device, 64 << 20)
        pull, push, proc = srv.pull, srv.push, srv.proc
        history = [list(system) for _ in range(conversations)]
        answer: dict[str, list[int]] = {}
        ranks: dict[tuple[int, int], int] = {}
        per_request: list[tuple[int, int, int, int, int]] = []  # conversation, turn, rank, prompt, cached
        cached = [[0, 0] for _ in range(turns)]  # per turn: (cached prompt tokens, prompt tokens), from the deltas
        stats: ClusterStats | None = None
        deadline = time.monotonic() + timeout_s
        t_start = time.monotonic()
        try:
            params = SamplingParams(temperature=0.0, max_tokens=answer_len, ignore_eos=True)
            for turn in range(turns):
                pending = set()
                order = list(range(conversations))
                rng.shuffle(order)
                for c in order:
                    history[c] += users[c][turn]
                    rid = f"c{c}-t{turn}"
                    answer[rid] = []
                    pending.add(rid)
                    push.send(encode(AddRequest(rid, list(history[c]), params)))
                while pending:
                    assert time.monotonic() < deadline, f"turn {turn}: {len(pending)} requests unfinished"
                    assert proc.poll() is None, f"runtime.serve exited with {proc.returncode}"
                    if not pull.poll(200):
                        continue
                    msg = decode(pull.recv())
                    if isinstance(msg, ClusterStats):
                        stats = msg
                    elif isinstance(msg, OutputBatch):
                        for delta in msg.outputs:
                            answer[delta.request_id] += delta.new_token_ids
                            c, t = (int(x[1:]) for x in delta.request_id.split("-"))
                            ranks[(c, t)] = msg.rank
                            if delta.num_prompt_tokens:  # the request's first delta
                                cached[t][0] += delta.num_cached_tokens
                                cached[t][1] += delta.num_prompt_tokens
                                per_request.append((c, t, msg.rank, delta.num_prompt_tokens, delta.num_cached_tokens))
                            if delta.finish_reason is not None:
                                pending.discard(delta.request_id)
                for c in range(conversations):
                    history[c] += answer[f"c{c}-t{turn}"]
            elapsed = time.monotonic() - t_start
            total = conversations * turns
            # the last word on the counters: wait for a ClusterStats that has seen every prompt
            while stats is None or sum(r.prefix_cache_queries for r in stats.ranks) == 0 or \
                    sum(r.num_running for r in stats.ranks) > 0:
                assert time.monotonic() < deadline, "no final cluster stats"
                if pull.poll(200):
                    msg = decode(pull.recv())
                    stats = msg if isinstance(msg, ClusterStats) else stats
            time.sleep(1.2)  # one more stats interval: counters of the last steps
            while pull.poll(200):
                msg = decode(pull.recv())
                stats = msg if isinstance(msg, ClusterStats) else stats
        finally:
            srv.close()
    queries = sum(r.prefix_cache_queries for r in stats.ranks)
    hits = sum(r.prefix_cache_hits for r in stats.ranks)
    same = sum(ranks[(c, t)] == ranks[(c, t - 1)] for c in range(conversations) for t in range(1, turns))
    per_rank = [sum(1 for (c, t), r in ranks.items() if r == k) for k in range(2)]
    return {"policy": policy, "conversations": conversations, "turns": turns, "system_len": system_len,
            "hit_rate": hits / max(queries, 1), "hit_tokens": hits, "prompt_tokens": queries,
            "same_rank_as_previous_turn": same / (conversations * (turns - 1)), "requests_per_rank": per_rank,
            "requests": total, "elapsed_s": elapsed,
            "hit_rate_per_turn": [h / max(n, 1) for h, n in cached], "per_request": per_request}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: a tiny random Llama written to a temp folder")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=512)
    ap.add_argument("--user-len", type=int, default=64)
    ap.add_argument("--answer-len", type=int, default=16)
    ap.add_argument("--policies", default="load,prefix")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--serve-args", default="", help="more runtime.serve flags, e.g. '--load-format dummy'")
    ap.add_argument("--out", default="prefix_routing.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model = args.model
        if model is None:
            from tests.tiny import make_tiny_checkpoint

            max_len = args.system_len + args.turns * (args.user_len + args.answer_len) + 64
            model = make_tiny_checkpoint(os.path.join(d, "tiny"), "LlamaForCausalLM",
                                         max_position_embeddings=max(512, max_len))
        rows = [run_policy(model, p, args.conversations, args.turns, args.system_len, args.user_len,
                           args.answer_len, device=args.device, extra=args.serve_args.split())
                for p in args.policies.split(",")]
    for r in rows:
        print(f"prefix_routing policy={r['policy']} conversations={r['conversations']} turns={r['turns']} "
              f"hit_rate={100 * r['hit_rate']:.1f}% same_rank_as_previous_turn="
              f"{100 * r['same_rank_as_previous_turn']:.1f}% requests_per_rank={r['requests_per_rank']} "
              f"hit_rate_per_turn={'/'.join(f'{100 * h:.0f}%' for h in r['hit_rate_per_turn'])} "
              f"elapsed_s={r['elapsed_s']:.1f}")
    with open(args.out, "w") as f:
        json.dump(rows, f)  # one line: per_request rows make an indented file thousands of lines long


if __name__ == "__main__":
    main()
