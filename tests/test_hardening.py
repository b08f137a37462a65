"""Hardening of the front end and the launcher's command line (issue 11): a fresh machine without matplotlib,
integer fields that overflow the wire format, a request larger than the queue, client disconnects, a 500
that must not cost the keep-alive connection, served model names, --help, authenticated socket frames and a
private socket folder. Fake engine, no model (the process-level items are in test_serve_signals.py)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from runtime.messages import Addresses
from runtime.sampling_params import SamplingParams
from tests import test_server_unit as unit
from tests.test_server_unit import API_KEY, QUEUE_LEN, Stack

stack = unit.stack  # the fake-engine stack fixture (module scope)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- item 1: a machine without matplotlib


def test_plot_expert_stats_without_matplotlib(tmp_path: Any) -> None:
    stats = tmp_path / "experts.json"
    stats.write_text(json.dumps({"num_ranks": 1, "ranks": [{"routed_tokens": [[3, 1], [2, 2]],
                                                            "all2all_bytes_sent": 0}]}))
    # sys.modules[name] = None makes `import matplotlib` raise ImportError, as on a fresh virtualenv
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot', sys.argv[1]]; "
            "runpy.run_path('benchmarks/plot_expert_stats.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, str(stats)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rank_imbalance_mean=" in out.stdout and "matplotlib is not installed" in out.stdout


# ---------------------------------------------------------------- item 2: integers, queue slots


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "top_k": 100000000000000000000}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "seed": 2**64}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**40}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "top_k": 2**40}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "min_tokens": 2**40}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "stop_token_ids": [2**70]}),
    ("/v1/completions", {"prompt": [1, 2**70], "max_tokens": 1}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1, "some_future_field": {"a": [-(2**80)]}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_k": 10**20}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2**40}),
])
def test_huge_integers_are_400_and_leak_nothing(stack: Stack, path: str, body: dict[str, Any]) -> None:
    r = stack.post(path, {"model": "fake", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] is not None
    assert stack.post("/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_failed_send_releases_the_queue_slot(tmp_path: Any) -> None:
    """Whatever fails between admission and the send (here: an int msgpack cannot carry), the slot comes back."""
    from server.engine_client import EngineClient

    addrs = Addresses(f"ipc://{tmp_path}/coord", f"ipc://{tmp_path}/front", [])

    async def run() -> tuple[int, int]:
        client = EngineClient(addrs, max_queue_len=4)
        await client.start()
        try:
            for _ in range(6):  # more failures than slots: a leak would end in a 503
                with pytest.raises(OverflowError):
                    client.open([("a", [1, 2], SamplingParams(seed=2**70)), ("b", [3], SamplingParams())])
            group = client.open([("ok", [1], SamplingParams())])
            client.release(group)
            return client.num_waiting_first_token, len(client.in_flight)
        finally:
            await client.close()

    assert asyncio.run(run()) == (0, 0)


# ---------------------------------------------------------------- item 9: a request larger than the queue


def test_more_prompts_than_the_queue_holds_is_400(stack: Stack) -> None:
    r = stack.post("/v1/completions", {"model": "fake", "prompt": ["hi"] * (QUEUE_LEN + 1), "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_prompts" and f"--max-queue-len {QUEUE_LEN}" in err["message"]
    r = stack.post("/v1/completions", {"model": "fake", "prompt": "hi", "n": QUEUE_LEN + 1, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_prompts"


# ---------------------------------------------------------------- item 6: disconnects, keep-alive after a 500


def _raw_post(sock: socket.socket, port: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    sock.sendall(head.encode() + data)


def _raw_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body; (0, b'') if the server closed the connection."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, b""
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, b""
        body += chunk
    return int(head.split(b" ")[1]), body


def test_disconnect_of_a_non_streamed_request_is_counted_not_a_500(stack: Stack) -> None:
    port = int(stack.base_url.rsplit(":", 1)[1])
    before = unit._scrape(stack)
    stack.engine.paused.set()
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            _raw_post(sock, port, {"model": "fake", "prompt": "The quick brown fox", "max_tokens": 5})
            time.sleep(0.3)  # admitted and waiting for the (paused) engine
    finally:
        stack.engine.paused.clear()
    stack.wait_idle()
    deadline = time.time() + 5
    while (after := unit._scrape(stack)).get("moe_client_disconnects_total", 0) == before.get(
            "moe_client_disconnects_total", 0) and time.time() < deadline:
        time.sleep(0.05)
    assert after["moe_client_disconnects_total"] == before.get("moe_client_disconnects_total", 0) + 1
    errors = "moe_http_requests_total,endpoint=/v1/completions,status=500"
    assert after.get(errors, 0) == before.get(errors, 0)


def test_internal_error_keeps_the_keep_alive_connection(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    port = int(stack.base_url.rsplit(":", 1)[1])

    def broken(*args: Any, **kwargs: Any) -> list[int]:
        raise RuntimeError("tokenizer exploded")

    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        with monkeypatch.context() as m:
            m.setattr(stack.tokenizer, "encode", broken)
            _raw_post(sock, port, {"model": "fake", "prompt": "hi", "max_tokens": 2})
            status, body = _raw_response(sock)
        assert status == 500 and b"tokenizer exploded" in body
        _raw_post(sock, port, {"model": "fake", "prompt": "hi", "max_tokens": 2})  # the same connection
        status, body = _raw_response(sock)
        assert status == 200, body


# ---------------------------------------------------------------- item 8: served model names


def test_served_model_names(tmp_path: Any) -> None:
    from runtime.config import EngineConfig
    from runtime.serve import parse_args
    from server.serving import Serving

    model = str(tmp_path / "demo")
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({"vocab_size": 8}, f)
    assert EngineConfig(model=model).served_model_names == [model, "demo"]
    assert EngineConfig(model=model + "/").served_model_names == [model + "/", "demo"]
    config, _ = parse_args(["--model", model, "--served-model-name", "a", "b", "--device", "cpu"])
    assert config.served_model_names == ["a", "b"] and config.model_name == "a"
    assert EngineConfig(model=model, served_model_name="x").served_model_names == ["x"]
    serving = Serving([model, "demo"], 64, 8, None, None, None, None)  # type: ignore[arg-type]
    serving.check_model(model)
    serving.check_model("demo")
    serving.check_model(None)
    with pytest.raises(Exception, match="does not exist"):
        serving.check_model("other")


# ---------------------------------------------------------------- item 12: --help


def test_help_gives_every_flag_a_line_and_its_default() -> None:
    from runtime.serve import HelpFormatter, build_parser

    parser = build_parser()
    formatter = HelpFormatter("python -m runtime.serve")
    flags = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert len(flags) > 30
    for action in flags:
        assert action.help, f"{action.option_strings[0]} has no help text"
        assert "default" in formatter._get_help_string(action), f"{action.option_strings[0]} shows no default"
    out = subprocess.run([sys.executable, "-m", "runtime.serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "(default: 8000)" in out.stdout


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.serve import parse_args

    monkeypatch.setenv("VLLM_API_KEY", "sk-env")
    assert parse_args(["--device", "cpu"])[0].api_key == "sk-env"
    assert parse_args(["--device", "cpu", "--api-key", "sk-flag"])[0].api_key == "sk-flag"
    monkeypatch.delenv("VLLM_API_KEY")
    assert parse_args(["--device", "cpu"])[0].api_key is None


def test_bench_serving_plot_is_optional(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.bench_serving import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = {"output_throughput": 1.0, **{k: {"p50": 0.1, "p90": 0.2, "p99": 0.3} for k in ("ttft_s", "tpot_s",
                                                                                            "itl_s")}}
    plot([run], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()




# ---------------------------------------------------------------- item 10: authenticated frames, private sockets


@pytest.fixture
def secret() -> Iterator[str]:
    from runtime.messages import use_secret

    use_secret("s3cret")
    yield "s3cret"
    use_secret(None)


def test_frames_carry_a_mac_and_forgeries_are_dropped(secret: str, caplog: pytest.LogCaptureFixture) -> None:
    from runtime.messages import AuthError, StepCommand, decode, decode_or_drop, encode, use_secret

    msg = StepCommand(step_id=3, pad_to=8, dummy=False)
    frame = encode(msg)
    assert decode(frame) == msg and decode(memoryview(frame)) == msg
    forged = bytearray(frame)
    forged[2] ^= 1  # one flipped bit in the payload
    with pytest.raises(AuthError):
        decode(bytes(forged))
    use_secret("another")
    other = encode(msg)
    use_secret(secret)
    with pytest.raises(AuthError):
        decode(other)
    use_secret(None)
    bare = encode(msg)  # what an unauthenticated sender puts on the wire
    use_secret(secret)
    with pytest.raises(AuthError):
        decode(bare)
    assert decode_or_drop(bare, "test") is None and "dropped" in caplog.text


def test_coordinator_drops_forged_requests(secret: str, tmp_path: Any) -> None:
    import threading

    import zmq

    from runtime.cluster.coordinator import Coordinator, CoordinatorSpec
    from runtime.messages import AddRequest, encode

    addrs = Addresses.ipc(str(tmp_path), 1)
    ctx = zmq.Context()
    front = ctx.socket(zmq.PULL)
    front.bind(addrs.to_frontend)
    coordinator = Coordinator(CoordinatorSpec(num_ranks=1, lockstep=False, log_stats=False), addrs, ctx=ctx)
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    push = ctx.socket(zmq.PUSH)
    push.connect(addrs.to_coordinator)
    try:
        # signed with a guessed key (built by hand: the process-wide key is the coordinator thread's too)
        payload = msgspec.msgpack.encode(AddRequest(request_id="forged", prompt_token_ids=[1], params=SamplingParams()))
        push.send(payload + hmac.new(b"guessed", payload, hashlib.sha256).digest())
        push.send(payload)  # unsigned
        push.send(b"\x00garbage")
        push.send(encode(AddRequest(request_id="real", prompt_token_ids=[1], params=SamplingParams())))
        deadline = time.time() + 10
        while not coordinator.queued and time.time() < deadline:  # no rank is ready: requests wait in queue
            time.sleep(0.02)
        time.sleep(0.2)
        assert [r.request_id for r in coordinator.queued] == ["real"] and thread.is_alive()
    finally:
        coordinator.running = False
        thread.join(5)
        ctx.destroy(linger=0)


def test_torchrun_socket_folder_is_private(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from runtime.serve import torchrun_addresses

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old = os.umask(0o022)
    try:
        env = {"TORCHELASTIC_RUN_ID": "abc", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        addrs = torchrun_addresses(env, 2, None)
        run_dir = addrs.to_coordinator.removeprefix("ipc://").rsplit("/", 1)[0]
        assert os.stat(run_dir).st_mode & 0o777 == 0o700
        os.chmod(run_dir, 0o755)  # made by an older version: closed again
        torchrun_addresses(env, 2, None)
        assert os.stat(run_dir).st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


def test_busy_control_port_across_nodes_is_one_line() -> None:
    import socket

    import zmq

    from runtime.config import ConfigError
    from runtime.serve import check_control_ports
    from tests.test_all2all import free_port_block

    master = free_port_block(5)  # coordinator master+1, front end master+2, engines master+3, master+4
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(master)}
    check_control_ports(env, 2)
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", master + 3))  # the first engine's socket
        busy.listen()
        with pytest.raises(ConfigError, match=f"port {master + 3} is in use .* needs ports {master + 1}.."
                                              rf"{master + 4} \(MASTER_PORT \+ 1 ..\): pick another --master-port"):
            check_control_ports(env, 2)
    check_control_ports(dict(env, LOCAL_WORLD_SIZE="2"), 2)  # one node: ipc sockets, nothing to check
    # --headless: the front end's port is the user's own front end, already bound on node 0
    ctx = zmq.Context()
    try:
        front = ctx.socket(zmq.PULL)
        front.bind(f"tcp://127.0.0.1:{master + 2}")
        check_control_ports(env, 2, front_end=False)
        with pytest.raises(ConfigError, match=f"port {master + 2} is in use"):
            check_control_ports(env, 2)
    finally:
        ctx.destroy(linger=0)
    with pytest.raises(ConfigError, match="past 65535"):
        check_control_ports(dict(env, MASTER_PORT="65533"), 2)


def _api_server_without_engines(tmp_path: Any, *extra_args: str) -> tuple[subprocess.Popen, Addresses]:
    # an API server (a fake model's tokenizer, no engine ever reporting) in its own process, once its /health answers
    # 503; extra_args: api_server_main's arguments after the config and the addresses (a launcher's pid)
    import httpx

    from runtime.config import EngineConfig
    from runtime.serve import _cpu_only_env
    from tests.tiny import write_tokenizer

    path = str(tmp_path)
    write_tokenizer(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": 512, "max_position_embeddings": 64, "architectures": ["Fake"]}, f)
    port = unit._free_port()
    config = EngineConfig(model=path, port=port, served_model_name="fake")
    addrs = Addresses(to_coordinator=f"ipc://{path}/coord", to_frontend=f"ipc://{path}/front", to_engines=[])
    code = ("import sys; from runtime.serve import api_server_main; "
            "api_server_main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))")
    api = subprocess.Popen([sys.executable, "-c", code, msgspec.json.encode(config).decode(),
                            msgspec.json.encode(addrs).decode(), *extra_args], env=_cpu_only_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:  # it serves (health: no engine has reported yet)
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 503:
                return api, addrs
        except httpx.HTTPError:
            pass
        if api.poll() is not None or time.monotonic() > deadline:
            api.kill()
            api.wait(5)
            raise AssertionError("the API server did not come up")
        time.sleep(0.1)


def test_api_server_stops_once_its_launcher_is_gone(tmp_path: Any) -> None:
    # no coordinator ever comes (a launcher killed with its coordinator, or one whose coordinator never bound its
    # sockets): the API server must not outlive the launcher, holding its port
    # the launcher lives until the API server serves (a fixed lifetime ran out first on a loaded machine)
    launcher = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    api = None
    try:
        api, _ = _api_server_without_engines(tmp_path, str(launcher.pid))  # it serves while the launcher lives
        launcher.stdin.close()
        launcher.wait(10)
        api.wait(30)  # the launcher's exit + the grace for a coordinator's own EngineDead + uvicorn's shutdown
        assert "the launcher (pid" in api.stdout.read().decode()
    finally:
        for p in (launcher, api):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)


def test_api_server_with_nothing_in_flight_stops_without_the_grace(tmp_path: Any) -> None:
    # EngineDead with no request waiting: nothing to flush, so no FATAL_EXIT_GRACE_S (2 s) before it stops
    import zmq

    from runtime.messages import EngineDead, encode
    from server.api_server import FATAL_EXIT_GRACE_S

    api, addrs = _api_server_without_engines(tmp_path)
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(addrs.to_frontend)
        push.send(encode(EngineDead(reason="the deployment is shutting down")))
        t0 = time.monotonic()
        api.wait(30)
        assert time.monotonic() - t0 < FATAL_EXIT_GRACE_S * 0.75, "waited out the grace with nothing to flush"
        assert "the API server stops in 0 s" in api.stdout.read().decode()
    finally:
        ctx.destroy(linger=0)
        if api.poll() is None:
            api.kill()
            api.wait(5)
