"""The real stack (python -m runtime.serve) with a tiny random model, through the openai client: JSON
schema outputs validate, named and required tool choice give valid arguments as message.tool_calls,
streamed tool-call and reasoning deltas reassemble, tool messages render through the chat template,
/tokenize round trips, and fields we do not honour are a 400 naming them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.test_server_e2e import _free_port
from tests.tiny import make_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.serial]

# a Qwen-like template that lists the tools, renders assistant tool calls and tool results, and opens the
# think block when enable_thinking is passed through chat_template_kwargs
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}:{{ c.function.arguments.city }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking %}<think>\n{% endif %}{% endif %}"
)
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
        "additionalProperties": False}}},
]
MSGS = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_tools")), "Qwen3ForCausalLM")
    template = os.path.join(path, "tools.jinja")
    with open(template, "w") as f:
        f.write(TEMPLATE)
    port = _free_port()
    log_path = str(tmp_path_factory.mktemp("log") / "serve.log")
    cmd = [sys.executable, "-m", "runtime.serve", "--model", path, "--device", "cpu", "--dtype", "float32",
           "--kv-cache-memory", str(8 << 20), "--port", str(port), "--served-model-name", "tiny",
           "--chat-template", template, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
           "--reasoning-parser", "qwen3", "--log-stats-interval", "0.5"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, open(log_path).read()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, open(log_path).read()[-3000:]
            time.sleep(0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 99}}, "required": ["ok", "n"], "additionalProperties": False}
    for stream in (False, True):
        fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
        kw: dict[str, Any] = dict(model="tiny", messages=MSGS, max_tokens=60, temperature=1.0, seed=2,
                                  response_format=fmt)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            text = client.chat.completions.create(**kw).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)
    # the same through /v1/completions with vLLM's guided fields
    out = client.completions.create(model="tiny", prompt="pick", max_tokens=20, temperature=1.0,
                                    extra_body={"guided_choice": ["left", "right"]})
    assert out.choices[0].text in ("left", "right")
    # the EOS that ends it is not text, also when special tokens are kept (the glm45 tool parser keeps them)
    out = client.completions.create(model="tiny", prompt="pick", max_tokens=20, temperature=1.0,
                                    extra_body={"guided_regex": "left( [a-z]+)?", "skip_special_tokens": False,
                                                "logit_bias": {"0": 100}})  # EOS (id 0) as soon as allowed
    assert out.choices[0].text == "left" and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model="tiny", prompt="n", max_tokens=20, temperature=1.0,
                                    extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert out.choices[0].text.isdigit() and len(out.choices[0].text) == 4


def test_named_and_required_tool_choice(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    msg = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=named,
                                         max_tokens=60, temperature=1.0, seed=1)
    call = msg.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and msg.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    required = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, max_tokens=80, temperature=1.0, seed=5)
    calls = required.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "ping")
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == calls[0].function.name)
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)
    # streamed: the deltas reassemble into the same call
    parts: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=named,
                                                max_tokens=60, temperature=1.0, seed=1, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = parts.setdefault(d.index, ["", ""])
            entry[0] += d.function.name or ""
            entry[1] += d.function.arguments or ""
    assert parts == {0: ["get_weather", call.function.arguments]}


def test_reasoning_content_and_template_kwargs(client: openai.OpenAI, base_url: str) -> None:
    # a regex makes the random model think in the qwen3 format: <think>, three letters, </think>, the answer
    kw: dict[str, Any] = dict(model="tiny", messages=MSGS, max_tokens=30, temperature=1.0, extra_body={
        "guided_regex": "<think>[a-z]{3}</think>[a-z]{2}"})
    msg = client.chat.completions.create(**kw).choices[0].message
    assert len(msg.reasoning_content) == 3 and len(msg.content) == 2
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
            content += chunk.choices[0].delta.content or ""
    assert len(reasoning) == 3 and len(content) == 2
    # enable_thinking passes through to the template, which opens the think block in the prompt; the grammar
    # then waits for </think> (which this random model never writes), so the whole output is reasoning
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    r = httpx.post(base_url + "/tokenize", json={"messages": MSGS, **thinking}).json()
    assert httpx.post(base_url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"].endswith("<think>\n")
    msg = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0.0, extra_body={
        **thinking, "guided_choice": ["yes"]}).choices[0].message
    assert msg.reasoning_content and msg.content is None


def test_tool_messages_render_and_tokenize_round_trip(base_url: str) -> None:
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Oslo", "days": 1})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    r = httpx.post(base_url + "/tokenize", json={"messages": messages, "tools": TOOLS})
    assert r.status_code == 200, r.text
    text = httpx.post(base_url + "/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert "Tools: get_weather ping" in text and "<tool_call>get_weather:Oslo</tool_call>" in text
    assert "<|im_start|>tool\nsunny, 21C" in text
    r = httpx.post(base_url + "/tokenize", json={"prompt": "Hello wörld, 1 + 1"}).json()
    assert r["count"] == len(r["tokens"])
    back = httpx.post(base_url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert back == "Hello wörld, 1 + 1"
    assert httpx.get(base_url + "/ping").status_code == 200
    assert httpx.get(base_url + "/version").json()["version"]


@pytest.mark.parametrize("field,value", [
    ("use_beam_search", True), ("prompt_logprobs", 21), ("guided_regex", "a("), ("guided_json", {"type": "zzz"}),
    ("logit_bias", {"999999": 1.0}), ("allowed_token_ids", [-1]),
])
def test_unsupported_or_bad_fields_are_400_naming_them(base_url: str, field: str, value: Any) -> None:
    r = httpx.post(base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_tool_choice_checks(base_url: str) -> None:
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 2}
    r = httpx.post(base_url + "/v1/chat/completions", json={**body, "tool_choice": "required"})
    assert r.status_code == 400 and "tool_choice" in r.text
    r = httpx.post(base_url + "/v1/chat/completions", json={**body, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and "nope" in r.text
    # auto is on for this server: a model that writes no call answers with content
    r = httpx.post(base_url + "/v1/chat/completions", json={**body, "tools": TOOLS, "bad_words": ["the"],
                                                            "truncate_prompt_tokens": 4, "return_token_ids": True})
    assert r.status_code == 200 and len(r.json()["choices"][0]["prompt_token_ids"]) == 4


def test_vllm_named_metrics(base_url: str, client: openai.OpenAI) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        out = {}
        for family in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
            for s in family.samples:
                out[s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))] = s.value
        return out

    before = scrape()
    out = client.completions.create(model="tiny", prompt="Hello world", max_tokens=5, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    m = ",model_name=tiny"
    counts = ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
              "vllm:time_per_output_token_seconds_count", "vllm:request_queue_time_seconds_count",
              "vllm:request_prefill_time_seconds_count")
    deadline = time.monotonic() + 10  # a stats interval or two
    while True:
        after = scrape()
        moved = after.get("vllm:generation_tokens_total" + m, 0) - before["vllm:generation_tokens_total" + m] >= 5
        if moved and all(after.get(n + m, 0) > before.get(n + m, 0) for n in counts) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after["vllm:generation_tokens_total" + m] - before["vllm:generation_tokens_total" + m] == 5
    assert after["vllm:prompt_tokens_total" + m] - before["vllm:prompt_tokens_total" + m] == out.usage.prompt_tokens
    assert after["vllm:request_success_total,finished_reason=length" + m] >= 1
    for name in counts:
        assert after[name + m] > before.get(name + m, 0), name
    assert "vllm:num_requests_running,engine=0" + m in after and "vllm:num_requests_waiting,engine=0" + m in after
    assert "vllm:kv_cache_usage_perc,engine=0" + m in after
    # the engine's durations, through the rank loop's msgpack: a prefill of a few tokens, under a minute
    name = "vllm:request_prefill_time_seconds_sum" + m
    prefill = after[name] - before.get(name, 0)
    assert 0 < prefill < 60


def test_echo_and_prompt_logprobs(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=2,
                                      temperature=0.0, extra_body={"prompt_logprobs": 1, "return_token_ids": True})
    c = whole.choices[0]
    n = len(c.prompt_token_ids)
    assert n > 2 and c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in c.logprobs.token_logprobs[1:])  # real values, not nulls
    assert len(c.logprobs.tokens) == n + 3 and all(len(t) == 2 for t in c.logprobs.top_logprobs[1:n])
    prompt_lps = c.model_extra["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == n
    for i in range(1, n):
        mine = prompt_lps[i][str(c.prompt_token_ids[i])]
        assert abs(mine["logprob"] - c.logprobs.token_logprobs[i]) < 1e-5 and mine["rank"] >= 1
    streamed = [ch.choices[0] for ch in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=2, temperature=0.0, stream=True) if ch.choices]
    assert "".join(ch.text for ch in streamed) == c.text
    assert sum((ch.logprobs.token_logprobs for ch in streamed), []) == c.logprobs.token_logprobs
