"""The API server's side of the sockets: submits requests to the coordinator, routes engine outputs
back to the HTTP request that waits for them, aborts what nobody waits for any more."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq

from runtime.messages import (
    AbortRequest,
    AddRequest,
    Addresses,
    ClusterStats,
    EngineDead,
    OutputBatch,
    RankHung,
    TokenDelta,
    decode,
    encode,
)
from runtime.sampling_params import SamplingParams
from server.protocol import APIError

log = logging.getLogger(__name__)

READ_BURST = 64  # engine messages handled in one turn of the event loop, before the streams get theirs


@dataclass
class InFlight:
    """What the front end remembers of one engine request: enough to re-submit it after an engine
    restart (prompt, params, tokens so far) and to route its outputs."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    group: RequestGroup
    arrival_time: float
    generated_token_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    epoch: int = 0  # the rank-group incarnation it was last submitted to
    data_parallel_rank: int | None = None
    num_hangs: int = 0  # times a rank was killed for a hang while this request was in its step


class RequestGroup:
    """The engine requests behind one HTTP request (n choices x prompts); their outputs share one
    queue, so the handler reads one stream. client.release(group) aborts whatever is unfinished: that is
    how a disconnected client frees its KV blocks."""

    def __init__(self, client: EngineClient, request_ids: list[str]) -> None:
        self.client = client
        self.request_ids = request_ids
        self.unfinished = set(request_ids)
        self.queue: asyncio.Queue[TokenDelta] = asyncio.Queue()

    async def next_batch(self) -> list[TokenDelta]:
        """Every output that is waiting (at least one): when the front end lags behind the engines
        it then sends one larger chunk per choice instead of falling further behind."""
        deltas = [await self.queue.get()]
        while not self.queue.empty():
            deltas.append(self.queue.get_nowait())
        for delta in deltas:
            if delta.finish_reason is not None:
                self.unfinished.discard(delta.request_id)
        for delta in deltas:
            if delta.error is not None:
                if delta.request_id in self.client.hung:
                    raise APIError(delta.error, status_code=500, type="server_error", code="engine_hang")
                if self.client.dead is not None:
                    raise APIError(
                        f"the engine is unavailable: {delta.error}",
                        status_code=503,
                        type="server_error",
                        code="engine_unavailable",
                    )
                raise APIError(f"the engine refused the request: {delta.error}", code="rejected_by_engine")
        return deltas

    def finish(self, request_id: str) -> None:
        """The front end ended this request itself (a stop string): tell the engine to drop it."""
        if request_id in self.unfinished:
            self.unfinished.discard(request_id)
            self.client.abort([request_id])

    @property
    def done(self) -> bool:
        return not self.unfinished


