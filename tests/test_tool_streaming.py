"""Tool calls streamed as OpenAI streams them: a first delta with index, id, type and name, then pieces of
the arguments as the model writes them. On recorded outputs (hermes, glm45, tool_choice required), split
into stream chunks at every position and character by character, the pieces reassemble to exactly the
whole reply's calls (arguments compared as strings), with reasoning and content before the calls."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from server.chat_output import ChatOutput
from server.json_calls import JsonCallScanner
from server.structured import ToolPlan

TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "string"}}}},
    {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "filters": {"type": "object"}, "limit": {"type": "number"}}}},
]

# (parser, reasoning parser, output, content, [(name, arguments)]); arguments as json.dumps writes them
CASES: list[tuple[str, str | None, str, str | None, list[tuple[str, Any]]]] = [
    ("hermes", None,
     'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris", "days": 3})]),
    # escapes of every kind inside strings, a surrogate pair, "</tool" inside a string, odd number layouts,
    # a compact second call, arguments before the name
    ("hermes", None,
     '<tool_call>\n{"name": "search", "arguments": {"query": "say \\"hi\\" \\\\ \\/ \\u00e9\\ud83d\\ude00\\n</tool",'
     ' "filters": {"x": [1, 2.50, -0.0, 1E3, true, null, {}], "y": []}}}\n</tool_call>\n'
     '<tool_call>{"arguments":{"city":"Tōkyō <b>","days":-7},"name":"get_weather"}</tool_call>',
     None, [("search", {"query": 'say "hi" \\ / é😀\n</tool', "filters": {"x": [1, 2.5, -0.0, 1000.0, True, None, {}],
                                                                          "y": []}}),
            ("get_weather", {"city": "Tōkyō <b>", "days": -7})]),
    # arguments sent already encoded as a string, and a call without arguments
    ("hermes", "qwen3",
     '<think>two calls: 1 < 2</think>\n\nSure.<tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"q\\"}"}'
     '\n</tool_call><tool_call>{"name": "get_weather"}</tool_call>',
     "\n\nSure.", [("search", '{"query": "q"}'), ("get_weather", {})]),
    ("hermes", "qwen3", "<think>no tools</think>Plain text, 1 < 2 and <tool is no tag.", "Plain text, 1 < 2 and <tool "
     "is no tag.", []),
    ("hermes", None, "<tool_call>not json</tool_call> so all of it is content", "<tool_call>not json</tool_call> so "
     "all of it is content", []),
    ("glm45", None,
     "I will look it up.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>New York</arg_value>\n"
     "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
     "I will look it up.\n", [("get_weather", {"city": "New York", "days": 2})]),
    ("glm45", "glm45",
     '<think>search first</think><tool_call>search\n<arg_key>query</arg_key>\n<arg_value>say "hi"\n\\ ok</arg_value>'
     '\n<arg_key>filters</arg_key>\n<arg_value>{"lang": "en", "n": [1, 2]}</arg_value>\n<arg_key>limit</arg_key>\n'
     "<arg_value>2.5</arg_value>\n</tool_call>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
     "<arg_value>Oslo</arg_value>\n</tool_call>",
     None, [("search", {"query": 'say "hi"\n\\ ok', "filters": {"lang": "en", "n": [1, 2]}, "limit": 2.5}),
            ("get_weather", {"city": "Oslo"})]),
    ("glm45", None, "<tool_call>get_weather</tool_call>", None, [("get_weather", {})]),
]


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _output(parser: str, reasoning: str | None, plan: ToolPlan | None = None) -> ChatOutput:
    return ChatOutput(reasoning, False, plan or ToolPlan("auto", TOOLS), parser)


def _stream(out: ChatOutput, pieces: list[str]) -> tuple[str, str, list[tuple[str, str]], list[int]]:
    """(reasoning, content, [(name, arguments)], deltas per call), checking each delta's OpenAI shape."""
    reasoning, content = "", ""
    calls: dict[int, list[Any]] = {}  # index -> [id, name, arguments, number of deltas]
    for i, piece in enumerate(pieces):
        r, c, deltas = out.feed(piece, final=i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
        assert len({d.index for d in deltas}) == len(deltas), "one delta per call per feed"
        for d in deltas:
            assert d.function is not None and d.function.arguments is not None
            if d.index not in calls:  # the call's first delta: id, type and name
                assert d.index == len(calls) and d.id and d.type == "function" and d.function.name
                calls[d.index] = [d.id, d.function.name, "", 0]
            else:
                assert d.id is None and d.type is None and d.function.name is None and d.function.arguments
            calls[d.index][2] += d.function.arguments
            calls[d.index][3] += 1
    return reasoning, content, [(c[1], c[2]) for c in calls.values()], [c[3] for c in calls.values()]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streamed_pieces_reassemble_to_the_whole_reply_at_every_split(case: tuple) -> None:
    parser, reasoning_parser, text, content, calls = case
    whole = _output(parser, reasoning_parser).whole(text)
    expected = [(name, _arguments(args)) for name, args in calls]
    assert whole.content == content
    assert [(c.function.name, c.function.arguments) for c in whole.tool_calls] == expected
    reasoning = whole.reasoning or ""
    splits = [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), 5))
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    for pieces in splits:
        r, c, got, _ = _stream(_output(parser, reasoning_parser), pieces)
        assert (r, c or None, got) == (reasoning, content, expected), pieces


