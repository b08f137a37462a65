"""What the offline API returns, shaped like vLLM's RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # per generated token: {token_id: logprob}, the sampled token included (None if not asked)
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    finished: bool = False
    # with SamplingParams(prompt_logprobs=N): None for the first prompt token, then {token_id: logprob}
    # of the prompt token and the top-N
    prompt_logprobs: list[dict[int, float] | None] | None = None
