"""Step plans: what TP rank 0 of a DP rank sends its TP peers so they run the same forward.

The peers hold no scheduler, sequences or sampler: TP rank 0 schedules, builds the step's host arrays (token
ids, positions, KV slots, cu_seqlens, seq_lens, block tables) and broadcasts them over the TP group's gloo
group as two int64 tensors (a fixed header, then the payload): no serialized Python objects. Every TP rank
then runs the same forward (same shapes, same CUDA graph bucket, same collectives); only rank 0 samples, on
logits gathered onto it from every rank's vocabulary shard, so tokens do not depend on the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

RUN, DUMMY, STOP, SUM = 1, 2, 3, 4  # SUM: add up an int64 vector of num_tokens entries over the TP ranks
_HEADER = 12


@dataclass
class StepPlan:
    kind: int
    num_tokens: int  # padded token rows (DUMMY: the agreed size)
    num_rows: int = 0  # sequences incl. padding rows
    width: int = 1  # block-table width
    is_decode: bool = False
    max_seqlen_q: int = 1
    max_seqlen_k: int = 0
    num_real_tokens: int = 0
    i64: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # ids | positions | slots
    i32: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # cu | seq_lens | tables
    sample_rows: list[int] = field(default_factory=list)  # token rows whose logits are sampled
    # async scheduling: the ids hold placeholders for the previous step's sampled tokens, this many, which TP
    # rank 0 broadcasts on the device group before the forward (runtime/engine/async_step.py)
    num_prev_tokens: int = 0
    # prompt logprobs: token rows whose hidden states are scored after the step, in chunks, each chunk's logits
    # gathered from every TP rank (runtime/engine/prompt_logprobs.py): the peers join each gather
    extra_rows: list[int] = field(default_factory=list)

    # Every part of i64 and i32 starts 16-byte aligned: Triton specializes kernels on pointer alignment, and
    # an offset that followed the batch size would compile a second variant of each kernel while serving.
    @property
    def i64_part(self) -> int:  # entries of each of ids / positions / slots
        return -(-self.num_tokens // 2) * 2

    @property
    def i32_part(self) -> int:  # entries of each of cu_seqlens / seq_lens (tables follow)
        return -(-(self.num_rows + 1) // 4) * 4


def broadcast_plan(plan: StepPlan, group: Any, src: int) -> None:
    header = torch.tensor([plan.kind, plan.num_tokens, plan.num_rows, plan.width, int(plan.is_decode),
                           plan.max_seqlen_q, plan.max_seqlen_k, plan.num_real_tokens, len(plan.sample_rows),
                           plan.i32.size, plan.num_prev_tokens, len(plan.extra_rows)], dtype=torch.int64)
    dist.broadcast(header, src, group=group)
    if plan.kind == RUN:
        payload = np.concatenate([plan.i64, plan.i32.astype(np.int64), np.asarray(plan.sample_rows, dtype=np.int64),
                                  np.asarray(plan.extra_rows, dtype=np.int64)])
        dist.broadcast(torch.from_numpy(payload), src, group=group)


def receive_plan(group: Any, src: int) -> StepPlan:
    header = torch.empty(_HEADER, dtype=torch.int64)
    dist.broadcast(header, src, group=group)
    kind, n, rows, width, decode, max_q, max_k, real, num_sample, num_i32, num_prev, num_extra = header.tolist()
    plan = StepPlan(kind, n, rows, width, bool(decode), max_q, max_k, real, num_prev_tokens=num_prev)
    if kind == RUN:
        n64 = 3 * plan.i64_part
        payload = torch.empty(n64 + num_i32 + num_sample + num_extra, dtype=torch.int64)
        dist.broadcast(payload, src, group=group)
        values = payload.numpy()
        plan.i64 = values[:n64]
        plan.i32 = values[n64 : n64 + num_i32].astype(np.int32)
        plan.sample_rows = values[n64 + num_i32 : n64 + num_i32 + num_sample].tolist()
        plan.extra_rows = values[n64 + num_i32 + num_sample :].tolist()
    return plan


def sum_over_group(values: torch.Tensor, group: Any) -> torch.Tensor:
    values = values.clone()
    dist.all_reduce(values, group=group)
    return values
