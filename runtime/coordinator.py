"""The DP coordinator: its own process, no GPU (never imports torch). Routes requests, clocks EP steps.

Routing: each AddRequest goes to the rank with the least load: running + waiting + requests sent but not
yet seen in a report, then KV usage. Aborts go to every rank (a rank ignores ids it does not hold).

Lockstep (expert parallel): every rank schedules and sends StepReport(step_id, num_tokens). Once every rank
has reported for the current step, and each report is current (it has seen every request sent to that rank,
or already has work), the coordinator answers all ranks StepCommand(pad_to=max, dummy=(its tokens == 0)).
When every rank reports 0 it answers nothing: the ranks sit in recv and the GPUs go quiet. A new request
wakes its rank, which schedules again and sends a fresh report for the same step.

Free-running ranks (dense model, or DP without EP) only send reports for the load figures.

Restarts: the elastic launcher restarts the whole rank group when one rank dies; the new ranks say hello
with a higher epoch. The coordinator then forgets everything of the old incarnation (clock, queued commands,
requests routed to it: the front end re-submits those) and drops any message of an older epoch. Silent and
hung ranks: runtime/rank_watch.py. Once the launcher itself is gone, the front end is told (EngineDead).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections import deque

import msgspec
import zmq

from runtime.messages import (
    HEARTBEAT_INTERVAL_S,
    AbortRequest,
    AddRequest,
    Addresses,
    ClusterStats,
    EngineDead,
    ExpertStatsSnapshot,
    RankStats,
    Shutdown,
    StatsReport,
    StepCommand,
    StepReport,
    decode_or_drop,
    encode,
    secret_from_env,
    use_secret,
)
from runtime.procs import set_title
from runtime.rank_watch import RankWatch, process_alive

logger = logging.getLogger("runtime.coordinator")


class CoordinatorSpec(msgspec.Struct):
    num_ranks: int
    lockstep: bool  # expert parallel: clock every step; otherwise the ranks run freely
    log_stats: bool = True
    log_stats_interval: float = 5.0
    expert_stats_file: str | None = None
    # the launcher (python -m runtime.serve, or torchrun's agent): once it is gone the ranks cannot come back
    watch_pid: int | None = None
    hang_timeout_s: float = 60.0  # a rank silent this long (between steps or inside one) is killed
    max_restarts: int | None = None  # the launcher's restart budget, for the log (None: unknown)


class StepClock:
    """Lockstep bookkeeping, free of sockets so it can be tested alone."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self.step_id = 0
        self.reports: list[StepReport | None] = [None] * num_ranks
        self.num_sent = [0] * num_ranks  # AddRequests sent to each rank
        self.num_steps_issued = 0
        self.num_dummy_commands = 0  # (step, rank) pairs that ran a dummy
        self.num_commands = 0

    def reset(self) -> None:
        """The ranks restarted (elastic launcher): their step ids begin again at 0, nothing is in flight."""
        self.step_id = 0
        self.reports = [None] * self.num_ranks
        self.num_sent = [0] * self.num_ranks

    def settled(self, rank: int) -> bool:
        r = self.reports[rank]
        return r is not None and (r.num_tokens > 0 or r.num_requests_received >= self.num_sent[rank])

    def on_report(self, report: StepReport) -> list[StepCommand] | None:
        """The commands to send (one per rank), or None while waiting or idle."""
        if report.step_id != self.step_id:
            return None  # a late update for a step already issued (cannot change it any more)
        self.reports[report.rank] = report
        if not all(self.settled(r) for r in range(self.num_ranks)):
            return None
        num_tokens = [r.num_tokens for r in self.reports if r is not None]
        pad_to = max(num_tokens)
        if pad_to == 0:
            return None  # everyone idle: issue nothing
        commands = [StepCommand(step_id=self.step_id, pad_to=pad_to, dummy=n == 0) for n in num_tokens]
        self.step_id += 1
        self.reports = [None] * self.num_ranks
        self.num_steps_issued += 1
        self.num_commands += len(commands)
        self.num_dummy_commands += sum(c.dummy for c in commands)
        return commands


