"""Qwen3-MoE: Qwen3 attention (q/k norm) with softmax top-k experts on the sparse layers."""

from __future__ import annotations

from typing import Any

from models.args import ModelArgs
from models.info import moe_layer_ids, num_experts_of
from models.layers import DecoderLM, DecoderSpec
from models.moe import RoutingSpec, moe_mlp_factory


class Qwen3MoeForCausalLM(DecoderLM):
    def __init__(self, cfg: dict[str, Any], args: ModelArgs) -> None:
        spec = DecoderSpec.from_hf(cfg, qk_norm=True)
        num_experts, moe_ids = num_experts_of(cfg), moe_layer_ids(cfg)
        routing = RoutingSpec(num_experts, cfg["num_experts_per_tok"], bool(cfg.get("norm_topk_prob", False)))
        make_mlp = moe_mlp_factory(spec.hidden_size, spec.intermediate_size, moe_ids, cfg["moe_intermediate_size"],
                                   routing, args)
        super().__init__(spec, make_mlp, args, num_experts=num_experts)
