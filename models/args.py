"""What a model needs to be built: dtype, device, kernel choice, its tensor-parallel group and expert-parallel slice."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from runtime.distributed.all2all import All2AllBackend


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its TP group; the group is made in runtime/distributed/parallel.py and handed down."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch ProcessGroup of the TP ranks (None when size == 1)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp rank must be in [0, tp size={self.size}), got {self.rank}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's x (same shape) concatenated along dim, in TP-rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        if x.is_cuda:  # one NCCL call into one buffer (graph-capturable); gloo has only the list form
            out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)
            parts = list(out.chunk(self.size))
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def gather_to_first(self, x: torch.Tensor, dim: int) -> torch.Tensor | None:
        """Every rank's x (same shape) concatenated along dim on TP rank 0, in TP-rank order; None on the others
        (the logits: only TP rank 0 samples, so the peers need not receive them)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, group=self.group, group_dst=0)
        return torch.cat(parts, dim=dim) if parts is not None else None


FUSION_SWITCHES = {"fuse_moe_sum": ("MOE_RT_FUSE_MOE_SUM", True),
                   "fuse_router_norm": ("MOE_RT_FUSE_ROUTER_NORM", False),
                   "fuse_decode_prologue": ("MOE_RT_FUSE_DECODE_PROLOGUE", True)}


def fusion_switch(name: str) -> bool:
    """A kernel-fusion switch's default: its environment variable (0 off, 1 on, unset: the default of
    FUSION_SWITCHES; anything else is an error), read here only, when a ModelArgs is made. fuse_moe_sum (on: measured
    on an H200, B=1 2.79 -> 2.75 ms): the MoE top-k sum inside the next RMSNorm. fuse_router_norm (off: measured
    on an H200, it loses, B=8 8.00 -> 8.50 ms): the post-attention residual add + RMSNorm inside the fused router
    (kernels/router_norm.py).
    fuse_decode_prologue (on: measured on an H200, B=1 2.77 -> 2.68 ms, B=8 8.01 -> 7.84 ms, B=64 17.85 -> 17.38
    ms; decode steps of at most models.layers.FUSED_DECODE_MAX_ROWS rows): a decode step's attention prologue (q/k
    norm, RoPE, the KV store) inside the decode attention kernel (kernels/attention/decode_fused.py)."""
    var, default = FUSION_SWITCHES[name]
    value = os.environ.get(var, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{var} must be 0 or 1, got {value!r}")
    return default if value == "" else value == "1"


@dataclass(frozen=True)
class ModelArgs:
    dtype: torch.dtype = torch.bfloat16
    device: torch.device | str = "cpu"
    use_triton: bool = False
    quantization: str | None = None  # None | "fp8"
    ep_rank: int = 0
    ep_size: int = 1
    dispatcher: All2AllBackend | None = None  # the EP all2all; duck-typed (dispatch, combine)
    seed: int = 0  # for load_format="dummy"
    tp: TensorParallel = field(default_factory=TensorParallel)
    # kernel fusions of the decoder layer where they apply (models/layers.py DecoderLayer; defaults: fusion_switch)
    fuse_moe_sum: bool = field(default_factory=lambda: fusion_switch("fuse_moe_sum"))
    fuse_router_norm: bool = field(default_factory=lambda: fusion_switch("fuse_router_norm"))
    fuse_decode_prologue: bool = field(default_factory=lambda: fusion_switch("fuse_decode_prologue"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank must be in [0, ep_size={self.ep_size}), got {self.ep_rank}")
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be None or 'fp8', got {self.quantization!r}")