class EngineClient:
    def __init__(
        self, addrs: Addresses, max_queue_len: int, on_stats: Callable[[ClusterStats], None] | None = None
    ) -> None:
        self.addrs = addrs
        self.max_queue_len = max_queue_len
        self.on_stats = on_stats
        self.in_flight: dict[str, InFlight] = {}
        self.num_waiting_first_token = 0  # the front end's queue: admitted, no output yet
        self.stats: ClusterStats | None = None
        self.stats_time = 0.0
        self.num_resubmitted = 0
        self.epoch = 0  # the newest rank-group incarnation seen (messages.py): outputs of older ones are dropped
        self.num_restarts_seen = 0
        self.num_stale_outputs = 0  # outputs of a dead incarnation, dropped
        self.dead: str | None = None  # why the engine ranks are gone for good
        self.coordinator_id = 0  # of the coordinator process last heard; a new one may have lost requests
        self.hung: set[str] = set()  # requests failed for taking ranks down twice (their error is a 500)
        self.num_failed_hung = 0
        self.on_fatal: Callable[[str, int], None] | None = None  # (reason, number of requests it failed)
        self._ctx: zmq.Context | None = None
        self._push: zmq.Socket | None = None
        self._pull: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # the output reader is registered with the event loop

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)  # never make an engine block on a slow front end
        self._pull.bind(self.addrs.to_frontend)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self.addrs.to_coordinator)
        # outputs are read in a reader callback of the event loop, not by awaiting zmq.asyncio's recv: that made a
        # future and two epoll changes per message (one per token at concurrency 1)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._pull.getsockopt(zmq.FD), self._on_readable)
        self._reading = True
        self._loop.call_soon(self._on_readable)  # what arrived before the reader was added

    async def close(self) -> None:
        if self._reading and self._loop is not None and self._pull is not None:
            self._loop.remove_reader(self._pull.getsockopt(zmq.FD))
        self._reading = False
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()

    def health(self, stale_after: float) -> str:
        """'ok', 'starting' (no engine has reported yet), 'degraded' (a rank down or restarting, or the
        coordinator silent for stale_after seconds) or 'failed' (the ranks are gone for good)."""
        if self.dead is not None:
            return "failed"
        if not self._reading:
            return "degraded"
        if self.stats is None:
            return "starting"
        if not self.stats.healthy or time.time() - self.stats_time > stale_after:
            return "degraded"
        return "ok"

    # ------------------------------------------------------------ requests

    def open(
        self, requests: list[tuple[str, list[int], SamplingParams]], data_parallel_rank: int | None = None
    ) -> RequestGroup:
        """Admits and submits a group of engine requests; 503 when the queue is full or the engines are gone.
        While the ranks restart, requests wait in the coordinator's queue (bounded here as always)."""
        if self.dead is not None:
            raise APIError(
                f"the engine is unavailable: {self.dead}",
                status_code=503,
                type="server_error",
                code="engine_unavailable",
            )
        if len(requests) > self.max_queue_len:  # it would never fit: waiting cannot help, so not a 503
            raise APIError(
                f"this request needs {len(requests)} engine requests (prompts x n), more than the queue holds "
                f"(--max-queue-len {self.max_queue_len}); send fewer prompts or choices per request",
                param="prompt",
                code="too_many_prompts",
            )
        if self.num_waiting_first_token + len(requests) > self.max_queue_len:
            raise APIError(
                f"server busy: {self.num_waiting_first_token} requests already wait for the engine "
                f"(--max-queue-len {self.max_queue_len}); retry later",
                status_code=503,
                type="server_busy",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        num_ranks = len(self.addrs.to_engines)
        if data_parallel_rank is not None and not 0 <= data_parallel_rank < num_ranks:
            raise APIError(
                f"data_parallel_rank: {data_parallel_rank} is out of range; this deployment has "
                f"{num_ranks} data-parallel rank(s): 0..{num_ranks - 1}",
                param="data_parallel_rank",
            )
        group = RequestGroup(self, [rid for rid, _, _ in requests])
        now = time.time()
        try:
            for rid, prompt_ids, params in requests:
                self.in_flight[rid] = InFlight(
                    rid, prompt_ids, params, group, now, epoch=self.epoch, data_parallel_rank=data_parallel_rank
                )
                self.num_waiting_first_token += 1
                self._send(
                    AddRequest(
                        request_id=rid,
                        prompt_token_ids=prompt_ids,
                        params=params,
                        arrival_time=now,
                        epoch=self.epoch,
                        data_parallel_rank=data_parallel_rank,
                    )
                )
        except BaseException:
            # nothing between admission and the send may keep a queue slot: a leak per failure would end in a
            # server that answers 503 forever; the engine drops aborts of ids it never got
            self.release(group)
            raise
        return group

    def resubmit_in_flight(self, older_than: int | None = None) -> int:
        """After the engine ranks restarted (their requests are gone): send every unfinished request
        again as prompt + tokens so far. num_generated_before keeps max_tokens, min_tokens and the
        seeded random stream counting from where they were, so the answer continues seamlessly.
        older_than: only those last submitted to an incarnation before it (the others reach the new one)."""
        lost = [r for r in self.in_flight.values() if older_than is None or r.epoch < older_than]
        for req in lost:
            req.epoch = self.epoch
            self._send(
                AddRequest(
                    request_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids + req.generated_token_ids,
                    params=req.params,
                    arrival_time=req.arrival_time,
                    num_generated_before=len(req.generated_token_ids),
                    epoch=self.epoch,
                    data_parallel_rank=req.data_parallel_rank,
                )
            )
        self.num_resubmitted += len(lost)
        log.warning("engine ranks restarted (epoch %d): re-submitted %d requests in flight", self.epoch, len(lost))
        return len(lost)

    def _new_epoch(self, epoch: int) -> None:
        """A new incarnation of the ranks exists (told by the coordinator or seen on an output): from now
        on its predecessor's outputs are stale, and every request sent to the predecessor is re-sent."""
        self.epoch = epoch
        self.num_restarts_seen = max(self.num_restarts_seen, epoch)
        self.resubmit_in_flight(older_than=epoch)

    def _coordinator_restarted(self) -> None:
        """A new coordinator process: requests it had queued, or that were on their way through it, are lost.
        Those with no output yet are sent again, marked resend (the one that reached a rank is not run twice);
        the others are running on a rank and stream on."""
        waiting = [r for r in self.in_flight.values() if r.first_token_time is None]
        for req in waiting:
            self._send(
                AddRequest(
                    request_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids,
                    params=req.params,
                    arrival_time=req.arrival_time,
                    epoch=self.epoch,
                    data_parallel_rank=req.data_parallel_rank,
                    resend=True,
                )
            )
        log.warning("the coordinator restarted: re-sent %d requests that had no output yet", len(waiting))

    def _rank_hung(self, msg: RankHung) -> None:
        """A rank was killed for a hang. Its step's requests are re-submitted with the others after the restart,
        once: a request in the step of a second hang fails, or it would spend the whole restart budget."""
        for rid in msg.request_ids:
            req = self.in_flight.get(rid)
            if req is None:
                continue
            req.num_hangs += 1
            if req.num_hangs < 2:
                continue
            self._forget(rid)
            self.hung.add(rid)
            self.num_failed_hung += 1
            log.error("request %s was in the step of two hung engine ranks: failed, not retried", rid)
            req.group.queue.put_nowait(
                TokenDelta(
                    request_id=rid,
                    new_token_ids=[],
                    finish_reason="abort",
                    error=f"the request was running when an engine rank hung, twice ({msg.reason}); it is not "
                    "retried: shorten the prompt, or raise --engine-hang-timeout if such steps are expected",
                )
            )

    def _fail(self, reason: str) -> None:
        """The ranks cannot come back: every waiting request ends with a 503 error, new ones get 503."""
        if self.dead is not None:
            return
        self.dead = reason
        num_failed = len(self.in_flight)
        log.error("engine ranks are gone (%s): failing %d requests in flight", reason, num_failed)
        for req in list(self.in_flight.values()):
            self._forget(req.request_id)
            req.group.queue.put_nowait(
                TokenDelta(request_id=req.request_id, new_token_ids=[], finish_reason="abort", error=reason)
            )
        if self.on_fatal is not None:
            self.on_fatal(reason, num_failed)

    def abort(self, request_ids: list[str]) -> None:
        ids = [rid for rid in request_ids if self._forget(rid)]
        if ids:
            self._send(AbortRequest(request_ids=ids))

    def release(self, group: RequestGroup) -> None:
        self.abort(list(group.unfinished))
        group.unfinished.clear()
        for rid in group.request_ids:
            self._forget(rid)
            self.hung.discard(rid)

    def _forget(self, request_id: str) -> bool:
        req = self.in_flight.pop(request_id, None)
        if req is None:
            return False
        if req.first_token_time is None:
            self.num_waiting_first_token -= 1
        return True

    def _send(self, msg: AddRequest | AbortRequest) -> None:
        assert self._push is not None, "EngineClient.start() was not called"
        # unlimited HWM: a non-blocking send never raises zmq.Again here
        self._push.send(encode(msg), flags=zmq.NOBLOCK)

    # ------------------------------------------------------------ outputs

    def _on_readable(self) -> None:
        """Handles the messages waiting. zmq's FD only says that the socket's events changed: ask ZMQ_EVENTS
        (which also processes zmq's pending commands) until no message is left, or come back after the event
        loop's other work when a burst is long (the FD may not signal again for what is left)."""
        pull = self._pull
        for _ in range(READ_BURST):
            if not (self._reading and pull is not None and pull.getsockopt(zmq.EVENTS) & zmq.POLLIN):
                return
            try:
                data = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(data)
        if self._loop is not None:
            self._loop.call_soon(self._on_readable)

    def _handle(self, data: bytes) -> None:
        try:
            msg = decode(data)
        except msgspec.DecodeError as err:
            log.error("dropped an undecodable message on the front-end socket: %s", err)
            return
        try:
            if isinstance(msg, OutputBatch):
                if msg.epoch < self.epoch:
                    self.num_stale_outputs += 1  # a dead incarnation's: its requests were re-submitted
                    return
                if msg.epoch > self.epoch:
                    self._new_epoch(msg.epoch)
                self._route(msg)
            elif isinstance(msg, ClusterStats):
                if msg.coordinator_id != self.coordinator_id:
                    if self.coordinator_id != 0:
                        self._coordinator_restarted()
                    self.coordinator_id = msg.coordinator_id
                if msg.epoch > self.epoch:
                    self._new_epoch(msg.epoch)
                elif self.stats is not None and msg.num_engine_restarts > self.num_restarts_seen:
                    self.resubmit_in_flight()  # a launcher that keeps no epochs: re-send everything
                self.num_restarts_seen = max(self.num_restarts_seen, msg.num_engine_restarts)
                self.stats, self.stats_time = msg, time.time()
                if self.on_stats is not None:
                    self.on_stats(msg)
            elif isinstance(msg, RankHung):
                self._rank_hung(msg)
            elif isinstance(msg, EngineDead):
                self._fail(msg.reason)
            else:
                log.warning("unexpected %s on the front-end socket", type(msg).__name__)
        except Exception:  # a bug in routing must not kill the reader and wedge every request
            log.exception("failed to handle %s", type(msg).__name__)

    def _route(self, batch: OutputBatch) -> None:
        now = time.time()
        for delta in batch.outputs:
            req = self.in_flight.get(delta.request_id)
            if req is None:
                continue  # aborted or finished by a stop string: late outputs are dropped
            if req.first_token_time is None:
                req.first_token_time = now
                self.num_waiting_first_token -= 1
            req.generated_token_ids.extend(delta.new_token_ids)
            if delta.finish_reason is not None:
                del self.in_flight[delta.request_id]
            req.group.queue.put_nowait(delta)
