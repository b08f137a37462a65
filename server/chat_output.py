"""One chat choice's text -> message parts: reasoning_content, content and tool_calls, whole or streamed.

The reasoning parser sees the raw text first; what it calls content goes to the tool stage: the tool-call
parser under tool_choice auto, the function's arguments under a named choice, a JSON array of
{name, parameters} under required (both grammar-constrained, so they parse).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from server.protocol import ToolCall, ToolCallDelta, ToolCallFunction
from server.reasoning import StreamingReasoningParser, split_reasoning
from server.structured import ToolPlan
from server.tool_parsers import ParsedCall, StreamingToolParser, extract_tool_calls


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _required_calls(text: str) -> list[ParsedCall]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []  # cut off by max_tokens: no complete calls
    return [ParsedCall(i["name"], json.dumps(i.get("parameters", {}), ensure_ascii=False)) for i in items]


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
    _buffer: str = ""
    _named_started: bool = False
    num_calls: int = 0

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None:
            self._reasoning = StreamingReasoningParser(self.in_think)
        if self.mode == "auto":
            self._tools = StreamingToolParser(self.tool_call_parser or "hermes", self.plan.tools if self.plan else [])

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
        if mode == "auto":
            parts.content, calls = extract_tool_calls(self.tool_call_parser or "hermes", content or "", self.plan.tools)
            if not self.plan.parallel:
                calls = calls[:1]  # parallel_tool_calls false: the first call only
        elif mode == "named":
            calls, parts.content = [ParsedCall(self.plan.named or "", content or "")], None
        elif mode == "required":
            calls, parts.content = _required_calls(content or ""), None
        parts.tool_calls = [ToolCall(_call_id(), ToolCallFunction(c.name, c.arguments)) for c in calls]
        self.num_calls = len(calls)
        return parts

    # ------------------------------------------------------------ streamed

    def feed(self, text: str, final: bool) -> tuple[str, str, list[ToolCallDelta]]:
        """(reasoning, content, tool-call deltas) to send for this much more text."""
        reasoning, content = ("", text)
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(text, final)
        deltas: list[ToolCallDelta] = []
        mode = self.mode
        if mode == "auto" and self._tools is not None:
            content, calls = self._tools.feed(content)
            if final:
                more, extra = self._tools.finish()
                content, calls = content + more, calls + extra
            deltas = self._deltas(calls)
        elif mode == "named":
            if content or final:
                fn = ToolCallFunction(arguments=content)
                if not self._named_started:
                    self._named_started = True
                    self.num_calls = 1
                    deltas = [ToolCallDelta(0, _call_id(), "function", ToolCallFunction(self.plan.named, content))]
                else:
                    deltas = [ToolCallDelta(0, function=fn)] if content else []
            content = ""
        elif mode == "required":
            self._buffer += content
            content = ""
            if final:
                deltas = self._deltas(_required_calls(self._buffer))
        return reasoning, content, deltas

    def _deltas(self, calls: list[ParsedCall]) -> list[ToolCallDelta]:
        out = []
        if self.plan is not None and not self.plan.parallel:
            calls = calls[: max(0, 1 - self.num_calls)]
        for c in calls:
            out.append(ToolCallDelta(self.num_calls, _call_id(), "function", ToolCallFunction(c.name, c.arguments)))
            self.num_calls += 1
        return out


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
