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
import zmq.asyncio

from runtime.messages import (
    AbortRequest,
    AddRequest,
    Addresses,
    ClusterStats,
    OutputBatch,
    TokenDelta,
    decode,
    encode,
)
from runtime.sampling_params import SamplingParams
from server.protocol import APIError

log = logging.getLogger(__name__)


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


class RequestGroup:
    """The engine requests behind one HTTP request (n choices x prompts); their outputs share one
    queue, so the handler reads one stream. Leaving the `async with` aborts whatever is unfinished:
    that is how a disconnected client frees its KV blocks."""

    def __init__(self, client: EngineClient, request_ids: list[str]) -> None:
        self.client = client
        self.request_ids = request_ids
        self.unfinished = set(request_ids)
        self.queue: asyncio.Queue[TokenDelta] = asyncio.Queue()

    async def __aenter__(self) -> RequestGroup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.release(self)

    async def next_batch(self) -> list[TokenDelta]:
        """Every output that is waiting (at least one): when the front end lags behind the engines
        it then sends one larger chunk per choice instead of falling further behind."""
        deltas = [await self.queue.get()]
        while not self.queue.empty():
            deltas.append(self.queue.get_nowait())
        for delta in deltas:
            if delta.finish_reason is not None:
                self.unfinished.discard(delta.request_id)
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
        self._ctx: zmq.asyncio.Context | None = None
        self._push: zmq.asyncio.Socket | None = None
        self._pull: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)  # never make an engine block on a slow front end
        self._pull.bind(self.addrs.to_frontend)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self.addrs.to_coordinator)
        self._reader = asyncio.create_task(self._read_loop(), name="engine-output-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()

    def health(self, stale_after: float) -> str:
        """'ok', 'starting' (no engine has reported yet) or 'degraded' (a rank down or restarting, or the
        coordinator silent for stale_after seconds)."""
        if self._reader is None or self._reader.done():
            return "degraded"
        if self.stats is None:
            return "starting"
        if not self.stats.healthy or time.time() - self.stats_time > stale_after:
            return "degraded"
        return "ok"

    # ------------------------------------------------------------ requests

    def open(self, requests: list[tuple[str, list[int], SamplingParams]]) -> RequestGroup:
        """Admits and submits a group of engine requests; 503 when the queue is full."""
        if self.num_waiting_first_token + len(requests) > self.max_queue_len:
            raise APIError(
                f"server busy: {self.num_waiting_first_token} requests already wait for the engine "
                f"(--max-queue-len {self.max_queue_len}); retry later",
                status_code=503,
                type="server_busy",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        group = RequestGroup(self, [rid for rid, _, _ in requests])
        now = time.time()
        for rid, prompt_ids, params in requests:
            self.in_flight[rid] = InFlight(rid, prompt_ids, params, group, now)
            self.num_waiting_first_token += 1
            self._send(AddRequest(request_id=rid, prompt_token_ids=prompt_ids, params=params, arrival_time=now))
        return group

    def resubmit_in_flight(self) -> int:
        """After the engine ranks restarted (their requests are gone): send every unfinished request
        again as prompt + tokens so far. num_generated_before keeps max_tokens, min_tokens and the
        seeded random stream counting from where they were, so the answer continues seamlessly."""
        for req in self.in_flight.values():
            self._send(
                AddRequest(
                    request_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids + req.generated_token_ids,
                    params=req.params,
                    arrival_time=req.arrival_time,
                    num_generated_before=len(req.generated_token_ids),
                )
            )
        self.num_resubmitted += len(self.in_flight)
        log.warning("engine ranks restarted: re-submitted %d requests in flight", len(self.in_flight))
        return len(self.in_flight)

    def abort(self, request_ids: list[str]) -> None:
        ids = [rid for rid in request_ids if self._forget(rid)]
        if ids:
            self._send(AbortRequest(request_ids=ids))

    def release(self, group: RequestGroup) -> None:
        self.abort(list(group.unfinished))
        group.unfinished.clear()
        for rid in group.request_ids:
            self._forget(rid)

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

    async def _read_loop(self) -> None:
        assert self._pull is not None
        while True:
            data = await self._pull.recv()
            try:
                msg = decode(data)
            except msgspec.DecodeError as err:
                log.error("dropped an undecodable message on the front-end socket: %s", err)
                continue
            try:
                if isinstance(msg, OutputBatch):
                    self._route(msg)
                elif isinstance(msg, ClusterStats):
                    if self.stats is not None and msg.num_engine_restarts > self.stats.num_engine_restarts:
                        self.resubmit_in_flight()
                    self.stats, self.stats_time = msg, time.time()
                    if self.on_stats is not None:
                        self.on_stats(msg)
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
