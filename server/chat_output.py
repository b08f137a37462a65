"""One chat choice's text -> message parts: reasoning_content, content and tool_calls, whole or streamed.

The reasoning parser sees the raw text first; what it calls content goes to the tool stage: the tool-call
parser under tool_choice auto, the function's arguments under a named choice, a JSON array of
{name, parameters} under required (both grammar-constrained, so they parse). Streamed, each call comes as
OpenAI sends it: its index, id and name first, then pieces of its arguments as the model writes them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from server.json_calls import JsonCallScanner
from server.protocol import ToolCall, ToolCallDelta, ToolCallFunction
from server.reasoning import StreamingReasoningParser, split_reasoning
from server.structured import ToolPlan
from server.tool_parsers import CallDelta, CallStreamer, ParsedCall, StreamingToolParser


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _required_calls(scan: JsonCallScanner) -> list[ParsedCall]:
    """The complete calls of a required choice's array (cut off by max_tokens: the ones before the cut)."""
    return [ParsedCall(c.name, scan.args(c)) for c in scan.calls if c.complete and c.name is not None]


@dataclass
class ChatParts:
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class ChatOutput:
    reasoning_parser: str | None
    in_think: bool
    plan: ToolPlan | None
    tool_call_parser: str | None
    _reasoning: StreamingReasoningParser | None = None
    _tools: StreamingToolParser | None = None
    _required: JsonCallScanner | None = None
    _streamer: CallStreamer | None = None
    _named_started: bool = False
    num_calls: int = 0

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None:
            self._reasoning = StreamingReasoningParser(self.in_think)
        parallel = self.plan.parallel if self.plan else True
        if self.mode == "auto":
            self._tools = StreamingToolParser(self.tool_call_parser or "hermes", self.plan.tools if self.plan else [],
                                              parallel)
        elif self.mode == "required":
            self._required = JsonCallScanner(call_level=1)  # [{"name": ..., "parameters": {...}}, ...]
            self._streamer = CallStreamer(parallel)

    @property
    def mode(self) -> str:
        if self.plan is None or (self.plan.mode == "auto" and self.tool_call_parser is None):
            return "none"
        return self.plan.mode

    @property
    def active(self) -> bool:
        return self.reasoning_parser is not None or self.mode != "none"

    # ------------------------------------------------------------ whole output

    def whole(self, text: str) -> ChatParts:
        reasoning, content = (None, text)
        if self.reasoning_parser is not None:
            reasoning, content = split_reasoning(text, self.in_think)
        parts = ChatParts(reasoning, content)
        calls: list[ParsedCall] = []
        mode = self.mode
        if mode == "auto" and self._tools is not None:
            parts.content, calls = self._tools.whole(content or "")
        elif mode == "named":
            calls, parts.content = [ParsedCall(self.plan.named or "", content or "")], None
        elif mode == "required" and self._required is not None:
            self._required.feed(content or "")
            self._required.finish()
            calls, parts.content = _required_calls(self._required), None
            calls = calls if self.plan.parallel else calls[:1]
        parts.tool_calls = [ToolCall(_call_id(), ToolCallFunction(c.name, c.arguments)) for c in calls]
        self.num_calls = len(calls)
        return parts

    # ------------------------------------------------------------ streamed

    def feed(self, text: str, final: bool) -> tuple[str, str, list[ToolCallDelta]]:
        """(reasoning, content, tool-call deltas: one per call that grew) to send for this much more text."""
        reasoning, content = ("", text)
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(text, final)
        pieces: list[CallDelta] = []
        mode = self.mode
        if mode == "auto" and self._tools is not None:
            content, pieces = self._tools.feed(content, final)
            self.num_calls = self._tools.num_calls
        elif mode == "named":
            if content or (final and not self._named_started):
                pieces = [CallDelta(0, None if self._named_started else self.plan.named, content)]
                self._named_started, self.num_calls = True, 1
            content = ""
        elif mode == "required" and self._required is not None and self._streamer is not None:
            self._required.feed(content)
            if final:
                self._required.finish()
            for key, call in enumerate(self._required.calls):
                piece = self._streamer.update(key, call.name, self._required.args(call))
                pieces += [piece] if piece is not None else []
            self.num_calls = self._streamer.num_calls
            content = ""
        deltas = [
            ToolCallDelta(p.index, _call_id(), "function", ToolCallFunction(p.name, p.arguments))
            if p.name is not None else ToolCallDelta(p.index, function=ToolCallFunction(arguments=p.arguments))
            for p in pieces
        ]
        return reasoning, content, deltas


def split_tool_call_deltas(calls: list[ToolCallDelta]) -> tuple[list[ToolCallDelta], list[ToolCallDelta] | None]:
    """(first deltas: each new call's id, type, name and empty arguments; then the arguments), as OpenAI
    streams a call; a delta that only continues arguments stays in the second list."""
    heads: list[ToolCallDelta] = []
    rest: list[ToolCallDelta] = []
    for d in calls:
        if d.id is not None and d.function is not None and d.function.arguments:
            heads.append(ToolCallDelta(d.index, d.id, d.type, ToolCallFunction(d.function.name, "")))
            rest.append(ToolCallDelta(d.index, function=ToolCallFunction(arguments=d.function.arguments)))
        elif d.id is not None:
            heads.append(d)
        else:
            rest.append(d)
    return heads, rest or None


def finish_reason(reason: str | None, num_calls: int) -> str | None:
    return "tool_calls" if reason == "stop" and num_calls else reason
