"""Model classes keyed by config.json's architectures[0]."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.args import ModelArgs
from models.glm4_moe import Glm4MoeForCausalLM
from models.layers import DecoderLM
from models.llama import LlamaForCausalLM
from models.mixtral import MixtralForCausalLM
from models.qwen3 import Qwen3ForCausalLM
from models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[DecoderLM]] = {
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Glm4MoeForCausalLM": Glm4MoeForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


class UnsupportedArchitectureError(ValueError):
    pass


def config_dict(hf_config: Any) -> dict[str, Any]:
    # accepts the parsed config.json or a transformers PretrainedConfig
    return dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()


def get_model_class(hf_config: Any) -> type[DecoderLM]:
    archs = config_dict(hf_config).get("architectures") or ["<none>"]
    if archs[0] not in MODELS:
        raise UnsupportedArchitectureError(
            f"unsupported model architecture {archs[0]!r}; supported: {', '.join(MODELS)}"
        )
    return MODELS[archs[0]]


def build_model(hf_config: Any, args: ModelArgs) -> nn.Module:
    # parameters are created uninitialized on whatever device is current (the loader uses "meta")
    return get_model_class(hf_config)(config_dict(hf_config), args)