def _partial(out: ChatOutput, text: str, upto: str) -> list[tuple[str, str]]:
    """The calls streamed once the output, fed character by character, has reached the end of upto."""
    calls: dict[int, list[str]] = {}
    for ch in text[: text.index(upto) + len(upto)]:
        for d in out.feed(ch, final=False)[2]:
            entry = calls.setdefault(d.index, ["", ""])
            entry[0] += d.function.name or ""
            entry[1] += d.function.arguments or ""
    return [(n, a) for n, a in calls.values()]


def test_arguments_stream_as_they_are_written() -> None:
    hermes = CASES[0][2]
    assert _partial(_output("hermes", None), hermes, '"get_weather"') == [("get_weather", "")]  # the name, at once
    assert _partial(_output("hermes", None), hermes, '"Par') == [("get_weather", '{"city": "Par')]
    assert _stream(_output("hermes", None), list(hermes))[3][0] > 20  # name, then the arguments nearly char by char
    escaped = CASES[1][2]
    assert _partial(_output("hermes", None), escaped, '\\"hi\\" \\\\ \\/ \\u00e9\\ud83d') == [
        ("search", '{"query": "say \\"hi\\" \\\\ / é')]  # the high surrogate waits for its low half
    glm = CASES[5][2]
    assert _partial(_output("glm45", None), glm, "get_weather\n") == [("get_weather", "")]  # the name's line ended
    assert _partial(_output("glm45", None), glm, "New York</arg_value>") == [("get_weather", '{"city": "New York"')]
    two = '{"city": "New York", "days": 2'
    assert _partial(_output("glm45", None), glm, "2</arg_value>\n") == [("get_weather", two)]
    assert _stream(_output("glm45", None), list(glm))[3] == [4]  # name, two pairs, the closing brace


REQUIRED = ('[{"name":"get_weather","parameters":{"city":"Lima","days":2}},{"name":"search","parameters":'
            '{"query":"a \\"b\\"","filters":{}}},{"name":"get_weather","parameters":{}}]')


def test_required_choice_streams_arguments() -> None:
    plan = ToolPlan("required", TOOLS)
    expected = [("get_weather", '{"city": "Lima", "days": 2}'), ("search", '{"query": "a \\"b\\"", "filters": {}}'),
                ("get_weather", "{}")]
    whole = ChatOutput(None, False, plan, None).whole(REQUIRED)
    assert [(c.function.name, c.function.arguments) for c in whole.tool_calls] == expected
    for cut in range(len(REQUIRED) + 1):
        assert _stream(ChatOutput(None, False, plan, None), [REQUIRED[:cut], REQUIRED[cut:]])[2] == expected, cut
    assert _partial(ChatOutput(None, False, plan, None), REQUIRED, '"Li') == [("get_weather", '{"city": "Li')]
    # cut off by max_tokens: the complete calls
    cut = REQUIRED[: REQUIRED.index('{"name":"search"') + 20]
    assert [c.function.name for c in ChatOutput(None, False, plan, None).whole(cut).tool_calls] == ["get_weather"]
    single = ToolPlan("required", TOOLS, parallel=False)
    assert len(_stream(ChatOutput(None, False, single, None), list(REQUIRED))[2]) == 1


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-10**12, 10**12)
    if kind == 2:
        return rng.choice([0.5, -1e-7, 1e21, 3.25, 1.0, -0.0])
    if kind in (3, 4):
        return "".join(rng.choice('ab"\\\n\t\x01é😀/ <>') for _ in range(rng.randrange(6)))
    if kind in (5, 6):
        keys = ["k" + rng.choice(["", "é", '"', "\n"]) + str(i) for i in range(rng.randrange(4))]
        return {k: _random_value(rng, depth + 1) for k in keys}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_json_scanner_renders_like_json_dumps_and_grows_by_prefixes() -> None:
    rng = random.Random(1)
    for _ in range(400):
        args = _random_value(rng, 1)
        text = json.dumps({"name": "f", "arguments": args}, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 2]), separators=rng.choice([None, (",", ":")]))
        scan = JsonCallScanner(call_level=0)
        seen = ""
        for ch in text:
            scan.feed(ch)
            now = scan.args(scan.calls[0]) if scan.calls else ""
            assert now.startswith(seen), text
            seen = now
        scan.finish()
        assert scan.ok and scan.calls[0].name == "f" and scan.args(scan.calls[0]) == _arguments(args), text
    for bad in ('{"name": "x", "arguments": {"a": 01}}', '{"a" 1}', '{"a": [1}', "{} x", '{"a": "\\x"}', "[1,]"):
        scan = JsonCallScanner(call_level=0)
        scan.feed(bad)
        scan.finish()
        assert not scan.ok, bad


