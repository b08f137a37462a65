"""What the DP coordinator costs per step, and what a dummy step costs next to a real decode step (one rank).

  python benchmarks/bench_coordinator.py --out coord.json [--layers 16] [--batch 32] [--steps 200]

Model: Qwen3-30B-A3B shapes (dummy weights), --layers of them. B sequences decode; we time
  raw       engine.schedule + execute in a plain loop (no sockets);
  free      the engine rank loop with outputs over ZMQ, the coordinator only routing (dense / no-EP mode);
  lockstep  the same with the coordinator clocking every step (StepReport -> StepCommand round trip);
  lookahead lockstep with --lockstep-lookahead (the next step's report sent while this one runs);
  dummy     execute(pad_to=B) with nothing planned: the lockstep filler, same bucket, its own CUDA graph
            (per MoE layer: dispatch an all-padding batch, local experts on what arrives, combine). One rank
            here: since 2026-11-29 a rank with no exchange runs no dummy forward at all, so this times an
            empty step; the filler's cost shows only with EP over several ranks (tests/test_dummy_step.py).
  python benchmarks/bench_coordinator.py --dummy-only   measures raw and dummy only (no sockets).
The coordinator and the front end run as their own processes with CUDA_VISIBLE_DEVICES="", as under
runtime.serve; this process is the engine rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import msgspec
import torch
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_e2e import QWEN3_30B_A3B  # noqa: E402
from runtime.cluster.coordinator import CoordinatorSpec  # noqa: E402
from runtime.cluster.rank_loop import RankLoop, build_engine  # noqa: E402
from runtime.config import EngineConfig  # noqa: E402
from runtime.distributed.parallel import single_rank  # noqa: E402
from runtime.messages import AbortRequest, AddRequest, Addresses, OutputBatch, decode, encode  # noqa: E402
from runtime.sampling_params import SamplingParams  # noqa: E402
from tests.tiny import write_tokenizer  # noqa: E402


def make_model(path: str, layers: int, small: bool) -> str:
    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    if small:  # CPU smoke run
        cfg.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                   num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_tokenizer(path)
    return path


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def timed_steps(fn, n: int, sync) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def median_us(xs: list[float]) -> float:
    return 1e6 * sorted(xs)[len(xs) // 2]


def bench_raw(engine, batch: int, steps: int, sync) -> dict[str, float]:  # noqa: ANN001
    for i in range(batch):
        engine.add_request(AddRequest(f"raw{i}", list(range(1, 17)), params(10 * steps + 10)))
    engine.step()  # prefill
    for _ in range(5):
        engine.step()
    real = timed_steps(lambda: engine.execute() if engine.schedule() else None, steps, sync)
    # dummy: nothing planned, padded to the same bucket as the real decode batch
    dummy = timed_steps(lambda: engine.execute(pad_to=batch), steps, sync)
    engine.abort_requests([f"raw{i}" for i in range(batch)])
    while engine.has_unfinished():
        engine.step()
    return {"raw_step_us": median_us(real), "dummy_step_us": median_us(dummy), "real_decode_step_us": median_us(real)}


def bench_sockets(engine, stats, batch: int, steps: int, lockstep: bool, tag: str,  # noqa: ANN001
                  lookahead: bool = False) -> dict[str, object]:
    """Coordinator and front end as their own processes (as under runtime.serve); this process is the rank."""
    with tempfile.TemporaryDirectory(prefix="bench-coord-") as d:
        addrs = Addresses.ipc(d, 1)
        cpu_env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        spec = CoordinatorSpec(num_ranks=1, lockstep=lockstep, log_stats=False, log_stats_interval=1.0)
        coord = subprocess.Popen([sys.executable, "-m", "runtime.cluster.coordinator",
                                  msgspec.json.encode(spec).decode(),
                                  msgspec.json.encode(addrs).decode()], env=cpu_env)
        result_path = os.path.join(d, "frontend.json")
        front = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--frontend",
                                  msgspec.json.encode(addrs).decode(), "--batch", str(batch), "--steps", str(steps),
                                  "--tag", tag, "--out", result_path, "--coordinator-pid", str(coord.pid)],
                                 env=cpu_env)
        steps_before = engine.num_steps
        # runs until the front end stops the coordinator, which then sends Shutdown
        RankLoop(engine, 0, addrs, lockstep=lockstep, stats_interval=1.0, expert_stats=stats,
                   lookahead=lookahead).run()
        front.wait(60)
        coord.wait(10)
        with open(result_path) as f:
            res = json.load(f)
        while engine.has_unfinished():  # whatever the abort left
            engine.step()
        return {f"{tag}_step_us": res["step_us"], f"{tag}_steps": engine.num_steps - steps_before,
                f"{tag}_coordinator_on_gpu": str(coord.pid) in res["gpu_pids"]}


def frontend_main(args: argparse.Namespace) -> None:
    """The front end of bench_sockets: submit, time the arrival of each step's OutputBatch, stop."""
    addrs = msgspec.json.decode(args.frontend, type=Addresses)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(addrs.to_frontend)
    push = ctx.socket(zmq.PUSH)
    push.connect(addrs.to_coordinator)
    warmup = 10
    for i in range(args.batch):
        push.send(encode(AddRequest(f"{args.tag}{i}", list(range(1, 17)), params(warmup + args.steps + 2))))
    arrivals: list[float] = []  # one OutputBatch per step: its arrival time
    deadline = time.monotonic() + 300
    while len(arrivals) < warmup + args.steps and time.monotonic() < deadline:
        if pull.poll(1000):
            msg = decode(pull.recv())
            if isinstance(msg, OutputBatch) and len(msg.outputs) == args.batch:
                arrivals.append(time.perf_counter())
    gpu_apps = ""
    if shutil.which("nvidia-smi"):
        gpu_apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout
    push.send(encode(AbortRequest([f"{args.tag}{i}" for i in range(args.batch)])))
    time.sleep(0.5)
    os.kill(args.coordinator_pid, signal.SIGTERM)
    intervals = [b - a for a, b in zip(arrivals[warmup:], arrivals[warmup + 1 :])]
    with open(args.out, "w") as f:
        json.dump({"step_us": median_us(intervals) if intervals else float("nan"),
                   "gpu_pids": [line.split(",")[0].strip() for line in gpu_apps.splitlines() if line.strip()]}, f)
    ctx.destroy(linger=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="bench_coordinator.json")
    parser.add_argument("--dummy-only", action="store_true", help="only the raw and dummy steps (no sockets)")
    parser.add_argument("--frontend", default=None, help=argparse.SUPPRESS)  # internal: the front-end process
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.frontend:
        frontend_main(args)
        return
    cuda = torch.cuda.is_available()
    model = make_model(os.path.join(tempfile.mkdtemp(), "qwen3-30b-a3b-shapes"), args.layers, small=not cuda)
    config = EngineConfig(model=model, load_format="dummy", max_num_seqs=max(args.batch, 8), max_model_len=2048,
                          max_num_batched_tokens=2048, kv_cache_memory=None if cuda else 64 << 20,
                          device="cuda" if cuda else "cpu", max_cudagraph_batch_size=args.batch)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    engine, stats = build_engine(config, single_rank(device))
    result: dict[str, object] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "layers": args.layers,
                                 "batch": args.batch, "steps": args.steps}
    result.update(bench_raw(engine, args.batch, args.steps, sync))
    graphs = engine.runner.graphs
    result["dummy_graphs"] = len(graphs.dummy_graphs) if graphs is not None else 0  # 0: eager dummy steps
    result["dummy_over_real"] = result["dummy_step_us"] / result["real_decode_step_us"]  # type: ignore[operator]
    if not args.dummy_only:
        result.update(bench_sockets(engine, stats, args.batch, args.steps, lockstep=False, tag="free"))
        result.update(bench_sockets(engine, stats, args.batch, args.steps, lockstep=True, tag="lockstep"))
        # --lockstep-lookahead: the next plan is reported while the step runs (runtime/cluster/lookahead.py)
        result.update(bench_sockets(engine, stats, args.batch, args.steps, lockstep=True, tag="lookahead",
                                    lookahead=True))
        result["coordinator_overhead_us"] = result["lockstep_step_us"] - result["free_step_us"]  # type: ignore[operator]
        result["lookahead_overhead_us"] = result["lookahead_step_us"] - result["free_step_us"]  # type: ignore[operator]
        result["loop_overhead_us"] = result["free_step_us"] - result["raw_step_us"]  # type: ignore[operator]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("bench_coordinator: " + " ".join(
        (f"{k}={v:.3f}" if k.endswith("_over_real") else f"{k}={v:.1f}") if isinstance(v, float) else f"{k}={v}"
        for k, v in result.items() if k != "device")
        + f" device={result['device']!r}")


if __name__ == "__main__":
    main()
