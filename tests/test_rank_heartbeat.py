"""A long step is not a hang, a stalled one is: the real coordinator process against a real rank loop
(RankLoop + heartbeat thread) whose engine takes seconds per step, with --engine-hang-timeout 2 s."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import msgspec
import pytest
import zmq

from runtime.cluster.coordinator import CoordinatorSpec
from runtime.engine.scheduler import ScheduledBatch
from runtime.messages import (
    SECRET_ENV,
    AddRequest,
    Addresses,
    ClusterStats,
    OutputBatch,
    RankHung,
    decode,
    encode,
    use_secret,
)
from runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.serial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_TIMEOUT_S = 2.0


class SlowEngine:
    """One request at a time. A prompt of n tokens runs n layers of 0.25 s each (progress moves); a prompt
    starting with 0 sleeps n x 0.25 s inside one layer (no progress: a stuck collective)."""

    def __init__(self) -> None:
        import torch

        class Layer(torch.nn.Module):
            def forward(self, seconds: float) -> None:
                time.sleep(seconds)

        class Model(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layers = torch.nn.ModuleList([Layer() for _ in range(64)])

        self.model = Model()
        self.requests: dict[str, AddRequest] = {}
        self.planned: ScheduledBatch | None = None
        self.num_steps = 0

    def add_request(self, req: AddRequest) -> None:
        self.requests[req.request_id] = req

    def abort_requests(self, ids: list[str]) -> None:
        for rid in ids:
            self.requests.pop(rid, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> int:
        if not self.requests:
            self.planned = None
            return 0
        req = next(iter(self.requests.values()))
        self.planned = ScheduledBatch([req], [len(req.prompt_token_ids)])  # type: ignore[list-item]
        return len(req.prompt_token_ids)

    def execute(self, pad_to: int | None = None) -> list:
        from runtime.messages import TokenDelta

        req = self.planned.seqs[0]  # type: ignore[union-attr]
        n = len(req.prompt_token_ids)
        if req.prompt_token_ids[0] == 0:
            self.model.layers[0](0.25 * n)
        else:
            for i in range(n):
                self.model.layers[i](0.25)
        self.num_steps += 1
        del self.requests[req.request_id]
        return [TokenDelta(request_id=req.request_id, new_token_ids=[1], finish_reason="length")]

    def stats(self):  # noqa: ANN201
        from runtime.messages import RankStats

        return RankStats(0, len(self.requests), 0, 0.0, 0, 0, self.num_steps, 0)

    def padded_size(self, num_tokens: int) -> int:
        return num_tokens


SECRET = "heartbeat-test-secret"  # every frame is signed (runtime/messages.py): the test is the front end


def _rank(addrs_json: str) -> None:
    from runtime.cluster.rank_loop import RankLoop

    use_secret(SECRET)
    addrs = msgspec.json.decode(addrs_json, type=Addresses)
    RankLoop(SlowEngine(), 0, addrs, lockstep=False, stats_interval=0.5).run()  # type: ignore[arg-type]


def test_long_step_keeps_health_and_a_stalled_step_is_killed_and_named() -> None:
    use_secret(SECRET)
    with tempfile.TemporaryDirectory() as d:
        addrs = Addresses.ipc(d, 1)
        ctx = zmq.Context()
        front_pull = ctx.socket(zmq.PULL)
        front_pull.bind(addrs.to_frontend)
        front_push = ctx.socket(zmq.PUSH)
        front_push.connect(addrs.to_coordinator)
        spec = CoordinatorSpec(num_ranks=1, lockstep=False, log_stats_interval=0.2, hang_timeout_s=HANG_TIMEOUT_S)
        coord = subprocess.Popen([sys.executable, "-m", "runtime.cluster.coordinator",
                                  msgspec.json.encode(spec).decode(),
                                  msgspec.json.encode(addrs).decode()], cwd=ROOT,
                                 env=dict(os.environ, CUDA_VISIBLE_DEVICES="", **{SECRET_ENV: SECRET}))
        rank = mp.get_context("spawn").Process(target=_rank, args=(msgspec.json.encode(addrs).decode(),))
        rank.start()
        try:
            def collect(until, timeout_s: float) -> list[object]:  # noqa: ANN001
                seen: list[object] = []
                deadline = time.monotonic() + timeout_s
                while not until(seen):
                    assert time.monotonic() < deadline, f"timed out; saw {[type(m).__name__ for m in seen]}"
                    if front_pull.poll(200):
                        seen.append(decode(front_pull.recv()))
                return seen

            collect(lambda s: any(isinstance(m, ClusterStats) and m.healthy for m in s), 30)  # ready
            params = SamplingParams(temperature=0.0, max_tokens=1)
            # a 6 s step, three times the hang timeout, its layers moving every 0.25 s
            front_push.send(encode(AddRequest("long", [5] * 24, params)))
            t0 = time.monotonic()
            seen = collect(lambda s: any(isinstance(m, OutputBatch) for m in s), 30)
            assert time.monotonic() - t0 > 3 * HANG_TIMEOUT_S - 0.5
            health = [m.healthy for m in seen if isinstance(m, ClusterStats)]
            assert len(health) > 10 and all(health), "a working rank was taken for a hung one"
            assert rank.is_alive()
            # a step that makes no progress for longer than the timeout: killed, its request named
            front_push.send(encode(AddRequest("stuck", [0] * 40, params)))
            seen = collect(lambda s: any(isinstance(m, RankHung) for m in s), 30)
            hung = next(m for m in seen if isinstance(m, RankHung))
            assert hung.request_ids == ["stuck"] and "made no progress" in hung.reason
            assert any(isinstance(m, ClusterStats) and not m.healthy for m in seen)  # degraded before the kill
            rank.join(10)
            assert rank.exitcode == -9
        finally:
            if rank.is_alive():
                rank.kill()
            coord.terminate()
            use_secret(None)
            coord.wait(10)
            ctx.destroy(linger=0)
