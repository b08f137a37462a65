"""A model folder without a tokenizer (e.g. --load-format dummy benchmarks) still streams token by token."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx

from runtime.config import EngineConfig
from runtime.messages import Addresses
from tests.fake_engine import FakeEngine
from tests.test_server_unit import _free_port


def test_stream_without_tokenizer_sends_a_chunk_per_token(tmp_path) -> None:
    import uvicorn

    from server.api_server import build_app
    from server.engine_client import EngineClient
    from server.metrics import Metrics

    path = str(tmp_path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": 512, "max_position_embeddings": 64, "architectures": ["Fake"]}, f)
    addrs = Addresses(to_coordinator=f"ipc://{path}/coord", to_frontend=f"ipc://{path}/front", to_engines=[])
    port = _free_port()
    config = EngineConfig(model=path, port=port, served_model_name="fake")
    engine = FakeEngine(addrs, tick_s=0.05)  # slow enough that each token arrives on its own
    engine.start()
    metrics = Metrics("fake")
    client = EngineClient(addrs, config.max_queue_len, on_stats=metrics.cluster.update)
    server = uvicorn.Server(uvicorn.Config(build_app(config, client, metrics, None), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        body = {"model": "fake", "prompt": [5, 6, 7], "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}}
        chunks, usage = [], None
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=20) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[len("data: "):])
                    if chunk["choices"]:
                        chunks.append(chunk)
                    usage = chunk.get("usage") or usage
        # tokens stream as they come (a loaded front end may merge two that wait), not all in one final chunk
        assert len(chunks) >= 2 and chunks[0]["choices"][0]["finish_reason"] is None
        assert usage is not None and usage["completion_tokens"] == 6
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        server.should_exit = True
        thread.join(5)
        engine.stopping.set()