def test_tool_choice_none_leaves_the_text_as_content() -> None:
    text = CASES[0][2]
    out = ChatOutput(None, False, ToolPlan("none", TOOLS), "hermes")
    assert not out.active and out.whole(text).content == text and not out.whole(text).tool_calls
    r, c, calls, _ = _stream(ChatOutput("qwen3", False, ToolPlan("none", TOOLS), "hermes"), list(text))
    assert (r, c, calls) == ("", text, [])


def test_tool_plan_checks() -> None:
    from server.protocol import APIError, ChatCompletionRequest
    from server.structured import tool_plan

    tools = [{"type": "function", "function": t} for t in TOOLS]
    msgs = [{"role": "user", "content": "x"}]

    def plan(auto: bool = True, **kw: Any) -> ToolPlan:
        return tool_plan(ChatCompletionRequest(model="m", messages=msgs, **kw), auto)

    assert plan().mode == "none" and plan(tools=tools).mode == "auto"  # tools without tool_choice: auto
    assert plan(tools=tools, tool_choice="none").mode == "none"
    search = {"type": "function", "function": {"name": "search"}}
    named = plan(tools=tools, tool_choice=search, parallel_tool_calls=False)
    assert (named.mode, named.named, named.parallel, named.schema) == ("named", "search", False, TOOLS[1]["parameters"])
    assert plan(tools=tools, tool_choice="required", parallel_tool_calls=False).schema["maxItems"] == 1
    for kw, auto, words in [
        (dict(tools=tools), False, "--enable-auto-tool-choice"),  # auto needs the server's flag, as vLLM
        (dict(tool_choice="required"), True, "needs tools"),
        (dict(tools=tools, tool_choice="any"), True, "must be"),
        (dict(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}), True, "'nope'"),
        (dict(tools=[{"type": "function", "function": {"parameters": {}}}]), True, "tools.0"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), True, "parameters"),
    ]:
        with pytest.raises(APIError, match=words):
            plan(auto, **kw)


def test_random_calls_stream_like_the_whole_reply() -> None:
    rng = random.Random(2)
    for _ in range(150):
        calls = [(rng.choice(["get_weather", "search"]), _random_value(rng, 2)) for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.5:  # hermes
            parser = "hermes"
            blocks = [json.dumps({"name": n, "arguments": a}, ensure_ascii=rng.random() < 0.5,
                                 indent=rng.choice([None, 1])) for n, a in calls]
        else:  # glm45: string values bare, the rest as JSON
            parser = "glm45"
            calls = [(n, a if isinstance(a, dict) else {"v": a}) for n, a in calls]
            blocks = [n + "\n" + "".join(
                f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
                for k, v in a.items()) for n, a in calls]
        text = "Sure.\n" + "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
        whole = _output(parser, None).whole(text)
        expected = [(c.function.name, c.function.arguments) for c in whole.tool_calls]
        assert len(expected) == len(calls) and whole.content == "Sure.\n"
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 12))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        _, content, got, _ = _stream(_output(parser, None), pieces)
        assert (content, got) == ("Sure.\n", expected), pieces
