"""From a validated OpenAI request to engine requests and back: prompt checks, sampling parameters,
fan-out of n choices, incremental detokenization, and the events both endpoints format."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from runtime.messages import TokenDelta
from runtime.output_processor import RequestState, detokenizer, fan_out
from runtime.sampling_params import SamplingParams
from runtime.tokenizer import fast_decoding
from server.engine_client import EngineClient, RequestGroup
from server.metrics import Metrics
from server.protocol import APIError, ChatCompletionRequest, CompletionRequest, Usage
from server.structured import RequestExtras

# Strings longer than this are tokenized in a worker thread, so one huge prompt cannot stall the
# event loop that streams everybody else's tokens.
_THREAD_TOKENIZE_CHARS = 4096


@dataclass
class Choice(RequestState):
    """One engine request (one of the n choices of one prompt) as the front end follows it."""

    arrival: float = 0.0
    first_token_time: float | None = None
    recorded: bool = False
    # the engine's queue and first-scheduled-to-first-token durations (TokenDelta), from its first output
    queue_time: float | None = None
    prefill_time: float | None = None


@dataclass
class Event:
    choice: Choice
    text: str
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None


def _check_unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(f"{param}: contains a lone surrogate; send valid Unicode text", param=param) from None


class Serving:
    def __init__(
        self,
        model_name: str | list[str],
        max_model_len: int,
        vocab_size: int,
        tokenizer: Any,
        chat_template: str | None,
        client: EngineClient,
        metrics: Metrics,
    ) -> None:
        # every name a client may send; the first is the one answers carry when the request names none
        self.model_names = [model_name] if isinstance(model_name, str) else list(model_name)
        self.model_name = self.model_names[0]
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self._detok_tokenizer = fast_decoding(tokenizer)
        self.chat_template = chat_template
        self.client = client
        self.metrics = metrics
        self._token_text: dict[int, str] = {}
        self.extras = RequestExtras(tokenizer, vocab_size)
        self._special_ids: set[int] = set(getattr(tokenizer, "all_special_ids", None) or [])
        # set from the config by build_app (tool_choice auto, tool-call and reasoning formats)
        self.enable_auto_tool_choice = False
        self.tool_call_parser: str | None = None
        self.reasoning_parser: str | None = None
        self.generation_defaults: dict[str, float | int] = {}  # --generation-config

    # ------------------------------------------------------------ request checks

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            served = " or ".join(repr(m) for m in self.model_names)
            raise APIError(
                f"model {model!r} does not exist; this server serves {served}",
                status_code=404,
                param="model",
                code="model_not_found",
            )

    async def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise APIError(f"{param}: this model has no tokenizer; send the prompt as token ids", param=param)
        _check_unicode(text, param)
        if len(text) > _THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(text if given as text, token ids) per prompt."""
        p = req.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [p]  # type: ignore[list-item]
        else:
            items = list(p)  # type: ignore[arg-type]
        if not items:
            raise APIError("prompt: must not be empty", param="prompt")
        out: list[tuple[str | None, list[int]]] = []
        special = req.add_special_tokens is not False
        for item in items:
            if isinstance(item, str):
                out.append((item, await self.encode(item, "prompt", add_special_tokens=special)))
            else:
                out.append((None, self.check_token_ids(item, "prompt")))
        return out

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(f"{param}: token id {bad} is outside the vocabulary [0, {self.vocab_size})", param=param)
        return list(ids)

    async def chat_prompt(self, req: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None) -> list[int]:
        messages: list[dict[str, Any]] = []
        for i, m in enumerate(req.messages):
            msg = _tool_call_arguments(m.model_dump(exclude_none=True))
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise APIError(
                            f"messages.{i}.content: content part type {part.type!r} is not supported (text only)",
                            param=f"messages.{i}.content",
                        )
                    texts.append(part.text)
                msg["content"] = "\n".join(texts)
            if isinstance(msg.get("content"), str):
                _check_unicode(msg["content"], f"messages.{i}.content")
            messages.append(msg)
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message,
                **({"tools": tools} if tools else {}),
                **({"documents": req.documents} if req.documents else {}),
                **(req.chat_template_kwargs or {}),
            )
        except Exception as err:  # a template that rejects these messages is the request's problem
            raise APIError(f"messages: the chat template failed on them: {err}", param="messages") from None
        # the template already wrote the special tokens (BOS, role markers) it wants
        return await self.encode(text, "messages", add_special_tokens=req.add_special_tokens is True)

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None, param: str) -> int:
        if prompt_len == 0:
            raise APIError("prompt: must not be empty", param="prompt")
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise APIError(
                f"prompt: {prompt_len} tokens do not fit the model's context of {self.max_model_len} "
                "tokens (with room for 1 output token); shorten the prompt",
                param="prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(
                f"{param}: {max_tokens} output tokens after a {prompt_len}-token prompt exceed the "
                f"model's context of {self.max_model_len} tokens; ask for at most {room}",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    def sampling_params(self, req: CompletionRequest | ChatCompletionRequest, logprobs: int | None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        if stop is not None:
            if any(s == "" for s in stop):
                raise APIError("stop: stop strings must not be empty", param="stop")
            for s in stop:
                _check_unicode(s, "stop")
        if req.stop_token_ids:
            self.check_token_ids(req.stop_token_ids, "stop_token_ids")
        d = self.generation_defaults
        return _checked(
            n=1,  # the front end fans out: n engine requests of one choice each
            temperature=d.get("temperature", 1.0) if req.temperature is None else req.temperature,
            top_p=d.get("top_p", 1.0) if req.top_p is None else req.top_p,
            top_k=d.get("top_k", 0) if req.top_k is None else req.top_k,
            min_p=d.get("min_p", 0.0) if req.min_p is None else req.min_p,
            seed=req.seed,
            max_tokens=None,
            min_tokens=req.min_tokens,
            stop=stop or None,
            stop_token_ids=req.stop_token_ids or None,
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=d.get("repetition_penalty", 1.0) if req.repetition_penalty is None
            else req.repetition_penalty,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )

    # ------------------------------------------------------------ running

    def open(
        self,
        request_id: str,
        prompts: list[list[int]],
        n: int,
        params: SamplingParams,
        max_tokens: list[int],
        data_parallel_rank: int | None = None,
    ) -> tuple[RequestGroup, list[Choice]]:
        now = time.time()
        choices: list[Choice] = []
        decoder = self._detok_tokenizer if self.tokenizer is not None else None
        for p, ids in enumerate(prompts):
            try:
                children = fan_out(params, n, max_tokens=max_tokens[p])
            except ValueError as err:  # SamplingParams' check of the per-prompt fields (it names the field)
                raise APIError(str(err), param=str(err).split(" ", 1)[0]) from None
            for i, child in enumerate(children):
                choices.append(Choice(p * n + i, f"{request_id}-{p}-{i}", ids, child, detokenizer(decoder, ids, child),
                                      special_ids=self._special_ids, arrival=now))
        group = self.client.open(
            [(c.request_id, c.prompt_token_ids, c.params) for c in choices], data_parallel_rank
        )
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts))
        for ids in prompts:
            self.metrics.vllm.on_prompt(len(ids))
        return group, choices

    async def events(self, group: RequestGroup, choices: list[Choice]) -> AsyncIterator[Event]:
        by_id = {c.request_id: c for c in choices}
        while not group.done:
            merged: dict[str, Event] = {}  # one event per choice for all the outputs waiting
            for delta in await group.next_batch():
                c = by_id[delta.request_id]
                if c.finish_reason is not None:
                    continue  # ended by a stop string; the engine's last outputs are moot
                text = self._apply(group, c, delta)
                ev = merged.get(c.request_id)
                if ev is None:
                    merged[c.request_id] = Event(c, text, list(delta.new_token_ids), delta.logprobs)
                else:
                    ev.text += text
                    ev.token_ids += delta.new_token_ids
                    if delta.logprobs is not None:
                        ev.logprobs = (ev.logprobs or []) + delta.logprobs
            for ev in merged.values():
                yield ev

    def _apply(self, group: RequestGroup, c: Choice, delta: TokenDelta) -> str:
        """Takes one engine output into its choice; returns the text that may be shown now."""
        if c.first_token_time is None:
            c.first_token_time = time.time()
        if c.queue_time is None and delta.queue_time is not None:  # a resumed request's next first is moot
            c.queue_time, c.prefill_time = delta.queue_time, delta.prefill_time
        text, stopped = c.apply(delta)
        if stopped:  # a stop string: the engine would not know, so end it here
            group.finish(c.request_id)
        if c.finished:
            self.record(c)
        return text

    def record(self, c: Choice) -> None:
        """Metrics of one finished (or abandoned) choice, once."""
        if not c.recorded:
            c.recorded = True
            self.metrics.on_request_done(c.arrival, c.first_token_time, time.time(), len(c.token_ids), c.finish_reason,
                                         c.params.max_tokens, c.queue_time, c.prefill_time)

    def usage(self, prompts: list[list[int]], choices: list[Choice]) -> Usage:
        num_prompt = sum(len(p) for p in prompts)
        num_out = sum(len(c.token_ids) for c in choices)
        return Usage(prompt_tokens=num_prompt, completion_tokens=num_out, total_tokens=num_prompt + num_out)

    def decode(self, token_ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids)

    def token_namer(self, as_ids: bool) -> Callable[[int], str]:
        return (lambda t: f"token_id:{t}") if as_ids else self.token_text

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = (
                str(token_id)
                if self.tokenizer is None
                else self.tokenizer.decode([token_id], skip_special_tokens=False)
            )
            self._token_text[token_id] = text
        return text


def _tool_call_arguments(msg: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool_calls carry arguments as JSON text (OpenAI); templates iterate them as
    a mapping (GLM's) or print them (Qwen's), so give them the object."""
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except ValueError:
                pass
    return msg


def _checked(**fields: Any) -> SamplingParams:
    """SamplingParams.validate's ValueError (it starts with the field's name) as a 400."""
    try:
        return SamplingParams(**fields)
    except ValueError as err:
        raise APIError(str(err), param=str(err).split(" ", 1)[0]) from None
