"""Tensor parallelism on gloo ranks: greedy tokens with TP=2 and TP=4 (and DP=2 x TP=2 x EP=4) equal
transformers' for every architecture, with odd vocabularies and fewer KV heads than TP ranks; so do the
prompt logprobs that some requests ask for (scored over chunked prefills, the peers joining each gather).

One spawn of 4 ranks runs every layout: TP=4 (one engine), DP=2 x TP=2 (two engines, free running) and, for
the MoE models, DP=2 x TP=2 with expert parallel over all 4 ranks (lockstep, a gloo all-reduce of the two TP
leaders standing in for the coordinator). TP rank 0 schedules and samples; its peers run the broadcast plans.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from runtime.config import ConfigError, EngineConfig
from tests.test_all2all import free_port, spawn_ranks_json
from tests.test_engine import hf_greedy, prompts

TIMEOUT_S = 120
NUM_TOKENS = 10
MOE = ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "Glm4MoeForCausalLM")
# odd vocabularies (padded per TP rank); Llama has 1 KV head, Qwen3 2: both fewer than 4 TP ranks
OVERRIDES = {
    "Qwen3MoeForCausalLM": dict(vocab_size=515),
    "MixtralForCausalLM": dict(vocab_size=517, num_key_value_heads=4),
    "Glm4MoeForCausalLM": dict(vocab_size=513),
    "LlamaForCausalLM": dict(vocab_size=519, num_key_value_heads=1),
    "Qwen3ForCausalLM": dict(vocab_size=514),
}


def _config(model: str, dp: int, tp: int, ep: bool = False, **kw: object) -> EngineConfig:
    return EngineConfig(model=model, device="cpu", dtype="float32", kv_cache_memory=8 << 20, block_size=8,
                        max_num_seqs=8, max_num_batched_tokens=16, max_model_len=128, data_parallel_size=dp,
                        tensor_parallel_size=tp, enable_expert_parallel=ep, **kw)


PROMPT_LOGPROBS = 2  # asked by the even-numbered prompts


def _params(i: int):  # noqa: ANN202
    from runtime.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, prompt_logprobs=None if i % 2 else PROMPT_LOGPROBS)


def _lead(engine, prompts: dict[int, list[int]], leaders=None) -> tuple[dict, dict]:  # noqa: ANN001
    """TP rank 0: schedule, run, sample; free running, or lockstep with the other DP leaders.
    Returns the tokens and the prompt logprobs of each request (by prompt index)."""
    from runtime.messages import AddRequest

    for i, p in prompts.items():
        engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=_params(i)))
    out: dict[str, list[int]] = {}
    prompt_lps: dict[str, list] = {}
    while True:
        num_tokens = engine.schedule()
        if leaders is None:
            if num_tokens == 0:
                break
            deltas = engine.execute()
        else:
            agreed = torch.tensor([num_tokens, int(engine.has_unfinished())])
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=leaders)
            if agreed[1] == 0:
                break
            if agreed[0] == 0:
                continue
            deltas = engine.execute(pad_to=engine.padded_size(int(agreed[0])))
        for d in deltas:
            out.setdefault(d.request_id, []).extend(d.new_token_ids)
            if d.prompt_logprobs is not None:
                prompt_lps[d.request_id] = d.prompt_logprobs
    engine.runner.stop_followers()
    return out, prompt_lps


def _worker(rank: int, world: int, port: int, models: dict[str, str], result_dir: str) -> None:
    from runtime.cluster.rank_loop import build_engine, tp_follower_stats
    from runtime.distributed.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    first = next(iter(models.values()))
    layouts = {"tp4": init_parallel(_config(first, 1, 4)), "dp2tp2": init_parallel(_config(first, 2, 2)),
               "dp2tp2ep4": init_parallel(_config(models[MOE[0]], 2, 2, ep=True))}
    leaders = dist.new_group([0, 2], backend="gloo")
    result: dict[str, object] = {}
    for arch, model in models.items():
        for name, parallel in layouts.items():
            ep = name.endswith("ep4")
            if ep and arch not in MOE:
                continue
            engine, stats = build_engine(_config(model, parallel.dp_size, parallel.tp_size, ep), parallel)
            if parallel.is_tp_leader:
                # each DP rank serves its own share of the prompts
                mine = {i: p for i, p in enumerate(prompts()) if i % parallel.dp_size == parallel.dp_rank}
                result[f"{arch}/{name}"], result[f"{arch}/{name}/plp"] = _lead(engine, mine, leaders if ep else None)
            else:
                engine.runner.follow(tp_follower_stats(stats, parallel))
            spec = engine.model.kv_cache_spec()
            result[f"{arch}/{name}/kv_heads"] = spec.num_kv_heads
            result[f"{arch}/{name}/bytes"] = engine.model.load_stats["bytes"]
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    destroy_parallel()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tp")
    return {arch: make_tiny_checkpoint(str(root / arch), arch, **kw) for arch, kw in OVERRIDES.items()}


def hf_prompt_logprobs(path: str, prompt_ids: list[list[int]], top_n: int) -> list[list]:
    """transformers' logprob and rank of each prompt token after the first, and the top_n, as we report them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    for ids in prompt_ids:
        with torch.no_grad():
            lps = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)  # [n - 1, vocab]
        target = torch.tensor(ids[1:])
        token_lp = lps.gather(1, target[:, None])[:, 0]
        ranks = (lps > token_lp[:, None]).sum(-1) + 1
        top_lp, top_ids = lps.topk(top_n, dim=-1)
        out.append([[[t, lp, r]] + [[i, v, k + 1] for k, (i, v) in enumerate(zip(ti, tl))]
                    for t, lp, r, ti, tl in zip(ids[1:], token_lp.tolist(), ranks.tolist(), top_ids.tolist(),
                                                top_lp.tolist())])
    return out


