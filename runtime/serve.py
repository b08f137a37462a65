"""Start a deployment: N engine ranks, the DP coordinator and the OpenAI API server.

  torchrun --nproc-per-node N -m runtime.serve --model M --data-parallel-size D [--tensor-parallel-size T]
          [--enable-expert-parallel]
      N = D x T workers; each group of T consecutive workers is one engine (DP rank), its TP rank 0 the one
      that talks to the coordinator and the front end; rank 0 first starts the coordinator and the API server as
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
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping

import msgspec

from runtime.cluster.control_watch import ControlPlaneWatch
from runtime.cluster.procs import (
    FATAL_FILE_ENV,
    check_port_free,
    exit_now,
    loopback_worker_store,
    read_fatal,
    set_title,
    torchrun_secret,
)
from runtime.config import ConfigError, EngineConfig
from runtime.messages import SECRET_ENV, Addresses, secret_from_env, use_secret

logger = logging.getLogger("runtime.serve")

API_KEY_ENV = "VLLM_API_KEY"  # vLLM's name; EngineConfig.from_cli reads it too


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default after its help (unless the help names it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__, formatter_class=HelpFormatter)
    EngineConfig.add_cli_args(parser)
    parser.add_argument("--headless", action="store_true",
                        help="start no API server: a front end of your own binds the to_frontend socket")
    parser.add_argument("--ipc-dir", default=None, help="folder for the ZMQ ipc sockets (default: a temp folder)")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[EngineConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = EngineConfig.from_cli(args)
        check_launch(config)
        if not args.headless and starts_control_plane(os.environ):
            check_port_free(config.host, config.port)  # before any process starts: a busy port is fatal
        if starts_control_plane(os.environ):
            check_control_ports(os.environ, config.data_parallel_size, front_end=not args.headless)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if "LOCAL_RANK" in os.environ:  # a torchrun worker: end the launch, or torchrun restarts it blindly
            os.kill(os.getppid(), signal.SIGTERM)
        sys.exit(2)
    return config, args


def starts_control_plane(env: Mapping[str, str]) -> bool:
    """python -m runtime.serve, or torchrun's rank 0 in its first incarnation (a restart keeps the old one)."""
    return "LOCAL_RANK" not in env or (env.get("RANK") == "0" and env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")


def check_launch(config: EngineConfig, env: Mapping[str, str] | None = None) -> None:
    """Fails fast (ConfigError) on layouts that cannot work, before any process starts."""
    from runtime.distributed.parallel import LaunchEnv, check_sizes, check_tp_shapes

    env = os.environ if env is None else env
    under_torchrun = "LOCAL_RANK" in env
    launch = LaunchEnv.from_env(env) if under_torchrun else None
    world = launch.world_size if launch else config.data_parallel_size * config.tensor_parallel_size
    local_world = launch.local_world_size if launch else world
    num_gpus = None
    if config.device != "cpu":
        import torch

        # device_count reads NVML/driver state without creating a CUDA context
        count = torch.cuda.device_count()
        num_gpus = count if count > 0 or config.device == "cuda" else None
        if config.device == "cuda" and count == 0:
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    ep_size = check_sizes(config, world, local_world, num_gpus, config.model_info().num_experts)
    check_tp_shapes(config.hf_config(), config.tensor_parallel_size, ep_size)
    if ep_size > 1 and config.expert_token_capacity is not None and config.all2all_backend == "allgather":
        from runtime.distributed.all2all import validate_capacity

        validate_capacity(config.expert_token_capacity, config.max_num_seqs, config.max_num_batched_tokens)


def torchrun_addresses(env: Mapping[str, str], num_ranks: int, ipc_dir: str | None) -> Addresses:
    """Every torchrun worker derives the same addresses from its environment, no exchange needed."""
    if int(env.get("LOCAL_WORLD_SIZE", "1")) < int(env.get("WORLD_SIZE", "1")):  # several nodes
        return Addresses.tcp(env["MASTER_ADDR"], int(env["MASTER_PORT"]) + 1, num_ranks)
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    run_dir = ipc_dir or os.path.join(tempfile.gettempdir(), f"moe-rt-{run_id}-{env.get('MASTER_PORT', '0')}")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    if ipc_dir is None:
        # a predictable name in a shared /tmp: it must be ours and closed to others (the sockets are the API)
        st = os.lstat(run_dir)
        if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{run_dir} exists and is not a folder of this user: remove it or pass --ipc-dir")
        if st.st_mode & 0o077:
            os.chmod(run_dir, 0o700)
    return Addresses.ipc(run_dir, num_ranks)


def check_control_ports(env: Mapping[str, str], num_ranks: int, front_end: bool = True) -> None:
    """Across nodes the control plane's sockets are tcp ports MASTER_PORT + 1 .. on node 0 (torchrun_addresses):
    one already in use is a one-line error now, not a coordinator that dies binding it after the ranks started.
    front_end False (--headless): the front end's port is the user's own front end's, bound already."""
    if "LOCAL_RANK" not in env or int(env.get("LOCAL_WORLD_SIZE", "1")) >= int(env.get("WORLD_SIZE", "1")):
        return  # one node: ipc:// sockets in a folder
    first = int(env["MASTER_PORT"]) + 1
    advice = "pick another --master-port (with c10d rendezvous: launch again)"
    if first + 1 + num_ranks > 65535:
        raise ConfigError(f"the control plane needs ports {first}..{first + 1 + num_ranks} (MASTER_PORT + 1 ..), "
                          f"past 65535: {advice}")
    addrs = torchrun_addresses(env, num_ranks, None)
    for address in (addrs.to_coordinator, *([addrs.to_frontend] if front_end else []), *addrs.to_engines):
        port = int(address.rsplit(":", 1)[1])
        try:
            check_port_free("0.0.0.0", port)
        except ConfigError:
            raise ConfigError(f"port {port} is in use on this node, and the control plane needs ports {first}.."
                              f"{first + 1 + num_ranks} (MASTER_PORT + 1 ..): {advice}") from None


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
    from runtime.cluster.coordinator import CoordinatorSpec

    spec = CoordinatorSpec(num_ranks=config.data_parallel_size, lockstep=lockstep,
                           log_stats=not config.disable_log_stats, log_stats_interval=config.log_stats_interval,
                           expert_stats_file=config.expert_stats_file, watch_pid=watch_pid, max_restarts=max_restarts,
                           hang_timeout_s=config.engine_hang_timeout, routing=config.dp_routing,
                           block_size=config.block_size, mixed_step_token_budget=config.mixed_step_token_budget)
    env = _cpu_only_env()
    procs = [subprocess.Popen([sys.executable, "-m", "runtime.cluster.coordinator", msgspec.json.encode(spec).decode(),
                               msgspec.json.encode(addrs).decode()], env=env, start_new_session=True)]
    if api_server:
        # the API key travels in the environment (readable by this user only), never on a command line (ps)
        env.pop(API_KEY_ENV, None)
        if config.api_key:
            env[API_KEY_ENV] = config.api_key
        code = ("import sys; from runtime.serve import api_server_main; "
                "api_server_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
        procs.append(subprocess.Popen([sys.executable, "-c", code, msgspec.json.encode(config.replace(api_key=None))
                                       .decode(), msgspec.json.encode(addrs).decode(), str(watch_pid or 0)], env=env,
                                      start_new_session=True))
    return procs


def watch_control_plane(procs: list[subprocess.Popen]) -> ControlPlaneWatch:
    """Restart the coordinator / API server when one dies (runtime/cluster/control_watch.py)."""
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


def api_server_main(config_json: str, addrs_json: str, watch_pid: int = 0) -> None:
    """watch_pid: the launcher; the API server stops once it has exited (0: none)."""
    from server.api_server import run_api_server

    set_title("moe-rt: api-server")
    use_secret(secret_from_env())
    config = msgspec.json.decode(config_json, type=EngineConfig)
    config = config.replace(api_key=os.environ.get(API_KEY_ENV) or None)  # start_control_plane put it there
    run_api_server(config, msgspec.json.decode(addrs_json, type=Addresses), watch_pid or None)


def launch_ranks(config: EngineConfig, addrs: Addresses) -> None:
    """DP x TP engine ranks on this node through torch's elastic launcher (blocks until they exit)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # one node, no network: the rendezvous store is a file in a private folder, the ranks' store listens on
    # loopback only (torch's defaults listen on every interface)
    rdzv_dir = tempfile.mkdtemp(prefix="moe-rt-rdzv-")
    world = config.data_parallel_size * config.tensor_parallel_size
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world,
                          run_id=f"moe-rt-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint=os.path.join(rdzv_dir, "store"), rdzv_configs={"store_type": "file"},
                          local_addr="127.0.0.1", max_restarts=config.max_restarts, monitor_interval=0.5,
                          start_method="spawn")
    config = config.replace(api_key=None)  # the ranks never need it
    try:
        with loopback_worker_store():
            elastic_launch(launch, elastic_rank_main)(msgspec.json.encode(config).decode(),
                                                      msgspec.json.encode(addrs).decode())
    finally:
        shutil.rmtree(rdzv_dir, ignore_errors=True)


def elastic_rank_main(config_json: str, addrs_json: str) -> None:
    """One rank under the elastic launcher: stopped by a signal, it exits at once (runtime/cluster/procs.py)."""
    from runtime.cluster.rank_loop import engine_main

    try:
        engine_main(config_json, addrs_json)
    except SystemExit as e:
        if isinstance(e.code, int) and e.code > 128:
            exit_now(e.code)
        raise


def serve(config: EngineConfig, api_server: bool = True, ipc_dir: str | None = None) -> None:
    """python -m runtime.serve without torchrun: control plane here, ranks through the elastic launcher."""
    # one secret per deployment, inherited by every process it starts: each socket frame carries its MAC
    os.environ[SECRET_ENV] = secret_from_env() or secrets.token_hex(32)
    use_secret(os.environ[SECRET_ENV])
    run_dir = ipc_dir or tempfile.mkdtemp(prefix="moe-rt-")
    os.makedirs(run_dir, exist_ok=True)
    addrs = Addresses.ipc(run_dir, config.data_parallel_size)
    procs = start_control_plane(config, addrs, lockstep=config.needs_lockstep, api_server=api_server,
                                watch_pid=os.getpid(), max_restarts=config.max_restarts)
    stopped = False
    fatal_path = os.environ[FATAL_FILE_ENV] = os.path.join(run_dir, "fatal")  # a rank's reason to end it all
    fatal: str | None = None
    watch = watch_control_plane(procs)
    try:
        launch_ranks(config, addrs)
    except KeyboardInterrupt:
        logger.info("interrupted: shutting down")
        stopped = True
    except Exception as e:  # the launcher's SignalException (SIGTERM) / ChildFailedError, named not imported
        if type(e).__name__ == "SignalException":
            fatal = read_fatal(fatal_path)  # a rank ended the launch (end_launch): say why, exit 2
            if fatal is None:
                logger.info("%s: shutting down", e)
            stopped = True
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
        # the coordinator first: its last word (EngineDead) reaches a front end that is still there; stopped
        # together, the front end may be gone first and the coordinator wait out its 1 s linger for it
        stop_processes(procs[:1])
        stop_processes(procs[1:])
        if ipc_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    if fatal is not None:
        print(f"error: {fatal}", file=sys.stderr)
        exit_now(2)
    if stopped:  # a clean stop; skip the seconds the interpreter's teardown of torch's launcher takes
        exit_now(0)


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
    from runtime.cluster.rank_loop import engine_main

    env = os.environ
    secret = secret_from_env() or torchrun_secret(env)  # the user's (every node), else drawn by rank 0
    if secret is None:
        logger.warning("no %s and no shared agent store: engine sockets are not authenticated", SECRET_ENV)
    else:
        os.environ[SECRET_ENV] = secret  # for the control plane this rank starts, and engine_main
    addrs = torchrun_addresses(env, config.data_parallel_size, ipc_dir)
    procs: list[subprocess.Popen] = []
    # rank 0 owns the control plane; after an elastic restart it is still running. It watches torchrun's
    # agent (this worker's parent), not this worker: a SIGKILLed rank 0 must not orphan it, nor stop it
    if starts_control_plane(env):
        procs = start_control_plane(config, addrs, lockstep=config.needs_lockstep, api_server=api_server,
                                    watch_pid=os.getppid(), max_restarts=int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")))
    # only while this first rank 0 lives (a restarted rank 0 does not own the control plane)
    watch = watch_control_plane(procs) if procs else None

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # torchrun stops workers with SIGTERM: unwind, so rank 0 stops its children

    signal.signal(signal.SIGTERM, on_sigterm)
    code: object = None
    clean = False
    try:
        engine_main(msgspec.json.encode(config).decode(), msgspec.json.encode(addrs).decode())
        clean = True
    except SystemExit as e:
        code = e.code
        raise
    finally:
        if watch is not None:
            watch.stop()
        if isinstance(code, int) and code > 128:
            # stopped by a signal; this rank skips the interpreter's teardown. SIGTERM is also how torchrun's
            # agent stops the group to restart it after a rank died, and the control plane must outlive that:
            # it watches the agent and ends once the agent has exited (which is how a SIGTERM to torchrun
            # ends it). Ctrl-C (SIGINT) only ever means stop: the control plane, in its own session, gets it
            # from here.
            if code == 128 + signal.SIGINT:
                for p in procs:
                    p.terminate()
            exit_now(code)
        if clean:
            stop_processes(procs)
        # else this rank failed (a peer died under it, say): torchrun restarts the group and the control plane
        # carries on, or gives up and exits, which the coordinator sees (it fails every client and ends)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        set_title("moe-rt: launcher")  # a torchrun worker is an engine rank: engine_main names it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "LOCAL_RANK" in os.environ:
        serve_torchrun_worker(config, not args.headless, args.ipc_dir)
    else:
        serve(config, not args.headless, args.ipc_dir)


if __name__ == "__main__":
    main()
