"""Drives a running OpenAI-compatible server and measures it.

Arrivals are Poisson at --request-rate (inf = all at once), optionally capped at --max-concurrency
in flight. Prompts are random token ids of --input-len (exact lengths, any tokenizer) or the lines of
--dataset (a JSONL of {"prompt": ..., "output_len": ...} or plain text). Every request streams, with
ignore_eos so outputs have the asked length; TTFT, inter-token latency (ITL) and time per output token
(TPOT) come from the chunk arrival times. --sweep-rates runs several loads and plots latency vs load.

    python -m benchmarks.bench_serving --port 8000 --num-prompts 200 --input-len 128 --output-len 64 \
        --request-rate 4 --result-file bench.json
    python -m benchmarks.bench_serving --sweep-rates 1,2,4,8,inf --plot latency_vs_load.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def percentiles(values: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": math.nan for p in ps} | {"mean": math.nan}
    s = sorted(values)
    out = {f"p{p}": s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))] for p in ps}
    out["mean"] = sum(s) / len(s)
    return out


def make_prompts(args: argparse.Namespace) -> list[tuple[str | list[int], int]]:
    rng = random.Random(args.seed)
    if args.dataset:
        prompts: list[tuple[str | list[int], int]] = []
        with open(args.dataset) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line:
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    item = line
                if isinstance(item, dict):
                    prompts.append((item["prompt"], int(item.get("output_len", args.output_len))))
                else:
                    prompts.append((str(item), args.output_len))
        if not prompts:
            raise SystemExit(f"--dataset {args.dataset} holds no prompts")
        return [prompts[i % len(prompts)] for i in range(args.num_prompts)]
    lo, hi = args.token_id_range
    return [([rng.randrange(lo, hi) for _ in range(args.input_len)], args.output_len) for _ in range(args.num_prompts)]


async def _sse_events(response: httpx.Response) -> AsyncIterator[str]:
    """The data of each SSE event. Split on newlines only: aiter_lines() would also split inside
    the JSON at U+2028 and friends."""
    buf = b""
    async for raw in response.aiter_bytes():
        buf += raw
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[6:].decode()


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, model: str, prompt: str | list[int], output_len: int
) -> Result:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": output_len,
        "temperature": args.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt if isinstance(prompt, str) else str(prompt)}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    res = Result(ok=False)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for data in _sse_events(r):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"]:
                    continue
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last = now
        res.latency = time.perf_counter() - start
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as err:
        res.error = f"{type(err).__name__}: {err}"
    return res


async def run_load(args: argparse.Namespace, model: str, rate: float) -> dict[str, Any]:
    prompts = make_prompts(args)
    rng = random.Random(args.seed + 1)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    conns = httpx.Limits(max_connections=args.max_concurrency or len(prompts), max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=conns, timeout=args.timeout) as client:

        async def limited(prompt: str | list[int], n: int) -> Result:
            if limit is None:
                return await one_request(client, args, model, prompt, n)
            async with limit:
                return await one_request(client, args, model, prompt, n)

        start = time.perf_counter()
        tasks = []
        for prompt, n in prompts:
            tasks.append(asyncio.create_task(limited(prompt, n)))
            if rate != math.inf:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    summary = {
        "request_rate": rate,
        "max_concurrency": args.max_concurrency,
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_s": percentiles([x for r in ok for x in r.itls]),
        "e2e_s": percentiles([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }
    if args.save_requests:
        summary["requests"] = [asdict(r) for r in results]
    return summary


def summary_line(s: dict[str, Any]) -> str:
    return (
        f"bench_serving rate={s['request_rate']} concurrency={s['max_concurrency'] or 'inf'} "
        f"ok={s['num_ok']}/{s['num_requests']} req/s={s['request_throughput']:.2f} "
        f"out_tok/s={s['output_throughput']:.1f} "
        f"ttft_ms p50={1e3 * s['ttft_s']['p50']:.1f} p90={1e3 * s['ttft_s']['p90']:.1f} "
        f"p99={1e3 * s['ttft_s']['p99']:.1f} "
        f"tpot_ms p50={1e3 * s['tpot_s']['p50']:.2f} p90={1e3 * s['tpot_s']['p90']:.2f} "
        f"p99={1e3 * s['tpot_s']['p99']:.2f} "
        f"itl_ms p50={1e3 * s['itl_s']['p50']:.2f} p90={1e3 * s['itl_s']['p90']:.2f} "
        f"p99={1e3 * s['itl_s']['p99']:.2f}"
    )


def plot(runs: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    x = [r["output_throughput"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("ttft_s", "tpot_s", "itl_s"), ("TTFT", "TPOT", "ITL")):
        for p in ("p50", "p90", "p99"):
            ax.plot(x, [1e3 * r[key][p] for r in runs], marker="o", label=p)
        ax.set_xlabel("output tokens/s (load)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs load")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="default http://HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--token-id-range",
        type=int,
        nargs=2,
        default=[4, 256],
        metavar=("LO", "HI"),
        help="random prompt token ids are drawn from [LO, HI)",
    )
    p.add_argument("--dataset", default=None, help="JSONL of {prompt, output_len} or plain text lines")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--sweep-rates", default=None, help="comma-separated rates, e.g. 1,2,4,inf")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default="bench_serving.json")
    p.add_argument("--plot", default=None, help="PNG of latency vs load (needs matplotlib)")
    p.add_argument("--save-requests", action="store_true", help="keep every request's timings in the JSON")
    args = p.parse_args(argv)
    args.base_url = args.base_url or f"http://{args.host}:{args.port}"
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(f"{args.base_url}/v1/models", headers=headers).json()["data"][0]["id"]
    rates = [float(r) for r in args.sweep_rates.split(",")] if args.sweep_rates else [args.request_rate]
    runs = []
    for rate in rates:
        s = asyncio.run(run_load(args, model, rate))
        print(summary_line(s), flush=True)
        if s["errors"]:
            print("  errors:", *s["errors"], sep="\n    ")
        runs.append(s)
    config = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    with open(args.result_file, "w") as f:
        json.dump({"config": config, "model": model, "runs": runs}, f, indent=1, default=str)
    print(f"results written to {args.result_file}")
    if args.plot:
        plot(runs, args.plot)
    return runs


if __name__ == "__main__":
    main()
