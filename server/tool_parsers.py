"""Tool-call parsers: the model's own tool-call text -> OpenAI tool calls, whole or streamed.

hermes (Qwen2.5 / Qwen3):  <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>
glm45 (GLM-4.5 / 4.6):     <tool_call>f\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>

Both are block formats, so one rule serves both and makes streamed and whole output agree by
construction: content is the text before the first <tool_call> (all of it when no block parses), and a
call is emitted once its block is closed. Streaming holds back text that may be the start of a tag.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)" + re.escape(END), re.S)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def _hermes_block(body: str, tools: dict[str, dict[str, Any]]) -> ParsedCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models send the arguments already encoded
        return ParsedCall(obj["name"], args)
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _glm45_block(body: str, tools: dict[str, dict[str, Any]]) -> ParsedCall | None:
    head = body.split("<arg_key>", 1)[0].strip()
    if not head or "\n" in head:
        return None
    props = ((tools.get(head) or {}).get("parameters") or {}).get("properties") or {}
    args: dict[str, Any] = {}
    for key, raw in _GLM_ARG.findall(body):
        key = key.strip()
        if (props.get(key) or {}).get("type") == "string":
            args[key] = raw  # the model writes strings bare; keep them verbatim
            continue
        try:
            args[key] = json.loads(raw)
        except json.JSONDecodeError:
            args[key] = raw
    return ParsedCall(head, json.dumps(args, ensure_ascii=False))


PARSERS = {"hermes": _hermes_block, "glm45": _glm45_block}


def extract_tool_calls(parser: str, text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole output."""
    parse = PARSERS[parser]
    by_name = {t["name"]: t for t in tools}
    calls = [c for c in (parse(m.group(1).strip(), by_name) for m in _BLOCK.finditer(text)) if c is not None]
    if not calls:
        return text, []
    content = text[: text.index(START)]
    return content or None, calls


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class StreamingToolParser:
    parser: str
    tools: list[dict[str, Any]]
    text: str = ""
    content_sent: int = 0  # characters of content already streamed
    calls_sent: int = 0
    _by_name: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {t["name"]: t for t in self.tools}

    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        """(content that may be shown now, calls completed by this delta)."""
        self.text += delta
        start = self.text.find(START)
        if start < 0:
            visible = len(self.text) - _partial_tag_len(self.text, START)
        else:
            visible = start
        content = self.text[self.content_sent : visible] if visible > self.content_sent else ""
        self.content_sent = max(self.content_sent, visible)
        parse = PARSERS[self.parser]
        blocks = [c for c in (parse(m.group(1).strip(), self._by_name) for m in _BLOCK.finditer(self.text)) if c]
        new_calls = blocks[self.calls_sent :]
        self.calls_sent = len(blocks)
        return content, new_calls

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """What the whole-output rule gives beyond what was streamed (held-back text, an unparsable block)."""
        content, calls = extract_tool_calls(self.parser, self.text, self.tools)
        rest = (content or "")[self.content_sent :]
        self.content_sent += len(rest)
        new_calls = calls[self.calls_sent :]
        self.calls_sent = len(calls)
        return rest, new_calls