def _assert_prompt_logprobs_close(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} scored prompt tokens, expected {len(want)}"
    for pos, (g, w) in enumerate(zip(got, want)):
        assert [e[0] for e in g] == [e[0] for e in w] and [e[2] for e in g] == [e[2] for e in w], \
            f"{what}: prompt position {pos + 1}: ids/ranks {g} vs {w}"
        assert max(abs(a[1] - b[1]) for a, b in zip(g, w)) < 1e-4, f"{what}: prompt position {pos + 1}: {g} vs {w}"


def test_tp_greedy_tokens_equal_transformers(models: dict[str, str]) -> None:
    world = 4
    refs = {arch: hf_greedy(path, prompts(), NUM_TOKENS) for arch, path in models.items()}
    ref_lps = {arch: hf_prompt_logprobs(path, prompts(), PROMPT_LOGPROBS) for arch, path in models.items()}
    results = spawn_ranks_json(_worker, lambda d: (world, free_port(), models, d), world, TIMEOUT_S, "TP ranks")
    for arch, ref in refs.items():
        expected = {str(i): t for i, t in enumerate(ref)}
        assert results[0][f"{arch}/tp4"] == expected, f"{arch}: TP=4 tokens differ from transformers"
        dp2 = results[0][f"{arch}/dp2tp2"] | results[2][f"{arch}/dp2tp2"]
        assert dp2 == expected, f"{arch}: DP=2 x TP=2 tokens differ from transformers"
        if arch in MOE:
            ep = results[0][f"{arch}/dp2tp2ep4"] | results[2][f"{arch}/dp2tp2ep4"]
            assert ep == expected, f"{arch}: DP=2 x TP=2 x EP=4 tokens differ from transformers"
        for name in ("tp4", "dp2tp2") + (("dp2tp2ep4",) if arch in MOE else ()):
            got = results[0][f"{arch}/{name}/plp"] | results[2].get(f"{arch}/{name}/plp", {})
            assert sorted(got) == [str(i) for i in range(0, len(ref), 2)], f"{arch}/{name}: prompt logprobs of {got}"
            for i, lps in got.items():
                _assert_prompt_logprobs_close(lps, ref_lps[arch][int(i)], f"{arch}/{name} prompt {i}")
        # each rank holds (and read) only its share: fewer bytes than the whole checkpoint at TP=2, fewer at 4
        tp4, tp2 = results[1][f"{arch}/tp4/bytes"], results[1][f"{arch}/dp2tp2/bytes"]
        assert tp4 < tp2, f"{arch}: a TP=4 rank read {tp4} bytes, a TP=2 rank {tp2}"
    # KV heads per rank: split when there are enough, one replicated head otherwise
    assert results[3]["LlamaForCausalLM/tp4/kv_heads"] == 1 and results[3]["MixtralForCausalLM/tp4/kv_heads"] == 1
    assert results[1]["MixtralForCausalLM/dp2tp2/kv_heads"] == 2 and results[1]["Qwen3ForCausalLM/dp2tp2/kv_heads"] == 1