class LoadBalancer:
    def __init__(self, num_ranks: int) -> None:
        self.load: list[tuple[int, float]] = [(0, 0.0)] * num_ranks  # (running + waiting, kv usage)
        self.received = [0] * num_ranks  # AddRequests each rank has reported taking (since its start)
        self.num_routed = [0] * num_ranks  # cumulative, for the metrics
        self.routed_before_start = [0] * num_ranks  # num_routed when the rank last (re)started

    def update(self, r: StepReport) -> None:
        self.load[r.rank] = (r.num_running + r.num_waiting, r.kv_usage)
        self.received[r.rank] = max(self.received[r.rank], r.num_requests_received)

    def restart(self, rank: int) -> None:
        self.load[rank] = (0, 0.0)
        self.received[rank] = 0
        self.routed_before_start[rank] = self.num_routed[rank]

    def pick(self) -> int:
        def key(rank: int) -> tuple[int, float, int]:
            in_flight = self.num_routed[rank] - self.routed_before_start[rank] - self.received[rank]
            return (self.load[rank][0] + in_flight, self.load[rank][1], rank)

        rank = min(range(len(self.load)), key=key)
        self.num_routed[rank] += 1
        return rank


class StatsAggregator:
    """Sums per-rank cumulative counters into rates, one log line per interval."""

    def __init__(self, num_ranks: int) -> None:
        self.latest: list[RankStats | None] = [None] * num_ranks
        self.previous: list[RankStats | None] = [None] * num_ranks
        self.expert: list[ExpertStatsSnapshot | None] = [None] * num_ranks
        self.last_time = time.monotonic()
        self.last_commands = (0, 0)

    def line(self, clock: StepClock | None, now: float) -> str:
        dt = max(now - self.last_time, 1e-9)
        prompt, gen = [], []
        for cur, prev in zip(self.latest, self.previous):
            p0, g0 = (prev.prompt_tokens, prev.generation_tokens) if prev else (0, 0)
            p1, g1 = (cur.prompt_tokens, cur.generation_tokens) if cur else (p0, g0)
            prompt.append((p1 - p0) / dt)
            gen.append((g1 - g0) / dt)
        ranks = [s for s in self.latest if s is not None]
        running = sum(s.num_running for s in ranks)
        waiting = sum(s.num_waiting for s in ranks)
        kv = [s.kv_usage for s in ranks] or [0.0]
        if clock is not None:
            d_cmd = clock.num_commands - self.last_commands[0]
            d_dummy = clock.num_dummy_commands - self.last_commands[1]
            self.last_commands = (clock.num_commands, clock.num_dummy_commands)
        else:
            d_cmd = sum(s.num_steps for s in ranks) - sum(p.num_steps for p in self.previous if p)
            d_dummy = sum(s.num_dummy_steps for s in ranks) - sum(p.num_dummy_steps for p in self.previous if p)
        self.previous = list(self.latest)
        self.last_time = now

        def per_rank(xs: list[float]) -> str:
            return "/".join(f"{x:.1f}" for x in xs)

        kv_mean = 100 * sum(kv) / len(kv)
        return (f"prompt {sum(prompt):.1f} tok/s [{per_rank(prompt)}], generation {sum(gen):.1f} tok/s "
                f"[{per_rank(gen)}], running {running}, waiting {waiting}, KV usage mean {kv_mean:.1f}% "
                f"max {100 * max(kv):.1f}%, dummy steps {100 * d_dummy / max(d_cmd, 1):.1f}%")


