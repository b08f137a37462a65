"""Process hygiene of a running deployment (issue 11): Ctrl-C and SIGTERM stop every process within seconds
and free the port; kill -9 of the launcher takes the ranks and the helpers with it; a busy port is a
one-line error before anything starts; every process carries a readable title. Both launchers
(python -m runtime.serve and torchrun), a tiny dense model on gloo. Bounds are generous (15 s); the
measured time is printed (pytest -s) for the record."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.ports import free_port as _free_port
from tests.test_serve import CPU_FLAGS, _children, _http
from tests.tiny import make_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.serial]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND_S = 15.0  # the target is 5 s; a loaded 2-core CI box gets slack


def _alive(pid: int) -> bool:
    """A zombie counts as gone: it holds no memory, no port, and PID 1 of a container may never reap it."""
    try:
        return _state(pid) != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for kid in _children(todo.pop()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def _state(pid: int) -> str:
    """Its main thread's state letter (/proc/PID/stat): R running, S asleep in the kernel, Z exited, ..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_dense")), "LlamaForCausalLM")


def listening_addresses(pids: set[int]) -> list[str]:
    """'ip:port' of every TCP socket these processes listen on (from /proc: no ss/netstat needed)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ip_hex, port_hex = cols[1].split(":")
                    ip = socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6,
                                          b"".join(bytes.fromhex(ip_hex[i:i + 8])[::-1] for i in range(0, width, 8)))
                    found.append(f"{ip}:{int(port_hex, 16)}")
    return found


@contextmanager
def running(model: str, torchrun: bool, dp: int = 1,
            env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, int, set[int], str]]:
    """A healthy deployment in its own session: (launcher, port, every process of it, log path). Whatever
    the test did, nothing of it outlives the block."""
    with tempfile.TemporaryDirectory(prefix="rt-sig-") as tmp:
        port = _free_port()
        log_path = os.path.join(tmp, "serve.log")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp}"] \
            if torchrun else [sys.executable]
        cmd = [*launcher, "-m", "runtime.serve", "--model", model, "-dp", str(dp), *CPU_FLAGS, "--port", str(port)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
        pids: set[int] = set()
        try:
            deadline = time.monotonic() + 120
            while _http(f"http://127.0.0.1:{port}/health", timeout_s=2)[0] != 200:
                assert proc.poll() is None, f"runtime.serve exited:\n{_read(log_path)}"
                assert time.monotonic() < deadline, f"not healthy after 120 s:\n{_read(log_path)}"
                time.sleep(0.1)
            # launcher, control plane, ranks (+ their helpers): everyone there is once healthy
            deadline = time.monotonic() + 10
            while len(pids := _descendants(proc.pid)) < 2 + dp and time.monotonic() < deadline:
                time.sleep(0.1)
            yield proc, port, pids | {proc.pid}, log_path
        finally:
            for pid in pids | {proc.pid}:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(10)


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-4000:]


def _wait_gone(proc: subprocess.Popen, pids: set[int], port: int | None, t0: float, log_path: str) -> float:
    deadline = t0 + BOUND_S
    while True:
        proc.poll()  # reap the launcher: it is our child
        left = [p for p in pids if _alive(p)]
        if not left and (port is None or _port_free(port)):
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            pytest.fail(f"after {BOUND_S} s still alive: {[(p, _title(p)) for p in left]}, port free: "
                        f"{port is None or _port_free(port)}\n{_read(log_path)}")
        time.sleep(0.05)


# each launcher with the signal it meets most (both handle both; one deployment each keeps the suite short)
@pytest.mark.parametrize("how, torchrun", [("ctrl-c", False), ("sigterm", True)],
                         ids=["ctrl-c-python-m", "sigterm-torchrun"])
def test_stop_signal_ends_every_process_and_frees_the_port(model: str, torchrun: bool, how: str) -> None:
    with running(model, torchrun) as (proc, port, pids, log_path):
        t0 = time.monotonic()
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole foreground process group
        else:
            os.kill(proc.pid, signal.SIGTERM)  # a service manager: the launcher alone
        took = _wait_gone(proc, pids, port, t0, log_path)
        print(f"\n{how} {'torchrun' if torchrun else 'python -m'}: every process gone, port free in {took:.2f} s")


@pytest.mark.parametrize("torchrun", [False, True], ids=["python-m", "torchrun"])
def test_kill9_of_the_launcher_takes_everything_with_it(model: str, torchrun: bool) -> None:
    key = "sk-not-on-any-command-line"
    with running(model, torchrun, env={"VLLM_API_KEY": key}) as (proc, port, pids, log_path):
        titles = {p: _title(p) for p in pids}
        # the API key comes from the environment and reaches the API server without a command line
        assert not [t for t in titles.values() if key in t]
        assert _http(f"http://127.0.0.1:{port}/v1/models")[0] == 401
        if not torchrun:  # one node, our launcher: nothing listens beyond loopback
            assert all(a.startswith(("127.", "::1:", "::ffff:127.")) for a in listening_addresses(pids)), \
                listening_addresses(pids)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        took = _wait_gone(proc, pids, port, t0, log_path)
        print(f"\nkill -9 {'torchrun' if torchrun else 'python -m'}: every process gone in {took:.2f} s")
    if not torchrun:
        # the processes say who they are (setproctitle; skipped where the module is missing)
        import importlib.util

        if importlib.util.find_spec("setproctitle") is not None:
            names = sorted(titles.values())
            assert any(t == "moe-rt: api-server" for t in names), names
            assert any(t == "moe-rt: coordinator" for t in names), names
            assert any(t.startswith("moe-rt: engine DP0") for t in names), names


@pytest.mark.parametrize("torchrun", [False, True], ids=["python-m", "torchrun"])
def test_busy_port_is_one_line_and_fatal(model: str, torchrun: bool) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"] \
            if torchrun else [sys.executable]
        t0 = time.monotonic()
        out = subprocess.run([*launcher, "-m", "runtime.serve", "--model", model, *CPU_FLAGS, "--port", str(port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120, start_new_session=True)
        took = time.monotonic() - t0
    assert out.returncode != 0
    line = f"error: port {port} on 127.0.0.1 is already in use"
    assert line in out.stderr, out.stderr[-3000:]
    if not torchrun:  # torchrun adds its own report of the failed worker
        assert [x for x in out.stderr.splitlines() if x.strip()] == [x for x in out.stderr.splitlines()
                                                                     if x.startswith("error: ")], out.stderr
    print(f"\nbusy port {'torchrun' if torchrun else 'python -m'}: exit {out.returncode} after {took:.2f} s")


def test_a_rank_that_cannot_start_ends_the_launch_without_restarts(model: str) -> None:
    # a KV cache too small for one sequence: every restart would fail the same way (FINDINGS: such errors
    # used to restart the rank group until --max-restarts was spent)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "runtime.serve", "--model", model, "--device", "cpu",
                          "--kv-cache-memory", "4096", "--max-restarts", "3", "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, start_new_session=True)
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "KV cache" in errors[0] and "max_model_len" in errors[0], out.stderr[-3000:]
    assert "restart" not in out.stderr.lower().replace("--max-restarts", ""), out.stderr[-3000:]
    print(f"\nrank config error: exit 2 after {took:.1f} s")


_BLOCKED_RANK = """
import os, sys, time
import torch, torch.distributed as dist
from runtime.cluster.procs import raise_on_stop_signals
dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
if sys.argv[1] == "0":
    time.sleep(60)  # never joins the broadcast: rank 1 waits inside gloo, in C++, as a GPU rank waits on NCCL
