"""Ports for the tests' servers and gloo rendezvous that stay free until the test binds them, also while
pytest-xdist runs several workers at once (pyproject.toml addopts).

Binding port 0 and closing it (the usual probe) returns a port of the kernel's ephemeral range, where any process's
next outgoing connection or bind(0) -- another worker's ranks, gloo's own pairs -- may take it before the server
binds it. Here each worker hands out ports of its own slice of 20000..32000, below the ephemeral range (32768+ on
Linux) and disjoint from the other workers' slices, in turn from a random start, never the same one twice in a
process: two tests, or two workers, never race for one port."""

from __future__ import annotations

import os
import random
import socket

LOW, HIGH = 20000, 32000  # below /proc/sys/net/ipv4/ip_local_port_range's 32768


def _slice() -> tuple[int, int]:
    """[first, end) of this process's ports: the xdist worker's share (gw0, gw1, ...), or all of them."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    if count <= 1 or index >= count:
        return LOW, HIGH
    size = (HIGH - LOW) // count
    return LOW + index * size, LOW + (index + 1) * size


_first, _end = _slice()
_next = random.randrange(_first, _end)  # a random start: a rerun does not meet its predecessor's TIME_WAITs


def _bindable(port: int) -> bool:
    # on every interface (a server binds 0.0.0.0 or 127.0.0.1), without SO_REUSEADDR: a port in TIME_WAIT is busy
    try:
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False


def free_port_block(n: int) -> int:
    """A port p with p .. p + n - 1 free now and handed out by no earlier call of this process."""
    global _next
    for _ in range((_end - _first) // n + 1):
        if _next + n > _end:
            _next = _first
        p, _next = _next, _next + n
        if all(_bindable(q) for q in range(p, p + n)):
            return p
    raise RuntimeError(f"no {n} consecutive free ports in {_first}..{_end}")


def free_port() -> int:
    return free_port_block(1)
