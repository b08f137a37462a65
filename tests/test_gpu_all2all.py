"""On 2 CUDA GPUs (pytest -m gpu): DP=2/EP=2 with NCCL and CUDA graphs, the sparse all2all's fixed-capacity
exchange captured inside the decode graphs. Slots small enough that skewed routing overflows them: every
rank re-runs the same steps eagerly, and the greedy tokens equal those of T slots per destination (nothing
can overflow) and of one rank on the CPU. (The bytes are checked on the CPU: at these tiny decode sizes slots
this small overflow on random routing too.)"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from tests.test_all2all import free_port, spawn_ranks_json
from tests.test_all2all_engine import _skewed_copy
from tests.test_parallel import PROMPTS, _params, _reference

pytestmark = pytest.mark.gpu
WORLD = 2
# (name, --all2all-capacity-factor): 0 = T slots; 0.3 = 2 of 4 and 4 of 8 slots at the decode graph sizes
FACTORS = (("slots_T", 0.0), ("capacity", 0.3))
# FP8 dispatch (the pack kernel quantizes each row), qwen only: inside the decode graphs (with overflow re-runs) and
# eagerly without graphs (the dynamic mode at every size) the rows carry the same bytes, so the same tokens
FP8_RUNS = (("fp8_graphs", 0.3, False), ("fp8_eager", 0.0, True))


def _config(model: str, factor: float, **extra: object):  # noqa: ANN202
    from runtime.config import EngineConfig

    return EngineConfig(model=model, device="cuda", dtype="float32", kv_cache_memory=64 << 20, max_num_seqs=8,
                        max_num_batched_tokens=16, max_model_len=128, data_parallel_size=WORLD,
                        enable_expert_parallel=True, all2all_capacity_factor=factor, **extra)


def _lockstep(engine, group) -> dict[str, list[int]]:  # noqa: ANN001
    """As the rank loop: every rank runs the agreed size, rounded up to the CUDA-graph bucket."""
    out: dict[str, list[int]] = {}
    while True:
        num_tokens = engine.schedule()
        agreed = torch.tensor([num_tokens, int(engine.has_unfinished())])
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        if agreed[0] == 0:
            if agreed[1] == 0:
                return out
            continue
        for d in engine.execute(pad_to=engine.padded_size(int(agreed[0]))):
            out.setdefault(d.request_id, []).extend(d.new_token_ids)


def _worker(rank: int, port: int, models: dict[str, str], result_dir: str) -> None:
    from runtime.cluster.rank_loop import build_engine
    from runtime.distributed.parallel import destroy_parallel, init_parallel
    from runtime.messages import AddRequest

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    parallel = init_parallel(_config(models["qwen"], 0.0))
    group = dist.new_group(backend="gloo")
    result: dict[str, object] = {}
    runs = [(model, path, name, factor, {}) for model, path in models.items() for name, factor in FACTORS]
    runs += [("qwen", models["qwen"], name, factor, dict(all2all_fp8_dispatch=True, enforce_eager=eager))
             for name, factor, eager in FP8_RUNS]
    for model, path, name, factor, extra in runs:
        engine, stats = build_engine(_config(path, factor, **extra), parallel)
        assert (engine.runner.graphs is not None) != bool(extra.get("enforce_eager"))
        for i, p in enumerate(PROMPTS):
            if i % WORLD == rank:
                engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=_params(i)))
        result[f"{model}/{name}"] = {"tokens": _lockstep(engine, group), "reruns": stats.num_overflow_reruns}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    destroy_parallel()


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 CUDA GPUs")
def test_fixed_capacity_in_cuda_graphs(tmp_path) -> None:  # noqa: ANN001
    from tests.tiny import make_tiny_checkpoint

    glm = make_tiny_checkpoint(str(tmp_path / "glm"), "Glm4MoeForCausalLM")
    models = {"qwen": make_tiny_checkpoint(str(tmp_path / "qwen"), "Qwen3MoeForCausalLM"),
              "glm_skew": _skewed_copy(glm, str(tmp_path / "glm_skew"))}
    refs = {name: _reference(path)["tokens"] for name, path in models.items()}  # one rank, CPU
    results = spawn_ranks_json(_worker, lambda d: (free_port(), models, d), WORLD, 300, "GPU EP ranks")
    for model in models:
        for name, _ in FACTORS:
            run = f"{model}/{name}"
            tokens = results[0][run]["tokens"] | results[1][run]["tokens"]
            assert tokens == refs[model], f"{run}: tokens differ from one rank"
            assert results[0][run]["reruns"] == results[1][run]["reruns"], run
    assert results[0]["glm_skew/capacity"]["reruns"] > 0 and results[0]["glm_skew/slots_T"]["reruns"] == 0
    fp8 = [results[0][f"qwen/{name}"]["tokens"] | results[1][f"qwen/{name}"]["tokens"] for name, _, _ in FP8_RUNS]
    assert fp8[0] == fp8[1] and len(fp8[0]) == len(PROMPTS), "FP8 dispatch: graph and eager tokens differ"
