"""One request's way from engine outputs to text, shared by the offline LLM and the HTTP front end.

A prompt asking for n choices fans out into n engine requests of one choice each (seed + i, so the choices
differ but each is reproducible). Each one's TokenDelta outputs go through RequestState.apply: tokens and
logprobs collected, text detokenized incrementally, stop strings found (the engine does not know them: the
caller aborts the request), the EOS / stop token that ended a request kept out of the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from runtime.detokenizer import IncrementalDetokenizer
from runtime.messages import TokenDelta
from runtime.sampling_params import SamplingParams


def detokenizer(decoder: Any, prompt_token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
    return IncrementalDetokenizer(decoder, prompt_token_ids, params) if decoder is not None else None


def fan_out(params: SamplingParams, n: int, **changes: Any) -> list[SamplingParams]:
    """The n one-choice engine requests of a prompt (changes: e.g. a per-prompt max_tokens); built anew, so
    SamplingParams validates the changed fields too (a ValueError names the field)."""
    fields = {**msgspec.structs.asdict(params), **changes, "n": 1}
    return [SamplingParams(**{**fields, "seed": None if params.seed is None else params.seed + i}) for i in range(n)]


@dataclass
class RequestState:
    """One engine request: one of the n choices of one prompt."""

    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer | None  # None: the model has no tokenizer, answers carry no text
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # from the engine with the first token when asked: per prompt token after the first, (id, logprob, rank)
    prompt_logprobs: list[list[tuple[int, float, int]]] | None = None
    special_ids: set[int] = field(default_factory=set, repr=False)  # the tokenizer's: never text at the end

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, delta: TokenDelta) -> tuple[str, bool]:
        """Takes one engine output in; returns the text that may be shown now, and whether a stop string
        ended the request here (then the caller aborts it in the engine)."""
        self.token_ids.extend(delta.new_token_ids)
        if delta.num_prompt_tokens:
            self.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs)
        new_ids = delta.new_token_ids
        if delta.finish_reason == "stop" and not self.params.skip_special_tokens and new_ids and \
                new_ids[-1] in self.special_ids:
            new_ids = new_ids[:-1]  # the EOS / stop token that ended it is not text, as in vLLM
        text, stopped = self.detok.update(new_ids) if self.detok is not None else ("", False)
        if stopped:
            self.finish_reason = "stop"
            self.stop_reason = self.detok.stop_reason if self.detok is not None else None
        elif delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            if self.detok is not None:
                text += self.detok.finish()
        self.text += text
        return text, stopped
