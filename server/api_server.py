"""The OpenAI-compatible HTTP front end: FastAPI app and the process entry the launcher starts.

Own process, no CUDA context: it tokenizes, talks to the coordinator/engines over ZMQ (msgpack),
detokenizes and streams. Bad input of any kind is a 4xx with an OpenAI-style error body."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.config import ConfigError, EngineConfig
from runtime.messages import Addresses
from runtime.model_source import generation_defaults
from server import endpoints
from server.engine_client import EngineClient
from server.extra_routes import add_extra_routes
from server.metrics import CONTENT_TYPE, Metrics
from server.protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, validation_error
from server.serving import Serving

log = logging.getLogger("server")

FATAL_EXIT_GRACE_S = 2.0  # after the engines are gone for good: time for the 503 errors to reach the clients
MAX_BODY_BYTES = 16 * 1024 * 1024  # far above a max-context prompt as token ids; stops memory abuse
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


class FrontDoor:
    """Pure ASGI middleware (BaseHTTPMiddleware would interfere with disconnect detection of
    streams): the API-key check, and HTTP request counts by endpoint and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        status = [500]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and path.startswith("/v1"):
                auth = dict(scope["headers"]).get(b"authorization")
                if auth is None or not hmac.compare_digest(auth, self.expected):  # no timing oracle on the key
                    err = APIError(
                        "invalid or missing API key: send 'Authorization: Bearer <key>'",
                        status_code=401,
                        type="authentication_error",
                        code="invalid_api_key",
                    )
                    await _error_response(err)(scope, receive, send_counted)
                    return
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()