def test_tp_sizes_that_do_not_divide_fail_at_start(models: dict[str, str]) -> None:
    from runtime.serve import check_launch

    qwen = models["Qwen3MoeForCausalLM"]
    with pytest.raises(ConfigError, match=r"size 32 is not divisible by the tensor-parallel size 3"):
        check_launch(_config(qwen, 1, 3), env={})
    with pytest.raises(ConfigError, match=r"num_attention_heads 4 is not divisible by the tensor-parallel size 8"):
        check_launch(_config(models["LlamaForCausalLM"], 1, 8), env={})
    with pytest.raises(ConfigError, match=r"6 ranks but --data-parallel-size 2 x --tensor-parallel-size 2 = 4"):
        check_launch(_config(qwen, 2, 2), env={"LOCAL_RANK": "0", "WORLD_SIZE": "6", "RANK": "0"})
    with pytest.raises(ConfigError, match="--tensor-parallel-size must be positive"):
        _config(qwen, 1, 0)
    check_launch(_config(models["LlamaForCausalLM"], 1, 4), env={})  # 1 KV head: replicated, fine


def _load(path: str, tp_rank: int = 0, tp_size: int = 1, **kw: object) -> torch.nn.Module:
    from models.args import ModelArgs, TensorParallel
    from models.loader import load_model
    from tests.test_models import read_config

    args = ModelArgs(dtype=torch.float32, tp=TensorParallel(tp_rank, tp_size), **kw)  # loading needs no group
    return load_model(path, read_config(path), args)


def _shard(full: torch.Tensor, name: str, rank: int, size: int, model: torch.nn.Module) -> torch.Tensor:
    """What a TP rank's parameter must hold, cut out of the TP=1 model's parameter."""
    def cut(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = -(-t.shape[dim] // size)  # vocab rows are padded with zeros to a multiple of size
        t = torch.nn.functional.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, n * size - t.shape[dim]])
        return t.narrow(dim, rank * n, n)

    if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
        attn = model.get_submodule(name.rpartition(".")[0])
        q, k, _ = attn.out_sizes
        head = attn.head_dim
        kv = k // head
        kv_rank = rank * kv // size if kv < size else rank
        parts = [cut(full[:q], 0)]
        for off in (q, q + k):
            part = full[off : off + k]
            parts.append(part[kv_rank * head : (kv_rank + 1) * head] if kv < size else cut(part, 0))
        return torch.cat(parts)
    if name.endswith(("gate_up_proj.weight", "experts.w13")):
        gate, up = full.chunk(2, dim=-2)
        return torch.cat([cut(gate, gate.dim() - 2), cut(up, up.dim() - 2)], dim=-2)
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
        return cut(full, full.dim() - 1)
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return cut(full, 0)
    return full


@pytest.mark.parametrize("tp_rank, tp_size", [(1, 2), (3, 4)])
def test_weight_loaders_read_only_their_shard(models: dict[str, str], tp_rank: int, tp_size: int) -> None:
    for arch, path in models.items():
        full = _load(path)
        part = _load(path, tp_rank, tp_size)
        fulls = dict(full.named_parameters())
        for name, p in part.named_parameters():
            torch.testing.assert_close(p, _shard(fulls[name], name, tp_rank, tp_size, part), atol=0, rtol=0,
                                       msg=f"{arch} {name} at TP rank {tp_rank}/{tp_size}")
        assert part.load_stats["bytes"] < full.load_stats["bytes"] / 1.5, arch


@pytest.mark.parametrize("tp_rank, tp_size", [(1, 2), (3, 4)])
def test_dummy_weights_are_shards_of_one_model(models: dict[str, str], tp_rank: int, tp_size: int) -> None:
    """--load-format dummy under TP: each rank holds its slice of the TP=1 dummy model (not a draw of its own),
    so dummy runs compare across TP sizes (issue 18: real-shaped tokens of TP=2 vs one GPU)."""
    from models.args import ModelArgs, TensorParallel
    from models.loader import load_model
    from tests.test_models import read_config

    for arch, path in models.items():
        full, part = (load_model(path, read_config(path), ModelArgs(dtype=torch.float32, tp=TensorParallel(r, n)),
                                 load_format="dummy") for r, n in ((0, 1), (tp_rank, tp_size)))
        fulls = dict(full.named_parameters())
        for name, p in part.named_parameters():
            torch.testing.assert_close(p, _shard(fulls[name], name, tp_rank, tp_size, part), atol=0, rtol=0,
                                       msg=f"{arch} {name} at TP rank {tp_rank}/{tp_size}")


