"""vLLM's OpenAI surface over HTTP against the fake engine (it echoes the prompt, and the chat template here
makes the prompt the last message's text, so the 'model' writes what the test says). Streamed tool calls,
through the openai client: the deltas come in OpenAI's shape (index, id, type and name first, then argument
pieces over many chunks) and reassemble to the message.tool_calls of the non-streamed reply, finish_reason
tool_calls. Also /tokenize and /detokenize round trips, /version, /ping, and the series of vLLM's Grafana
board."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from runtime.config import EngineConfig
from runtime.messages import Addresses
from tests.fake_engine import FakeEngine
from tests.test_server_unit import _free_port
from tests.tiny import write_tokenizer

# the fake echoes the prompt: the output is the last message's text (after any documents), then EOS
TEMPLATE = "{% for d in documents or [] %}[{{ d.title }}]{% endfor %}{{ messages[-1]['content'] }}<|endoftext|>"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}}}}},
]
OUTPUTS = {
    ("hermes", "qwen3"): '<think>weather, then search</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", '
    '"arguments": {"city": "São Paulo", "days": 3}}\n</tool_call>\n<tool_call>\n{"name": "search", "arguments": '
    '{"query": "say \\"hi\\"\\n"}}\n</tool_call>',
    ("glm45", "glm45"): "<think>weather, then search</think>Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>"
    "\n<arg_value>São Paulo</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
    '<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>say "hi"\n</arg_value>\n</tool_call>',
}
EXPECTED = [("get_weather", '{"city": "São Paulo", "days": 3}'), ("search", '{"query": "say \\"hi\\"\\n"}')]


@pytest.fixture(scope="module", params=list(OUTPUTS), ids=lambda p: p[0])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    import uvicorn
    from transformers import AutoTokenizer

    from server.api_server import build_app
    from server.engine_client import EngineClient
    from server.metrics import Metrics

    tool_parser, reasoning_parser = request.param
    path = str(tmp_path_factory.mktemp("fake_tools"))
    write_tokenizer(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": 512, "max_position_embeddings": 1024, "architectures": ["Fake"]}, f)
    template = os.path.join(path, "echo.jinja")
    with open(template, "w") as f:
        f.write(TEMPLATE)
    addrs = Addresses(to_coordinator=f"ipc://{path}/coord", to_frontend=f"ipc://{path}/front", to_engines=[])
    port = _free_port()
    config = EngineConfig(model=path, port=port, served_model_name="fake", chat_template=template,
                          enable_auto_tool_choice=True, tool_call_parser=tool_parser, reasoning_parser=reasoning_parser)
    engine = FakeEngine(addrs)
    engine.start()
    tokenizer = AutoTokenizer.from_pretrained(path)
    from tokenizers.processors import TemplateProcessing

    # a tokenizer that adds BOS, as Llama's does (add_special_tokens decides)
    bos = ("<|bos|>", tokenizer.convert_tokens_to_ids("<|bos|>"))
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[bos])
    metrics = Metrics("fake")
    app = build_app(config, EngineClient(addrs, config.max_queue_len, on_stats=metrics.cluster.update), metrics,
                    tokenizer)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=20)
    yield client, OUTPUTS[request.param], tokenizer.eos_token_id, bos[1]
    server.should_exit = True
    thread.join(5)
    engine.stopping.set()


def _reassemble(chunks: list[Any]) -> tuple[str, str, dict[int, list[Any]], str | None]:
    """(reasoning, content, index -> [id, name, arguments, chunks with arguments], finish_reason)."""
    reasoning, content, calls, reason = "", "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        d = choice.delta
        assert d.role or d.content or getattr(d, "reasoning_content", None) or d.tool_calls or choice.finish_reason, \
            "no empty chunks"
        reasoning += getattr(choice.delta, "reasoning_content", None) or ""
        content += choice.delta.content or ""
        reason = choice.finish_reason or reason
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:  # first delta: id, type, name and empty arguments, as OpenAI sends it
                assert d.id and d.type == "function" and d.function.name and d.function.arguments == "", d
                calls[d.index] = [d.id, d.function.name, "", 0]
            else:
                assert d.id is None and d.function.name is None, d
                calls[d.index][2] += d.function.arguments
                calls[d.index][3] += 1
    return reasoning, content, calls, reason


def test_streamed_tool_calls_reassemble_to_the_whole_reply(stack: tuple[Any, ...]) -> None:
    client, output, eos, _ = stack
    kw: dict[str, Any] = dict(model="fake", messages=[{"role": "user", "content": output}], tools=TOOLS,
                              extra_body={"stop_token_ids": [eos]})
    whole = client.chat.completions.create(**kw).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert calls == EXPECTED and whole.finish_reason == "tool_calls"
    assert whole.message.content.strip() == "Checking." and whole.message.model_extra["reasoning_content"]
    reasoning, content, streamed, reason = _reassemble(list(client.chat.completions.create(stream=True, **kw)))
    assert [(n, a) for _, n, a, _ in streamed.values()] == calls and sorted(streamed) == [0, 1]
    assert (reasoning, content, reason) == (whole.message.model_extra["reasoning_content"], whole.message.content,
                                        "tool_calls")
    assert len({i for i, *_ in streamed.values()}) == 2
    assert all(n > 1 for *_, n in streamed.values()), streamed  # the arguments came in pieces, not at the end


def test_required_and_named_stream_arguments(stack: tuple[Any, ...]) -> None:
    client, _, eos, _ = stack
    text = '[{"name":"get_weather","parameters":{"city":"Lima","days":2}},{"name":"search","parameters":{"query":"x"}}]'
    kw: dict[str, Any] = dict(model="fake", messages=[{"role": "user", "content": text}], tools=TOOLS,
                              tool_choice="required", extra_body={"stop_token_ids": [eos]})
    whole = client.chat.completions.create(**kw).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert calls == [("get_weather", '{"city": "Lima", "days": 2}'), ("search", '{"query": "x"}')]
    _, content, streamed, reason = _reassemble(list(client.chat.completions.create(stream=True, **kw)))
    assert [(n, a) for _, n, a, _ in streamed.values()] == calls and reason == "tool_calls" and not content
    assert streamed[0][3] > 1
    named = {"type": "function", "function": {"name": "search"}}
    kw.update(messages=[{"role": "user", "content": '{"query":"weather in Oslo"}'}], tool_choice=named)
    whole = client.chat.completions.create(**kw).choices[0]
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        ("search", '{"query":"weather in Oslo"}')]
    _, _, streamed, reason = _reassemble(list(client.chat.completions.create(stream=True, **kw)))
    assert [(n, a) for _, n, a, _ in streamed.values()] == [("search", '{"query":"weather in Oslo"}')]
    assert reason == "tool_calls" and streamed[0][3] > 1


def test_vllm_dashboard_metrics(stack: tuple[Any, ...]) -> None:
    """Every series vLLM's Grafana board reads; queue and prefill time are the engine's durations, carried by
    the first TokenDelta."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    client, *_ = stack

    def scrape() -> dict[str, float]:
        text = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics").text
        out: dict[str, float] = {}  # summed over labels but buckets
        for s in (s for f in text_string_to_metric_families(text) for s in f.samples if "le" not in s.labels):
            out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    before = scrape()
    client.completions.create(model="fake", prompt="The quick brown fox", max_tokens=7)
    time.sleep(0.2)  # the fake's stats interval
    after = scrape()
    for name in ("e2e_request_latency_seconds_count", "prompt_tokens_total", "generation_tokens_total",
                 "time_per_output_token_seconds_count", "time_to_first_token_seconds_count",
                 "request_prompt_tokens_count", "request_generation_tokens_count", "request_success_total",
                 "request_decode_time_seconds_count", "request_queue_time_seconds_count",
                 "request_prefill_time_seconds_count"):
        assert after["vllm:" + name] > before.get("vllm:" + name, 0), name
    for name in ("num_requests_running", "num_requests_waiting", "gpu_cache_usage_perc", "kv_cache_usage_perc"):
        assert "vllm:" + name in after, name
    name = "vllm:request_max_num_generation_tokens_sum"
    assert after[name] - before.get(name, 0) == 7


