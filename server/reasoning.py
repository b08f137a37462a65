"""Reasoning parsers: the model's <think>...</think> part -> reasoning_content, the rest -> content.

qwen3 and glm45: the output reasons when it opens with <think> (or when the chat template already wrote
<think> at the end of the prompt); with enable_thinking off their templates close the block in the prompt,
and the whole output is content. deepseek_r1: its template opens the block in the prompt, so the output
starts inside it unless it opens with </think>-less content of a disabled-thinking prompt. Without a
closing </think> everything after the start is reasoning (the budget ran out while thinking).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.tool_parsers import _partial_tag_len

THINK, END_THINK = "<think>", "</think>"
PARSERS = ("qwen3", "glm45", "deepseek_r1")


def starts_thinking(parser: str, prompt_text: str, enable_thinking: bool) -> bool:
    """Whether the output begins inside the think block (the prompt opened it)."""
    tail = prompt_text.rstrip()
    if tail.endswith(END_THINK):
        return False
    if tail.endswith(THINK):
        return True
    return parser == "deepseek_r1" and enable_thinking


def split_reasoning(text: str, in_think: bool) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole output."""
    if not in_think:
        if not text.lstrip().startswith(THINK):
            return None, text or None
        text = text.lstrip()[len(THINK) :]
    if END_THINK not in text:
        return text or None, None
    reasoning, content = text.split(END_THINK, 1)
    return reasoning or None, content or None


@dataclass
class StreamingReasoningParser:
    """Streams split_reasoning's answer; each feed costs O(its text), however long the reasoning."""

    in_think: bool  # the output starts inside the think block
    _phase: str = ""  # "start" (may still open with <think>), "think" or "content"
    _held: str = ""  # text not yet sent: a possible opening <think> or a partial </think>

    def __post_init__(self) -> None:
        self._phase = "think" if self.in_think else "start"

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(new reasoning, new content) that may be shown now."""
        text, self._held = self._held + delta, ""
        if self._phase == "start":
            stripped = text.lstrip()
            if THINK.startswith(stripped) and not final:
                self._held = text  # may still open with <think>
                return "", ""
            if not stripped.startswith(THINK):
                self._phase = "content"
                return "", text
            self._phase, text = "think", stripped[len(THINK) :]
        if self._phase == "content":
            return "", text
        end = text.find(END_THINK)
        if end >= 0:
            self._phase = "content"
            return text[:end], text[end + len(END_THINK) :]
        hold = 0 if final else _partial_tag_len(text, END_THINK)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], ""
