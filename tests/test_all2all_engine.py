"""The sparse all2all backend end to end on 4 gloo ranks (DP=4/EP=4): greedy tokens equal the allgather
backend and one rank, also with routing skewed onto one rank and a capacity that forces several rounds;
the per-layer byte counters show the routing-aware saving. The fixed-capacity (CUDA-graph) exchange runs on
the CPU too (--all2all-static-max-tokens): at DP=4/EP=4 and DP=2/EP=2 (ranks {0, 1} and {2, 3}), with
random routing and with skewed routing that overflows the slots, every overflowed step re-run exactly; and
DP=2 x TP=2 x EP=4 (each TP rank's share of the rows, TP followers re-running with their leader).
DP=2/EP=2 with the default (sparse) backend is in tests/test_parallel.py."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from runtime.distributed.all2all import row_layout
from runtime.distributed.parallel import ParallelState
from tests.test_all2all import free_port, spawn_ranks_json
from tests.test_parallel import PROMPTS, _config, _params, _reference, _run_lockstep

TIMEOUT_S = 300  # a hang guard only: 10 s alone, 79 s beside 6 CPU burners on 2 cores (4 ranks in lockstep)
WORLD = 4
# (name, checkpoint, --all2all-backend, --expert-token-capacity)
RUNS = (("qwen/allgather", "qwen", "allgather", None), ("qwen/sparse", "qwen", "sparse", None),
        ("glm_skew/sparse_cap2", "glm_skew", "sparse", 2))
# the fixed-capacity path for every step (all are <= 16 tokens): (name, checkpoint, --all2all-capacity-factor,
# EP size); factor 0.6 limits the prefill steps (C = 10 of 16 at EP=4), 0.3 also the decode steps of 3 tokens
CAPACITY_RUNS = (("qwen/capacity", "qwen", 0.6, WORLD), ("glm_skew/capacity", "glm_skew", 0.3, WORLD),
                 ("qwen/capacity_ep2", "qwen", 0.6, 2), ("glm_skew/capacity_ep2", "glm_skew", 0.3, 2))


def _worker(rank: int, world: int, port: int, models: dict[str, str], result_dir: str) -> None:
    from runtime.cluster.rank_loop import build_engine
    from runtime.distributed.parallel import destroy_parallel, init_parallel
    from runtime.messages import AddRequest

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    parallel = init_parallel(_config(models["qwen"], world))
    group = dist.new_group(backend="gloo")
    # DP=2/EP=2 twice: ranks {0, 1} and {2, 3} are two independent deployments
    pairs = [dist.new_group([0, 1], backend="gloo") for _ in range(2)] + [
        dist.new_group([2, 3], backend="gloo") for _ in range(2)]
    parallel2 = ParallelState(rank=rank % 2, world_size=2, dp_rank=rank % 2, dp_size=2, ep_rank=rank % 2, ep_size=2,
                              device=torch.device("cpu"), ep_group=pairs[2 * (rank // 2)])
    result: dict[str, object] = {}
    for name, model, backend, capacity in RUNS:
        config = _config(models[model], world).replace(all2all_backend=backend, expert_token_capacity=capacity)
        engine, stats = build_engine(config, parallel)
        for i, p in enumerate(PROMPTS):
            if i % world == rank:
                engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=_params(i)))
        tokens = _run_lockstep(engine, stats, group)
        # collectives: at least 3 per MoE layer and step (counts, payload, reply); more where rounds were needed
        result[name] = {"tokens": tokens, "traffic": stats.layer_traffic.tolist(),
                        "extra_collectives": int(stats.all2all[4]) - 3 * stats.num_moe_layers * engine.num_steps,
                        "routed": stats.routed_tokens.tolist()}
    result["qwen/capacity_tp2"] = _tp_capacity_run(models["qwen"], rank)
    for name, model, factor, ep in CAPACITY_RUNS:
        config = _config(models[model], ep).replace(all2all_static_max_tokens=16, all2all_capacity_factor=factor)
        run_parallel, run_group = (parallel, group) if ep == WORLD else (parallel2, pairs[2 * (rank // 2) + 1])
        engine, stats = build_engine(config, run_parallel)
        assert engine.runner.dispatcher.static_max_tokens == 16
        for i, p in enumerate(PROMPTS):
            if i % ep == run_parallel.ep_rank:
                engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=_params(i)))
        tokens = _run_lockstep(engine, stats, run_group)
        result[name] = {"tokens": tokens, "traffic": stats.layer_traffic.tolist(), "reruns": stats.num_overflow_reruns,
                        "overflow_pairs": int(stats.all2all[5]), "steps": engine.num_steps + engine.num_dummy_steps,
                        "routed": stats.routed_tokens.tolist()}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    destroy_parallel()


def _tp_capacity_run(model: str, rank: int) -> dict[str, object]:
    """DP=2 x TP=2, experts over all 4 ranks: each TP rank dispatches its half of the rows through slots small
    enough to overflow; the TP leaders run lockstep steps, their followers the plans they broadcast."""
    from runtime.cluster.rank_loop import build_engine, tp_follower_stats
    from runtime.distributed.parallel import init_parallel
    from runtime.messages import AddRequest

    config = _config(model, 2).replace(tensor_parallel_size=2, all2all_static_max_tokens=16,
                                       all2all_capacity_factor=0.3)
    parallel = init_parallel(config)
    leaders = dist.new_group([0, 2], backend="gloo")
    engine, stats = build_engine(config, parallel)
    tokens: dict[str, list[int]] = {}
    if parallel.is_tp_leader:
        for i, p in enumerate(PROMPTS):
            if i % 2 == parallel.dp_rank:
                engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=_params(i)))
        tokens = _run_lockstep(engine, stats, leaders)
        engine.runner.stop_followers()
    else:
        engine.runner.follow(tp_follower_stats(stats, parallel))
    return {"tokens": tokens, "reruns": stats.num_overflow_reruns}


def _skewed_copy(src: str, dst: str, num_experts: int = 8) -> str:
    """GLM-4.5 whose router picks the last two experts for every token (all on the last EP rank)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias"):
            t.copy_(torch.where(torch.arange(num_experts) >= num_experts - 2, 100.0, 0.0))
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("a2a_models")
    glm = make_tiny_checkpoint(str(root / "glm"), "Glm4MoeForCausalLM")
    return {"qwen": make_tiny_checkpoint(str(root / "qwen"), "Qwen3MoeForCausalLM"),
            "glm_skew": _skewed_copy(glm, str(root / "glm_skew"))}


