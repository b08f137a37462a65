"""Request fields beyond plain sampling: structured outputs (response_format, guided_*, structured_outputs),
tool choice grammars, vLLM's token rules (logit_bias, allowed_token_ids, bad_words, truncate_prompt_tokens),
and a 400 naming every field we do not honour."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import msgspec

from runtime.sampling_params import SamplingParams
from runtime.structured_output import GrammarCompiler, GrammarError
from server.protocol import APIError, ChatCompletionRequest, CompletionRequest

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# vLLM's structured_outputs options that change nothing here (one engine, canonical JSON layout)
_STRUCTURED_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                       "whitespace_pattern", "backend")
_STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar", "json_object": None}


def _err(param: str, why: str) -> APIError:
    return APIError(f"{param}: {why}", param=param)


def refuse_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.use_beam_search:
        raise _err("use_beam_search", "beam search is not supported; use n with sampling")


def guided_spec(req: CompletionRequest | ChatCompletionRequest) -> tuple[str, str, Any] | None:
    """(param, kind, spec) of the request's one output constraint, or None."""
    found: list[tuple[str, str, Any]] = []
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            found.append(("response_format", "json_object", None))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema", js.get("json_schema")) if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise _err("response_format.json_schema", "needs a 'schema' object")
            found.append(("response_format", "json", schema))
        elif kind != "text":
            raise _err("response_format.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    for param, kind in _GUIDED.items():
        value = getattr(req, param)
        if value is not None:
            found.append((param, kind, value))
    so = req.structured_outputs
    if so is not None:
        keys = [k for k, v in so.items() if v not in (None, False) and k in _STRUCTURED_KEYS]
        unknown = [k for k in so if k not in _STRUCTURED_KEYS and k not in _STRUCTURED_OPTIONS]
        if unknown:
            raise _err(f"structured_outputs.{unknown[0]}", "is not supported")
        for k in keys:
            found.append((f"structured_outputs.{k}", k, None if k == "json_object" else so[k]))
    if len(found) > 1:
        raise _err(found[1][0], f"only one output constraint per request (already {found[0][0]})")
    return found[0] if found else None


@dataclass
class ToolPlan:
    mode: str  # none | auto | required | named
    tools: list[dict[str, Any]]  # the function definitions (name, description, parameters)
    named: str | None = None
    parallel: bool = True

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow under required / named choice."""
        if self.mode == "named":
            fn = next(t for t in self.tools if t["name"] == self.named)
            return fn.get("parameters") or {"type": "object"}
        if self.mode == "required":
            items = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": t["name"]},
                        "parameters": t.get("parameters") or {"type": "object"},
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in self.tools
            ]
            array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            if not self.parallel:
                array["maxItems"] = 1
            return array
        return None


def tool_plan(req: ChatCompletionRequest, auto_enabled: bool) -> ToolPlan:
    tools: list[dict[str, Any]] = []
    for i, t in enumerate(req.tools or []):
        fn = t.get("function")
        if t.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _err(f"tools.{i}", "must be {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _err(f"tools.{i}.function.parameters", "must be a JSON schema object")
        tools.append(fn)
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise _err("tool_choice", "a named choice is {'type': 'function', 'function': {'name': ...}}")
        if name not in {t["name"] for t in tools}:
            raise _err("tool_choice", f"names the function {name!r}, which is not among tools")
        return ToolPlan("named", tools, name, req.parallel_tool_calls)
    if choice not in ("none", "auto", "required"):
        raise _err("tool_choice", f"must be 'none', 'auto', 'required' or a named function, got {choice!r}")
    if choice != "none" and not tools:
        raise _err("tool_choice", f"{choice!r} needs tools")
    if choice == "auto" and not auto_enabled:
        raise _err(
            "tool_choice",
            "'auto' needs the server started with --enable-auto-tool-choice and --tool-call-parser",
        )
    return ToolPlan(choice, tools, None, req.parallel_tool_calls)


class RequestExtras:
    """Maps the extra fields of one request onto its SamplingParams; one per server."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        eos = getattr(tokenizer, "eos_token_id", None)
        self.compiler = GrammarCompiler(tokenizer, vocab_size, [eos] if eos is not None else []) if tokenizer else None

    async def grammar(self, param: str, kind: str, spec: Any) -> str:
        if self.compiler is None:
            raise _err(param, "structured output needs the model's tokenizer, and this model has none")
        try:
            # conversion and validation of a big schema take milliseconds: keep them off the event loop
            return await asyncio.to_thread(self.compiler, kind, spec)
        except GrammarError as err:
            raise _err(param, f"invalid: {err}") from None

    async def apply(
        self, req: CompletionRequest | ChatCompletionRequest, params: SamplingParams, tools: ToolPlan | None = None
    ) -> SamplingParams:
        refuse_unsupported(req)
        changes: dict[str, Any] = {}
        spec = guided_spec(req)
        if tools is not None and tools.schema is not None:
            if spec is not None:
                raise _err(spec[0], f"cannot be combined with tool_choice {tools.mode!r}")
            spec = ("tool_choice", "json", tools.schema)
        if spec is not None:
            changes["grammar"] = await self.grammar(*spec)
        prompt_lps = req.prompt_logprobs
        if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
            prompt_lps = max(prompt_lps or 0, req.logprobs)  # echoed prompt tokens carry real logprobs
        if prompt_lps is not None:
            changes["prompt_logprobs"] = prompt_lps
        if req.logit_bias:
            bias: dict[int, float] = {}
            for key, value in req.logit_bias.items():
                if not key.lstrip("-").isdigit() or not 0 <= int(key) < self.vocab_size:
                    raise _err("logit_bias", f"keys must be token ids in [0, {self.vocab_size}), got {key!r}")
                if not -100.0 <= value <= 100.0:
                    raise _err("logit_bias", f"values must be in [-100, 100], got {value}")
                bias[int(key)] = float(value)
            changes["logit_bias"] = bias
        if req.allowed_token_ids is not None:
            if not req.allowed_token_ids or not all(0 <= t < self.vocab_size for t in req.allowed_token_ids):
                raise _err("allowed_token_ids", f"must be a non-empty list of token ids in [0, {self.vocab_size})")
            changes["allowed_token_ids"] = list(req.allowed_token_ids)
        if req.bad_words:
            if self.tokenizer is None:
                raise _err("bad_words", "needs the model's tokenizer, and this model has none")
            words: list[list[int]] = []
            for w in req.bad_words:
                # as vLLM does: the word alone and after a space are both banned
                for text in (w, " " + w.lstrip()):
                    ids = self.tokenizer.encode(text, add_special_tokens=False)
                    if ids and ids not in words:
                        words.append(ids)
            changes["bad_words_token_ids"] = words
        return msgspec.structs.replace(params, **changes) if changes else params


def truncate_prompt(req: CompletionRequest | ChatCompletionRequest, ids: list[int]) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last N prompt tokens."""
    n = req.truncate_prompt_tokens
    return ids[-n:] if n is not None and len(ids) > n else ids
