"""One request as the engine sees it: its tokens, how many are computed, and its KV blocks."""

from __future__ import annotations

import enum
import time

from runtime.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float = 0.0,
        num_generated_before: int = 0,
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_time = arrival_time
        # A request resumed after an engine restart carries its earlier output inside the prompt;
        # budgets and the seeded random stream continue from there.
        self.num_generated_before = num_generated_before
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | None = None
        self.num_preemptions = 0
        # per prompt position j, the scored prompt token j + 1 (runtime/engine/prompt_logprobs.py), when asked
        self.prompt_logprobs: list[list[tuple[int, float, int]]] | None = None
        self.prompt_logprobs_sent = False
        # on the engine's own monotonic clock, for vLLM's queue and prefill time histograms: only durations
        # leave the engine, so no clock of another process or node is compared with it
        self.queued_time = time.monotonic()  # reached the engine
        self.first_scheduled_time: float | None = None  # first admitted to a batch; a preemption keeps it

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_total_generated(self) -> int:
        """Output tokens counted across engine restarts (for max_tokens, min_tokens and seeds)."""
        return self.num_generated_before + self.num_output_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def mark_scheduled(self) -> None:
        if self.first_scheduled_time is None:
            self.first_scheduled_time = time.monotonic()

    def first_token_timings(self) -> tuple[float, float]:
        """(queue time, first scheduled to now) in seconds: called as the first output token is sampled."""
        scheduled = self.first_scheduled_time if self.first_scheduled_time is not None else self.queued_time
        return scheduled - self.queued_time, time.monotonic() - scheduled

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
