"""Configs of the dense GEMV linear (kernels/linear/gemv.py): tables measured per GPU, and nothing else.

Two tables per GPU (gpu: kernels.moe_config.device_name), each {"n{N}_k{K}": {"{M bucket}": cfg}}, buckets powers of
two <= MAX_ROWS, written by benchmarks/tune_linear_gemv.py: kernels/configs/linear_gemv_{gpu}.json for 16-bit weights
(a bucket only where the GEMV beat cuBLAS, F.linear, on that GPU) and kernels/configs/linear_gemv_fp8_{gpu}.json for
e4m3 block-scaled weights (W8A16, a bucket only where it beat the W8A8 block linear, kernels/linear/w8a8.py, with that
one's tuned config). A shape, bucket or GPU a table lacks runs cuBLAS / the W8A8 linear. There is no heuristic
default: the GEMV runs only where a measurement showed it faster.

Lookup rule for M rows: bucket next_pow2(M) if the shape has it, else None (cuBLAS); M > MAX_ROWS: None. So M = 3
reads bucket 4, M = 5..7 bucket 8, M = 9..16 bucket 16: the kernel runs those with BLOCK_M = next_pow2(M) and M
unspecialized, i.e. the very binary that was measured, and that the engine's warm-up and CUDA-graph capture (power-of-
two batch sizes) compile before serving (a bucket of 3 rows would compile while serving, after an eager 3-row step).

A config: BLOCK_N (output columns per program), BLOCK_K (K step), SPLIT_K (programs along K; fp32 partials summed
by the tile's last program), num_warps, num_stages (software pipelining of the K loop; 1 = none), and optional DOT
(0: fp32 multiply + reduce per row, default; 1: tl.dot of the weight tile with the rows padded to 16). FP8 DOT tiles
take BLOCK_K <= 128: one weight scale per row and K step, applied to the step's dot product.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton

from kernels.moe_config import CONFIG_DIR, device_name

KEYS = ("BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
OPTIONAL_KEYS = ("DOT",)
MAX_ROWS = 16  # the kernel keeps every row's accumulator in registers: above this, cuBLAS
MAX_SPLIT_K = 32


def config_file_name(gpu: str, fp8: bool = False) -> str:
    return f"linear_gemv_fp8_{gpu}.json" if fp8 else f"linear_gemv_{gpu}.json"


def shape_key(n: int, k: int) -> str:
    return f"n{n}_k{k}"


def _pow2(v: object) -> bool:
    return isinstance(v, int) and v >= 1 and not v & (v - 1)


def check_config(cfg: dict, fp8: bool = False) -> None:
    """One-line ValueError for a config the kernel cannot run (fp8: for e4m3 weights)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"linear GEMV config must be a dict, got {cfg!r}")
    missing = [key for key in KEYS if key not in cfg]
    unknown = [key for key in cfg if key not in KEYS + OPTIONAL_KEYS]
    if missing or unknown:
        raise ValueError(f"linear GEMV config {cfg}: missing {missing}, unknown {unknown} "
                         f"(keys: {KEYS + OPTIONAL_KEYS})")
    for key in ("BLOCK_N", "BLOCK_K", "num_warps"):
        if not _pow2(cfg[key]):
            raise ValueError(f"linear GEMV config {key}={cfg[key]!r} must be a power of two")
    if cfg.get("DOT", 0) not in (0, 1):
        raise ValueError(f"linear GEMV config DOT={cfg['DOT']!r}: expected 0 or 1")
    if cfg["BLOCK_K"] < 16 or (cfg.get("DOT", 0) and cfg["BLOCK_N"] < 16):
        raise ValueError(f"linear GEMV config {cfg}: BLOCK_K (and BLOCK_N with DOT) must be >= 16")
    if fp8 and cfg.get("DOT", 0) and cfg["BLOCK_K"] > 128:
        raise ValueError(f"linear GEMV config {cfg}: an FP8 DOT tile takes BLOCK_K <= 128 (one scale per K step)")
    if cfg["BLOCK_N"] * cfg["BLOCK_K"] > 32768:
        raise ValueError(f"linear GEMV config {cfg}: a {cfg['BLOCK_N']}x{cfg['BLOCK_K']} weight tile is too big")
    if not isinstance(cfg["SPLIT_K"], int) or not 1 <= cfg["SPLIT_K"] <= MAX_SPLIT_K:
        raise ValueError(f"linear GEMV config SPLIT_K={cfg['SPLIT_K']!r} must be an int in [1, {MAX_SPLIT_K}]")
    if not isinstance(cfg["num_stages"], int) or not 1 <= cfg["num_stages"] <= 8:
        raise ValueError(f"linear GEMV config num_stages={cfg['num_stages']!r} must be an int in [1, 8]")


@functools.lru_cache(maxsize=16)
def _load(path: str, fp8: bool = False) -> dict[str, dict[int, dict]]:
    p = Path(path)
    if not p.exists():
        return {}
    try:
        raw = json.loads(p.read_text())
        table = {key: {int(m): cfg for m, cfg in buckets.items()} for key, buckets in raw.items()}
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{p}: not a linear GEMV table {{'n<N>_k<K>': {{'<M>': config}}}} ({exc})") from None
    for key, buckets in table.items():
        for m, cfg in buckets.items():
            if not 1 <= m <= MAX_ROWS or not _pow2(m):
                raise ValueError(f"{p}: {key} bucket {m} is not a power of two in 1..{MAX_ROWS}")
            try:
                check_config(cfg, fp8)
            except ValueError as exc:
                raise ValueError(f"{p}: {key} bucket {m}: {exc}") from None
    return table


def clear_cache() -> None:
    _load.cache_clear()
    table_config.cache_clear()


def pick_bucket(buckets: list[int] | dict[int, dict], m: int) -> int | None:
    """The lookup rule of the module docstring: next_pow2(m) when it is a bucket, else None."""
    if not 1 <= m <= MAX_ROWS:
        return None
    bucket = triton.next_power_of_2(m)
    return bucket if bucket in buckets else None


@functools.lru_cache(maxsize=1024)
def table_config(m: int, n: int, k: int, device: torch.device | None, fp8: bool = False) -> dict | None:
    """The measured config for M rows of an [N, K] weight (fp8: e4m3, the FP8 table) on this device's GPU, or None
    (then cuBLAS / the W8A8 linear). Cached: the model asks once per layer and step, also while a CUDA graph is
    captured (host work only, no GPU call)."""
    buckets = _load(str(CONFIG_DIR / config_file_name(device_name(device), fp8)), fp8).get(shape_key(n, k))
    bucket = pick_bucket(buckets, m) if buckets else None
    return None if bucket is None else dict(buckets[bucket])
