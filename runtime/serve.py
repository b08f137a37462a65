"""Start a deployment: N engine ranks, the DP coordinator and the OpenAI API server.

  torchrun --nproc-per-node N -m runtime.serve --model M --data-parallel-size N [--enable-expert-parallel]
      every torchrun worker is one engine rank; rank 0 first starts the coordinator and the API server as
      separate processes with CUDA_VISIBLE_DEVICES="" (before it touches CUDA itself).
  python -m runtime.serve --model M --data-parallel-size N ...
      this process starts the coordinator and the API server, then the N ranks with torch's elastic
      launcher (restarting them up to --max-restarts times), and waits.
Multi-node is torchrun across nodes (--nnodes, --rdzv-endpoint); sockets then use tcp on rank 0's node.

Crashes: the coordinator and the API server live in their own sessions, so they outlive the ranks; when a
rank dies the launcher restarts the whole group (up to --max-restarts), the new ranks say hello with a
higher epoch and the front end re-submits the requests in flight. The coordinator watches the launcher
process: once it is gone (restart budget spent) the front end answers every waiting client with a 503.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping

import msgspec

from runtime.config import ConfigError, EngineConfig
from runtime.control_watch import ControlPlaneWatch
from runtime.messages import Addresses

logger = logging.getLogger("runtime.serve")


def parse_args(argv: list[str] | None = None) -> tuple[EngineConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineConfig.add_cli_args(parser)
    parser.add_argument("--headless", action="store_true",
                        help="start no API server: a front end of your own binds the to_frontend socket")
    parser.add_argument("--ipc-dir", default=None, help="folder for the ZMQ ipc sockets (default: a temp folder)")
    args = parser.parse_args(argv)
    try:
        config = EngineConfig.from_cli(args)
        check_launch(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return config, args


def check_launch(config: EngineConfig, env: Mapping[str, str] | None = None) -> None:
    """Fails fast (ConfigError) on layouts that cannot work, before any process starts."""
    from runtime.parallel import LaunchEnv, check_sizes, num_experts_of

    env = os.environ if env is None else env
    under_torchrun = "LOCAL_RANK" in env
    launch = LaunchEnv.from_env(env) if under_torchrun else None
    world = launch.world_size if launch else config.data_parallel_size
    local_world = launch.local_world_size if launch else config.data_parallel_size
    num_gpus = None
    if config.device != "cpu":
        import torch

        # device_count reads NVML/driver state without creating a CUDA context
        count = torch.cuda.device_count()
        num_gpus = count if count > 0 or config.device == "cuda" else None
        if config.device == "cuda" and count == 0:
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    ep_size = check_sizes(config, world, local_world, num_gpus, num_experts_of(config.hf_config()))
    if ep_size > 1 and config.expert_token_capacity is not None:
        from runtime.all2all import validate_capacity

        validate_capacity(config.expert_token_capacity, config.max_num_seqs, config.max_num_batched_tokens)


def torchrun_addresses(env: Mapping[str, str], num_ranks: int, ipc_dir: str | None) -> Addresses:
    """Every torchrun worker derives the same addresses from its environment, no exchange needed."""
    if int(env.get("LOCAL_WORLD_SIZE", "1")) < int(env.get("WORLD_SIZE", "1")):  # several nodes
        return Addresses.tcp(env["MASTER_ADDR"], int(env["MASTER_PORT"]) + 1, num_ranks)
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    run_dir = ipc_dir or os.path.join(tempfile.gettempdir(), f"moe-rt-{run_id}-{env.get('MASTER_PORT', '0')}")
    os.makedirs(run_dir, exist_ok=True)
    return Addresses.ipc(run_dir, num_ranks)


def _cpu_only_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA context can ever be made in these processes
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK"):
        env.pop(key, None)
    return env


def start_control_plane(config: EngineConfig, addrs: Addresses, lockstep: bool, api_server: bool = True,
                        watch_pid: int | None = None, max_restarts: int | None = None) -> list[subprocess.Popen]:
    """The coordinator (and the API server) in their own sessions, so a restart of the ranks spares them.
    watch_pid: the launcher that restarts the ranks; the control plane stops once it has exited."""
    from runtime.coordinator import CoordinatorSpec

    spec = CoordinatorSpec(num_ranks=config.data_parallel_size, lockstep=lockstep,
                           log_stats=not config.disable_log_stats, log_stats_interval=config.log_stats_interval,
                           expert_stats_file=config.expert_stats_file, watch_pid=watch_pid, max_restarts=max_restarts,
                           hang_timeout_s=config.engine_hang_timeout, routing=config.dp_routing,
                           block_size=config.block_size, mixed_step_token_budget=config.mixed_step_token_budget)
    env = _cpu_only_env()
    procs = [subprocess.Popen([sys.executable, "-m", "runtime.coordinator", msgspec.json.encode(spec).decode(),
                               msgspec.json.encode(addrs).decode()], env=env, start_new_session=True)]
    if api_server:
        code = "import sys; from runtime.serve import api_server_main; api_server_main(sys.argv[1], sys.argv[2])"
        procs.append(subprocess.Popen([sys.executable, "-c", code, msgspec.json.encode(config).decode(),
                                       msgspec.json.encode(addrs).decode()], env=env, start_new_session=True))
    return procs


def watch_control_plane(procs: list[subprocess.Popen]) -> ControlPlaneWatch:
    """Restart the coordinator / API server when one dies (runtime/control_watch.py)."""
    watch = ControlPlaneWatch(procs, ["coordinator", "API server"][: len(procs)], _cpu_only_env())
    watch.start()
    return watch


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()


def api_server_main(config_json: str, addrs_json: str) -> None:
    from server.api_server import run_api_server

    run_api_server(msgspec.json.decode(config_json, type=EngineConfig), msgspec.json.decode(addrs_json, type=Addresses))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(config: EngineConfig, addrs: Addresses) -> None:
    """N engine ranks on this node through torch's elastic launcher (blocks until they exit)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from runtime.engine_proc import engine_main

    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=config.data_parallel_size,
                          run_id=f"moe-rt-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=config.max_restarts,
                          monitor_interval=0.5, start_method="spawn")
    elastic_launch(launch, engine_main)(msgspec.json.encode(config).decode(), msgspec.json.encode(addrs).decode())