class Coordinator:
    def __init__(self, spec: CoordinatorSpec, addrs: Addresses, ctx: zmq.Context | None = None) -> None:
        self.spec = spec
        self.addrs = addrs
        self.ctx = ctx or zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(addrs.to_coordinator)
        self.to_engines = []
        for addr in addrs.to_engines[: spec.num_ranks]:
            sock = self.ctx.socket(zmq.PUSH)
            sock.bind(addr)
            self.to_engines.append(sock)
        self.to_frontend = self.ctx.socket(zmq.PUSH)
        self.to_frontend.setsockopt(zmq.SNDHWM, 16)  # stats only: drop rather than pile up
        self.to_frontend.connect(addrs.to_frontend)
        self.clock = StepClock(spec.num_ranks) if spec.lockstep else None
        self.balancer = LoadBalancer(spec.num_ranks)
        self.stats = StatsAggregator(spec.num_ranks)
        self.ready = [False] * spec.num_ranks
        self.queued: deque[AddRequest] = deque()  # requests that arrived before every rank was ready
        self.num_engine_restarts = 0
        self.outbox: list[deque[bytes]] = [deque() for _ in range(spec.num_ranks)]  # FIFO per rank
        self.running = True
        self.epoch = 0  # the rank group's incarnation (messages.py)
        self.watch = RankWatch(spec.num_ranks, spec.hang_timeout_s)
        self.dead = False  # the ranks cannot come back; the front end has been told

    def _send(self, rank: int, msg: AddRequest | AbortRequest | StepCommand | Shutdown) -> None:
        # never block: a rank that is not connected yet (or died) must not stall the others' clock
        self.outbox[rank].append(encode(msg))
        self._flush(rank)

    def _flush(self, rank: int) -> None:
        box = self.outbox[rank]
        while box:
            try:
                self.to_engines[rank].send(box[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            box.popleft()

    def _route(self, req: AddRequest) -> None:
        rank = self.balancer.pick()
        if self.clock is not None:
            self.clock.num_sent[rank] += 1
        self._send(rank, req)

    def _new_epoch(self, epoch: int) -> None:
        """A new incarnation of the rank group said hello: nothing of the old one survives."""
        budget = "?" if self.spec.max_restarts is None else self.spec.max_restarts
        logger.warning("engine ranks restarted (epoch %d -> %d, restart %d of at most %s): resetting the step "
                       "clock; the front end re-submits the requests in flight", self.epoch, epoch, epoch, budget)
        self.epoch = epoch
        self.num_engine_restarts = max(self.num_engine_restarts + 1, epoch)
        self.ready = [False] * self.spec.num_ranks
        self.watch.reset()
        for box in self.outbox:
            box.clear()  # commands and requests meant for the dead ranks must not reach the new ones
        # requests the front end sent before it knew of this epoch: it re-submits them (no duplicates)
        self.queued = deque(r for r in self.queued if r.epoch >= epoch)
        if self.clock is not None:
            self.clock.reset()
        for r in range(self.spec.num_ranks):
            self.balancer.restart(r)
            self.stats.previous[r] = None
        self.push_stats()  # the front end re-submits now, while the other ranks still start

    def _heard(self, rank: int) -> None:
        if self.watch.heard(rank):
            self.push_stats()

    def check_liveness(self, now: float) -> None:
        if self.watch.check(now, self.ready):
            self.push_stats()

    def check_launcher(self) -> None:
        """Under torchrun the launcher is the agent: when it has exited, no rank will ever come back."""
        pid = self.spec.watch_pid
        if pid is None or self.dead:
            return
        if not process_alive(pid):
            self.fail(f"the engine launcher (pid {pid}) exited: the engine ranks are gone")

    def fail(self, reason: str, level: int = logging.ERROR) -> None:
        logger.log(level, "%s", reason)
        self.dead = True
        self.running = False
        try:
            self.to_frontend.send(encode(EngineDead(reason=reason)), zmq.NOBLOCK)
        except zmq.Again:
            logger.error("could not tell the front end that the engines are gone")

    def push_stats(self) -> None:
        try:
            self.to_frontend.send(encode(self.cluster_stats()), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def handle(self, msg: object) -> None:
        if isinstance(msg, AddRequest):
            if msg.epoch < self.epoch:
                return  # sent before the front end knew of the restart: it re-submits this one itself
            if all(self.ready):
                self._route(msg)
            else:
                self.queued.append(msg)
        elif isinstance(msg, AbortRequest):
            ids = set(msg.request_ids)
            self.queued = deque(r for r in self.queued if r.request_id not in ids)
            for rank in range(self.spec.num_ranks):
                self._send(rank, msg)
        elif isinstance(msg, StepReport):
            if msg.epoch != self.epoch:
                return  # a late report of a dead incarnation
            self._heard(msg.rank)
            self.balancer.update(msg)
            if self.clock is not None:
                commands = self.clock.on_report(msg)
                for rank, cmd in enumerate(commands or []):
                    cmd.epoch = self.epoch
                    self._send(rank, cmd)
        elif isinstance(msg, StatsReport):
            rank = msg.stats.rank
            if msg.epoch < self.epoch:
                return
            if msg.epoch > self.epoch:
                self._new_epoch(msg.epoch)
            elif msg.first and self.ready[rank]:
                # a rank restarted by a launcher that keeps no restart count (no epoch): reset all the same
                logger.warning("engine rank %d restarted: resetting the step clock", rank)
                self.num_engine_restarts += 1
                self.ready = [False] * self.spec.num_ranks
                if self.clock is not None:
                    self.clock.reset()
                for r in range(self.spec.num_ranks):
                    self.balancer.restart(r)
                    self.stats.previous[r] = None
            self._heard(rank)
            if msg.first:
                self.watch.hello(rank, msg.pid, msg.hostname)
            self.stats.latest[rank] = msg.stats
            if msg.expert is not None:
                self.stats.expert[rank] = msg.expert
            if not self.ready[rank]:
                self.ready[rank] = True
                logger.info("engine rank %d ready (%d/%d)", rank, sum(self.ready), self.spec.num_ranks)
                if all(self.ready):
                    self.push_stats()  # healthy again, and the front end learns the epoch now
                    while self.queued:
                        self._route(self.queued.popleft())
        else:
            logger.warning("coordinator: unexpected message %s", type(msg).__name__)

    def cluster_stats(self) -> ClusterStats:
        ranks = [s if s is not None else RankStats(r, 0, 0, 0.0, 0, 0, 0, 0) for r, s in enumerate(self.stats.latest)]
        clock = self.clock
        return ClusterStats(ranks=ranks, healthy=all(self.ready) and not self.watch.any_suspect,
                            num_engine_restarts=self.num_engine_restarts, epoch=self.epoch,
                            num_steps_issued=clock.num_steps_issued if clock else 0,
                            num_dummy_commands=clock.num_dummy_commands if clock else 0,
                            num_requests_routed=list(self.balancer.num_routed),
                            all2all_bytes_sent=[e.all2all_bytes_sent if e else 0 for e in self.stats.expert],
                            all2all_allgather_bytes=[sum(e.all2all_layer_allgather_bytes) if e else 0
                                                     for e in self.stats.expert])

    def tick(self) -> None:
        now = time.monotonic()
        if self.spec.log_stats and any(s is not None for s in self.stats.latest):
            logger.info("%s", self.stats.line(self.clock, now))
        self.push_stats()
        if self.spec.expert_stats_file and any(e is not None for e in self.stats.expert):
            self.write_expert_stats(self.spec.expert_stats_file)

    def write_expert_stats(self, path: str) -> None:
        data = {"num_ranks": self.spec.num_ranks, "steps_issued": self.clock.num_steps_issued if self.clock else None,
                "ranks": [msgspec.to_builtins(e) for e in self.stats.expert if e is not None]}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # a reader never sees half a file

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        next_tick = time.monotonic() + self.spec.log_stats_interval
        next_check = time.monotonic()
        while self.running:
            for rank, sock in enumerate(self.to_engines):
                poller.register(sock, zmq.POLLOUT if self.outbox[rank] else 0)  # 0 = unregister
            timeout_ms = max(0.0, min(next_tick, next_check) - time.monotonic()) * 1e3
            events = dict(poller.poll(timeout_ms))
            if self.pull in events:
                while True:  # drain everything that is there, then look at the clock
                    try:
                        data = self.pull.recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if (msg := decode_or_drop(data.buffer, "coordinator")) is not None:
                        self.handle(msg)
            for rank in range(self.spec.num_ranks):
                self._flush(rank)
            now = time.monotonic()
            if now >= next_check:
                self.check_liveness(now)
                self.check_launcher()
                next_check = now + HEARTBEAT_INTERVAL_S / 4
            if now >= next_tick:
                self.tick()
                next_tick = time.monotonic() + self.spec.log_stats_interval

    def shutdown(self) -> None:
        """Tell every rank to exit after the step it is in (FIFO after any command already sent)."""
        self.running = False
        if not self.dead:  # the front end fails what still waits, instead of waiting forever
            self.fail("the deployment is shutting down", logging.INFO)
        for rank in range(self.spec.num_ranks):
            self._send(rank, Shutdown())
        deadline = time.monotonic() + 2.0
        while any(self.outbox) and time.monotonic() < deadline:
            time.sleep(0.01)
            for rank in range(self.spec.num_ranks):
                self._flush(rank)
        if self.spec.expert_stats_file and any(e is not None for e in self.stats.expert):
            self.write_expert_stats(self.spec.expert_stats_file)


def main(argv: list[str]) -> None:
    """python -m runtime.coordinator SPEC_JSON ADDRESSES_JSON (started by runtime.serve)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s coordinator: %(message)s")
    set_title("moe-rt: coordinator")
    use_secret(secret_from_env())  # the launcher's (messages.py: every frame authenticated)
    spec = msgspec.json.decode(argv[0], type=CoordinatorSpec)
    addrs = msgspec.json.decode(argv[1], type=Addresses)
    coordinator = Coordinator(spec, addrs)

    def stop(signum: int, frame: object) -> None:
        coordinator.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        coordinator.run()
    finally:
        coordinator.shutdown()
        coordinator.ctx.destroy(linger=1000)
    if "torch" in sys.modules:  # the no-GPU promise, checked where it matters
        logger.error("the coordinator imported torch")
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1:])
