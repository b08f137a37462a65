"""Tool-call parsers: the model's own tool-call text -> OpenAI tool calls, streamed as it grows or whole.

hermes (Qwen2.5 / Qwen3):  <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>
glm45 (GLM-4.5 / 4.6):     <tool_call>f\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>

Content is the text before the first <tool_call> (all of it when no call parses). A call is streamed as
OpenAI does: a first piece with its name once the name is known, then pieces of its arguments as they are
written (hermes: the canonical JSON text of the arguments object so far; glm45: one piece per completed
key/value pair). The whole output is parsed by the same streaming parser fed at once, so the pieces of a
call always add up to the arguments of the whole reply. Streaming holds back text that may be the start of
a tag. A block that turns out malformed or is cut off (max_tokens) is no call in the whole reply, while
its pieces streamed so far stay sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from server.json_calls import JsonCallScanner

START, END = "<tool_call>", "</tool_call>"
KEY, END_KEY, VALUE, END_VALUE = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


@dataclass
class CallDelta:
    index: int  # the call's position among the streamed calls (0, 1, ...)
    name: str | None  # set on the call's first piece only
    arguments: str  # the next piece of its arguments text


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class CallStreamer:
    """Turns the growing (name, arguments) of each call into pieces; a call gets its index when its name
    is first known. parallel false: only the first call is streamed."""

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel
        self._index: dict[int, int] = {}  # caller's key of a call -> its streamed index
        self._sent: dict[int, int] = {}  # characters of its arguments sent

    @property
    def num_calls(self) -> int:
        return len(self._index)

    def update(self, key: int, name: str | None, arguments: str) -> CallDelta | None:
        if name is None:
            return None
        head = key not in self._index
        if head:
            if not self.parallel and self._index:
                return None
            self._index[key], self._sent[key] = len(self._index), 0
        piece = arguments[self._sent[key] :]
        self._sent[key] = len(arguments)
        return CallDelta(self._index[key], name if head else None, piece) if head or piece else None


class _HermesBlock:
    """One <tool_call> block's body of JSON; close() says whether the whole block is a call, bad whether it
    is malformed already (stream no more of it)."""

    def __init__(self, tools: dict[str, dict[str, Any]]) -> None:
        self.scan = JsonCallScanner(call_level=0)

    @property
    def name(self) -> str | None:
        return self.scan.calls[0].name if self.scan.calls else None

    @property
    def bad(self) -> bool:
        return self.scan.error

    def feed(self, body: str) -> None:
        self.scan.feed(body)

    def close(self) -> bool:
        self.scan.finish()
        return self.scan.ok and self.name is not None

    def args(self) -> str:
        return self.scan.args(self.scan.calls[0]) if self.scan.calls else ""


def _glm_value(raw: str, schema: dict[str, Any]) -> Any:
    if schema.get("type") == "string":
        return raw  # the model writes strings bare; keep them verbatim
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


class _Glm45Block:
    """One <tool_call> block of GLM's name line and key/value tags, as _HermesBlock."""

    def __init__(self, tools: dict[str, dict[str, Any]]) -> None:
        self.tools = tools
        self.body = ""
        self.pos = 0  # where the next <arg_key> is looked for
        self.name: str | None = None
        self.bad = False
        self.pairs: list[str] = []  # '"key": value' per completed pair, as JSON text
        self.closed = False

    def feed(self, body: str) -> None:
        self.body += body
        self._scan()

    def close(self) -> bool:
        self.closed = True
        self._scan()
        return self.name is not None and not self.bad

    def args(self) -> str:
        if not self.pairs:
            return "{}" if self.closed else ""
        return "{" + ", ".join(self.pairs) + ("}" if self.closed else "")

    def _scan(self) -> None:
        body = self.body
        if self.name is None:
            start = len(body) - len(body.lstrip())
            ends = [i for i in (body.find("\n", start), body.find(KEY, start)) if i >= 0]
            if not ends and not self.closed:
                return  # the name's line goes on
            end = min(ends) if ends else len(body)
            self.name = body[start:end].strip() or None
            self.bad = self.name is None
            self.pos = end
        props = ((self.tools.get(self.name or "") or {}).get("parameters") or {}).get("properties") or {}
        while not self.bad:
            k = body.find(KEY, self.pos)
            if not self.pairs and (k >= 0 or self.closed) and body[self.pos : k if k >= 0 else len(body)].strip():
                self.bad = True  # more than a name before the arguments
                return
            ke = body.find(END_KEY, k + len(KEY)) if k >= 0 else -1
            if ke < 0:
                return
            v = ke + len(END_KEY)
            while v < len(body) and body[v].isspace():
                v += 1
            if not body.startswith(VALUE, v):
                if VALUE.startswith(body[v:]) and not self.closed:
                    return  # <arg_value> may still come
                self.pos = v  # a key without a value: skip it
                continue
            ve = body.find(END_VALUE, v + len(VALUE))
            if ve < 0:
                return
            key = body[k + len(KEY) : ke].strip()
            value = _glm_value(body[v + len(VALUE) : ve], props.get(key) or {})
            self.pairs.append(f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}")
            self.pos = ve + len(END_VALUE)


