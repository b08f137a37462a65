"""Typed messages between the API server, the DP coordinator and the engine ranks: msgspec structs encoded as msgpack.

Sockets (ZMQ):
  front end  --PUSH-->  coordinator      AddRequest / AbortRequest
  coordinator --PUSH--> engine rank r     AddRequest / AbortRequest / StepCommand / Shutdown / Sync
  engine rank --PUSH--> coordinator      StepReport (after scheduling), StatsReport, Heartbeat (own thread)
  engine rank --PUSH--> front end        OutputBatch (tokens, straight, not through the coordinator)
  coordinator --PUSH--> front end        ClusterStats, EngineDead, RankHung

Who binds: the front end binds to_frontend; the coordinator binds to_coordinator and every to_engines[r];
engine ranks only connect. So every bound address lives on the node of rank 0 and multi-node works with
tcp:// addresses of that node. An engine's first message is a StatsReport: it is ready.

Epochs: the rank group's incarnation (the elastic launcher's restart count). Ranks stamp it on everything
they send, the coordinator on its commands, the front end on its requests (the newest epoch it knows).
Whoever sees a message of an older epoch drops it: that is what makes a resumed request's tokens unique
(outputs of the dead incarnation that arrive late are ignored, and a request routed to it is re-submitted
by the front end, never delivered twice).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Mapping

import msgspec

from runtime.sampling_params import SamplingParams

logger = logging.getLogger("runtime.messages")

# ranks report at least this often between steps; a rank silent for a few of these is suspect
HEARTBEAT_INTERVAL_S = 1.0


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    # Resumption after an engine restart: tokens already generated, and the seed stream offset.
    num_generated_before: int = 0
    epoch: int = 0  # the newest rank-group incarnation the front end knew when it sent this
    data_parallel_rank: int | None = None  # the client's explicit placement (vLLM's field), else routed
    # sent again after a coordinator restart, when it may already have reached a rank: a rank that holds the
    # id already ignores it instead of refusing a duplicate
    resend: bool = False


class AbortRequest(msgspec.Struct, tag=True):
    request_ids: list[str]


class StepCommand(msgspec.Struct, tag=True):
    step_id: int
    pad_to: int  # tokens every rank pads its batch to (same CUDA-graph bucket everywhere)
    dummy: bool  # this rank has no work: run only the collectives
    epoch: int = 0
    # tokens the rank may schedule for its NEXT step (0: its own --max-num-batched-tokens). Under lockstep a
    # rank's prefill chunk sets every rank's step size, so while some rank decodes the coordinator caps it
    next_token_budget: int = 0


class Shutdown(msgspec.Struct, tag=True):
    pass


class Sync(msgspec.Struct, tag=True):
    """A (re)started coordinator asks each rank for a StatsReport with synced=True and the ids it holds."""


class StepReport(msgspec.Struct, tag=True):
    rank: int
    step_id: int
    num_tokens: int  # tokens scheduled for the next step, 0 = idle
    is_decode: bool
    # load, for routing; num_requests_received counts AddRequests taken so far (cumulative), so the
    # coordinator knows whether the report already reflects every request it sent
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_requests_received: int = 0
    epoch: int = 0
    num_decode_tokens: int = 0  # of num_tokens, one-token decodes (the rest is prefill)


class Heartbeat(msgspec.Struct, tag=True):
    """Sent by a rank's heartbeat thread every HEARTBEAT_INTERVAL_S, also in the middle of a long step, so
    the coordinator tells a busy rank (progress moves) from a hung one (silent, or busy with no progress)."""

    rank: int
    epoch: int
    step_id: int
    busy: bool  # inside execute()
    progress: int  # layers + steps run since start: moves between layers while a step runs
    request_ids: list[str] = []  # the requests of the step in progress (busy only)
    pid: int = 0
    hostname: str = ""
    num_tokens: int = 0  # tokens of the step in progress (busy only): the biggest step is blamed for a stall


class TokenDelta(msgspec.Struct):
    request_id: str
    new_token_ids: list[int]
    # per new token: [(token_id, logprob), ...] with the sampled token first; None if not asked
    logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | None = None  # the stop token id that finished it, if any
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # why the engine refused the request (finish_reason "abort")
    # with the first output token when asked: per prompt token after the first, (token_id, logprob, rank)
    # of the prompt token then the top-N (runtime/engine/prompt_logprobs.py)
    prompt_logprobs: list[list[tuple[int, float, int]]] | None = None
    # with the first output token, seconds on the engine's clock: reached the engine -> first scheduled
    # (a preemption does not restart it), and first scheduled -> this token (vLLM's queue and prefill time)
    queue_time: float | None = None
    prefill_time: float | None = None


class OutputBatch(msgspec.Struct, tag=True):
    rank: int
    outputs: list[TokenDelta]
    epoch: int = 0


class RankStats(msgspec.Struct):
    rank: int
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    prompt_tokens: int  # cumulative
    generation_tokens: int  # cumulative
    num_steps: int
    num_dummy_steps: int
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class ExpertStatsSnapshot(msgspec.Struct):
    """One rank's expert statistics (runtime/distributed/expert_stats.py), cumulative since start."""

    rank: int
    routed_tokens: list[list[int]]  # [num_moe_layers][num_experts] (token, expert) pairs routed on this rank
    all2all_tokens_sent: int = 0
    all2all_tokens_received: int = 0
    all2all_bytes_sent: int = 0
    all2all_bytes_received: int = 0
    num_forward_steps: int = 0
    # seconds spent per part of the forward; only filled when timing is on (eager steps)
    time_split: dict[str, float] = {}
    # per MoE layer: all2all bytes this rank sent, and what the allgather backend would have sent
    all2all_layer_bytes_sent: list[int] = []
    all2all_layer_allgather_bytes: list[int] = []
    # sparse all2all, fixed-capacity (static) exchanges: (token, rank) pairs past the slots, and the steps re-run
    # exactly because of them
    all2all_overflow_pairs: int = 0
    all2all_overflow_reruns: int = 0


