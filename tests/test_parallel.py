"""Parallel layout checks, and DP/EP greedy tokens on 2 and 4 gloo ranks equal to one rank.

The multi-rank test drives the engines in lockstep the way the coordinator does (every rank schedules, all
agree on pad_to = max, idle ranks run dummy steps), with a gloo all_reduce standing in for the coordinator's
sockets, so both architectures fit in one spawn per world size. tests/test_serve.py runs the real coordinator.
"""

from __future__ import annotations

import json
import os
import weakref

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from runtime.config import ConfigError, EngineConfig
from runtime.distributed.parallel import check_sizes, single_rank
from tests.test_all2all import free_port, spawn_ranks_json

TIMEOUT_S = 150
ARCHS = ("Qwen3MoeForCausalLM", "Glm4MoeForCausalLM")
PROMPTS = [[1, 5, 9, 200, 17], [3, 3, 3], [100, 101, 102, 103, 104, 105, 106], [7], [42, 43], [250, 2, 77, 8],
           [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [300, 301], [5, 6, 7, 8]]
MAX_TOKENS = 6


def _config(model: str, dp: int) -> EngineConfig:
    return EngineConfig(model=model, device="cpu", kv_cache_memory=8 << 20, max_num_seqs=8, max_num_batched_tokens=16,
                        max_model_len=128, data_parallel_size=dp, enable_expert_parallel=dp > 1)


def test_check_sizes_fail_fast(tmp_path) -> None:  # noqa: ANN001
    from tests.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(str(tmp_path / "m"), "Qwen3MoeForCausalLM")  # 8 experts
    cfg = _config(model, 3)
    with pytest.raises(ConfigError, match="not divisible by the expert-parallel size 3"):
        check_sizes(cfg, 3, 3, None, 8)
    with pytest.raises(ConfigError, match="not divisible by --data-parallel-size"):
        check_sizes(_config(model, 2), 3, 3, None, 8)
    with pytest.raises(ConfigError, match="only 2 GPU"):
        check_sizes(_config(model, 4), 4, 4, 2, 8)
    with pytest.raises(ConfigError, match="dense model"):
        check_sizes(_config(model, 2), 2, 2, None, 0)
    assert check_sizes(_config(model, 4), 4, 4, None, 8) == 4
    assert check_sizes(cfg.replace(enable_expert_parallel=False), 3, 3, None, 8) == 1


def _run_lockstep(engine, stats, group) -> dict[str, list[int]]:  # noqa: ANN001
    out: dict[str, list[int]] = {}
    while True:
        num_tokens = engine.schedule()
        agreed = torch.tensor([num_tokens, int(engine.has_unfinished())])
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        if agreed[0] == 0:
            if agreed[1] == 0:
                return out
            continue
        stats.begin_step()
        for d in engine.execute(pad_to=int(agreed[0])):
            out.setdefault(d.request_id, []).extend(d.new_token_ids)


def _params(i: int):  # noqa: ANN202
    from runtime.sampling_params import SamplingParams

    # prompt 0 runs longest: its rank keeps stepping while the others fill in with dummy steps
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS + (6 if i == 0 else 0), ignore_eos=True)