def test_tokenize_detokenize_version_ping(stack: tuple[Any, ...]) -> None:
    import httpx

    client, *_ = stack
    base = str(client.base_url).removesuffix("/v1/")
    text = "Hello wörld, 1 + 1 <tool_call>"
    r = httpx.post(base + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == 1024
    assert httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "<|bos|>" + text
    r = httpx.post(base + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == text
    # messages go through the chat template (this one: the last message's text, then EOS)
    r = httpx.post(base + "/tokenize", json={"messages": [{"role": "user", "content": text}], "tools": TOOLS}).json()
    back = httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert back == text + "<|endoftext|>"
    for path, body, param in [("/tokenize", {"prompt": "a", "messages": []}, "prompt"),
                              ("/tokenize", {"prompt": "a", "model": "nope"}, "model"),
                              ("/detokenize", {"tokens": [10**6]}, "tokens")]:
        r = httpx.post(base + path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    assert httpx.get(base + "/version").json()["version"] and httpx.get(base + "/ping").status_code == 200


def test_include_reasoning_documents_and_add_special_tokens(stack: tuple[Any, ...]) -> None:
    client, output, eos, _ = stack
    kw: dict[str, Any] = dict(model="fake", messages=[{"role": "user", "content": output}], tools=TOOLS)
    extra = {"stop_token_ids": [eos], "include_reasoning": False}
    whole = client.chat.completions.create(extra_body=extra, **kw).choices[0].message
    assert whole.model_extra.get("reasoning_content") is None and whole.tool_calls and whole.content
    chunks = list(client.chat.completions.create(stream=True, extra_body=extra, **kw))
    reasoning, content, calls, _ = _reassemble(chunks)
    assert (reasoning, content, len(calls)) == ("", whole.content, 2)
    # documents reach the template; the chat prompt gets BOS only when asked (the template writes its own)
    docs = {"documents": [{"title": "A", "text": "a"}, {"title": "B", "text": "b"}], "stop_token_ids": [eos]}
    r = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], extra_body=docs)
    assert r.choices[0].message.content == "[A][B]hi"
    for special, bos in ((None, False), (True, True)):
        body = {**docs, **({"add_special_tokens": special} if special is not None else {}), "return_token_ids": True}
        r = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], extra_body=body)
        first = r.choices[0].model_extra["prompt_token_ids"][0]
        assert (first == stack[3]) == bos
    r = client.completions.create(model="fake", prompt="hi", max_tokens=1, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["prompt_token_ids"][0] == stack[3]
    r = client.completions.create(model="fake", prompt="hi", max_tokens=1, extra_body={"return_token_ids": True,
                                                                                       "add_special_tokens": False})
    assert r.choices[0].model_extra["prompt_token_ids"][0] != stack[3]
