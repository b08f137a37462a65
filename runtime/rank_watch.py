"""Liveness of the engine ranks and of their launcher, as the coordinator sees them (no sockets, no torch).

A rank reports at least every HEARTBEAT_INTERVAL_S between steps. Silent for SUSPECT_AFTER_S it is suspect
(the cluster shows as degraded); silent for hang_timeout_s it is killed when it runs on this host, so the
elastic launcher restarts the whole group rather than leave it hung in a collective forever. A rank that
exits is the launcher's to notice: it restarts the group without our help.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

from runtime.messages import HEARTBEAT_INTERVAL_S

logger = logging.getLogger("runtime.coordinator")

SUSPECT_AFTER_S = 3 * HEARTBEAT_INTERVAL_S


class RankWatch:
    def __init__(self, num_ranks: int, hang_timeout_s: float) -> None:
        self.num_ranks = num_ranks
        self.hang_timeout_s = hang_timeout_s
        self.hostname = socket.gethostname()
        self.last_heard = [time.monotonic()] * num_ranks
        self.where: list[tuple[int, str]] = [(0, "")] * num_ranks  # (pid, hostname) from the rank's hello
        self.suspect = [False] * num_ranks
        self.killed = [False] * num_ranks  # killed for a hang in this incarnation

    def reset(self) -> None:
        """A new incarnation: nothing of the old one is suspect any more."""
        self.suspect = [False] * self.num_ranks
        self.killed = [False] * self.num_ranks
        self.last_heard = [time.monotonic()] * self.num_ranks

    def hello(self, rank: int, pid: int, hostname: str) -> None:
        self.where[rank] = (pid, hostname)

    def heard(self, rank: int, now: float | None = None) -> bool:
        """Records a message from the rank; True if it had been suspect (health changed)."""
        self.last_heard[rank] = time.monotonic() if now is None else now
        if self.suspect[rank]:
            self.suspect[rank] = False
            logger.info("engine rank %d answers again", rank)
            return True
        return False

    def check(self, now: float, ready: list[bool]) -> bool:
        """Marks silent ranks suspect and kills hung local ones; True if any became suspect."""
        changed = False
        for rank in range(self.num_ranks):
            if not ready[rank]:
                continue
            silent = now - self.last_heard[rank]
            if silent > SUSPECT_AFTER_S and not self.suspect[rank]:
                self.suspect[rank] = changed = True
                logger.warning("engine rank %d silent for %.1f s: cluster degraded", rank, silent)
            pid, host = self.where[rank]
            if silent > self.hang_timeout_s and not self.killed[rank] and pid > 0 and host == self.hostname:
                self.killed[rank] = True
                logger.error("engine rank %d (pid %d) silent for %.0f s: killing it so the launcher restarts "
                             "the rank group", rank, pid, silent)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError as e:
                    logger.warning("could not kill rank %d (pid %d): %s", rank, pid, e)
        return changed

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
