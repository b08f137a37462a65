"""Structured outputs: grammars (JSON schema, regex, choice, Lark/GBNF) turned into per-step token masks.

The engine is llguidance (Rust, no torch dependency, no ahead-of-time compilation: its Earley parser and
lazy lexer fill a 150k-token mask in tens of microseconds, and JSON Schema coverage is the widest of the
open engines). The front end converts and validates a request's grammar once (grammar_for, cached by
spec) and sends the llguidance grammar text inside SamplingParams; each engine rank builds the request's
matcher in a worker thread when the request arrives, so no compilation runs on the step path. Per step,
the matchers of the rows about to sample fill one int32 bitmask [num_constrained, ceil(vocab / 32)] in
parallel (LLExecutor), it goes to the logits' device once, and the rows are masked in one batched op.
A batch without constrained requests does none of this. Matchers live with the request on its rank (DP),
advance by each sampled token, and are dropped when the request finishes or is aborted.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

# kinds a request may give (the front end maps OpenAI's and vLLM's fields to these)
KINDS = ("json", "json_object", "regex", "choice", "grammar")
# one canonical layout, compact ("," and ":", no free whitespace): a model cannot wander off into endless newlines
_JSON_OPTIONS = {"whitespace_flexible": False}
_MAX_TEMPLATES = 64


class GrammarError(ValueError):
    """A grammar or schema the engine cannot use; the message says why (the server answers 400)."""


def grammar_from_spec(kind: str, spec: Any) -> str:
    """llguidance's grammar text for one spec: a JSON schema (dict or JSON text), a regex, a list of
    choices, or a Lark / GBNF grammar."""
    import llguidance

    try:
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if kind == "json":
            schema = json.loads(spec) if isinstance(spec, str) else spec
            if not isinstance(schema, dict | bool):
                raise GrammarError("a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            if not spec or not all(isinstance(c, str) for c in spec):
                raise GrammarError("choices must be a non-empty list of strings")
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        if kind == "grammar":
            return llguidance.grammar_from("grammar", spec)
    except GrammarError:
        raise
    except (ValueError, TypeError) as err:
        raise GrammarError(str(err).strip().splitlines()[0]) from None
    raise GrammarError(f"unknown grammar kind {kind!r}; use one of {', '.join(KINDS)}")


def llg_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> Any:
    """llguidance's view of the tokenizer; vocab_size is the logits' width (may exceed the tokenizer's)."""
    import llguidance.hf

    tokenizer = getattr(hf_tokenizer, "_tokenizer_wrapped", hf_tokenizer)
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids or None)


