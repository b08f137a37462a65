"""Two nodes on one host: two torchrun agents with a static rendezvous (--nnodes 2 --node-rank 0/1), one rank
each, as a user would start them on two machines. The ranks see LOCAL_WORLD_SIZE < WORLD_SIZE and talk over tcp://
sockets on node 0 (not ipc:// files); the coordinator and the API server run on node 0 only; DP=2 x EP=2 over gloo
answers exactly as one rank does, both DP ranks serve, and stopping node 0's agent takes node 1 down too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import openai
import pytest

from tests.test_all2all import free_port_block
from tests.test_serve import ROOT, _cmdline, process_tree
from tests.test_serve_tp import CPU, PROMPTS, _answers, _metric_ranks, models, offline, wait_healthy  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.serial]


def _titles(pid: int) -> set[bytes]:
    out = set()
    for p in process_tree(pid):
        try:
            out.add(_cmdline(p).rstrip(b"\0"))
        except OSError:
            pass
    return out


def test_two_nodes_one_endpoint(models: dict[str, str], offline: dict[str, list[str]], tmp_path) -> None:  # noqa: ANN001, F811
    master = free_port_block(6)  # the ranks' sockets take master + 1 .. master + 4 (runtime/serve.py), the API + 5
    port = master + 5
    nodes, logs = [], []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(master),
               "-m", "runtime.serve", "--model", models["moe"], *CPU, "--data-parallel-size", "2",
               "--enable-expert-parallel", "--port", str(port)]
        # a file, not a pipe nobody reads while waiting: a full pipe would stall the node's processes
        logs.append(open(tmp_path / f"node{node}.log", "wb"))
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1")))

    def tails() -> str:
        return "\n".join(f"--- node {i}:\n" + (tmp_path / f"node{i}.log").read_text(errors="replace")[-3000:]
                         for i in (0, 1))

    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, nodes, 120, tails)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        assert _answers(client, "moe") == offline["moe/float32"]
        assert _answers(client, "moe") == offline["moe/float32"]  # (round two: every prompt on the other rank)
        deadline = time.monotonic() + 10
        while len(routed := _metric_ranks(base, "moe_requests_routed_total")) < 2 or sum(routed.values()) < 8:
            assert time.monotonic() < deadline, f"metrics never showed both DP ranks: {routed}"
            time.sleep(0.3)
        assert all(v > 0 for v in routed.values()), routed
        # the control plane on node 0 only; one engine rank per node
        first, second = _titles(nodes[0].pid), _titles(nodes[1].pid)
        assert {b"moe-rt: coordinator", b"moe-rt: api-server"} <= first
        assert not any(t.startswith((b"moe-rt: coordinator", b"moe-rt: api-server")) for t in second)
        assert any(t.startswith(b"moe-rt: engine DP0") for t in first)
        assert any(t.startswith(b"moe-rt: engine DP1") for t in second)
        # tcp, not the one-node ipc:// folder (torchrun_addresses)
        assert not os.path.exists(os.path.join(tempfile.gettempdir(), f"moe-rt-none-{master}"))
        # stopping node 0 ends the deployment on both nodes
        os.killpg(nodes[0].pid, signal.SIGTERM)
        for n in nodes:
            n.wait(60)
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
                n.wait(10)
        for f in logs:
            f.close()
