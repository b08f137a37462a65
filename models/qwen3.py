"""Qwen3 (dense): Llama plus a per-head RMSNorm on q and k."""

from __future__ import annotations

from typing import Any

from models.args import ModelArgs
from models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: dict[str, Any], args: ModelArgs) -> None:
        super().__init__(cfg, args, qk_norm=True)
