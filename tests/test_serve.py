"""Launch-level tests: python -m runtime.serve (elastic launcher) with real coordinator and engine ranks on gloo.

A test front end binds the to_frontend socket itself (--headless), pushes AddRequests to the coordinator and
collects the engines' OutputBatch and the coordinator's ClusterStats. Every wait has a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import zmq

from runtime.messages import AddRequest, Addresses, ClusterStats, OutputBatch, decode, encode
from runtime.sampling_params import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 5, 9, 200, 17], [3, 3, 3], [100, 101, 102, 103, 104, 105, 106], [7], [42, 43], [250, 2, 77, 8]]
CPU_FLAGS = ["--device", "cpu", "--kv-cache-memory", str(8 << 20), "--max-num-seqs", "16",
             "--max-num-batched-tokens", "256", "--max-model-len", "256", "--log-stats-interval", "0.5"]


class Frontend:
    """The API server's side of the sockets, minus HTTP."""

    def __init__(self, addrs: Addresses) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(addrs.to_frontend)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(addrs.to_coordinator)
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}
        self.ranks: dict[str, int] = {}
        self.stats: ClusterStats | None = None

    def submit(self, request_id: str, prompt: list[int], max_tokens: int, ignore_eos: bool = True) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        self.tokens[request_id] = []
        self.push.send(encode(AddRequest(request_id=request_id, prompt_token_ids=prompt, params=params)))

    def poll(self, timeout_s: float) -> None:
        if not self.pull.poll(int(timeout_s * 1e3)):
            return
        while True:
            try:
                msg = decode(self.pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if isinstance(msg, OutputBatch):
                for d in msg.outputs:
                    self.tokens[d.request_id].extend(d.new_token_ids)
                    self.ranks[d.request_id] = msg.rank
                    if d.finish_reason is not None:
                        self.finished[d.request_id] = d.finish_reason
            elif isinstance(msg, ClusterStats):
                self.stats = msg

    def wait(self, until, timeout_s: float, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
            self.poll(0.2)

    def wait_finished(self, timeout_s: float) -> None:
        self.wait(lambda: len(self.finished) == len(self.tokens), timeout_s, "all requests to finish")

    def wait_stats(self, timeout_s: float, pred=lambda s: True) -> ClusterStats:  # noqa: ANN001
        self.stats = None
        self.wait(lambda: self.stats is not None and pred(self.stats), timeout_s, "cluster stats")
        assert self.stats is not None
        return self.stats

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@contextmanager
def served(model: str, dp: int, ep: bool, extra: list[str] | None = None,
           timeout_s: float = 120.0) -> Iterator[tuple[Frontend, subprocess.Popen]]:
    """python -m runtime.serve --headless in its own session; always torn down (SIGTERM, then SIGKILL)."""
    with tempfile.TemporaryDirectory(prefix="rt-") as ipc_dir:
        addrs = Addresses.ipc(ipc_dir, dp)
        front = Frontend(addrs)
        cmd = [sys.executable, "-m", "runtime.serve", "--model", model, "-dp", str(dp), "--headless",
               "--ipc-dir", ipc_dir, *CPU_FLAGS, *(extra or [])]
        if ep:
            cmd.append("--enable-expert-parallel")
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            yield front, proc
        finally:
            front.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)


def reference_tokens(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens from one in-process engine (no parallelism)."""
    from runtime.config import EngineConfig
    from runtime.engine import LLMEngine

    config = EngineConfig(model=model, device="cpu", kv_cache_memory=8 << 20, max_num_seqs=16,
                          max_num_batched_tokens=256, max_model_len=256)
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(AddRequest(request_id=str(i), prompt_token_ids=p, params=params))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id].extend(d.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_checkpoint(str(root / arch), arch)
            for arch in ("Qwen3MoeForCausalLM", "Glm4MoeForCausalLM", "LlamaForCausalLM")}


def test_dp1_serve_path(tiny_models: dict[str, str]) -> None:
    model = tiny_models["LlamaForCausalLM"]
    ref = reference_tokens(model, PROMPTS[:3], 6)
    with served(model, dp=1, ep=False) as (front, proc):
        for i, p in enumerate(PROMPTS[:3]):
            front.submit(str(i), p, 6)
        front.wait_finished(90)
        assert [front.tokens[str(i)] for i in range(3)] == ref
        assert set(front.finished.values()) == {"length"}


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Glm4MoeForCausalLM"])
def test_dp2_ep2_tokens_equal_one_rank_and_quiet_when_idle(tiny_models: dict[str, str], arch: str) -> None:
    model = tiny_models[arch]
    ref = reference_tokens(model, PROMPTS, 8)
    with served(model, dp=2, ep=True) as (front, proc):
        for i, p in enumerate(PROMPTS):
            front.submit(str(i), p, 8)
        front.wait_finished(120)
        assert [front.tokens[str(i)] for i in range(len(PROMPTS))] == ref
        ranks = [front.ranks[str(i)] for i in range(len(PROMPTS))]
        assert sorted(set(ranks)) == [0, 1], f"requests not spread: {ranks}"
        # quiet when idle: after the last request finished no more steps are issued
        before = front.wait_stats(10).num_steps_issued
        time.sleep(1.5)
        after = front.wait_stats(10)
        assert after.num_steps_issued == before > 0
        assert after.num_requests_routed == [ranks.count(0), ranks.count(1)]
