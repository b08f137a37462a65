"""End-to-end engine step times at Qwen3-30B-A3B shapes (dummy weights) on one GPU, next to their floor
and next to transformers' own Qwen3-MoE (experts_implementation="grouped_mm") run in the same process.

Decode: B sequences whose first `ctx` tokens are already in the KV cache; we time whole engine steps
(schedule + inputs + CUDA-graph replay + sampling). Prefill: one 8k-token chunk.
Floor: bytes a decode step must read (experts touched + attention/router weights + lm head + KV) over the
device-to-device copy bandwidth measured in this run; prefill floor: FLOPs over the measured matmul rate.

    python benchmarks/bench_e2e.py --out e2e.json [--quantization fp8] [--no-hf] [--no-async-scheduling] [--as-served]
        [--pdl | --no-pdl]

Long context: --max-model-len 131072 adds Qwen3's yarn block (factor 4 over 32768, as its model card says),
--kv-cache-dtype fp8 puts the KV in FP8, --prompt-len 131072 times one prompt prefilled in --prefill chunks
(time to first token); the start prints how many max-length sequences the KV pool holds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}

GLM_4_5_AIR = {  # 106B total / 12B active: fits one H200 only with --quantization fp8
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "n_routed_experts": 128,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
    "num_hidden_layers": 46,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "use_qk_norm": False,
    "vocab_size": 151552,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": [151329, 151336, 151338],
    "torch_dtype": "bfloat16",
}
SHAPES = {"qwen3-30b-a3b": QWEN3_30B_A3B, "glm-4.5-air": GLM_4_5_AIR}


def _moe_dims(cfg: dict) -> tuple[int, int, int, int, int, int, int]:
    """(hidden, moe inter, experts, top-k, MoE layers, dense layers, shared-expert inter) of either shape."""
    layers = cfg["num_hidden_layers"]
    dense = cfg.get("first_k_dense_replace", 0)
    experts = cfg.get("num_experts", cfg.get("n_routed_experts"))
    shared = cfg["moe_intermediate_size"] * cfg.get("n_shared_experts", 0)
    return (cfg["hidden_size"], cfg["moe_intermediate_size"], experts, cfg["num_experts_per_tok"], layers - dense,
            dense, shared)


def measure_ceilings(device: torch.device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured now."""
    from triton.testing import do_bench

    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bandwidth = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    src = dst = None  # free before the matmul
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return bandwidth, 2 * 8192**3 / (ms * 1e-3)


def decode_floor_bytes(cfg: dict, batch: int, ctx: int, weight_bytes: float, kv_elem_bytes: int = 2) -> float:
    h, i, e, k, moe_layers, dense_layers, shared = _moe_dims(cfg)
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    experts_touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per layer, uniform routing
    expert_bytes = (experts_touched * i + shared) * 3 * h * weight_bytes
    router_bytes = h * e * (4 if cfg.get("n_group") else 2)  # GLM keeps its router in fp32
    attn_bytes = (h * (q_dim + 2 * kv_dim) + q_dim * h) * weight_bytes  # qkv, o
    kv_bytes = batch * (ctx + 1) * 2 * kv_dim * kv_elem_bytes
    lm_head = cfg["vocab_size"] * h * 2
    dense_bytes = 3 * h * cfg["intermediate_size"] * weight_bytes
    layers = moe_layers + dense_layers
    return (layers * (attn_bytes + kv_bytes) + moe_layers * (expert_bytes + router_bytes)
            + dense_layers * dense_bytes + lm_head)


def prefill_flops(cfg: dict, tokens: int) -> float:
    h, i, _, k, moe_layers, dense_layers, shared = _moe_dims(cfg)
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    attn = 2 * tokens * (h * (q_dim + 2 * kv_dim) + q_dim * h) + 2 * 2 * q_dim * tokens * tokens / 2  # causal
    moe = 2 * tokens * (k * i + shared) * 3 * h
    dense = 2 * tokens * 3 * h * cfg["intermediate_size"]
    return ((moe_layers + dense_layers) * attn + moe_layers * moe + dense_layers * dense
            + 2 * cfg["vocab_size"] * h)  # logits of the last token only


