"""The DP coordinator: its own process, no GPU (never imports torch). Routes requests, clocks EP steps.

Routing (runtime/cluster/router.py): an explicit data_parallel_rank, else expected prefix-cache hits against load
(running + waiting + requests sent but not yet seen in a report), ties rotated. Aborts go to every rank (a
rank ignores ids it does not hold).

Lockstep (expert parallel): every rank schedules and sends StepReport(step_id, num_tokens). Once every rank
has reported for the current step, and each report is current (it has seen every request sent to that rank,
or already has work), the coordinator answers all ranks StepCommand(pad_to=max, dummy=(its tokens == 0)).
When every rank reports 0 it answers nothing: the ranks sit in recv and the GPUs go quiet. A new request
wakes its rank, which schedules again and sends a fresh report for the same step.

Mixed steps: while any rank decodes, every command carries next_token_budget = mixed_step_token_budget, the
most tokens a rank may schedule for its next step; so one rank's long prefill goes in chunks of that size, in
step with the others, and nobody's decode waits behind (or is padded to) a whole long prompt.

Free-running ranks (dense model, or DP without EP) only send reports for the load figures.

Restarts: the elastic launcher restarts the whole rank group when one rank dies; the new ranks say hello
with a higher epoch. The coordinator then forgets everything of the old incarnation (clock, queued commands,
requests routed to it: the front end re-submits those) and drops any message of an older epoch. Silent and
hung ranks: runtime/cluster/rank_watch.py. Once the launcher itself is gone, the front end is told (EngineDead).

A restarted coordinator (kill -9; the launcher starts a new one) knows nothing: it adopts the ranks' epoch,
request counts and step id from their heartbeats and re-sent step reports, and gets a new coordinator_id so
the front end re-sends the requests that may have died with the old one (ranks ignore ids they hold).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from collections import deque

import msgspec
import zmq

from runtime.cluster.coordinator_stats import StatsAggregator
from runtime.cluster.procs import set_title
from runtime.cluster.rank_watch import RankWatch, process_alive
from runtime.cluster.router import Router
from runtime.messages import (
    HEARTBEAT_INTERVAL_S,
    AbortRequest,
    AddRequest,
    Addresses,
    ClusterStats,
    EngineDead,
    Heartbeat,
    RankHung,
    RankStats,
    Shutdown,
    StatsReport,
    StepCommand,
    StepReport,
    Sync,
    decode_or_drop,
    encode,
    secret_from_env,
    use_secret,
)

logger = logging.getLogger("runtime.cluster.coordinator")


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
    routing: str = "prefix"  # runtime/cluster/router.py: "prefix" (cache hits against load) or "load"
    block_size: int = 16  # the ranks' KV block size: the router hashes prompts in the same blocks
    mixed_step_token_budget: int = 0  # lockstep: tokens per rank per step while any rank decodes (0: no cap)


class StepClock:
    """Lockstep bookkeeping, free of sockets so it can be tested alone."""

    def __init__(self, num_ranks: int, mixed_step_token_budget: int = 0) -> None:
        self.num_ranks = num_ranks
        self.mixed_step_token_budget = mixed_step_token_budget
        self.step_id = 0
        self.fresh = True  # nothing issued since (re)start: a rank's step id may be adopted
        self.reports: list[StepReport | None] = [None] * num_ranks
        self.num_sent = [0] * num_ranks  # AddRequests sent to each rank
        self.num_steps_issued = 0
        self.num_dummy_commands = 0  # (step, rank) pairs that ran a dummy
        self.num_commands = 0

    def reset(self) -> None:
        """The ranks restarted (elastic launcher): their step ids begin again at 0, nothing is in flight."""
        self.step_id = 0
        self.fresh = True
        self.reports = [None] * self.num_ranks
        self.num_sent = [0] * self.num_ranks

    def settled(self, rank: int) -> bool:
        r = self.reports[rank]
        return r is not None and (r.num_tokens > 0 or r.num_requests_received >= self.num_sent[rank])

    def on_report(self, report: StepReport) -> list[StepCommand] | None:
        """The commands to send (one per rank), or None while waiting or idle."""
        if report.step_id != self.step_id:
            if not (self.fresh and report.step_id > self.step_id):
                return None  # a late update for a step already issued (cannot change it any more)
            # a restarted coordinator meets ranks in the middle of their run: take up their step count
            self.step_id = report.step_id
            self.reports = [None] * self.num_ranks
        self.reports[report.rank] = report
        if not all(self.settled(r) for r in range(self.num_ranks)):
            return None
        num_tokens = [r.num_tokens for r in self.reports if r is not None]
        pad_to = max(num_tokens)
        if pad_to == 0:
            return None  # everyone idle: issue nothing
        # someone decodes: cap everybody's next step so a long prefill goes in chunks between its tokens
        decoding = any(r is not None and r.num_decode_tokens > 0 for r in self.reports)
        budget = self.mixed_step_token_budget if decoding else 0
        commands = [StepCommand(step_id=self.step_id, pad_to=pad_to, dummy=n == 0, next_token_budget=budget)
                    for n in num_tokens]
        self.step_id += 1
        self.fresh = False
        self.reports = [None] * self.num_ranks
        self.num_steps_issued += 1
        self.num_commands += len(commands)
        self.num_dummy_commands += sum(c.dummy for c in commands)
        return commands


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
        self.clock = StepClock(spec.num_ranks, spec.mixed_step_token_budget) if spec.lockstep else None
        self.balancer = Router(spec.num_ranks, spec.routing, spec.block_size)
        self.stats = StatsAggregator(spec.num_ranks)
        self.ready = [False] * spec.num_ranks
        self.queued: deque[AddRequest] = deque()  # requests that arrived before every rank was ready
        self.num_engine_restarts = 0
        self.outbox: list[deque[bytes]] = [deque() for _ in range(spec.num_ranks)]  # FIFO per rank
        self.running = True
        self.epoch = 0  # the rank group's incarnation (messages.py)
        self.watch = RankWatch(spec.num_ranks, spec.hang_timeout_s, lockstep=spec.lockstep)
        self.dead = False  # the ranks cannot come back; the front end has been told
        self.coordinator_id = random.getrandbits(31) + 1  # this process: a new one means a coordinator restart
        self.fresh = True  # no rank heard yet: the ranks' epoch is adopted, not taken for a restart
        # request ids each rank held when it answered our Sync: a re-sent request that reached a rank before
        # the old coordinator died must not start a second time elsewhere
        self.held: list[set[str]] = [set() for _ in range(spec.num_ranks)]
        for rank in range(spec.num_ranks):
            self._send(rank, Sync())  # new ranks answer with their hello anyway; running ranks need this

    def _send(self, rank: int, msg: AddRequest | AbortRequest | StepCommand | Shutdown | Sync) -> None:
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
        if req.resend and any(req.request_id in ids for ids in self.held):
            return  # it runs already
        rank = self.balancer.pick(req.prompt_token_ids, req.data_parallel_rank)
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
            self.stats.forget(r)
        self.push_stats()  # the front end re-submits now, while the other ranks still start

    def _heard(self, rank: int) -> None:
        if self.watch.heard(rank):
            self.push_stats()

    def check_liveness(self, now: float) -> None:
        changed, killed = self.watch.check(now, self.ready)
        if killed is not None:
            try:  # before the new epoch: the front end must not re-submit these blindly
                hung = RankHung(rank=killed.rank, epoch=self.epoch, request_ids=killed.request_ids,
                                reason=killed.reason)
                self.to_frontend.send(encode(hung), zmq.NOBLOCK)
            except zmq.Again:
                logger.error("could not tell the front end which requests hung")
        if changed:
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
        elif isinstance(msg, Heartbeat):
            if msg.epoch == self.epoch and self.watch.beat(msg):
                self.push_stats()
        elif isinstance(msg, StatsReport):
            rank = msg.stats.rank
            if msg.epoch < self.epoch:
                return
            if self.fresh:
                self.fresh = False
                if msg.epoch > self.epoch:  # this coordinator restarted: the ranks are not new, it is
                    logger.info("coordinator (re)started: the engine ranks are at epoch %d", msg.epoch)
                    self.epoch = msg.epoch
                    self.num_engine_restarts = msg.epoch
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
                    self.stats.forget(r)
            self._heard(rank)
            self.watch.hello(rank, msg.pid, msg.hostname)
            self.stats.latest[rank] = msg.stats
            if msg.expert is not None:
                self.stats.expert[rank] = msg.expert
            if msg.synced:
                self.held[rank] = set(msg.request_ids)
            # a rank that was running before this coordinator started is ready once it answered Sync
            if not self.ready[rank] and (msg.first or msg.synced):
                self.ready[rank] = True
                # count from what the rank has taken so far (0 for a new rank; more when this coordinator restarted)
                self.balancer.adopt(rank, msg.num_requests_received)
                if self.clock is not None:
                    self.clock.num_sent[rank] = msg.num_requests_received
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
                                                     for e in self.stats.expert],
                            all2all_overflow_reruns=[e.all2all_overflow_reruns if e else 0
                                                     for e in self.stats.expert],
                            coordinator_id=self.coordinator_id)

    def tick(self) -> None:
        now = time.monotonic()
        if self.spec.log_stats and any(s is not None for s in self.stats.latest):
            logger.info("%s", self.stats.line(self.clock, now))
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
        next_check = next_push = time.monotonic()
        while self.running:
            for rank, sock in enumerate(self.to_engines):
                poller.register(sock, zmq.POLLOUT if self.outbox[rank] else 0)  # 0 = unregister
            timeout_ms = max(0.0, min(next_tick, next_check, next_push) - time.monotonic()) * 1e3
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
            if now >= next_push:  # at least every second, not only every --log-stats-interval: a restarted front
                # end (or /health after a rank went down) knows where the deployment stands within a second
                self.push_stats()
                next_push = now + min(HEARTBEAT_INTERVAL_S, self.spec.log_stats_interval)
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
        # a rank of this incarnation whose process has exited (the launcher stops the ranks before the control
        # plane) never takes its message: waiting for it would only spend the whole deadline
        waiting = [rank for rank in range(self.spec.num_ranks) if not self._exited(rank)]
        deadline = time.monotonic() + 2.0
        while any(self.outbox[rank] for rank in waiting) and time.monotonic() < deadline:
            time.sleep(0.01)
            for rank in range(self.spec.num_ranks):
                self._flush(rank)
        if self.spec.expert_stats_file and any(e is not None for e in self.stats.expert):
            self.write_expert_stats(self.spec.expert_stats_file)

    def _exited(self, rank: int) -> bool:
        """The rank said hello in this incarnation (ready), from this host, and its process is gone."""
        pid, host = self.watch.where[rank]
        return self.ready[rank] and pid > 0 and host == self.watch.hostname and not process_alive(pid)


def main(argv: list[str]) -> None:
    """python -m runtime.cluster.coordinator SPEC_JSON ADDRESSES_JSON (started by runtime.serve)."""
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
