"""Expert all2all dispatch + combine on one GPU: the backends' own work next to a copy of the same bytes.

python benchmarks/bench_all2all.py [--out benchmarks/results/all2all_h200.json] [--ep 8] [--tokens 1,2,...,4096]

One rank of an EP group of --ep ranks, with the network replaced by a loopback: every all_to_all_single
becomes a device-to-device copy of its send buffer into its receive buffer (what the rank would put on the
wire, self-copy included), and the sparse backend's counts exchange returns symmetric traffic (each peer
sends this rank as many rows as it sends that peer). What is timed is therefore the pack, the index work,
the loopback copies and the combine's gather-sum (on CUDA the pack and the combine are the Triton kernels of
kernels/all2all/pack.py): the backend's own cost on top of the transport. Next to
it: one copy of the same number of bytes (the floor for moving them once through HBM), and the copy
bandwidth measured now. Routing: uniform random top-k. Steps up to --static-max-tokens run the sparse
backend's static (CUDA-graph) mode and are timed as graph replays; larger ones its dynamic mode (one host
read of the counts per call), timed eagerly. Backends: allgather; sparse (static blocks of T slots per
destination: allgather's bytes); sparse_cap (static blocks of C(T) slots, --capacity-factor: C/T of the
bytes; 'overflow' says whether this rank's own blocks overflowed, which would make the engine re-run the
step); sparse_fp8 (T slots, FP8 rows). Prints one line per row and 'bench_all2all summary' last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.distributed.all2all import AllGatherBackend  # noqa: E402
from runtime.distributed.all2all_sparse import SparseBackend, rank_hit_fraction  # noqa: E402
from runtime.distributed.parallel import ParallelState  # noqa: E402


class _Loopback:
    """Mixin: collectives become local copies; counts bytes that would leave the send buffers."""

    bytes_moved = 0

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        if fn is torch.distributed.all_to_all_single:
            recv, send = args
            recv.copy_(send)
            self.bytes_moved += send.numel() * send.element_size()

    def _count_matrix(self, counts: torch.Tensor) -> list[list[int]]:
        mine = counts[self.ep_rank].tolist()  # the real backend's one host read ([P, P], this rank's row set)
        matrix = [[0] * self.ep_size for _ in range(self.ep_size)]
        matrix[self.ep_rank] = list(mine)
        for src in range(self.ep_size):
            matrix[src][self.ep_rank] = mine[src]
        return matrix

    def _exchange(self, send: torch.Tensor) -> torch.Tensor:  # the allgather backend's collective
        self.bytes_moved += send.numel() * send.element_size()
        return send.clone()


class LoopbackSparse(_Loopback, SparseBackend):
    pass


class LoopbackAllGather(_Loopback, AllGatherBackend):
    pass


def timer(device: torch.device, graph: bool) -> Any:
    if device.type != "cuda":
        def cpu_time(fn: Any) -> float:
            fn()
            t0 = time.perf_counter()
            n = 5
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n * 1e6
        return cpu_time
    import triton.testing

    def cuda_time(fn: Any) -> float:
        torch.cuda.synchronize()
        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
        return triton.testing.do_bench(fn, rep=50, return_mode="median") * 1e3
    return cuda_time


def bench_row(backend: Any, num_tokens: int, args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, args.hidden, generator=gen, device=device).to(dtype)
    logits = torch.randn(num_tokens, args.experts, generator=gen, device=device)
    weights, ids = logits.softmax(-1).topk(args.top_k, dim=-1)
    ids = ids.to(torch.int32)

    def step() -> torch.Tensor:
        h, w, i, handle = backend.dispatch(hidden, weights, ids)
        return backend.combine(h, handle)  # the experts are out of the picture: out_recv = hidden_recv

    backend.bytes_moved = 0
    step()
    num_bytes = backend.bytes_moved
    static = isinstance(backend, SparseBackend) and num_tokens <= backend.static_max_tokens
    slots = backend.slots(num_tokens, args.top_k) if static else num_tokens
    overflow = static and backend.overflowed(num_tokens)  # loopback: only this rank's own flag comes back
    graph = static or isinstance(backend, AllGatherBackend)
    us = timer(device, graph)(step)
    src = torch.empty(max(num_bytes, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_us = timer(device, True)(lambda: dst.copy_(src))
    hit = torch.zeros(num_tokens, args.ep, dtype=torch.bool, device=device)
    hit.scatter_(1, (ids.long() // (args.experts // args.ep)), True)
    return {"tokens": num_tokens, "us": us, "bytes": num_bytes, "copy_us": copy_us, "slots": slots,
            "overflow": overflow,
            "mode": "static" if static else ("dynamic" if isinstance(backend, SparseBackend) else "fixed"),
            "copy_fraction": copy_us / us, "ranks_hit_mean": hit.sum(1).float().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/all2all_bench.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--ep", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)  # Qwen3-30B-A3B
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", default=",".join(str(1 << i) for i in range(13)))
    p.add_argument("--static-max-tokens", type=int, default=512, help="largest CUDA-graph batch (decode)")
    p.add_argument("--backends", default="allgather,sparse,sparse_cap,sparse_fp8")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="sparse_cap: --all2all-capacity-factor")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    parallel = ParallelState(rank=0, world_size=1, dp_rank=0, dp_size=1, ep_rank=0, ep_size=args.ep, device=device)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    for name in args.backends.split(","):
        for num_tokens in tokens:
            if name == "allgather":
                backend: Any = LoopbackAllGather(parallel, args.experts, max(tokens))
            else:
                backend = LoopbackSparse(parallel, args.experts, max(tokens), static_max_tokens=args.static_max_tokens,
                                         fp8_dispatch=name == "sparse_fp8",
                                         capacity_factor=args.capacity_factor if name == "sparse_cap" else 0.0)
            row = {"backend": name, **bench_row(backend, num_tokens, args, device, dtype)}
            rows.append(row)
            print(f"all2all {name:10s} T={num_tokens:5d} {row['mode']:7s} C={row['slots']:5d} us={row['us']:9.1f} "
                  f"MB={row['bytes'] / 1e6:8.3f} copy_us={row['copy_us']:8.1f} "
                  f"copy/ours={row['copy_fraction']:.2f} ranks_hit={row['ranks_hit_mean']:.2f}"
                  f"{' OVERFLOW' if row['overflow'] else ''}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    by = {(r["backend"], r["tokens"]): r for r in rows}
    big = max(tokens)
    parts = [f"{b} T={big} {by[(b, big)]['us']:.0f}us copy/ours={by[(b, big)]['copy_fraction']:.2f}"
             for b in args.backends.split(",") if (b, big) in by]
    static = [t for t in tokens if t <= args.static_max_tokens and ("sparse_cap", t) in by and ("allgather", t) in by]
    if static:  # the fixed-capacity exchange's bytes next to allgather's at the largest graph size
        t = max(static)
        cap, ag = by[("sparse_cap", t)], by[("allgather", t)]
        parts.append(f"sparse_cap T={t} C={cap['slots']} bytes/allgather={cap['bytes'] / ag['bytes']:.2f} "
                     f"(uniform hit fraction {rank_hit_fraction(args.experts, args.ep, args.top_k):.2f}) "
                     f"{cap['us']:.0f}us vs {ag['us']:.0f}us")
    print(f"bench_all2all summary: ep={args.ep} H={args.hidden} k={args.top_k}; " + "; ".join(parts)
          + f"; rows in {args.out}")


if __name__ == "__main__":
    main()