PARSERS: dict[str, type[_HermesBlock] | type[_Glm45Block]] = {"hermes": _HermesBlock, "glm45": _Glm45Block}


@dataclass
class StreamingToolParser:
    parser: str
    tools: list[dict[str, Any]]
    parallel: bool = True
    text: str = ""
    pos: int = 0  # text before this is consumed
    first_start: int = -1  # where the first <tool_call> begins
    calls: list[ParsedCall] = field(default_factory=list)  # the blocks that closed as calls
    _block: _HermesBlock | _Glm45Block | None = None
    _num_blocks: int = 0
    _by_name: dict[str, dict[str, Any]] = field(default_factory=dict)
    _streamer: CallStreamer = field(default_factory=CallStreamer)

    def __post_init__(self) -> None:
        self._by_name = {t["name"]: t for t in self.tools}
        self._streamer = CallStreamer(self.parallel)

    @property
    def num_calls(self) -> int:
        return self._streamer.num_calls

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        """(content that may be shown now, pieces of calls) for this much more text."""
        self.text += delta
        text = self.text
        content: list[str] = []
        pieces: list[CallDelta] = []
        while True:
            tag = END if self._block is not None else START
            at = text.find(tag, self.pos)
            end = at if at >= 0 else len(text) - (0 if final else _partial_tag_len(text[self.pos :], tag))
            if self._block is None:
                if self.first_start < 0:
                    content.append(text[self.pos : end])
                if at < 0:
                    self.pos = end
                    break
                self.first_start = at if self.first_start < 0 else self.first_start
                self._block = PARSERS[self.parser](self._by_name)
                self.pos = at + len(START)
                continue
            block = self._block
            block.feed(text[self.pos : end])
            self.pos = end
            if at >= 0:
                self.pos = at + len(END)
                self._block = None
                if block.close() and block.name is not None:
                    self.calls.append(ParsedCall(block.name, block.args()))
            if not block.bad:
                piece = self._streamer.update(self._num_blocks, block.name, block.args())
                pieces += [piece] if piece is not None else []
            if at < 0:
                break
            self._num_blocks += 1
        if final and self.first_start >= 0 and not self.num_calls:
            content.append(text[self.first_start :])  # no call after all: the whole text is content
        return "".join(content), pieces

    def whole(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a whole output (on a fresh parser)."""
        self.feed(text, final=True)
        calls = self.calls if self.parallel else self.calls[:1]
        if not calls:
            return text or None, []
        return text[: self.first_start] or None, calls


def extract_tool_calls(parser: str, text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole output."""
    return StreamingToolParser(parser, tools).whole(text)
