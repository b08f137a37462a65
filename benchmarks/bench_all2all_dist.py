"""Expert all2all across real ranks: dispatch + combine of the engine's backends next to a plain all_to_all_single.

  torchrun --nproc-per-node 2 benchmarks/bench_all2all_dist.py [--tokens 1,8,64,256,1024,4096]
      [--hidden 2048 --experts 128 --top-k 8] [--backends sparse,allgather] [--out F.json] [--check]
  python benchmarks/bench_all2all_dist.py --world 2 --device cpu ...   (spawns the gloo ranks itself)
  eager (dynamic-mode) host cost: ... --no-graphs --backends sparse_exact --tokens 64,512,2048 --host-cost

Every rank builds its backend as the engine does (runtime/distributed/backends.py make_backend, EngineConfig
defaults: on the GPU the sparse backend's fixed-size "static" mode up to the largest CUDA-graph step, 2048
tokens; dynamic exact-rows exchanges above, and always on the CPU unless --static-max-tokens), routes T tokens
uniformly at random over all experts (seed per rank) and times dispatch, then combine, with an identity
"expert" between them (out_recv = hidden_recv: nothing but the exchange). Each rep starts after a barrier;
a rep's time is the slowest rank's (CUDA events on the GPU, perf_counter on the CPU); medians after warm-up.
Bytes are the remote bytes one rank sent (its copy to itself excluded), from the backends' own accounting
(ExpertStats), the most any rank sent; GB/s = bytes / time. In the same run: dist.all_to_all_single of uint8
buffers moving those bytes per rank with even splits ("nccl_even"), and per T with uneven splits equal to
this routing's exact per-destination rows ("nccl_exact": the dynamic mode's rows without its count exchange and
packing). On cuda, steps up to the static max are also CUDA-graph captured (dispatch + combine in one graph,
backend "<name>_graph"), as the decode and mixed-step graphs hold them. Backend "sparse_exact": the sparse
backend held in its dynamic mode at every T (what prefills and overflow re-runs use); "sparse_fp8": sparse with
--all2all-fp8-dispatch (FP8 hidden rows out, the combine in the model dtype).
--check: combine(dispatch(x)) with a weighted identity expert equals x * sum(top-k weights), the bytes equal
what the routing implies, and a graph replay returns each token once per rank it went to; exit 1 otherwise.
--host-cost: per backend and T also a "<name>_host" row: the host's wall time from the dispatch call to the combine's
return (the device idle at the start, not synchronized at the end: only the syncs inside count; the slowest rank),
the part inside the collectives, and the kernel-running aten ops / Triton launches and host syncs (reads, uploads,
data-dependent shapes) of one dispatch + combine (benchmarks/bench_all2all_hostcost.py). An eager prefill under EP
pays this per MoE layer.
Prints one line per row and 'bench_all2all_dist summary' last; rank 0 writes the JSON.
"""

from __future__ import annotations

import os

# the H200 hosts need these before NCCL starts (NVLink SHARP / multicast are not usable there)
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_all2all_hostcost import host_cost, host_profile  # noqa: E402
from benchmarks.dist_timing import Plain, Timer, gbps  # noqa: E402
from runtime.config import EngineConfig  # noqa: E402
from runtime.distributed.all2all import row_layout  # noqa: E402
from runtime.distributed.all2all_sparse import SparseBackend, dequantize_rows, quantize_rows  # noqa: E402
from runtime.distributed.backends import make_backend  # noqa: E402
from runtime.distributed.expert_stats import ExpertStats  # noqa: E402
from runtime.distributed.parallel import ParallelState, destroy_parallel, track_cuda_graph  # noqa: E402


