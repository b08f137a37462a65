"""At start, every rank checks that the settings which shape a collective or a CUDA graph are the same on
every rank (two torchrun nodes started with different flags would otherwise issue different collectives:
garbage on gloo, a hang or corruption on NCCL).

Each rank writes its values of AGREED_FIELDS (and a hash of the model's config.json: the architecture) to the
process group's store; each reads every other rank's and compares them with its own. Every rank that sees a
difference refuses with one line naming the first differing field, so the whole group stops, none waits.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from runtime.config import ConfigError, EngineConfig

# what decides the collectives' sizes and order, the graphs' buckets, the KV layout and the model's shapes
AGREED_FIELDS = (
    "data_parallel_size", "enable_expert_parallel", "expert_token_capacity", "max_num_seqs",
    "max_num_batched_tokens", "max_model_len", "block_size", "dtype", "quantization", "kernel_backend",
    "enforce_eager", "max_cudagraph_batch_size", "device", "tensor_parallel_size",
    "all2all_backend", "all2all_fp8_dispatch", "all2all_capacity_factor", "all2all_static_max_tokens",
    "max_mixed_cudagraph_tokens",
)
KEY = "moe-rt/config-agreement"


def agreed_values(config: EngineConfig) -> dict[str, str]:
    """Field -> repr of its value; fields this config does not have are left out."""
    values = {name: repr(getattr(config, name)) for name in AGREED_FIELDS if hasattr(config, name)}
    model = json.dumps(config.hf_config(), sort_keys=True).encode()
    values["model config.json"] = hashlib.sha256(model).hexdigest()[:16]
    return values


def first_difference(mine: dict[str, str], theirs: dict[str, str]) -> str | None:
    order = {name: i for i, name in enumerate(AGREED_FIELDS)}
    for name in sorted(mine.keys() | theirs.keys(), key=lambda n: (order.get(n, len(order)), n)):
        if mine.get(name) != theirs.get(name):
            return name
    return None


def check_agreement(config: EngineConfig, store: Any, rank: int, world_size: int,
                    values: dict[str, str] | None = None) -> None:
    """Raises ConfigError if any rank's agreed settings differ from this rank's. store: a torch.distributed
    Store shared by the group (the default group's, prefixed per incarnation); get() waits for the others."""
    mine = agreed_values(config) if values is None else values
    store.set(f"{KEY}/{rank}", json.dumps(mine))
    for other in range(world_size):
        if other == rank:
            continue
        theirs = json.loads(store.get(f"{KEY}/{other}"))
        name = first_difference(mine, theirs)
        if name is not None:
            flag = "--" + name.replace("_", "-") if name in AGREED_FIELDS else f"the model's {name}"
            raise ConfigError(
                f"ranks disagree on {flag}: rank {rank} has {mine.get(name)}, rank {other} has "
                f"{theirs.get(name)}; start every rank with the same settings (and the same model)")


def check_group_agreement(config: EngineConfig, parallel: Any) -> None:
    """check_agreement over the default process group's store (a no-op for one rank)."""
    if parallel.world_size <= 1:
        return
    import torch.distributed as dist

    check_agreement(config, dist.distributed_c10d._get_default_store(), parallel.rank, parallel.world_size)
