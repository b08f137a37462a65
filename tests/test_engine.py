"""End to end on the CPU: our engine's greedy tokens equal transformers' generate, for every
architecture, also with chunked prefill, prefix-cache hits and preemption."""

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.engine.llm_engine import RequestError
from runtime.messages import AddRequest
from tests.tiny import ARCHS, make_tiny_checkpoint

NUM_TOKENS = 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_tiny_checkpoint(str(root / arch), arch) for arch in ARCHS}


def prompts(lengths=(5, 11, 17), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(path: str, prompt_ids: list[list[int]], n: int = NUM_TOKENS) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = []
    for ids in prompt_ids:
        gen = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids) :].tolist()
        eos = model.generation_config.eos_token_id
        if eos in gen:  # transformers pads after the eos; we stop there
            gen = gen[: gen.index(eos) + 1]
        outs.append(gen)
    return outs


def ours(llm: LLM, prompt_ids: list[list[int]], n: int = NUM_TOKENS) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], SamplingParams(temperature=0, max_tokens=n))
    return [o.outputs[0].token_ids for o in outs]


def make_llm(path: str, **kw) -> LLM:
    kw = {"dtype": "float32", "device": "cpu", "kv_cache_memory": 8 << 20, "block_size": 8, **kw}
    return LLM(model=path, **kw)


def assert_no_leak(llm: LLM) -> None:
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.engine.has_unfinished() and not llm.engine.requests


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(checkpoints, arch):
    p = prompts()
    llm = make_llm(checkpoints[arch])
    got = ours(llm, p)
    assert got == hf_greedy(checkpoints[arch], p)
    assert any(len(set(t)) > 3 for t in got)  # not a degenerate model
    assert_no_leak(llm)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Glm4MoeForCausalLM"])
def test_chunked_prefill_tiny_budget(checkpoints, arch):
    p = prompts((19, 9, 23), seed=1)
    llm = make_llm(checkpoints[arch], max_num_batched_tokens=7)
    assert ours(llm, p) == hf_greedy(checkpoints[arch], p)
    assert_no_leak(llm)


def test_prefix_cache_hits(checkpoints):
    arch = "Qwen3MoeForCausalLM"
    shared = prompts((24,), seed=2)[0]
    a = shared + [7, 8, 9]
    b = shared + [11, 12, 13, 14, 15]
    llm = make_llm(checkpoints[arch])
    first = ours(llm, [a])
    hits_before = llm.engine.block_manager.num_prefix_hits
    outs = llm.generate(
        [{"prompt_token_ids": b}, {"prompt_token_ids": a}], SamplingParams(temperature=0, max_tokens=NUM_TOKENS)
    )
    assert outs[0].num_cached_tokens == 24  # the three shared full blocks
    assert outs[1].num_cached_tokens == 24  # a repeat: every full block but the one holding the last token
    assert llm.engine.block_manager.num_prefix_hits - hits_before == 48
    ref = hf_greedy(checkpoints[arch], [b, a])
    assert [o.outputs[0].token_ids for o in outs] == ref and first == [ref[1]]
    assert_no_leak(llm)


def test_preemption_by_recompute(checkpoints):
    arch = "Qwen3MoeForCausalLM"
    p = prompts((17, 13, 15, 11), seed=3)
    # 14 blocks of 8 tokens cannot hold 4 x (up to 49 tokens): the newest requests get preempted
    llm = make_llm(checkpoints[arch], num_gpu_blocks_override=14, max_model_len=64)
    got = ours(llm, p)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == hf_greedy(checkpoints[arch], p)
    assert_no_leak(llm)


def test_first_delta_carries_queue_and_prefill_time(checkpoints):
    # one sequence at a time: the second request waits in the engine's queue while the first runs
    llm = make_llm(checkpoints["Qwen3MoeForCausalLM"], max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for rid, ids in zip("ab", prompts((9, 7))):
        llm.engine.add_request(AddRequest(rid, ids, params))
    deltas = []
    while llm.engine.has_unfinished():
        deltas += llm.engine.step()
    timed = {d.request_id: (d.queue_time, d.prefill_time) for d in deltas if d.queue_time is not None}
    assert [d.request_id for d in deltas if d.prefill_time is not None] == ["a", "b"]  # the first delta only
    assert [d.num_prompt_tokens > 0 for d in deltas] == [d.queue_time is not None for d in deltas]
    (queue_a, prefill_a), (queue_b, prefill_b) = timed["a"], timed["b"]
    assert 0 <= queue_a < queue_b and prefill_a > 0 and prefill_b > 0
    # b's wait spans a's whole run, its prefill included, on the same clock
    assert queue_b >= prefill_a
    assert_no_leak(llm)


def test_stop_strings_n_seeds_and_errors(checkpoints):
    llm = make_llm(checkpoints["Qwen3MoeForCausalLM"])
    tok = llm.get_tokenizer()
    base = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    text = base.outputs[0].text
    assert text and base.outputs[0].finish_reason == "length"
    stop = text[len(text) // 2 :][:3]
    cut = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert cut.outputs[0].text == text[: text.index(stop)]
    # n samples with a seed: reproducible, and different from each other
    params = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=10, ignore_eos=True)
    one, two = llm.generate("abc", params)[0], llm.generate("abc", params)[0]
    assert [c.token_ids for c in one.outputs] == [c.token_ids for c in two.outputs]
    assert len({tuple(c.token_ids) for c in one.outputs}) > 1
    with pytest.raises(RequestError, match="context"):
        llm.engine.add_request(AddRequest("long", list(range(3, 3 + 600)), SamplingParams()))
    assert tok is not None and llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4))
    assert_no_leak(llm)
