"""OpenAI request schemas (pydantic, strict: a wrongly typed field is a 400, not a silent coercion)
and response shapes (msgspec structs: the hot streaming path encodes them without pydantic)."""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# ---------------------------------------------------------------- errors


class APIError(Exception):
    """A user-caused problem, answered as an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of content parts",
}


def validation_error(err: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (its dotted path)."""
    first = err.errors()[0]
    # drop the union-branch labels pydantic puts in loc ('str', 'list[int]', ...)
    loc = [str(p) for p in first["loc"] if isinstance(p, int) or "[" not in str(p) and p not in ("str", "int")]
    param = ".".join(loc) or None
    leaf = next((str(p) for p in reversed(first["loc"]) if str(p) in _UNION_HINTS), None)
    if leaf is not None and len(err.errors()) > 1:
        msg = _UNION_HINTS[leaf]
    elif first["type"] == "missing":
        msg = "is a required field"
    else:
        msg = first["msg"][0].lower() + first["msg"][1:]
        if first["type"] not in ("missing",) and "input" in first and not isinstance(first["input"], dict | list):
            msg += f", got {first['input']!r}"[:120]
    return APIError(f"{param}: {msg}" if param else msg, param=param)


# ---------------------------------------------------------------- requests


class _Strict(BaseModel):
    # extra fields are ignored (clients send 'user', 'service_tier', ...); types are not coerced
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling fields (clients pass them through extra_body)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # not OpenAI: the prompt and output token ids in each choice (tests, resumption, debugging)
    return_token_ids: bool = False
    # vLLM's: logprob tokens as "token_id:N", unique where byte tokens all decode to the same '\ufffd'
    return_tokens_as_token_ids: bool = False
    # structured outputs (server/structured.py): OpenAI's response_format, vLLM's guided_* and structured_outputs
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: one grammar engine serves all
    # vLLM's token rules
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1, le=2**31)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # refused with a 400 when true (server/structured.py: refuse_unsupported)
    use_beam_search: bool = False
    # vLLM's: run on this data-parallel rank (0..N-1; checked against the deployment), not routed
    data_parallel_rank: int | None = Field(None, ge=0)
    # vLLM's: add the tokenizer's special tokens (BOS) to the prompt; unset: yes for completions, no for chat
    # (the chat template writes its own)
    add_special_tokens: bool | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=2**31 - 1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ContentPart(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls, name, ... reach the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # vLLM's: false leaves reasoning_content out of the reply; documents reach the chat template (RAG templates)
    include_reasoning: bool = True
    documents: list[dict[str, str]] | None = None


# ---------------------------------------------------------------- responses


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(msgspec.Struct):
    id: str
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None


class ToolCallFunction(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCall(msgspec.Struct):
    id: str
    function: ToolCallFunction
    type: str = "function"


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: ToolCallFunction | None = None


class ChatResponseMessage(msgspec.Struct):
    role: str
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    model: str
    choices: list[ChatChoice]
    usage: Usage | None
    object: str = "chat.completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))


class ModelCard(msgspec.Struct):
    id: str
    max_model_len: int
    object: str = "model"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    owned_by: str = "moe-runtime"
    root: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
