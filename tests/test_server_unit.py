"""The HTTP front end against a fake engine (no model): protocol, errors, streaming, fan-out,
disconnects, queue limit, metrics. The real-stack tests are in test_server_e2e.py."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.config import EngineConfig
from runtime.messages import (
    Addresses,
)
from tests.fake_engine import FakeEngine
from tests.ports import free_port as _free_port
from tests.tiny import write_tokenizer

API_KEY = "sk-unit"
MAX_MODEL_LEN = 64
QUEUE_LEN = 6


class Stack:
    def __init__(self, base_url: str, engine: FakeEngine, tokenizer: Any) -> None:
        self.base_url = base_url
        self.engine = engine
        self.tokenizer = tokenizer
        self.client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=20)

    def expected_text(self, prompt: str, num_tokens: int) -> str:
        ids = self.tokenizer.encode(prompt)
        return self.tokenizer.decode([ids[i % len(ids)] for i in range(num_tokens)])

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **kw.pop("headers", {})}
        if isinstance(body, bytes | str):
            return httpx.post(self.base_url + path, content=body, headers=headers, timeout=20, **kw)
        return httpx.post(self.base_url + path, json=body, headers=headers, timeout=20, **kw)

    def wait_idle(self) -> None:
        deadline = time.time() + 5
        while self.engine.active and time.time() < deadline:
            time.sleep(0.01)
        assert not self.engine.active, f"engine still holds {list(self.engine.active)}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import uvicorn
    from transformers import AutoTokenizer

    from server.api_server import build_app
    from server.engine_client import EngineClient
    from server.metrics import Metrics

    path = str(tmp_path_factory.mktemp("fake_model"))
    write_tokenizer(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": 512, "max_position_embeddings": MAX_MODEL_LEN, "architectures": ["Fake"]}, f)
    addrs = Addresses(to_coordinator=f"ipc://{path}/coord", to_frontend=f"ipc://{path}/front", to_engines=[])
    port = _free_port()
    config = EngineConfig(model=path, port=port, api_key=API_KEY, served_model_name="fake", max_queue_len=QUEUE_LEN)
    engine = FakeEngine(addrs)
    engine.start()
    tokenizer = AutoTokenizer.from_pretrained(path)
    metrics = Metrics("fake")
    client = EngineClient(addrs, config.max_queue_len, on_stats=metrics.cluster.update)
    app = build_app(config, client, metrics, tokenizer)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    yield Stack(f"http://127.0.0.1:{port}", engine, tokenizer)
    server.should_exit = True
    thread.join(5)
    engine.stopping.set()


# ---------------------------------------------------------------- happy paths


def test_completion_text_and_usage(stack: Stack) -> None:
    r = stack.client.completions.create(model="fake", prompt="The quick brown fox", max_tokens=7, temperature=0)
    assert r.choices[0].text == stack.expected_text("The quick brown fox", 7)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(stack.tokenizer.encode("The quick brown fox"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 7, n_prompt + 7)


def test_streaming_reassembles_with_multibyte(stack: Stack) -> None:
    prompt = "héllo wörld 日本語 ✓"  # byte-level tokens split these characters
    full = stack.client.completions.create(model="fake", prompt=prompt, max_tokens=20, temperature=0)
    chunks = list(
        stack.client.completions.create(
            model="fake",
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == full.choices[0].text == stack.expected_text(prompt, 20)
    assert all("\ufffd" not in t for t in texts)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    running = list(
        stack.client.completions.create(
            model="fake",
            prompt=prompt,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    assert [c.usage.completion_tokens for c in running if c.choices][-1] == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stream_lines_survive_unicode_separators(stack: Stack) -> None:
    prompt = "a\u2028b\u2029c\x85d"
    ids = stack.tokenizer.encode(prompt)
    body = {"model": "fake", "prompt": ids, "max_tokens": len(ids), "stream": True}
    with httpx.stream(
        "POST", stack.base_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as r:
        lines = [line for line in r.iter_lines() if line]  # splitlines() semantics
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    assert text == prompt


def test_prompt_forms_and_n(stack: Stack) -> None:
    ids = stack.tokenizer.encode("Hello world!")
    r = stack.client.completions.create(model="fake", prompt=[ids, ids[:3]], max_tokens=4, n=2, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == stack.tokenizer.decode((ids * 2)[:4])
    assert r.choices[2].text == stack.tokenizer.decode((ids[:3] * 2)[:4])
    assert r.usage.prompt_tokens == len(ids) + 3 and r.usage.completion_tokens == 16
    seeds = sorted(a.params.seed for a in stack.engine.added[-4:])
    assert seeds == [5, 5, 6, 6] and all(a.params.n == 1 for a in stack.engine.added[-4:])
    r = stack.client.completions.create(model="fake", prompt=["Hello", "world"], max_tokens=2)
    assert len(r.choices) == 2


def test_stop_string_and_extra_body(stack: Stack) -> None:
    prompt = "The quick brown fox"
    r = stack.client.completions.create(model="fake", prompt=prompt, max_tokens=30, stop=["brown"])
    assert r.choices[0].text == "The quick " and r.choices[0].finish_reason == "stop"
    assert r.choices[0].stop_reason == "brown"
    stack.wait_idle()  # the front end aborted the engine request when it saw the stop string
    stream = stack.client.completions.create(model="fake", prompt=prompt, max_tokens=30, stop="fox", stream=True)
    assert "".join(c.choices[0].text for c in stream) == "The quick brown "
    ids = stack.tokenizer.encode(prompt)
    r = stack.client.completions.create(
        model="fake",
        prompt=prompt,
        max_tokens=30,
        extra_body={
            "stop_token_ids": [ids[2]],
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "min_tokens": 1,
            "ignore_eos": True,
        },
    )
    assert r.choices[0].text == stack.tokenizer.decode(ids[:3]) and r.choices[0].stop_reason == ids[2]
    p = stack.engine.added[-1].params
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.ignore_eos) == (5, 0.1, 1.1, 1, True)


def test_echo_and_logprobs(stack: Stack) -> None:
    r = stack.client.completions.create(
        model="fake", prompt="Hello world", max_tokens=3, echo=True, logprobs=2, extra_body={"return_token_ids": True}
    )
    ids = stack.tokenizer.encode("Hello world")
    assert r.choices[0].prompt_token_ids == ids and r.choices[0].token_ids == (ids * 3)[:3]
    c = r.choices[0]
    assert c.text == "Hello world" + stack.expected_text("Hello world", 3)
    n_prompt = len(stack.tokenizer.encode("Hello world"))
    assert len(c.logprobs.tokens) == n_prompt + 3
    assert c.logprobs.token_logprobs[n_prompt:] == [-0.5] * 3 and len(c.logprobs.top_logprobs[-1]) == 2


def test_chat(stack: Stack) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi there"}]
    r = stack.client.chat.completions.create(
        model="fake", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    text = stack.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = stack.tokenizer.encode(text, add_special_tokens=False)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == stack.tokenizer.decode(ids[:6], skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    assert len(r.choices[0].logprobs.content) == 6 and len(r.choices[0].logprobs.content[0].top_logprobs) == 3
    chunks = list(
        stack.client.chat.completions.create(
            model="fake", messages=messages, max_tokens=6, n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    for i in range(2):
        parts = [c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(parts) == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(ids)
    # no generation budget given: the rest of the context
    r = stack.client.chat.completions.create(model="fake", messages=messages)
    assert r.usage.total_tokens == MAX_MODEL_LEN


def test_models_and_health(stack: Stack) -> None:
    models = stack.client.models.list()
    assert [m.id for m in models.data] == ["fake"]
    assert httpx.get(stack.base_url + "/health").json() == {"status": "ok"}


# ---------------------------------------------------------------- aborts, queue, metrics


def test_disconnect_aborts(stack: Stack) -> None:
    stack.engine.aborted.clear()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "fake", "prompt": "The quick brown fox", "max_tokens": 60, "stream": True}
    for _ in range(5):
        with httpx.stream("POST", stack.base_url + "/v1/completions", json=body, headers=headers) as r:
            next(r.iter_lines())
    stack.wait_idle()
    assert len(stack.engine.aborted) == 5
    # a non-streaming client that gives up
    stack.engine.paused.set()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.base_url + "/v1/completions", json={**body, "stream": False}, headers=headers, timeout=0.3)
    stack.engine.paused.clear()
    stack.wait_idle()
    assert len(stack.engine.aborted) == 6


def test_queue_limit_503(stack: Stack) -> None:
    stack.engine.paused.set()
    try:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=20) as c:

                async def one() -> httpx.Response:
                    return await c.post(
                        stack.base_url + "/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2}
                    )

                tasks = [asyncio.ensure_future(one()) for _ in range(QUEUE_LEN + 3)]
                await asyncio.sleep(0.5)
                stack.engine.paused.clear()
                return await asyncio.gather(*tasks)

        responses = asyncio.run(burst())
    finally:
        stack.engine.paused.clear()
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * QUEUE_LEN + [503] * 3
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"


def _scrape(stack: Stack) -> dict[str, float]:
    text = httpx.get(stack.base_url + "/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_metrics_move(stack: Stack) -> None:
    before = _scrape(stack)
    stack.client.completions.create(model="fake", prompt="Hello world", max_tokens=5)
    assert stack.post("/v1/completions", {"model": "fake"}).status_code == 400
    ok = "moe_http_requests_total,endpoint=/v1/completions,status=200"
    bad = "moe_http_requests_total,endpoint=/v1/completions,status=400"
    # the HTTP counts tick once the response has gone out (FrontDoor), which the client may see first
    deadline = time.monotonic() + 5
    while ((after := _scrape(stack)).get(ok, 0) == before.get(ok, 0) or after.get(bad, 0) == before.get(bad, 0)) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert after[ok] == before.get(ok, 0) + 1
    assert after["moe_generation_tokens_total"] - before["moe_generation_tokens_total"] == 5
    assert after["moe_time_to_first_token_seconds_count"] > before.get("moe_time_to_first_token_seconds_count", 0)
    assert "moe_kv_cache_usage_ratio,rank=0" in after and "moe_cluster_num_requests_running" in after
    assert after[bad] == before.get(bad, 0) + 1


def test_bench_serving_runs(stack: Stack, tmp_path: Any) -> None:
    from benchmarks.bench_serving import main

    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    runs = main(
        [
            "--base-url",
            stack.base_url,
            "--api-key",
            API_KEY,
            "--num-prompts",
            "12",
            "--input-len",
            "8",
            "--output-len",
            "6",
            "--sweep-rates",
            "50,inf",
            "--max-concurrency",
            "4",
            "--result-file",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert [r["num_ok"] for r in runs] == [12, 12]
    saved = json.loads(out.read_text())
    assert saved["runs"][1]["ttft_s"]["p50"] > 0 and saved["runs"][1]["output_throughput"] > 0
    assert plot.exists() or importlib.util.find_spec("matplotlib") is None  # plotting is optional


def test_engine_restart_resubmits(stack: Stack) -> None:
    import concurrent.futures

    stack.engine.tick_s = 0.02  # slow enough to restart in the middle
    num_added = len(stack.engine.added)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(
                stack.client.completions.create,
                model="fake",
                prompt="The quick brown fox",
                max_tokens=30,
                extra_body={"return_token_ids": True},
            )
            # restart once the engine has streamed some of it: earlier, the restart drops nothing to re-send
            deadline = time.monotonic() + 10
            while len(stack.engine.added) == num_added or \
                    stack.engine.active.get(stack.engine.added[num_added].request_id, (None, 0))[1] == 0:
                assert time.monotonic() < deadline and not future.done(), "the request never streamed"
                time.sleep(0.005)
            stack.engine.restart.set()
            r = future.result(timeout=20)
    finally:
        stack.engine.tick_s = 0.002
    assert r.choices[0].text == stack.expected_text("The quick brown fox", 30)
    assert r.usage.completion_tokens == 30 and r.choices[0].finish_reason == "length"
    again = stack.engine.added[-1]
    assert 0 < again.num_generated_before < 30
    assert _scrape(stack)["moe_requests_resubmitted_total"] == 1


def test_chat_template_file(stack: Stack, tmp_path: Any) -> None:
    from runtime.config import ConfigError
    from server.api_server import load_chat_template
    from server.metrics import Metrics
    from server.protocol import ChatCompletionRequest
    from server.serving import Serving

    with pytest.raises(ConfigError):
        load_chat_template(str(tmp_path / "missing.jinja"))
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>>")
    serving = Serving(
        "fake",
        MAX_MODEL_LEN,
        512,
        stack.tokenizer,
        load_chat_template(str(path)),
        None,  # type: ignore[arg-type]
        Metrics("fake"),
    )
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}
            ]
        }
    )
    ids = asyncio.run(serving.chat_prompt(req))
    assert stack.tokenizer.decode(ids) == "[user] Hello\nworld\n>>"


def test_waiting_outputs_merge_into_one_event(stack: Stack) -> None:
    from runtime.detokenizer import IncrementalDetokenizer
    from runtime.messages import TokenDelta
    from runtime.sampling_params import SamplingParams
    from server.engine_client import RequestGroup
    from server.metrics import Metrics
    from server.serving import Choice, Serving

    serving = Serving("fake", MAX_MODEL_LEN, 512, stack.tokenizer, None, None, Metrics("fake"))  # type: ignore[arg-type]
    ids = stack.tokenizer.encode("Hello world!")
    params = SamplingParams(max_tokens=3)
    choice = Choice(0, "r-0", ids, params, IncrementalDetokenizer(stack.tokenizer, ids, params),
                    arrival=time.time())
    group = RequestGroup(None, ["r-0"])  # type: ignore[arg-type]
    for k, token in enumerate(ids[:3]):  # the front end fell behind: three outputs wait
        group.queue.put_nowait(TokenDelta("r-0", [token], finish_reason="length" if k == 2 else None))

    async def collect() -> list[Any]:
        return [ev async for ev in serving.events(group, [choice])]

    events = asyncio.run(collect())
    assert len(events) == 1 and events[0].token_ids == ids[:3]
    assert events[0].text == stack.tokenizer.decode(ids[:3]) and choice.finish_reason == "length"


def test_output_reader_drains_a_burst_longer_than_one_turn(tmp_path: Any) -> None:
    """The front end reads engine outputs in an event-loop reader callback, READ_BURST messages a turn: a burst
    that is all waiting at once (zmq's FD announces it once) reaches its request whole and in order."""
    import zmq

    from runtime.messages import OutputBatch, TokenDelta, encode
    from runtime.sampling_params import SamplingParams
    from server.engine_client import READ_BURST, EngineClient

    addrs = Addresses(to_coordinator=f"ipc://{tmp_path}/coord", to_frontend=f"ipc://{tmp_path}/front", to_engines=[])
    num_outputs = 3 * READ_BURST + 5

    async def run() -> list[int]:
        client = EngineClient(addrs, max_queue_len=4)
        ctx = zmq.Context()
        coordinator = ctx.socket(zmq.PULL)
        coordinator.bind(addrs.to_coordinator)
        rank = ctx.socket(zmq.PUSH)
        try:
            await client.start()
            group = client.open([("r", [1, 2], SamplingParams(max_tokens=num_outputs))])
            rank.connect(addrs.to_frontend)
            for i in range(num_outputs):
                rank.send(encode(OutputBatch(rank=0, outputs=[TokenDelta("r", [i])])))
            time.sleep(0.5)  # the event loop stays blocked while the whole burst reaches the socket
            tokens: list[int] = []
            while len(tokens) < num_outputs:
                for delta in await asyncio.wait_for(group.next_batch(), 5):
                    tokens += delta.new_token_ids
            return tokens
        finally:
            await client.close()
            ctx.destroy(linger=0)

    assert asyncio.run(run()) == list(range(num_outputs))


def test_output_reader_keeps_order_under_concurrent_bursts(tmp_path: Any) -> None:
    """Three ranks push outputs in bursts around READ_BURST (one short of a turn, a turn exactly, one over, three
    turns) with pauses, while the event loop has other work: outputs arrive during a read turn, between turns
    and after the reader found the socket empty, and each request still gets all of its outputs in order."""
    import random

    import zmq

    from runtime.messages import OutputBatch, TokenDelta, encode
    from runtime.sampling_params import SamplingParams
    from server.engine_client import READ_BURST, EngineClient

    addrs = Addresses(to_coordinator=f"ipc://{tmp_path}/coord", to_frontend=f"ipc://{tmp_path}/front", to_engines=[])
    num_ranks, num_outputs = 3, 2000
    bursts = [1, 2, 5, READ_BURST - 1, READ_BURST, READ_BURST + 1, 3 * READ_BURST]

    def rank(idx: int, ctx: zmq.Context) -> None:
        rng = random.Random(idx)
        push = ctx.socket(zmq.PUSH)
        push.connect(addrs.to_frontend)
        sent = 0
        while sent < num_outputs:
            burst = min(rng.choice(bursts), num_outputs - sent)
            for i in range(sent, sent + burst):
                push.send(encode(OutputBatch(rank=idx, outputs=[TokenDelta(f"r{idx}", [i])])))
            sent += burst
            pause = rng.random()
            if pause < 0.3:
                time.sleep(0.003 * rng.random())  # the reader is likely mid-turn or between turns
            elif pause < 0.35:
                time.sleep(0.02)  # it has emptied the socket and waits for the FD to signal
        push.close(linger=-1)

    async def other_work() -> None:
        while True:
            time.sleep(0.0005)  # a handler's CPU work between the reader's turns
            await asyncio.sleep(0)

    async def run() -> list[list[int]]:
        client = EngineClient(addrs, max_queue_len=16)
        ctx = zmq.Context()
        coordinator = ctx.socket(zmq.PULL)
        coordinator.bind(addrs.to_coordinator)
        ranks = [threading.Thread(target=rank, args=(k, ctx), daemon=True) for k in range(num_ranks)]
        busy = asyncio.ensure_future(other_work())
        try:
            await client.start()
            groups = [client.open([(f"r{k}", [1], SamplingParams(max_tokens=num_outputs))]) for k in range(num_ranks)]
            for t in ranks:
                t.start()
            received = []
            for group in groups:
                tokens: list[int] = []
                while len(tokens) < num_outputs:
                    for delta in await asyncio.wait_for(group.next_batch(), 10):
                        tokens += delta.new_token_ids
                received.append(tokens)
            return received
        finally:
            busy.cancel()
            for t in ranks:
                if t.is_alive():
                    t.join(timeout=10)
            await client.close()
            ctx.destroy(linger=0)

    assert asyncio.run(run()) == [list(range(num_outputs))] * num_ranks


def test_throughput_gauge_does_not_alias_with_the_stats_pushes() -> None:
    """The ranks' token counts move once a second (with their heartbeat) and ClusterStats arrive every second,
    out of phase: the rate of each window must stay near the true 1000 tok/s (a 1 s window read 0 or 2000)."""
    from prometheus_client import generate_latest

    from runtime.messages import ClusterStats, RankStats
    from server.metrics import _ClusterCollector

    collector = _ClusterCollector()
    collector.update(ClusterStats(ranks=[RankStats(0, 1, 0, 0.1, 0, 0, 0, 0)]), now=99.0)
    assert collector.generation_tps == {0: 0.0}  # a gauge (0) from the first report on
    assert 'moe_generation_throughput_tokens_per_second{rank="0"} 0.0' in \
        generate_latest(_registry(collector)).decode()
    rates = []
    for i in range(120):
        now = 100.0 + i * 1.0 + 0.37 * (i % 3)  # pushes with jitter
        reported = int(now - 100.4) * 1000 if now > 100.4 else 0  # counts as of the last heartbeat, at x.4 s
        collector.update(ClusterStats(ranks=[RankStats(0, 1, 0, 0.1, 0, reported, i, 0)]), now=now)
        if i >= 6:  # past the first rate window
            rates.append(collector.generation_tps[0])
    assert rates and min(rates) > 750 and max(rates) < 1250, (min(rates), max(rates))
    # a rank that joins later gets its own (shorter) window, not 0 until the first one has passed
    for i in range(120, 124):
        now = 100.0 + i
        collector.update(ClusterStats(ranks=[RankStats(0, 1, 0, 0.1, 0, 0, i, 0),
                                             RankStats(1, 1, 0, 0.1, 0, 500 * (i - 120), i, 0)]), now=now)
    assert 400 < collector.generation_tps[1] < 600


def _registry(collector):  # noqa: ANN001, ANN202
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(collector)
    return registry
