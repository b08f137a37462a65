"""GLM-4.5 MoE: leading dense layers, sigmoid grouped routing with a correction bias, shared experts,
partial rotary, qkv bias and optional q/k norm."""

from __future__ import annotations

from typing import Any

from models.args import ModelArgs
from models.info import moe_layer_ids, num_experts_of
from models.layers import DecoderLM, DecoderSpec
from models.moe import RoutingSpec, moe_mlp_factory


class Glm4MoeForCausalLM(DecoderLM):
    def __init__(self, cfg: dict[str, Any], args: ModelArgs) -> None:
        # num_hidden_layers excludes the MTP (next-token prediction) layers stored after them; they are not loaded
        spec = DecoderSpec.from_hf(cfg, qk_norm=bool(cfg.get("use_qk_norm", False)))
        num_experts, moe_ids = num_experts_of(cfg), moe_layer_ids(cfg)
        routing = RoutingSpec(
            num_experts, cfg["num_experts_per_tok"], bool(cfg.get("norm_topk_prob", True)), scoring="sigmoid_grouped",
            num_groups=cfg.get("n_group", 1), topk_groups=cfg.get("topk_group", 1),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        )
        moe_inter = cfg["moe_intermediate_size"]
        make_mlp = moe_mlp_factory(spec.hidden_size, spec.intermediate_size, moe_ids, moe_inter, routing, args,
                                   shared_intermediate_size=moe_inter * cfg.get("n_shared_experts", 0))
        super().__init__(spec, make_mlp, args, num_experts=num_experts)
