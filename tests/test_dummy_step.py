"""Lockstep dummy steps: a rank with nothing to run takes part in the MoE layers' collectives and nothing else.

One spawn of 2 gloo ranks (DP=2 / EP=2) runs tiny Qwen3-MoE and GLM-4.5 (shared experts, a dense first layer)
with the allgather backend (capacity 8: several chunks per step) and the sparse one in both its modes (dynamic;
static, as inside a CUDA graph). Rank 0 decodes while rank 1 is idle:
- rank 0's greedy tokens equal one rank's;
- in every step, rank 1's dummy forward issues the same collective calls (op, group, dtypes, shapes; for
  uneven splits the row shape) as rank 0's real forward;
- a dummy step runs the local experts once per MoE layer and no other module (no embedding, attention, norm,
  router, dense MLP or shared expert).
Dummy against real decode step times (both ranks alike) are printed, not asserted.
Then: which deployments step in lockstep at all, and a free-running DP=2 deployment without EP, one rank idle:
the idle rank runs no step, nobody runs a dummy step and the coordinator issues none.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import msgspec
import pytest
import torch
import torch.distributed as dist
import zmq

from runtime.config import EngineConfig
from tests.test_all2all import free_port, spawn_ranks_json

TIMEOUT_S = 120
ARCHS = ("Qwen3MoeForCausalLM", "Glm4MoeForCausalLM")
# backend name -> (config changes, sparse static_max_tokens)
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "allgather": ({"all2all_backend": "allgather", "expert_token_capacity": 8}, 0),
    "sparse": ({"all2all_backend": "sparse"}, 0),
    "sparse-static": ({"all2all_backend": "sparse"}, 16),
}
PROMPTS = [[1, 5, 9, 200, 17, 3, 3, 8, 44, 45, 46], [100, 101, 102, 103, 104]]  # 16 tokens: one full chunk
MAX_TOKENS = 6
TIMED_BATCH, TIMED_STEPS = 8, 10
COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast", "all_to_all")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(model: str, dp: int, device: str = "cpu", **changes: Any) -> EngineConfig:
    return EngineConfig(model=model, device=device, dtype="float32", kv_cache_memory=8 << 20, max_num_seqs=8,
                        max_num_batched_tokens=16, max_model_len=128, data_parallel_size=dp,
                        enable_expert_parallel=dp > 1, **changes)


def _params(max_tokens: int = MAX_TOKENS):  # noqa: ANN202
    from runtime.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


class CollectiveLog:
    """Every torch.distributed collective this process calls while `calls` is a list: (op, group ranks, and per
    tensor its dtype and shape; with uneven splits the shape of one row, the row counts being the routing's)."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] | None = None
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if self.calls is not None:
                uneven = kwargs.get("output_split_sizes") is not None or kwargs.get("input_split_sizes") is not None
                group = kwargs.get("group")
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
                self.calls.append([name, ranks, uneven,
                                   [[str(t.dtype), list(t.shape[1:] if uneven else t.shape)] for t in tensors]])
            return fn(*args, **kwargs)

        return recorded


class ModuleLog:
    """Forward calls per module type of a model while `on`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.on = False
        self.counts: collections.Counter = collections.Counter()
        for m in model.modules():
            m.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        if self.on:
            self.counts[type(module).__name__] += 1


def _engine(model: str, variant: str, parallel: Any) -> tuple[Any, Any]:
    from runtime.distributed.backends import create_backend, make_backend
    from runtime.distributed.expert_stats import ExpertStats
    from runtime.engine.llm_engine import LLMEngine

    changes, static_max_tokens = VARIANTS[variant]
    config = _config(model, parallel.dp_size, parallel.device.type, **changes)
    info = config.model_info()
    stats = ExpertStats(info.num_moe_layers, info.num_experts, parallel.device)
    if static_max_tokens:  # the decode-graph mode, eagerly: what a GPU rank replays for steps up to that size
        dispatcher = create_backend("sparse", parallel, info.num_experts, config.max_num_batched_tokens, stats,
                                    static_max_tokens=static_max_tokens)
    else:
        dispatcher = make_backend(config, parallel, info.num_experts, stats)
    return LLMEngine(config, parallel, dispatcher), stats


def _lockstep(engine: Any, stats: Any, group: Any, log: CollectiveLog,
              modules: ModuleLog) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
    """Steps as the coordinator clocks them (pad_to = max over ranks); per step: dummy or not, its collectives
    and (dummy steps) the modules it ran."""
    tokens: dict[str, list[int]] = {}
    steps: list[dict[str, Any]] = []
    while True:
        num_tokens = engine.schedule()
        agreed = torch.tensor([num_tokens, int(engine.has_unfinished())])
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        if agreed[0] == 0:
            if agreed[1] == 0:
                return tokens, steps
            continue
        dummy = engine.planned is None
        pad_to = engine.padded_size(int(agreed[0]))  # a CUDA graph's bucket when one covers it
        stats.begin_step()
        modules.counts.clear()
        log.calls, modules.on = [], dummy
        for d in engine.execute(pad_to=pad_to):
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
        steps.append({"dummy": dummy, "pad_to": pad_to, "calls": log.calls, "modules": dict(modules.counts)})
        log.calls, modules.on = None, False


def _time_steps(engine: Any, group: Any, rank: int) -> dict[str, float]:
    """Both ranks decode TIMED_BATCH sequences (real steps), then both run dummy steps of that size."""
    from runtime.messages import AddRequest

    for i in range(TIMED_BATCH):
        engine.add_request(AddRequest(f"t{rank}-{i}", [7 + i, 8], _params(TIMED_STEPS + 4)))
    assert engine.schedule() == 2 * TIMED_BATCH
    engine.execute(pad_to=2 * TIMED_BATCH)  # the prefill, two ranks alike
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"real": [], "dummy": []}
    for step in range(2 * TIMED_STEPS):  # interleaved: both kinds see the same background load
        kind = "dummy" if step % 2 else "real"
        sync()
        dist.barrier(group=group)
        t0 = time.perf_counter()
        if kind == "real":
            assert engine.schedule() == TIMED_BATCH
            engine.execute(pad_to=engine.padded_size(TIMED_BATCH))
        else:
            engine.runner.execute_dummy(engine.padded_size(TIMED_BATCH))
        sync()
        times[kind].append(time.perf_counter() - t0)
    engine.abort_requests([f"t{rank}-{i}" for i in range(TIMED_BATCH)])
    return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}


def _worker(rank: int, world: int, port: int, models: dict[str, str], result_dir: str, device: str = "cpu") -> None:
    from runtime.distributed.parallel import destroy_parallel, init_parallel
    from runtime.messages import AddRequest

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    parallel = init_parallel(_config(next(iter(models.values())), world, device))
    group = dist.new_group(backend="gloo")  # stands in for the coordinator's sockets
    log = CollectiveLog()
    result: dict[str, Any] = {}
    for arch, model in models.items():
        # on a GPU the sparse backend runs static inside the decode graphs by itself (sparse-static is for the CPU)
        for variant in VARIANTS if device == "cpu" else ("allgather", "sparse"):
            engine, stats = _engine(model, variant, parallel)
            if rank == 0:  # rank 1 stays idle: every step it runs is a dummy step
                for i, p in enumerate(PROMPTS):
                    engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=_params()))
            tokens, steps = _lockstep(engine, stats, group, log, ModuleLog(engine.model))
            graphs = engine.runner.graphs
            result[f"{arch}/{variant}"] = {"tokens": tokens, "steps": steps, "timing": _time_steps(engine, group, rank),
                                           "num_moe_layers": engine.model.num_moe_layers,
                                           "dummy_graphs": len(graphs.dummy_graphs) if graphs is not None else 0}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    destroy_parallel()


def _reference(model: str) -> dict[str, list[int]]:
    from runtime.cluster.rank_loop import build_engine
    from runtime.distributed.parallel import single_rank
    from runtime.messages import AddRequest

    engine, _ = build_engine(_config(model, 1), single_rank())
    for i, p in enumerate(PROMPTS):
        engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=_params()))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
    return tokens


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_checkpoint(str(root / arch), arch) for arch in ARCHS}


def _spawn(models: dict[str, str], device: str) -> list[dict[str, Any]]:
    return spawn_ranks_json(_worker, lambda d: (2, free_port(), models, d, device), 2,
                            TIMEOUT_S if device == "cpu" else 600, "EP ranks")


def _check_tokens_and_print_times(results: list[dict[str, Any]], refs: dict[str, dict[str, list[int]]],
                                  what: str) -> None:
    print(f"\ndummy vs real decode step, {what}, both ranks alike, batch {TIMED_BATCH} (median ms over "
          f"{TIMED_STEPS} steps, rank 0)")
    for key, real in results[0].items():
        idle = results[1][key]
        assert real["tokens"] == refs[key.split("/")[0]], f"{key}: tokens differ from one rank's"
        assert idle["tokens"] == {} and len(real["steps"]) == len(idle["steps"])
        assert all(s["dummy"] for s in idle["steps"]) and not any(s["dummy"] for s in real["steps"])
        t = real["timing"]
        print(f"  {key:40s} real {t['real']:7.2f}  dummy {t['dummy']:7.2f}  ratio {t['dummy'] / t['real']:.2f}")


def test_idle_rank_dummy_steps_collectives_only(moe_models: dict[str, str]) -> None:
    refs = {arch: _reference(model) for arch, model in moe_models.items()}
    results = _spawn(moe_models, "cpu")
    assert len(results[0]) == len(ARCHS) * len(VARIANTS)
    _check_tokens_and_print_times(results, refs, "CPU gloo DP=2/EP=2")
    for key, real in results[0].items():
        idle = results[1][key]
        assert {s["pad_to"] for s in idle["steps"]} >= {16, 2}  # a prefill-sized and a decode-sized dummy
        num_moe_layers = real["num_moe_layers"]
        for i, (mine, theirs) in enumerate(zip(idle["steps"], real["steps"])):
            assert mine["calls"], f"{key} step {i}: the dummy step issued no collective"
            assert mine["calls"] == theirs["calls"], f"{key} step {i}: dummy and real collectives differ"
            # the local experts once per MoE layer, nothing else of the model
            assert mine["modules"] == {"Experts": num_moe_layers}, f"{key} step {i}: {mine['modules']}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_idle_rank_dummy_graphs_nccl(moe_models: dict[str, str]) -> None:
    """The same on 2 GPUs (NCCL, Triton, CUDA graphs): decode-sized dummy steps replay their own graph
    against the busy rank's decode graph (same all2all inside), prefill-sized ones run eagerly."""
    refs = {arch: _reference(model) for arch, model in moe_models.items()}
    results = _spawn(moe_models, "cuda")
    _check_tokens_and_print_times(results, refs, "2 GPUs NCCL DP=2/EP=2, CUDA graphs")
    for key, idle in results[1].items():
        assert idle["dummy_graphs"] > 0, key
        # a replayed dummy graph runs no Python: no module call, no collective call from the host
        assert any(s["calls"] == [] and s["modules"] == {} for s in idle["steps"]), key


def test_lockstep_only_where_dp_ranks_share_collectives(tmp_path) -> None:  # noqa: ANN001
    from tests.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(str(tmp_path / "m"), "Qwen3MoeForCausalLM")
    config = _config(model, 1)
    assert config.replace(data_parallel_size=2, enable_expert_parallel=True).needs_lockstep
    assert not config.replace(data_parallel_size=2, enable_expert_parallel=False).needs_lockstep  # pure DP
    # EP inside one DP rank (its TP peers follow its plans): no other DP rank to wait for
    assert not config.replace(data_parallel_size=1, tensor_parallel_size=2, enable_expert_parallel=True).needs_lockstep


def test_no_dummy_layers_without_an_exchange(tmp_path) -> None:  # noqa: ANN001
    """One EP rank (one GPU, or DP/TP without EP): nothing moves, so there is no dummy step; its forward holds no
    layer (on 2 H200s every such rank captured 20 unused dummy CUDA graphs before this)."""
    from runtime.cluster.rank_loop import build_engine
    from runtime.distributed.parallel import ParallelState, single_rank
    from tests.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(str(tmp_path / "m"), "Qwen3MoeForCausalLM")
    engine = build_engine(_config(model, 1), single_rank())[0]
    assert engine.runner.dummy_forward.layers == [] and engine.runner.dummy_forward.static is None
    engine.runner.dummy_forward(4)  # a no-op, not an error
    # EP over two ranks (a real exchange; building it issues no collective): dummy layers only where DP ranks
    # step together; EP inside one DP rank (DP=1 x TP=2 x EP=2: its TP peer follows its plans) runs none
    ep2 = ParallelState(rank=0, world_size=2, dp_rank=0, dp_size=2, ep_rank=0, ep_size=2, device=torch.device("cpu"))
    lockstep = build_engine(_config(model, 2), ep2)[0]
    assert len(lockstep.runner.dummy_forward.layers) > 0
    free = build_engine(_config(model, 1).replace(enable_expert_parallel=True, tensor_parallel_size=2), ep2)[0]
    assert free.runner.dummy_forward.layers == []


def test_dp2_without_ep_idle_rank_runs_nothing(tmp_path) -> None:  # noqa: ANN001
    """Free-running DP=2 (no EP): the real coordinator process and two real rank loops (threads), one request
    placed on rank 0. The idle rank 1 runs no step and no dummy step; the coordinator clocks nothing."""
    from runtime.cluster.coordinator import CoordinatorSpec
    from runtime.cluster.rank_loop import RankLoop, build_engine
    from runtime.distributed.parallel import single_rank
    from runtime.messages import AddRequest, Addresses, ClusterStats, OutputBatch, decode, encode
    from tests.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(str(tmp_path / "m"), "Qwen3MoeForCausalLM")
    config = _config(model, 2).replace(enable_expert_parallel=False)
    ref = _reference(model)["0"]
    addrs = Addresses.ipc(str(tmp_path), 2)
    ctx = zmq.Context()
    front_pull = ctx.socket(zmq.PULL)
    front_pull.bind(addrs.to_frontend)
    front_push = ctx.socket(zmq.PUSH)
    front_push.connect(addrs.to_coordinator)
    spec = CoordinatorSpec(num_ranks=2, lockstep=config.needs_lockstep, log_stats_interval=0.2)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cluster.coordinator", msgspec.json.encode(spec).decode(),
                             msgspec.json.encode(addrs).decode()], cwd=ROOT,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    # two DP ranks of one process: no group needed, nothing in their forwards is collective without EP
    engines = [build_engine(config, dataclasses.replace(single_rank(), dp_rank=r, dp_size=2))[0] for r in range(2)]
    loops = [threading.Thread(target=RankLoop(e, r, addrs, lockstep=config.needs_lockstep, stats_interval=0.2).run,
                              daemon=True) for r, e in enumerate(engines)]
    try:
        for t in loops:
            t.start()
        front_push.send(encode(AddRequest("solo", PROMPTS[0], _params(), data_parallel_rank=0)))
        tokens: list[int] = []
        stats: ClusterStats | None = None
        deadline = time.monotonic() + 60
        finished = False
        while not finished or stats is None or sum(r.generation_tokens for r in stats.ranks) < MAX_TOKENS:
            assert time.monotonic() < deadline, "no answer from the free-running ranks"
            if front_pull.poll(200):
                msg = decode(front_pull.recv())
                if isinstance(msg, OutputBatch):
                    for out in msg.outputs:
                        tokens += out.new_token_ids
                        finished = finished or out.finish_reason is not None
                elif isinstance(msg, ClusterStats) and len(msg.ranks) == 2:
                    stats = msg
        assert tokens == ref
        assert (stats.num_steps_issued, stats.num_dummy_commands) == (0, 0)  # the coordinator clocked nothing
        assert [r.num_dummy_steps for r in stats.ranks] == [0, 0]
        assert engines[1].num_steps == 0 and engines[0].num_steps == MAX_TOKENS
    finally:
        proc.terminate()  # sends every rank Shutdown
        proc.wait(10)
        for t in loops:
            t.join(10)
        ctx.destroy(linger=0)
