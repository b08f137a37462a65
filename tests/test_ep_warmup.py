"""The local experts' start-up warmup under expert parallelism (runtime/engine/expert_warmup.py).

Under EP the experts run on the rows the all2all delivered, 0 .. the dispatcher's max_received_rows(T) whatever
the step's T; the collective warmup (ModelRunner.warmup: every row padding, slot -1, routed nowhere) reaches only
the static exchanges' ep x C(T) counts, and none in the dynamic mode (0 rows arrive). Checked here:
- the bound of each backend (sparse, allgather's padded chunks, EP x TP's share, none without EP), and that a
  real dispatch on 2 gloo ranks with every token routed to rank 0 delivers exactly that many rows;
- every received-row count from 1 to the bound (0 launches nothing) lands in a (BLOCK_M, align plan) variant the
  local warmup's counts reach, for the default config and every checked-in table (the walk of
  tests/test_kernels_moe.py over align_plan);
- the warmup calls the experts' entry point at those counts, once per layer shape, on dummy received rows, within
  the memory plan's activation reserve (a smaller reserve bounds it, and says so), with no collective: on 2 gloo
  ranks (DP=2 x EP=2 with either backend, TP=2 x EP=2) only rank 0 warms, and nothing waits for rank 1. DP
  without EP has nothing to warm.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kernels.moe_config import config_edges, default_config, get_moe_config
from kernels.moe_plan import warmup_token_counts
from runtime.distributed.all2all import AllGatherBackend, LocalBackend
from runtime.distributed.all2all_sparse import SparseBackend
from runtime.distributed.parallel import ParallelState
from tests.test_all2all import free_port, spawn_ranks_json
from tests.test_dummy_step import COLLECTIVES
from tests.test_kernels_moe import _align_variants, _moe_tables

TIMEOUT_S = 90
CPU = torch.device("cpu")


def _parallel(ep: int, tp: int = 1) -> ParallelState:
    # rank 0 of a DP x TP world whose EP group spans it all (no process group: the bounds need none)
    return ParallelState(rank=0, world_size=ep, dp_rank=0, dp_size=ep // tp, ep_rank=0, ep_size=ep, device=CPU,
                         tp_size=tp)


def test_max_received_rows() -> None:
    assert SparseBackend(_parallel(2), 128, 8192).max_received_rows(8192) == 2 * 8192
    assert SparseBackend(_parallel(4), 128, 8192, capacity_factor=1.0, static_max_tokens=256).max_received_rows(
        8192) == 4 * 8192  # the capacity bounds each round's message, not what arrives in all rounds
    assert SparseBackend(_parallel(4, tp=2), 128, 8192).max_received_rows(8191) == 4 * 4096  # each TP rank's share
    # allgather: every chunk padded to min(T, capacity) rows from each rank
    assert AllGatherBackend(_parallel(2), 128, 1024).max_received_rows(8192) == 2 * 8192
    assert AllGatherBackend(_parallel(2), 128, 64).max_received_rows(100) == 2 * 128
    assert AllGatherBackend(_parallel(4, tp=2), 128, 64).max_received_rows(300) == 4 * 192
    one = ParallelState(rank=0, world_size=1, dp_rank=0, dp_size=1, ep_rank=0, ep_size=1, device=CPU)
    assert LocalBackend(one, 128, 8192).max_received_rows(8192) == 8192  # no EP: the step's own rows


def _check_received_rows_covered(num_experts: int, top_k: int, max_rows: int, config_for: Any, edges=()) -> set:
    # every count a rank can receive compiles nothing the local warmup (with the table's edges, as
    # expert_warmup.warmup_row_counts passes them) did not; returns the variants needed
    need = _align_variants(range(1, max_rows + 1), num_experts, top_k, config_for)
    have = _align_variants(warmup_token_counts(max_rows, top_k, edges), num_experts, top_k, config_for)
    assert need - have == set()
    return need


@pytest.mark.parametrize("ep,max_tokens", [(2, 8192), (4, 8192), (2, 100), (4, 100)])
def test_received_rows_cover_variants_default(ep: int, max_tokens: int) -> None:
    # 128 experts top-8 (Qwen3-30B-A3B) over ep ranks: the default config of 128 / ep local experts
    num_local, top_k = 128 // ep, 8
    bound = SparseBackend(_parallel(ep), 128, max_tokens).max_received_rows(max_tokens)
    need = _check_received_rows_covered(num_local, top_k, bound,
                                        lambda m: default_config(m, num_local, top_k, False))
    if ep == 4:  # the hole: even a rank that receives every token of the collective warmup (ep x T rows) misses some
        collective = [ep * n for n in warmup_token_counts(max_tokens, top_k)]
        assert need - _align_variants(collective, num_local, top_k,
                                      lambda m: default_config(m, num_local, top_k, False)) != set()


@pytest.mark.parametrize("table", _moe_tables())
def test_received_rows_cover_variants_tables(monkeypatch: pytest.MonkeyPatch, table: str) -> None:
    # each checked-in table as the local experts' (its E experts on each of ep ranks), with its model's top-k
    match = re.fullmatch(r"moe_E(\d+)_H(\d+)_I(\d+)_([a-z0-9]+)_(.+)\.json", table)
    assert match, table
    num_local, hidden, inter = map(int, match.groups()[:3])
    dtype, gpu = match.group(4), match.group(5)
    top_k = 2 if num_local == 8 else 8
    monkeypatch.setattr("kernels.moe_config.device_name", lambda device=None: gpu)
    edges = config_edges(num_local, hidden, inter, top_k, dtype)
    for ep, max_tokens in ((2, 8192), (4, 8192), (2, 3000)):
        bound = SparseBackend(_parallel(ep), num_local * ep, max_tokens).max_received_rows(max_tokens)
        _check_received_rows_covered(num_local, top_k, bound,
                                     lambda m: get_moe_config(m, num_local, hidden, inter, top_k, dtype), edges)


class ExpertCalls:
    """Wraps every MoE layer's expert function (what Experts.forward calls after dispatch) with one that records
    (layer id, rows, ids dtype, ids range) and still runs it."""

    def __init__(self, model: torch.nn.Module) -> None:
        from models.moe import MoE

        self.calls: list[tuple[int, int, str, int, int]] = []
        for layer in (m for m in model.modules() if isinstance(m, MoE)):
            layer.experts._fused_experts = self._wrap(layer.layer_id, layer.experts._fused_experts)

    def _wrap(self, layer_id: int, fn: Any) -> Any:
        def recorded(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                     ids: torch.Tensor, **kw: Any) -> Any:
            assert hidden.shape[0] == weights.shape[0] == ids.shape[0] and hidden.is_contiguous()
            self.calls.append((layer_id, ids.shape[0], str(ids.dtype), int(ids.min()), int(ids.max())))
            return fn(hidden, w13, w2, weights, ids, **kw)
        return recorded


def _tiny_model(ep: int, backend: Any, dtype: torch.dtype = torch.float32, use_triton: bool = False) -> torch.nn.Module:
    from benchmarks.count_launches import CONFIGS
    from models.args import ModelArgs
    from models.loader import load_model

    cfg = dict(CONFIGS["qwen3_moe"], num_hidden_layers=2, num_experts=16, num_experts_per_tok=4)
    args = ModelArgs(dtype=dtype, device="cpu", seed=0, ep_rank=0, ep_size=ep, dispatcher=backend,
                     use_triton=use_triton)
    return load_model("", cfg, args, "dummy")


def test_warmup_counts_memory_bound_and_no_ep(caplog: pytest.LogCaptureFixture) -> None:
    # one process, no process group at all: a collective would raise
    from runtime.engine.expert_warmup import (
        ep_expert_layers,
        ep_experts_bytes,
        layer_config_edges,
        model_config_edges,
        warm_local_experts,
        warmup_bytes,
        warmup_row_counts,
    )

    assert not dist.is_initialized()
    model = _tiny_model(2, SparseBackend(_parallel(2), 16, 64))
    calls = ExpertCalls(model)
    (layer,) = ep_expert_layers(model)  # two MoE layers, one shape
    want = warmup_token_counts(2 * 64, 4, layer_config_edges(layer))
    assert warmup_row_counts(layer, 64, None) == (want, [])
    # the memory plan's share for the experts: the largest received step (2 ranks x 64 tokens), not 64 rows
    assert ep_experts_bytes(model, 64) == warmup_bytes(layer, 128) > warmup_bytes(layer, 64)
    assert warm_local_experts(model, 64) == want
    # rows of up to 4 distinct local ids of 8, from the second row on some -1 (slots handled elsewhere)
    assert calls.calls == [(layer.layer_id, n, "torch.int32", -1 if n > 1 else 0, 3 if n < 3 else 5 if n < 5 else 7)
                           for n in want]
    # a reserve below the largest count's allocation: a prefix of the counts, each inside it, and a log line
    reserve = warmup_bytes(layer, 40)
    run, left_out = warmup_row_counts(layer, 64, reserve)
    assert run + left_out == want and run and left_out
    assert all(warmup_bytes(layer, n) <= reserve for n in run) and warmup_bytes(layer, left_out[0]) > reserve
    calls.calls.clear()
    with caplog.at_level(logging.INFO, logger="runtime.engine.expert_warmup"):
        assert warm_local_experts(model, 64, reserve) == run
    assert [c[1] for c in calls.calls] == run
    assert any("bounded to" in r.getMessage() for r in caplog.records)
    # DP without EP (an EP-of-one LocalBackend, or no dispatcher): the experts see the step's rows, which the
    # collective warmup's counts cover already: nothing to warm
    one = ParallelState(rank=0, world_size=1, dp_rank=0, dp_size=1, ep_rank=0, ep_size=1, device=CPU)
    for backend in (LocalBackend(one, 16, 64), None):
        model = _tiny_model(1, backend)
        calls = ExpertCalls(model)
        assert ep_expert_layers(model) == [] and warm_local_experts(model, 64) == [] and calls.calls == []
        assert ep_experts_bytes(model, 64) == 0
        # the step warmup's edges: its experts' (16 experts top-4, no CPU table: default_config's 16 and 96 rows an
        # expert), where under EP (above) the exchanged experts add none to the step sizes
        assert model_config_edges(model) == [65, 385]
    assert model_config_edges(_tiny_model(2, SparseBackend(_parallel(2), 16, 64))) == []


def test_step_experts_bytes_peaks_inside_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    # without EP the memory plan's share for the experts is the most any step size up to the bound allocates: a
    # table's "tma" entry (the permuted path, ~2x the aligned path's workspace) over a middle range of sizes can
    # peak there, above the largest step's own
    import runtime.engine.expert_warmup as ew
    from kernels.moe_grouped_tma import default_tma_config
    from kernels.moe_plan import experts_workspace_bytes

    model = _tiny_model(1, None)
    assert ew.ep_expert_layers(model) == [] and ew.ep_experts_bytes(model, 64) == 0
    layer = next(m for m in model.modules() if isinstance(m, ew.MoE))
    w13, w2 = layer.experts.w13, layer.experts.w2
    base = ew._config

    def config(layer, n):
        return dict(base(layer, n), tma=default_tma_config(float32=True)) if 40 <= n <= 48 else base(layer, n)

    def workspace(n, cfg):
        return experts_workspace_bytes(n, layer.top_k, w13.shape[2], w2.shape[2], w13.shape[0], 4, cfg, False)

    assert ew.step_experts_bytes(model, 64) == max(workspace(n, base(layer, n)) for n in range(1, 65))
    monkeypatch.setattr(ew, "_config", config)
    assert ew.step_experts_bytes(model, 64) == workspace(48, config(layer, 48)) > workspace(64, config(layer, 64))


def test_warmup_rows_through_triton_experts() -> None:
    # the Triton experts (the interpreter on the CPU) at the warmup's counts for steps of 8 tokens over EP=2, and
    # their output on the dummy rows equals the torch reference's (rows with -1 slots, padding rows included)
    from kernels.fused_moe import fused_experts_ref
    from runtime.engine.expert_warmup import ep_expert_layers, layer_config_edges, received_rows, warm_local_experts

    model = _tiny_model(2, SparseBackend(_parallel(2), 16, 8), torch.float16, use_triton=True)
    (layer,) = ep_expert_layers(model)
    assert warm_local_experts(model, 8) == warmup_token_counts(16, 4, layer_config_edges(layer))
    hidden, weights, ids = received_rows(layer, 13)
    out = layer.experts(hidden, weights, ids)
    ref = fused_experts_ref(hidden, layer.experts.w13, layer.experts.w2, weights, ids)
    assert torch.allclose(out.float(), ref.float(), atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------- 2 gloo ranks, DP=2 / EP=2 engines

MAX_TOKENS = 20
# name -> (config changes, rows each rank received at most): allgather's capacity 8 pads 20 rows to 3 chunks of 8
# (48 received, not 40); TP=2 x EP=2 (one DP rank): each TP rank dispatches its 10 rows of the 20
RUNS = {"sparse": ({"all2all_backend": "sparse"}, 2 * MAX_TOKENS),
        "allgather": ({"all2all_backend": "allgather", "expert_token_capacity": 8}, 2 * 3 * 8),
        "tp2": ({"data_parallel_size": 1, "tensor_parallel_size": 2}, 2 * MAX_TOKENS // 2)}


def _forbidden(op: str) -> Any:
    def collective(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"the local expert warmup called torch.distributed.{op}")
    return collective


def _worker(rank: int, world: int, port: int, model: str, result_dir: str) -> None:
    from runtime.cluster.rank_loop import build_engine
    from runtime.config import EngineConfig
    from runtime.distributed.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    base = EngineConfig(model=model, device="cpu", kv_cache_memory=8 << 20, max_num_seqs=8,
                        max_num_batched_tokens=MAX_TOKENS, max_model_len=128, data_parallel_size=world,
                        enable_expert_parallel=True)
    parallel = init_parallel(base)
    barrier_group = dist.new_group(backend="gloo")
    result: dict[str, Any] = {}
    for name, (changes, _) in RUNS.items():
        config = base.replace(**changes)
        run_parallel = init_parallel(config) if config.tensor_parallel_size > 1 else parallel
        engine, _ = build_engine(config, run_parallel)
        layer = next(m for m in engine.model.modules() if getattr(m, "is_moe", False))
        dispatcher = layer.dispatcher
        bound = dispatcher.max_received_rows(MAX_TOKENS)
        if rank == 0:  # rank 1 warms nothing: a collective in rank 0's warmup would wait for it forever
            calls = ExpertCalls(engine.model)
            saved = {op: getattr(dist, op) for op in (*COLLECTIVES, "barrier")}
            for op in saved:
                setattr(dist, op, _forbidden(op))
            try:
                counts = engine.runner.warmup_local_experts(MAX_TOKENS)
            finally:
                for op, fn in saved.items():
                    setattr(dist, op, fn)
            result[name] = {"bound": bound, "counts": counts, "calls": calls.calls}
        dist.barrier(group=barrier_group)
        # the bound is reached: a real dispatch of T tokens every one of which routes to rank 0's experts only
        rows, top_k = -(-MAX_TOKENS // config.tensor_parallel_size), layer.top_k  # this rank's share of the step
        ids = torch.arange(top_k, dtype=torch.int32).repeat(rows, 1)  # experts 0..k-1, all on rank 0
        hidden = torch.randn(rows, layer.hidden_size)
        received = dispatcher.dispatch(hidden, torch.full((rows, top_k), 1.0 / top_k), ids)[0].shape[0]
        result.setdefault(name, {}).update(received=received, bound=bound)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    destroy_parallel()


def test_local_warmup_on_gloo_ranks(tmp_path: Any) -> None:
    from tests.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(str(tmp_path / "qwen"), "Qwen3MoeForCausalLM")  # 8 experts, top-2
    results = spawn_ranks_json(_worker, lambda d: (2, free_port(), model, d), 2, TIMEOUT_S, "EP warmup ranks")
    for name, (_, bound) in RUNS.items():
        r0 = results[0][name]
        assert r0["bound"] == bound, name
        assert r0["received"] == r0["bound"]  # every token routed to rank 0: the bound is what arrives
        assert results[1][name]["received"] <= r0["bound"]
        want = warmup_token_counts(r0["bound"], 2, config_edges(4, 1, 1, 2, "float32"))  # no CPU table: the default's
        assert r0["counts"] == want
        # one layer of the two (one shape), every count once, int32 local ids in [-1, 4 local experts)
        assert len({c[0] for c in r0["calls"]}) == 1 and [c[1] for c in r0["calls"]] == want
        assert all(c[2] == "torch.int32" and -1 <= c[3] <= c[4] < 4 for c in r0["calls"])


@pytest.mark.parametrize("fp8_dispatch", [False, True])  # rows as sent: model dtype / FP8 quantized in the pack
def test_warmup_runs_the_dynamic_pack_and_unpack(fp8_dispatch: bool) -> None:
    # the collective warmup's rows are padding (slot -1), routed nowhere: a dynamic exchange sends and receives 0
    # rows, and sparse_pack / sparse_unpack launch nothing at 0 rows. Without a static step (no CUDA graphs) their
    # first launch, hence their compile, would be on a served step: the local warmup runs both on one row, alone,
    # through the Triton wrappers (the interpreter here), in the dynamic layout (no flag word)
    from kernels.all2all import pack as pack_kernels
    from kernels.all2all import route as route_kernels
    from runtime.engine.expert_warmup import warm_local_experts

    assert not dist.is_initialized()
    backend = SparseBackend(_parallel(2), 16, 8, fp8_dispatch=fp8_dispatch)
    rows: dict[str, list[Any]] = {"pack": [], "unpack": []}

    def pack(*args: Any) -> None:
        pack_kernels.sparse_pack(*args)
        rows["pack"].append((args[5].shape[0], args[8].tolist(), args[11]))  # rows sent, their local ids, flag

    def unpack(*args: Any) -> Any:
        out = pack_kernels.sparse_unpack(*args)
        rows["unpack"].append((args[0].shape[0], out[1].tolist()))
        return out

    backend._pack_kernel, backend._unpack_kernel = pack, unpack
    backend._route_exact_kernel = route_kernels.sparse_route_exact  # the GPU's kernels (the CPU's: the references)
    model = _tiny_model(2, backend, torch.float16, use_triton=True)
    warm_local_experts(model, 2)
    assert rows == {"pack": [(1, [[0, -1, -1, -1]], None)], "unpack": [(1, [[0, -1, -1, -1]])]}
