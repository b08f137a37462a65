"""The DP coordinator: lockstep clock and routing alone, then the real process against fake engine ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import msgspec
import zmq

from runtime.cluster.coordinator import CoordinatorSpec, StepClock
from runtime.cluster.router import Router
from runtime.messages import (
    AddRequest,
    Addresses,
    ClusterStats,
    RankStats,
    Shutdown,
    StatsReport,
    StepCommand,
    StepReport,
    Sync,
    decode,
    encode,
)
from runtime.sampling_params import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report(rank: int, step: int, n: int, received: int = 0, running: int = 0) -> StepReport:
    return StepReport(rank=rank, step_id=step, num_tokens=n, is_decode=False, num_running=running,
                      num_requests_received=received)


def test_clock_pads_to_max_and_is_silent_when_idle() -> None:
    clock = StepClock(3)
    assert clock.on_report(report(0, 0, 0)) is None
    assert clock.on_report(report(1, 0, 0)) is None
    assert clock.on_report(report(2, 0, 0)) is None  # everyone idle: nothing issued
    cmds = clock.on_report(report(1, 0, 7))  # rank 1 woke up with work
    assert cmds == [StepCommand(0, 7, True), StepCommand(0, 7, False), StepCommand(0, 7, True)]
    assert clock.on_report(report(0, 0, 3)) is None  # late update for an issued step: ignored
    for r, n in enumerate([2, 5, 0]):
        cmds = clock.on_report(report(r, 1, n))
    assert cmds == [StepCommand(1, 5, False), StepCommand(1, 5, False), StepCommand(1, 5, True)]
    assert (clock.num_steps_issued, clock.num_dummy_commands) == (2, 3)


def test_clock_waits_for_a_rank_that_was_sent_a_request() -> None:
    clock = StepClock(2)
    clock.on_report(report(0, 0, 4))
    clock.num_sent[1] += 1  # a request is on its way to idle rank 1: its report of 0 is stale
    assert clock.on_report(report(1, 0, 0, received=0)) is None
    cmds = clock.on_report(report(1, 0, 6, received=1))
    assert cmds == [StepCommand(0, 6, False), StepCommand(0, 6, False)]


def test_balancer_spreads_by_load() -> None:
    lb = Router(4, "load")
    assert [lb.pick() for _ in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    lb.update(report(0, 0, 0, received=2, running=0))
    lb.update(report(1, 0, 0, received=2, running=5))
    lb.update(report(2, 0, 0, received=2, running=1))
    lb.update(report(3, 0, 0, received=2, running=1))
    assert [lb.pick() for _ in range(3)] == [0, 2, 3]  # then 0, 2, 3 tie at 1: rotated, not all to 0
    assert lb.num_routed == [3, 2, 3, 3]


class FakeRank:
    def __init__(self, ctx: zmq.Context, addrs: Addresses, rank: int) -> None:
        self.rank = rank
        self.pull = ctx.socket(zmq.PULL)
        self.pull.connect(addrs.to_engines[rank])
        self.push = ctx.socket(zmq.PUSH)
        self.push.connect(addrs.to_coordinator)
        self.received = 0

    def ready(self) -> None:
        self.push.send(encode(StatsReport(stats=RankStats(self.rank, 0, 0, 0.0, 0, 0, 0, 0), first=True)))

    def report(self, step: int, n: int) -> None:
        self.push.send(encode(report(self.rank, step, n, self.received)))

    def recv(self, timeout_s: float = 10.0) -> object | None:
        while True:
            if not self.pull.poll(int(timeout_s * 1e3)):
                return None
            msg = decode(self.pull.recv())
            if not isinstance(msg, Sync):  # a new coordinator's question; these fakes said hello with first=True
                break
        if isinstance(msg, AddRequest):
            self.received += 1
        return msg


def test_coordinator_process_lockstep_without_torch() -> None:
    with tempfile.TemporaryDirectory() as d:
        addrs = Addresses.ipc(d, 2)
        ctx = zmq.Context()
        front_pull = ctx.socket(zmq.PULL)
        front_pull.bind(addrs.to_frontend)
        front_push = ctx.socket(zmq.PUSH)
        front_push.connect(addrs.to_coordinator)
        spec = CoordinatorSpec(num_ranks=2, lockstep=True, log_stats_interval=0.2)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cluster.coordinator",
                                 msgspec.json.encode(spec).decode(),
                                 msgspec.json.encode(addrs).decode()], cwd=ROOT, env=env)
        try:
            ranks = [FakeRank(ctx, addrs, r) for r in range(2)]
            for r in ranks:
                r.ready()
                r.report(0, 0)
            params = SamplingParams(temperature=0.0, max_tokens=2)
            front_push.send(encode(AddRequest("a", [1, 2, 3], params)))
            assert isinstance(ranks[0].recv(), AddRequest)  # least loaded, lowest rank
            assert ranks[1].recv(0.3) is None  # idle and no command: nothing for rank 1
            ranks[0].report(0, 3)  # woken: re-report the same step
            assert [r.recv() for r in ranks] == [StepCommand(0, 3, False), StepCommand(0, 3, True)]
            ranks[0].report(1, 1)
            ranks[1].report(1, 0)
            assert [r.recv() for r in ranks] == [StepCommand(1, 1, False), StepCommand(1, 1, True)]
            ranks[0].report(2, 0)
            ranks[1].report(2, 0)
            assert ranks[0].recv(0.5) is None and ranks[1].recv(0.1) is None  # all idle: silence
            # two requests at once: rank 1 re-reports late; the coordinator must wait for it
            front_push.send(encode(AddRequest("b", [4], params)))
            front_push.send(encode(AddRequest("c", [5], params)))
            assert isinstance(ranks[0].recv(), AddRequest) and isinstance(ranks[1].recv(), AddRequest)
            ranks[0].report(2, 1)
            assert ranks[0].recv(0.4) is None
            ranks[1].report(2, 1)
            assert [r.recv() for r in ranks] == [StepCommand(2, 1, False), StepCommand(2, 1, False)]
            stats = None
            deadline = time.monotonic() + 10
            while stats is None or stats.num_steps_issued < 3:
                assert time.monotonic() < deadline, "no ClusterStats from the coordinator"
                if front_pull.poll(500):
                    msg = decode(front_pull.recv())
                    stats = msg if isinstance(msg, ClusterStats) else stats
            assert (stats.num_steps_issued, stats.num_dummy_commands) == (3, 2)
            assert stats.num_requests_routed == [2, 1]
            proc.send_signal(signal.SIGTERM)
            assert [r.recv() for r in ranks] == [Shutdown(), Shutdown()]
            # exit code 3 would mean the coordinator imported torch (it must never touch CUDA)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            ctx.destroy(linger=0)


def test_restart_resets_the_clock() -> None:
    from runtime.cluster.coordinator import Coordinator

    with tempfile.TemporaryDirectory() as d:
        addrs = Addresses.ipc(d, 2)
        coord = Coordinator(CoordinatorSpec(num_ranks=2, lockstep=True), addrs, zmq.Context())
        try:
            hello = [StatsReport(stats=RankStats(r, 0, 0, 0.0, 0, 0, 0, 0), first=True) for r in range(2)]
            for h in hello:
                coord.handle(h)
            assert all(coord.ready)
            coord.handle(report(0, 0, 3))
            coord.handle(report(1, 0, 0))
            assert coord.clock is not None and coord.clock.step_id == 1
            coord.handle(hello[1])  # the group restarted: step ids begin again
            assert coord.clock.step_id == 0 and coord.num_engine_restarts == 1 and coord.ready == [False, True]
            coord.handle(hello[0])
            assert all(coord.ready) and coord.num_engine_restarts == 1
        finally:
            coord.ctx.destroy(linger=0)


def test_shutdown_does_not_wait_for_ranks_that_exited() -> None:
    """The launcher stops the ranks before the control plane: a Shutdown for a rank of this incarnation whose
    process is gone is dropped at once, not after the 2 s flush deadline (which a live rank still gets)."""
    import socket

    from runtime.cluster.coordinator import Coordinator

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with tempfile.TemporaryDirectory() as d:
        coord = Coordinator(CoordinatorSpec(num_ranks=2, lockstep=True), Addresses.ipc(d, 2), zmq.Context())
        try:
            for rank, pid in enumerate((gone.pid, os.getpid())):
                coord.handle(StatsReport(stats=RankStats(rank, 0, 0, 0.0, 0, 0, 0, 0), first=True, pid=pid,
                                         hostname=socket.gethostname()))
            assert coord._exited(0) and not coord._exited(1)  # rank 1 (this test) is alive: it gets the deadline
            coord.ready[1] = False  # as if rank 1 had never said hello: nothing is known of it, nothing waited for
            coord.watch.where[1] = (gone.pid, socket.gethostname())
            assert not coord._exited(1)
            coord.ready[1] = True
            t0 = time.monotonic()
            coord.shutdown()  # no rank connected: every Shutdown stays unsent
            assert time.monotonic() - t0 < 1.0  # the deadline is 2 s
            assert all(coord.outbox)
        finally:
            coord.ctx.destroy(linger=0)