def bench_engine(model_dir: str, args: argparse.Namespace, cfg: dict, bandwidth: float, flops: float) -> list[dict]:
    from runtime.config import EngineConfig
    from runtime.engine.llm_engine import LLMEngine
    from runtime.messages import AddRequest
    from runtime.sampling_params import SamplingParams

    max_b = max(args.batch_sizes)
    max_len = args.max_model_len or max(args.ctx + 64, args.prefill + 16, args.prompt_len + 16)
    config = EngineConfig(model=model_dir, load_format="dummy", dtype="bfloat16", quantization=args.quantization,
                          max_model_len=max_len, max_num_seqs=max_b + 8, max_num_batched_tokens=args.prefill,
                          gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=args.kv_cache_dtype,
                          async_scheduling=args.async_scheduling)
    if args.as_served:  # a served rank's engine: MoE layers through the dispatcher, routed tokens counted
        from runtime.cluster.rank_loop import build_engine
        from runtime.distributed.parallel import single_rank

        engine = build_engine(config, single_rank(config.resolved_device()))[0]
    else:
        engine = LLMEngine(config)
    kv_elem_bytes = engine.kv_dtype.itemsize
    fit = engine.block_manager.num_blocks / -(-max_len // config.block_size)
    print(f"ours kv {args.kv_cache_dtype}: {engine.block_manager.num_blocks} blocks = {fit:.2f} sequences of "
          f"{max_len} tokens", flush=True)
    rows = [{"engine": "ours", "phase": "kv_pool", "kv_cache_dtype": args.kv_cache_dtype, "max_model_len": max_len,
             "num_blocks": engine.block_manager.num_blocks, "max_len_seqs_fit": fit}]
    weight_bytes = 1 if args.quantization == "fp8" else 2
    g = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        need = batch * -(-(args.ctx + 1 + args.steps + 3) // config.block_size)
        if need > engine.block_manager.num_free_blocks:
            print(f"skip decode B={batch}: needs {need} KV blocks, {engine.block_manager.num_free_blocks} free")
            continue
        seqs = add_decoding(engine, batch, args.ctx, g, prefix=f"d{batch}-")
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
        graph_ms = time_graph_replay(engine, batch)
        if batch in args.profile:
            profile_eager_step(engine)
        gaps = {}
        if batch in args.step_gaps:
            gaps = step_gaps(engine, trace=args.out.replace(".json", f"_trace_b{batch}.json"))
        mixed = time_mixed_steps(engine, args.mixed, g) if batch == max_b else {}
        floor_ms = decode_floor_bytes(cfg, batch, args.ctx, weight_bytes, kv_elem_bytes) / bandwidth * 1e3
        rows.append({"engine": "ours", "phase": "decode", "batch": batch, "ctx": args.ctx, "step_ms": step_ms,
                     "graph_replay_ms": graph_ms,
                     "floor_ms": floor_ms, "floor_fraction": floor_ms / step_ms,
                     "tokens_per_s": batch / step_ms * 1e3, **mixed, **gaps})
        print(f"ours decode B={batch:4d} ctx={args.ctx}: {step_ms:8.3f} ms/step (graph alone {graph_ms:.3f} ms), "
              f"floor {floor_ms:.3f} ms "
              f"({floor_ms / step_ms:.0%} of floor speed)", flush=True)
        engine.abort_requests([s.request_id for s in seqs])
    # prefill: one chunk of args.prefill tokens
    prompt = torch.randint(0, 150000, (args.prefill,), generator=g).tolist()
    times = []
    for r in range(3):
        engine.add_request(AddRequest(f"p{r}", prompt[:-1] + [r], SamplingParams(temperature=0, max_tokens=1)))
        engine.block_manager.reset_prefix_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    prefill_s = min(times[1:])
    floor_s = prefill_flops(cfg, args.prefill) / flops
    rows.append({"engine": "ours", "phase": "prefill", "tokens": args.prefill, "step_ms": prefill_s * 1e3,
                 "floor_ms": floor_s * 1e3, "floor_fraction": floor_s / prefill_s,
                 "tokens_per_s": args.prefill / prefill_s})
    print(f"ours prefill {args.prefill} tokens: {prefill_s * 1e3:.1f} ms = {args.prefill / prefill_s:.0f} tok/s, "
          f"floor {floor_s * 1e3:.1f} ms", flush=True)
    if args.prompt_len:  # time to first token of one long prompt, prefilled in --prefill chunks
        long_prompt = torch.randint(0, 150000, (args.prompt_len,), generator=g).tolist()
        engine.add_request(AddRequest("long", long_prompt, SamplingParams(temperature=0, max_tokens=1)))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        ttft_s = time.perf_counter() - t0
        floor_s = prefill_flops(cfg, args.prompt_len) / flops
        rows.append({"engine": "ours", "phase": "ttft", "tokens": args.prompt_len, "chunk": args.prefill,
                     "step_ms": ttft_s * 1e3, "floor_ms": floor_s * 1e3, "floor_fraction": floor_s / ttft_s})
        print(f"ours ttft {args.prompt_len} tokens in {args.prefill}-token chunks: {ttft_s:.2f} s, floor "
              f"{floor_s:.2f} s ({floor_s / ttft_s:.0%})", flush=True)
    del engine
    return rows


def add_decoding(engine, batch: int, ctx: int, g: torch.Generator, prefix: str = "d") -> list:
    """B sequences with ctx tokens "already computed" (blocks allocated, KV left as it is), decoding from the
    next step on with greedy sampling and no end."""
    from runtime.engine.sequence import Sequence, Status
    from runtime.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
    seqs = []
    for b in range(batch):
        seq = Sequence(f"{prefix}{b}", torch.randint(0, 150000, (ctx + 1,), generator=g).tolist(), params)
        engine.block_manager.allocate(seq)
        engine.block_manager.grow(seq, ctx + 1)
        seq.num_computed_tokens = ctx
        seq.status = Status.RUNNING
        engine.scheduler.running.append(seq)
        engine.requests[seq.request_id] = seq
        seqs.append(seq)
    return seqs


def time_mixed_steps(engine, prompt_lens: list[int], g: torch.Generator) -> dict[str, float]:
    """The running decode batch's step time when it carries a new prompt of n tokens (a mixed step, run
    eagerly), and the same decode step forced eager (no graph): what a prefill arrival costs the streams."""
    from runtime.messages import AddRequest
    from runtime.sampling_params import SamplingParams

    def timed_step() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    out: dict[str, float] = {}
    graphs, engine.runner.graphs = engine.runner.graphs, None
    out["eager_decode_ms"] = sorted(timed_step() for _ in range(5))[2]
    engine.runner.graphs = graphs
    for n in prompt_lens:
        times = []
        for r in range(3):
            prompt = torch.randint(0, 150000, (n,), generator=g).tolist()
            engine.add_request(AddRequest(f"mixed{n}-{r}", prompt, SamplingParams(temperature=0, max_tokens=1)))
            times.append(timed_step())
            while f"mixed{n}-{r}" in engine.requests:  # a prompt over one chunk: finish it
                engine.step()
        out[f"mixed_{n}_ms"] = sorted(times)[1]
    print("  " + " ".join(f"{k}={v:.1f}" for k, v in out.items()), flush=True)
    return out


def time_graph_replay(engine, batch: int) -> float:
    """GPU time of the decode graph alone (no scheduling, input copies, lm head or sampling)."""
    graphs = engine.runner.graphs
    size = graphs.bucket(batch) if graphs is not None else None
    if size is None:
        return float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graphs.graphs[size].replay()
    start.record()
    for _ in range(20):
        graphs.graphs[size].replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20


def step_gaps(engine, steps: int = 6, trace: str = "") -> dict:
    """Where a decode step's time goes beyond its graph replay, as bench_engine runs it (graphs on): the host's time
    a step and the part of it spent waiting on the device (torch.cuda.Event.synchronize: the sampled tokens' copy,
    the input staging), from 20 timed steps; then the device's busy and idle time a step and its idle gaps by the
    kernels on either side, and the host's CUDA calls, from a profile of `steps` more (CUDA activity only: no
    host-side op tracing; few steps, as the profiler keeps ~20 ms of kernel records)."""
    from torch.profiler import ProfilerActivity, profile

    waits: list[float] = []
    event_sync = torch.cuda.Event.synchronize

    def timed_sync(event) -> None:
        t = time.perf_counter()
        event_sync(event)
        waits.append(time.perf_counter() - t)

    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    host = []
    torch.cuda.Event.synchronize = timed_sync
    try:
        for _ in range(20):
            t = time.perf_counter()
            engine.step()
            host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    finally:
        torch.cuda.Event.synchronize = event_sync
    host_ms, wait_ms = sum(host) / 20 * 1e3, sum(waits) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)  # host calls and device ops on one clock, linked by their correlation ids
    events = prof.events()
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in events
             if e.device_type == torch.autograd.DeviceType.CUDA]  # (device_timeline sorts them)
    api: dict[str, list[float]] = {}  # the CUDA runtime / driver calls the host made (a sync shows here)
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA and e.name.startswith("cu"):
            api.setdefault(e.name, []).append(e.time_range.elapsed_us())
    calls = sorted(api.items(), key=lambda kv: -sum(kv[1]))[:8]
    calls_us = {name: sum(t) / steps for name, t in calls}
    print("  host CUDA calls a step (us total, count): " + ", ".join(
        f"{name} {sum(t) / steps:.0f} ({len(t) / steps:.1f}x, max {max(t):.0f})" for name, t in calls))
    profile = device_timeline(spans, steps)
    if profile is None:
        return {"host_ms": host_ms, "host_wait_ms": wait_ms}
    print(f"  step gaps: host {host_ms:.3f} ms/step, {wait_ms:.3f} of it waiting on the device; device "
          f"{profile['device_span_ms']:.3f} ms/step from first to last kernel, busy {profile['device_busy_ms']:.3f}, "
          f"{profile['kernels_per_step']:.0f} kernels/copies a step; idle gaps by neighbours (us/step, count/step):")
    for gap in profile["idle_gaps"]:
        print(f"    {gap['us_per_step']:7.1f} us {gap['per_step']:5.1f}x  {gap['between']}")
    print("  what each kernel adds to the step (us/step; a call: adds, lasts; calls/step):")
    for k in profile["kernels"]:
        print(f"    {k['adds_us_per_step']:7.1f} us  {k['adds_us']:6.2f} / {k['lasts_us']:6.2f} us  "
              f"{k['per_step']:5.1f}x  {k['name']}")
    return {"host_ms": host_ms, "host_wait_ms": wait_ms, "host_cuda_calls_us": calls_us, **profile}


