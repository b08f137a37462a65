"""The expert all2all backends by name (--all2all-backend): one table, chosen here for each rank."""

from __future__ import annotations

from typing import Any

from runtime.config import ALL2ALL_BACKENDS, ConfigError, EngineConfig
from runtime.distributed.all2all import (
    All2AllBackend,
    AllGatherBackend,
    LocalBackend,
    default_capacity,
    validate_capacity,
)
from runtime.distributed.all2all_sparse import SparseBackend
from runtime.distributed.expert_stats import ExpertStats
from runtime.distributed.parallel import ParallelState

# the names match config.ALL2ALL_BACKENDS, which validates the flag without importing torch (a test checks)
BACKENDS: dict[str, type[All2AllBackend]] = {"allgather": AllGatherBackend, "sparse": SparseBackend}


def create_backend(name: str, parallel: ParallelState, num_experts: int, capacity: int,
                   stats: ExpertStats | None = None, **options: Any) -> All2AllBackend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown --all2all-backend {name!r}; available: {', '.join(ALL2ALL_BACKENDS)}")
    return BACKENDS[name](parallel, num_experts, capacity, stats, **options)


def make_backend(config: EngineConfig, parallel: ParallelState, num_experts: int,
                 stats: ExpertStats | None = None) -> All2AllBackend:
    """This rank's backend as the config asks (sparse by default when EP > 1; "local" when EP == 1)."""
    mnbt = config.max_num_batched_tokens
    if parallel.ep_size == 1:
        return LocalBackend(parallel, num_experts, mnbt, stats)
    name = config.all2all_backend or "sparse"
    if name == "allgather":
        capacity = config.expert_token_capacity or default_capacity(config.max_num_seqs, mnbt)
        return create_backend(name, parallel, num_experts,
                              validate_capacity(capacity, config.max_num_seqs, mnbt), stats)
    # sparse: a (source, destination) pair never carries more than T <= max_num_batched_tokens rows (a token
    # goes at most once to each rank), so this default never needs a second round; a smaller
    # --expert-token-capacity bounds each collective's message at the price of more rounds
    # decode and mixed-step graphs capture the exchange: both need the fixed-size path
    graph_max = max(config.cuda_graph_max_batch(parallel.device), config.mixed_cudagraph_tokens(parallel.device))
    static_max = config.all2all_static_max_tokens
    if static_max is not None and static_max < graph_max:
        raise ConfigError(f"--all2all-static-max-tokens {static_max} is below the largest CUDA-graph batch "
                          f"{graph_max}: a captured step cannot read counts on the host; raise it or lower "
                          f"--max-cudagraph-batch-size")
    return create_backend(name, parallel, num_experts, config.expert_token_capacity or mnbt, stats,
                          static_max_tokens=graph_max if static_max is None else static_max,
                          fp8_dispatch=config.all2all_fp8_dispatch, capacity_factor=config.all2all_capacity_factor)
