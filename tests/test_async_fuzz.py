"""Randomized async vs synchronous engine runs (runtime/engine/async_step.py) on the tiny MoE, on the CPU.

Each seed draws a few requests (shared prefixes, staggered arrivals, KV caches small enough to preempt, stop
tokens, EOS made likely by a logit bias with min_tokens, max_tokens, max_model_len, penalties, seeded sampling
with logprobs) and runs them on a synchronous engine, the reference, and on an async one driven two ways:
step() as the offline LLM does, with aborts between steps, and the expert-parallel lockstep's schedule() then
execute(pad_to), with aborts between the two, padding to another rank's size, dummy steps and drain(). A
second round sends follow-up turns (prompt + output) that hit prefix-cache blocks of generated tokens.

Every step checks that no token follows an abort or a finish and that prefix-cache blocks hold real tokens
only (never a placeholder); every run ends with no KV block, request or pending step left. The seeds are
chosen so that each scenario kind happens at least once, which is asserted."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from runtime import SamplingParams
from runtime.engine.llm_engine import LLMEngine
from runtime.engine.sequence import Status
from runtime.messages import AddRequest, TokenDelta
from tests.test_async_scheduling import make_llm
from tests.tiny import make_tiny_checkpoint

# what every seed list must make happen, in the reference's outcome or in the async run
OUTCOME_KINDS = {"stop_token", "eos_after_min_tokens", "max_tokens", "max_model_len", "penalties",
                 "seeded_logprobs", "preemption"}
STEP_KINDS = OUTCOME_KINDS | {"abort_in_flight", "prefix_hit_on_output"}
LOCKSTEP_KINDS = OUTCOME_KINDS | {"abort_planned", "padded", "dummy_step", "drain"}
SEEDS = (0, 3, 7, 8, 9, 13, 14, 16, 17, 29)  # ~0.2 s each per driver; together they hit every kind


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores; one thread is as fast here
    try:
        yield make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_async_fuzz")), "Qwen3MoeForCausalLM")
    finally:
        torch.set_num_threads(threads)


@dataclass
class Request:
    arrival_step: int
    request_id: str
    prompt: list[int]
    params: SamplingParams


@dataclass
class Scenario:
    requests: list[Request]
    num_blocks: int  # 6 or 8 blocks of 8 tokens preempt; 20 rarely do
    max_model_len: int
    aborts: dict[int, list[str]]  # step -> request ids the async run aborts then


def draw(seed: int) -> Scenario:
    rng = random.Random(seed)
    max_model_len = rng.choice([24, 40])
    shared = [rng.randrange(3, 500) for _ in range(10)]
    requests = []
    for i in range(rng.randrange(3, 9)):
        prefix = shared[: rng.randrange(0, 10)] if rng.random() < 0.5 else []
        prompt = prefix + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 14))]
        kw: dict[str, Any] = dict(temperature=0, max_tokens=rng.choice([1, 2, 3, 7, 15, None]))
        r = rng.random()
        if r < 0.2:  # EOS (id 0) likely or certain: min_tokens must mask it for exactly that many tokens
            min_tokens = min(rng.randrange(0, 4), kw["max_tokens"] or 3)
            kw.update(logit_bias={0: rng.choice([3.0, 100.0])}, min_tokens=min_tokens)
        elif r < 0.35:
            kw.update(repetition_penalty=1.3)  # reads the previous token on the host: the early-read path
        elif r < 0.45:
            kw.update(temperature=0.8, seed=rng.randrange(100), logprobs=1)
        elif r < 0.55:
            kw.update(stop_token_ids=[rng.randrange(3, 500) for _ in range(30)])
        if kw["max_tokens"] is None:
            kw.update(ignore_eos=True)  # runs into max_model_len
        if len(prompt) < max_model_len:
            requests.append(Request(rng.randrange(0, 6), f"r{i}", prompt, SamplingParams(**kw)))
    num_blocks = rng.choice([6, 8, 20])
    aborts: dict[int, list[str]] = {}
    for req in requests:
        if rng.random() < 0.25:
            aborts.setdefault(rng.randrange(0, 25), []).append(req.request_id)
    return Scenario(requests, num_blocks, max_model_len, aborts)


@dataclass
class Outcome:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, str] = field(default_factory=dict)
    stop_reasons: dict[str, Any] = field(default_factory=dict)
    logprobs: dict[str, list[list[tuple[int, float]]]] = field(default_factory=dict)
    # not compared with the reference: under async scheduling a finished sequence's blocks are freed, and a block
    # completed by the step in flight's token is cached, when that token is read (a step later), so preemptions
    # and prefix-cache hits may differ from the synchronous engine's; the tokens may not
    num_cached_tokens: dict[str, int] = field(default_factory=dict)
    aborted: set[str] = field(default_factory=set)
    kinds: set[str] = field(default_factory=set)

    def add(self, engine: LLMEngine, req: Request) -> None:
        engine.add_request(AddRequest(req.request_id, req.prompt, req.params))
        self.tokens[req.request_id], self.logprobs[req.request_id] = [], []

    def take(self, deltas: list[TokenDelta]) -> None:
        for d in deltas:
            assert d.request_id not in self.aborted, f"a token of {d.request_id} after it was aborted"
            assert d.request_id not in self.finish_reasons, f"a token of {d.request_id} after it finished"
            self.tokens[d.request_id] += d.new_token_ids
            self.logprobs[d.request_id] += d.logprobs or []
            if d.num_prompt_tokens:  # the first token's delta
                self.num_cached_tokens[d.request_id] = d.num_cached_tokens
            if d.finish_reason is not None:
                self.finish_reasons[d.request_id] = d.finish_reason
                self.stop_reasons[d.request_id] = d.stop_reason

    def abort(self, engine: LLMEngine, request_id: str) -> bool:
        if request_id not in self.tokens or request_id in self.finish_reasons:
            return False  # not arrived yet, or already done
        engine.abort_requests([request_id])
        self.aborted.add(request_id)
        return True


def check_step(engine: LLMEngine) -> None:
    bm = engine.block_manager
    for block_id in bm.hash_to_block.values():
        tokens = bm.block_tokens[block_id]
        assert tokens is not None and min(tokens) >= 0, f"a prefix-cache block holds a placeholder: {tokens}"
    for seq in engine.requests.values():
        if seq.status == Status.RUNNING:
            assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens, seq.request_id


def assert_drained(engine: LLMEngine) -> None:
    assert engine.block_manager.num_used_blocks == 0, f"{engine.block_manager.num_used_blocks} KV blocks leaked"
    assert not engine.has_unfinished() and not engine.requests and not engine.step_pending


def in_flight(engine: LLMEngine) -> set[str]:
    """Requests of the step whose tokens are unread."""
    pending = engine._pending
    return {s.request_id for s in pending.seqs} if pending is not None else set()


def drive_steps(engine: LLMEngine, requests: list[Request], aborts: dict[int, list[str]]) -> Outcome:
    """engine.step() in a loop, as the offline LLM and the rank loop without lockstep do."""
    out = Outcome()
    waiting = sorted(requests, key=lambda r: r.arrival_step)
    step = 0
    while waiting or engine.has_unfinished():
        while waiting and waiting[0].arrival_step <= step:
            out.add(engine, waiting.pop(0))
        out.take(engine.step())
        check_step(engine)
        for rid in aborts.get(step, []):
            flying = rid in in_flight(engine)
            if out.abort(engine, rid) and flying:
                out.kinds.add("abort_in_flight")  # its token of the step in flight must be dropped
        step += 1
        assert step < 2000, "the engine does not finish"
    assert_drained(engine)
    return out


def drive_lockstep(engine: LLMEngine, requests: list[Request], aborts: dict[int, list[str]],
                   rng: random.Random) -> Outcome:
    """The expert-parallel lockstep's loop: schedule(), the coordinator agrees a size (another rank's may be
    larger: padding, or a dummy step when this rank has nothing), then execute(pad_to)."""
    out = Outcome()
    waiting = sorted(requests, key=lambda r: r.arrival_step)
    step = 0
    while waiting or engine.has_unfinished() or step < 3:  # the first steps: other ranks busy, this one idle
        while waiting and waiting[0].arrival_step <= step:
            out.add(engine, waiting.pop(0))
        num_tokens = engine.schedule()
        deltas = []
        if num_tokens == 0 and engine.step_pending:
            drained = engine.drain()  # nothing plannable until the step in flight's tokens free its blocks
            if drained:
                out.kinds.add("drain")
            deltas += drained
            num_tokens = engine.schedule()
        for rid in aborts.get(step, []):
            planned = engine.planned is not None and rid in {s.request_id for s in engine.planned.seqs}
            if out.abort(engine, rid) and planned:
                out.kinds.add("abort_planned")  # execute() must drop it but keep the agreed size
        other_rank = rng.choice([0, 0, 3, 9])
        pad = max(num_tokens, other_rank)
        if pad > 0:
            if 0 < num_tokens < other_rank:
                out.kinds.add("padded")
            num_dummy_steps = engine.num_dummy_steps
            deltas += engine.execute(pad_to=engine.padded_size(pad))
            if engine.num_dummy_steps > num_dummy_steps:
                out.kinds.add("dummy_step")  # nothing planned here (or all of it aborted): a padded no-op forward
        out.take(deltas)
        check_step(engine)
        step += 1
        assert step < 3000, "the engine does not finish"
    assert_drained(engine)
    return out


def outcome_kinds(sc: Scenario, out: Outcome, engine: LLMEngine) -> set[str]:
    kinds = {"preemption"} if engine.scheduler.num_preemptions else set()
    for req in sc.requests:
        rid, p = req.request_id, req.params
        if rid in out.aborted:
            continue
        tokens, reason, stop = out.tokens[rid], out.finish_reasons[rid], out.stop_reasons[rid]
        if reason == "stop" and stop is not None:
            kinds.add("stop_token")
        if reason == "stop" and stop is None and p.min_tokens > 0:
            kinds.add("eos_after_min_tokens")
        if reason == "length" and len(tokens) == p.max_tokens:
            kinds.add("max_tokens")
        if reason == "length" and len(req.prompt) + len(tokens) == sc.max_model_len:
            kinds.add("max_model_len")
        if p.repetition_penalty != 1.0 and len(tokens) >= 2:
            kinds.add("penalties")
        if p.seed is not None and len(out.logprobs[rid]) >= 2:
            kinds.add("seeded_logprobs")
    return kinds


def assert_same(seed: int, requests: list[Request], want: Outcome, got: Outcome) -> None:
    for req in requests:
        rid = req.request_id
        where = f"seed {seed}, request {rid}"
        assert rid not in want.aborted
        if rid in got.aborted:  # what it emitted before the abort is a strict prefix of the full output
            assert rid not in got.finish_reasons, where
            assert len(got.tokens[rid]) < len(want.tokens[rid]), where
            assert got.tokens[rid] == want.tokens[rid][: len(got.tokens[rid])], where
            continue
        assert got.tokens[rid] == want.tokens[rid], where
        assert got.finish_reasons[rid] == want.finish_reasons[rid], where
        assert got.stop_reasons[rid] == want.stop_reasons[rid], where
        assert len(got.logprobs[rid]) == len(want.logprobs[rid]), where
        for lw, lg in zip(want.logprobs[rid], got.logprobs[rid]):
            assert [t for t, _ in lw] == [t for t, _ in lg], where
            assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(lw, lg)), where


def fuzz(path: str, seeds: tuple[int, ...], drive: Callable[[LLMEngine, Scenario, int], Outcome]) -> set[str]:
    kinds: set[str] = set()
    for seed in seeds:
        sc = draw(seed)
        kw = dict(num_gpu_blocks_override=sc.num_blocks, max_model_len=sc.max_model_len, max_num_batched_tokens=12,
                  max_num_seqs=6)
        sync, overlapped = make_llm(path, False, **kw).engine, make_llm(path, True, **kw).engine
        want = drive_steps(sync, sc.requests, {})
        got = drive(overlapped, sc, seed)
        assert overlapped.num_overlapped_steps > 0, f"seed {seed}: the async path never ran"
        assert_same(seed, sc.requests, want, got)
        kinds |= got.kinds | outcome_kinds(sc, got, overlapped)
        # follow-up turns on the same engines: full blocks of the first round's outputs are in the prefix cache
        follow_ups = [Request(
            0, r.request_id + "b", (r.prompt + want.tokens[r.request_id] + [7])[: sc.max_model_len - 1], r.params)
            for r in sc.requests]
        want2, got2 = drive_steps(sync, follow_ups, {}), drive_steps(overlapped, follow_ups, {})
        assert_same(seed, follow_ups, want2, got2)
        for req, first in zip(follow_ups, sc.requests):
            if got2.num_cached_tokens[req.request_id] > len(first.prompt):
                kinds.add("prefix_hit_on_output")  # a hit on a block holding generated tokens
    return kinds


def test_async_equals_sync_step_driver(checkpoint: str) -> None:
    kinds = fuzz(checkpoint, SEEDS, lambda engine, sc, seed: drive_steps(engine, sc.requests, sc.aborts))
    assert kinds >= STEP_KINDS, f"seeds {SEEDS} never hit {sorted(STEP_KINDS - kinds)}"


def test_async_equals_sync_lockstep_driver(checkpoint: str) -> None:
    kinds = fuzz(checkpoint, SEEDS,
                 lambda engine, sc, seed: drive_lockstep(engine, sc.requests, sc.aborts, random.Random(seed)))
    assert kinds >= LOCKSTEP_KINDS, f"seeds {SEEDS} never hit {sorted(LOCKSTEP_KINDS - kinds)}"