async def read_json(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(
            f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit",
            status_code=413,
            code="body_too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(
                f"request body is over the {MAX_BODY_BYTES}-byte limit", status_code=413, code="body_too_large"
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise APIError("request body is empty: send a JSON object")
    try:
        obj = json.loads(body)
    except UnicodeDecodeError as err:
        raise APIError(f"request body is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise APIError(
            f"malformed JSON in the request body: {err.msg} at line {err.lineno} column {err.colno}",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise APIError("malformed JSON in the request body: nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(f"request body must be a JSON object, got a JSON {type(obj).__name__}")
    return obj


# OpenAI features this server does not implement: refused by name rather than silently ignored
# (structured outputs, tools, logit_bias and vLLM's extras are in server/structured.py)
_UNSUPPORTED: dict[str, Any] = {
    "suffix": bool,
    "functions": bool,
    # vLLM extras we do not implement: refused when they would change the answer
    "length_penalty": lambda v: v not in (None, 1, 1.0),
    "logits_processors": bool,
    "guided_whitespace_pattern": lambda v: v is not None,
    "spaces_between_special_tokens": lambda v: v is False,
    "chat_template": lambda v: v is not None,  # a request's own template: vLLM refuses it too unless trusted
    "priority": lambda v: v not in (None, 0),  # no priority scheduling
    "cache_salt": lambda v: v is not None,  # no per-tenant prefix-cache isolation: refuse rather than pretend
}


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_int_range(obj: Any) -> None:
    """Every integer anywhere in the body fits 64 bits (a 400 naming the field): the schema bounds each known
    field tighter, this catches the rest before an oversized int reaches the msgpack encoder (a 500)."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            if value and all(type(v) is int for v in value):  # token ids: one pass, no per-item stack entries
                bad = next((v for v in value if not _INT64_MIN <= v <= _INT64_MAX), None)
                if bad is not None:
                    raise APIError(f"{path}: integer {bad} is out of range", param=path or None)
            else:
                stack.extend((f"{path}.{i}", v) for i, v in enumerate(value))
        elif type(value) is int and not _INT64_MIN <= value <= _INT64_MAX:
            raise APIError(f"{path}: integer {value} is out of range", param=path or None)


def _parse(model: type[CompletionRequest] | type[ChatCompletionRequest], obj: dict[str, Any]) -> Any:
    check_int_range(obj)
    for name, used in _UNSUPPORTED.items():
        if name in obj and used(obj[name]):
            raise APIError(f"{name}: not supported by this server", param=name, code="unsupported")
    if model is ChatCompletionRequest and obj.get("echo"):
        raise APIError("echo: not supported on chat completions", param="echo", code="unsupported")
    best_of = obj.get("best_of")
    if best_of is not None and best_of != obj.get("n", 1):
        raise APIError("best_of: only best_of == n is supported", param="best_of", code="unsupported")
    try:
        return model.model_validate(obj, strict=True)
    except ValidationError as err:
        raise validation_error(err) from None


def answer_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An unexpected exception becomes an APIError 500 inside the route: Starlette answers a bare Exception
    in its outermost middleware and then re-raises it, and uvicorn closes the keep-alive connection."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except (APIError, HTTPException):
            raise
        except Exception as err:
            log.exception("internal error")
            raise APIError(f"internal error: {type(err).__name__}: {err}", status_code=500,
                           type="server_error") from None

    return wrapped


def max_model_len_of(config: EngineConfig) -> int:
    # the engine's rule: the flag, else the model's position limit (rope scaling included)
    return config.resolved_max_model_len()


def vocab_size_of(config: EngineConfig) -> int:
    return config.model_info().vocab_size


def load_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ConfigError(f"--chat-template {path!r} is not a file: pass a Jinja template file")
    with open(path) as f:
        return f.read()


def build_app(config: EngineConfig, client: EngineClient, metrics: Metrics, tokenizer: Any) -> ASGIApp:
    metrics.track_client(client)
    serving = Serving(
        config.served_model_names,
        max_model_len_of(config),
        vocab_size_of(config),
        tokenizer,
        load_chat_template(config.chat_template),
        client,
        metrics,
    )
    serving.enable_auto_tool_choice = config.enable_auto_tool_choice
    serving.tool_call_parser = config.tool_call_parser
    serving.reasoning_parser = config.reasoning_parser
    serving.generation_defaults = generation_defaults(config.generation_config, config.model)
    if serving.generation_defaults:
        log.info("sampling defaults from generation_config.json: %s", serving.generation_defaults)
    if serving.chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        log.warning(
            "the tokenizer has no chat template and no --chat-template was given: /v1/chat/completions will answer 400"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.start()
        yield
        await client.close()

    app = FastAPI(title="moe-runtime OpenAI API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = serving

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(err.detail), status_code=err.status_code, type=kind))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error_response(
            APIError(f"internal error: {type(err).__name__}: {err}", status_code=500, type="server_error")
        )

    @app.post("/v1/completions")
    @answer_errors
    async def completions(request: Request) -> Response:
        req = _parse(CompletionRequest, await read_json(request))
        return await endpoints.create_completion(serving, req, request)

    @app.post("/v1/chat/completions")
    @answer_errors
    async def chat_completions(request: Request) -> Response:
        if serving.chat_template is None and getattr(tokenizer, "chat_template", None) is None:
            raise APIError(
                "this model's tokenizer has no chat template; start the server with --chat-template "
                "FILE or use /v1/completions",
                param="messages",
            )
        req = _parse(ChatCompletionRequest, await read_json(request))
        return await endpoints.create_chat_completion(serving, req, request)

    @app.get("/v1/models")
    async def models() -> Response:
        cards = [ModelCard(id=name, max_model_len=serving.max_model_len, root=config.model)
                 for name in serving.model_names]
        return endpoints.json_response(ModelList(cards))

    @app.get("/health")
    async def health() -> Response:
        # the coordinator sends ClusterStats at least every second: a few missed ones mean trouble
        status = client.health(stale_after=3 * min(1.0, config.log_stats_interval) + 5.0)
        body = msgspec.json.encode({"status": status})
        return Response(body, status_code=200 if status == "ok" else 503, media_type="application/json")

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    add_extra_routes(app, serving, read_json)

    return FrontDoor(app, config.api_key, metrics)


def watch_launcher(pid: int, interval_s: float = 1.0) -> threading.Thread:
    """The API server stops once the launcher that owns the deployment (python -m runtime.serve, or torchrun's
    agent) has exited. Normally the coordinator says so first (EngineDead: every waiting client gets its 503); this
    is for when the coordinator is gone too (killed with the launcher, or never bound its sockets): without it the
    API server would outlive everything, holding its port."""
    from runtime.cluster.rank_watch import process_alive

    def run() -> None:
        while process_alive(pid):
            time.sleep(interval_s)
        time.sleep(FATAL_EXIT_GRACE_S + 1.0)  # the coordinator's EngineDead path, if it is alive, goes first
        log.error("the launcher (pid %d) has exited: the API server stops", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="watch-launcher", daemon=True)
    thread.start()
    return thread


def run_api_server(config: EngineConfig, addrs: Addresses, watch_pid: int | None = None) -> None:
    """Process entry (blocking). The launcher starts it with CUDA_VISIBLE_DEVICES="" and its own pid (watch_pid)."""
    import uvicorn

    from runtime.tokenizer import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokenizer = load_tokenizer(config.tokenizer_path)  # None: token-id prompts only
    metrics = Metrics(config.model_name)
    client = EngineClient(addrs, config.max_queue_len, on_stats=metrics.cluster.update)

    def exit_soon(reason: str, num_failed: int) -> None:
        # every waiting client has its 503 queued; let the streams flush, then stop (the launcher exits too).
        # With none waiting there is nothing to flush (uvicorn's graceful shutdown still ends open responses)
        grace_s = FATAL_EXIT_GRACE_S if num_failed else 0.0
        log.error("engine ranks are gone (%s): the API server stops in %.0f s", reason, grace_s)
        asyncio.get_running_loop().call_later(grace_s, os.kill, os.getpid(), signal.SIGTERM)

    client.on_fatal = exit_soon
    if watch_pid:
        watch_launcher(watch_pid)
    app = build_app(config, client, metrics, tokenizer)
    log.info(
        "OpenAI API for %r on http://%s:%d (max_model_len %d)",
        config.model_name,
        config.host,
        config.port,
        max_model_len_of(config),
    )
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,  # a stream that never ends must not keep a stopping server alive
    )
