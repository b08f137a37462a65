"""Lockstep look-ahead: a rank tells the coordinator its next step's size while the device runs this step.

Without it, each lockstep step waits with the device idle for a round trip (StepReport -> StepCommand, two
ZMQ hops and two Python wake-ups). With it, the rank loop (engine_proc.py) sends step s+1's report from
execute(on_launched=...) once step s is queued on the device, so the command is back before the step
ends. The report is an estimate made before step s's tokens are known: every sequence that samples in step
s is counted as decoding one more token (an upper bound: some finish). The rank schedules only once the
command is there, capped at its pad_to, so it never runs more than every rank agreed on; a rank that has
less (a sequence finished, or it was idle) pads, one that gets more (a request arrived) keeps it for later.
"""

from __future__ import annotations

from typing import Any


def estimate_next_step(scheduler: Any, batch: Any = None, step_budget: int = 0) -> tuple[int, int]:
    """(tokens, of them one-token decodes) the scheduler will plan once `batch` (in flight, or None) is done;
    step_budget: the coordinator's cap on that step (0: none)."""
    in_batch = {id(s): n for s, n in zip(batch.seqs, batch.num_new_tokens)} if batch is not None else {}
    num_tokens = num_decodes = 0
    for seq in scheduler.running:
        if seq.is_finished:
            continue
        left = seq.num_uncomputed_tokens - in_batch.get(id(seq), 0)
        if left <= 1:  # it samples in the batch in flight (or already has): one token next
            num_decodes += 1
            num_tokens += 1
        else:
            num_tokens += left
    num_tokens += sum(seq.num_uncomputed_tokens for seq in scheduler.waiting)
    budget = scheduler.max_num_batched_tokens
    if step_budget > 0:
        budget = min(budget, step_budget)
    if scheduler.mixed_step_token_budget > 0 and num_decodes:
        budget = min(budget, max(scheduler.mixed_step_token_budget, num_decodes))
    return min(num_tokens, budget), num_decodes
