"""Process groups, made here and nowhere else: a DP x TP mesh over the world, EP derived from it.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT).
world_size = DP * TP; global rank = dp_rank * TP + tp_rank, so a TP group is TP consecutive ranks (one node
with the usual --nproc-per-node). Each DP rank (a TP group) is a full replica of the model with its own KV
cache; with expert parallel on, the experts of each MoE layer are split over the whole DP x TP world
(ep_size = world_size, ep_rank = global rank). NCCL on GPUs (device from LOCAL_RANK), gloo on the CPU; every
TP group also gets a gloo group for the step plans its TP rank 0 broadcasts (runtime/engine/tp_plan.py).
"""

from __future__ import annotations

import datetime
import logging
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runtime.config import ConfigError, EngineConfig

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelState:
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int
    ep_size: int
    device: torch.device
    ep_group: Any = None  # torch ProcessGroup of the EP ranks; None when ep_size == 1
    local_rank: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None  # this DP rank's TP ranks (NCCL on GPUs): the model's all-reduces and gathers
    tp_cpu_group: Any = None  # the same ranks over gloo, no timeout to speak of: step plans while idle

    @property
    def is_ep(self) -> bool:
        return self.ep_size > 1

    @property
    def is_tp_leader(self) -> bool:
        """TP rank 0: the one that talks to the coordinator and the front end for its DP rank."""
        return self.tp_rank == 0

    @property
    def tp_src(self) -> int:
        """Global rank of this TP group's rank 0 (the source of its step plans)."""
        return self.rank - self.tp_rank


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @staticmethod
    def from_env(env: Mapping[str, str]) -> LaunchEnv:
        try:
            world_size = int(env.get("WORLD_SIZE", "1"))
            local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
            return LaunchEnv(int(env.get("RANK", "0")), world_size, int(env.get("LOCAL_RANK", "0")),
                             local_world_size)
        except ValueError as e:
            raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None


def check_sizes(config: EngineConfig, world_size: int, local_world_size: int, num_gpus: int | None,
                num_experts: int) -> int:
    """Validates the layout before any group exists; returns ep_size. num_gpus None = CPU ranks."""
    dp, tp = config.data_parallel_size, config.tensor_parallel_size
    if world_size % dp:
        raise ConfigError(f"{world_size} ranks are not divisible by --data-parallel-size {dp}")
    if world_size != dp * tp:
        raise ConfigError(
            f"{world_size} ranks but --data-parallel-size {dp} x --tensor-parallel-size {tp} = {dp * tp}: "
            f"launch exactly {dp * tp} ranks (torchrun --nproc-per-node {dp * tp})"
        )
    if num_gpus is not None and local_world_size > num_gpus:
        raise ConfigError(
            f"{local_world_size} ranks on this node but only {num_gpus} GPU(s) visible: "
            f"use --nproc-per-node <= {num_gpus} or --device cpu"
        )
    ep_size = world_size if config.enable_expert_parallel else 1
    if config.enable_expert_parallel and num_experts == 0:
        raise ConfigError("--enable-expert-parallel was given but the model has no routed experts (dense model)")
    if ep_size > 1 and num_experts % ep_size:
        raise ConfigError(f"{num_experts} experts are not divisible by the expert-parallel size {ep_size}; "
                          f"choose a --data-parallel-size that divides {num_experts}")
    return ep_size


def check_tp_shapes(hf_config: dict[str, Any], tp_size: int, ep_size: int) -> None:
    """Builds the model on the meta device as TP rank 0 would: a head count, KV head count or intermediate
    size the TP size does not divide fails here, at start, in one line (vocab is padded, so it always works)."""
    if tp_size == 1:
        return
    import torch

    from models.args import ModelArgs, TensorParallel
    from models.registry import build_model

    args = ModelArgs(dtype=torch.float32, device="meta", ep_size=ep_size, tp=TensorParallel(0, tp_size))
    try:
        with torch.device("meta"):
            build_model(hf_config, args)
    except ValueError as e:
        raise ConfigError(f"{e} (--tensor-parallel-size {tp_size})") from None


