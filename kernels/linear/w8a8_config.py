"""Configs of the block-scaled FP8 linear: a tuned JSON table per GPU in kernels/configs/, else a heuristic.

The table is fp8_linear_{gpu}.json (gpu: torch's device name, non-alphanumerics as '_'), written by
benchmarks/tune_fp8_linear.py: {"n{N}_k{K}": {"{M bucket}": cfg}}. A shape's config is the one of the nearest M
bucket (log scale); a shape or GPU the table lacks gets default_config. A config:
- KERNEL: "dot" (tensor cores) or "gemv" (fp32 multiply-reduce, for a handful of rows);
- BLOCK_M, BLOCK_N: the output tile (BLOCK_N divides 128 or is a multiple of it; gemv: at most 128);
- GROUP_M: row tiles that walk the column tiles together (L2 reuse of a weight tile);
- num_warps, num_stages;
- QUANT_A (dot): 1 quantizes the activations on every tile the GEMM loads, 0 in a separate launch first
  (the gemv always quantizes its few rows itself);
- SWAP_AB (dot): 1 computes each tile as W x^T (the weight rows on the MMA's 64-row side);
- TMA (dot, QUANT_A 0, SWAP_AB 0): 1 loads both operands with tensor descriptors (Hopper TMA);
- SPLIT_K: programs per output tile along K (fp32 partials), FUSED_REDUCE: 1 = the tile's last program sums
  them, 0 = one more launch does;
- CUBLAS: 1 runs cuBLAS's block-scaled FP8 GEMM (torch's F.scaled_mm, after our activation quantization: the same
  arithmetic) where it is available (an sm90 GPU, torch built for CUDA 12.9+) and takes the call (16-bit
  activations, dense weight and scales: kernels/linear/w8a8.py), the rest of the config elsewhere.
The wrapper adds k_blocks_per_split (normalize()).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import triton

from kernels.fp8 import FP8_BLOCK
from kernels.moe_config import CONFIG_DIR, device_name

KEYS = ("KERNEL", "BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages", "QUANT_A", "SWAP_AB", "SPLIT_K",
        "FUSED_REDUCE", "TMA", "CUBLAS")


# cuBLAS's block-scaled FP8 GEMM beat the tuned Triton tiles on every shape measured from 2048 rows (an H200, session
# 15: Qwen3-30B-A3B qkv / o and GLM-4.5-Air qkv / o at 2048, 4096 and 8192 rows, 12 of 12, by 14-27%): the
# heuristic sends shapes without a table entry there from that size (TP shards, shared experts, other models).
# Weights of >= CUBLAS_LARGE_WEIGHT elements go from CUBLAS_LARGE_MIN_ROWS: GLM-4.5-Air's TP=2 attention shards
# (7168x4096, 4096x6144) ran 22-30% faster on cuBLAS than the heuristic's tile at 256 to 8192 rows (session 16);
# the small ones did not (GLM's shared-expert down 4096x1408 lost at <= 1024 rows even to the tuned tile)
CUBLAS_MIN_ROWS = 2048
CUBLAS_LARGE_WEIGHT = 16 * 2**20
CUBLAS_LARGE_MIN_ROWS = 256


def config_file_name(gpu: str) -> str:
    return f"fp8_linear_{gpu}.json"


def shape_key(n: int, k: int) -> str:
    return f"n{n}_k{k}"


def _split(m: int, n: int, k: int, block_m: int, block_n: int, num_sms: int, programs_per_sm: int) -> int:
    # fewer tiles than programs_per_sm waves: split K so that enough weight loads are in flight, while the fp32
    # partials (written and read: 8 * split * M * N bytes) stay below the weight's N * K bytes
    tiles = triton.cdiv(m, block_m) * (n // block_n)
    return max(1, min(k // FP8_BLOCK, 16, programs_per_sm * num_sms // tiles, k // (8 * m)))


def default_config(m: int, n: int, k: int, num_sms: int) -> dict:
    """The heuristic, for a GPU or shape without a table entry.

    Decode (M <= 64): narrow column tiles, K split until ~2 programs per SM stream the weight, the partials summed
    by the tile's last program (no extra launch). Up to 16 rows the GEMM quantizes the activations itself (one
    launch fewer; measured on an H200: M=8 as fast as M=1); beyond, a separate fully parallel launch does (with
    64-row tiles the in-GEMM quantization made M=64 1.3-2.9x slower than M=1 at the same weight bytes).
    M <= 256: 64-row tiles, column tiles narrow enough for a wave of programs. Prefill: square 128 tiles,
    grouped for L2 reuse; from CUBLAS_MIN_ROWS rows (a large weight: CUBLAS_LARGE_MIN_ROWS) cuBLAS's block-scaled
    GEMM where it runs (CUBLAS 1)."""
    if m <= 64:
        cfg = {"KERNEL": "dot", "BLOCK_M": max(16, triton.next_power_of_2(m)), "BLOCK_N": 64, "GROUP_M": 1,
               "num_warps": 4, "num_stages": 4, "QUANT_A": int(m <= 16), "SWAP_AB": 0}
    elif m <= 256:
        block_n = 128 if triton.cdiv(m, 64) * (n // 128) >= num_sms else 64
        cfg = {"KERNEL": "dot", "BLOCK_M": 64, "BLOCK_N": block_n, "GROUP_M": 8, "num_warps": 4, "num_stages": 4,
               "QUANT_A": 0, "SWAP_AB": 0}
    else:
        cfg = {"KERNEL": "dot", "BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3,
               "QUANT_A": 0, "SWAP_AB": 0}
    cfg["SPLIT_K"] = _split(m, n, k, cfg["BLOCK_M"], cfg["BLOCK_N"], num_sms, 2)
    cfg["FUSED_REDUCE"] = 1
    cfg["CUBLAS"] = int(m >= (CUBLAS_LARGE_MIN_ROWS if n * k >= CUBLAS_LARGE_WEIGHT else CUBLAS_MIN_ROWS))
    return normalize(cfg, k)


def normalize(cfg: dict, k: int) -> dict:
    """A copy with the defaults of older / hand-written configs filled in, SPLIT_K capped at the K blocks and
    evened out so that no split is empty, and k_blocks_per_split added."""
    cfg = {"KERNEL": "dot", "GROUP_M": 1, "QUANT_A": 0, "SWAP_AB": 0, "SPLIT_K": 1, "FUSED_REDUCE": 0, "TMA": 0,
           "CUBLAS": 0, **cfg}
    k_blocks = k // FP8_BLOCK
    if "k_blocks_per_split" in cfg:  # a test's explicit split
        per = cfg["k_blocks_per_split"]
    else:
        per = triton.cdiv(k_blocks, max(1, min(cfg["SPLIT_K"], k_blocks)))
    cfg["k_blocks_per_split"], cfg["SPLIT_K"] = per, triton.cdiv(k_blocks, per)
    return cfg


def check_config(cfg: dict) -> None:
    missing = [key for key in KEYS if key not in cfg]
    if missing:
        raise ValueError(f"fp8 linear config {cfg} lacks {missing}")
    if cfg["KERNEL"] not in ("dot", "gemv"):
        raise ValueError(f"fp8 linear config KERNEL={cfg['KERNEL']!r}: expected 'dot' or 'gemv'")
    for key in ("BLOCK_M", "BLOCK_N", "num_warps"):
        if cfg[key] < 1 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"fp8 linear config {key}={cfg[key]} must be a power of two")
    if cfg["BLOCK_N"] > (128 if cfg["KERNEL"] == "gemv" else 256):
        raise ValueError(f"fp8 linear config BLOCK_N={cfg['BLOCK_N']} too wide for the {cfg['KERNEL']} kernel")
    if cfg["KERNEL"] == "dot" and min(cfg["BLOCK_M"], cfg["BLOCK_N"]) < 16:
        raise ValueError(f"fp8 linear config {cfg}: the dot kernel needs BLOCK_M and BLOCK_N >= 16 (tl.dot)")
    if cfg["TMA"] and (cfg["KERNEL"] != "dot" or cfg["QUANT_A"] or cfg["SWAP_AB"]):
        raise ValueError(f"fp8 linear config {cfg}: TMA is for the dot kernel on pre-quantized activations, unswapped")
    if cfg["SPLIT_K"] < 1 or cfg["GROUP_M"] < 1:
        raise ValueError(f"fp8 linear config {cfg}: SPLIT_K and GROUP_M must be >= 1")


@functools.lru_cache(maxsize=16)
def _load(path: str) -> dict[str, dict[int, dict]]:
    p = Path(path)
    if not p.exists():
        return {}
    return {key: {int(m): cfg for m, cfg in buckets.items()} for key, buckets in json.loads(p.read_text()).items()}


def clear_cache() -> None:
    _load.cache_clear()


def table_config(m: int, n: int, k: int, device: torch.device | None) -> dict | None:
    """The tuned config of the nearest M bucket (log scale) for this shape and GPU; None without one."""
    buckets = _load(str(CONFIG_DIR / config_file_name(device_name(device)))).get(shape_key(n, k))
    if not buckets:
        return None
    best = min(buckets, key=lambda b: (abs(math.log(max(b, 1)) - math.log(max(m, 1))), b))
    cfg = dict(buckets[best])
    # a bucket's split K, used for more rows, stays under the cap of the heuristic: partials <= the weight's bytes
    cfg["SPLIT_K"] = max(1, min(cfg.get("SPLIT_K", 1), k // (8 * max(m, 1))))
    cfg = normalize(cfg, k)
    check_config(cfg)
    return cfg


def get_config(m: int, n: int, k: int, device: torch.device | None, num_sms: int) -> dict:
    return table_config(m, n, k, device) or default_config(m, n, k, num_sms)
