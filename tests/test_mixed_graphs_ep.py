"""Mixed-step buckets under the DP + EP lockstep on 2 gloo ranks: every step runs the size both ranks agree on
(ModelRunner.padded_size of the larger plan, as the rank loop does), so a rank that decodes, mixes or idles
(dummy step) while the other takes a prompt's chunk pads to the same bucket; greedy tokens equal one rank's."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from tests.test_all2all import free_port, spawn_ranks_json

TIMEOUT_S = 120
WORLD = 2
BUCKETS = [8, 16, 32]
LENGTHS = (5, 30, 1, 13, 50, 9)  # prompt i arrives at step 2 i on rank i % 2


def _config(model: str, dp: int):  # noqa: ANN202
    from runtime.config import EngineConfig

    return EngineConfig(model=model, device="cpu", kv_cache_memory=8 << 20, max_num_seqs=6, max_num_batched_tokens=24,
                        max_model_len=128, data_parallel_size=dp, enable_expert_parallel=dp > 1)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in LENGTHS]


def _params():  # noqa: ANN202
    from runtime.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _worker(rank: int, world: int, port: int, model: str, result_dir: str) -> None:
    from runtime.cluster.rank_loop import build_engine
    from runtime.distributed.parallel import destroy_parallel, init_parallel
    from runtime.engine.mixed_graphs import MixedGraphs, model_tile_q
    from runtime.messages import AddRequest

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    config = _config(model, world)
    parallel = init_parallel(config)
    group = dist.new_group(backend="gloo")
    engine, _ = build_engine(config, parallel)
    runner = engine.runner
    tile_q = model_tile_q(runner.model, runner.kv_cache.dtype, runner.device)
    runner.mixed = MixedGraphs(BUCKETS, config.max_num_seqs, tile_q)  # eager buckets (no graphs on the CPU)
    bucketed: list[bool] = []
    prepare = runner.prepare

    def recording_prepare(plan):  # noqa: ANN001, ANN202
        prepared = prepare(plan)
        bucketed.append(prepared.forward_batch.prefill_tiles is not None)
        return prepared

    runner.prepare = recording_prepare
    prompts, tokens, steps = _prompts(), {}, []
    step = 0
    while True:
        if step % 2 == 0 and step // 2 < len(prompts) and (step // 2) % world == rank:
            engine.add_request(AddRequest(str(step // 2), prompts[step // 2], _params()))
        num_tokens = engine.schedule()
        prefill = num_tokens > 0 and not engine.planned.is_decode
        agreed = torch.tensor([num_tokens, int(engine.has_unfinished() or step < 2 * len(prompts))])
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        step += 1
        if agreed[0] == 0:
            if agreed[1] == 0:
                break
            continue
        pad_to = engine.padded_size(int(agreed[0]))  # as the rank loop's _agreed_size
        ran = len(bucketed)
        for d in engine.execute(pad_to=pad_to):
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
        kind = "dummy" if num_tokens == 0 else ("prefill" if prefill else "decode")
        steps.append((step, pad_to, kind, len(bucketed) > ran and bucketed[-1]))
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"tokens": tokens, "steps": steps}, f)
    destroy_parallel()


def test_ep_ranks_pad_mixed_steps_to_the_same_bucket(tmp_path) -> None:  # noqa: ANN001
    from runtime import LLM
    from tests.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(str(tmp_path / "qwen"), "Qwen3MoeForCausalLM")
    llm = LLM(model=model, device="cpu", kv_cache_memory=8 << 20, max_num_seqs=6, max_num_batched_tokens=24,
              max_model_len=128)
    ref = {str(i): o.outputs[0].token_ids for i, o in enumerate(llm.generate(
        [{"prompt_token_ids": p} for p in _prompts()], _params()))}
    results = spawn_ranks_json(_worker, lambda d: (WORLD, free_port(), model, d), WORLD, TIMEOUT_S,
                               "mixed-bucket EP ranks")
    tokens = {k: v for res in results for k, v in res["tokens"].items()}
    assert tokens == ref
    steps = [{s[0]: s[1:] for s in res["steps"]} for res in results]
    assert steps[0].keys() == steps[1].keys()
    pairs = [(steps[0][k], steps[1][k]) for k in steps[0]]
    assert all(a[0] == b[0] for a, b in pairs)  # one size per step on both ranks
    # a rank's chunk in a bucket while the other ran a dummy step, or its decodes in the same bucket's layout
    kinds = {(x[2], y[1], y[2]) for a, b in pairs for x, y in ((a, b), (b, a)) if x[1] == "prefill"}
    assert (True, "dummy", False) in kinds and (True, "decode", True) in kinds
