"""EP dispatch -> local experts -> combine on 2 and 4 gloo ranks equals the single-rank reference, for both
backends, and the byte counters show the routing-aware saving."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels.fused_moe import fused_experts_ref
from runtime.config import ConfigError
from runtime.distributed.backends import create_backend
from runtime.distributed.expert_stats import ExpertStats
from runtime.distributed.parallel import ParallelState
from tests.ports import free_port, free_port_block  # noqa: F401  (the other gloo tests import them from here)

TIMEOUT_S = 60


def _inputs(case: dict, rank: int, world: int, dtype: torch.dtype):  # noqa: ANN202
    num_tokens, hidden, inter, num_experts, top_k = (case[k] for k in ("tokens", "hidden", "inter", "experts", "top_k"))
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    routing = case.get("routing", "random")
    if routing in ("skew", "skew_dummy"):  # every token of every rank to the last rank's experts
        logits[:, : num_experts - num_experts // world] -= 100.0
    w, ids = logits.softmax(-1).topk(top_k, dim=-1)
    ids = ids.to(torch.int32)
    if routing == "pad":  # the last third of the rows are padding (id -1), as the MoE layer masks them
        ids[num_tokens - num_tokens // 3 :] = -1
    if routing == "idle" or (routing in ("dummy", "skew_dummy") and rank == 1):  # rank 1 runs a dummy step
        ids[:] = -1
    wgen = torch.Generator().manual_seed(99)  # same expert weights on every rank
    w13 = (0.1 * torch.randn(num_experts, 2 * inter, hidden, generator=wgen)).to(dtype)
    w2 = (0.1 * torch.randn(num_experts, hidden, inter, generator=wgen)).to(dtype)
    return x, w.float(), ids, w13, w2


def _check_case(case: dict, parallel: ParallelState) -> list[str]:
    from runtime.distributed.all2all_sparse import dequantize_rows, quantize_rows

    rank, world = parallel.ep_rank, parallel.ep_size
    dtype = case.get("dtype", torch.float32)
    options = {k: case[k] for k in ("static_max_tokens", "fp8_dispatch", "capacity_factor") if k in case}
    stats = ExpertStats(1, case["experts"], torch.device("cpu"))
    disp = create_backend(case["backend"], parallel, case["experts"], case["capacity"], stats, **options)
    if case.get("triton"):  # the GPU's kernels (Triton interpreter here) instead of their torch references
        from kernels.all2all import pack as all2all_pack
        from kernels.all2all import route as all2all_route

        disp._route_kernel, disp._pack_kernel, disp._unpack_kernel, disp._combine_kernel, disp._pairs_kernel = (
            all2all_route.sparse_route, all2all_pack.sparse_pack, all2all_pack.sparse_unpack,
            all2all_pack.sparse_combine, all2all_pack.exchange_pairs)
        disp._route_exact_kernel = all2all_route.sparse_route_exact  # the dynamic mode's layout (and its rounds)
    x, w, ids, w13, w2 = _inputs(case, rank, world, dtype)
    n_loc = case["experts"] // world
    lo = rank * n_loc
    errors = []

    def step() -> torch.Tensor:
        h_recv, w_recv, ids_recv, handle = disp.dispatch(x, w, ids)
        if ids_recv.numel() and int(ids_recv.max()) >= n_loc:
            errors.append("local id out of range")
        return disp.combine(fused_experts_ref(h_recv, w13[lo : lo + n_loc], w2[lo : lo + n_loc], w_recv, ids_recv),
                            handle)

    out = step()
    # as the model runner does after a step: a fixed-capacity exchange that overflowed on any rank is re-run
    # exactly on every rank (each rank must reach the same verdict on its own, without a collective)
    overflowed = hasattr(disp, "overflowed") and disp.overflowed(case["tokens"])
    if overflowed:
        with disp.exact():
            out = step()
    verdicts = torch.tensor([int(overflowed), -int(overflowed)])
    dist.all_reduce(verdicts, op=dist.ReduceOp.MAX, group=parallel.ep_group)
    if verdicts[0] != -verdicts[1]:
        errors.append(f"case {case}: the ranks disagree on the overflow")
    if "overflow" in case and overflowed != case["overflow"]:
        errors.append(f"case {case}: overflow {overflowed}, expected {case['overflow']}")
    x_ref = x
    if case.get("fp8_dispatch"):  # compare with the same per-token FP8 rounding of the input rows
        # the Triton pack quantizes as kernels/fp8.py's Triton kernel does (here both interpreted, whose e4m3
        # rounding differs from torch's in places; on a GPU they agree)
        from kernels.fp8 import per_token_group_quant

        q_scales = per_token_group_quant(x, 128) if case.get("triton") else quantize_rows(x)
        x_ref = dequantize_rows(*q_scales, dtype)
    ref = fused_experts_ref(x_ref, w13, w2, w, ids)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if out.shape != ref.shape or not torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol):
        err = (out.float() - ref.float()).abs().max()
        errors.append(f"case {case}: max err {err}")
    # every (token, remote rank holding one of its experts) pair is counted once on each side
    counters = torch.cat([stats.all2all, stats.layer_traffic[0, :2]])
    dist.all_reduce(counters, group=parallel.ep_group)
    tokens_sent, tokens_received, bytes_sent, bytes_received, collectives, overflow_pairs, layer_sent, \
        layer_allgather = counters.tolist()
    if (overflow_pairs > 0) != overflowed or stats.num_overflow_reruns != int(overflowed):
        errors.append(f"case {case}: {overflow_pairs} pairs over capacity, {stats.num_overflow_reruns} re-runs")
    if case.get("routing") == "idle" and case["backend"] == "sparse" and collectives != world:
        errors.append(f"an idle step ran {collectives} collectives over {world} ranks, not just the counts")
    if tokens_sent != tokens_received or bytes_sent != bytes_received or layer_sent != bytes_sent:
        errors.append(f"counters disagree: {counters.tolist()}")
    if case["backend"] == "allgather" and case["capacity"] >= case["tokens"] and layer_sent != layer_allgather:
        errors.append(f"allgather bytes {layer_sent} != its allgather-equivalent {layer_allgather}")
    if case["backend"] == "sparse" and not case.get("static_max_tokens"):
        # routing-aware: bytes <= allgather's x the mean fraction of remote ranks a token needs
        fraction = tokens_sent / ((world - 1) * case["tokens"] * world)
        if layer_sent > layer_allgather * fraction:
            errors.append(f"sparse moved {layer_sent} B > allgather {layer_allgather} B x {fraction:.3f}")
    if case.get("capacity_factor") and not overflowed:
        errors += _check_capacity_bytes(case, world, dtype, layer_sent, layer_allgather)
    valid = ids.reshape(-1) >= 0
    expected = torch.zeros(case["experts"], dtype=torch.int64).scatter_add_(
        0, ids.reshape(-1).long().clamp(min=0), valid.long())
    if not torch.equal(stats.routed_tokens[0], expected):
        errors.append("routed token counts differ")
    return errors


def _check_capacity_bytes(case: dict, world: int, dtype: torch.dtype, layer_sent: int,
                          layer_allgather: int) -> list[str]:
    """Fixed capacity, no overflow: every rank sent C < T rows to each remote rank and got C back: exactly
    allgather's bytes x C / T (x the sparse row's size over allgather's, which carries no flag word)."""
    from runtime.distributed.all2all import row_layout
    from runtime.distributed.all2all_sparse import capacity_slots

    num_tokens, hidden, experts, top_k = (case[k] for k in ("tokens", "hidden", "experts", "top_k"))
    cap = capacity_slots(num_tokens, experts, world, top_k, case["capacity_factor"])
    sparse_row = row_layout(hidden, top_k, dtype, case.get("fp8_dispatch", False), flag=True)[1]
    ag_row = row_layout(hidden, top_k, dtype)[1]
    reply = hidden * dtype.itemsize
    errors = []
    if cap >= num_tokens or layer_sent != world * (world - 1) * cap * (sparse_row + reply):
        errors.append(f"case {case}: {layer_sent} B sent, capacity {cap} of {num_tokens}")
    if layer_sent * num_tokens * (ag_row + reply) != layer_allgather * cap * (sparse_row + reply):
        errors.append(f"case {case}: {layer_sent} B is not allgather's {layer_allgather} B x {cap} / {num_tokens}")
    return errors