def serve(config: EngineConfig, api_server: bool = True, ipc_dir: str | None = None) -> None:
    """python -m runtime.serve without torchrun: control plane here, ranks through the elastic launcher."""
    run_dir = ipc_dir or tempfile.mkdtemp(prefix="moe-rt-")
    os.makedirs(run_dir, exist_ok=True)
    addrs = Addresses.ipc(run_dir, config.data_parallel_size)
    procs = start_control_plane(config, addrs, lockstep=config.enable_expert_parallel, api_server=api_server,
                                watch_pid=os.getpid(), max_restarts=config.max_restarts)
    watch = watch_control_plane(procs)
    try:
        launch_ranks(config, addrs)
    except KeyboardInterrupt:
        logger.info("interrupted: shutting down")
    except Exception as e:  # the launcher's SignalException (SIGTERM) / ChildFailedError, named not imported
        if type(e).__name__ == "SignalException":
            logger.info("%s: shutting down", e)
        elif type(e).__name__ == "ChildFailedError":
            print(f"error: engine ranks failed (restarts used up, --max-restarts {config.max_restarts}); "
                  "the first failure's traceback is above", file=sys.stderr)
            watch.stop()  # what stops now stays stopped
            _fail_clients(procs, addrs, f"the engine ranks failed and the restart budget (--max-restarts "
                                        f"{config.max_restarts}) is spent")
            sys.exit(1)
        else:
            raise
    finally:
        watch.stop()
        stop_processes(procs)
        if ipc_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)


def _fail_clients(procs: list[subprocess.Popen], addrs: Addresses, reason: str, timeout_s: float = 15.0) -> None:
    """Tell the front end the ranks are gone for good: it answers every waiting client with a 503 and exits
    by itself. Wait for that before stopping what is left (a plain SIGTERM would leave streams hanging)."""
    import zmq

    from runtime.messages import EngineDead, encode

    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(addrs.to_frontend)
        push.send(encode(EngineDead(reason=reason)), zmq.NOBLOCK)
    except zmq.ZMQError as e:
        logger.warning("could not tell the front end that the ranks are gone: %s", e)
    finally:
        ctx.destroy(linger=2000)
    stop_processes(procs[:1])  # the coordinator
    for p in procs[1:]:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass


def serve_torchrun_worker(config: EngineConfig, api_server: bool, ipc_dir: str | None) -> None:
    from runtime.engine_proc import engine_main

    env = os.environ
    addrs = torchrun_addresses(env, config.data_parallel_size, ipc_dir)
    procs: list[subprocess.Popen] = []
    # rank 0 owns the control plane; after an elastic restart it is still running. It watches torchrun's
    # agent (this worker's parent), not this worker: a SIGKILLed rank 0 must not orphan it, nor stop it
    if env.get("RANK") == "0" and env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        procs = start_control_plane(config, addrs, lockstep=config.enable_expert_parallel, api_server=api_server,
                                    watch_pid=os.getppid(), max_restarts=int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")))
    # only while this first rank 0 lives (a restarted rank 0 does not own the control plane)
    watch = watch_control_plane(procs) if procs else None

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # torchrun stops workers with SIGTERM: unwind, so rank 0 stops its children

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        engine_main(msgspec.json.encode(config).decode(), msgspec.json.encode(addrs).decode())
    finally:
        if watch is not None:
            watch.stop()
        stop_processes(procs)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "LOCAL_RANK" in os.environ:
        serve_torchrun_worker(config, not args.headless, args.ipc_dir)
    else:
        serve(config, not args.headless, args.ipc_dir)


if __name__ == "__main__":
    main()