else:
    raise_on_stop_signals()
    print("ready", flush=True)
    dist.broadcast(torch.zeros(1), src=0)
"""


def test_a_rank_blocked_in_a_collective_stops_on_sigterm() -> None:
    """A rank stuck in a collective whose peer is gone runs no Python, so its StopSignal handler never runs
    (the elastic agent then waits 30 s before SIGKILL: each kill -9 recovery on GPUs took that much longer): the
    stop-signal watcher ends it with the signal's exit code a grace period later."""
    from runtime.cluster.procs import STOP_GRACE_S

    port = str(_free_port())
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _BLOCKED_RANK, str(r), port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    try:
        assert procs[1].stdout.readline().strip() == b"ready"
        # inside the broadcast: its main thread asleep in the kernel (nothing else after "ready" sleeps). Before
        # that, SIGTERM would meet the Python handler, not the watcher this test is about (a fixed wait flaked on
        # a loaded machine)
        deadline = time.monotonic() + 30
        while _state(procs[1].pid) != "S":
            assert time.monotonic() < deadline, f"rank 1 never blocked: state {_state(procs[1].pid)}"
            time.sleep(0.01)
        t0 = time.monotonic()
        procs[1].send_signal(signal.SIGTERM)
        rc = procs[1].wait(timeout=STOP_GRACE_S + 10)
        took = time.monotonic() - t0
        print(f"\nblocked rank stopped {took:.1f} s after SIGTERM")
        assert rc == 128 + signal.SIGTERM and took < STOP_GRACE_S + 5
    finally:
        for p in procs:
            p.kill()
            p.wait()