def device_timeline(spans: list[tuple[float, float, str]], steps: int) -> dict | None:
    """A profile's device ops [(start us, end us, name)] over `steps` steps, read from the second step on (the first
    carries the profiler's start, a slow first graph launch; a step ends with its token copy to the host): the span
    and busy time a step, the idle gaps by the ops on either side, and what each kernel adds to the step: its end
    past every earlier end (with PDL a kernel starts before its predecessor ends, so its duration overstates its
    cost); the adds sum to the span. None without a second step."""
    spans = sorted(spans)
    first = next((end for _, end, name in spans if "DtoH" in name), None)
    if first is None or steps < 2:
        return None
    spans = [s for s in spans if s[0] >= first]
    steps -= 1
    busy, gaps = 0.0, {}
    seg_start, seg_end, last = spans[0]
    for start, end, name in spans[1:]:
        if start > seg_end:
            busy += seg_end - seg_start
            key = f"{last[:50]} -> {name[:50]}"
            n, us = gaps.get(key, (0, 0.0))
            gaps[key] = (n + 1, us + start - seg_end)
            seg_start = start
        if end > seg_end:
            seg_end, last = end, name
    busy += seg_end - seg_start
    adds: dict[str, list[float]] = {}
    last_end = spans[0][0]
    for start, end, name in spans:
        a = adds.setdefault(name[:60], [0.0, 0.0, 0])
        a[0], a[1], a[2] = a[0] + max(0.0, end - last_end), a[1] + end - start, a[2] + 1
        last_end = max(last_end, end)
    return {"device_span_ms": (seg_end - spans[0][0]) / steps / 1e3, "device_busy_ms": busy / steps / 1e3,
            "kernels_per_step": len(spans) / steps,
            "idle_gaps": [{"between": k, "per_step": n / steps, "us_per_step": us / steps}
                          for k, (n, us) in sorted(gaps.items(), key=lambda kv: -kv[1][1])[:8]],
            "kernels": [{"name": name, "adds_us_per_step": added / steps, "adds_us": added / n, "lasts_us": lasted / n,
                         "per_step": n / steps}
                        for name, (added, lasted, n) in sorted(adds.items(), key=lambda kv: -kv[1][0])[:14]]}