class GrammarCompiler:
    """Front-end side: spec -> validated grammar text, cached by spec (the same schema on every request of
    an agent compiles once)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._tokenizer: Any = None

    @functools.lru_cache(maxsize=512)  # noqa: B019 - one compiler per server; the cache is its purpose
    def compile(self, kind: str, spec_key: str) -> str:
        import llguidance

        spec = json.loads(spec_key)
        grammar = grammar_from_spec(kind, spec)
        if self._tokenizer is None:
            self._tokenizer = llg_tokenizer(self._hf_tokenizer, self._vocab_size, self._eos)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise GrammarError(" ".join(m.strip().splitlines()[0] for m in messages[:1]) or "invalid grammar")
        return grammar

    def __call__(self, kind: str, spec: Any) -> str:
        return self.compile(kind, json.dumps(spec, sort_keys=True))


class StructuredOutputs:
    """Engine-rank side: the matchers of this rank's constrained requests, and the per-step bitmask."""

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: set[int], pin_memory: bool = False) -> None:
        self._tokenizer_path = tokenizer_path
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        self._tokenizer: Future[Any] | None = None
        self._matchers: dict[str, Future[Any]] = {}
        self._executor: Any = None
        self.num_words = (vocab_size + 31) // 32
        # GPU ranks fill one persistent pinned buffer (pinning per step costs more than the copy); reuse is safe
        # because each step's sampling syncs with the stream after the copy was queued
        self._pin = pin_memory
        self._pinned: Any = None
        # fresh matchers by grammar text: an agent's schema repeats on every request, and a deep copy of a
        # built matcher is cheaper than building it again
        self._templates: OrderedDict[str, Any] = OrderedDict()
        # requests whose grammar starts after a marker (the reasoning's </think>): (marker, the output's last bytes)
        self._waiting: dict[str, tuple[bytes, bytearray]] = {}

    def warm_up(self) -> None:
        """Builds llguidance's tokenizer view in the background now (~1 s for a 150k vocabulary), so the
        first constrained request does not wait for it."""
        if self._tokenizer is None:
            self._tokenizer = self._pool.submit(self._load_tokenizer)

    @property
    def active(self) -> bool:
        return bool(self._matchers)

    def _load_tokenizer(self) -> Any:
        from runtime.tokenizer import load_tokenizer

        hf = load_tokenizer(self._tokenizer_path)
        if hf is None:
            raise GrammarError("structured output needs the model's tokenizer, and this model has none")
        return llg_tokenizer(hf, self._vocab_size, self._eos)

    def add(self, request_id: str, grammar: str, generated: list[int], after: str | None = None) -> None:
        """Builds the request's matcher off the step path; generated: output tokens it already has (a
        request resumed after an engine restart), which the matcher consumes first; after: a token sequence
        the grammar waits for (the model reasons freely until it closes its think block)."""
        if self._tokenizer is None:
            self._tokenizer = self._pool.submit(self._load_tokenizer)
        tokenizer = self._tokenizer
        if after:
            self._waiting[request_id] = (after.encode(), bytearray())
            for i, token_id in enumerate(generated):  # a resumed request may be past the marker already
                if self._wait(request_id, token_id):
                    generated = generated[i + 1 :]
                    break
            else:
                generated = []

        def build() -> Any:
            import llguidance

            try:
                template = self._templates.get(grammar)
                if template is None:
                    template = llguidance.LLMatcher(tokenizer.result(), grammar)
                    if not template.is_error():
                        self._templates[grammar] = template
                        while len(self._templates) > _MAX_TEMPLATES:
                            self._templates.popitem(last=False)
                matcher = template.deep_copy()
            except Exception:  # the front end validated it; a failure here must not take the rank down
                logger.exception("request %s: its grammar could not be built; the request stops", request_id)
                return None
            if matcher.is_error():
                logger.error("request %s: grammar error %s; the request stops", request_id, matcher.get_error())
                return None
            if generated and not matcher.consume_tokens(generated):
                logger.warning("request %s: its earlier output does not match its grammar", request_id)
            return matcher

        self._matchers[request_id] = self._pool.submit(build)

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
        self._waiting.pop(request_id, None)

    def has(self, request_id: str) -> bool:
        return request_id in self._matchers

    def bitmask(self, request_ids: list[str]) -> tuple[list[int], Any] | None:
        """(rows, int32 bitmask [len(rows), num_words] on the CPU) for the constrained rows of a batch
        about to sample, or None when none is constrained."""
        found = [(i, self._matchers[rid].result()) for i, rid in enumerate(request_ids)
                 if rid in self._matchers and rid not in self._waiting]
        found = [(i, m) for i, m in found if m is not None]  # a failed build stops its request in accept()
        if not found:
            return None
        import llguidance
        import torch

        rows = [i for i, _ in found]
        if self._pin:
            if self._pinned is None or self._pinned.shape[0] < len(rows):
                self._pinned = torch.empty((max(len(rows), 64), self.num_words), dtype=torch.int32, pin_memory=True)
            mask = self._pinned[: len(rows)]
        else:
            mask = torch.empty((len(rows), self.num_words), dtype=torch.int32)
        matchers = [(m, j) for j, (_, m) in enumerate(found)]
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr(matchers, mask.data_ptr(), self.num_words * 4, len(rows))
        return rows, mask

    def _wait(self, request_id: str, token_id: int) -> bool:
        """Feeds a token to a waiting request; True (and no longer waiting) once its marker has shown, by
        text, whatever tokens spelled it."""
        marker, tail = self._waiting[request_id]
        assert self._tokenizer is not None
        try:
            tail += self._tokenizer.result().decode_bytes([token_id])
        except Exception:  # no tokenizer: the build fails too, and accept() stops the request
            del self._waiting[request_id]
            return True
        if marker in tail:
            del self._waiting[request_id]  # the grammar applies from the next token
            return True
        del tail[: -len(marker)]
        return False

    def accept(self, request_id: str, token_id: int) -> bool:
        """Advances the request's matcher by its sampled token; True when the grammar is finished (or
        broken, which only a token outside the mask can do), i.e. the request must stop."""
        future = self._matchers.get(request_id)
        if future is None:
            return False
        if request_id in self._waiting:
            self._wait(request_id, token_id)
            return False
        matcher = future.result()
        if matcher is None:
            return True
        ok = matcher.consume_token(token_id)
        if not ok:
            logger.warning("request %s: token %d outside its grammar: %s", request_id, token_id, matcher.get_error())
        return not ok or matcher.is_stopped()


    def accept_many(self, pairs: list[tuple[str, int]]) -> set[str]:
        """accept() for a whole batch: the plain constrained rows advance in parallel (llguidance's executor
        drops the GIL and uses its thread pool: one consume_token costs tens of us on a 150k vocabulary, so a
        serial loop over a large batch costs milliseconds). Returns the ids whose request must stop."""
        done: set[str] = set()
        plain: list[tuple[str, Any, int]] = []
        for rid, token_id in pairs:
            future = self._matchers.get(rid)
            if future is None:
                continue
            if rid in self._waiting or future.result() is None:
                if self.accept(rid, token_id):
                    done.add(rid)
                continue
            plain.append((rid, future.result(), token_id))
        if len(plain) == 1:
            rid, _, token_id = plain[0]
            return done | ({rid} if self.accept(rid, token_id) else set())
        if plain:
            import llguidance

            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            oks = self._executor.consume_token_par([(m, t) for _, m, t in plain])
            for (rid, matcher, token_id), ok in zip(plain, oks):
                if not ok:
                    logger.warning("request %s: token %d outside its grammar: %s", rid, token_id, matcher.get_error())
                if not ok or matcher.is_stopped():
                    done.add(rid)
        return done


def apply_bitmask(logits: Any, rows: list[int], bitmask: Any) -> Any:
    """Sets the logits of tokens a row's grammar forbids to -inf, in place (the sampler owns this step's
    logits). logits [num_seqs, vocab]; bitmask [len(rows), ceil(vocab / 32)] int32 on the CPU, bit j of
    word w allows token 32 * w + j. One host-to-device copy, one kernel (Triton on the GPU)."""
    import torch

    from kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref

    dev = logits.device
    with torch.inference_mode():  # the runner's logits are inference tensors: in-place only in this mode
        if dev.type == "cuda":
            mask = (bitmask if bitmask.is_pinned() else bitmask.pin_memory()).to(dev, non_blocking=True)
            # rows through pinned memory: torch.tensor(rows, device=dev) would wait for the whole stream
            rows_dev = torch.tensor(rows, dtype=torch.int32).pin_memory().to(dev, non_blocking=True)
            apply_token_bitmask(logits, rows_dev, mask)
        else:
            apply_token_bitmask_ref(logits, torch.tensor(rows), bitmask)
    return logits
