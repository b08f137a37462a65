"""Typed messages between the API server, the DP coordinator and the engine ranks (msgpack, never pickle).

Sockets (ZMQ):
  front end  --PUSH-->  coordinator      AddRequest / AbortRequest
  coordinator --PUSH--> engine rank r     AddRequest / AbortRequest / StepCommand / Shutdown
  engine rank --PUSH--> coordinator      StepReport (after scheduling), StatsReport
  engine rank --PUSH--> front end        OutputBatch (tokens, straight, not through the coordinator)
  coordinator --PUSH--> front end        ClusterStats
"""

from __future__ import annotations

import msgspec

from runtime.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    # Resumption after an engine restart: tokens already generated, and the seed stream offset.
    num_generated_before: int = 0


class AbortRequest(msgspec.Struct, tag=True):
    request_ids: list[str]


class StepCommand(msgspec.Struct, tag=True):
    step_id: int
    pad_to: int  # tokens every rank pads its batch to (same CUDA-graph bucket everywhere)
    dummy: bool  # this rank has no work: run only the collectives


class Shutdown(msgspec.Struct, tag=True):
    pass


class StepReport(msgspec.Struct, tag=True):
    rank: int
    step_id: int
    num_tokens: int  # tokens scheduled for the next step, 0 = idle
    is_decode: bool


class TokenDelta(msgspec.Struct):
    request_id: str
    new_token_ids: list[int]
    # per new token: [(token_id, logprob), ...] with the sampled token first; None if not asked
    logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | None = None  # the stop token id that finished it, if any
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class OutputBatch(msgspec.Struct, tag=True):
    rank: int
    outputs: list[TokenDelta]


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


class StatsReport(msgspec.Struct, tag=True):
    stats: RankStats


class ClusterStats(msgspec.Struct, tag=True):
    ranks: list[RankStats]
    num_engine_restarts: int = 0
    healthy: bool = True


Message = AddRequest | AbortRequest | StepCommand | Shutdown | StepReport | OutputBatch | StatsReport | ClusterStats

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)


class Addresses(msgspec.Struct):
    """ZMQ endpoints of one deployment (ipc:// on one node, tcp:// across nodes)."""

    to_coordinator: str  # coordinator binds PULL: front-end requests and engine reports
    to_frontend: str  # front end binds PULL: engine outputs and coordinator stats
    to_engines: list[str]  # engine rank r binds PULL at to_engines[r]: requests and step commands
