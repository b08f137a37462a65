"""Tool-call and reasoning parsers on recorded model outputs (the real formats), whole and streamed split
at every position: the same calls, content and reasoning either way."""

from __future__ import annotations

import json

import pytest

from server.chat_output import ChatOutput
from server.reasoning import split_reasoning, starts_thinking
from server.structured import ToolPlan
from server.tool_parsers import extract_tool_calls

TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "string"}}}},
    {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "filters": {"type": "object"}}}},
]

# as Qwen3 writes them (hermes format), one and two calls, with text before
HERMES = [
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
        "Let me check.\n",
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tōkyō <b>"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"query": "a</tool", "filters": {"x": [1, 2]}}}\n</tool_call>',
        None,
        [("get_weather", {"city": "Tōkyō <b>"}), ("search", {"query": "a</tool", "filters": {"x": [1, 2]}})],
    ),
    ("No tools needed: 1 < 2 and <tool is not a tag.", "No tools needed: 1 < 2 and <tool is not a tag.", []),
]

# as GLM-4.5 writes them: name, then key/value pairs; strings bare, other types as JSON
GLM45 = [
    (
        "I will look it up.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>New York</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
        "I will look it up.\n",
        [("get_weather", {"city": "New York", "days": 2})],
    ),
    (
        "<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>42</arg_value>\n<arg_key>filters</arg_key>\n"
        '<arg_value>{"lang": "en"}</arg_value>\n</tool_call><tool_call>get_weather\n<arg_key>city</arg_key>\n'
        "<arg_value>Oslo</arg_value>\n</tool_call>",
        None,
        [("search", {"query": "42", "filters": {"lang": "en"}}), ("get_weather", {"city": "Oslo"})],
    ),
]


def _stream(out: ChatOutput, text: str, cut: int) -> tuple[str, str, list[tuple[str, dict]]]:
    reasoning, content, calls = "", "", {}
    pieces = [text[:cut], text[cut:]] if cut else [text]
    for i, piece in enumerate(pieces):
        r, c, deltas = out.feed(piece, final=i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
        for d in deltas:
            entry = calls.setdefault(d.index, ["", ""])
            if d.function is not None:
                entry[0] += d.function.name or ""
                entry[1] += d.function.arguments or ""
    return reasoning, content, [(n, json.loads(a)) for n, a in (calls[i] for i in sorted(calls))]


@pytest.mark.parametrize("parser,cases", [("hermes", HERMES), ("glm45", GLM45)])
def test_tool_parsers_whole_and_streamed_at_every_split(parser: str, cases: list) -> None:
    plan = ToolPlan("auto", TOOLS)
    for text, content, calls in cases:
        got_content, got_calls = extract_tool_calls(parser, text, TOOLS)
        assert got_content == content
        assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
        whole = ChatOutput(None, False, plan, parser).whole(text)
        assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls] == calls
        for cut in range(len(text) + 1):
            _, s_content, s_calls = _stream(ChatOutput(None, False, plan, parser), text, cut)
            assert (s_content or None) == content, cut
            assert s_calls == calls, cut


REASONING = [
    # (parser, prompt tail, enable_thinking, output, reasoning, content)
    ("qwen3", "<|im_start|>assistant\n", True, "<think>\nplan: add 2+2\n</think>\n\nIt is 4.", "\nplan: add 2+2\n",
     "\n\nIt is 4."),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", False, "It is 4.", None, "It is 4."),
    ("qwen3", "<|im_start|>assistant\n", True, "<think>never closed", "never closed", None),
    ("glm45", "<|assistant|>", True, "<think>hm</think>Sure.", "hm", "Sure."),
    ("glm45", "<|assistant|>\n<think></think>", False, "Sure.", None, "Sure."),
    ("deepseek_r1", "<｜Assistant｜><think>\n", True, "first, 2 < 3 </thin k>...</think>Yes.",
     "first, 2 < 3 </thin k>...", "Yes."),
    ("deepseek_r1", "<｜Assistant｜>", True, "reasoning without the opening tag</think>Done", "reasoning without the "
     "opening tag", "Done"),
]


@pytest.mark.parametrize("case", REASONING, ids=[f"{c[0]}-{i}" for i, c in enumerate(REASONING)])
def test_reasoning_split_whole_and_streamed(case: tuple) -> None:
    parser, prompt, thinking, text, reasoning, content = case
    in_think = starts_thinking(parser, prompt, thinking)
    assert split_reasoning(text, in_think) == (reasoning, content)
    for cut in range(len(text) + 1):
        r, c, _ = _stream(ChatOutput(parser, in_think, None, None), text, cut)
        assert ((r or None), (c or None)) == (reasoning, content), cut
    out = ChatOutput(parser, in_think, None, None)  # character by character
    pieces = [out.feed(ch, final=i == len(text) - 1)[:2] for i, ch in enumerate(text)]
    assert ("".join(r for r, _ in pieces) or None, "".join(c for _, c in pieces) or None) == (reasoning, content)


def test_reasoning_then_tool_call() -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    text = f"<think>need weather</think>\n<tool_call>\n{call}\n</tool_call>"
    plan = ToolPlan("auto", TOOLS)
    whole = ChatOutput("qwen3", False, plan, "hermes").whole(text)
    assert whole.reasoning == "need weather" and whole.content == "\n"
    assert json.loads(whole.tool_calls[0].function.arguments) == {"city": "Rome"}
    for cut in range(len(text) + 1):
        r, c, calls = _stream(ChatOutput("qwen3", False, plan, "hermes"), text, cut)
        assert (r, c, calls) == ("need weather", "\n", [("get_weather", {"city": "Rome"})]), cut


def test_named_and_required_outputs() -> None:
    named = ToolPlan("named", TOOLS, "search")
    parts = ChatOutput(None, False, named, None).whole('{"query": "x"}')
    assert parts.content is None and parts.tool_calls[0].function.name == "search"
    assert _stream(ChatOutput(None, False, named, None), '{"query": "x"}', 5)[2] == [("search", {"query": "x"})]
    required = ToolPlan("required", TOOLS)
    text = '[{"name": "get_weather", "parameters": {"city": "Lima"}}, {"name": "search", "parameters": {}}]'
    parts = ChatOutput(None, False, required, None).whole(text)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parts.tool_calls] == [
        ("get_weather", {"city": "Lima"}), ("search", {})]
    assert _stream(ChatOutput(None, False, required, None), text, 17)[2] == [
        ("get_weather", {"city": "Lima"}), ("search", {})]


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    text = HERMES[1][0]
    plan = ToolPlan("auto", TOOLS, parallel=False)
    assert [c.function.name for c in ChatOutput(None, False, plan, "hermes").whole(text).tool_calls] == ["get_weather"]
    for cut in range(0, len(text) + 1, 7):
        assert [n for n, _ in _stream(ChatOutput(None, False, plan, "hermes"), text, cut)[2]] == ["get_weather"]


def test_split_tool_call_deltas_openai_shape() -> None:
    from server.chat_output import split_tool_call_deltas
    from server.protocol import ToolCallDelta, ToolCallFunction

    heads, rest = split_tool_call_deltas([ToolCallDelta(0, "call_a", "function", ToolCallFunction("f", '{"x": 1}')),
                                          ToolCallDelta(1, function=ToolCallFunction(arguments="}"))])
    assert [(h.index, h.id, h.function.name, h.function.arguments) for h in heads] == [(0, "call_a", "f", "")]
    assert [(r.index, r.id, r.function.arguments) for r in rest] == [(0, None, '{"x": 1}'), (1, None, "}")]