def routing(num_tokens: int, args: argparse.Namespace, rank: int, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], top-k weights [T, k] fp32, ids [T, k] int32): every expert equally likely, seed per rank."""
    gen = torch.Generator().manual_seed(1000 * num_tokens + rank)
    hidden = torch.randn(num_tokens, args.hidden, generator=gen).to(dtype)
    ids = torch.rand(num_tokens, args.experts, generator=gen).topk(args.top_k, dim=-1).indices
    weights = torch.randn(num_tokens, args.experts, generator=gen).softmax(-1).gather(1, ids)
    return hidden.to(device), weights.to(device), ids.to(torch.int32).to(device)


def rows_per_rank(ids: torch.Tensor, num_experts: int, world: int) -> list[int]:
    """Rows this rank's dispatch sends each rank when every token goes once to each rank holding its experts."""
    hit = torch.zeros(ids.shape[0], world, dtype=torch.bool, device=ids.device)
    hit.scatter_(1, ids.long() // (num_experts // world), True)
    return hit.sum(0).tolist()


def weighted_identity(hidden_recv: torch.Tensor, weights_recv: torch.Tensor, ids_recv: torch.Tensor) -> torch.Tensor:
    # what the local experts return if every expert were the identity: each row times its local weights' sum
    scale = (weights_recv * (ids_recv >= 0)).sum(1, keepdim=True)
    return (hidden_recv.float() * scale).to(hidden_recv.dtype)


@dataclass
class Run:
    args: argparse.Namespace
    parallel: ParallelState
    cpu_group: Any  # gloo over every rank: barriers, count matrices, results
    timer: Timer
    plain: Plain
    errors: list[str] = field(default_factory=list)
    graph_max_tokens: int = 0  # the engine's largest CUDA-graph step (0 on the CPU)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.args.dtype)

    def count_matrix(self, ids: torch.Tensor) -> list[list[int]]:
        """[source][destination] rows of an exact-rows dispatch, every rank's routing."""
        world = self.parallel.ep_size
        every = [torch.zeros(world, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(every, torch.tensor(rows_per_rank(ids, self.args.experts, world)), group=self.cpu_group)
        return [t.tolist() for t in every]

    def max_over_ranks(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return t.tolist()


def build(name: str, run: Run, stats: ExpertStats) -> Any:
    """The rank's backend exactly as the engine makes it from its flags (make_backend)."""
    args, parallel = run.args, run.parallel
    extra: dict[str, Any] = {}
    if args.static_max_tokens is not None:  # a smaller static max needs graphs no larger than it
        extra = dict(all2all_static_max_tokens=args.static_max_tokens,
                     max_cudagraph_batch_size=max(1, min(512, args.static_max_tokens)),
                     max_mixed_cudagraph_tokens=args.static_max_tokens, enforce_eager=args.static_max_tokens == 0)
    # max_num_batched_tokens: the default, or more, so that a dynamic exchange is one round as in the engine
    # sparse_fp8: --all2all-fp8-dispatch (FP8 hidden rows); sparse_exact: the sparse backend, held dynamic below
    config = EngineConfig(device=parallel.device.type, data_parallel_size=parallel.world_size,
                          enable_expert_parallel=True, all2all_backend="allgather" if name == "allgather" else "sparse",
                          all2all_fp8_dispatch=name == "sparse_fp8", all2all_capacity_factor=args.capacity_factor,
                          max_num_batched_tokens=max(8192, max(args.token_list)), **extra)
    run.graph_max_tokens = max(config.cuda_graph_max_batch(parallel.device),
                               config.mixed_cudagraph_tokens(parallel.device))
    return make_backend(config, parallel, args.experts, stats)


def exact_row(num_tokens: int, run: Run) -> dict[str, Any]:
    """all_to_all_single with uneven splits: this routing's exact rows per destination (dynamic-mode row bytes)."""
    args, me, device = run.args, run.parallel.ep_rank, run.parallel.device
    _, _, ids = routing(num_tokens, args, me, device, run.dtype)
    matrix = run.count_matrix(ids)
    sent, received = matrix[me], [row[me] for row in matrix]
    row_bytes = row_layout(args.hidden, args.top_k, run.dtype)[1]
    hidden_bytes = args.hidden * run.dtype.itemsize
    dispatch = run.plain.uneven([n * row_bytes for n in sent], [n * row_bytes for n in received])
    combine = run.plain.uneven([n * hidden_bytes for n in received], [n * hidden_bytes for n in sent])
    dispatch_us, combine_us = run.timer([dispatch, combine])
    world = len(matrix)  # remote bytes of the rank that sends the most (dispatch), and gets the most back (combine)
    dispatch_bytes = max(sum(matrix[r]) - matrix[r][r] for r in range(world)) * row_bytes
    combine_bytes = max(sum(row[r] for row in matrix) - matrix[r][r] for r in range(world)) * hidden_bytes
    return dict(backend="nccl_exact", mode="uneven", tokens=num_tokens, dispatch_bytes=dispatch_bytes,
                combine_bytes=combine_bytes, dispatch_us=dispatch_us, combine_us=combine_us,
                total_us=dispatch_us + combine_us, dispatch_gbps=gbps(dispatch_bytes, dispatch_us),
                combine_gbps=gbps(combine_bytes, combine_us))


def bench_backend(name: str, num_tokens: int, run: Run) -> list[dict[str, Any]]:
    stats = ExpertStats(1, run.args.experts, run.parallel.device)  # the engine's backends always carry one
    backend = build(name, run, stats)
    if name != "sparse_exact":
        return _bench_backend(name, backend, stats, num_tokens, run)
    with backend.exact():  # the dynamic exact-rows mode at every T, as prefills and overflow re-runs use it
        return _bench_backend(name, backend, stats, num_tokens, run)


def _bench_backend(name: str, backend: Any, stats: ExpertStats, num_tokens: int, run: Run) -> list[dict[str, Any]]:
    args, parallel = run.args, run.parallel
    hidden, weights, ids = routing(num_tokens, args, parallel.ep_rank, parallel.device, run.dtype)
    static = name in ("sparse", "sparse_fp8") and num_tokens <= backend.static_max_tokens
    # what comes back is the input as the FP8 dispatch rounds it (per token and 128-channel group)
    x_ref = dequantize_rows(*quantize_rows(hidden), hidden.dtype) if backend.fp8_dispatch else hidden
    mode = ("static" if static else "dynamic") if isinstance(backend, SparseBackend) else "fixed"
    slots = backend.slots(num_tokens, args.top_k) if static else num_tokens

    # one accounting pass: the backend's own byte counters, read around dispatch and around combine
    before = stats.all2all[2].item()
    h_recv, w_recv, i_recv, handle = backend.dispatch(hidden, weights, ids)
    mid = stats.all2all[2].item()
    out = backend.combine(weighted_identity(h_recv, w_recv, i_recv), handle)
    dispatch_bytes, combine_bytes = mid - before, stats.all2all[2].item() - mid
    overflow = static and backend.overflowed(num_tokens)
    if overflow:  # as the model runner: every rank re-runs the step with exact rows (all agree, no collective)
        with backend.exact():
            h_recv, w_recv, i_recv, handle = backend.dispatch(hidden, weights, ids)
            out = backend.combine(weighted_identity(h_recv, w_recv, i_recv), handle)
    if args.check:
        check_pass(f"{name} {mode} T={num_tokens}", backend, mode, x_ref, weights, ids, out,
                   (dispatch_bytes, combine_bytes), slots, run)

    # the slowest rank sets the pace: bytes (and times) are the max over ranks; the even splits need one size
    dispatch_bytes, combine_bytes = run.max_over_ranks([dispatch_bytes, combine_bytes])
    state: dict[str, Any] = {}

    def dispatch() -> None:
        state["d"] = backend.dispatch(hidden, weights, ids)

    def combine() -> None:
        h, _, _, handle = state.pop("d")
        state["out"] = backend.combine(h, handle)  # identity expert: out_recv = hidden_recv

    dispatch_us, combine_us = run.timer([dispatch, combine])
    even_d_us, even_c_us = run.timer([run.plain.even(dispatch_bytes), run.plain.even(combine_bytes)])
    row = dict(backend=name, mode=mode, tokens=num_tokens, slots=slots, overflow=overflow,
               dispatch_bytes=dispatch_bytes, combine_bytes=combine_bytes, dispatch_us=dispatch_us,
               combine_us=combine_us, total_us=dispatch_us + combine_us,
               dispatch_gbps=gbps(dispatch_bytes, dispatch_us), combine_gbps=gbps(combine_bytes, combine_us),
               nccl_even_dispatch_us=even_d_us, nccl_even_combine_us=even_c_us,
               nccl_even_dispatch_gbps=gbps(dispatch_bytes, even_d_us),
               nccl_even_combine_gbps=gbps(combine_bytes, even_c_us))
    rows = [row]

    def settle() -> None:
        if parallel.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier(group=run.cpu_group)

    if args.host_profile:  # the same exchange's host time by Python function (every rank runs it, rank 0 prints)
        report = host_profile(lambda: (dispatch(), combine()), settle, args.reps)
        if parallel.rank == 0:
            print(f"all2all_dist host profile {name} T={num_tokens} ({args.reps} dispatch + combine, rank 0, by own "
                  f"time):\n{report}", flush=True)
    if args.host_cost:  # the host's side of the same exchange: wall, ops, syncs (the device idle at the start)
        cost = host_cost(lambda: (dispatch(), combine()), settle, args.reps)
        wall, own = run.max_over_ranks([round(cost["wall_us"] * 1e3), round(cost["own_us"] * 1e3)])
        rows.append(dict(row, backend=f"{name}_host", mode="host", total_us=wall / 1e3, own_us=own / 1e3,
                         **{k: v for k, v in cost.items() if k not in ("wall_us", "own_us")}))
    # the engine captures this exchange in its decode / mixed-step graphs: time it the same way
    if parallel.device.type == "cuda" and not args.no_graphs and num_tokens <= run.graph_max_tokens \
            and mode in ("static", "fixed"):
        torch.cuda.synchronize()
        graph = track_cuda_graph(torch.cuda.CUDAGraph())  # released before the NCCL teardown (pytorch#115388)
        with torch.cuda.graph(graph):
            dispatch()
            combine()
        (total_us,) = run.timer([graph.replay])
        if args.check and not overflow:  # identity experts: each token comes back once per rank it went to
            hits = torch.zeros(num_tokens, parallel.ep_size, dtype=torch.bool, device=hidden.device)
            hits.scatter_(1, ids.long() // (args.experts // parallel.ep_size), True)
            times = hits.sum(1, keepdim=True) if mode == "static" else parallel.ep_size
            if not torch.allclose(state["out"].float(), x_ref.float() * times, atol=3e-2, rtol=3e-2):
                run.errors.append(f"rank {parallel.rank}: {name} T={num_tokens}: graph replay output is wrong")
        total = dispatch_bytes + combine_bytes
        rows.append(dict(row, backend=f"{name}_graph", mode="graph", dispatch_us=None, combine_us=None,
                         total_us=total_us, dispatch_gbps=None, combine_gbps=None, total_gbps=gbps(total, total_us)))
        del graph
    return rows


def check_pass(where: str, backend: Any, mode: str, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor, got_bytes: tuple[int, int], slots: int, run: Run) -> None:
    """The backends' contract with a weighted identity expert, and the bytes the routing implies."""
    world, me, args = run.parallel.ep_size, run.parallel.ep_rank, run.args
    num_tokens, dtype = hidden.shape[0], hidden.dtype
    where = f"rank {me}: {where}"
    ref = hidden.float() * weights.sum(1, keepdim=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    if out.shape != hidden.shape or not torch.allclose(out.float(), ref, atol=tol, rtol=tol):
        err = (out.float() - ref).abs().max().item() if out.shape == hidden.shape else tuple(out.shape)
        run.errors.append(f"{where}: combine(dispatch(x)) != x * sum(weights), max err {err}")
    hidden_bytes = args.hidden * dtype.itemsize
    if mode == "fixed":  # chunks of min(T, capacity) rows to every rank
        chunk = min(num_tokens, backend.capacity)
        rows = -(-num_tokens // chunk) * chunk
        row_bytes = row_layout(args.hidden, args.top_k, dtype)[1]
        expected = ((world - 1) * rows * row_bytes, (world - 1) * rows * hidden_bytes)
    elif mode == "static":  # C slots per destination, flag word when C < T
        row_bytes = row_layout(args.hidden, args.top_k, dtype, backend.fp8_dispatch, flag=slots < num_tokens)[1]
        expected = ((world - 1) * slots * row_bytes, (world - 1) * slots * hidden_bytes)
    else:  # exact rows: what this rank routes to others, and what the others route to it
        matrix = run.count_matrix(ids)
        sent, received = matrix[me], [row[me] for row in matrix]
        expected = ((sum(sent) - sent[me]) * row_layout(args.hidden, args.top_k, dtype, backend.fp8_dispatch)[1],
                    (sum(received) - received[me]) * hidden_bytes)
    if got_bytes != expected:
        run.errors.append(f"{where}: bytes (dispatch, combine) = {got_bytes}, expected {expected}")


def print_row(row: dict[str, Any]) -> None:
    def part(label: str, num_bytes: int, us: float | None, even_us: float | None = None) -> str:
        text = f"{label} {num_bytes / 1e6:8.3f}MB {us or 0:9.1f}us {gbps(num_bytes, us) or 0:7.2f}GB/s"
        return text + (f" (nccl_even {gbps(num_bytes, even_us) or 0:7.2f}GB/s)" if even_us else "")

    head = f"all2all_dist {row['backend']:15s} {row['mode']:7s} T={row['tokens']:5d}"
    if row["mode"] == "host":
        syncs = " ".join(f"{k} {v}" for k, v in sorted(row["syncs"].items()))
        print(f"{head} host wall {row['total_us']:9.1f}us (collectives {row['collectives_us']:9.1f}us, rest "
              f"{row['own_us']:9.1f}us) ops {row['num_ops']} syncs {row['num_syncs']} ({syncs})", flush=True)
        top = ", ".join(f"{name} {us:.1f}" for name, us in list(row.get("op_us", {}).items())[:8])
        print(f"{head} host us by op (OpClock, its own cost included; sum {sum(row.get('op_us', {}).values()):.1f}"
              f"): {top}", flush=True)
        return
    if row["mode"] == "graph":
        body = part("dispatch+combine", row["dispatch_bytes"] + row["combine_bytes"], row["total_us"])
    else:
        body = (part("dispatch", row["dispatch_bytes"], row["dispatch_us"], row.get("nccl_even_dispatch_us")) + " | "
                + part("combine", row["combine_bytes"], row["combine_us"], row.get("nccl_even_combine_us")))
    slots = f" C={row['slots']}" if row["mode"] == "static" else ""
    print(f"{head}{slots} {body}{' OVERFLOW' if row.get('overflow') else ''}", flush=True)


def summary(rows: list[dict[str, Any]], args: argparse.Namespace, world: int) -> str:
    # per backend its largest T (graph rows stop at the static max)
    last = {row["backend"]: row for row in rows if row["mode"] != "host"}
    parts = [f"{b} T={r['tokens']} {r['total_us']:.0f}us" + (
        f" dispatch {r['dispatch_gbps'] or 0:.1f}GB/s combine {r['combine_gbps'] or 0:.1f}GB/s" if r["dispatch_us"]
        else f" {r['total_gbps'] or 0:.1f}GB/s") + (
        f" (nccl_even {r['nccl_even_dispatch_gbps'] or 0:.1f} / {r['nccl_even_combine_gbps'] or 0:.1f})"
        if r.get("nccl_even_dispatch_us") and r["dispatch_us"] else "") for b, r in last.items()]
    return (f"bench_all2all_dist summary: world={world} H={args.hidden} E={args.experts} k={args.top_k} "
            f"{args.dtype}; " + "; ".join(parts) + f"; rows in {args.out}")


def worker(args: argparse.Namespace) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world < 2:
        sys.exit("error: an all2all needs 2 or more ranks (torchrun --nproc-per-node 2, or --world 2)")
    if args.experts % world:
        sys.exit(f"error: --experts {args.experts} is not divisible by the {world} ranks")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device == "cuda"
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    # a rank that fails leaves the others in a collective: they give up after --timeout-s, not the default 10 min
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout_s),
                            device_id=device if cuda else None)
    group = dist.new_group(list(range(world)))  # the EP group, as init_parallel makes it
    cpu_group = dist.new_group(list(range(world)), backend="gloo") if cuda else group
    parallel = ParallelState(rank=rank, world_size=world, dp_rank=rank, dp_size=world, ep_rank=rank, ep_size=world,
                             device=device, ep_group=group, local_rank=local_rank)
    run = Run(args, parallel, cpu_group, Timer(device, cpu_group, args.reps, args.warmup), Plain(group, device, world))
    rows: list[dict[str, Any]] = []
    for num_tokens in args.token_list:
        new = [exact_row(num_tokens, run)]
        for name in args.backends.split(","):
            new += bench_backend(name, num_tokens, run)
        if rank == 0:
            for row in new:
                print_row(row)
        rows += new
    errors: list[list[str] | None] = [None] * world
    dist.all_gather_object(errors, run.errors, group=cpu_group)
    all_errors = [e for errs in errors for e in errs or []]
    if rank == 0:
        for e in all_errors:
            print(f"CHECK FAILED: {e}", flush=True)
        out = {"args": vars(args), "world": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "nccl": str(torch.cuda.nccl.version()) if cuda else None, "torch": torch.__version__,
               "check": ("failed" if all_errors else "ok") if args.check else None, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(summary(rows, args, world), flush=True)
    destroy_parallel()  # resets any graph still alive first: destroy_process_group hangs on captured NCCL otherwise
    return 1 if all_errors else 0


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True")  # every rank a client of main()'s store, as under torchrun
    if worker(args):
        sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", default="1,8,64,256,1024,4096", help="tokens per rank per step, comma-separated")
    p.add_argument("--hidden", type=int, default=2048)  # Qwen3-30B-A3B
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backends", default="sparse,allgather",
                   help="sparse, allgather, sparse_exact (sparse held in its dynamic exact-rows mode at every T), "
                        "sparse_fp8 (--all2all-fp8-dispatch)")
    p.add_argument("--capacity-factor", type=float, default=EngineConfig.all2all_capacity_factor,
                   help="--all2all-capacity-factor (sparse static mode)")
    p.add_argument("--static-max-tokens", type=int, default=None,
                   help="--all2all-static-max-tokens (default: the engine's, 2048 on cuda, 0 on the CPU)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rows")
    p.add_argument("--host-cost", action="store_true",
                   help="also the host's cost of each dispatch + combine: wall (no device sync), ops, host syncs")
    p.add_argument("--host-profile", action="store_true",
                   help="also cProfile the host's dispatch + combine (rank 0 prints the top functions by own time)")
    p.add_argument("--check", action="store_true", help="assert the round trip and the byte counts")
    p.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout")
    p.add_argument("--world", type=int, default=0, help="spawn this many ranks here (no torchrun)")
    p.add_argument("--out", default="benchmarks/results/all2all_dist.json")
    args = p.parse_args(argv)
    try:
        args.token_list = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if min(args.token_list) < 1:
        p.error("--tokens must be >= 1")
    unknown = set(args.backends.split(",")) - {"sparse", "sparse_exact", "sparse_fp8", "allgather"}
    if unknown:
        p.error(f"unknown --backends {','.join(sorted(unknown))}; available: sparse, sparse_exact, sparse_fp8, "
                f"allgather")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible; use --device cpu")
    return args


def main() -> None:
    args = parse_args()
    if args.world:
        import torch.multiprocessing as mp

        # the ranks' store lives here, on a port the kernel picked for it and this process holds (a port probed
        # free and closed could be taken, by any process's next connection, before rank 0 bound it)
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        try:
            mp.spawn(_spawned, args=(args.world, store.port, args), nprocs=args.world)
        except mp.ProcessExitedException as e:
            sys.exit(f"error: a rank failed: {e}")
        return
    if "RANK" not in os.environ:
        sys.exit("error: launch with torchrun --nproc-per-node N, or pass --world N")
    sys.exit(worker(args))


if __name__ == "__main__":
    main()
