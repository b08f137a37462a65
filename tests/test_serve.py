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

from runtime.messages import (
    SECRET_ENV,
    AddRequest,
    Addresses,
    ClusterStats,
    OutputBatch,
    decode,
    encode,
    use_secret,
)
from runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.serial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SECRET = "test-deployment-secret"
PROMPTS = [[1, 5, 9, 200, 17], [3, 3, 3], [100, 101, 102, 103, 104, 105, 106], [7], [42, 43], [250, 2, 77, 8]]
CPU_FLAGS = ["--device", "cpu", "--kv-cache-memory", str(8 << 20), "--max-num-seqs", "16",
             "--max-num-batched-tokens", "256", "--max-model-len", "256", "--log-stats-interval", "0.5"]


class Frontend:
    """The API server's side of the sockets, minus HTTP."""

    def __init__(self, addrs: Addresses) -> None:
        use_secret(TEST_SECRET)
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
        use_secret(None)


@contextmanager
def served(model: str, dp: int, ep: bool, extra: list[str] | None = None, headless: bool = True,
           torchrun: bool = False) -> Iterator[tuple[Frontend, subprocess.Popen]]:
    """python -m runtime.serve (or torchrun -m runtime.serve) in its own session; always torn down."""
    with tempfile.TemporaryDirectory(prefix="rt-") as ipc_dir:
        addrs = Addresses.ipc(ipc_dir, dp)
        front = Frontend(addrs) if headless else None
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp}"] if torchrun else []
        cmd = [sys.executable, *launcher, "-m", "runtime.serve", "--model", model, "-dp", str(dp),
               "--ipc-dir", ipc_dir, *CPU_FLAGS, *(extra or [])]
        if headless:
            cmd.append("--headless")
        if ep:
            cmd.append("--enable-expert-parallel")
        # one torch thread per process: the ranks share few cores with each other and the test; the deployment
        # secret is the test front end's too (every frame is authenticated, runtime/messages.py)
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", **{SECRET_ENV: TEST_SECRET}))
        try:
            yield front, proc  # type: ignore[misc]
        finally:
            if front is not None:
                front.close()
            tree = process_tree(proc.pid)  # titled processes no longer show ipc_dir in their command line
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)  # the launcher stops its ranks; rank 0 / main its children
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            deadline = time.monotonic() + 5  # helpers (resource trackers) end once they see their parent gone
            while (leaked := [p for p in _pids_with(ipc_dir.encode()) if p != os.getpid()]
                   + [p for p in tree if pid_alive(p)]) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in leaked:
                os.kill(pid, signal.SIGKILL)
            assert not leaked, "processes outlived runtime.serve"


def reference_tokens(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens from one in-process engine (no parallelism)."""
    from runtime.config import EngineConfig
    from runtime.engine.llm_engine import LLMEngine

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


def has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _pids_with(text: bytes) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def pid_alive(pid: int) -> bool:
    """A zombie counts as gone: PID 1 of a container may never reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_tree(pid: int) -> set[int]:
    """Every descendant of pid, now."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for kid in _children(todo.pop()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _http(url: str, body: dict | None = None, timeout_s: float = 30.0) -> tuple[int, bytes]:
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def test_dp1_api_server_coordinator_engine(tiny_models: dict[str, str]) -> None:
    import json

    from tests.test_all2all import free_port

    port = free_port()
    with served(tiny_models["LlamaForCausalLM"], dp=1, ep=False, headless=False,
                extra=["--port", str(port)]) as (_, proc):
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while _http(f"{base}/health", timeout_s=2)[0] != 200:
            assert proc.poll() is None, "runtime.serve exited"
            assert time.monotonic() < deadline, "API server not healthy after 90 s"
            time.sleep(0.1)
        status, body = _http(f"{base}/v1/completions", {"model": "LlamaForCausalLM", "prompt": "Hello world",
                                                        "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        assert json.loads(body)["usage"]["completion_tokens"] == 6
        # the control plane (coordinator, API server) is CPU-only: no GPU visible, no CUDA library mapped
        control = [p for p in _children(proc.pid)
                   if _cmdline(p).rstrip(b"\0") in (b"moe-rt: coordinator", b"moe-rt: api-server")]
        assert len(control) == 2
        for pid in control:
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert b"CUDA_VISIBLE_DEVICES=\x00" in f.read()
            with open(f"/proc/{pid}/maps") as f:
                assert "libcuda" not in f.read()


def test_dp2_ep2_busy_rank_dummy_steps_tokens_equal_and_quiet(tiny_models: dict[str, str], tmp_path) -> None:  # noqa: ANN001
    import json

    model = tiny_models["Qwen3MoeForCausalLM"]
    ref = reference_tokens(model, PROMPTS, 8)
    stats_file = str(tmp_path / "experts.json")
    # launched through torchrun (the other serve tests use the elastic launcher of python -m runtime.serve)
    with served(model, dp=2, ep=True, extra=["--expert-stats-file", stats_file], torchrun=True) as (front, proc):
        # one busy rank, one idle: the idle one runs dummy steps so the busy one never waits in the all2all
        front.submit("solo", PROMPTS[0], 8)
        front.wait_finished(120)
        assert front.tokens["solo"] == ref[0]
        stats = front.wait_stats(10, lambda s: s.num_steps_issued > 0)
        assert stats.num_dummy_commands == stats.num_steps_issued == 8  # 1 prefill + 7 decode steps
        # a batch: spread over both ranks, tokens as on one rank
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
        assert after.num_steps_issued == before
        assert sum(after.num_requests_routed) == len(PROMPTS) + 1
        # expert statistics: every (token, expert) pair of every forward token counted once, padding excluded
        forward_tokens = sum(len(p) + 8 - 1 for p in [PROMPTS[0], *PROMPTS])
        deadline = time.monotonic() + 20
        while True:
            data = json.load(open(stats_file)) if os.path.exists(stats_file) else {"ranks": []}
            routed = [sum(sum(layer) for layer in r["routed_tokens"]) for r in data["ranks"]]
            if len(routed) == 2 and sum(routed) == forward_tokens * 2 * 3:  # top_k 2, 3 MoE layers
                break
            assert time.monotonic() < deadline, f"expert stats {routed} never reached {forward_tokens * 6}"
            time.sleep(0.3)
        assert all(r["all2all_bytes_sent"] > 0 and r["all2all_tokens_sent"] > 0 for r in data["ranks"])
        assert {"attention", "moe_compute", "all2all", "other"} <= set(data["ranks"][0]["time_split"])
    out = subprocess.run([sys.executable, "benchmarks/plot_expert_stats.py", stats_file], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rank_imbalance_mean=" in out.stdout
    assert os.path.exists(str(tmp_path / "experts.png")) or not has_matplotlib()  # plotting is optional


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "model folder '/nonexistent/model' not found"),
    (["-dp", "3", "--enable-expert-parallel"], "8 experts are not divisible by the expert-parallel size 3"),
    (["-dp", "2", "--enable-expert-parallel", "--all2all-backend", "allgather", "--expert-token-capacity", "4"],
     "--expert-token-capacity 4 is below"),
])
def test_bad_launch_fails_fast_with_one_line(tiny_models: dict[str, str], args: list[str], message: str) -> None:
    model = ["--model", tiny_models["Qwen3MoeForCausalLM"]] if "--model" not in args else []
    out = subprocess.run([sys.executable, "-m", "runtime.serve", *model, "--device", "cpu", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
