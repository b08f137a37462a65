"""The launcher keeps the control plane alive: a coordinator or API server that dies (kill -9, a crash) is
started again with the same command line, while the engine ranks run on.

A restarted API server binds the same port and the same ipc socket (the ranks' output sockets reconnect by
themselves); a restarted coordinator asks the ranks where they are (Sync, runtime/cluster/coordinator.py). An exit
with status 0 or by SIGTERM/SIGINT is a deliberate stop (shutdown, restart budget spent), never undone.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time

logger = logging.getLogger("runtime.serve")

_DELIBERATE = (0, -signal.SIGTERM, -signal.SIGINT)


class ControlPlaneWatch(threading.Thread):
    """Watches procs (a list it updates in place, so whoever stops them later stops the new ones)."""

    def __init__(self, procs: list[subprocess.Popen], names: list[str], env: dict[str, str],
                 max_restarts: int = 20, window_s: float = 300.0, interval_s: float = 0.2) -> None:
        super().__init__(name="control-plane-watch", daemon=True)
        self.procs, self.names, self.env = procs, names, env
        self.max_restarts, self.window_s, self.interval_s = max_restarts, window_s, interval_s
        self.restarts: list[list[float]] = [[] for _ in procs]  # times of recent restarts, per process
        self.stopped = threading.Event()
        self.lock = threading.Lock()  # held while a process is replaced

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            for i in range(len(self.procs)):
                with self.lock:
                    if not self.stopped.is_set():
                        self._check(i)

    def _check(self, i: int) -> None:
        proc = self.procs[i]
        rc = proc.poll()
        if rc is None or rc in _DELIBERATE:
            return
        now = time.monotonic()
        recent = [t for t in self.restarts[i] if now - t < self.window_s]
        if len(recent) >= self.max_restarts:
            if len(recent) == self.max_restarts:
                logger.error("the %s died (status %d) %d times in %.0f s: not restarting it again", self.names[i],
                             rc, len(recent), self.window_s)
                self.restarts[i].append(now)  # log once
            return
        logger.warning("the %s (pid %d) died (status %d): restarting it", self.names[i], proc.pid, rc)
        self.procs[i] = subprocess.Popen(proc.args, env=self.env, start_new_session=True)
        self.restarts[i] = recent + [now]

    def stop(self) -> None:
        with self.lock:
            self.stopped.set()
        if self.is_alive():
            self.join(timeout=2.0)
