"""Structured outputs through the engine with a tiny random model (byte-level tokenizer): whatever the
model prefers, the output parses and validates, and ends by EOS only where the grammar accepts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch

from runtime.sampling_params import SamplingParams
from runtime.structured_output import GrammarCompiler, GrammarError, apply_bitmask
from tests.tiny import make_tiny_checkpoint

# every string and object bounded: a random model ends any bounded grammar within max_tokens, but an open
# one (a free property name) can run on past it
S = {"type": "string", "maxLength": 12}
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 3}}, "required": ["tags"],
     "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": 0, "maximum": 1}, "y": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"const": 7}}, "required": ["c"], "additionalProperties": False}}, "required": ["b"],
        "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 100, "maximum": 999},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{8}$"}}, "required": ["id"],
     "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0,
     "maximum": 10}}, "required": ["kind", "radius"], "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["n"], "additionalProperties": False}, {"type": "null"}]},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"],
     "additionalProperties": False},
    {"type": "object", "properties": {"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 50}},
     "required": ["v"], "additionalProperties": False},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": [1, 2]}], "items": False, "minItems": 2},
    {"type": "object", "properties": {"m": {"type": "object", "additionalProperties": {"type": "integer",
     "minimum": 0, "maximum": 3}, "maxProperties": 2}}, "required": ["m"], "additionalProperties": False},
    {"$defs": {"leaf": {"type": "object", "properties": {"v": {"enum": ["p", "q"]}}, "required": ["v"],
                        "additionalProperties": False}},
     "type": "object", "properties": {"l": {"$ref": "#/$defs/leaf"}, "r": {"$ref": "#/$defs/leaf"}},
     "required": ["l", "r"], "additionalProperties": False},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.com$"}},
     "required": ["email"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": -1, "maximum": 1}, "label": S,
     "extra": {"type": "array", "items": {"type": "null"}, "maxItems": 2}}, "required": ["score", "label", "extra"]},
]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from runtime.llm import LLM

    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_so")), "Qwen3ForCausalLM")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield LLM(path, device="cpu", dtype="float32", kv_cache_memory=16 << 20)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compiler(llm: Any) -> GrammarCompiler:
    return GrammarCompiler(llm.tokenizer, llm.engine.hf_config.vocab_size, [0])


def test_twenty_json_schemas_validate(llm: Any, compiler: GrammarCompiler) -> None:
    assert len(SCHEMAS) == 20
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=300, grammar=compiler("json", s))
        for i, s in enumerate(SCHEMAS)
    ]
    outs = llm.generate(["Answer in JSON:"] * len(SCHEMAS), params)
    for schema, out in zip(SCHEMAS, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)
    assert not llm.engine.structured.active  # every matcher released at finish


def test_regex_choice_grammar_and_greedy(llm: Any, compiler: GrammarCompiler) -> None:
    cases = [
        ("regex", r"[A-Z]{3}-\d{2,4}", lambda t: re.fullmatch(r"[A-Z]{3}-\d{2,4}", t)),
        ("choice", ["alpha", "beta", "gamma delta"], lambda t: t in ("alpha", "beta", "gamma delta")),
        ("grammar", 'root ::= "(" [a-c] [a-c]? [a-c]? ")" ("!" | "?")',
         lambda t: re.fullmatch(r"\([a-c]{1,3}\)[!?]", t)),
        ("grammar", 'start: "x" NUM\nNUM: /[0-9]{2}/', lambda t: re.fullmatch(r"x[0-9]{2}", t)),
    ]
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, seed=3, max_tokens=200, grammar=compiler(k, s))
                  for k, s, _ in cases]
        # an unconstrained request in the same batch is untouched
        params.append(SamplingParams(temperature=0.0, max_tokens=8))
        outs = llm.generate(["q"] * len(params), params)
        for (kind, _, check), out in zip(cases, outs):
            assert out.outputs[0].finish_reason == "stop" and check(out.outputs[0].text), (kind, out.outputs[0].text)
        free = llm.generate(["q"], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0].token_ids
        assert outs[-1].outputs[0].token_ids == free
    # any JSON object: a random model may pick digits forever; logit_bias on '}' makes it close soon
    (brace,) = llm.tokenizer.encode("}", add_special_tokens=False)
    out = llm.generate(["q"], SamplingParams(temperature=1.0, seed=1, max_tokens=200, logit_bias={brace: 8.0},
                                             grammar=compiler("json_object", None)))[0].outputs[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)


def test_bad_grammars_are_errors(compiler: GrammarCompiler) -> None:
    for kind, spec in [("json", {"type": "nonsense"}), ("regex", "a("), ("choice", []), ("grammar", "root ::= (")]:
        with pytest.raises(GrammarError):
            compiler(kind, spec)


def test_apply_bitmask_rows_only() -> None:
    logits = torch.zeros(3, 70)
    mask = torch.zeros(1, 3, dtype=torch.int32)
    mask[0, 0] = 1 << 5  # token 5
    mask[0, 2] = 1 << 3  # token 67
    out = apply_bitmask(logits, [1], mask)
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [5, 67]
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


@pytest.mark.parametrize("vocab,num_words", [(70, 3), (1000, 32), (130, 4), (200, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bitmask_kernel_matches_reference(vocab: int, num_words: int, dtype: torch.dtype) -> None:
    from kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU runs the kernel in Triton's interpreter)
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g).to(dtype).to(dev)
    rows = torch.tensor([4, 0, 5], dtype=torch.int32, device=dev)
    # random words, sign bit included (int32 arithmetic shifts must not leak it into other bits)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, num_words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask = bitmask.to(dev)
    want = logits.clone()
    apply_token_bitmask_ref(want, rows, bitmask)
    got = logits.clone()
    apply_token_bitmask(got, rows, bitmask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(got[[1, 2, 3]], logits[[1, 2, 3]])
    if num_words * 32 < vocab:
        assert torch.isinf(got[[4, 0, 5], num_words * 32 :]).all()


def test_broken_grammar_stops_its_request_not_the_rank(llm: Any) -> None:
    # the front end validates grammars; one that still fails in the engine ends its request, others run on
    outs = llm.generate(["q", "q"], [SamplingParams(max_tokens=5, grammar="{not a grammar"),
                                     SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)])
    assert outs[0].outputs[0].finish_reason == "stop" and len(outs[0].outputs[0].token_ids) == 1
    assert len(outs[1].outputs[0].token_ids) == 5


def test_abort_releases_and_resume_continues_the_grammar(llm: Any, compiler: GrammarCompiler) -> None:
    from runtime.messages import AddRequest

    engine = llm.engine
    schema = SCHEMAS[0]
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=120, grammar=compiler("json", schema))
    prompt = llm.tokenizer.encode("JSON please:")
    engine.add_request(AddRequest("abort-me", prompt, params))
    engine.step()
    assert engine.structured.has("abort-me")
    engine.abort_requests(["abort-me"])
    assert not engine.structured.active
    # an engine restart re-submits a request with its earlier output inside the prompt: the new matcher
    # consumes those tokens first, so the continuation completes the same document
    first = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
    resumed = AddRequest("resumed", prompt + first[:4], params, num_generated_before=4)
    engine.add_request(resumed)
    tail: list[int] = []
    while engine.has_unfinished():
        for delta in engine.step():
            tail += delta.new_token_ids
    text = llm.tokenizer.decode(first[:4] + tail, skip_special_tokens=True)
    jsonschema.validate(json.loads(text), schema)


def test_grammar_waits_for_the_end_of_thinking(llm: Any, compiler: GrammarCompiler) -> None:
    from runtime.messages import AddRequest

    grammar = compiler("choice", ["yes", "no"])
    prompt = llm.tokenizer.encode("Think first:")
    free = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=8))[0]
    # the model never closes its think block: the grammar never starts, the reasoning runs free
    waiting = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
        temperature=0.0, max_tokens=8, grammar=grammar, grammar_after="</think>"))[0]
    assert waiting.outputs[0].token_ids == free.outputs[0].token_ids
    assert not llm.engine.structured.active
    # once "</think>" shows (here: in the earlier output of a resumed request, spelled by several tokens),
    # the answer follows the grammar
    earlier = llm.tokenizer.encode("hmm</think>", add_special_tokens=False)
    engine = llm.engine
    engine.add_request(AddRequest("after-think", prompt + earlier, SamplingParams(
        temperature=0.0, max_tokens=20, grammar=grammar, grammar_after="</think>"), num_generated_before=len(earlier)))
    tail: list[int] = []
    while engine.has_unfinished():
        for delta in engine.step():
            tail += delta.new_token_ids
    assert llm.tokenizer.decode(tail, skip_special_tokens=True) in ("yes", "no")


@pytest.mark.gpu
def test_twenty_json_schemas_on_the_gpu(tmp_path: Any) -> None:
    """The CUDA path: pinned bitmask buffer, Triton mask kernel, CUDA-graph decode steps."""
    from runtime.llm import LLM

    path = make_tiny_checkpoint(str(tmp_path), "Qwen3MoeForCausalLM")
    llm = LLM(path, device="cuda", dtype="bfloat16", kv_cache_memory=256 << 20)  # whatever else holds the GPU
    compiler = GrammarCompiler(llm.tokenizer, llm.engine.hf_config.vocab_size, [0])
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=300, grammar=compiler("json", s))
              for i, s in enumerate(SCHEMAS)]
    params += [SamplingParams(temperature=0.0, max_tokens=16)] * 20  # unconstrained neighbours
    outs = llm.generate(["Answer in JSON:"] * len(params), params)
    import llguidance

    finished = 0
    for i, (schema, out) in enumerate(zip(SCHEMAS, outs)):
        completion = out.outputs[0]
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), schema)
            finished += 1
            continue
        # a JSON number's digits are unbounded: a random model sampling at temperature 1 may still be writing
        # one at max_tokens. Such an output must be a prefix the grammar accepts, token by token.
        assert completion.finish_reason == "length", (i, completion.finish_reason)
        matcher = llguidance.LLMatcher(compiler._tokenizer, params[i].grammar)
        assert matcher.consume_tokens(list(completion.token_ids)), (i, schema, completion.text)
    assert finished >= 15, f"only {finished} of 20 schemas completed within 300 tokens"
