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


@torch.inference_mode()
def record_prompt_logprobs(model: Any, hidden: torch.Tensor, plan: list[tuple[Sequence, int, int]]) -> None:
    """hidden [sum of counts, hidden_size], the plan's rows in order; appends to each seq.prompt_logprobs."""
    row = 0
    for seq, first, count in plan:
        targets = torch.tensor(seq.token_ids[first + 1 : first + 1 + count], device=hidden.device)
        top_n = seq.params.prompt_logprobs or 0
        entries = seq.prompt_logprobs if seq.prompt_logprobs is not None else []
        for lo in range(0, count, _CHUNK_ROWS):
            hi = min(count, lo + _CHUNK_ROWS)
            logprobs = model.compute_logits(hidden[row + lo : row + hi]).float().log_softmax(dim=-1)  # [rows, vocab]
            target = targets[lo:hi]
            token_lp = logprobs.gather(1, target[:, None])  # [rows, 1]
            ranks = (logprobs > token_lp).sum(dim=-1) + 1
            top_ids = top_lp = None
            if top_n > 0:
                top_lp, top_ids = logprobs.topk(top_n, dim=-1)
                top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
            for i, (t, lp, rank) in enumerate(zip(target.tolist(), token_lp[:, 0].tolist(), ranks.tolist())):
                entry = [(t, lp, rank)]
                if top_ids is not None:
                    entry += [(tid, tlp, k + 1) for k, (tid, tlp) in enumerate(zip(top_ids[i], top_lp[i]))]
                entries.append(entry)
        seq.prompt_logprobs = entries
        row += count
