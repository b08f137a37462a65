"""Block shapes for the fused MoE kernels: tuned JSON files in kernels/configs/, else a default.

A file is named moe_E{E}_H{H}_I{I}_{dtype}_{gpu}.json (gpu: torch's device name, spaces as '_'). It maps
a token-count bucket ("1", "8", ...) to {"BLOCK_M": int, "up": {...}, "down": {...}, "act_fp8": bool}:
up/down hold BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages for the gate_up and down GEMMs (BLOCK_M is
shared: one align serves both). act_fp8 (FP8 only): quantize activations too and use FP8 MMA, or
keep them 16-bit for a 16-bit MMA with the e4m3 weight tiles (W8A16: no activation-quant launches; best while few rows
per expert keep the layer bandwidth-bound). With act_fp8 false, up/down may add "w8_mma" (kernels/moe_w8.py: how
the e4m3 tile meets the 16-bit activations): "dequant" (default) scales the tile to 16 bits before the dot; "f16",
"f16_cast" widen it to fp16 and scale each K step's product; "f16_swap", "f16_swap_cast" also swap the MMA operands.
Another value, or a mode other than "dequant" with act_fp8 true or 16-bit weights, is an error at launch.
A bucket may also hold "tma": {"min_rows": int, "BLOCK_M": int, "up": {...}, "down": {...}}, the permuted
TMA path of kernels/moe_grouped_tma.py (FP8: BLOCK_K 128, FP8 activations), taken when num_tokens * top_k
>= min_rows; its up/down add warp_specialize (and store_tma, flatten). Only a table measured on this GPU turns
it on.
An entry may add "gemv" (kernels/moe_gemv.py: per-pair GEMV kernels, no align, for up to gemv["max_tokens"]
tokens; written by benchmarks/tune_moe.py --gemv where measured faster, absent by default).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


def device_name(device: torch.device | None = None) -> str:
    if device is not None and device.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in torch.cuda.get_device_name(device))


def config_file_name(num_experts: int, hidden: int, inter: int, dtype: str, gpu: str) -> str:
    return f"moe_E{num_experts}_H{hidden}_I{inter}_{dtype}_{gpu}.json"


@functools.lru_cache(maxsize=64)
def _load(path: str) -> dict[int, dict] | None:
    p = Path(path)
    if not p.exists():
        return None
    return {int(m): cfg for m, cfg in json.loads(p.read_text()).items()}


# default_config's row-per-expert thresholds: BLOCK_M 16 up to the first, 64 up to the second, 128 past it
DEFAULT_ROWS_PER_EXPERT = (16, 96)


def default_config(num_tokens: int, num_experts: int, top_k: int, fp8: bool, float32: bool = False) -> dict:
    rows_per_expert = num_tokens * top_k / num_experts
    block_k = 128 if fp8 else 64
    small, mid = DEFAULT_ROWS_PER_EXPERT
    if rows_per_expert <= small:
        g = {"BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
        return {"BLOCK_M": 16, "up": g, "down": dict(g, BLOCK_N=64), "act_fp8": False}
    if rows_per_expert <= mid:
        g = {"BLOCK_N": 64, "BLOCK_K": block_k, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
        return {"BLOCK_M": 64, "up": g, "down": dict(g), "act_fp8": True}
    g = {"BLOCK_N": 128, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    if float32:  # 4-byte tiles: three stages of [128 x 64] + 2 x [64 x 128] would need 288 KiB of shared memory
        g.update(BLOCK_K=32, num_stages=2)
    # the gate_up GEMM keeps two accumulators: a narrower tile keeps FP8's per-step partials out of spills
    return {"BLOCK_M": 128, "up": dict(g, BLOCK_N=64 if fp8 else 128), "down": g, "act_fp8": True}


def _table(num_experts: int, hidden: int, inter: int, dtype: str,
           device: torch.device | None) -> tuple[dict[int, dict] | None, bool]:
    # (this GPU's table for the shape, else another GPU's (foreign: True), else None)
    table = _load(str(CONFIG_DIR / config_file_name(num_experts, hidden, inter, dtype, device_name(device))))
    if table or device_name(device) == "cpu":
        return table, False
    # another GPU's table for this shape (e.g. H200's on an H100) beats the generic default
    others = sorted(CONFIG_DIR.glob(config_file_name(num_experts, hidden, inter, dtype, "*")))
    return (_load(str(others[0])) if others else None), True


def _nearest_bucket(table: dict[int, dict], num_tokens: int) -> int:
    m = max(num_tokens, 1)
    return min(table, key=lambda b: abs(math.log(max(b, 1)) - math.log(m)))


def get_moe_config(
    num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, dtype: str,
    device: torch.device | None = None,
) -> dict:
    """Tuned config of the nearest token bucket (log scale) if a file exists for this shape and GPU."""
    table, foreign = _table(num_experts, hidden, inter, dtype, device)
    if not table:
        return default_config(num_tokens, num_experts, top_k, dtype == "fp8", dtype == "float32")
    best = _nearest_bucket(table, num_tokens)
    if foreign and "tma" in table[best]:  # the TMA path stays off where it was never measured
        return {k: v for k, v in table[best].items() if k != "tma"}
    return table[best]


def config_edges(num_experts: int, hidden: int, inter: int, top_k: int, dtype: str,
                 device: torch.device | None = None) -> list[int]:
    """The token counts past 1 from which get_moe_config's answer, or the path its entries pick (kernels/moe_plan.py
    experts_path: "tma" from min_rows pairs, "gemv" up to max_tokens), may change: with a table the first count of
    each bucket but the smallest (the nearest bucket in log scale grows with the count: found by bisection), each
    tma entry's first count and the count past each gemv entry; without one default_config's row thresholds.
    kernels/moe_plan.py warmup_token_counts takes them: a bucket's range cut short by a tma entry may hold no power
    of two (session 18: an EP table's 4097..8191 rows)."""
    table, _ = _table(num_experts, hidden, inter, dtype, device)
    if not table:  # default_config changes past each of its rows-per-expert thresholds
        return [rows * num_experts // top_k + 1 for rows in DEFAULT_ROWS_PER_EXPERT]
    keys = sorted(table)
    edges = [-(-cfg["tma"]["min_rows"] // top_k) for cfg in table.values() if "tma" in cfg]
    edges += [cfg["gemv"].get("max_tokens", 1) + 1 for cfg in table.values() if cfg.get("gemv")]
    for lower, upper in zip(keys, keys[1:]):
        lo, hi = lower, upper  # the first count whose nearest bucket is past lower: in (lower, upper]
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _nearest_bucket(table, mid) > lower else (mid, hi)
        edges.append(hi)
    return sorted(e for e in set(edges) if e > 1)
