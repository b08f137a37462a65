"""The two generation endpoints: a validated request in, a JSON body or an SSE stream out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.chat_output import ChatOutput, finish_reason, split_tool_call_deltas
from server.protocol import (
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
)
from server.reasoning import starts_thinking
from server.serving import Choice, Serving
from server.structured import tool_plan, truncate_prompt

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    # JSON may carry U+0085, U+2028 and U+2029 raw, but clients that split the stream with
    # str.splitlines() (httpx's aiter_lines among them) would cut the event there: escape them
    data = _json.encode(obj)
    if b"\xc2\x85" in data or b"\xe2\x80" in data:
        data = data.replace(b"\xc2\x85", b"\\u0085").replace(b"\xe2\x80\xa8", b"\\u2028")
        data = data.replace(b"\xe2\x80\xa9", b"\\u2029")
    return b"data: " + data + b"\n\n"


def json_response(obj: Any) -> Response:
    return Response(_json.encode(obj), media_type="application/json")


class GroupStream(StreamingResponse):
    """An SSE response that releases its engine requests however it ends: finished, client gone
    (Starlette cancels the body iterator), or never started."""

    def __init__(self, body: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def until_disconnect(request: Request, work: Coroutine[Any, Any, Response],
                           on_disconnect: Callable[[], None] | None = None) -> Response:
    """Runs a non-streaming request, cancelling it when the client goes away (the body has been read,
    so the next ASGI message can only be the disconnect). A disconnect is not an error: the answer is a
    499 that nobody reads, and on_disconnect counts it."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        # cancel() only asks: wait until both really ended (reading a result too early was a 500)
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        if on_disconnect is not None:
            on_disconnect()
        return Response(status_code=499)  # nobody reads it; the client is gone
    return task.result()


def _release(serving: Serving, group: Any, choices: list[Choice]) -> Callable[[], None]:
    def release() -> None:
        serving.client.release(group)
        for c in choices:
            serving.record(c)  # those never finished count as aborted

    return release


async def respond(serving: Serving, request: Request, group: Any, choices: list[Choice], stream: bool,
                  chunks: Callable[[], AsyncIterator[bytes]], whole: Callable[[], Response]) -> Response:
    """The one skeleton of both endpoints: a stream of SSE chunks (an error inside it becomes an error event,
    then [DONE]), or one JSON body once every choice has ended; either way the engine requests are released
    (a disconnected client frees its KV blocks)."""
    release = _release(serving, group, choices)
    if stream:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks():
                    yield chunk
            except Exception as err:
                yield await _error_event(err)
            yield DONE

        return GroupStream(body(), release)

    async def collect() -> Response:
        async for _ in serving.events(group, choices):
            pass
        return whole()

    try:
        return await until_disconnect(request, collect(), serving.metrics.client_disconnects.inc)
    finally:
        release()


async def _error_event(err: Exception) -> bytes:
    # headers are gone once a stream started: report in-band, as OpenAI does
    if isinstance(err, APIError):  # e.g. the engine became unavailable mid-stream: keep its type and code
        return sse(err.body())
    message = f"internal error: {type(err).__name__}: {err}"
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def _usage_options(req: CompletionRequest | ChatCompletionRequest) -> tuple[bool, bool]:
    """(a final usage chunk, usage on every chunk: vLLM's continuous_usage_stats)."""
    opts = req.stream_options
    if opts is None or not opts.include_usage:
        return False, False
    return True, opts.continuous_usage_stats


# ---------------------------------------------------------------- /v1/completions


