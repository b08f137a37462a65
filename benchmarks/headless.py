"""A headless deployment for benchmarks that are their own front end: `python -m runtime.serve --headless` in
its own session, this process binding the front-end socket and sharing the secret every frame is signed with."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

import zmq

from runtime.messages import SECRET_ENV, Addresses, use_secret

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HeadlessServer:
    def __init__(self, run_dir: str, num_ranks: int, serve_args: list[str], device: str, cpu_kv_bytes: int) -> None:
        addrs = Addresses.ipc(run_dir, num_ranks)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)  # engine outputs and coordinator stats
        self.pull.bind(addrs.to_frontend)
        self.push = self.ctx.socket(zmq.PUSH)  # requests to the coordinator
        self.push.connect(addrs.to_coordinator)
        cmd = [sys.executable, "-m", "runtime.serve", "--headless", "--ipc-dir", run_dir, "-dp", str(num_ranks),
               "--device", device, *serve_args]
        if device == "cpu":
            cmd += ["--kv-cache-memory", str(cpu_kv_bytes)]
        secret = secrets.token_hex(16)
        use_secret(secret)
        env = dict(os.environ, OMP_NUM_THREADS="1", **{SECRET_ENV: secret})
        self.proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=env)

    def close(self) -> None:
        self.ctx.destroy(linger=0)
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
