"""An incremental JSON scanner that finds tool calls ({"name": ..., "arguments" | "parameters": ...}) in text
as it grows and renders their arguments in one canonical layout, so that a call can be streamed piece by
piece and the pieces add up to exactly the arguments of the whole output.

The canonical layout is json.dumps(value, ensure_ascii=False) with its default separators (", ", ": "):
every token renders on its own (punctuation and strings at once, character by character; a number or
literal once it ends), so the rendering of a prefix of the text is a prefix of the rendering of the whole.
It differs from json.dumps(json.loads(text)) only for an object with a repeated key, which it keeps as
written (JSON parsers keep the last one). Raw control characters inside strings are accepted and escaped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# what json.dumps(ensure_ascii=False) escapes inside a string; everything else is written as it is
_ESCAPES = {chr(i): f"\\u{i:04x}" for i in range(0x20)} | {
    '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WS = " \t\n\r"
_SCALAR = set("0123456789+-.eE" "trufalsnNIiy")  # numbers, true / false / null, NaN / Infinity
_ARG_KEYS = ("arguments", "parameters")


@dataclass
class JsonCall:
    name: str | None = None  # known once its string is closed
    args_start: int = -1  # span of the arguments value in the scanner's canonical text (-1: not seen yet)
    args_end: int = -1
    args_is_string: bool = False  # arguments sent already encoded as a JSON string: its decoded text
    args_text: str = ""  # the decoded string, when args_is_string
    complete: bool = False  # its object is closed


class JsonCallScanner:
    """Feeds on text; call objects are the objects at nesting level call_level (0: the text is one call,
    as hermes writes it; 1: the text is an array of calls, as tool_choice required writes it)."""

    def __init__(self, call_level: int) -> None:
        self.call_level = call_level
        self.out: list[str] = []  # the canonical rendering so far
        self.out_len = 0
        self.calls: list[JsonCall] = []
        self.error = False
        self.done = False  # the top-level value is complete
        self._stack: list[str] = []  # per open container: "[", "{", or "C" (a call object)
        self._state = "value"
        self._str: list[str] = []  # decoded characters of the open string
        self._str_is_key = False
        self._esc = ""  # an escape being read ("\\", "\\u12")
        self._high = ""  # a high surrogate waiting for its low half
        self._scalar = ""
        self._key: str | None = None  # the last key read in the current call object
        self._value_key: str | None = None  # the call-object key whose value is open

    # ------------------------------------------------------------ results

    def args(self, call: JsonCall) -> str:
        """The call's arguments text so far (all of it once the call is complete)."""
        if call.args_is_string:
            return call.args_text
        if call.args_start < 0:
            return "{}" if call.complete else ""
        text = "".join(self.out)
        self.out = [text]
        return text[call.args_start : call.args_end if call.args_end >= 0 else len(text)]

    @property
    def ok(self) -> bool:
        return self.done and not self.error

    # ------------------------------------------------------------ scanning

    def feed(self, text: str) -> None:
        for ch in text:
            if self.error:
                return
            self._char(ch)

    def finish(self) -> None:
        """The text has ended: a number or literal at its very end is complete."""
        if self._state == "scalar" and not self.error:
            self._end_scalar()

    def _emit(self, s: str) -> None:
        self.out.append(s)
        self.out_len += len(s)

    def _call(self) -> JsonCall | None:
        """The call object the scanner is directly inside, if any."""
        return self.calls[-1] if self._stack and self._stack[-1] == "C" else None

    def _fail(self) -> None:
        self.error = True

    def _char(self, ch: str) -> None:
        state = self._state
        if state == "string":
            self._string_char(ch)
        elif state == "scalar":
            if ch in _SCALAR:
                self._scalar += ch
            else:
                self._end_scalar()
                if not self.error:
                    self._char(ch)
        elif ch in _WS:
            return
        elif state in ("value", "value_or_end"):
            if state == "value_or_end" and ch == "]":
                self._close()
            else:
                self._value(ch)
        elif state in ("key", "key_or_end"):
            if ch == '"':
                self._state, self._str, self._str_is_key = "string", [], True
                self._emit('"')
            elif ch == "}" and state == "key_or_end":
                self._close()
            else:
                self._fail()
        elif state == "colon":
            if ch != ":":
                return self._fail()
            self._emit(": ")
            self._state = "value"
        elif state == "after":
            self._after(ch)

    def _value(self, ch: str) -> None:
        call = self._call()
        if call is not None:
            self._value_key = self._key
            if self._key in _ARG_KEYS and call.args_start < 0 and not call.args_is_string:
                call.args_start = self.out_len
                call.args_is_string = ch == '"'
        if ch == "{" or ch == "[":
            kind = ch
            if ch == "{" and len(self._stack) == self.call_level and (not self._stack or self._stack[-1] == "["):
                kind = "C"
                self.calls.append(JsonCall())
            self._stack.append(kind)
            self._emit(ch)
            self._state = "value_or_end" if ch == "[" else "key_or_end"
            self._key = None
        elif ch == '"':
            self._state, self._str, self._str_is_key = "string", [], False
            self._emit('"')
        elif ch in _SCALAR:
            self._state, self._scalar = "scalar", ch
        else:
            self._fail()

    def _after(self, ch: str) -> None:
        if not self._stack:
            return self._fail()  # only whitespace may follow the top-level value
        is_array = self._stack[-1] == "["
        if ch == ",":
            self._emit(", ")
            self._state = "value" if is_array else "key"
        elif ch == ("]" if is_array else "}"):
            self._close()
        else:
            self._fail()

    def _close(self) -> None:
        call = self._call()
        is_array = self._stack.pop() == "["
        self._emit("]" if is_array else "}")
        if call is not None:
            call.complete = True
        self._value_done()

    def _value_done(self) -> None:
        """A value has ended: close the arguments span if it was the arguments of the call around it."""
        self._state = "after"
        if not self._stack:
            self.done = True
        call = self._call()
        if call is not None and self._value_key is not None:
            if self._value_key in _ARG_KEYS and call.args_start >= 0 and call.args_end < 0:
                call.args_end = self.out_len
            self._value_key = None

    def _end_scalar(self) -> None:
        try:
            value = json.loads(self._scalar)
        except ValueError:
            return self._fail()
        self._emit(json.dumps(value))
        self._value_done()

    def _string_char(self, ch: str) -> None:
        if self._esc:
            self._esc += ch
            if len(self._esc) == 2:
                if ch == "u":
                    return
                self._esc = ""
                if ch not in _SIMPLE_ESCAPES:
                    return self._fail()
                self._flush_high()
                return self._decoded(_SIMPLE_ESCAPES[ch])
            if ch not in "0123456789abcdefABCDEF":
                return self._fail()
            if len(self._esc) == 6:
                code = int(self._esc[2:], 16)
                self._esc = ""
                self._decoded_code(code)
            return
        if ch == "\\":
            self._esc = ch
        elif ch == '"':
            self._flush_high()
            self._end_string()
        else:
            self._flush_high()
            self._decoded(ch)

    def _decoded_code(self, code: int) -> None:
        if self._high and 0xDC00 <= code <= 0xDFFF:  # the low half of a pair: one character, as json.loads
            high, self._high = ord(self._high), ""
            return self._decoded(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)))
        self._flush_high()
        if 0xD800 <= code <= 0xDBFF:
            self._high = chr(code)  # wait: a low half may follow
        else:
            self._decoded(chr(code))

    def _flush_high(self) -> None:
        if self._high:
            high, self._high = self._high, ""
            self._decoded(high)

    def _decoded(self, ch: str) -> None:
        self._str.append(ch)
        self._emit(_ESCAPES.get(ch, ch))
        call = self._call()
        if call is not None and not self._str_is_key and call.args_is_string and self._value_key in _ARG_KEYS \
                and call.args_end < 0:
            call.args_text += ch

    def _end_string(self) -> None:
        self._emit('"')
        text = "".join(self._str)
        call = self._call()
        if self._str_is_key:
            if call is not None:
                self._key = text
            self._state = "colon"
            return
        if call is not None and self._value_key == "name" and call.name is None:
            call.name = text
        self._value_done()
