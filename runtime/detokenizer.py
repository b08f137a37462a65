"""Incremental detokenization with stop strings, shared by the offline API and the HTTP front end.

Usage per request:
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
    delta, stopped = detok.update(new_token_ids)   # text safe to show now; stopped: a stop string hit
    ...
    tail = detok.finish()                            # held-back text, once the request has ended
    detok.text                                       # the whole output text (stop string cut off)

Text is held back while it ends in an incomplete UTF-8 sequence, or could be the start of a stop string.
"""

from __future__ import annotations

from typing import Any

from runtime.sampling_params import SamplingParams

# Prompt tokens decoded along with the first outputs, so that tokenizers that merge leading
# spaces or bytes across token boundaries print the first output correctly.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = [s for s in (params.stop or []) if s]
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.token_ids = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""  # output text so far (decoded, stop-truncated)
        self.num_emitted = 0  # characters of self.text already returned
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that ended the output

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, new_token_ids: list[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.token_ids[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix) :]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
            if self.stop and self._check_stop(len(full) - len(prefix)):
                self.stopped = True
                break
        safe_end = len(self.text) if self.stopped else max(self.num_emitted, len(self.text) - self.hold)
        delta = self.text[self.num_emitted : safe_end]
        self.num_emitted = safe_end
        return delta, self.stopped

    def _check_stop(self, num_new_chars: int) -> bool:
        # only a window that includes the new characters can hold a new match
        start = max(0, len(self.text) - num_new_chars - self.hold - 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return False
        idx, s = best
        self.stop_reason = s
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        self.num_emitted = min(self.num_emitted, len(self.text))
        return True

    def finish(self) -> str:
        """The held-back tail, once no more tokens will come."""
        delta = self.text[self.num_emitted :]
        self.num_emitted = len(self.text)
        return delta
