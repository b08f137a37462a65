"""What a model needs to be built: dtype, device, kernel choice and its expert-parallel slice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from runtime.all2all import All2AllBackend


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank must be in [0, ep_size={self.ep_size}), got {self.ep_rank}")
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be None or 'fp8', got {self.quantization!r}")