def _worker(rank: int, world: int, port: int, models: dict[str, str], result_dir: str) -> None:
    from runtime.cluster.rank_loop import build_engine
    from runtime.distributed.parallel import ParallelState, destroy_parallel, init_parallel
    from runtime.messages import AddRequest

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    first = next(iter(models.values()))
    parallel4 = init_parallel(_config(first, world))  # DP=4/EP=4 over every rank
    cpu4 = dist.new_group(backend="gloo")
    # DP=2/EP=2 twice: ranks {0, 1} and {2, 3} are two independent deployments
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cpu_pairs = [dist.new_group([0, 1], backend="gloo"), dist.new_group([2, 3], backend="gloo")]
    parallel2 = ParallelState(rank=rank % 2, world_size=2, dp_rank=rank % 2, dp_size=2, ep_rank=rank % 2, ep_size=2,
                              device=torch.device("cpu"), ep_group=pairs[rank // 2])
    result: dict[str, object] = {}
    for arch, model in models.items():
        for ep, parallel, group in ((world, parallel4, cpu4), (2, parallel2, cpu_pairs[rank // 2])):
            engine, stats = build_engine(_config(model, ep), parallel)
            for i, p in enumerate(PROMPTS):
                if i % ep == parallel.ep_rank:
                    engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=_params(i)))
            tokens = _run_lockstep(engine, stats, group)
            w13 = next(m.experts.w13 for m in engine.model.modules() if getattr(m, "is_moe", False))
            result[f"{arch}/{ep}"] = {"tokens": tokens, "load_bytes": engine.model.load_stats["bytes"],
                                      "local_experts": w13.shape[0], "routed": stats.routed_tokens.tolist(),
                                      "dummy_steps": engine.num_dummy_steps}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    destroy_parallel()


def _reference(model: str) -> dict[str, object]:
    from runtime.cluster.rank_loop import build_engine
    from runtime.messages import AddRequest

    engine, stats = build_engine(_config(model, 1), single_rank())
    for i, p in enumerate(PROMPTS):
        engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=_params(i)))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        engine.schedule()
        stats.begin_step()
        for d in engine.execute():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
    return {"tokens": tokens, "load_bytes": engine.model.load_stats["bytes"], "routed": stats.routed_tokens.tolist()}


def _expert_bytes(model: str) -> int:
    with safe_open(os.path.join(model, "model.safetensors"), framework="pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) * 4 for k in f.keys() if ".experts." in k)  # fp32


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_checkpoint(str(root / arch), arch) for arch in ARCHS}


def test_dp_ep_tokens_equal_one_rank(moe_models: dict[str, str]) -> None:
    world = 4
    refs = {arch: _reference(model) for arch, model in moe_models.items()}
    results = spawn_ranks_json(_worker, lambda d: (world, free_port(), moe_models, d), world, TIMEOUT_S, "EP ranks")
    for arch, model in moe_models.items():
        ref = refs[arch]
        expert_bytes = _expert_bytes(model)
        for ep, deployments in ((4, [results]), (2, [results[:2], results[2:]])):
            key = f"{arch}/{ep}"
            for ranks in deployments:
                merged: dict[str, list[int]] = {}
                for res in ranks:
                    merged.update(res[key]["tokens"])
                assert merged == ref["tokens"], f"{arch}: DP={ep}/EP={ep} tokens differ from one rank"
                # each EP rank holds and reads only its own experts
                for res in ranks:
                    assert res[key]["local_experts"] == 8 // ep
                    assert res[key]["load_bytes"] == ref["load_bytes"] - expert_bytes + expert_bytes // ep
                # prompt 0's rank runs longest: every other rank kept it going with dummy steps
                assert all(res[key]["dummy_steps"] > 0 for res in ranks[1:])
                # expert counters: the ranks' routed tokens add up to the single rank's
                total = torch.tensor([res[key]["routed"] for res in ranks]).sum(0)
                assert torch.equal(total, torch.tensor(ref["routed"])), f"{key}: routed token counts differ"


def test_destroy_parallel_releases_captured_graphs_first(monkeypatch) -> None:  # noqa: ANN001
    """An NCCL collective captured in a live CUDA graph makes destroy_process_group() hang (pytorch#115388,
    seen on 2 H200s: every NCCL + graphs test hung at its end): the graphs go first."""
    from runtime.distributed import parallel

    order: list[str] = []

    class Graph:  # stands in for torch.cuda.CUDAGraph, which needs a GPU
        def reset(self) -> None:
            order.append("reset")

    monkeypatch.setattr(parallel, "_captured_graphs", weakref.WeakSet())  # leave any real graph of this process be
    graphs = [parallel.track_cuda_graph(Graph()) for _ in range(2)]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: order.append("destroy"))
    parallel.destroy_parallel()
    assert order == ["reset", "reset", "destroy"]
    parallel.destroy_parallel()  # released once: a second teardown resets nothing
    assert order == ["reset", "reset", "destroy", "destroy"] and len(graphs) == 2
