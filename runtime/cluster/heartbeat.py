"""A rank's heartbeat thread: beats while the rank loop is busy in a long step, with a progress counter.

The rank loop sends its messages between steps; a long prefill (seconds, minutes on a CPU) would leave it
silent, and silence is how the coordinator spots a hang. This thread, with its own ZMQ socket (sockets are
not thread-safe), sends a Heartbeat every HEARTBEAT_INTERVAL_S. Its `progress` counts steps and layer
forwards (forward pre-hooks on the model's decoder layers), so the coordinator tells a rank that works (the
count moves) from one stuck in a collective or a kernel (busy, the count stands still). torch releases the
GIL in its kernels and collectives, so the thread runs during them; a process that is stopped, or wedged with
the GIL held, sends nothing and is found silent instead.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import zmq

from runtime.messages import HEARTBEAT_INTERVAL_S, Heartbeat, encode


class Progress:
    """Written by the rank loop (and layer hooks), read by the heartbeat thread. Plain attribute writes
    are atomic under the GIL; the thread only reads a consistent-enough snapshot."""

    def __init__(self) -> None:
        self.count = 0  # steps + layer forwards since start
        self.step_id = 0
        self.busy = False
        self.batch: Any = None  # the step in progress (a ScheduledBatch): its ids are read only when beating
        self.num_tokens = 0  # of the step in progress

    def begin(self, step_id: int, batch: Any, num_tokens: int = 0) -> None:
        self.step_id = step_id
        self.batch = batch
        self.num_tokens = num_tokens
        self.busy = True

    def end(self) -> None:
        self.busy = False
        self.batch = None
        self.count += 1

    def request_ids(self) -> list[str]:
        batch = self.batch
        return [s.request_id for s in batch.seqs] if batch is not None else []

    def tick(self, *args: object) -> None:  # a forward pre-hook: (module, inputs)
        self.count += 1


def attach_layer_hooks(model: Any, progress: Progress) -> int:
    """A pre-hook on every decoder layer (children of ModuleLists named 'layers'). Hooks fire as the layer
    is launched (on a GPU, ahead of the kernels); a replayed CUDA graph fires none: those steps count once."""
    num = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and hasattr(module, "__iter__"):
            for layer in module:
                layer.register_forward_pre_hook(progress.tick)
                num += 1
    return num


class HeartbeatThread(threading.Thread):
    def __init__(self, ctx: zmq.Context, address: str, rank: int, epoch: int, progress: Progress,
                 interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        super().__init__(name=f"heartbeat-rank{rank}", daemon=True)
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 4)  # a coordinator that is away gets only fresh beats later
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.rank, self.epoch, self.progress, self.interval_s = rank, epoch, progress, interval_s
        self.stopped = threading.Event()
        self.where = (os.getpid(), socket.gethostname())

    def beat(self) -> None:
        p = self.progress
        busy = p.busy
        msg = Heartbeat(rank=self.rank, epoch=self.epoch, step_id=p.step_id, busy=busy, progress=p.count,
                        request_ids=p.request_ids() if busy else [], pid=self.where[0], hostname=self.where[1],
                        num_tokens=p.num_tokens if busy else 0)
        try:
            self.sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def run(self) -> None:
        try:
            while not self.stopped.wait(self.interval_s):
                self.beat()
        finally:
            self.sock.close(linger=0)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=2 * self.interval_s)