def init_parallel(config: EngineConfig, env: Mapping[str, str] | None = None,
                  timeout_s: float = 600.0) -> ParallelState:
    """Reads the launcher's env, validates, picks the device and makes the groups (one process = one rank)."""
    import torch
    import torch.distributed as dist

    env = os.environ if env is None else env
    launch = LaunchEnv.from_env(env)
    device = config.resolved_device()
    num_gpus = torch.cuda.device_count() if device.type == "cuda" else None
    ep_size = check_sizes(config, launch.world_size, launch.local_world_size, num_gpus,
                          config.model_info().num_experts)
    tp_size = config.tensor_parallel_size
    check_tp_shapes(config.hf_config(), tp_size, ep_size)
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    elif launch.local_world_size > 1:
        # CPU ranks share the host's cores: oversubscribed intra-op threads make every rank crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world_size))
    ep_group = tp_group = tp_cpu_group = None
    if launch.world_size > 1:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are unset: launch with torchrun")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            # env:// joins torchrun's (or the elastic launcher's) own store instead of starting a second one
            init = "env://" if env is os.environ else f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
            timeout = datetime.timedelta(seconds=timeout_s)
            store, _, _ = next(dist.rendezvous(init, launch.rank, launch.world_size, timeout=timeout))
            # the launcher's store outlives a restart of the ranks: without a prefix per incarnation the new
            # ranks read the dead ones' gloo/NCCL addresses and fail to connect
            store = dist.PrefixStore(f"moe-rt/restart{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(
                backend, store=store,
                rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                device_id=device if device.type == "cuda" else None,
            )
        if tp_size > 1:
            # every rank makes every group, in the same order (new_group is collective over the world)
            idle = datetime.timedelta(days=365)  # followers wait in a broadcast for as long as the server idles
            for dp_rank in range(launch.world_size // tp_size):
                ranks = list(range(dp_rank * tp_size, (dp_rank + 1) * tp_size))
                group = dist.new_group(ranks)
                cpu_group = dist.new_group(ranks, backend="gloo", timeout=idle)
                if launch.rank in ranks:
                    tp_group, tp_cpu_group = group, cpu_group
        if ep_size > 1:
            # ep_size == world_size: the EP group is the whole DP x TP world, i.e. the default group, whose NCCL
            # communicator exists anyway (device_id makes it at init): a second one for the same ranks would only
            # hold more GPU memory. A future DP x EP split (several EP groups) changes only these lines.
            ep_group = dist.group.WORLD if ep_size == launch.world_size else dist.new_group(list(range(ep_size)))
    rank = launch.rank
    return ParallelState(rank=rank, world_size=launch.world_size, dp_rank=rank // tp_size,
                         dp_size=launch.world_size // tp_size, ep_rank=rank % ep_size, ep_size=ep_size, device=device,
                         ep_group=ep_group, local_rank=launch.local_rank, tp_rank=rank % tp_size, tp_size=tp_size,
                         tp_group=tp_group, tp_cpu_group=tp_cpu_group)


def single_rank(device: torch.device | str = "cpu") -> ParallelState:
    import torch

    return ParallelState(rank=0, world_size=1, dp_rank=0, dp_size=1, ep_rank=0, ep_size=1,
                         device=torch.device(device))


# CUDA graphs alive when the process group goes: with an NCCL collective captured in one, destroy_process_group()
# hangs in ncclCommDestroy (pytorch/pytorch#115388), so every captured graph is tracked and released first
_captured_graphs: weakref.WeakSet[Any] = weakref.WeakSet()


def track_cuda_graph(graph: torch.cuda.CUDAGraph) -> torch.cuda.CUDAGraph:
    _captured_graphs.add(graph)
    return graph


def destroy_parallel() -> None:
    import torch
    import torch.distributed as dist

    # best effort: on the error path a sticky CUDA error can make the sync or a reset raise; the group still goes
    try:
        if _captured_graphs and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        for graph in list(_captured_graphs):
            graph.reset()
    except RuntimeError as e:
        logger.warning("releasing CUDA graphs before the process group teardown failed: %s", e)
    _captured_graphs.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
