"""Mixtral: Llama attention, every layer a softmax top-k MoE (renormalized); HF names it block_sparse_moe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.args import ModelArgs
from models.info import moe_layer_ids
from models.layers import Checkpoint, DecoderLM, DecoderSpec
from models.moe import RoutingSpec, moe_mlp_factory


class MixtralForCausalLM(DecoderLM):
    def __init__(self, cfg: dict[str, Any], args: ModelArgs) -> None:
        spec = DecoderSpec.from_hf(cfg)
        num_experts = cfg["num_local_experts"]
        routing = RoutingSpec(num_experts, cfg["num_experts_per_tok"], renormalize=True)
        make_mlp = moe_mlp_factory(spec.hidden_size, 0, moe_layer_ids(cfg), spec.intermediate_size, routing, args)
        super().__init__(spec, make_mlp, args, num_experts=num_experts)

    def checkpoint_sources(self, param_name: str, has_key: Callable[[str], bool]) -> Checkpoint:
        # HF Mixtral names the MoE block block_sparse_moe and its experts' projections w1 / w3 / w2
        alias = lambda k: k.replace(".mlp.", ".block_sparse_moe.")  # noqa: E731
        sources = super().checkpoint_sources(param_name, lambda k: has_key(k) or has_key(alias(k)))
        return [([n for k in keys for n in (k, alias(k))], shard_id) for keys, shard_id in sources]
