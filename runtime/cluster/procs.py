"""Process plumbing of a deployment (no torch): readable titles, dying with the launcher, stop signals that
end a rank at once, and the API port checked before anything starts."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, NoReturn

from runtime.config import ConfigError

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_title(title: str) -> None:
    """What ps, top and nvidia-smi show for this process ('moe-rt: coordinator', ...). The module is a
    declared dependency; a machine without it only loses the names."""
    # keep /proc/PID/environ intact (the title then has to fit the original command line, which ours do)
    os.environ.setdefault("SPT_NOENV", "1")
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send sig to this process when its parent (the launcher) dies, kill -9 included, so
    no rank is left orphaned holding its GPU. Linux only; False where unsupported.
    The parent that counts is the thread that forked us: both launchers start ranks from their main thread."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect (launcher as PID 1 is fine)
        os.kill(os.getpid(), sig)
    return True


class StopSignal(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind now (a KeyboardInterrupt, so every `except Exception` lets it pass)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for 'ended by this signal'


FATAL_FILE_ENV = "MOE_RT_FATAL_FILE"  # set by the launcher: where a rank leaves the reason it ended the launch


def end_launch(message: str) -> NoReturn:
    """A rank's settings cannot work (too little memory for one sequence, ranks that disagree): a restart
    would fail the same way, so the rank tells its launcher (its parent: the elastic agent or torchrun) to
    stop rather than restart the rank group, leaves the reason for it, and exits 2."""
    path = os.environ.get(FATAL_FILE_ENV)
    if path:  # python -m runtime.serve: the launcher prints it, once
        with open(path, "a") as f:
            f.write(message.replace("\n", " ") + "\n")
    else:  # torchrun: this is the only place it can be said
        print(f"error: {message}", file=sys.stderr)
    os.kill(os.getppid(), signal.SIGTERM)
    exit_now(2)


def read_fatal(path: str) -> str | None:
    """The first reason a rank left for ending the launch, if any."""
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def exit_now(code: int) -> NoReturn:
    """Ends the process without the interpreter's teardown, which can wait seconds on the threads of torch's
    process groups and launcher; for a process stopped by a signal, whose work is over."""
    from multiprocessing import util

    # what a normal exit does first: finalizers unlink this process's semaphores (else the resource tracker
    # warns of leaks); the slow part skipped is torch's C++ teardown
    util._run_finalizers(0)
    logging.shutdown()  # flush the log
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


STOP_GRACE_S = 2.0  # how long a stop signal waits for the main thread to unwind before the process just ends


def raise_on_stop_signals() -> None:
    """SIGINT / SIGTERM raise StopSignal in the main thread. Python runs that handler only once the main thread
    is back in the interpreter, and a rank waiting on the GPU for a collective whose peer died (kill -9 of
    another rank: NCCL spins until its timeout) never is: torch's elastic agent then waits its 30 s before a
    SIGKILL. The signal also reaches a watcher thread (through the wakeup fd), which ends the process with the
    same code STOP_GRACE_S later if it is still there."""
    def handler(signum: int, frame: object) -> None:
        raise StopSignal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            got = os.read(r, 1)
            if got and got[0] in (signal.SIGINT, signal.SIGTERM):
                break
        time.sleep(STOP_GRACE_S)
        logging.getLogger(__name__).warning("%s: the main thread did not stop in %.0f s (blocked in a GPU or "
                                            "collective call): ending the process",
                                            signal.Signals(got[0]).name, STOP_GRACE_S)
        exit_now(128 + got[0])

    threading.Thread(target=watch, name="stop-watch", daemon=True).start()


def check_port_free(host: str, port: int) -> None:
    """ConfigError naming the port when the API server could not bind it, checked before any process starts.
    Bound the way uvicorn binds (SO_REUSEADDR), so a port in TIME_WAIT is not reported busy."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use: stop what holds it or pass --port "
                                  "another port") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): check --host and --port") from None


@contextmanager
def loopback_worker_store() -> Iterator[None]:
    """The elastic agent hosts the TCPStore its workers share, and torch binds it on every interface; on one
    node nobody else needs it: hand torch a listening socket bound to 127.0.0.1 (TCPStore's master_listen_fd).
    A torch without that hook keeps its default (and says so)."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    handler = dynamic_rendezvous.DynamicRendezvousHandler
    original = getattr(handler, "_create_tcp_store_server", None)
    if original is None:
        logging.getLogger("runtime.serve").warning("this torch has no hook to bind the rank store to loopback")
        yield
        return

    def create(self: Any, master_addr: str, master_port: int) -> Any:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", master_port))
        sock.listen(128)
        port = sock.getsockname()[1]
        return dist.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, master_listen_fd=sock.detach())

    handler._create_tcp_store_server = create
    try:
        yield
    finally:
        handler._create_tcp_store_server = original


SECRET_STORE_KEY = "moe-rt/secret"


def torchrun_secret(env: Mapping[str, str], timeout_s: float = 300.0) -> str | None:
    """The deployment secret for torchrun workers that were given none (MOE_RT_SECRET): rank 0 of the first
    incarnation draws it and every other worker (and rank 0 after a restart) reads it from torchrun's agent
    store, which lives as long as the launch. None when the workers do not share the agent's store."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    import torch.distributed as dist

    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    if env.get("RANK") == "0" and env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        store.set(SECRET_STORE_KEY, secrets.token_hex(32))
    return store.get(SECRET_STORE_KEY).decode()
