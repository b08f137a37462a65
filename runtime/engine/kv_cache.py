"""The KV cache's element type (--kv-cache-dtype) and an FP8 cache's per-layer scales from the checkpoint."""

from __future__ import annotations

import glob
import logging
import os

import torch
from safetensors import safe_open

from kernels.fp8 import FP8_DTYPE

logger = logging.getLogger(__name__)


def kv_cache_dtype(flag: str, model_dtype: torch.dtype) -> torch.dtype:
    # vLLM's names: auto = the model's dtype; fp8 = fp8_e4m3 (float8_e4m3fn, +-448, 3 mantissa bits)
    return FP8_DTYPE if flag in ("fp8", "fp8_e4m3") else model_dtype


def _scalar(f: object, key: str) -> float:
    value = f.get_tensor(key).float()  # type: ignore[attr-defined]
    if value.numel() != 1:
        raise ValueError(f"{key} has {value.numel()} values; only per-tensor KV scales are supported")
    scale = float(value.reshape(()))
    if not scale > 0:
        raise ValueError(f"{key} = {scale}: a KV cache scale must be positive")
    return scale


def read_kv_scales(model_path: str, num_layers: int) -> list[tuple[float, float]]:
    """Per layer (k_scale, v_scale): what the checkpoint stores as self_attn.{k,v}_scale (or one kv_scale, or
    k/v_proj.output_scale), else 1.0. A stored value is x / scale."""
    scales = [[1.0, 1.0] for _ in range(num_layers)]
    found = 0
    for path in sorted(glob.glob(os.path.join(model_path, "*.safetensors"))):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                parts = key.split(".")
                if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
                    continue
                layer, rest = int(parts[2]), ".".join(parts[3:])
                if layer >= num_layers:
                    continue  # e.g. a multi-token-prediction layer the runtime does not build
                which = {"self_attn.k_scale": (0,), "self_attn.v_scale": (1,), "self_attn.kv_scale": (0, 1),
                         "self_attn.k_proj.output_scale": (0,), "self_attn.v_proj.output_scale": (1,)}.get(rest)
                if which is None:
                    continue
                for i in which:
                    scales[layer][i] = _scalar(f, key)
                found += 1
    if found:
        logger.info("FP8 KV cache: k/v scales of %d layers from the checkpoint", num_layers)
    return [(k, v) for k, v in scales]
