"""Bad input of every kind against the front end (fake engine): a 4xx with an OpenAI-style error
body naming the field, and the server answers normally afterwards."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests import test_server_unit as unit
from tests.test_server_unit import API_KEY, MAX_MODEL_LEN, Stack

stack = unit.stack  # the fake-engine stack fixture (module scope: one more instance for this module)

# ---------------------------------------------------------------- bad input


BAD = [
    (b"{not json", 400, None),
    (b'{"model": "fake", "prompt": "\xff\xfe bad"}', 400, None),
    (b"[1, 2]", 400, None),
    (b"", 400, None),
    ({"model": "fake"}, 400, "prompt"),
    ({"model": "fake", "prompt": 5}, 400, "prompt"),
    ({"model": "fake", "prompt": [1, "a"]}, 400, "prompt"),
    ({"model": "fake", "prompt": []}, 400, "prompt"),
    ({"model": "fake", "prompt": [[]]}, 400, "prompt"),
    ({"model": "fake", "prompt": [1, 99999]}, 400, "prompt"),
    ({"model": "fake", "prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "hi " * 200}, 400, "prompt"),
    ({"model": "fake", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "fake", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "fake", "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": "fake", "prompt": "hi", "n": True}, 400, "n"),
    ({"model": "fake", "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ({"model": "fake", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": "fake", "prompt": "hi", "stop": 3}, 400, "stop"),
    ({"model": "fake", "prompt": "hi", "top_k": -5}, 400, "top_k"),
    ({"model": "fake", "prompt": "hi", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    ({"model": "fake", "prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (
        {"model": "fake", "prompt": "hi", "stream_options": {"include_usage": "yes"}},
        400,
        "stream_options.include_usage",
    ),
    ({"model": "fake", "prompt": "\ud800"}, 400, "prompt"),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "fake", "prompt": "hi", "logit_bias": {"5": 1000}}, 400, "logit_bias"),
    ({"model": "fake", "prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    ({"model": "fake", "prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ({"model": "fake", "prompt": "hi", "guided_choice": []}, 400, "guided_choice"),
    ({"model": "fake", "prompt": "hi", "guided_grammar": "root ::= ("}, 400, "guided_grammar"),
    ({"model": "fake", "prompt": "hi", "structured_outputs": {"xml": "a"}}, 400, "structured_outputs.xml"),
    ({"model": "fake", "prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}, 400, "guided_choice"),
    ({"model": "fake", "prompt": "hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ({"model": "fake", "prompt": "hi", "length_penalty": 2.0}, 400, "length_penalty"),
    ({"model": "fake", "prompt": "hi", "logits_processors": ["x"]}, 400, "logits_processors"),
    ({"model": "fake", "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"model": "fake", "prompt": "hi", "data_parallel_rank": 5}, 400, "data_parallel_rank"),
    ({"model": "fake", "prompt": "hi", "data_parallel_rank": -1}, 400, "data_parallel_rank"),
    ({"model": "fake", "prompt": "hi", "priority": 1}, 400, "priority"),
    ({"model": "fake", "prompt": "hi", "cache_salt": "tenant-a"}, 400, "cache_salt"),
]

BAD_CHAT = [
    ({"model": "fake", "messages": []}, 400, "messages"),
    ({"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "fake", "messages": [{"content": "x"}]}, 400, "messages.0.role"),
    ({"model": "fake", "messages": [{"role": "user", "content": 7}]}, 400, "messages.0.content"),
    ({"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    (
        {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**6},
        400,
        "max_completion_tokens",
    ),
    ({"model": "fake", "messages": "hello"}, 400, "messages"),
    (
        {"model": "fake", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
        400,
        "response_format.type",
    ),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "echo": True}, 400, "echo"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}, 400,
     "chat_template"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "documents": "a"}, 400, "documents"),
    (
        {"model": "fake", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"x": 1}, "n": -1},
        400,
        "n",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [("/v1/completions", *b) for b in BAD] + [("/v1/chat/completions", *b) for b in BAD_CHAT],
)
def test_bad_input_is_4xx(stack: Stack, path: str, body: Any, status: int, param: str | None) -> None:
    r = stack.post(
        path, body if isinstance(body, bytes) else json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert stack.client.completions.create(model="fake", prompt="ok", max_tokens=1).choices[0].text


def test_huge_body_and_api_key(stack: Stack) -> None:
    from server.api_server import MAX_BODY_BYTES

    r = stack.post("/v1/completions", b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    bad = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="fake", prompt="x", max_tokens=1)
    assert httpx.post(stack.base_url + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(stack.base_url + "/v1/nowhere", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 404
    assert stack.client.completions.create(model="fake", prompt="ok", max_tokens=1).choices[0].text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_longer_than_max_model_len_names_both_numbers(stack: Stack, path: str) -> None:
    n = MAX_MODEL_LEN + 7
    body: dict[str, Any] = {"model": "fake", "max_tokens": 1}
    if path == "/v1/completions":
        body["prompt"] = [5] * n  # token ids: exactly n prompt tokens
    else:
        body["messages"] = [{"role": "user", "content": "hi " * n}]
    r = stack.post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt", err
    num_prompt = int(err["message"].split(":")[1].split()[0])
    assert num_prompt >= n and f"{num_prompt} tokens" in err["message"] and str(MAX_MODEL_LEN) in err["message"]
    # a prompt that leaves room for one output token is served
    ok = stack.post("/v1/completions", {"model": "fake", "prompt": [5] * (MAX_MODEL_LEN - 1), "max_tokens": 1})
    assert ok.status_code == 200, ok.text