def profile_eager_step(engine) -> None:
    """Kernel time breakdown of one decode step run eagerly (graphs hide kernels from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    graphs, engine.runner.graphs = engine.runner.graphs, None
    engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    engine.runner.graphs = graphs
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels) / 3
    print(f"  eager decode step: {len(kernels) / 3:.0f} GPU kernels/copies, {busy_us:.0f} us of GPU time")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def bench_transformers(model_dir: str, args: argparse.Namespace, cfg: dict) -> list[dict]:
    import transformers

    hf_cfg = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(
                hf_cfg, dtype=torch.bfloat16, experts_implementation="grouped_mm")
        except (TypeError, ValueError):
            hf_cfg._experts_implementation = "grouped_mm"
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    model.eval()
    rows = []
    for batch in [b for b in args.batch_sizes if b in (1, 64)]:
        ids = torch.randint(0, 150000, (batch, args.ctx), device="cuda")
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(2):
                out = model(nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = max(3, args.steps // 4)
            for _ in range(n):
                out = model(nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / n * 1e3
        rows.append({"engine": "transformers", "phase": "decode", "batch": batch, "ctx": args.ctx,
                     "step_ms": step_ms, "tokens_per_s": batch / step_ms * 1e3})
        print(f"transformers decode B={batch:4d} ctx={args.ctx}: {step_ms:8.3f} ms/step", flush=True)
        del cache, out
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 256])
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quantization", choices=["fp8"], default=None)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    parser.add_argument("--max-model-len", type=int, default=None, help="past 40960: Qwen3's yarn rope scaling")
    parser.add_argument("--prompt-len", type=int, default=0, help="also time one prompt of this many tokens")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="the engine's --[no-]async-scheduling (default: its default, on): step s+1 queued "
                             "before step s's tokens are read")
    parser.add_argument("--as-served", action="store_true",
                        help="build the engine as python -m runtime.serve does (its expert statistics included)")
    parser.add_argument("--profile", type=lambda s: [int(x) for x in s.split(",")], default=[],
                        help="batch sizes to profile eagerly, kernel by kernel")
    parser.add_argument("--step-gaps", type=lambda s: [int(x) for x in s.split(",")], default=[],
                        help="batch sizes whose steps (graphs on) to split into host time, host waits, device busy "
                             "and the device's idle gaps")
    parser.add_argument("--mixed", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                        help="prompt lengths: time the largest batch's decode step carrying one such prompt")
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None,
                        help="programmatic dependent launch for the decode chain's kernels, on by default on Hopper "
                             "(--no-pdl sets MOE_RT_PDL=0, --pdl MOE_RT_PDL=1 before any kernel launches; "
                             "kernels/pdl.py)")
    parser.add_argument("--out", default="e2e.json")
    args = parser.parse_args()
    if args.pdl is not None:
        os.environ["MOE_RT_PDL"] = "1" if args.pdl else "0"

    from kernels.pdl import pdl_enabled

    device = torch.device("cuda")
    bandwidth, flops = measure_ceilings(device)
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    model_dir = tempfile.mkdtemp()
    cfg = dict(SHAPES[args.shape])
    longest = max(args.max_model_len or 0, args.prompt_len + 16, args.ctx + 64)
    if args.shape == "qwen3-30b-a3b" and longest > cfg["max_position_embeddings"]:
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    rows = bench_engine(model_dir, args, cfg, bandwidth, flops)
    gc.collect()
    torch.cuda.empty_cache()
    if not args.no_hf:
        rows += bench_transformers(model_dir, args, cfg)
    result = {"gpu": torch.cuda.get_device_name(), "copy_bytes_per_s": bandwidth, "matmul_flops": flops,
              "quantization": args.quantization or "bf16", "kv_cache_dtype": args.kv_cache_dtype,
              "async_scheduling": args.async_scheduling is not False, "as_served": args.as_served,
              "pdl": pdl_enabled(device), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    ours = {r["batch"]: r for r in rows if r["engine"] == "ours" and r["phase"] == "decode"}
    hf = {r["batch"]: r for r in rows if r["engine"] == "transformers"}
    summary = " ".join(
        f"B{b}={r['step_ms']:.2f}ms({r['floor_fraction']:.0%})" + (f"/hf{hf[b]['step_ms']:.0f}ms" if b in hf else "")
        for b, r in ours.items()
    )
    pre = next(r for r in rows if r["phase"] == "prefill")
    pool = next(r for r in rows if r["phase"] == "kv_pool")
    ttft = "".join(f" ttft{r['tokens']}={r['step_ms'] / 1e3:.2f}s({r['floor_fraction']:.0%})"
                   for r in rows if r["phase"] == "ttft")
    print(f"SUMMARY e2e {args.shape} {result['quantization']} kv {args.kv_cache_dtype} pdl {int(result['pdl'])} "
          f"{result['gpu']}: "
          f"ctx {args.ctx} decode {summary} prefill8k={pre['tokens_per_s']:.0f}tok/s({pre['floor_fraction']:.0%})"
          f"{ttft} fit={pool['max_len_seqs_fit']:.2f}x{pool['max_model_len']}")


if __name__ == "__main__":
    main()
