"""The coordinator's log line: per-rank cumulative counters turned into rates over one interval.

A rank's counters start again at 0 when the rank group restarts: forget() drops the dead incarnation's
figures, and a counter that went down is read as a fresh start (never as a negative rate).
"""

from __future__ import annotations

import time
from typing import Protocol

from runtime.messages import ExpertStatsSnapshot, RankStats


class _Clock(Protocol):
    num_commands: int
    num_dummy_commands: int


class StatsAggregator:
    """Sums per-rank cumulative counters into rates, one log line per interval."""

    def __init__(self, num_ranks: int) -> None:
        self.latest: list[RankStats | None] = [None] * num_ranks
        self.previous: list[RankStats | None] = [None] * num_ranks
        self.expert: list[ExpertStatsSnapshot | None] = [None] * num_ranks
        self.last_time = time.monotonic()
        self.last_commands = (0, 0)

    def forget(self, rank: int) -> None:
        """The rank restarted: its old counters mean nothing to the new incarnation."""
        self.latest[rank] = None
        self.previous[rank] = None
        self.expert[rank] = None

    def line(self, clock: _Clock | None, now: float) -> str:
        dt = max(now - self.last_time, 1e-9)
        prompt, gen = [], []
        d_cmd = d_dummy = 0
        for cur, prev in zip(self.latest, self.previous):
            if cur is None:
                prompt.append(0.0)
                gen.append(0.0)
                continue
            # no previous figure, or counters that went down (a restarted rank): count from 0
            if prev is None or cur.prompt_tokens < prev.prompt_tokens or cur.generation_tokens < prev.generation_tokens:
                prev = RankStats(cur.rank, 0, 0, 0.0, 0, 0, 0, 0)
            prompt.append((cur.prompt_tokens - prev.prompt_tokens) / dt)
            gen.append((cur.generation_tokens - prev.generation_tokens) / dt)
            d_cmd += max(cur.num_steps - prev.num_steps, 0)
            d_dummy += max(cur.num_dummy_steps - prev.num_dummy_steps, 0)
        ranks = [s for s in self.latest if s is not None]
        running = sum(s.num_running for s in ranks)
        waiting = sum(s.num_waiting for s in ranks)
        kv = [s.kv_usage for s in ranks] or [0.0]
        if clock is not None:
            d_cmd = max(clock.num_commands - self.last_commands[0], 0)
            d_dummy = max(clock.num_dummy_commands - self.last_commands[1], 0)
            self.last_commands = (clock.num_commands, clock.num_dummy_commands)
        self.previous = list(self.latest)
        self.last_time = now

        def per_rank(xs: list[float]) -> str:
            return "/".join(f"{x:.1f}" for x in xs)

        kv_mean = 100 * sum(kv) / len(kv)
        return (f"prompt {sum(prompt):.1f} tok/s [{per_rank(prompt)}], generation {sum(gen):.1f} tok/s "
                f"[{per_rank(gen)}], running {running}, waiting {waiting}, KV usage mean {kv_mean:.1f}% "
                f"max {100 * max(kv):.1f}%, dummy steps {100 * d_dummy / max(d_cmd, 1):.1f}%")