def test_fp8_checkpoint_under_tp(tmp_path) -> None:  # noqa: ANN001
    from kernels.fp8 import dequantize_weight_block
    from models.loader import LoadError
    from tests.test_models import _fp8_checkpoint
    from tests.tiny import make_tiny_checkpoint

    # dense projections are dequantized on read; a TP shard starting inside a 128-block reads the whole block
    src = make_tiny_checkpoint(str(tmp_path / "f"), "Qwen3MoeForCausalLM", moe_intermediate_size=256,
                               num_hidden_layers=2)
    _fp8_checkpoint(src, str(tmp_path / "fp8"))
    full, part = _load(str(tmp_path / "fp8")), _load(str(tmp_path / "fp8"), 1, 2)
    fulls = dict(full.named_parameters())
    for name, p in part.named_parameters():
        if p.dtype == torch.float32 and not name.endswith("_scale"):
            torch.testing.assert_close(p, _shard(fulls[name], name, 1, 2, part), atol=0, rtol=0, msg=name)
    # FP8 experts stay FP8: each rank's intermediate rows with their own block scales
    e_full, e_part = full.model.layers[1].mlp.experts, part.model.layers[1].mlp.experts
    w_full = dequantize_weight_block(e_full.w13, e_full.w13_scale, torch.float32)
    w_part = dequantize_weight_block(e_part.w13, e_part.w13_scale, torch.float32)
    torch.testing.assert_close(w_part, _shard(w_full, "experts.w13", 1, 2, part), atol=0, rtol=0)
    # intermediate 256 / 4 ranks = 64 rows: not whole 128-blocks of scales
    with pytest.raises(LoadError, match="multiple of 128"):
        _load(str(tmp_path / "fp8"), 1, 4)


def test_stacked_fp8_experts_under_tp(tmp_path) -> None:  # noqa: ANN001
    # transformers-5 stacked experts in FP8 (gate_up_proj [E, 2I, H] + its block scales) load the same shard as
    # the per-expert tensors, at expert ids > 0 of an EP slice too
    from safetensors.torch import load_file, save_file

    from tests.test_models import _copy, _fp8_checkpoint
    from tests.tiny import make_tiny_checkpoint

    src = make_tiny_checkpoint(str(tmp_path / "f"), "Qwen3MoeForCausalLM", moe_intermediate_size=256,
                               num_hidden_layers=2)
    _fp8_checkpoint(src, str(tmp_path / "fp8"))
    stacked = _copy(str(tmp_path / "fp8"), str(tmp_path / "stacked"))
    tensors = load_file(os.path.join(stacked, "model.safetensors"))
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts"
        for out, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            for suffix in ("", "_scale_inv"):
                tensors[f"{p}.{out}{suffix}"] = torch.stack([
                    torch.cat([tensors.pop(f"{p}.{e}.{part}.weight{suffix}") for part in parts]) for e in range(8)])
    save_file(tensors, os.path.join(stacked, "model.safetensors"))
    for kw in ({}, {"ep_rank": 1, "ep_size": 2}):
        a, b = _load(str(tmp_path / "fp8"), 1, 2, **kw), _load(stacked, 1, 2, **kw)
        for name in ("w13", "w2", "w13_scale", "w2_scale"):
            x, y = (getattr(m.model.layers[1].mlp.experts, name) for m in (a, b))
            assert torch.equal(x.view(torch.uint8) if x.dtype != torch.float32 else x,
                               y.view(torch.uint8) if y.dtype != torch.float32 else y), (kw, name)


def _gpu_worker(rank: int, world: int, port: int, models: dict[str, str], result_dir: str) -> None:
    from runtime.cluster.rank_loop import build_engine, tp_follower_stats
    from runtime.distributed.parallel import destroy_parallel, init_parallel

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result: dict[str, object] = {}
    parallel = None
    for arch, model in models.items():
        # NCCL TP group, Triton kernels, CUDA graphs captured on both ranks (the decode steps replay them)
        config = EngineConfig(model=model, device="cuda", dtype="float32", kv_cache_memory=64 << 20, block_size=16,
                              max_num_seqs=8, max_model_len=128, tensor_parallel_size=world)
        parallel = parallel or init_parallel(config)
        engine, stats = build_engine(config, parallel)
        result[f"{arch}/graphs"] = engine.runner.graphs is not None
        if parallel.is_tp_leader:
            tokens, _ = _lead(engine, dict(enumerate(prompts())))
            result[arch] = {k: v for k, v in tokens.items()}
        else:
            engine.runner.follow(tp_follower_stats(stats, parallel))
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    destroy_parallel()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp2_nccl_cuda_graphs_equal_transformers(models: dict[str, str]) -> None:
    refs = {arch: hf_greedy(path, prompts(), NUM_TOKENS) for arch, path in models.items()}
    results = spawn_ranks_json(_gpu_worker, lambda d: (2, free_port(), models, d), 2, 600, "TP GPU ranks")
    for arch, ref in refs.items():
        assert results[0][f"{arch}/graphs"] and results[1][f"{arch}/graphs"]
        assert results[0][arch] == {str(i): t for i, t in enumerate(ref)}, arch
