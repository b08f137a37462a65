"""Tensor parallelism through the real stack (launcher, coordinator, API server, gloo ranks) and the users'
own command lines from issue 13, on the CPU with tiny checkpoints, driven by the official openai client.

Every answer is greedy and must equal the offline runtime.LLM's on one rank: tokens do not depend on TP size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from runtime.sampling_params import SamplingParams
from tests.test_all2all import free_port
from tests.test_serve import ROOT, _pids_with
from tests.tiny import make_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.serial]

CPU = ["--device", "cpu", "--kv-cache-memory", str(8 << 20), "--max-model-len", "256", "--log-stats-interval", "0.5"]
PROMPTS = ["Hello world", "The quick brown fox", "def f(x):", "Numbers 0 1 2 3"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
SERVE = [sys.executable, "-m", "runtime.serve"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve_tp")
    return {"moe": make_tiny_checkpoint(str(root / "moe"), "Qwen3MoeForCausalLM"),
            "llama": make_tiny_checkpoint(str(root / "llama"), "LlamaForCausalLM")}


@pytest.fixture(scope="module")
def offline(models: dict[str, str]) -> dict[str, list[str]]:
    """Greedy texts of one rank (offline LLM, float32 and float16)."""
    import torch

    from runtime.llm import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for name, path in models.items():
            for dtype in ("float32", "float16"):
                llm = LLM(path, device="cpu", dtype=dtype, kv_cache_memory=8 << 20, max_model_len=256)
                outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
                out[f"{name}/{dtype}"] = [o.outputs[0].text for o in outs]
    finally:
        torch.set_num_threads(threads)
    return out


def wait_healthy(base: str, procs: list[subprocess.Popen], timeout_s: float, describe: Any) -> None:
    """Until base/health is 200; fails at once when one of procs exits, or at the deadline (describe(): the logs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"exited with {p.returncode}: {describe()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not healthy after {timeout_s} s: {describe()}"
        time.sleep(0.1)


@contextmanager
def serving(cmd: list[str], timeout_s: float = 120.0) -> Iterator[tuple[openai.OpenAI, str]]:
    """Starts cmd (+ a free port), waits for /health; always torn down, no process left behind."""
    port = free_port()
    tag = f"--port={port}"  # unique in every process's command line: finds stragglers
    proc = subprocess.Popen([*cmd, tag], cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, [proc], timeout_s, lambda: f"{' '.join(cmd)}:\n{proc.stdout.read().decode()[-3000:]}")
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60), base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        leaked = [p for p in _pids_with(tag.encode()) if p != os.getpid()]
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, "processes outlived runtime.serve"


def _answers(client: openai.OpenAI, model: str) -> list[str]:
    return [client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in PROMPTS]


def _metric_ranks(base: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["rank"]: s.value for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)
            for s in f.samples if s.name == name and "rank" in s.labels}


def test_dp2_tp2_ep4_openai_client(models: dict[str, str], offline: dict[str, list[str]], tmp_path) -> None:  # noqa: ANN001
    # (DP x TP without EP through the server: test_command_line_dp4_tp2_torchrun)
    stats_file = str(tmp_path / "experts.json")
    cmd = [*SERVE, "--model", models["moe"], *CPU, "-dp", "2", "-tp", "2", "--expert-stats-file", stats_file,
           "--enable-expert-parallel"]
    with serving(cmd) as (client, base):
        outs = [client.completions.create(model="moe", prompt=p, max_tokens=8, temperature=0) for p in PROMPTS]
        assert [o.choices[0].text for o in outs] == offline["moe/float32"]
        stream = client.completions.create(model="moe", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == offline["moe/float32"][1]
        # expert statistics per engine: every (token, expert) pair of every forward token counted once, also
        # under EP x TP where each TP rank routes a slice of its engine's tokens (top_k 2, 3 MoE layers)
        forward = sum(o.usage.prompt_tokens + o.usage.completion_tokens - 1 for o in [*outs, outs[1]])
        deadline = time.monotonic() + 15
        while True:
            data = json.load(open(stats_file)) if os.path.exists(stats_file) else {"ranks": []}
            routed = [sum(sum(layer) for layer in r["routed_tokens"]) for r in data["ranks"]]
            if len(routed) == 2 and sum(routed) == forward * 2 * 3:
                break
            assert time.monotonic() < deadline, f"expert stats {routed} never reached {forward * 6}"
            time.sleep(0.3)
        # one engine per DP rank in /metrics (its TP ranks are one engine), both used
        deadline = time.monotonic() + 10
        while len(routed := _metric_ranks(base, "moe_requests_routed_total")) < 2 or sum(routed.values()) < 5:
            assert time.monotonic() < deadline, f"metrics never showed both DP ranks: {routed}"
            time.sleep(0.3)
        assert sorted(routed) == ["0", "1"]


def test_command_line_dp4_tp2_torchrun(models: dict[str, str], offline: dict[str, list[str]]) -> None:
    # issue 13, first story: one 8-GPU node as four engines of two GPUs each behind one endpoint
    cmd = [*TORCHRUN, "--nproc-per-node", "8", "-m", "runtime.serve", "--model", models["moe"], *CPU,
           "--data-parallel-size", "4", "--tensor-parallel-size", "2"]
    with serving(cmd) as (client, _):
        assert _answers(client, "moe") == offline["moe/float32"]


def test_command_line_ep_tp4_dp2_half(models: dict[str, str], offline: dict[str, list[str]]) -> None:
    # issue 13, second story: the pplx backend is not ours; the same layout with our all2all answers
    flags = ["--enable-expert-parallel", "--tensor-parallel-size", "4", "--data-parallel-size", "2"]
    tail = ["--enforce-eager", "--dtype", "half"]
    t0 = time.monotonic()
    out = subprocess.run([*SERVE, "--model", models["moe"], *CPU, *flags, "--all2all-backend", "pplx", *tail],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and time.monotonic() - t0 < 30, out.stderr
    assert "pplx" in out.stderr
    with serving([*SERVE, "--model", models["moe"], *CPU, *flags, *tail]) as (client, _):
        assert _answers(client, "moe") == offline["moe/float16"]


@pytest.mark.parametrize("layout", [["--tensor-parallel-size", "2"], ["--data-parallel-size", "2"]],
                         ids=["tp2", "dp2"])
def test_command_line_two_gpu_box_dense(models: dict[str, str], offline: dict[str, list[str]],
                                        layout: list[str]) -> None:
    # issue 13, third story: a dense model on two GPUs, split (TP) or replicated (DP), one endpoint either way
    with serving([*SERVE, "--model", models["llama"], *CPU, *layout]) as (client, _):
        assert _answers(client, "llama") == offline["llama/float32"]


def test_offline_llm_rejects_parallel_sizes(models: dict[str, str]) -> Any:
    from runtime.config import ConfigError
    from runtime.llm import LLM

    with pytest.raises(ConfigError, match="python -m runtime.serve"):
        LLM(models["llama"], device="cpu", tensor_parallel_size=2)
