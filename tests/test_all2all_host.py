"""The host's side of an eager (dynamic-mode) sparse dispatch + combine, as every MoE layer of a prefill above the
CUDA-graph sizes runs it under EP, on 2 gloo ranks: exactly one host read (the count matrix), nothing else that
makes the host wait for the device (uploads, data-dependent shapes), none in combine, and on the GPU path (the
Triton kernels, interpreted here) a fixed, short list of launches: 9 per dispatch + combine with 1 round."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from benchmarks.bench_all2all_hostcost import HostSyncs
from runtime.distributed.backends import create_backend
from runtime.distributed.expert_stats import ExpertStats
from runtime.distributed.parallel import ParallelState
from tests.test_all2all import TIMEOUT_S, free_port, spawn_ranks

# [T, H, E, k, capacity (rows per pair per round)]: one round; several rounds; a dummy rank (rank 1 routes nothing)
CASES = [(13, 40, 16, 4, 64, "random"), (29, 24, 8, 2, 6, "random"), (9, 24, 8, 3, 64, "dummy")]
# the GPU path of one dispatch + combine, in order (routing counted per layer: no step buffer at these sizes)
LAUNCHES = ["remainder", "index_add_", "triton:_route_exact_kernel", "allreduce_", "triton:_pack_kernel",
            "alltoall_base_", "triton:_unpack_kernel", "alltoall_base_", "triton:_combine_kernel"]


def _check(parallel: ParallelState, triton: bool) -> list[str]:
    from kernels.all2all import pack as all2all_pack
    from kernels.all2all import route as all2all_route

    rank, errors = parallel.ep_rank, []
    for num_tokens, hidden, experts, top_k, capacity, routing in CASES:
        stats = ExpertStats(1, experts, torch.device("cpu"))
        backend = create_backend("sparse", parallel, experts, capacity, stats)  # static max 0: always dynamic
        if triton:
            backend._route_exact_kernel, backend._pack_kernel, backend._unpack_kernel, backend._combine_kernel = (
                all2all_route.sparse_route_exact, all2all_pack.sparse_pack, all2all_pack.sparse_unpack,
                all2all_pack.sparse_combine)
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(num_tokens, hidden, generator=gen)
        weights, ids = torch.randn(num_tokens, experts, generator=gen).softmax(-1).topk(top_k, dim=-1)
        ids = ids.to(torch.int32)
        if routing == "dummy" and rank == 1:
            ids[:] = -1
        backend.combine(backend.dispatch(x, weights, ids)[0], backend.dispatch(x, weights, ids)[3])  # warm up
        with HostSyncs() as dispatched:
            h_recv, _, _, plan = backend.dispatch(x, weights, ids)
        with HostSyncs() as combined:
            backend.combine(h_recv, plan)
        where = f"rank {rank} {'triton' if triton else 'torch'} T={num_tokens} C={capacity} {routing}"
        if dispatched.sync_ops != ["reads:tolist"] or combined.sync_ops:
            errors.append(f"{where}: host syncs, dispatch {dispatched.sync_ops}, combine {combined.sync_ops}")
        num_rounds = len(plan.rounds)
        collectives = [op for op in dispatched.ops + combined.ops if op in ("allreduce_", "alltoall_base_")]
        if (num_rounds > 1) != (capacity < num_tokens) or collectives != ["allreduce_"] + ["alltoall_base_"] * (
                2 * num_rounds):
            errors.append(f"{where}: {num_rounds} rounds, collectives {collectives}")
        if not triton:  # the dynamic mode's host-int counters read as the static mode's device counters do
            errors += _same_pairs_as_static(parallel, x, weights, ids, experts, where)
        if triton:  # one all_to_all per round and direction, the rest as listed
            launches = [op for op in dispatched.ops + combined.ops if op != "alltoall_base_"]
            expected = [op for op in LAUNCHES if op != "alltoall_base_"
                        and (plan.num_rows_sent or op != "triton:_pack_kernel")]  # nothing to pack: no launch
            if launches != expected:
                errors.append(f"{where}: launches {dispatched.ops} + {combined.ops}")
    return errors


def _same_pairs_as_static(parallel: ParallelState, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                          experts: int, where: str) -> list[str]:
    """One dispatch + combine each way, fresh statistics: the (token, remote rank) pairs sent and received and
    the collectives, as read (stats.all2all, layer_traffic: device counters plus the host ints), agree between the
    dynamic mode (host ints) and the static mode with T slots (device counters: nothing can overflow)."""
    read = []
    for static_max in (0, x.shape[0]):
        stats = ExpertStats(1, experts, torch.device("cpu"))
        backend = create_backend("sparse", parallel, experts, x.shape[0], stats, static_max_tokens=static_max)
        h_recv, _, _, plan = backend.dispatch(x, weights, ids)
        backend.combine(h_recv, plan)
        read.append((stats.all2all[[0, 1, 4]].tolist(), int(stats.layer_traffic[0, 2]), stats.counters().tolist()))
    (dyn, dyn_layer, dyn_all), (sta, sta_layer, sta_all) = read
    # pairs equal; collectives: count all_reduce + 1 round + 1 back (dynamic), 1 + 1 (static)
    if dyn[:2] != sta[:2] or dyn_layer != sta_layer or dyn[2] != sta[2] + 1 or dyn_all[-6:-4] != sta_all[-6:-4]:
        return [f"{where}: dynamic counters {dyn} {dyn_layer} vs static {sta} {sta_layer}"]
    return []


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    parallel = ParallelState(rank=rank, world_size=world, dp_rank=rank, dp_size=world, ep_rank=rank,
                             ep_size=world, device=torch.device("cpu"), ep_group=group)
    errors = _check(parallel, triton=False) + _check(parallel, triton=True)
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(errors) if errors else "ok")
    dist.destroy_process_group()


def test_eager_dispatch_combine_reads_the_host_once() -> None:
    with tempfile.TemporaryDirectory() as d:
        ctx = spawn_ranks(_worker, (2, free_port(), d), 2, TIMEOUT_S, "all2all host-sync workers")
        for r in range(2):
            path = os.path.join(d, f"rank{r}.txt")
            assert os.path.exists(path), f"rank {r} crashed (exit code {ctx.processes[r].exitcode})"
            with open(path) as f:
                assert f.read() == "ok"


def test_host_sync_counter_sees_each_kind() -> None:
    """The counter itself: a read (tolist, item), an upload (a tensor from host data), data-dependent shapes
    (boolean mask, nonzero, repeat_interleave without output_size); ops that run no kernel are not ops."""
    x = torch.arange(6)
    with HostSyncs() as counted:
        x.tolist()
        int(x[1])
        torch.tensor([1, 2])
        torch.zeros(3)[0] = 5  # a scalar fill, no upload
        x[x > 2]
        x.nonzero()
        x.repeat_interleave(x)
        x.repeat_interleave(x, output_size=15)
        torch.empty(3)
    assert counted.syncs == {"reads": 2, "uploads": 1, "shapes": 3}, counted.sync_ops
    assert "empty" not in counted.ops and counted.ops.count("repeat_interleave") == 2


def _gpu_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import warnings

    from runtime.distributed.all2all_sparse import dequantize_rows, quantize_rows

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device)
    parallel = ParallelState(rank=rank, world_size=world, dp_rank=rank, dp_size=world, ep_rank=rank, ep_size=world,
                             device=device, ep_group=dist.new_group(list(range(world))))
    errors = []
    # capacity 100 at T = 513: about 510 rows per (source, destination) pair, 6 rounds each way
    for num_tokens, fp8, capacity in ((64, False, 8192), (513, False, 8192), (2048, False, 8192), (513, True, 8192),
                                      (513, True, 100)):
        stats = ExpertStats(1, 128, device)
        backend = create_backend("sparse", parallel, 128, capacity, stats, fp8_dispatch=fp8)  # dynamic at every T
        gen = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(num_tokens, 2048, generator=gen, device=device).bfloat16()
        weights, ids = torch.randn(num_tokens, 128, generator=gen, device=device).softmax(-1).topk(8, dim=-1)
        ids = ids.to(torch.int32)
        for _attempt in range(2):  # the first compiles the kernels
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    h_recv, w_recv, i_recv, plan = backend.dispatch(x, weights, ids)
                    num_dispatch = len(caught)
                    out_recv = (h_recv.float() * (w_recv * (i_recv >= 0)).sum(1, keepdim=True)).bfloat16()
                    num_expert = len(caught)
                    out = backend.combine(out_recv, plan)
                    num_combine = len(caught) - num_expert
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        where = f"rank {rank} T={num_tokens} fp8={fp8} C={capacity}"
        if (len(plan.rounds) > 1) != (capacity < num_tokens):
            errors.append(f"{where}: {len(plan.rounds)} rounds")
        if num_dispatch != 1 or num_combine != 0:
            errors.append(f"{where}: {num_dispatch} syncs in dispatch, {num_combine} in combine: "
                          f"{[str(w.message)[:80] for w in caught]}")
        x_ref = dequantize_rows(*quantize_rows(x), x.dtype) if fp8 else x
        ref = x_ref.float() * weights.sum(1, keepdim=True)
        if not torch.allclose(out.float(), ref, atol=3e-2, rtol=3e-2):
            errors.append(f"{where}: combine(dispatch(x)) != x * sum(weights)")
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(errors) if errors else "ok")
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_eager_dispatch_combine_syncs_once_on_gpus() -> None:
    """On 2 GPUs with NCCL, under torch's sync debug mode: one synchronizing CUDA operation per dispatch (the count
    matrix read), none in combine, at prefill sizes with the Triton kernels, bf16 and FP8 dispatch; the round trip
    through a weighted identity expert is right."""
    with tempfile.TemporaryDirectory() as d:
        ctx = spawn_ranks(_gpu_worker, (2, free_port(), d), 2, 180, "GPU all2all host-sync workers")
        for r in range(2):
            path = os.path.join(d, f"rank{r}.txt")
            assert os.path.exists(path), f"rank {r} crashed (exit code {ctx.processes[r].exitcode})"
            with open(path) as f:
                assert f.read() == "ok"


def test_host_profile_names_the_step_functions() -> None:
    # the report lists the Python functions a step spends its host time in, by their own time, and runs the
    # barrier around the profiled reps (every rank must, for the steps' collectives)
    from benchmarks.bench_all2all_hostcost import host_profile

    barriers = []

    def busy_route_step() -> None:
        sum(i * i for i in range(20000))

    report = host_profile(busy_route_step, lambda: barriers.append(1), reps=3)
    assert "busy_route_step" in report and "Ordered by: internal time" in report
    assert len(barriers) == 2
