"""Where one engine step's time goes, CPU and GPU side by side (Qwen3-30B-A3B shapes, dummy weights, one GPU):
a graph-replayed decode step, the same step eager, and a decode step carrying a new prompt (mixed), eager and
replayed from its token bucket's CUDA graph (runtime/engine/mixed_graphs.py; --max-mixed-cudagraph-tokens).

    python benchmarks/profile_step.py --batch 64 --prompt-len 1024 --out-dir prof/

Prints wall time per step, GPU kernel time per step and the top ops by self CPU time and by GPU time;
writes a Chrome trace per case into --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_e2e import QWEN3_30B_A3B, add_decoding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--max-mixed-cudagraph-tokens", type=int, default=2048)
    parser.add_argument("--out-dir", default="prof")
    args = parser.parse_args()
    from runtime.config import EngineConfig
    from runtime.engine.llm_engine import LLMEngine
    from runtime.messages import AddRequest
    from runtime.sampling_params import SamplingParams

    os.makedirs(args.out_dir, exist_ok=True)
    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({**QWEN3_30B_A3B, "num_hidden_layers": args.layers}, f)
    engine = LLMEngine(EngineConfig(model=model_dir, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                                    # room for the new prompt beside the batch, or it never joins it
                                    max_num_seqs=args.batch + 8, max_num_batched_tokens=8192,
                                    max_mixed_cudagraph_tokens=args.max_mixed_cudagraph_tokens,
                                    gpu_memory_utilization=0.9))
    g = torch.Generator().manual_seed(0)
    add_decoding(engine, args.batch, args.ctx, g)
    graphs, mixed = engine.runner.graphs, engine.runner.mixed
    walls: dict[str, float] = {}

    def case(name: str, eager: bool, prompt: bool) -> None:
        engine.runner.graphs = None if eager else graphs
        engine.runner.mixed = None if eager else mixed
        for i in range(4):  # the last one profiled
            if prompt:
                ids = torch.randint(0, 150000, (args.prompt_len,), generator=g).tolist()
                engine.add_request(AddRequest(f"{name}{i}", ids, SamplingParams(temperature=0, max_tokens=1)))
            torch.cuda.synchronize()
            if i < 3:
                engine.step()
                continue
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                engine.step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) * 1e3
            prof.export_chrome_trace(os.path.join(args.out_dir, f"{name}.json"))
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
            print(f"== {name}: wall {wall:.1f} ms, {len(kernels)} GPU kernels, GPU busy {gpu:.1f} ms", flush=True)
            walls[name] = wall
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        while any(r.startswith(name) for r in engine.requests):
            engine.step()
        engine.runner.graphs, engine.runner.mixed = graphs, mixed

    case("graph_decode", eager=False, prompt=False)
    case("eager_decode", eager=True, prompt=False)
    case("mixed_eager", eager=True, prompt=True)
    if mixed is not None:
        case("mixed_graph", eager=False, prompt=True)
    summary = ", ".join(f"{k} {v:.1f} ms" for k, v in walls.items())
    print(f"profile_step: batch {args.batch} ctx {args.ctx} prompt {args.prompt_len}: {summary}")


if __name__ == "__main__":
    main()
