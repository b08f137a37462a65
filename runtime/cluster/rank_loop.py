"""One engine rank's process: init the groups, build dispatcher + LLMEngine, then serve the sockets.

Lockstep (EP over 2+ DP ranks: config.needs_lockstep): schedule -> StepReport -> wait for StepCommand (taking
requests meanwhile; an idle rank that gets one schedules again and re-reports the same step) -> execute(pad_to)
-> outputs to the front end.
Free-running (no EP, or a single DP rank): take requests, step, send outputs; report load whenever it changes.
Outputs go straight to the front end; the coordinator only sees reports.
Liveness: a heartbeat thread (runtime/cluster/heartbeat.py) beats every HEARTBEAT_INTERVAL_S, also inside a long
step, with a progress counter that moves between layers: the coordinator tells busy from hung. Between steps
the loop also sends a StatsReport that often, and, while it waits for a command, its step report again (a
restarted coordinator learns the step from it). Every message carries this incarnation's epoch (messages.py).
Under lockstep each command also says how many tokens the next step may schedule (the mixed-step budget).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Protocol

import msgspec
import zmq

from runtime.cluster.heartbeat import HeartbeatThread, Progress, attach_layer_hooks
from runtime.cluster.lookahead import estimate_next_step
from runtime.cluster.procs import (
    StopSignal,
    die_with_parent,
    end_launch,
    exit_now,
    raise_on_stop_signals,
    set_title,
)
from runtime.config import ConfigError, EngineConfig
from runtime.messages import (
    HEARTBEAT_INTERVAL_S,
    AbortRequest,
    AddRequest,
    Addresses,
    OutputBatch,
    RankStats,
    Shutdown,
    StatsReport,
    StepCommand,
    StepReport,
    Sync,
    TokenDelta,
    decode_or_drop,
    encode,
    secret_from_env,
    use_secret,
)

logger = logging.getLogger("runtime.cluster.rank_loop")


class SteppedEngine(Protocol):  # what a rank loop steps: LLMEngine, or the tests' fakes
    def add_request(self, req: AddRequest) -> None: ...
    def abort_requests(self, ids: list[str]) -> None: ...
    def has_unfinished(self) -> bool: ...
    def schedule(self) -> int: ...
    def execute(self, pad_to: int | None = None) -> list[TokenDelta]: ...
    def stats(self) -> RankStats: ...
    def padded_size(self, num_tokens: int) -> int: ...


class _Stop(Exception):
    pass


class RankLoop:
    def __init__(self, engine: SteppedEngine, rank: int, addrs: Addresses, lockstep: bool, stats_interval: float = 5.0,
                 expert_stats: Any = None, ctx: zmq.Context | None = None, epoch: int = 0,
                 lookahead: bool = False) -> None:
        self.engine = engine
        self.lookahead = lookahead  # runtime/cluster/lookahead.py (lockstep only)
        self.next_budget = 0  # the last command's next_token_budget
        self.rank = rank
        self.epoch = epoch  # the rank group's incarnation: the elastic launcher's restart count
        self.lockstep = lockstep
        self.stats_interval = stats_interval
        self.expert_stats = expert_stats  # runtime.distributed.expert_stats.ExpertStats or None
        self.ctx = ctx or zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.connect(addrs.to_engines[rank])
        self.to_coordinator = self.ctx.socket(zmq.PUSH)
        self.to_coordinator.connect(addrs.to_coordinator)
        self.to_frontend = self.ctx.socket(zmq.PUSH)
        self.to_frontend.setsockopt(zmq.SNDHWM, 0)  # outputs are never dropped
        self.to_frontend.connect(addrs.to_frontend)
        self.num_requests_received = 0
        self.next_stats = time.monotonic()
        self.next_heartbeat = time.monotonic()
        self.last_load: tuple[int, int, int] | None = None
        self.step_id = 0
        self.progress = Progress()
        model = getattr(engine, "model", None)
        if model is not None:
            attach_layer_hooks(model, self.progress)
        self.heartbeat = HeartbeatThread(self.ctx, addrs.to_coordinator, rank, epoch, self.progress)
        self.num_decode_tokens = 0  # of the planned step

    # ---- messages ----
    def _handle(self, msg: object) -> StepCommand | None:
        if isinstance(msg, AddRequest):
            if msg.epoch < self.epoch:
                # routed before the coordinator saw this incarnation: the front end re-submits it, so taking
                # it too would run the request twice
                logger.info("rank %d: dropped request %s of epoch %d", self.rank, msg.request_id, msg.epoch)
                return None
            self.num_requests_received += 1
            if msg.resend and msg.request_id in getattr(self.engine, "requests", ()):
                return None  # re-sent after a coordinator restart, and it had reached this rank: already running
            try:
                self.engine.add_request(msg)
            except ValueError as e:  # the engine's RequestError: tell the client, keep serving
                logger.warning("rank %d: request %s rejected: %s", self.rank, msg.request_id, e)
                self._send_outputs([TokenDelta(request_id=msg.request_id, new_token_ids=[], finish_reason="abort",
                                               error=str(e))])
        elif isinstance(msg, AbortRequest):
            # safe between schedule() and execute(): the engine drops aborted sequences and keeps the padding
            self.engine.abort_requests(msg.request_ids)
        elif isinstance(msg, Shutdown):
            raise _Stop
        elif isinstance(msg, Sync):
            self._maybe_send_stats(force=True, synced=True)
        elif isinstance(msg, StepCommand):
            if msg.epoch != self.epoch:
                logger.warning("rank %d: ignored a step command of epoch %d (this is %d)", self.rank, msg.epoch,
                               self.epoch)
                return None
            return msg
        else:
            logger.warning("rank %d: unexpected message %s", self.rank, type(msg).__name__)
        return None

    def _recv(self, timeout_s: float | None) -> object | None:
        """One message, waiting up to timeout_s (None = forever, 0 = no wait)."""
        if timeout_s is None or timeout_s > 0:
            ms = -1 if timeout_s is None else max(1, int(timeout_s * 1e3))
            if not self.pull.poll(ms):
                return None
        elif not self.pull.get(zmq.EVENTS) & zmq.POLLIN:  # nothing queued: no raised zmq.Again on every step
            return None
        try:
            data = self.pull.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return decode_or_drop(data.buffer, f"rank {self.rank}")  # None (dropped) reads as 'no message'

    def _send_outputs(self, outputs: list[TokenDelta]) -> None:
        if outputs:
            self.to_frontend.send(encode(OutputBatch(rank=self.rank, outputs=outputs, epoch=self.epoch)), copy=False)

    def _schedule(self) -> int:
        num_tokens = self.engine.schedule()
        planned = getattr(self.engine, "planned", None)
        self.num_decode_tokens = sum(n == 1 for n in planned.num_new_tokens) if planned is not None else 0
        return num_tokens

    def _report(self, num_tokens: int, is_decode: bool = False, step_id: int | None = None) -> None:
        s = self.engine.stats()
        self.last_load = (s.num_running, s.num_waiting, self.num_requests_received)
        self.to_coordinator.send(encode(StepReport(
            rank=self.rank, step_id=self.step_id if step_id is None else step_id, num_tokens=num_tokens,
            is_decode=is_decode,
            num_running=s.num_running, num_waiting=s.num_waiting, kv_usage=s.kv_usage,
            num_requests_received=self.num_requests_received, epoch=self.epoch,
            num_decode_tokens=self.num_decode_tokens if num_tokens else 0)))

    def _set_token_budget(self, num_tokens: int) -> None:
        scheduler = getattr(self.engine, "scheduler", None)
        if scheduler is not None:
            scheduler.step_token_budget = num_tokens

    def _maybe_send_stats(self, force: bool = False, first: bool = False, synced: bool = False) -> bool:
        """True if it sent one (a heartbeat is due)."""
        now = time.monotonic()
        full = force or now >= self.next_stats
        if not full and now < self.next_heartbeat:
            return False
        self.next_heartbeat = now + HEARTBEAT_INTERVAL_S
        expert = None
        if full:  # the expert snapshot reads device counters: only at the stats interval, not every heartbeat
            self.next_stats = now + self.stats_interval
            expert = self.expert_stats.snapshot(self.rank) if self.expert_stats is not None else None
        # where the rank runs, every time: a restarted coordinator must be able to kill a hung rank too
        self.to_coordinator.send(encode(StatsReport(stats=self.engine.stats(), expert=expert, first=first,
                                                    epoch=self.epoch, pid=os.getpid(), hostname=socket.gethostname(),
                                                    num_requests_received=self.num_requests_received, synced=synced,
                                                    request_ids=list(getattr(self.engine, "requests", ()))
                                                    if synced else [])))
        return True

    def _until_stats(self) -> float:
        return max(0.0, min(self.next_stats, self.next_heartbeat) - time.monotonic())

    def _execute(self, num_real_tokens: int, pad_to: int | None, on_launched: Any = None) -> None:
        t0 = self.expert_stats.begin_step() if self.expert_stats is not None else None
        # the batch, not its ids: the heartbeat thread lists them only when it beats (once a second)
        self.progress.begin(self.step_id, getattr(self.engine, "planned", None), num_real_tokens)
        try:
            if on_launched is None:
                outputs = self.engine.execute(pad_to=pad_to)
            else:
                outputs = self.engine.execute(pad_to=pad_to, on_launched=on_launched)  # type: ignore[call-arg]
        finally:
            self.progress.end()
        if self.expert_stats is not None:
            self.expert_stats.end_step(t0)
        self._send_outputs(outputs)

    def _agreed_size(self, pad_to: int) -> int:
        """The token count every EP rank really runs: a decode rank replays the CUDA graph of bucket(pad_to),
        so a rank running eagerly (prefill, dummy) must pad to that bucket too, or the all2all sizes differ.
        Every rank has the same graph sizes (same config), so all round alike."""
        return self.engine.padded_size(pad_to)

    # ---- loops ----
    def run(self) -> None:
        self._maybe_send_stats(force=True, first=True)  # the coordinator's "ready"
        self.heartbeat.start()
        try:
            if self.lockstep and self.lookahead:
                self._run_lookahead()
            elif self.lockstep:
                self._run_lockstep()
            else:
                self._run_free()
        except _Stop:
            logger.info("rank %d: shutdown", self.rank)
        finally:
            self.heartbeat.stop()
            self.ctx.destroy(linger=2000)

    def _run_lockstep(self) -> None:
        while True:
            while (msg := self._recv(0)) is not None:
                if self._handle(msg) is not None:
                    raise RuntimeError(f"rank {self.rank}: a StepCommand arrived before this rank reported")
            num_tokens = self._schedule()
            if num_tokens == 0 and getattr(self.engine, "step_pending", False):
                # async scheduling: nothing follows the step in flight, and an idle group issues no step that
                # would read its tokens: read them now
                self._send_outputs(self.engine.drain())  # type: ignore[attr-defined]
                num_tokens = self._schedule()
            self._report(num_tokens)
            cmd = None
            while cmd is None:
                if self._maybe_send_stats():
                    self._report(num_tokens)  # again: a coordinator that restarted meanwhile needs it
                msg = self._recv(self._until_stats())
                if msg is None:
                    continue
                received = self.num_requests_received
                cmd = self._handle(msg)
                if cmd is None and num_tokens == 0 and self.num_requests_received != received:
                    # woken while idle: plan again and tell the coordinator (same step id)
                    num_tokens = self._schedule()
                    self._report(num_tokens)
            if cmd.step_id != self.step_id:
                raise RuntimeError(f"rank {self.rank}: got the command of step {cmd.step_id}, "
                                   f"expected {self.step_id}")
            if cmd.dummy and num_tokens > 0:
                raise RuntimeError(f"rank {self.rank}: told to run a dummy step with {num_tokens} tokens planned")
            self._execute(num_tokens, self._agreed_size(cmd.pad_to))
            self._set_token_budget(cmd.next_token_budget)
            self.step_id += 1
            self._maybe_send_stats()

    def _estimate(self, batch: Any) -> int:
        num_tokens, self.num_decode_tokens = estimate_next_step(self.engine.scheduler, batch,  # type: ignore[attr-defined]
                                                                self.next_budget)
        return num_tokens

    def _run_lookahead(self) -> None:
        """Lockstep with the next plan reported while the device runs this step (runtime/cluster/lookahead.py): the
        reports are estimates; the rank schedules once the command is there, within its pad_to."""
        scheduler = self.engine.scheduler  # type: ignore[attr-defined]
        cmd: StepCommand | None = None
        reported: int | None = None  # the estimate last sent for self.step_id
        while True:
            while (msg := self._recv(0)) is not None:
                cmd = self._handle(msg) or cmd  # the command may be here already: it was sent during the step
            if cmd is None and (estimate := self._estimate(None)) != reported:
                self._report(estimate)  # less to do than estimated, or woken by a request: same step id
                reported = estimate
            while cmd is None:
                if self._maybe_send_stats():
                    self._report(reported or 0)  # again: a coordinator that restarted meanwhile needs it
                msg = self._recv(self._until_stats())
                if msg is None:
                    continue
                cmd = self._handle(msg)
                if cmd is None and (estimate := self._estimate(None)) != reported:
                    self._report(estimate)
                    reported = estimate
            if cmd.step_id != self.step_id:
                raise RuntimeError(f"rank {self.rank}: got the command of step {cmd.step_id}, "
                                   f"expected {self.step_id}")
            # never more than every rank agreed on; what does not fit waits for the next step
            scheduler.step_token_budget = min(self.next_budget or cmd.pad_to, cmd.pad_to)
            num_tokens = self._schedule()
            planned = getattr(self.engine, "planned", None)
            self.next_budget = cmd.next_token_budget
            pad_to = self._agreed_size(cmd.pad_to)
            cmd = None

            def report_next(batch: Any = planned) -> None:
                nonlocal reported
                reported = self._estimate(batch)
                self._report(reported, step_id=self.step_id + 1)

            self._execute(num_tokens, pad_to, on_launched=report_next)
            self.step_id += 1
            self._maybe_send_stats()

    def _run_free(self) -> None:
        while True:
            busy = self.engine.has_unfinished()
            msg = self._recv(0 if busy else self._until_stats())
            while msg is not None:
                self._handle(msg)
                msg = self._recv(0)
            if self.engine.has_unfinished():
                num_tokens = self.engine.schedule()
                if num_tokens or getattr(self.engine, "step_pending", False):  # async scheduling: read its tokens
                    self._execute(num_tokens, None)
                    self.step_id += 1
            s = self.engine.stats()
            if (s.num_running, s.num_waiting, self.num_requests_received) != self.last_load:
                self._report(0)
            self._maybe_send_stats()


def build_engine(config: EngineConfig, parallel: Any, timed: bool = False) -> tuple[Any, Any]:
    """LLMEngine with this rank's dispatcher and expert statistics (None for a dense model)."""
    from runtime.distributed.backends import make_backend
    from runtime.distributed.expert_stats import ExpertStats
    from runtime.engine.llm_engine import LLMEngine

    info = config.model_info()
    if info.num_experts == 0:
        return LLMEngine(config, parallel), None
    stats = ExpertStats(info.num_moe_layers, info.num_experts, parallel.device, timed=timed,
                        max_tokens=config.max_num_batched_tokens)
    dispatcher = make_backend(config, parallel, info.num_experts, stats)
    engine = LLMEngine(config, parallel, dispatcher)
    stats.attach_timers(engine.model)
    return engine, stats


