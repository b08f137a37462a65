"""Sweep the paged attention kernels' tile configs on this GPU and pick the best per kernel and cache dtype.

python benchmarks/tune_attention.py --out DIR [--budget-s 200] [--jobs 12] [--only decode,extend,prefill]
    [--pick-ragged] [--kv-dtypes bf16,fp8] [--fp8-dot-only] [--gluon [JSON]]

Cases (head_dim 128, 16-token pages, bf16 q): decode with Qwen3-30B-A3B heads (32 q / 4 KV) at B=1 ctx
4k / 32k / 128k and B=16 / 64 ctx 4k, bf16 and FP8 KV; causal prefill of 1k / 4k / 16k tokens and of 4 x 2k
(one varlen launch); extend: an 8k chunk over a 120k cached prefix with Qwen3 heads (bf16 and FP8 KV) and
GLM-4.5-Air heads (96 q / 8 KV). Prefill / extend sweep the tiles, then the variant keys (PREFILL_VARIANTS) on
the tiles of the current table.
Each config is timed from CUDA-graph replays, as the runtime runs it (no launch or host cost in the time): one
graph holds one call per rotation (decode: the case's pool holds ~256 MB of pages, one block table per disjoint
page set, so no call finds its KV in L2; prefill / extend: one call, compute-bound), and the time per call is
the median replay over the rotations. (Timed like do_bench instead, every small decode case read ~44 us of
launch and flush overhead and the decode table followed noise.) Next to it: the
floor (decode: KV bytes over the measured copy bandwidth; prefill / extend: FLOPs over the measured bf16
matmul rate) and torch SDPA on contiguous KV, timed the same way. Every config's output is checked against the
torch reference (fp32) and a config off by more than 2e-2 (relative) is dropped (2^-4 for the FP8 tensor-core
variants, decode fp8_dot / prefill FP8_DOT, timed on the FP8-cache cases only: they round q and p to e4m3).
--kv-dtypes fp8 --fp8-dot-only: the budget on those variants alone, against the table's FP8 configs as they are
(the table changes only where a variant beats them; the bf16 entries stay as checked in).

Decode sweeps tiles (BLOCK_N, warps, stages; an FP8 cache also the fp8_widen variants) x the split rule
(programs per SM, minimum tokens per split, and past 64 splits max_splits, a narrower merge); the config that
wins the geometric mean over a dtype's cases goes into the table. Prefill / extend share one
kernel and one table entry per dtype: the best geometric mean over its cases (benchmarks/attention_pick.py picks
and merges the table). A rewritten prefill entry keeps the checked-in entry's keys the sweep does not time
(PREFILL_KEPT_KEYS: "gluon", GLUON_MIN_Q, the FP8 scratch counts).
--gluon (sm90 only; optionally JSON: a tile dict or a list of them, default GLUON_TILES): the bf16-cache prefill /
extend cases also time the Gluon FA3-style prefill (kernels/attention/prefill_gluon.py, a prefill config's
"gluon") per tile dict, against the Triton config picked for the entry; the entry gets the tiles with the best
geometric mean where Gluon wins and GLUON_MIN_Q, the shortest measured query length from which they won at every
longer one (the Triton kernel below it), or neither key where Gluon never won at the longest.

Bounded GPU time: every distinct binary is compiled first in --jobs worker processes (Triton's disk cache
then serves this process), each measurement runs at most --rep-ms (heavy extend cases: 2-3 calls), and
once --budget-s has passed the remaining candidates are skipped and listed.

Writes DIR/tune_attention.json (every row, the best per case and per table key) and
DIR/configs/attention_{gpu}.json, the file kernels/attention/config.py looks up (copy it to kernels/configs/).
Prints one line per measurement and 'tune_attention summary' last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attention_cases as ac  # noqa: E402
import tuning  # noqa: E402
from attention_cases import (  # noqa: E402
    DECODE_CASES,
    EXTEND_CASES,
    HEAD_DIM,
    KV_DTYPES,
    PREFILL_CASES,
    DecodeCase,
    PrefillCase,
)
from attention_pick import SMALL_BATCH, geomean, merge_table, pick, pick_small_batch  # noqa: E402, F401
from bench_moe import measure_ceilings  # noqa: E402
from tuning import Budget, rel_err  # noqa: E402

import kernels.attention.config as acfg  # noqa: E402
from kernels.attention.config import CONFIG_DIR, DECODE_KNOB_DEFAULTS, config_file_name, config_key  # noqa: E402
from kernels.moe_config import device_name  # noqa: E402

# (BLOCK_N, warps, stages); the last two for an FP8 cache (sm90: 140 / 142 registers, triple / double-buffered K/V;
# a bf16 cache runs out of shared memory on (256, 8, 3): skipped)
DECODE_TILES = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 3), (64, 8, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3),
                (128, 4, 4), (256, 8, 3)]
# FP8 cache only: (BLOCK_N, warps, stages, fp8_widen): the V (1) or K and V (2) tiles widened by PTX before their
# layout change into the dots' operands (sm90: ~1/3 fewer instructions and 106-186 registers where the cast takes
# 147-198, for a 16-bit staging tile in shared memory: (256, 8, 3, 2) would not fit, (256, 8, 3, 1) just does)
DECODE_TILES_FP8 = [(64, 4, 3, 1), (64, 4, 4, 1), (64, 8, 3, 1), (128, 4, 2, 1), (128, 4, 3, 1), (128, 8, 3, 1),
                    (256, 8, 2, 1), (64, 4, 3, 2), (128, 4, 3, 2), (128, 8, 3, 2)]
# FP8 cache only: (BLOCK_N, warps, stages, fp8_widen, fp8_dot): e4m3 x e4m3 tensor-core dots on the tiles as stored,
# wgmma on sm90 with no spills, K and V copied ahead asynchronously (rings of 3 / 2 at stages 3), no byte-wide V
# gathers. fp8_dot 1 (query rows padded to 64): 223 registers at (64, 4, 3), 220 at (128, 8, 3); 2 (transposed, the
# tokens as rows): 125 / 133 / 104 registers at (64, 4, 3) / (128, 4, 3) / (128, 8, 3), a quarter of 1's exp2, V
# gathered bytewise into its operand; 3 (2 with V loaded and staged before the dots, not pipelined): 86 / 114
# (a sixth value 1: fp8_q2, q as two e4m3 terms, a second QK^T dot: 140 registers at (128, 4, 3), no spills; it is
# the accuracy option, timed beside the table's tile so that its cost shows; picked, as any tile, where fastest)
# Only the fp8_q2 tiles are swept for the table: with q as ONE e4m3 term the output error grows with the spread of
# the scores (torch emulation, head_dim 128: 3.4-3.8e-2 at a score std of 1 nat, 6-7.6e-2 at 4, 8.6-11e-2 at 8, past
# the 2^-4 bound; trained heads are peaked), and the tuner times on near-flat random scores, where it looks fine
# (3.5e-2 on the H200): a pick would trade accuracy the sweep cannot see. With q2 the error falls as scores spread
# (2.4-2.7e-2 at 1 nat, 0.4-1.0e-2 at 16). bench_attention still measures every variant (kv fp8dot, fp8dot2, ...).
# Deeper K/V rings at BLOCK_N 64 (sm90 with q2, plain / prologue fused: (64, 4, 4) 126 / 130 registers, 69 KiB of
# shared memory, rings [4, 3]; (64, 4, 5) 126 / 130, 85 KiB, [5, 4]; (64, 8, 5) 88 / 111, 85 KiB: two or three programs
# an SM, no spills; (128, 4, 4) and (128, 8, 4) take 134 KiB, one program an SM: not offered): more of a B=1 split's
# K/V in flight from its start, the long-context decode's fixed part (issue 17: B=1 32k FP8 at 0.50 of copy BW)
DECODE_TILES_FP8_DOT = [(64, 4, 3, 0, 2, 1), (128, 4, 3, 0, 2, 1), (128, 8, 3, 0, 2, 1), (64, 4, 4, 0, 2, 1),
                        (64, 4, 5, 0, 2, 1), (64, 8, 5, 0, 2, 1)]
# (programs_per_sm, min_split_tokens[, {later knob: value}]), the other knobs at DECODE_KNOB_DEFAULTS (today's
# kernel). The last ones go past 64 splits at long context (B=1 at 32k: 132-256 splits of 128-256 tokens, 4-8
# programs per SM to hide each program's start) and narrow the merge's columns; pick_small_batch lets the small
# batches have them (their own config) while the full batches keep theirs
DECODE_SPLIT_RULES_MORE = [(4, 64, {"max_splits": 256}), (8, 64, {"max_splits": 256}), (8, 128, {"max_splits": 512}),
                           (4, 64, {"max_splits": 256, "merge_block_d": 16}),
                           (8, 64, {"max_splits": 256, "merge_block_d": 16}), (2, 64, {"merge_block_d": 16})]
SPLIT_RULES = [(1, 64), (2, 64), (2, 128), (2, 256), (4, 64), (4, 128)] + DECODE_SPLIT_RULES_MORE
# (BLOCK_M, BLOCK_N, warps, stages); compiled for sm90 on a CPU box: none spills with a bf16 cache ((64, 128, 4, 2),
# (128, 64, 4, 3) and 16-warp tiles with BLOCK_N >= 64 did), (128, 128, 8, 3) just fits shared memory (225 KiB),
# stages >= 3 double-buffer K/V. 256 query rows halve the K/V traffic per FLOP (an extend over a long prefix
# streams the prefix from L2 once per query block). An FP8 cache's tiles take half the shared memory: stages 3
# compile to double-buffered K/V there (triple with a bf16 cache), so 4 and 5 (too large for bf16: skipped) go deeper.
# (256, 64, 16, 3): 128 registers, 48 bytes of spill on sm90, 160 KiB of shared memory; half the K/V traffic per FLOP
# of the 128-row tiles
PREFILL_TILES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                 (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3), (256, 32, 16, 3), (128, 128, 8, 4), (128, 128, 8, 5),
                 (256, 64, 16, 3)]
# prefill variant keys (kernels/attention/config.py), each timed on the tiles the last H200 table chose (and the
# runner-up). RAGGED reads the chunk's keys from the contiguous K/V the case passes (a bf16 cache only: with FP8 it
# is the plain kernel again, not swept); its rows are printed beside the others and enter the table only with
# --pick-ragged (the model passes no K/V to the kernel yet: its fused prologue stores them straight into pages).
# Q_F16 only matters with an FP8 cache (swept there only).
PREFILL_VARIANTS = [{"MASK_FREE": 1}, {"MASK_FREE": 1, "LPT_GRID": 1}, {"MASK_FREE": 1, "RAGGED": 1},
                    {"MASK_FREE": 1, "LPT_GRID": 1, "RAGGED": 1}, {"MASK_FREE": 1, "Q_F16": 1}]
PREFILL_VARIANT_TILES = {"bf16": [(128, 128, 8, 3), (128, 64, 8, 3)], "fp8": [(128, 128, 8, 5), (128, 128, 8, 3)]}
# FP8 cache only: FP8_DOT (e4m3 x e4m3 dots, q and p rounded to e4m3 in the kernel) on its own tiles: sm90 at 8 warps
# 254-255 registers and no spills at these (4-warp and 16-warp tiles spill), K / V rings of 3 / 2 at stages 3, 4 / 3
# at 4 (112-144 KiB of shared memory at BLOCK_N 128)
# none for the table: the prefill FP8_DOT has no two-term q (see DECODE_TILES_FP8_DOT) and lost on the H200 anyway
# (extend 8k over 120k 0.34 vs 0.45 of the matmul rate); bench_attention's kv fp8dot measures it
PREFILL_FP8_DOT_TILES: list[tuple[int, int, int, int]] = []
PREFILL_FP8_DOT = {"MASK_FREE": 1, "FP8_DOT": 1}
# --gluon: the Gluon prefill's tile dicts (bench_attention --gluon's), the H200's pick first (session 12: 0.78-0.84 of
# the matmul rate from 2048 query tokens vs the Triton kernel's 0.59-0.66, 0.07 vs 0.17 at 1024)
GLUON_TILES = [{"num_stages": 3, "split_wg": 1}, 1, {"num_stages": 3, "split_wg": 2}, {"BLOCK_N": 64, "num_stages": 3}]
# prefill keys no sweep here times (the Gluon switch and its threshold, the FP8 scratch counts): a rewritten entry
# keeps the checked-in entry's (merge_table replaces an entry whole); --gluon decides the first two itself
PREFILL_KEPT_KEYS = tuple(dict.fromkeys(("gluon", "GLUON_MIN_Q", *acfg.PREFILL_KNOB_DEFAULTS)))
TOL = 2e-2
# the FP8 tensor-core variants round q and the probabilities to e4m3 (3-bit mantissa: <= 2^-4 relative per value, ~0.026
# rms), and on random data the output's relative error is about that rms: their bound is the per-value one
TOL_FP8_DOT = 2**-4


def decode_cfg(tile: tuple, rule: tuple) -> dict:
    knobs = dict(DECODE_KNOB_DEFAULTS, **(rule[2] if len(rule) > 2 else {}))
    knobs.update(dict(zip(("fp8_widen", "fp8_dot", "fp8_q2"), tile[3:])))
    return {"BLOCK_N": tile[0], "num_warps": tile[1], "num_stages": tile[2], "programs_per_sm": rule[0],
            "min_split_tokens": rule[1], **knobs}


def decode_tiles(kv: str) -> list[tuple]:
    return DECODE_TILES + (DECODE_TILES_FP8 + DECODE_TILES_FP8_DOT if kv == "fp8" else [])


def decode_tile(cfg: dict) -> tuple:
    # what the split kernel's binary depends on (the split rule only picks the split count)
    return cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"], cfg["fp8_widen"], cfg["fp8_dot"], cfg["fp8_q2"]


def checked_in_decode(kv: str) -> list[dict]:
    """The decode configs this GPU's table runs now for a cache dtype (the small-batch one and the one of larger
    batches), each as a flat config: the baseline a sweep of the FP8 variants alone is picked against."""
    entry = acfg.decode_config(HEAD_DIM, KV_DTYPES[kv], torch.device(ac.DEVICE))
    flat = [{**acfg.decode_config_for(entry, n), "small_batch": 0, "small_batch_config": None} for n in (1, 1 << 30)]
    return [c for i, c in enumerate(flat) if c not in flat[:i]]


def decode_cfgs(kv: str, fp8_dot_only: bool = False) -> list[dict]:
    """Every decode config swept for a cache dtype: tiles x split rules; fp8_dot_only (an FP8 cache): the table's
    configs as they are, then the fp8_dot tiles x split rules."""
    if fp8_dot_only and kv == "fp8":
        return checked_in_decode(kv) + [decode_cfg(t, r) for t in DECODE_TILES_FP8_DOT for r in SPLIT_RULES]
    return [decode_cfg(t, r) for t in decode_tiles(kv) for r in SPLIT_RULES]


def prefill_cfg(tile: tuple, variant: dict | None = None) -> dict:
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tile), **(variant or {}))


def prefill_cfgs(kv: str, fp8_dot_only: bool = False) -> list[dict]:
    """Every prefill config swept for a cache dtype: the plain tiles, then the variants on the chosen tiles;
    fp8_dot_only (an FP8 cache): the table's config as it is, then the FP8_DOT tiles."""
    variants = [v for v in PREFILL_VARIANTS if ("RAGGED" not in v or kv != "fp8") and ("Q_F16" not in v or kv == "fp8")]
    fp8_dot = [prefill_cfg(t, PREFILL_FP8_DOT) for t in PREFILL_FP8_DOT_TILES] if kv == "fp8" else []
    if fp8_dot_only and kv == "fp8":
        return [acfg.prefill_config(HEAD_DIM, KV_DTYPES[kv], torch.device(ac.DEVICE))] + fp8_dot
    return [prefill_cfg(t) for t in PREFILL_TILES] + [prefill_cfg(t, v) for t in PREFILL_VARIANT_TILES.get(kv, [])
                                                      for v in variants] + fp8_dot