def _completion_logprobs(
    name: Callable[[int], str],
    entries: list[list[tuple[int, float]]],
    offset: int,
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for entry in entries:
        token_id, logprob = entry[0]
        text = name(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        top = entry[1:] or entry[:1]
        out.top_logprobs.append({name(t): lp for t, lp in top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _echo_logprobs(
    name: Callable[[int], str], prompt_ids: list[int], entries: list[list[tuple[int, float, int]]] | None
) -> CompletionLogprobs:
    # the first prompt token has no logprob (null, as in OpenAI); the others come from the engine's prefill
    out = CompletionLogprobs()
    offset = 0
    for i, t in enumerate(prompt_ids):
        text = name(t)
        entry = entries[i - 1] if entries is not None and 0 < i <= len(entries) else None
        out.tokens.append(text)
        out.token_logprobs.append(entry[0][1] if entry else None)
        out.top_logprobs.append({name(tid): lp for tid, lp, _ in (entry[1:] or entry[:1])} if entry else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _prompt_logprobs(name: Callable[[int], str], c: Choice) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt_logprobs: null for the first token, then {token_id: {logprob, rank, decoded_token}}."""
    if c.params.prompt_logprobs is None or c.prompt_logprobs is None:
        return None
    out: list[dict[str, Any] | None] = [None]
    for entry in c.prompt_logprobs:
        out.append({str(t): {"logprob": lp, "rank": rank, "decoded_token": name(t)} for t, lp, rank in entry})
    return out


async def create_completion(serving: Serving, req: CompletionRequest, request: Request) -> Response:
    serving.check_model(req.model)
    prompts = await serving.completion_prompts(req)
    prompt_ids = [truncate_prompt(req, ids) for _, ids in prompts]
    max_tokens = [serving.resolve_max_tokens(len(ids), req.max_tokens, "max_tokens") for ids in prompt_ids]
    params = await serving.extras.apply(req, serving.sampling_params(req, req.logprobs))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    echo = [text if text is not None else serving.decode(ids) for text, ids in prompts] if req.echo else None
    want_logprobs = req.logprobs is not None
    name = serving.token_namer(req.return_tokens_as_token_ids)
    group, choices = serving.open(request_id, prompt_ids, req.n, params, max_tokens, req.data_parallel_rank)
    model = req.model or serving.model_name  # the name the client used (check_model accepted it)
    include_usage, each_usage = _usage_options(req)

    def prompt_of(c: Choice) -> int:
        return c.index // req.n

    async def chunks() -> AsyncIterator[bytes]:
        offsets = {c.index: 0 for c in choices}
        echoed: set[int] = set()

        def echo_chunk(c: Choice) -> bytes:
            echoed.add(c.index)
            lp = _echo_logprobs(name, c.prompt_token_ids, c.prompt_logprobs) if want_logprobs else None
            offsets[c.index] = len(echo[prompt_of(c)])
            choice = CompletionChoice(c.index, echo[prompt_of(c)], lp, prompt_logprobs=_prompt_logprobs(name, c))
            return sse(CompletionResponse(request_id, model, [choice], None))

        if echo is not None and not want_logprobs:
            for c in choices:
                yield echo_chunk(c)
        async for ev in serving.events(group, choices):
            c = ev.choice
            if echo is not None and c.index not in echoed:
                yield echo_chunk(c)  # with logprobs: they came with this first output
            if not ev.text and c.finish_reason is None and not want_logprobs and serving.tokenizer is not None:
                continue  # held back (partial character or possible stop string); a model without a
                # tokenizer has no text at all, so each step's tokens still make a chunk
            lp = None
            if want_logprobs and ev.logprobs:
                lp = _completion_logprobs(name, ev.logprobs, offsets[c.index])
            offsets[c.index] += len(ev.text)
            yield sse(
                CompletionResponse(
                    request_id,
                    model,
                    [CompletionChoice(c.index, ev.text, lp, c.finish_reason, c.stop_reason)],
                    serving.usage(prompt_ids, choices) if each_usage else None,
                )
            )
        if include_usage:
            yield sse(CompletionResponse(request_id, model, [], serving.usage(prompt_ids, choices)))

    def whole() -> Response:
        out = []
        for c in choices:
            text, lp = c.text, None
            if echo is not None:
                text = echo[prompt_of(c)] + text
            if want_logprobs:
                start = len(echo[prompt_of(c)]) if echo is not None else 0
                lp = _completion_logprobs(name, c.logprobs, start)
                if echo is not None:
                    head = _echo_logprobs(name, c.prompt_token_ids, c.prompt_logprobs)
                    for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        setattr(lp, f, getattr(head, f) + getattr(lp, f))
            ids = (c.token_ids, c.prompt_token_ids) if req.return_token_ids else (None, None)
            out.append(CompletionChoice(c.index, text, lp, c.finish_reason, c.stop_reason, *ids,
                                        prompt_logprobs=_prompt_logprobs(name, c)))
        return json_response(CompletionResponse(request_id, model, out, serving.usage(prompt_ids, choices)))

    return await respond(serving, request, group, choices, req.stream, chunks, whole)


# ---------------------------------------------------------------- /v1/chat/completions


def _chat_logprobs(name: Callable[[int], str], entries: list[list[tuple[int, float]]]) -> ChatLogprobs:
    content = []
    for entry in entries:
        token_id, logprob = entry[0]
        text = name(token_id)
        top = [TopLogprob(name(t), lp, list(name(t).encode())) for t, lp in entry[1:]]
        content.append(TokenLogprob(text, logprob, list(text.encode()), top))
    return ChatLogprobs(content)


async def create_chat_completion(serving: Serving, req: ChatCompletionRequest, request: Request) -> Response:
    serving.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs: needs logprobs set to true", param="top_logprobs")
    plan = tool_plan(req, serving.enable_auto_tool_choice)
    prompt_ids = truncate_prompt(req, await serving.chat_prompt(req, req.tools))  # listed even under "none", as vLLM
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = serving.resolve_max_tokens(len(prompt_ids), limit, param)
    params = serving.sampling_params(req, (req.top_logprobs or 0) if req.logprobs else None)
    params = await serving.extras.apply(req, params, plan)
    glm = (plan.mode == "auto" and serving.tool_call_parser == "glm45") or serving.reasoning_parser == "glm45"
    if glm and "skip_special_tokens" not in req.model_fields_set:
        # GLM's <tool_call> / <arg_key> / <think> markers may be special tokens: keep them in the text the parsers
        # read (the EOS that ends the answer never shows)
        params = msgspec.structs.replace(params, skip_special_tokens=False)
    in_think = False
    if serving.reasoning_parser is not None:
        thinking = (req.chat_template_kwargs or {}).get("enable_thinking", True) is not False
        in_think = starts_thinking(serving.reasoning_parser, serving.decode(prompt_ids[-8:]), thinking)

    if in_think and params.grammar is not None:
        # the template opened a think block: the model reasons freely, the grammar shapes the answer after it
        params = msgspec.structs.replace(params, grammar_after="</think>")

    def parser() -> ChatOutput:
        return ChatOutput(serving.reasoning_parser, in_think, plan, serving.tool_call_parser)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    name = serving.token_namer(req.return_tokens_as_token_ids)
    group, choices = serving.open(request_id, [prompt_ids], req.n, params, [max_tokens], req.data_parallel_rank)
    model = req.model or serving.model_name  # the name the client used (check_model accepted it)
    include_usage, each_usage = _usage_options(req)

    async def chunks() -> AsyncIterator[bytes]:
        outputs = {c.index: parser() for c in choices}
        for c in choices:
            yield sse(
                ChatCompletionChunk(
                    request_id, model, [ChatChunkChoice(c.index, ChatDelta(role="assistant", content=""))]
                )
            )
        async for ev in serving.events(group, choices):
            c = ev.choice
            out = outputs[c.index]
            delta = ChatDelta(content=ev.text) if ev.text else ChatDelta()
            if out.active:
                reasoning, content, calls = out.feed(ev.text, c.finish_reason is not None)
                reasoning = reasoning if req.include_reasoning else ""
                delta = ChatDelta(content=content or None, reasoning_content=reasoning or None,
                                  tool_calls=calls or None)
                if not (reasoning or content or calls) and c.finish_reason is None and not req.logprobs:
                    continue
                if calls:  # OpenAI's shape: text first, then a call's id and name, then its arguments
                    heads, rest = split_tool_call_deltas(calls)
                    pieces = [ChatDelta(content=content or None, reasoning_content=reasoning or None)]
                    pieces = pieces if content or reasoning else []
                    pieces += [ChatDelta(tool_calls=d) for d in (heads, rest) if d]
                    *firsts, delta = pieces  # the last piece carries the logprobs and finish_reason
                    for d in firsts:
                        yield sse(ChatCompletionChunk(request_id, model, [ChatChunkChoice(c.index, d)]))
            elif not ev.text and c.finish_reason is None and not req.logprobs and serving.tokenizer is not None:
                continue
            lp = _chat_logprobs(name, ev.logprobs) if req.logprobs and ev.logprobs else None
            reason = finish_reason(c.finish_reason, out.num_calls)
            yield sse(
                ChatCompletionChunk(
                    request_id,
                    model,
                    [ChatChunkChoice(c.index, delta, lp, reason, c.stop_reason)],
                    serving.usage([prompt_ids], choices) if each_usage else None,
                )
            )
        if include_usage:
            yield sse(ChatCompletionChunk(request_id, model, [], serving.usage([prompt_ids], choices)))

    def whole() -> Response:
        out = []
        for c in choices:
            parts = parser().whole(c.text)
            out.append(
                ChatChoice(
                    c.index,
                    ChatResponseMessage("assistant", parts.content, parts.reasoning if req.include_reasoning else None,
                                        parts.tool_calls),
                    _chat_logprobs(name, c.logprobs) if req.logprobs else None,
                    finish_reason(c.finish_reason, len(parts.tool_calls)),
                    c.stop_reason,
                    *((c.token_ids, c.prompt_token_ids) if req.return_token_ids else (None, None)),
                )
            )
        response = ChatCompletionResponse(request_id, model, out, serving.usage([prompt_ids], choices))
        response.prompt_logprobs = _prompt_logprobs(name, choices[0])
        return json_response(response)

    return await respond(serving, request, group, choices, req.stream, chunks, whole)
