"""The real stack (python -m runtime.serve: engine rank, coordinator, API server) on the CPU with a tiny
MoE checkpoint, driven through the official `openai` client. Greedy answers are checked against the
offline runtime.LLM on the same checkpoint."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.sampling_params import SamplingParams
from tests.ports import free_port as _free_port
from tests.tiny import make_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.serial]

API_KEY = "sk-e2e"
MODEL = "tiny"
KV_BYTES = 8 << 20  # ~10k tokens of this model's KV: room for 50 concurrent long streams
SERVE_ARGS = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", str(KV_BYTES)]
GREEDY = {"temperature": 0.0}


class Server:
    def __init__(self, base_url: str, proc: subprocess.Popen[bytes], log_path: str, num_ranks: int) -> None:
        self.base_url = base_url
        self.num_ranks = num_ranks
        self.proc = proc
        self.log_path = log_path
        self.client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(self.base_url + "/metrics").text):
            for s in family.samples:
                out[s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))] = s.value
        return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen3_moe")), "Qwen3MoeForCausalLM")


def _sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + ","))


# one engine rank, and two data-parallel ranks sharing the experts (EP over gloo)
LAYOUTS = {"dp1": [], "dp2ep2": ["--data-parallel-size", "2", "--enable-expert-parallel"]}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(
    request: pytest.FixtureRequest, checkpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    port = _free_port()
    log_path = str(tmp_path_factory.mktemp("serve_log") / "serve.log")
    cmd = [
        sys.executable,
        "-m",
        "runtime.serve",
        "--model",
        checkpoint,
        *SERVE_ARGS,
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--served-model-name",
        MODEL,
        "--log-stats-interval",
        "0.5",
        *LAYOUTS[request.param],
    ]
    # one intra-op thread per process: on a couple of shared cores, torch's default thread pool
    # oversubscribes them and every tiny-model step gets ~10x slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path, 2 if request.param == "dp2ep2" else 1)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"runtime.serve exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                if httpx.get(srv.base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"runtime.serve not healthy after 180 s:\n{srv.log_tail()}")
            time.sleep(0.1)
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def llm(checkpoint: str) -> Iterator[Any]:
    import torch

    from runtime.llm import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the server fixture
    try:
        yield LLM(checkpoint, device="cpu", dtype="float32", kv_cache_memory=KV_BYTES)
    finally:
        torch.set_num_threads(threads)


def _greedy(llm: Any, prompts: list[Any], max_tokens: list[int]) -> list[Any]:
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    return [out.outputs[0] for out in llm.generate(prompts, params)]


# ---------------------------------------------------------------- answers


def test_completion_matches_offline_and_stream(server: Server, llm: Any) -> None:
    prompt = "The quick brown fox"
    ref = _greedy(llm, [prompt], [16])[0]
    r = server.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, extra_body={"return_token_ids": True}, **GREEDY
    )
    c = r.choices[0]
    assert c.token_ids == ref.token_ids and c.text == ref.text
    n_prompt = len(llm.get_tokenizer().encode(prompt))
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == n_prompt + len(ref.token_ids)
    chunks = list(
        server.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    # echo, and a token-id prompt
    r = server.client.completions.create(
        model=MODEL, prompt=llm.get_tokenizer().encode(prompt), max_tokens=16, echo=True, **GREEDY
    )
    assert r.choices[0].text == prompt + ref.text


def test_chat_matches_offline_and_stream(server: Server, llm: Any) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world!"}]
    ref = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=12))[0]
    r = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **GREEDY)
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    chunks = list(
        server.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.outputs[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_n_seed_stop_logprobs(server: Server, llm: Any) -> None:
    ask = dict(model=MODEL, prompt="Paged attention keeps", max_tokens=10, n=3, temperature=1.0, seed=11)
    a, b = server.client.completions.create(**ask), server.client.completions.create(**ask)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.usage.completion_tokens == b.usage.completion_tokens >= 3
    assert a.usage.prompt_tokens == len(llm.get_tokenizer().encode(ask["prompt"]))  # counted once for n choices
    # stop string: a piece of the greedy text cuts it there
    ref = _greedy(llm, ["Hello world"], [24])[0].text
    stop = ref[len(ref) // 2 : len(ref) // 2 + 3]
    if stop.strip():
        r = server.client.completions.create(model=MODEL, prompt="Hello world", max_tokens=24, stop=[stop], **GREEDY)
        assert r.choices[0].text == ref[: ref.index(stop)] and r.choices[0].finish_reason == "stop"
    # logprobs: greedy picks the most likely token
    r = server.client.completions.create(
        model=MODEL,
        prompt="Hello world",
        max_tokens=5,
        logprobs=3,
        extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True},
        **GREEDY,
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert lp.tokens == [f"token_id:{t}" for t in r.choices[0].token_ids]
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) == 3 and top[token] == pytest.approx(chosen) == max(top.values())
    r = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_models_and_api_key(server: Server) -> None:
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{oops", 400, None),
        (b'{"prompt": "\xc3\x28"}', 400, None),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": 9}, 400, "temperature"),
        ({"model": "gpt-9", "prompt": "hi"}, 404, "model"),
        ({"model": MODEL, "prompt": [5] * 600}, 400, "prompt"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": [1, 100000]}, 400, "prompt"),
    ],
)
def test_bad_input(server: Server, body: Any, status: int, param: str | None) -> None:
    if isinstance(body, bytes):
        r = httpx.post(server.base_url + "/v1/completions", content=body, headers=server.headers)
    else:
        r = httpx.post(server.base_url + "/v1/completions", json=body, headers=server.headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert server.client.completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_huge_body(server: Server) -> None:
    r = httpx.post(
        server.base_url + "/v1/completions", content=b"[" + b"1," * (9 << 20) + b"1]", headers=server.headers
    )
    assert r.status_code == 413
    assert server.client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices


# ---------------------------------------------------------------- load, aborts, metrics


def test_200_requests_at_32_concurrency(server: Server, llm: Any) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 500) for _ in range(rng.randrange(2, 24))] for _ in range(200)]
    max_tokens = [rng.randrange(1, 12) for _ in prompts]
    refs = _greedy(llm, [{"prompt_token_ids": p} for p in prompts], max_tokens)

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        limit = asyncio.Semaphore(32)

        async def one(i: int) -> Any:
            async with limit:
                return await client.completions.create(
                    model=MODEL,
                    prompt=prompts[i],
                    max_tokens=max_tokens[i],
                    extra_body={"return_token_ids": True},
                    **GREEDY,
                )

        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await client.close()

    answers = asyncio.run(run())
    wrong = [
        i
        for i, (a, ref) in enumerate(zip(answers, refs))
        if a.choices[0].prompt_token_ids != prompts[i] or a.choices[0].token_ids != ref.token_ids
    ]
    assert not wrong, f"{len(wrong)} answers differ from their prompt's greedy tokens, e.g. #{wrong[0]}"


def test_50_aborted_streams_free_kv(server: Server) -> None:
    before = server.metrics()

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=60) as client:

            async def one(i: int) -> None:
                body = {
                    "model": MODEL,
                    "prompt": f"stream number {i}",
                    "max_tokens": 400,
                    "ignore_eos": True,
                    "stream": True,
                }
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break  # first token seen: hang up

            await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(run())
    deadline = time.time() + 30
    while True:
        m = server.metrics()
        if m["moe_cluster_kv_cache_usage_ratio"] == 0 and m["moe_cluster_num_requests_running"] == 0:
            break
        assert time.time() < deadline, f"KV still in use after aborts: {m['moe_cluster_kv_cache_usage_ratio']}"
        time.sleep(0.25)
    aborted = m.get("moe_request_finished_total,finish_reason=abort", 0)
    assert aborted - before.get("moe_request_finished_total,finish_reason=abort", 0) == 50
    # they really stopped: far fewer tokens than 50 full streams
    assert _sum(m, "moe_engine_generation_tokens_total") < _sum(before, "moe_engine_generation_tokens_total") + 50 * 100


def test_metrics_parse_and_move(server: Server) -> None:
    before = server.metrics()
    server.client.completions.create(model=MODEL, prompt="Numbers 0 1 2", max_tokens=6, **GREEDY)
    ok = "moe_http_requests_total,endpoint=/v1/completions,status=200"
    deadline = time.monotonic() + 10  # the engine's counters come with the coordinator's stats (every 0.5 s)
    while ((after := server.metrics()).get(ok, 0) <= before.get(ok, 0)
           or _sum(after, "moe_engine_generation_tokens_total") <= _sum(before, "moe_engine_generation_tokens_total")):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after[ok] == before[ok] + 1
    assert after["moe_prompt_tokens_total"] > before["moe_prompt_tokens_total"]
    assert after["moe_generation_tokens_total"] > before["moe_generation_tokens_total"]
    assert after["moe_time_to_first_token_seconds_count"] == before["moe_time_to_first_token_seconds_count"] + 1
    assert after["moe_e2e_request_latency_seconds_count"] == before["moe_e2e_request_latency_seconds_count"] + 1
    assert _sum(after, "moe_engine_generation_tokens_total") > _sum(before, "moe_engine_generation_tokens_total")
    for name in (
        "moe_num_requests_waiting",
        "moe_kv_cache_usage_ratio",
        "moe_generation_throughput_tokens_per_second",
        "moe_requests_routed_total",
    ):
        assert all(f"{name},rank={r}" in after for r in range(server.num_ranks)), name
    assert "moe_cluster_generation_throughput_tokens_per_second" in after


def test_structured_output_on_every_rank(server: Server) -> None:
    """Grammar state lives with the request on its rank: concurrent constrained requests spread over the
    DP ranks all validate, next to unconstrained ones."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0,
              "maximum": 99}}, "required": ["k", "n"], "additionalProperties": False}
    routed_before = server.metrics()

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(
                client.completions.create(model=MODEL, prompt=f"item {i}", max_tokens=40, temperature=1.0, seed=i,
                                          extra_body={"guided_json": schema} if i % 2 == 0 else {})
                for i in range(16)))
        finally:
            await client.close()

    answers = asyncio.run(run())
    for a in answers[::2]:
        jsonschema.validate(json.loads(a.choices[0].text), schema)
    key = "moe_requests_routed_total,rank={}"
    deadline = time.monotonic() + 10  # the coordinator's stats come every 0.5 s
    while True:
        after = server.metrics()
        routed = [after.get(key.format(r), 0) - routed_before.get(key.format(r), 0) for r in range(server.num_ranks)]
        if all(n > 0 for n in routed) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(n > 0 for n in routed), routed