def test_sparse_equals_allgather_and_one_rank(models: dict[str, str]) -> None:
    refs = {name: _reference(path)["tokens"] for name, path in models.items()}
    results = spawn_ranks_json(_worker, lambda d: (WORLD, free_port(), models, d), WORLD, TIMEOUT_S,
                               "all2all engine ranks")
    for name, model, _, _ in RUNS:
        merged: dict[str, list[int]] = {}
        for res in results:
            merged.update(res[name]["tokens"])
        assert merged == refs[model], f"{name}: tokens differ from one rank"

    # [rank, layer, (bytes sent, allgather-equivalent bytes, remote (token, rank) pairs sent)]
    allgather = torch.tensor([res["qwen/allgather"]["traffic"] for res in results])
    sparse = torch.tensor([res["qwen/sparse"]["traffic"] for res in results])
    # the sparse run knows what allgather would have moved: exactly what the allgather run moved
    assert torch.equal(sparse[..., 1], allgather[..., 0]) and torch.equal(allgather[..., 0], allgather[..., 1])
    # per layer, all ranks: bytes <= allgather's x the mean fraction of remote ranks a row needed, where
    # fraction = pairs / (remote ranks x rows), rows = what allgather sent / (remote ranks x bytes per row)
    with open(os.path.join(models["qwen"], "config.json")) as f:
        hf = json.load(f)
    hidden, top_k = hf["hidden_size"], hf["num_experts_per_tok"]
    row_bytes = row_layout(hidden, top_k, torch.float32)[1] + 4 * hidden  # dispatch row + combine row
    sparse_bytes, allgather_bytes, pairs = sparse[..., 0].sum(0), allgather[..., 0].sum(0), sparse[..., 2].sum(0)
    rows = allgather_bytes // ((WORLD - 1) * row_bytes)
    assert (rows * (WORLD - 1) * row_bytes == allgather_bytes).all()
    assert (sparse_bytes * (WORLD - 1) * rows <= allgather_bytes * pairs).all(), (sparse_bytes, allgather_bytes)
    assert (2 * sparse_bytes < allgather_bytes).all()  # top-2 of 8 experts on 4 ranks: under half

    # skewed + capacity 2: every token goes to the last rank in several rounds per prefill layer, still
    # exact; the last rank's own tokens stay home, so it sends only combine replies
    skew = torch.tensor([res["glm_skew/sparse_cap2"]["traffic"] for res in results])
    assert (skew[-1, :, 2] == 0).all() and (skew[:-1, :, 2] > 0).all()
    assert all(res["glm_skew/sparse_cap2"]["extra_collectives"] > 0 for res in results)
    assert all(res["qwen/sparse"]["extra_collectives"] == 0 for res in results)  # capacity 16: one round
    _check_capacity_runs(results, refs)


