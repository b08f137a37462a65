"""vLLM's prompt_logprobs: the logprob (and rank, and top-N) of every prompt token after the first, from the
prefill's own hidden states. Only the prefill rows of requests that ask are turned into logits, in chunks,
so a long prompt never holds [prompt_len, vocab] logits at once. Such requests skip the prefix cache (a
cached block has no hidden states to score; vLLM does the same)."""

from __future__ import annotations

from typing import Any

import torch

from runtime.engine.scheduler import ScheduledBatch
from runtime.engine.sequence import Sequence

# per scored prompt token: (token_id, logprob, rank) of the prompt token, then the top-N as (id, logprob, rank)
PromptLogprob = list[tuple[int, float, int]]
_CHUNK_ROWS = 256


def wants_prompt_logprobs(seq: Sequence) -> bool:
    return seq.params.prompt_logprobs is not None


def prompt_rows(batch: ScheduledBatch) -> tuple[list[int], list[tuple[Sequence, int, int]]]:
    """(flat token rows of the step to score, [(seq, first position, count)]). Position j's hidden state
    scores prompt token j + 1; positions already scored (before a preemption) are skipped."""
    rows: list[int] = []
    plan: list[tuple[Sequence, int, int]] = []
    offset = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start = seq.num_computed_tokens
        if wants_prompt_logprobs(seq) and start < seq.num_prompt_tokens:
            done = len(seq.prompt_logprobs or [])
            first, last = max(start, done), min(start + n, seq.num_prompt_tokens - 1)  # positions [first, last)
            if last > first:
                rows.extend(range(offset + first - start, offset + last - start))
                plan.append((seq, first, last - first))
        offset += n
    return rows, plan


def _chunks(num_rows: int) -> list[tuple[int, int]]:
    # the one chunking of the scored rows: under TP every rank gathers the logits of the same chunks
    return [(lo, min(num_rows, lo + _CHUNK_ROWS)) for lo in range(0, num_rows, _CHUNK_ROWS)]


@torch.inference_mode()
def record_prompt_logprobs(model: Any, hidden: torch.Tensor, plan: list[tuple[Sequence, int, int]]) -> None:
    """hidden [sum of counts, hidden_size], the plan's rows in order; appends to each seq.prompt_logprobs."""
    targets = [t for seq, first, count in plan for t in seq.token_ids[first + 1 : first + 1 + count]]
    top_n = [seq.params.prompt_logprobs or 0 for seq, _, count in plan for _ in range(count)]  # per row
    target_ids = torch.tensor(targets, device=hidden.device)
    token_lps: list[float] = []
    ranks: list[int] = []
    tops: list[tuple[list[int], list[float]]] = []
    for lo, hi in _chunks(len(targets)):
        logprobs = model.compute_logits(hidden[lo:hi]).float().log_softmax(dim=-1)  # [rows, vocab]
        token_lp = logprobs.gather(1, target_ids[lo:hi, None])  # [rows, 1]
        ranks += ((logprobs > token_lp).sum(dim=-1) + 1).tolist()
        token_lps += token_lp[:, 0].tolist()
        tops += [([], [])] * (hi - lo)
        # topk(n) per distinct n (not the batch's largest, cut): ties then fall the same whatever else is batched
        for n in set(top_n[lo:hi]) - {0}:
            rows = [i for i in range(lo, hi) if top_n[i] == n]
            top_lp, top_ids = logprobs[[i - lo for i in rows]].topk(n, dim=-1)
            for i, ids, lps in zip(rows, top_ids.tolist(), top_lp.tolist()):
                tops[i] = (ids, lps)
    row = 0
    for seq, _, count in plan:
        entries = seq.prompt_logprobs if seq.prompt_logprobs is not None else []
        for i in range(row, row + count):
            ids, lps = tops[i]
            entries.append([(targets[i], token_lps[i], ranks[i])] + [(t, lp, k + 1) for k, (t, lp) in
                                                                     enumerate(zip(ids, lps))])
        seq.prompt_logprobs = entries
        row += count


@torch.inference_mode()
def join_prompt_logprobs(model: Any, hidden: torch.Tensor) -> None:
    """A TP peer's part of record_prompt_logprobs on TP rank 0: the same chunks' logits gathers."""
    for lo, hi in _chunks(hidden.shape[0]):
        model.compute_logits(hidden[lo:hi])
