"""Continuous batching with chunked prefill: FCFS, decode first, then prefill chunks under a token budget.

When blocks run out, the most recently admitted running sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed (its prefix cache entries may survive).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.engine.block_manager import BlockManager
from runtime.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens computed this step, per seq

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # set by the rank loop under lockstep: the coordinator's cap on the next step's tokens (0: none)
        self.step_token_budget = 0
        # while sequences decode, a step takes at most this many tokens (0: no cap), so a long prompt is
        # prefilled in chunks between their tokens instead of stalling them for one huge step
        self.mixed_step_token_budget = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        if self.step_token_budget > 0:
            budget = min(budget, self.step_token_budget)
        if self.mixed_step_token_budget > 0:
            num_decodes = sum(1 for s in self.running if s.num_uncomputed_tokens == 1)
            if num_decodes:
                budget = min(budget, max(self.mixed_step_token_budget, num_decodes))
        bm = self.block_manager

        # 1. running sequences, decodes first (a decode is one token; a partial prefill takes a chunk)
        self.running.sort(key=lambda s: s.num_uncomputed_tokens > 1)
        scheduled: set[int] = set()
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + num_new
            if bm.blocks_needed(seq, target) == 0:  # the common decode case: the last block has room
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                scheduled.add(id(seq))
                budget -= num_new
                i += 1
                continue
            while not bm.can_grow(seq, target):
                victim = self._pick_victim(scheduled, seq)
                if victim is None:
                    break
                self._preempt(victim)
                preempted = True
            if seq.status != Status.RUNNING:  # preempted itself
                break
            if not bm.can_grow(seq, seq.num_computed_tokens + num_new):
                self._preempt(seq)
                preempted = True
                break
            bm.grow(seq, seq.num_computed_tokens + num_new)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            scheduled.add(id(seq))
            budget -= num_new
            i += 1

        # 2. waiting sequences, strictly first come first served (none while memory is short)
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not bm.can_allocate(seq, min(seq.num_uncomputed_tokens, budget)):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            bm.grow(seq, seq.num_computed_tokens + num_new)
            seq.status = Status.RUNNING
            seq.mark_scheduled()
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _pick_victim(self, scheduled: set[int], current: Sequence) -> Sequence | None:
        # the newest running sequence not yet in this batch; the current one last
        for seq in reversed(self.running):
            if seq is not current and id(seq) not in scheduled:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def retire(self, seq: Sequence) -> None:
        """Schedules the sequence no more (its token in flight ends it, whatever it is); it keeps its blocks
        until finish()."""
        if seq in self.running:
            self.running.remove(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