def _worker(rank: int, world: int, port: int, cases: list[dict], result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    parallel = ParallelState(rank=rank, world_size=world, dp_rank=rank, dp_size=world, ep_rank=rank,
                             ep_size=world, device=torch.device("cpu"), ep_group=group)
    errors = [e for case in cases for e in _check_case(case, parallel)]
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(errors) if errors else "ok")
    dist.destroy_process_group()


def _traced(rank: int, worker, dump_after_s: float, *args) -> None:  # noqa: ANN001
    # a hung rank says where it hangs: before the test's deadline, and when killed from outside (an outer timeout)
    faulthandler.dump_traceback_later(dump_after_s, exit=False)
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    try:
        worker(rank, *args)
    except BaseException:  # torch's spawn wrapper only queues the traceback for a join() the tests do not call
        traceback.print_exc()
        sys.stderr.flush()
        raise


def spawn_ranks(worker, args: tuple, world: int, timeout_s: float, what: str) -> mp.ProcessContext:
    """Starts worker(rank, *args) on `world` ranks and waits; a hang fails the test instead of wedging it, and
    every rank still alive shortly before the deadline prints its Python stacks to stderr."""
    ctx = mp.start_processes(_traced, args=(worker, max(1.0, timeout_s - 5), *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s  # one deadline for the group: a crashed rank strands the rest
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{what} hung for {timeout_s}s"
    return ctx


def spawn_ranks_json(worker, make_args: Callable[[str], tuple], world: int, timeout_s: float,
                     what: str) -> list[dict]:
    """spawn_ranks with a results folder: worker(rank, *make_args(folder)) writes folder/rank{rank}.json; the
    ranks' results in rank order (a rank that wrote none crashed: its exit code is in the failure)."""
    with tempfile.TemporaryDirectory() as d:
        ctx = spawn_ranks(worker, make_args(d), world, timeout_s, what)
        results = []
        for r in range(world):
            path = os.path.join(d, f"rank{r}.json")
            assert os.path.exists(path), f"rank {r} crashed (exit code {ctx.processes[r].exitcode})"
            with open(path) as f:
                results.append(json.load(f))
    return results


def _run(world: int, cases: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as d:
        ctx = spawn_ranks(_worker, (world, free_port(), cases, d), world, TIMEOUT_S, "all2all workers")
        for r in range(world):
            path = os.path.join(d, f"rank{r}.txt")
            assert os.path.exists(path), f"rank {r} crashed (exit code {ctx.processes[r].exitcode})"
            with open(path) as f:
                assert f.read() == "ok"


def _case(backend: str, tokens: int, hidden: int, inter: int, experts: int, top_k: int, capacity: int,
          **extra: object) -> dict:
    return dict(backend=backend, tokens=tokens, hidden=hidden, inter=inter, experts=experts, top_k=top_k,
                capacity=capacity, **extra)


# odd sizes; chunked / several rounds (capacity below the rows a pair carries); padding rows; a dummy rank;
# skewed routing; the graph-safe static mode; FP8 dispatch; top_k == experts
CASES = [
    _case("allgather", 13, 37, 11, 8, 2, 64),
    _case("allgather", 29, 37, 11, 8, 3, 8),  # 4 chunks of 8
    _case("allgather", 7, 19, 5, 4, 2, 3, dtype=torch.bfloat16),
    _case("allgather", 9, 24, 8, 8, 8, 16, routing="dummy"),
    _case("sparse", 13, 37, 11, 8, 2, 64),
    _case("sparse", 29, 37, 11, 8, 3, 4),  # capacity overflow: up to 8 rounds
    _case("sparse", 7, 19, 5, 4, 2, 3, dtype=torch.bfloat16),
    _case("sparse", 17, 24, 8, 8, 2, 5, routing="skew"),  # one rank takes every token: 4 rounds
    _case("sparse", 12, 24, 8, 8, 3, 64, routing="pad"),
    _case("sparse", 9, 24, 8, 8, 8, 16, routing="dummy"),  # top_k == experts; rank 1 sends nothing
    _case("sparse", 5, 24, 8, 8, 2, 64, routing="idle"),  # every rank idle: no payload collective at all
    _case("sparse", 11, 37, 11, 8, 2, 64, static_max_tokens=16),  # static: equal splits, no counts
    _case("sparse", 11, 24, 8, 8, 2, 64, static_max_tokens=16, routing="dummy"),
    _case("sparse", 13, 40, 11, 8, 2, 64, fp8_dispatch=True),
    _case("sparse", 6, 40, 11, 8, 2, 64, fp8_dispatch=True, static_max_tokens=8, dtype=torch.bfloat16),
    _case("sparse", 10, 37, 11, 8, 3, 64, static_max_tokens=16, triton=True, routing="pad"),
    _case("sparse", 19, 40, 11, 8, 2, 4, fp8_dispatch=True, triton=True, dtype=torch.float16),
    # fixed capacity (the graph path): C < T slots per destination; random routing fits, skew overflows and
    # is re-run exactly, also with a dummy rank (which sends nothing but joins the re-run) and in Triton
    _case("sparse", 64, 37, 11, 16, 1, 64, static_max_tokens=64, capacity_factor=1.0, overflow=False),
    _case("sparse", 64, 40, 11, 16, 1, 64, static_max_tokens=64, capacity_factor=1.0, overflow=False,
          fp8_dispatch=True, dtype=torch.bfloat16),
    _case("sparse", 24, 24, 8, 8, 2, 64, static_max_tokens=32, capacity_factor=0.5, routing="skew", overflow=True),
    _case("sparse", 24, 24, 8, 8, 2, 64, static_max_tokens=32, capacity_factor=0.5, routing="skew_dummy",
          overflow=True),
    _case("sparse", 12, 40, 11, 8, 2, 4, static_max_tokens=16, capacity_factor=0.5, routing="skew", overflow=True,
          triton=True, fp8_dispatch=True, dtype=torch.float16),
]


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine_matches_single_rank(world: int) -> None:
    _run(world, CASES)


def test_registry_and_config_names() -> None:
    from runtime.config import ALL2ALL_BACKENDS
    from runtime.distributed.backends import BACKENDS

    assert sorted(BACKENDS) == sorted(ALL2ALL_BACKENDS)
    parallel = ParallelState(rank=0, world_size=2, dp_rank=0, dp_size=2, ep_rank=0, ep_size=2,
                             device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown --all2all-backend 'pplx'; available: allgather, sparse"):
        create_backend("pplx", parallel, 8, 16)


def test_unknown_backend_fails_fast_before_any_load() -> None:
    import subprocess
    import sys

    from runtime.config import EngineConfig

    for name in ("pplx", "deepep_low_latency"):
        proc = subprocess.run([sys.executable, "-m", "runtime.serve", "--device", "cpu", "--data-parallel-size", "2",
                               "--enable-expert-parallel", "--all2all-backend", name],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"error: unknown --all2all-backend {name!r}; available: allgather, sparse"]
    with pytest.raises(ConfigError, match="needs --all2all-backend sparse"):
        EngineConfig(all2all_backend="allgather", all2all_fp8_dispatch=True)
    assert EngineConfig(all2all_backend="sparse", all2all_fp8_dispatch=True).all2all_fp8_dispatch


def test_bytes_reach_metrics() -> None:
    import zmq

    from runtime.cluster.coordinator import Coordinator, CoordinatorSpec
    from runtime.messages import Addresses, ExpertStatsSnapshot, RankStats, StatsReport
    from server.metrics import Metrics

    with tempfile.TemporaryDirectory() as d:
        coord = Coordinator(CoordinatorSpec(num_ranks=2, lockstep=True), Addresses.ipc(d, 2), zmq.Context())
        try:
            for r in range(2):
                expert = ExpertStatsSnapshot(rank=r, routed_tokens=[], all2all_bytes_sent=100 * (r + 1),
                                             all2all_layer_bytes_sent=[60 * (r + 1), 40 * (r + 1)],
                                             all2all_layer_allgather_bytes=[300, 200], all2all_overflow_reruns=3 * r)
                coord.handle(StatsReport(stats=RankStats(r, 0, 0, 0.0, 0, 0, 0, 0), expert=expert, first=True))
            stats = coord.cluster_stats()
        finally:
            coord.ctx.destroy(linger=0)
    assert stats.all2all_bytes_sent == [100, 200] and stats.all2all_allgather_bytes == [500, 500]
    assert stats.all2all_overflow_reruns == [0, 3]
    metrics = Metrics("m")
    metrics.cluster.update(stats)
    text = metrics.render().decode()
    assert 'moe_all2all_bytes_sent_total{rank="1"} 200.0' in text
    assert 'moe_all2all_allgather_equivalent_bytes_total{rank="0"} 500.0' in text
    assert 'moe_all2all_overflow_reruns_total{rank="1"} 3.0' in text


def test_fp8_dispatch_is_lossless_for_fp8_experts() -> None:
    """The dispatch's FP8 rounding (per token, 128-channel groups) is the one the FP8 experts apply to their
    input anyway: with --quantization fp8 the FP8 payload changes no output bit."""
    from kernels.fp8 import quantize_weight_block
    from runtime.distributed.all2all_sparse import dequantize_rows, quantize_rows

    gen = torch.Generator().manual_seed(0)
    num_tokens, hidden, inter, num_experts = 9, 200, 64, 4  # 200: a partial last group
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16()
    w, ids = torch.randn(num_tokens, num_experts, generator=gen).softmax(-1).topk(2, dim=-1)
    w13, w13_scale = quantize_weight_block(torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5)
    w2, w2_scale = quantize_weight_block(torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5)
    ids = ids.to(torch.int32)
    plain = fused_experts_ref(x, w13, w2, w, ids, w13_scale=w13_scale, w2_scale=w2_scale)
    x8 = dequantize_rows(*quantize_rows(x), torch.bfloat16)
    assert not torch.equal(x8, x)
    assert torch.equal(fused_experts_ref(x8, w13, w2, w, ids, w13_scale=w13_scale, w2_scale=w2_scale), plain)


def test_capacity_slots_cover_uniform_routing() -> None:
    """The static slots: the hit fraction f is what uniform top-k routing gives, the slots (factor 1: mean + 4 sd)
    hold every block of 400 random steps, C <= T, factor 0 = T, and bad flags are one-line errors."""
    from runtime.config import EngineConfig
    from runtime.distributed.all2all_sparse import capacity_slots, rank_hit_fraction

    num_experts, num_ranks, top_k, num_tokens = 128, 8, 8, 256
    gen = torch.Generator().manual_seed(0)
    ids = torch.rand(400, num_tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices  # [steps, T, k]
    hit = torch.zeros(400, num_tokens, num_ranks, dtype=torch.bool).scatter_(2, ids // (num_experts // num_ranks), True)
    per_block = hit.sum(1)  # [steps, P] rows one source sends one destination
    f = rank_hit_fraction(num_experts, num_ranks, top_k)
    assert abs(per_block.float().mean().item() / num_tokens - f) < 0.01 and abs(f - 0.667) < 0.001
    cap = capacity_slots(num_tokens, num_experts, num_ranks, top_k, 1.0)
    assert cap < num_tokens and int(per_block.max()) <= cap
    assert capacity_slots(num_tokens, num_experts, num_ranks, top_k, 1.1) > cap
    # factor 1.25 would keep 252 of 256 slots: not worth an overflow check, no limit
    assert capacity_slots(num_tokens, num_experts, num_ranks, top_k, 1.25) == num_tokens
    assert capacity_slots(num_tokens, num_experts, num_ranks, top_k, 0.0) == num_tokens
    assert all(1 <= capacity_slots(t, 8, 4, 2, 0.01) <= t for t in range(1, 40))
    with pytest.raises(ConfigError, match="--all2all-capacity-factor must be >= 0"):
        EngineConfig(all2all_capacity_factor=-1.0)
    with pytest.raises(ConfigError, match="--all2all-static-max-tokens must be >= 0"):
        EngineConfig(all2all_static_max_tokens=-1)


class _Ops:
    """Records the aten ops (kernels, on a GPU) run inside it; views are free."""

    def __new__(cls) -> Any:
        from torch.utils._python_dispatch import TorchDispatchMode

        class Ops(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.ops: list[str] = []

            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if not func.is_view:
                    self.ops.append(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        return Ops()


def test_routed_token_counts_per_layer_without_a_step_buffer() -> None:
    """Without a step buffer (max_tokens 0, or a step larger than it) each MoE layer's routing is counted where it
    is recorded: padding rows (id -1) count nowhere, int32 and int64 ids alike, in two kernels (remainder,
    index_add) rather than five."""
    from runtime.distributed.expert_stats import ExpertStats

    stats = ExpertStats(num_moe_layers=2, num_experts=6, device=torch.device("cpu"))
    ids = torch.tensor([[0, 5], [-1, -1], [5, 2], [3, -1]], dtype=torch.int32)  # [T, k], a padding row
    for layer_ids in (ids, ids.long()):
        kernels = _Ops()
        with kernels:
            stats.record_routing(layer_ids)
        assert kernels.ops == ["aten.remainder", "aten.index_add_"]
    assert stats.routed_tokens.tolist() == [[1, 0, 1, 1, 0, 2], [1, 0, 1, 1, 0, 2]]
    assert stats.counters().tolist()[:12] == [1, 0, 1, 1, 0, 2] * 2  # the snapshot leaves the padding out


def test_exchange_counters_take_one_launch_per_exchange() -> None:
    """A served EP rank records each exchange's traffic inside the forward (in the decode graphs): the host-int
    part (bytes, collectives, the allgather-equivalent) is one row add of a cached device row, device token counts
    one more; the per-layer and total views keep their meaning (before: two kernels per counter, ~30 per layer)."""
    from runtime.distributed.expert_stats import ExpertStats

    stats = ExpertStats(num_moe_layers=2, num_experts=4, device=torch.device("cpu"))
    stats.record_exchange(1, 3, 5, 100, 80, 400, 2)  # the dynamic mode: host ints (the first: makes the row)
    kernels = _Ops()
    with kernels:
        stats.record_exchange(1, 3, 5, 100, 80, 400, 2)  # the same values again: the cached row
    assert kernels.ops == ["aten.add_"]
    kernels = _Ops()
    with kernels:
        stats.record_exchange(0, torch.tensor(7), torch.tensor(6), 64, 64, 256)  # a static exchange
    assert kernels.ops.count("aten.add_") == 2 and len(kernels.ops) <= 4, kernels.ops
    stats.record_overflow(0, torch.tensor(2))
    stats.pair_counters(1).add_(torch.tensor([1, 1]))  # where the sparse backend's kernel adds its pairs
    assert stats.all2all.tolist() == [3 + 3 + 7 + 1, 5 + 5 + 6 + 1, 264, 224, 5, 2]
    assert stats.layer_traffic.tolist() == [[64, 256, 7], [200, 800, 7]]
    assert stats.counters().tolist()[-(2 * 3 + 6):] == [64, 256, 7, 200, 800, 7, 14, 17, 264, 224, 5, 2]


def test_routed_token_counts_once_per_step_from_the_step_buffer() -> None:
    """A served rank (max_tokens > 0): each MoE layer's ids go to a step buffer, the fused router writes them there
    itself (then the layer runs no kernel), and the last MoE layer counts the whole step in three kernels. Counts
    equal the per-layer path's, over steps of different sizes (stale rows of a larger earlier step count nowhere),
    a re-run step and a step too large for the buffer."""
    from kernels.router_fused import route_fused
    from runtime.distributed.expert_stats import ExpertStats

    layers, experts, k = 3, 6, 2
    gen = torch.Generator().manual_seed(0)
    buffered = ExpertStats(layers, experts, torch.device("cpu"), max_tokens=5)
    direct = ExpertStats(layers, experts, torch.device("cpu"))
    for num_tokens in (5, 2, 7, 3):
        for stats in (buffered, direct):
            stats.begin_step(), stats.end_step(None)
        for layer in range(layers):
            ids = torch.randint(-1, experts, (num_tokens, k), generator=gen, dtype=torch.int32)
            ids[0] = -1  # a padding row
            out = buffered.routing_ids_out(num_tokens, k)
            assert (out is None) is (num_tokens > 5)
            if out is not None and layer % 2 == 0:  # as the router does: written in place, nothing to move
                out.copy_(ids)
                ids = out
            given = ids.long() if layer == 1 else ids  # the torch router's int64 ids
            kernels = _Ops()
            with kernels:
                assert buffered.record_routing(given) == layer
            direct.record_routing(ids.clone())
            if num_tokens > 5:
                assert kernels.ops == ["aten.remainder", "aten.index_add_"]
            else:
                moved = [] if layer % 2 == 0 else ["aten.copy_"]
                counted = ["aten.remainder", "aten.add", "aten.index_add_"] if layer == layers - 1 else []
                assert kernels.ops == moved + counted, (layer, kernels.ops)
        assert torch.equal(buffered.routed_tokens, direct.routed_tokens), num_tokens
    # a step re-run (a static exchange overflowed): its first pass is taken back, the re-run counts
    before = buffered.routed_tokens.clone()
    ids = torch.randint(0, experts, (4, k), generator=gen, dtype=torch.int32)
    for attempt in range(2):
        buffered.begin_step()
        for _layer in range(layers):
            buffered.record_routing(ids, checkpoint=True)
        if attempt == 0:
            buffered.rerun_step()
    want = before + torch.stack([torch.bincount(ids.flatten().long(), minlength=experts)] * layers)
    assert torch.equal(buffered.routed_tokens, want)
    # the fused router (interpreter) writes its ids into the given buffer and returns it
    x, w = torch.randn(3, 64, generator=gen), torch.randn(experts, 64, generator=gen)
    out = buffered.routing_ids_out(3, k)
    weights, got = route_fused(x, w, k, True, ids_out=out)
    assert got is out and torch.equal(got, route_fused(x, w, k, True)[1])
    with pytest.raises(ValueError, match="ids_out must be a contiguous int32"):
        route_fused(x, w, k, True, ids_out=torch.empty(3, k, dtype=torch.int64))
