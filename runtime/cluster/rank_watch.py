"""Liveness of the engine ranks and of their launcher, as the coordinator sees them (no sockets, no torch).

Every rank runs a heartbeat thread (engine_proc.py) that sends a Heartbeat every HEARTBEAT_INTERVAL_S, also
while a long step runs, with a progress counter that moves between layers. So there are two ways to be hung:
- silent: no message at all for SUSPECT_AFTER_S (the process is stopped, or wedged holding the GIL);
- stalled: busy inside a step while its progress has not moved (stuck in a collective, a dead-locked kernel).
A rank that is working, however long its step, is neither. Under lockstep (expert parallel) the ranks run
each layer together: a rank waiting in the all2all for a peer's long prefill layer is not stalled while a
busy peer moves; when no busy rank moves, the one with the biggest step (the long prefill) is blamed.
Suspect ranks show the cluster as degraded; a rank silent or stalled for hang_timeout_s is killed when it
runs on this host (one per incarnation: the elastic launcher then restarts the whole group rather than leave
it hung in a collective forever). A rank that exits is the launcher's to notice: it restarts the group
without our help.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from runtime.messages import HEARTBEAT_INTERVAL_S, Heartbeat

logger = logging.getLogger("runtime.cluster.coordinator")

SUSPECT_AFTER_S = 3 * HEARTBEAT_INTERVAL_S  # of complete silence: the heartbeat thread beats through long steps


@dataclass
class Killed:
    rank: int
    request_ids: list[str]  # the requests of the step it hung in
    reason: str


class RankWatch:
    def __init__(self, num_ranks: int, hang_timeout_s: float, lockstep: bool = False) -> None:
        self.num_ranks = num_ranks
        self.lockstep = lockstep
        self.hang_timeout_s = hang_timeout_s
        self.hostname = socket.gethostname()
        now = time.monotonic()
        self.last_heard = [now] * num_ranks
        self.where: list[tuple[int, str]] = [(0, "")] * num_ranks  # (pid, hostname) from the rank's hello
        self.suspect = [False] * num_ranks
        self.killed: Killed | None = None  # the rank killed for a hang in this incarnation
        self.busy = [False] * num_ranks
        self.progress = [-1] * num_ranks
        self.last_progress = [now] * num_ranks  # when progress last moved (or the rank was last idle)
        self.request_ids: list[list[str]] = [[] for _ in range(num_ranks)]
        self.step_tokens = [0] * num_ranks

    def reset(self) -> None:
        """A new incarnation: nothing of the old one is suspect any more."""
        now = time.monotonic()
        self.suspect = [False] * self.num_ranks
        self.killed = None
        self.last_heard = [now] * self.num_ranks
        self.busy = [False] * self.num_ranks
        self.progress = [-1] * self.num_ranks
        self.last_progress = [now] * self.num_ranks
        self.request_ids = [[] for _ in range(self.num_ranks)]
        self.step_tokens = [0] * self.num_ranks

    def hello(self, rank: int, pid: int, hostname: str) -> None:
        if pid > 0:
            self.where[rank] = (pid, hostname)

    def heard(self, rank: int, now: float | None = None) -> bool:
        """Records a message from the rank; True if it had been suspect (health changed)."""
        now = time.monotonic() if now is None else now
        self.last_heard[rank] = now
        if not self.busy[rank]:
            self.last_progress[rank] = now
        if self.suspect[rank] and now - self.last_progress[rank] <= self.hang_timeout_s / 2:
            self.suspect[rank] = False
            logger.info("engine rank %d answers again", rank)
            return True
        return False

    def beat(self, hb: Heartbeat, now: float | None = None) -> bool:
        """A heartbeat; True if the rank's health changed."""
        now = time.monotonic() if now is None else now
        r = hb.rank
        self.hello(r, hb.pid, hb.hostname)
        if hb.progress != self.progress[r] or not hb.busy:
            self.last_progress[r] = now
        self.progress[r] = hb.progress
        self.busy[r] = hb.busy
        self.request_ids[r] = hb.request_ids if hb.busy else []
        self.step_tokens[r] = hb.num_tokens if hb.busy else 0
        return self.heard(r, now)

    def check(self, now: float, ready: list[bool]) -> tuple[bool, Killed | None]:
        """Marks silent or stalled ranks suspect and kills one hung local rank.
        Returns (health changed, the rank killed now or None)."""
        changed = False
        worst: tuple[float, int, int, str] | None = None
        live = [r for r in range(self.num_ranks) if ready[r]]
        # a rank between steps proves nothing about one inside a step: only busy ranks' progress counts
        group_progress = max((self.last_progress[r] for r in live if self.busy[r]), default=now)
        # while some rank is silent, its peers' stall is most likely its doing: only silence gets a rank killed
        # then (the silent one crosses the timeout within a heartbeat or two of its peers)
        any_silent = any(now - self.last_heard[r] > SUSPECT_AFTER_S for r in live)
        for rank in live:
            silent = now - self.last_heard[rank]
            moved = group_progress if self.lockstep else self.last_progress[rank]
            stalled = now - moved if self.busy[rank] else 0.0
            if not self.suspect[rank] and (silent > SUSPECT_AFTER_S or stalled > self.hang_timeout_s / 2):
                self.suspect[rank] = changed = True
                what = f"silent for {silent:.1f} s" if silent > SUSPECT_AFTER_S else f"no progress for {stalled:.1f} s"
                logger.warning("engine rank %d %s: cluster degraded", rank, what)
            # silence first: a stopped rank leaves its peers stalled in a collective, it is the one to blame;
            # among stalled ranks (under lockstep all stall alike) the one with the biggest step
            for how, seconds, weight in (("silent", silent, 2.0), ("made no progress", stalled, 1.0)):
                key = (round(weight * seconds, 1), self.step_tokens[rank])
                if any_silent and weight == 1.0:
                    continue
                if seconds > self.hang_timeout_s and (worst is None or key > worst[:2]):
                    worst = (key[0], key[1], rank, f"{how} for {seconds:.0f} s")
        if worst is None or self.killed is not None:
            return changed, None
        _, _, rank, what = worst
        pid, host = self.where[rank]
        if pid <= 0 or host != self.hostname:
            return changed, None
        reason = f"engine rank {rank} (pid {pid}) {what} (--engine-hang-timeout {self.hang_timeout_s:g})"
        self.killed = Killed(rank, list(self.request_ids[rank]), reason)
        logger.error("%s: killing it so the launcher restarts the rank group", reason)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError as e:
            logger.warning("could not kill rank %d (pid %d): %s", rank, pid, e)
        return changed, self.killed

    @property
    def any_suspect(self) -> bool:
        return any(self.suspect)


def process_alive(pid: int) -> bool:
    """An exited launcher whose parent has not reaped it yet (a zombie) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
