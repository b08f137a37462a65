"""Async scheduling (on by default; --no-async-scheduling turns it off): step s+1 is planned and queued on the device
before the host has read step s's sampled tokens, so the device never waits on Python between steps.

While step s is in flight, each sequence it samples for holds a placeholder at the end of its token_ids: the
negative number -(k + 1), k being its row in step s's sampled-token tensor. The scheduler sees one more
token to compute and gives it a KV slot as for any decode; the step plan carries the placeholder as the
token id, and the model runner replaces it on the device from step s's tensor (fill_placeholders) before
the forward. Once step s+1 is queued, the host reads step s's tokens, writes them over the placeholders and
runs the finish checks. A sequence that ended at step s has its step s+1 token discarded; its blocks are
freed at once, which is safe because every later step runs after step s+1 on the same stream. Prefix-cache
blocks are hashed over real tokens only (the placeholder is never inside a committed block).

A request whose sampling needs the host's view of its previous token (a grammar, penalties, bad words:
needs_host_tokens) costs overlap only partly: a step holding one queues its forward with the placeholders
filled on the device as always, then reads the previous step's tokens (the device runs the forward
meanwhile), then builds its masks and samples. A step with prompt logprobs reads them on the host, which
waits for its forward: the device idles after that step, as in the synchronous engine. Under tensor
parallelism TP rank 0 broadcasts the pending step's tokens to its peers on the TP device group before the
forward (no host sync either). Expert-parallel lockstep plans step s+1 while step s runs too; with
--lockstep-lookahead it stays synchronous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from runtime.engine.sampler import SampledTokens
from runtime.engine.sequence import Sequence
from runtime.sampling_params import SamplingParams


def placeholder(row: int) -> int:
    """The token id a sequence holds while row `row` of the step in flight samples its real one."""
    return -(row + 1)


def needs_host_tokens(params: SamplingParams) -> bool:
    """Whether sampling this request reads its earlier tokens on the host: a grammar matcher advanced by each
    token, penalties and bad words built from the output so far. A step holding one reads the previous step's
    tokens once its own forward is queued, before it samples."""
    return (params.grammar is not None or params.repetition_penalty != 1.0 or bool(params.presence_penalty)
            or bool(params.frequency_penalty) or bool(params.bad_words_token_ids))


@dataclass
class PendingStep:
    """A step whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]  # the sequences it samples for, in row order
    token_ids: torch.Tensor  # [len(seqs)] int64 on the device: what the next step's placeholders read
    sampled: SampledTokens  # the same tokens (and logprobs), copying to pinned host memory
    # per row: the index in seq.token_ids its token goes to (a placeholder there, or the end: a sequence sure
    # to finish with this token gets no placeholder and is not scheduled again)
    positions: list[int] = field(default_factory=list)


def fill_placeholders(input_ids: torch.Tensor, prev_token_ids: torch.Tensor, host_ids: np.ndarray) -> torch.Tensor:
    """input_ids [n] (device) with placeholders -(k + 1) -> the same ids with prev_token_ids[k] in their place;
    on the device, no sync. prev_token_ids: [m] int64, the step in flight's sampled tokens; host_ids: the host
    copy of input_ids."""
    n = input_ids.shape[0]
    if n <= prev_token_ids.shape[0] and host_ids[0] == -1 and host_ids[-1] == -n and \
            np.array_equal(host_ids, np.arange(-1, -n - 1, -1)):
        return prev_token_ids[:n]  # the steady decode step: the same sequences in the same order, no kernel
    rows = (-1 - input_ids).clamp_(0, prev_token_ids.shape[0] - 1)
    return torch.where(input_ids < 0, prev_token_ids.index_select(0, rows), input_ids)
