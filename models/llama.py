"""Llama (dense): the plain decoder."""

from __future__ import annotations

from typing import Any

from models.args import ModelArgs
from models.layers import MLP, DecoderLM, DecoderSpec


class LlamaForCausalLM(DecoderLM):
    def __init__(self, cfg: dict[str, Any], args: ModelArgs, **spec_overrides: Any) -> None:
        if cfg.get("mlp_bias"):
            raise NotImplementedError("Llama with mlp_bias=true is not supported")
        spec = DecoderSpec.from_hf(cfg, **spec_overrides)
        super().__init__(spec, lambda _: MLP(spec.hidden_size, spec.intermediate_size, args), args)