class StatsReport(msgspec.Struct, tag=True):
    stats: RankStats
    expert: ExpertStatsSnapshot | None = None
    first: bool = False  # the rank's first message after (re)start: it is ready, its step ids start at 0
    epoch: int = 0
    # where the rank runs, so a coordinator on the same host can kill a rank that stopped answering
    pid: int = 0
    hostname: str = ""
    num_requests_received: int = 0  # cumulative, as in StepReport: a restarted coordinator starts counting here
    synced: bool = False  # the answer to Sync: request_ids are every request the rank holds
    request_ids: list[str] = []


class ClusterStats(msgspec.Struct, tag=True):
    ranks: list[RankStats]
    num_engine_restarts: int = 0
    healthy: bool = True
    num_steps_issued: int = 0  # lockstep steps the coordinator has clocked (0 when ranks run freely)
    num_dummy_commands: int = 0  # (step, rank) pairs that ran a dummy step
    num_requests_routed: list[int] = []  # per rank
    epoch: int = 0  # the rank group's current incarnation
    # per rank, cumulative: all2all bytes sent, and what the allgather backend would have sent (expert parallel)
    all2all_bytes_sent: list[int] = []
    all2all_allgather_bytes: list[int] = []
    coordinator_id: int = 0  # changes when the coordinator restarts: requests it held may be lost
    all2all_overflow_reruns: list[int] = []  # per rank: steps re-run after a fixed-capacity all2all overflowed


class RankHung(msgspec.Struct, tag=True):
    """The coordinator killed a rank that made no progress; request_ids were in its step. The front end
    re-submits such a request once; hung twice, it fails (it would take every restart down with it)."""

    rank: int
    epoch: int
    request_ids: list[str]
    reason: str


class EngineDead(msgspec.Struct, tag=True):
    """The ranks are gone for good (restart budget spent, launcher exited): fail every request, clearly."""

    reason: str


Message = (AddRequest | AbortRequest | StepCommand | Shutdown | Sync | StepReport | OutputBatch | StatsReport
           | ClusterStats | EngineDead | Heartbeat | RankHung)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)

# Authentication: with a deployment secret every frame ends in HMAC-SHA256(secret, payload); a frame whose tag
# does not match is dropped. Without it, anyone who reaches a tcp:// socket of a multi-node deployment could
# inject requests or fake outputs. One key per process, set once at its start (use_secret).
SECRET_ENV = "MOE_RT_SECRET"
MAC_BYTES = 32
_mac_key: bytes | None = None


class AuthError(msgspec.DecodeError):
    """A frame without a valid MAC (forged, corrupted, or from a process with another secret)."""


def use_secret(secret: str | bytes | None) -> None:
    """This process's deployment secret (None: frames carry no MAC, the pre-authentication format)."""
    global _mac_key
    _mac_key = secret.encode() if isinstance(secret, str) else secret


def secret_from_env(env: Mapping[str, str] | None = None) -> str | None:
    return (os.environ if env is None else env).get(SECRET_ENV) or None


def encode(msg: Message) -> bytes:
    data = _encoder.encode(msg)
    if _mac_key is None:
        return data
    return data + hmac.new(_mac_key, data, hashlib.sha256).digest()


def decode(data: bytes | memoryview) -> Message:
    if _mac_key is not None:
        view = memoryview(data)
        if len(view) < MAC_BYTES:
            raise AuthError("frame too short to carry a MAC")
        payload, tag = view[:-MAC_BYTES], view[-MAC_BYTES:]
        if not hmac.compare_digest(hmac.new(_mac_key, payload, hashlib.sha256).digest(), tag):
            raise AuthError("bad MAC")
        data = payload
    return _decoder.decode(data)


def decode_or_drop(data: bytes | memoryview, where: str) -> Message | None:
    """decode, but a frame that fails authentication or decoding is logged and dropped (None), never fatal:
    whoever can reach a socket must not be able to crash the process behind it."""
    try:
        return decode(data)
    except msgspec.DecodeError as e:
        logger.warning("%s: dropped a %d-byte frame: %s", where, len(data), e)
        return None


class Addresses(msgspec.Struct):
    """ZMQ endpoints of one deployment (ipc:// on one node, tcp:// across nodes)."""

    to_coordinator: str  # coordinator binds PULL: front-end requests and engine reports
    to_frontend: str  # front end binds PULL: engine outputs and coordinator stats
    to_engines: list[str]  # coordinator binds PUSH at to_engines[r], engine rank r connects PULL

    @staticmethod
    def ipc(run_dir: str, num_ranks: int) -> Addresses:
        return Addresses(f"ipc://{run_dir}/coordinator", f"ipc://{run_dir}/frontend",
                         [f"ipc://{run_dir}/engine{r}" for r in range(num_ranks)])

    @staticmethod
    def tcp(host: str, base_port: int, num_ranks: int) -> Addresses:
        return Addresses(f"tcp://{host}:{base_port}", f"tcp://{host}:{base_port + 1}",
                         [f"tcp://{host}:{base_port + 2 + r}" for r in range(num_ranks)])