def engine_main(config_json: str, addrs_json: str) -> None:
    """Entry of one rank (torchrun worker or elastic-launcher worker); the env says which rank and which
    incarnation of the group this is (TORCHELASTIC_RESTART_COUNT, the same on every rank)."""
    from runtime.distributed.config_agreement import check_group_agreement
    from runtime.distributed.parallel import destroy_parallel, init_parallel

    # the launcher's death (kill -9 included) takes this rank with it; Ctrl-C / SIGTERM end it at once with a
    # non-zero code (returning normally would leave the elastic worker waiting for an agent that is stopping)
    die_with_parent()
    raise_on_stop_signals()
    use_secret(secret_from_env())  # the deployment's, from the launcher (messages.py)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = msgspec.json.decode(config_json, type=EngineConfig)
    addrs = msgspec.json.decode(addrs_json, type=Addresses)
    try:
        parallel = init_parallel(config)
    except StopSignal as stop:
        raise SystemExit(stop.exit_code) from None
    set_title(engine_title(parallel))
    stopped: StopSignal | None = None
    try:
        # before the model's first collective: refuse settings that would make the ranks' collectives differ
        # only TP rank 0 reports statistics, so only it times its steps
        timed = config.expert_stats_file is not None and parallel.is_tp_leader
        try:
            check_group_agreement(config, parallel)
            engine, expert_stats = build_engine(config, parallel, timed=timed)
        except ConfigError as e:  # one line, no traceback, and no restart: it would fail the same way
            end_launch(f"rank {parallel.rank}: {e}")
        if not parallel.is_tp_leader:  # a TP peer: no sockets, it runs the plans its TP rank 0 broadcasts
            engine.runner.follow(tp_follower_stats(expert_stats, parallel),
                                 expert_stats.counters if expert_stats is not None else None)
            return
        if expert_stats is not None and parallel.is_ep and parallel.tp_size > 1:
            expert_stats.merge = engine.runner.sum_over_tp  # report the whole engine's routing, not one slice
        engine.scheduler.mixed_step_token_budget = config.mixed_step_token_budget  # served ranks only
        interval = 1e9 if config.disable_log_stats and not config.expert_stats_file else config.log_stats_interval
        epoch = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        RankLoop(engine, parallel.dp_rank, addrs, lockstep=config.needs_lockstep, stats_interval=interval,
                   expert_stats=expert_stats, epoch=epoch, lookahead=config.lockstep_lookahead).run()
        engine.runner.stop_followers()
    except StopSignal as stop:
        logger.info("rank %d: %s, exiting", parallel.rank, stop)
        stopped = stop
    except Exception:
        # the peers may be waiting in this rank's collectives: a collective teardown could hang (and on the GPU a
        # sync with them does); the launcher restarts the group from the exit code
        logger.exception("rank %d failed", parallel.rank)
        exit_now(1)
    finally:
        if stopped is None:  # after a stop signal the peers are going too: a collective teardown could hang
            destroy_parallel()
    if stopped is not None:
        raise SystemExit(stopped.exit_code)


def engine_title(parallel: Any) -> str:
    """'moe-rt: engine DP1 EP1 (GPU 1)': who is who in ps, top and nvidia-smi."""
    ep = f" EP{parallel.ep_rank}" if parallel.is_ep else ""
    tp = f" TP{parallel.tp_rank}" if parallel.tp_size > 1 else ""
    device = parallel.device
    where = f"GPU {device.index}" if device.type == "cuda" else device.type.upper()
    return f"moe-rt: engine DP{parallel.dp_rank}{tp}{ep} ({where})"


def tp_follower_stats(expert_stats: Any, parallel: Any) -> Any:
    """A TP peer's per-step hook: start its expert statistics' step, as TP rank 0's rank loop does (padding
    rows are masked inside the MoE layer, so no row count is needed)."""
    if expert_stats is None:
        return None

    def before_step(plan: Any, rows_run: int) -> None:
        expert_stats.begin_step()

    return before_step
