"""EP dispatch -> local experts -> combine on 2 and 4 gloo ranks equals the single-rank reference."""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels.fused_moe import fused_experts_ref
from runtime.all2all import make_dispatcher
from runtime.expert_stats import ExpertStats
from runtime.parallel import ParallelState

TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, rank: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    w, ids = logits.softmax(-1).topk(top_k, dim=-1)
    wgen = torch.Generator().manual_seed(99)  # same expert weights on every rank
    w13 = (0.1 * torch.randn(num_experts, 2 * inter, hidden, generator=wgen)).to(dtype)
    w2 = (0.1 * torch.randn(num_experts, hidden, inter, generator=wgen)).to(dtype)
    return x, w.float(), ids.to(torch.int32), w13, w2


def _worker(rank: int, world: int, port: int, cases: list[tuple], result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    parallel = ParallelState(rank=rank, world_size=world, dp_rank=rank, dp_size=world, ep_rank=rank,
                             ep_size=world, device=torch.device("cpu"), ep_group=group)
    errors = []
    for num_tokens, hidden, inter, num_experts, top_k, capacity, dtype in cases:
        stats = ExpertStats(1, num_experts, torch.device("cpu"))
        disp = make_dispatcher("all_to_all_single", parallel, num_experts, capacity, stats)
        x, w, ids, w13, w2 = _inputs(num_tokens, hidden, inter, num_experts, top_k, rank, dtype)
        n_loc = num_experts // world
        lo = rank * n_loc
        h_recv, w_recv, ids_recv, handle = disp.dispatch(x, w, ids)
        assert int(ids_recv.max()) < n_loc
        out = disp.combine(fused_experts_ref(h_recv, w13[lo : lo + n_loc], w2[lo : lo + n_loc], w_recv, ids_recv),
                           handle)
        ref = fused_experts_ref(x, w13, w2, w, ids)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        if out.shape != ref.shape or not torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol):
            err = (out.float() - ref.float()).abs().max()
            errors.append(f"case {num_tokens, hidden, capacity, dtype}: max err {err}")
        # every (token, remote rank holding one of its experts) pair is counted once on each side
        sent = stats.all2all[:2].clone()
        dist.all_reduce(sent)
        if sent[0] != sent[1]:
            errors.append(f"tokens sent {sent[0]} != received {sent[1]}")
        expected = torch.zeros(num_experts, dtype=torch.int64).scatter_add_(
            0, ids.reshape(-1).long(), torch.ones(ids.numel(), dtype=torch.int64))
        if not torch.equal(stats.routed_tokens[0], expected):
            errors.append("routed token counts differ")
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(errors) if errors else "ok")
    dist.destroy_process_group()


def spawn_ranks(worker, args: tuple, world: int, timeout_s: float, what: str) -> mp.ProcessContext:
    """Starts worker(rank, *args) on `world` gloo ranks and waits; a hang fails the test instead of wedging it."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s  # one deadline for the group: a crashed rank strands the rest
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{what} hung for {timeout_s}s"
    return ctx


def _run(world: int, cases: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as d:
        ctx = spawn_ranks(_worker, (world, free_port(), cases, d), world, TIMEOUT_S, "all2all workers")
        for r in range(world):
            path = os.path.join(d, f"rank{r}.txt")
            assert os.path.exists(path), f"rank {r} crashed (exit code {ctx.processes[r].exitcode})"
            with open(path) as f:
                assert f.read() == "ok"


# (tokens, hidden, inter, experts, top_k, capacity, dtype); odd sizes, one chunked batch, one empty rank's share
CASES = [
    (13, 37, 11, 8, 2, 64, torch.float32),
    (29, 37, 11, 8, 3, 8, torch.float32),  # 4 chunks of 8
    (7, 19, 5, 4, 2, 3, torch.bfloat16),
    (1, 24, 8, 8, 8, 16, torch.float32),  # top_k == experts
]


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine_matches_single_rank(world: int) -> None:
    _run(world, CASES)
