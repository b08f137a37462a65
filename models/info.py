"""What the runtime needs to know about a checkpoint, read once from its config.json: no torch, so the light
processes (API server, coordinator, launcher) use it too. The architectures' own rules (which layers are MoE,
where the expert count lives, how RoPE scales the context) are here once, and the model files use them."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A user-caused configuration problem; the message says what to do."""


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    # multimodal checkpoints nest the language model's config
    return hf.get("text_config", hf) if "max_position_embeddings" not in hf else hf


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's RoPE as one flat dict with rope_type, rope_theta, max_position_embeddings and the
    scaling fields; old `rope_scaling` wins over transformers-5 `rope_parameters`, as in transformers."""
    raw = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in raw.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported")
    params = dict(raw)
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in hf:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params["max_position_embeddings"] = int(hf.get("max_position_embeddings") or 4096)
    if params["rope_type"] in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings") or params["max_position_embeddings"])
    if params["rope_type"] == "yarn" and params.get("factor") is None:
        params["factor"] = params["max_position_embeddings"] / params["original_max_position_embeddings"]
    return params


def check_rope(params: dict[str, Any]) -> None:
    """One-line ConfigError for a RoPE the runtime cannot reproduce exactly."""
    rope_type = params["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"the checkpoint's rope_type {rope_type!r} is not supported (supported: "
                          f"{', '.join(ROPE_TYPES)})")
    needed = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
    missing = [k for k in needed if params.get(k) is None]
    if missing:
        raise ConfigError(f"the checkpoint's rope_type {rope_type!r} needs {', '.join(missing)} in rope_scaling")
    if rope_type in ("linear", "dynamic", "yarn", "llama3") and float(params["factor"]) < 1.0:
        raise ConfigError(f"the checkpoint's rope scaling factor must be >= 1, got {params['factor']}")


def model_max_len(hf: dict[str, Any]) -> int:
    """Longest context the checkpoint's positions cover (vLLM's rule): max_position_embeddings, times the
    scaling factor for linear / dynamic, original_max_position_embeddings * factor for yarn."""
    params = rope_parameters(text_config(hf))
    max_len = params["max_position_embeddings"]
    if params["rope_type"] in ("linear", "dynamic"):
        max_len = int(max_len * float(params["factor"]))
    elif params["rope_type"] == "yarn":
        max_len = int(params["original_max_position_embeddings"] * float(params["factor"]))
    return max_len


_NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def num_experts_of(cfg: dict[str, Any]) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    return next((int(cfg[k]) for k in _NUM_EXPERTS_KEYS if cfg.get(k)), 0)


def moe_layer_ids(cfg: dict[str, Any]) -> list[int]:
    """The decoder layers whose MLP is a mixture of experts, by the architecture's own rule."""
    if num_experts_of(cfg) == 0:
        return []
    num_layers = int(cfg["num_hidden_layers"])
    if "first_k_dense_replace" in cfg:  # GLM-4.5 / DeepSeek: leading dense layers
        return list(range(cfg["first_k_dense_replace"] or 0, num_layers))
    if "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg:  # Qwen-MoE: every step-th layer, minus some
        step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or [])
        return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    return list(range(num_layers))  # Mixtral: every layer


def _ids(value: Any) -> set[int]:
    return set() if value is None else set(value) if isinstance(value, list) else {int(value)}


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    max_model_len: int  # positions the checkpoint covers, RoPE scaling included
    vocab_size: int
    num_experts: int  # routed experts per MoE layer; 0 = dense
    top_k: int
    moe_layer_ids: tuple[int, ...]
    eos_token_ids: tuple[int, ...]  # config.json's and generation_config.json's

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @staticmethod
    def from_config(cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelInfo:
        text = text_config(cfg)
        eos = _ids(text.get("eos_token_id", cfg.get("eos_token_id")))
        eos |= _ids((generation_config or {}).get("eos_token_id"))
        return ModelInfo(
            architecture=(cfg.get("architectures") or ["<none>"])[0],
            max_model_len=model_max_len(cfg),
            vocab_size=int(text.get("vocab_size") or 0),
            num_experts=num_experts_of(text),
            top_k=int(text.get("num_experts_per_tok") or 1),
            moe_layer_ids=tuple(moe_layer_ids(text)),
            eos_token_ids=tuple(sorted(eos)),
        )

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def read(model_dir: str) -> ModelInfo:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        gen_path = os.path.join(model_dir, "generation_config.json")
        generation = None
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                generation = json.load(f)
        return ModelInfo.from_config(cfg, generation)