def _check_capacity_runs(results: list[dict], refs: dict[str, dict[str, list[int]]]) -> None:
    for name, model, _, ep in CAPACITY_RUNS:
        groups = [results] if ep == WORLD else [results[:2], results[2:]]
        for group in groups:
            merged: dict[str, list[int]] = {}
            for res in group:
                merged.update(res[name]["tokens"])
            assert merged == refs[model], f"{name}: tokens differ from one rank"
            # every rank of a deployment re-ran the same steps (each decided alone, from the flags it received)
            assert len({res[name]["reruns"] for res in group}) == 1, name
    # EP x TP: leaders and followers re-ran the same steps, and the tokens are exact
    tp_tokens = results[0]["qwen/capacity_tp2"]["tokens"] | results[2]["qwen/capacity_tp2"]["tokens"]
    assert tp_tokens == refs["qwen"], "DP=2 x TP=2 x EP=4 with fixed capacity: tokens differ from one rank"
    tp_reruns = {res["qwen/capacity_tp2"]["reruns"] for res in results}
    assert len(tp_reruns) == 1 and tp_reruns.pop() > 0
    skewed = [res[f"glm_skew/{run}"] for res in results for run in ("capacity", "capacity_ep2")]
    assert all(r["reruns"] > 0 for r in skewed)  # the slots overflowed, and the tokens above are still exact
    # the ranks that routed tokens to the last rank overflowed; a re-run step counts its routing once, so the
    # routed counts are what one pass routes: as many (token, expert) pairs as the same run without capacity
    for run in ("capacity", "capacity_ep2"):
        assert sum(res[f"glm_skew/{run}"]["overflow_pairs"] for res in results) > 0
    for capacity_run, plain_run in (("qwen/capacity", "qwen/sparse"), ("glm_skew/capacity", "glm_skew/sparse_cap2")):
        routed = [torch.tensor([res[run]["routed"] for res in results]).sum(0) for run in (capacity_run, plain_run)]
        assert torch.equal(*routed), capacity_run
    # random routing: the fixed slots moved fewer bytes than allgather would have, re-runs included
    for res in results:
        traffic = torch.tensor(res["qwen/capacity"]["traffic"])  # [layer, (bytes, allgather-equivalent, pairs)]
        assert (traffic[:, 0] < traffic[:, 1]).all(), traffic
