"""kill -9 of one engine rank of a running server mid-stream (issue 18, item 4), on any device.

  python benchmarks/kill_rank_streams.py --port 8011 [--streams 32] [--max-tokens 128] [--rank 1] [--out F]

Sends --streams greedy streams (random token-id prompts, ignore_eos) twice: once undisturbed (the reference
token ids), once with `kill -9` of the process titled `moe-rt: engine DP<rank>` after every stream has a few tokens.
Reports how many streams finished with all their tokens, how many token sequences equal the undisturbed run, and the
outage: the longest silence after the kill (kill -> first token from the restarted ranks). In bf16 on a GPU a
resumed request re-prefills prompt + tokens so far, so its logits can round differently from the incremental
decode: a sequence can then differ after the kill point even when recovery is right; the report says where.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_serving import _sse_events  # noqa: E402


def rank_pid(rank: int) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if re.match(rb"moe-rt: engine DP%d\b" % rank, cmd):
            return int(pid)
    raise SystemExit(f"no process titled 'moe-rt: engine DP{rank}'")


async def stream(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
                 times: list[float]) -> tuple[list[str], int]:
    # the tokens as ids (logprobs with return_tokens_as_token_ids): a model folder without a tokenizer streams
    # chunks with empty text, so text cannot count or compare tokens
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0,
            "return_tokens_as_token_ids": True}
    tokens: list[str] = []
    num = -1
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}")
        async for data in _sse_events(r):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            new = ((chunk.get("choices") or [{}])[0].get("logprobs") or {}).get("tokens") or []
            if new:
                tokens += new
                times.append(time.monotonic())
            if chunk.get("usage"):
                num = chunk["usage"]["completion_tokens"]
    return tokens, num


def log(msg: str) -> None:
    print(f"kill_rank_streams: {msg}", flush=True)


async def run(args: argparse.Namespace) -> dict:
    base = f"http://127.0.0.1:{args.port}"
    limits = httpx.Limits(max_connections=args.streams + 4)
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout, limits=limits, trust_env=False) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(10, args.vocab) for _ in range(args.input_len)] for _ in range(args.streams)]

        times: list[float] = []
        log(f"{args.streams} undisturbed streams ({model})")
        ref = await asyncio.gather(*(stream(client, model, p, args.max_tokens, times) for p in prompts))

        times = []
        log(f"the same streams, kill -9 of DP rank {args.rank} once every stream has a few tokens")
        tasks = [asyncio.create_task(stream(client, model, p, args.max_tokens, times)) for p in prompts]
        deadline = time.monotonic() + 60
        while len(times) < 4 * args.streams:
            if time.monotonic() > deadline:
                raise SystemExit(f"kill_rank_streams: only {len(times)} token chunks in 60 s: nothing killed")
            await asyncio.sleep(0.005)
        victim = rank_pid(args.rank)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        log(f"killed pid {victim} after {len(times)} tokens")
        results = await asyncio.gather(*tasks, return_exceptions=True)
    after = sorted(t for t in times if t > t_kill)
    gaps = [(b - a, b) for a, b in zip([t_kill, *after], after)]
    outage = max(gaps)[1] - t_kill if gaps else float("nan")
    ok = [r for r in results if not isinstance(r, BaseException)]
    complete = sum(n == args.max_tokens for _, n in ok)
    equal = sum(isinstance(r, tuple) and r[0] == t for r, (t, _) in zip(results, ref))
    first_diff = [next((i for i, (a, b) in enumerate(zip(r[0], t)) if a != b), min(len(r[0]), len(t)))
                  for r, (t, _) in zip(results, ref) if isinstance(r, tuple) and r[0] != t]  # in tokens
    errors = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
    return {"streams": args.streams, "complete": complete, "sequences_equal": equal, "errors": errors,
            "first_diff_tokens": first_diff, "outage_s": outage, "victim_pid": victim,
            "ref_complete": sum(n == args.max_tokens for _, n in ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=1, help="the DP rank to kill")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--vocab", type=int, default=150000, help="prompt token ids are drawn from [10, VOCAB)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out")
    args = ap.parse_args()
    r = asyncio.run(run(args))
    log(f"{r['complete']}/{r['streams']} streams complete, {r['sequences_equal']} token sequences equal "
          f"the undisturbed run, outage {r['outage_s']:.2f} s, errors {len(r['errors'])} {r['errors'][:2]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