def gluon_cfgs(kv: str, gluon_tiles: list | None) -> list[dict]:
    """The Gluon prefill's configs for a cache dtype: one per tile dict, from any query length (GLUON_MIN_Q 0); the
    Triton tiles (the default's) only make a valid config: the Gluon kernel does not read them. A bf16 cache
    only (the kernel takes a 16-bit cache of q's dtype)."""
    if not gluon_tiles or kv != "bf16":
        return []
    return [{**acfg.default_prefill_config(HEAD_DIM), "gluon": g, "GLUON_MIN_Q": 0} for g in gluon_tiles]


# ---------------------------------------------------------------- timing

def time_us(calls: list, rep_ms: float) -> float:
    """Median microseconds per call of CUDA-graph replays of one graph that holds each of `calls` once."""
    return tuning.time_graph_us(calls, rep_ms, device=ac.DEVICE)


def time_sdpa(calls: list | None, rep_ms: float) -> float:
    # the baseline, timed as ours; NaN where no SDPA backend takes the case (or it would need too large a copy)
    if not calls:
        return math.nan
    try:
        return time_us(calls, rep_ms)
    except Exception as exc:  # noqa: BLE001
        print(f"    sdpa: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        return math.nan


# ---------------------------------------------------------------- compile first, in parallel


def _compile_worker(items: list) -> str:
    # runs each candidate once on a tiny problem with the same heads / dtypes / strides: the same binaries,
    # now in Triton's disk cache for the timing process
    done = 0
    for kind, heads, kv_heads, kv, cfg, splits, batch in items:
        try:
            if kind == "decode":
                case = DecodeCase(batch, 256, kv, heads, kv_heads)
                case.build()
                case.run(cfg, splits)
            else:
                case = PrefillCase(64, 64, kv, heads, kv_heads)
                case.build()
                case.run(cfg)
            torch.cuda.synchronize()
            done += 1
        except Exception:  # noqa: BLE001  e.g. out of shared memory: the timing pass reports it
            torch.cuda.synchronize()
    return f"{done}/{len(items)}"


def precompile(items: list[tuple], jobs: int) -> None:
    tuning.precompile(items, _compile_worker, jobs)


def compile_plan(decode_cases: list[DecodeCase], prefill_cases: list[PrefillCase], num_sms: int,
                 fp8_dot_only: bool = False, gluon_tiles: list | None = None) -> list[tuple]:
    """One item per distinct binary: the split kernel per tile for 1 and for > 1 splits, the merge kernel per
    power of two of the split count and column width (whatever the tile), the prefill kernel per tile and head
    shape. Each item: (kind, heads, kv_heads, kv, cfg, splits, batch)."""
    plan, merges = [], set()
    for c in decode_cases:
        for full in decode_cfgs(c.kv, fp8_dot_only):
            cfg = json.dumps(decode_cfg(decode_tile(full), (2, 128)), sort_keys=True)
            splits = c.splits(full, num_sms)
            pad = 1 if splits == 1 else max(2, 1 << (splits - 1).bit_length())
            plan.append(("decode", c.heads, c.kv_heads, c.kv, cfg, min(pad, 2), 1))
            # the merge splits its columns while batch x heads < SMs: a batch on each side of that line
            few = c.batch * c.heads < num_sms
            merges.add((c.heads, c.kv_heads, pad, 1 if few else triton.cdiv(num_sms, c.heads), full["merge_block_d"]))
    for h, kvh, pad, b, md in sorted(merges):
        if pad > 1:
            cfg = json.dumps(decode_cfg(DECODE_TILES[0], (2, 128, {"merge_block_d": md})), sort_keys=True)
            plan.append(("decode", h, kvh, "bf16", cfg, pad, b))
    for c in prefill_cases:
        for cfg in prefill_cfgs(c.kv, fp8_dot_only) + gluon_cfgs(c.kv, gluon_tiles):
            plan.append(("prefill", c.heads, c.kv_heads, c.kv, json.dumps(cfg, sort_keys=True), None, 1))
    # (configs as JSON while deduplicated: a Gluon config's tiles are a dict)
    return [(k, h, kvh, kv, json.loads(cfg), s, b) for k, h, kvh, kv, cfg, s, b in dict.fromkeys(plan)]


# ---------------------------------------------------------------- sweeps


def tolerance(cfg: dict) -> float:
    return TOL_FP8_DOT if cfg.get("fp8_dot") or cfg.get("FP8_DOT") else TOL


def measure(calls: list, ref: torch.Tensor, rep_ms: float, tol: float = TOL) -> tuple[float, float]:
    # calls: what one graph replays (decode: one call per rotation); the first one's output is checked
    try:
        err = rel_err(calls[0](), ref)
        return (time_us(calls, rep_ms) if err < tol else math.inf), err
    except Exception as exc:  # noqa: BLE001  out of shared memory etc.
        torch.cuda.synchronize()
        print(f"    skip: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        return math.inf, math.nan


def sweep_decode(case: DecodeCase, ceil: dict, num_sms: int, budget: Budget, rep_ms: float,
                 fp8_dot_only: bool = False) -> list[dict]:
    if not budget.left(case.name):  # not even the set-up (cache, reference, SDPA) once the budget is spent
        return []
    case.build()
    ref = case.reference()
    floor_us = case.kv_bytes() / ceil["copy_tbps"] / 1e6
    sdpa_us = time_sdpa(case.sdpa, rep_ms)
    rows, seen = [], {}
    for cfg in decode_cfgs(case.kv, fp8_dot_only):
        tile = decode_tile(cfg)
        splits = case.splits(cfg, num_sms)
        key = (tile, splits, cfg["merge_block_d"])  # what the launch depends on (the rule only picks splits)
        if key not in seen:
            if not budget.left(f"decode {case.name} {tile} splits={splits} merge_d={cfg['merge_block_d']}"):
                continue
            calls = [lambda c=cfg, s=splits, r=r: case.run(c, s, r) for r in range(case.rotations)]
            seen[key] = measure(calls, ref, rep_ms, tolerance(cfg))
            us, err = seen[key]
            print(f"  decode {case.name} BLOCK_N={tile[0]} warps={tile[1]} stages={tile[2]} splits={splits:2d} "
                  f"merge_d={cfg['merge_block_d']} widen={cfg['fp8_widen']} fp8_dot={cfg['fp8_dot']} "
                  f"q2={cfg['fp8_q2']} us={us:8.1f} "
                  f"frac_bw={floor_us / us:.2f} sdpa_us={sdpa_us:7.1f} err={err:.1e}", flush=True)
        if key in seen:
            us, err = seen[key]
            rows.append({"kind": "decode", "case": case.name, "batch": case.batch, "kv": case.kv, "cfg": cfg,
                         "splits": splits,
                         "us": us, "floor_us": floor_us, "frac": floor_us / us, "sdpa_us": sdpa_us, "err": err})
    case.free()
    return rows


def gluon_runs(case: PrefillCase, cfg: dict) -> bool:
    """Whether a config's Gluon kernel runs this case (sm90, shapes it takes): else the call would time Triton's."""
    from kernels.attention.prefill_gluon import gluon_config, gluon_supported

    t = case.t
    return gluon_supported(t["q"], t["k"], t["v"], t["cu"], t["lens"], t["tables"], gluon_config(cfg, HEAD_DIM),
                           *case.scales, None)


def sweep_prefill(case: PrefillCase, ceil: dict, budget: Budget, rep_ms: float,
                  fp8_dot_only: bool = False, gluon_tiles: list | None = None) -> list[dict]:
    if not budget.left(case.name):
        return []
    case.build()
    ref = case.reference()
    floor_us = case.flops() / ceil["bf16_tflops"] / 1e6
    sdpa_us = time_sdpa(case.sdpa, rep_ms)
    rows = []
    for cfg in prefill_cfgs(case.kv, fp8_dot_only) + gluon_cfgs(case.kv, gluon_tiles):
        if cfg.get("gluon"):
            what = f"gluon={json.dumps(cfg['gluon'])}"
            if not gluon_runs(case, cfg):
                print(f"  {case.kind} {case.name} {what}: skip, the Gluon kernel does not run this case here",
                      flush=True)
                continue
        else:
            what = (f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} warps={cfg['num_warps']} "
                    f"stages={cfg['num_stages']}" + "".join(f" {k}" for k in acfg.PREFILL_VARIANT_KEYS if cfg.get(k)))
        if not budget.left(f"{case.kind} {case.name} {what}"):
            continue
        us, err = measure([lambda c=cfg: case.run(c)], ref, rep_ms, tolerance(cfg))
        print(f"  {case.kind} {case.name} {what} us={us:9.1f} frac_mm={floor_us / us:.2f} sdpa_us={sdpa_us:9.1f} "
              f"sdpa_frac_mm={floor_us / sdpa_us:.2f} err={err:.1e}", flush=True)
        rows.append({"kind": case.kind, "case": case.name, "q_len": case.q_len, "kv": case.kv, "cfg": cfg, "us": us,
                     "floor_us": floor_us, "frac": floor_us / us, "sdpa_us": sdpa_us, "err": err})
    case.free()
    return rows


# ---------------------------------------------------------------- the Gluon prefill's keys


def gluon_min_q(wins: dict[int, bool]) -> int | None:
    """The shortest query length from which Gluon won at every longer measured one; None: it lost at the longest."""
    min_q = None
    for n in sorted(wins, reverse=True):
        if not wins[n]:
            break
        min_q = n
    return min_q


def pick_gluon(rows: list[dict], table: dict) -> dict[str, dict]:
    """Per prefill entry of table whose cases the Gluon kernel was timed on (every one, per tile dict): its keys,
    {"gluon": tiles, "GLUON_MIN_Q": n}, or {} where it never won at the longest length. Won at a length: faster
    than the entry's Triton config on every case of that length (q_len: max_seqlen_q, what GLUON_MIN_Q is compared
    with). Tiles: of those that won somewhere, the best geometric mean of frac over all the entry's cases as the
    table would run them (Gluon from its GLUON_MIN_Q, the Triton config below)."""
    picks = {}
    for key, entry in table.get("prefill", {}).items():
        triton_cfg = {k: v for k, v in entry.items() if k != "geomean_frac"}
        mine = [r for r in rows if r["kind"] != "decode" and config_key(HEAD_DIM, KV_DTYPES[r["kv"]]) == key]
        triton = {r["case"]: r for r in mine if r["cfg"] == triton_cfg}
        by_tiles: dict[str, list[dict]] = {}
        for r in mine:
            if r["cfg"].get("gluon") and r["case"] in triton:
                by_tiles.setdefault(json.dumps(r["cfg"]["gluon"], sort_keys=True), []).append(r)
        full = {t: rs for t, rs in by_tiles.items() if len(rs) == len(triton)}
        if not full:  # not timed here (an FP8 cache, --gluon off, the budget): the entry keeps the table's keys
            continue
        min_q = {}
        for t, rs in full.items():
            wins: dict[int, bool] = {}
            for r in rs:
                wins[r["q_len"]] = wins.get(r["q_len"], True) and r["us"] < triton[r["case"]]["us"]
            min_q[t] = gluon_min_q(wins)
        won = {t: n for t, n in min_q.items() if n is not None}
        if not won:
            picks[key] = {}
            continue
        best = max(won, key=lambda t: geomean([(r if r["q_len"] >= won[t] else triton[r["case"]])["frac"]
                                               for r in full[t]]))
        picks[key] = {"gluon": json.loads(best), "GLUON_MIN_Q": won[best]}
    return picks


def with_prefill_keys(written: dict, old: dict, table: dict, gluon_picks: dict[str, dict]) -> dict:
    """written (merge_table's file) with, in each prefill entry this run picked, the checked-in entry's
    PREFILL_KEPT_KEYS (no sweep here times them), or where the Gluon kernel was timed gluon_picks' keys instead of
    the checked-in "gluon" / GLUON_MIN_Q (none where it never won)."""
    for key in table.get("prefill", {}):
        entry = {**written["prefill"][key],
                 **{k: v for k, v in old.get("prefill", {}).get(key, {}).items() if k in PREFILL_KEPT_KEYS}}
        if key in gluon_picks:
            entry = {k: v for k, v in entry.items() if k not in ("gluon", "GLUON_MIN_Q")} | gluon_picks[key]
        written["prefill"][key] = entry
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop timing new candidates after this long")
    ap.add_argument("--rep-ms", type=float, default=15.0, help="timing window per candidate")
    ap.add_argument("--jobs", type=int, default=12, help="compile worker processes (1: compile while timing)")
    ap.add_argument("--only", default="decode,extend,prefill")
    ap.add_argument("--kv-dtypes", default="bf16,fp8", help="the cases of these cache dtypes only (e.g. fp8: the "
                    "budget on the FP8 cases, where the FP8 tensor-core variants are swept; the table keeps the rest)")
    ap.add_argument("--fp8-dot-only", action="store_true", help="FP8 cases: the table's configs as they are against "
                    "the FP8 tensor-core variants' tiles only (decode fp8_dot, prefill FP8_DOT), not the whole sweep")
    ap.add_argument("--pick-ragged", action="store_true",
                    help="let RAGGED prefill configs into the table (callers that pass this step's K/V)")
    ap.add_argument("--gluon", nargs="?", const=json.dumps(GLUON_TILES), default=None,
                    help="bf16 prefill / extend cases also on the Gluon kernel (sm90), its keys into the table; "
                    "optional JSON tiles (a dict or a list of them)")
    args = ap.parse_args()
    if unknown := sorted(set(args.kv_dtypes.split(",")) - set(KV_DTYPES)):
        ap.error(f"--kv-dtypes: unknown {unknown}, choose from {list(KV_DTYPES)}")
    gluon_tiles = None if args.gluon is None else json.loads(args.gluon)
    gluon_tiles = gluon_tiles if gluon_tiles is None or isinstance(gluon_tiles, list) else [gluon_tiles]
    if gluon_tiles is not None and torch.cuda.get_device_capability() != (9, 0):  # its rows would be skipped anyway
        ap.error("--gluon: the Gluon prefill runs on sm90 (H100 / H200) only")
    t_start = time.time()
    out = Path(args.out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    kvs = args.kv_dtypes.split(",")
    decode_cases = [c for c in DECODE_CASES if c.kv in kvs] if "decode" in only else []
    prefill_cases = [c for c in (EXTEND_CASES if "extend" in only else []) + (PREFILL_CASES if "prefill" in only
                                                                                else []) if c.kv in kvs]
    if args.jobs > 1:
        precompile(compile_plan(decode_cases, prefill_cases, num_sms, args.fp8_dot_only, gluon_tiles), args.jobs)
    ceil = measure_ceilings()  # ~3 s
    print(f"ceilings: copy {ceil['copy_tbps']:.2f} TB/s, bf16 {ceil['bf16_tflops']:.0f} TFLOP/s, {num_sms} SMs",
          flush=True)
    budget = Budget(args.budget_s - (time.time() - t_start))
    rows: list[dict] = []
    for case in decode_cases:
        rows += sweep_decode(case, ceil, num_sms, budget, args.rep_ms, args.fp8_dot_only)
    for case in prefill_cases:
        rows += sweep_prefill(case, ceil, budget, args.rep_ms, args.fp8_dot_only, gluon_tiles)
    # the Triton configs' pick; the Gluon kernel's rows decide its own keys over it (pick_gluon)
    triton_rows = [r for r in rows if not r["cfg"].get("gluon")]
    table = pick_small_batch(triton_rows, pick(triton_rows, args.pick_ragged))
    gluon_picks = pick_gluon(rows, table)
    best_per_case = {}
    for r in rows:
        b = best_per_case.get(r["case"])
        if b is None or r["us"] < b["us"]:
            best_per_case[r["case"]] = r
    print("\ncase                                  best us  frac   sdpa us  default us  best config")
    for name, r in best_per_case.items():
        dflt = [x for x in rows if x["case"] == name and _is_default(x)]
        d_us = f"{dflt[0]['us']:10.1f}" if dflt else "       n/a"
        extra = f" splits={r['splits']}" if "splits" in r else ""
        print(f"{name:36s} {r['us']:9.1f} {r['frac']:5.2f} {r['sdpa_us']:9.1f} {d_us}  {r['cfg']}{extra}")
    gpu = device_name(torch.device("cuda"))
    old = CONFIG_DIR / config_file_name(gpu)
    old_table = json.loads(old.read_text()) if old.exists() else {}
    written = with_prefill_keys(merge_table(old_table, table), old_table, table, gluon_picks)
    (out / "configs" / config_file_name(gpu)).write_text(json.dumps(written, indent=1))
    (out / "tune_attention.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "ceilings": ceil, "table": table, "gluon": gluon_picks,
         "best_per_case": best_per_case,
         "rows": rows, "skipped": budget.skipped, "seconds": time.time() - t_start}, indent=1, default=str))
    picks = "; ".join(f"{k} {kk}: {v}" for k, t in table.items() for kk, v in t.items())
    picks += "".join(f"; prefill {k} gluon: {v or 'never won'}" for k, v in gluon_picks.items())
    print(f"\ntune_attention summary ({gpu}, {time.time() - t_start:.0f} s, {len(rows)} timed, "
          f"{len(budget.skipped)} skipped for the budget): {picks}")
    print(f"table: {out / 'configs' / config_file_name(gpu)} (copy to kernels/configs/)")


def _is_default(row: dict) -> bool:
    from kernels.attention.config import default_decode_config, default_prefill_config

    if row["kind"] == "decode":
        return row["cfg"] == default_decode_config(HEAD_DIM)
    return row["cfg"] == default_prefill_config(HEAD_DIM)


if __name__ == "__main__":
    main()

