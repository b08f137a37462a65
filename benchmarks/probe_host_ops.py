"""Probe: host microseconds per op (torch.empty, a view, an in-place add, a Triton launch) in a lone process and in
each of two torchrun ranks with NCCL and gloo groups up (session 8, the eager expert all2all's host cost).

  PYTHONPATH=. python3 benchmarks/probe_host_ops.py                                      (a lone process, GPU 0)
  PYTHONPATH=. python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/probe_host_ops.py   (2 GPUs)

On 2 H200s `bench_all2all_dist.py --host-cost` saw 70-200 us of host time per op inside the ranks, where the
single-process engine spends ~16 us per launch; this separates the rank setting from the exchange's own code.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


def probe(tag: str, reps: int = 2000) -> None:
    x = torch.zeros(64, device="cuda")
    ops = {"empty": lambda: torch.empty(64, device="cuda"), "view": lambda: x.view(8, 8), "add_": lambda: x.add_(1),
           "triton": lambda: _add_one[(1,)](x, 64, BLOCK=64)}
    for op in ops.values():  # compile, warm the caching allocator
        for _ in range(50):
            op()
    torch.cuda.synchronize()
    us = {}
    for name, op in ops.items():
        t0 = time.perf_counter()
        for _ in range(reps):
            op()
        us[name] = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize()
    print(f"{tag}: host us/op " + " ".join(f"{k}={v:.1f}" for k, v in us.items())
          + f" | cpus in affinity {len(os.sched_getaffinity(0))}, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    if "RANK" not in os.environ:
        torch.cuda.set_device(0)
        probe("lone process")
        return
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    probe(f"rank {rank} before init")
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60), device_id=torch.device("cuda", rank))
    cpu_group = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
    t = torch.ones(4, device="cuda")
    dist.all_reduce(t)
    dist.barrier(group=cpu_group)
    torch.cuda.synchronize()
    probe(f"rank {rank} with NCCL + gloo up")
    dist.barrier(group=cpu_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
