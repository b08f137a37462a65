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
    in_think: bool  # the output starts inside the think block
    text: str = ""
    sent_reasoning: int = 0
    sent_content: int = 0

    def _split(self, final: bool) -> tuple[str, str]:
        """The reasoning and content that are certain so far (a possible partial tag is held back)."""
        text = self.text
        if not self.in_think:
            stripped = text.lstrip()
            if THINK.startswith(stripped) and not final:
                return "", ""  # may still open with <think>
            if not stripped.startswith(THINK):
                return "", text
            text = stripped[len(THINK) :]
        end = text.find(END_THINK)
        if end < 0:
            hold = 0 if final else _partial_tag_len(text, END_THINK)
            return text[: len(text) - hold], ""
        return text[:end], text[end + len(END_THINK) :]

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(new reasoning, new content) that may be shown now."""
        self.text += delta
        reasoning, content = self._split(final)
        new_r = reasoning[self.sent_reasoning :]
        new_c = content[self.sent_content :]
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning))
        self.sent_content = max(self.sent_content, len(content))
        return new_r, new_c
