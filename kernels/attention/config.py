"""Tile configs of the paged attention kernels: a tuned JSON file per GPU in kernels/configs/, else a default.

The file is attention_{gpu}.json (gpu: torch's device name, spaces as '_'), written by
benchmarks/tune_attention.py. It holds {"decode": {key: cfg}, "prefill": {key: cfg}} with key
"d{head_dim}_{kv}" (kv: the cache dtype, bf16 / fp16 / fp32 / fp8):
- decode: BLOCK_N (tokens per inner step), num_warps, num_stages, and the split rule: enough splits for
  programs_per_sm programs per SM, each with at least min_split_tokens tokens of the longest context; the later
  knobs of DECODE_KNOB_DEFAULTS (more splits, at small batch only, the merge's width or the merge inside the split
  kernel, the FP8 widening and dots);
- prefill (and extend, the same kernel): BLOCK_M (query rows: tokens x packed GQA heads), BLOCK_N,
  num_warps, num_stages; optional 0/1 variant keys (absent: 0, the kernel as before they existed):
  MASK_FREE (no predicates on the K/V copies of tiles that are whole by construction), LPT_GRID (query blocks
  x sequences on one grid axis, every sequence's longest block first), RAGGED (the chunk's own keys read from
  the contiguous K/V the caller passes, through tensor descriptors: TMA on Hopper; the cached prefix from pages),
  Q_F16 (an FP8 cache under a bf16 q: q cast to fp16 before the launch, so the kernel keeps it in shared memory),
  FP8_DOT (an FP8 cache: e4m3 x e4m3 tensor-core dots, q and the probabilities rounded to e4m3 in the kernel, as
  FlashAttention-3's FP8 path; Q_F16 is then unused; how, and its accuracy: kernels/attention/fp8_dot.py);
  optional counts FP8_SCRATCH_MIN_Q / FP8_SCRATCH_MAX_TOKENS (PREFILL_KNOB_DEFAULTS: an FP8 cache's pages widened
  once into a 16-bit scratch before the launch, kernels/attention/fp8_scratch.py; the scratch then runs the tiles of
  q's dtype's entry, e.g. d128_bf16, unless the caller passes a config).
"gluon" (0 / absent: off; 1, or a dict of kernels/attention/prefill_gluon.py's GLUON_KEYS): the prefill runs the
Gluon FA3-style kernel on sm90 for the shapes it takes (prefill_gluon.gluon_supported) when the step's longest query
has at least GLUON_MIN_Q tokens (a knob below), else the Triton kernel as before; an FP8 cache's scratch runs it too
(under q's 16-bit entry). Other keys are ignored (an older table's PIPE_QK: the pipelined QK^T loop it chose was
removed, it lost on an H200).
A key the file lacks (another head_dim) falls back to the default, which compiles to what the kernels ran
before the table existed, except for the split rule (more splits at small batch: issue 16).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton

from kernels.fp8 import FP8_DTYPE
from kernels.moe_config import CONFIG_DIR, device_name

_KV_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", FP8_DTYPE: "fp8"}
DECODE_KEYS = ("BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "min_split_tokens", "max_splits",
               "merge_block_d", "fp8_widen", "small_batch", "small_batch_config", "fp8_dot", "fp8_q2",
               "fused_merge_max_splits", "early_inputs")
# decode knobs added after the first tables, at the values that run what the kernel ran before them (a table or
# hand-written config without them gets these): max_splits caps the split rule (the kernel takes up to
# decode.MAX_SPLITS); merge_block_d: the merge's columns per program (0: full head_dim when
# batch x heads fills the SMs, else 32); fp8_widen (an FP8 cache on sm89+): 0 Triton's cast of the K / V tiles
# to fp16, 1 V widened by PTX before its layout change into the dot's operand, 2 K and V (fp8_dot._widen_fp8);
# at batch <= small_batch (0: never) the kernel runs small_batch_config instead (a decode config of its own, tiles
# and split rule: a few long requests want more splits and maybe other tiles than a full batch; decode_config_for);
# fp8_dot (an FP8 cache): e4m3 x e4m3 tensor-core dots on the tiles as stored, q and p rounded to e4m3 in the kernel
# (the prefill's FP8_DOT, kernels/attention/prefill.py); 1: the query rows padded to 64 (wgmma's M), 2: transposed, the
# tile's tokens as the dots' rows (wgmma at BLOCK_N >= 64 per warpgroup), 3: 2 with V's copy not pipelined
# (decode._decode_kernel says why both); fp8_widen is then unused; fp8_q2 (with fp8_dot): q as two e4m3
# terms, a second QK^T dot for ~2^-8 instead of 2^-4 per q value (kernels/attention/decode.py: accuracy);
# fused_merge_max_splits (0 or a power of two, as the split counts' compiled classes): launches of 2 up to this many
# splits merge in the split kernel (its last split per sequence and KV head reads every split's partials) instead of
# a second launch (0: never; decode_plan.merge_fused); early_inputs (0 / 1): under PDL, the step's sequence length,
# block-table row and first page ids loaded before griddepcontrol.wait (kernels/pdl.py rule (1)), so that the
# predecessor's tail hides two dependent loads (decode._decode_kernel)
DECODE_KNOB_DEFAULTS = {"max_splits": 64, "merge_block_d": 0, "fp8_widen": 0, "small_batch": 0,
                        "small_batch_config": None, "fp8_dot": 0, "fp8_q2": 0, "fused_merge_max_splits": 0,
                        "early_inputs": 0}
PREFILL_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
PREFILL_VARIANT_KEYS = ("MASK_FREE", "LPT_GRID", "RAGGED", "Q_F16", "FP8_DOT")  # optional, 0 / 1
# prefill knobs (counts; a config without them gets these): an FP8 cache's pages widened once into a 16-bit scratch
# when the step's longest query has >= FP8_SCRATCH_MIN_Q tokens (0: never) and the scratch (rows x block-table
# width pages) holds <= FP8_SCRATCH_MAX_TOKENS tokens; kernels/attention/fp8_scratch.py says why these defaults;
# with "gluon" set, the Gluon kernel runs when the step's longest query has >= GLUON_MIN_Q tokens (0: always)
PREFILL_KNOB_DEFAULTS = {"FP8_SCRATCH_MIN_Q": 256, "FP8_SCRATCH_MAX_TOKENS": 262144, "GLUON_MIN_Q": 0}


def config_key(head_dim: int, kv_dtype: torch.dtype) -> str:
    return f"d{head_dim}_{_KV_NAMES.get(kv_dtype, str(kv_dtype).removeprefix('torch.'))}"


def config_file_name(gpu: str) -> str:
    return f"attention_{gpu}.json"


def default_decode_config(head_dim: int) -> dict:
    block_n = 64 if triton.next_power_of_2(head_dim) <= 128 else 32
    return {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 2, "programs_per_sm": 2, "min_split_tokens": 2 * block_n,
            **DECODE_KNOB_DEFAULTS}


def default_prefill_config(head_dim: int) -> dict:
    # num_stages 2 is what stages=3 compiled to before the page ids moved a tile ahead (double-buffered K/V that
    # is waited for in full each step, ~96 KiB of shared memory: two programs per SM); 3 now prefetches
    block_d = triton.next_power_of_2(head_dim)
    return {"BLOCK_M": 128 if block_d <= 128 else 64, "BLOCK_N": 64 if block_d <= 128 else 32,
            "num_warps": 8 if block_d >= 128 else 4, "num_stages": 2}


@functools.lru_cache(maxsize=16)
def _load(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


@functools.lru_cache(maxsize=64)
def _resolve(kind: str, head_dim: int, kv_dtype: torch.dtype, device: torch.device | None) -> dict:
    # cached: the kernels ask once per layer call, and the table lookup reads files
    gpu = device_name(device)
    table = _load(str(CONFIG_DIR / config_file_name(gpu)))
    foreign = not table and gpu != "cpu"
    if foreign:  # another GPU's table (e.g. H200's on an H100) beats the generic default
        others = sorted(CONFIG_DIR.glob(config_file_name("*")))
        table = _load(str(others[0])) if others else {}
    cfg = default_decode_config(head_dim) if kind == "decode" else default_prefill_config(head_dim)
    cfg.update(table.get(kind, {}).get(config_key(head_dim, kv_dtype)) or {})
    if foreign:  # its tiles, but not a kernel it chose by measuring (as the MoE tables' TMA path)
        cfg.pop("gluon", None)
    check_config(cfg, DECODE_KEYS if kind == "decode" else PREFILL_KEYS, head_dim)
    return cfg


def clear_cache() -> None:
    _load.cache_clear()
    _resolve.cache_clear()


def decode_config(head_dim: int, kv_dtype: torch.dtype, device: torch.device | None = None) -> dict:
    return dict(_resolve("decode", head_dim, kv_dtype, device))


def prefill_config(head_dim: int, kv_dtype: torch.dtype, device: torch.device | None = None) -> dict:
    return dict(_resolve("prefill", head_dim, kv_dtype, device))


def decode_config_for(cfg: dict, batch: int) -> dict:
    """The decode config a launch of `batch` sequences runs: cfg's small_batch_config at batch <= small_batch;
    keys a config lacks (written before they existed) at DECODE_KNOB_DEFAULTS."""
    cfg = {**DECODE_KNOB_DEFAULTS, **cfg}
    if cfg["small_batch_config"] and batch <= cfg["small_batch"]:
        cfg = {**DECODE_KNOB_DEFAULTS, **cfg["small_batch_config"]}
    return cfg


def with_fp8_dot(cfg: dict, kind: str, fp8_dot: int = 1, fp8_q2: int = 0) -> dict:
    """cfg (a decode or prefill config, kind "decode" / "prefill") with the FP8 tensor-core variant set: decode's
    fp8_dot (its small-batch config's too; 1, 2 or 3, or 0: off) and fp8_q2, prefill's FP8_DOT (1, or 0 for
    fp8_dot 0); tiles and split rule as they are."""
    if kind == "prefill":
        return {**cfg, "FP8_DOT": int(fp8_dot > 0)}
    knobs = {"fp8_dot": fp8_dot, "fp8_q2": fp8_q2}
    cfg = {**DECODE_KNOB_DEFAULTS, **cfg, **knobs}
    if cfg["small_batch_config"]:
        cfg["small_batch_config"] = {**cfg["small_batch_config"], **knobs}
    return cfg


def check_config(cfg: dict, keys: tuple[str, ...], head_dim: int) -> None:
    # a hand-written or tuned config: every tile size a power of two (tl.arange), the tile no wider than needed
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"attention config {cfg} lacks {missing}")
    for k in ("BLOCK_M", "BLOCK_N", "num_warps"):
        if k in cfg and (cfg[k] < 1 or cfg[k] & (cfg[k] - 1)):
            raise ValueError(f"attention config {k}={cfg[k]} must be a power of two")
    if cfg.get("BLOCK_N", 16) < 16 or cfg.get("BLOCK_M", 16) < 16:
        raise ValueError(f"attention config {cfg}: BLOCK_M and BLOCK_N must be >= 16 (tl.dot)")
    counts = ("max_splits", "programs_per_sm", "min_split_tokens")
    if any(cfg.get(k, 1) < 1 for k in counts) or cfg.get("small_batch", 0) < 0:
        raise ValueError(f"attention config {cfg}: {', '.join(counts)} must be >= 1, small_batch >= 0")
    fused = cfg.get("fused_merge_max_splits", 0)  # a power of two: split counts share compiled kernels by them
    if type(fused) is not int or fused < 0 or fused & (fused - 1):
        raise ValueError(f"attention config fused_merge_max_splits={fused!r} must be 0 (never) or a power of two")
    if small := cfg.get("small_batch_config"):
        if not isinstance(small, dict) or small.get("small_batch_config"):
            raise ValueError(f"attention config small_batch_config={small} must be a decode config, not nested")
        check_config({**DECODE_KNOB_DEFAULTS, **small}, keys, head_dim)
    if cfg.get("merge_block_d", 0) and (cfg["merge_block_d"] < 1 or cfg["merge_block_d"] & (cfg["merge_block_d"] - 1)):
        raise ValueError(f"attention config merge_block_d={cfg['merge_block_d']} must be 0 (auto) or a power of two")
    if cfg.get("fp8_widen", 0) not in (0, 1, 2):
        raise ValueError(f"attention config fp8_widen={cfg['fp8_widen']} must be 0, 1 or 2")
    if cfg.get("fp8_dot", 0) not in (0, 1, 2, 3):
        raise ValueError(f"attention config fp8_dot={cfg['fp8_dot']} must be 0, 1, 2 or 3")
    for knob in ("fp8_q2", "early_inputs"):
        if cfg.get(knob, 0) not in (0, 1):
            raise ValueError(f"attention config {knob}={cfg[knob]!r} must be 0 or 1")
    if (cfg.get("fp8_dot") or cfg.get("FP8_DOT")) and min(cfg["BLOCK_N"], triton.next_power_of_2(head_dim)) < 32:
        raise ValueError(f"attention config {cfg}: the FP8 dots (fp8_dot / FP8_DOT) need BLOCK_N >= 32 and head_dim "
                         f"> 16, got head_dim {head_dim} (an e4m3 tl.dot's K is at least 32)")
    bad = {k: cfg[k] for k in PREFILL_KNOB_DEFAULTS if k in cfg and (not isinstance(cfg[k], int) or cfg[k] < 0)}
    if bad:
        raise ValueError(f"attention config {bad}: FP8_SCRATCH_* and GLUON_MIN_Q are token counts >= 0")
    if cfg.get("gluon"):  # its tiles checked where they are defined (imported here: Gluon only when asked for)
        from kernels.attention.prefill_gluon import gluon_config
        gluon_config(cfg, head_dim)
    bad = {k: cfg[k] for k in PREFILL_VARIANT_KEYS if k in cfg and cfg[k] not in (0, 1, False, True)}
    if bad:
        raise ValueError(f"attention config {bad}: variant keys are 0 or 1")
