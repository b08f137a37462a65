"""Sweep the block-scaled FP8 linear's configs on this GPU and write the table kernels/linear/w8a8_config.py reads.

python benchmarks/tune_fp8_linear.py --out DIR [--budget-s 200] [--jobs 12] [--m 1,2,4,...] [--shapes qkv,o,...]
                                     [--extra-shapes 2560x2048,...]  (N x K of other layers, e.g. a TP shard's)
TRITON_INTERPRET=1 python benchmarks/tune_fp8_linear.py --smoke --m 1,20  (a CPU: the script's logic on a tiny shape)

For each shape (bench_fp8_linear.py's, Qwen3-30B-A3B and a dense 8B MLP, and GLM-4.5-Air's attention and
shared-expert shapes) and M bucket, candidates by M range:
- M <= 16: the dot-free gemv (column tiles 32-128, 2/4 warps) and the dot kernel with swapped operands, both with
  split K for 1-8 programs per SM (partials summed by the tile's last program);
- M <= 64: the dot kernel, swapped or not, activations quantized inside the GEMM or in a separate launch;
- M <= 256: 64/128-row tiles, 64-256 columns, quantization inside or separate, split K for 1-2 waves;
- larger: 64-256 square-ish tiles, 3-5 stages, GROUP_M 1 / 8;
and the heuristic's own config always (the table never loses to it); where cuBLAS's block-scaled FP8 GEMM runs
(kernels/linear/w8a8.py), it is timed after the best tile, and a win writes that tile with CUBLAS 1 (the tile runs
where cuBLAS's GEMM does not). Each candidate runs once eagerly and is checked against w8a8_block_linear_ref (a
config off by more than 2e-2 relative is dropped), then timed as bench_fp8_linear.py does: a CUDA graph of NUM_ROT
calls on rotated weight copies (no L2 reuse between calls), median of the replays that fit in --rep-ms. cuBLAS
bf16 F.linear is timed once per case as the baseline.

Bounded GPU time: every distinct binary is compiled first in --jobs worker processes (Triton's disk cache then
serves this process); once --budget-s has passed the remaining candidates are skipped and listed (their buckets
fall back to the heuristic). Small M buckets go first.

Writes DIR/tune_fp8_linear.json (every row, the best per case) and DIR/configs/fp8_linear_{gpu}.json (copy it to
kernels/configs/). Prints one line per case and 'tune_fp8_linear summary' last.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import tuning  # noqa: E402
from benchmarks.bench_fp8_linear import ALL_SHAPES, NUM_ROT  # noqa: E402
from benchmarks.bench_moe import measure_ceilings  # noqa: E402
from benchmarks.tuning import Budget, sweep  # noqa: E402
from kernels.fp8 import FP8_BLOCK, quantize_weight_block  # noqa: E402
from kernels.linear.w8a8 import (  # noqa: E402
    _config,
    cublas_block_scaled_available,
    w8a8_block_linear,
    w8a8_block_linear_ref,
)
from kernels.linear.w8a8_config import KEYS, _split, config_file_name, shape_key  # noqa: E402
from kernels.moe_config import device_name  # noqa: E402

M_BUCKETS = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096"
SMEM_BYTES = 220 * 1024  # a config whose pipeline stages need more is not tried
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: --smoke under TRITON_INTERPRET=1 (the logic only)
SMOKE_SHAPES = {"smoke": (256, 384)}
# relative error vs w8a8_block_linear_ref above which a config is dropped; the interpreter rounds fp32 -> e4m3
# differently from torch (see tests/test_kernels_fp8_linear.py)
TOL = 2e-2 if DEVICE == "cuda" else 0.15


def _cfg(kernel: str, bm: int, bn: int, warps: int, stages: int, quant_a: int = 0, swap: int = 0,
         group_m: int = 1, tma: int = 0) -> dict:
    return {"KERNEL": kernel, "BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": group_m, "num_warps": warps,
            "num_stages": stages, "QUANT_A": quant_a, "SWAP_AB": swap, "SPLIT_K": 1, "FUSED_REDUCE": 1, "TMA": tma}


def _smem(cfg: dict) -> int:
    a_bytes = 2 if cfg["QUANT_A"] else 1  # the 16-bit activations when the GEMM quantizes them
    return cfg["num_stages"] * FP8_BLOCK * (cfg["BLOCK_M"] * a_bytes + cfg["BLOCK_N"])


def tiles_for(m: int) -> list[dict]:
    """The tile configs tried at M rows (split K is added by candidates())."""
    p2 = 1 << max(0, (m - 1).bit_length())  # next power of two
    out: list[dict] = []
    # the lists leave out what spills when compiled for sm90 (acc plus the unscaled dot result of a K step are two
    # fp32 tiles in registers): 128x256 / 256x128 on 8 warps, 128x128 and 64x256 on 4, a gemv 128 wide on 2
    if m <= 16:
        for bn, warps in ((32, 2), (32, 4), (64, 2), (64, 4), (128, 4), (128, 8)):
            out.append(_cfg("gemv", min(p2, 8), bn, warps, 2))
        for bn in (64, 128):
            for stages in (3, 5):
                out.append(_cfg("dot", 16, bn, 4, stages, quant_a=1, swap=1))
        out.append(_cfg("dot", 16, 32, 4, 4, quant_a=1))
    if 16 < m <= 64:
        bm = max(16, p2)
        for bn in (32, 64, 128):
            for quant_a in (0, 1):
                out.append(_cfg("dot", bm, bn, 4, 4, quant_a=quant_a))
                for stages in (3, 5):
                    out.append(_cfg("dot", bm, bn, 4, stages, quant_a=quant_a, swap=1))
    if 64 < m <= 256:
        for bm, bn, warps in ((64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (64, 256, 8)):
            for quant_a in (0, 1) if bn <= 128 else (0,):
                out.append(_cfg("dot", bm, bn, warps, 4 if bn < 256 else 3, quant_a=quant_a, group_m=8))
        out += [_cfg("dot", 64, 128, 4, 5, group_m=8), _cfg("dot", 64, 64, 4, 6, group_m=8)]
    if m > 256:
        for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4), (128, 64, 8, 3),
                                      (64, 128, 4, 4), (64, 128, 4, 3), (128, 128, 16, 4), (64, 256, 8, 3),
                                      (256, 64, 8, 3), (128, 64, 4, 4)):
            for group_m in (1, 8):
                out.append(_cfg("dot", bm, bn, warps, stages, group_m=group_m))
    # every plain dot tile on pre-quantized activations also with TMA loads (fewer registers: 154 instead of 176
    # for 128 x 128 on 8 warps, 152 instead of 198 for 64 x 128 on 4, compiled for sm90)
    out += [dict(c, TMA=1) for c in out if c["KERNEL"] == "dot" and not c["QUANT_A"] and not c["SWAP_AB"]]
    return [c for c in out if _smem(c) <= SMEM_BYTES]


def candidates(m: int, n: int, k: int, num_sms: int) -> list[dict]:
    """tiles_for(m) x split K for 1 / 2 / 4 / 8 programs per SM (deduplicated), the heuristic's config first."""
    # the heuristic's Triton tile (its cuBLAS route, where w8a8_config.default_config takes it, is timed as the
    # extra candidate)
    heuristic = {key: v for key, v in _config(m, n, k, num_sms).items() if key in KEYS} | {"CUBLAS": 0}
    out = [heuristic]
    per_sm = (1, 2, 4, 8) if m <= 64 else (1, 2)
    for tile in tiles_for(m):
        if n % tile["BLOCK_N"]:
            continue
        for split in sorted({_split(m, n, k, tile["BLOCK_M"], tile["BLOCK_N"], num_sms, p) for p in per_sm}):
            # as normalize() will even it out: K blocks per split, no empty split
            per = -(-(k // FP8_BLOCK) // split)
            out.append(dict(tile, SPLIT_K=-(-(k // FP8_BLOCK) // per)))
    seen, unique = set(), []
    for c in out:
        key = json.dumps(c, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def binary_key(cfg: dict) -> tuple:
    mode = 0 if cfg["SPLIT_K"] == 1 else (2 if cfg["FUSED_REDUCE"] else 1)
    return (cfg["KERNEL"], cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"], cfg["QUANT_A"],
            cfg["SWAP_AB"], cfg.get("TMA", 0), mode)


# ---------------------------------------------------------------- compile first, in parallel


def _compile_worker(cfgs: list[dict]) -> str:
    # one call per binary on a tiny problem with the same dtypes, strides divisible by 16 and split mode: the same
    # binaries, now in Triton's disk cache for the timing process
    done = 0
    for cfg in cfgs:
        try:
            n = max(256, cfg["BLOCK_N"])
            w, s = quantize_weight_block(torch.randn(n, 512, device="cuda") / 20)
            x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
            w8a8_block_linear(x, w, s, config=dict(cfg, SPLIT_K=min(cfg["SPLIT_K"], 2)))
            torch.cuda.synchronize()
            done += 1
        except Exception:  # noqa: BLE001  e.g. out of shared memory: the timing pass reports it
            torch.cuda.synchronize()
    return f"{done}/{len(cfgs)}"


def precompile(cfgs: list[dict], jobs: int) -> None:
    tuning.precompile(cfgs, _compile_worker, jobs)


# ---------------------------------------------------------------- timing


def time_graph_us(fn, rep_ms: float) -> float:
    """Median microseconds of one replay of a CUDA graph holding fn() (fn already ran once eagerly)."""
    return tuning.time_graph_us([fn], rep_ms, max_reps=50, device=DEVICE)


def sweep_case(name: str, m: int, weights: dict, ceil: dict, num_sms: int, budget: Budget, rep_ms: float) -> dict:
    n, k = ALL_SHAPES[name]
    qs, ws = weights[name]
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, generator=torch.Generator(DEVICE).manual_seed(m))
    ref = w8a8_block_linear_ref(x, *qs[0])
    bf16_us = time_graph_us(lambda: [F.linear(x, w) for w in ws], rep_ms) / len(ws)
    weight_bytes = n * k + 4 * (n // 128) * (k // 128)
    floor_us = max((weight_bytes + 2 * m * (k + n)) / ceil["copy_tbps"] / 1e6,
                   2 * m * n * k / ceil["fp8_tflops"] / 1e6)
    rows, best = sweep(candidates(m, n, k, num_sms), lambda c: w8a8_block_linear(x, *qs[0], config=c), ref,
                       lambda c: time_graph_us(lambda: [w8a8_block_linear(x, q, s, config=c) for q, s in qs], rep_ms)
                       / len(qs), TOL, budget, f"{name} M={m}", DEVICE)
    if best and cublas_block_scaled_available(torch.device(DEVICE)):
        # cuBLAS's block-scaled GEMM as one more candidate: the entry keeps the best Triton tile (what runs where
        # cuBLAS's is unavailable) with CUBLAS 1 when cuBLAS wins
        cublas_rows, cublas_best = sweep(
            [dict(best["cfg"], CUBLAS=1)], lambda c: w8a8_block_linear(x, *qs[0], config=c), ref,
            lambda c: time_graph_us(lambda: [w8a8_block_linear(x, q, s, config=c) for q, s in qs], rep_ms) / len(qs),
            TOL, budget, f"{name} M={m} cuBLAS", DEVICE)
        rows += cublas_rows  # none when the budget is spent
        if cublas_best and cublas_best["us"] < best["us"]:
            best = cublas_best
    timed = [r for r in rows if math.isfinite(r["us"])]
    heuristic = rows[0] if rows else None  # candidates() puts the heuristic's config first
    case = {"shape": name, "n": n, "k": k, "m": m, "bf16_us": bf16_us, "floor_us": floor_us, "rows": rows,
            "best": best, "heuristic_us": heuristic["us"] if heuristic else math.nan}
    if not best:
        print(f"{name:16s} M={m:5d} [{n}x{k}] no candidate passed ({len(rows)} tried)", flush=True)
    else:
        c = best["cfg"]
        print(f"{name:16s} M={m:5d} [{n}x{k}] best {best['us']:8.1f} us (heuristic {case['heuristic_us']:8.1f}, "
              f"bf16 {bf16_us:8.1f}, floor {floor_us:7.1f}: {floor_us / best['us']:.2f} of floor, "
              f"x{bf16_us / best['us']:.2f} bf16) {c['KERNEL']} {c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} "
              f"s{c['num_stages']} split {c['SPLIT_K']} qa {c['QUANT_A']} swap {c['SWAP_AB']} tma {c['TMA']} "
              f"g{c['GROUP_M']}{' cuBLAS' if c.get('CUBLAS') else ''} "
              f"({len(timed)}/{len(rows)} timed)", flush=True)
    return case


def make_weights(names: list[str], num_rot: int) -> dict:
    out = {}
    for name in names:
        n, k = ALL_SHAPES[name]
        gen = torch.Generator(device=DEVICE).manual_seed(n + k)
        dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
        ws = [torch.randn(n, k, device=DEVICE, generator=gen, dtype=dtype) / k**0.5 for _ in range(num_rot)]
        out[name] = ([quantize_weight_block(w) for w in ws], ws)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop timing new candidates after this long")
    ap.add_argument("--rep-ms", type=float, default=8.0, help="timing window per candidate")
    ap.add_argument("--jobs", type=int, default=12, help="compile worker processes (1: compile while timing)")
    ap.add_argument("--m", default=M_BUCKETS)
    ap.add_argument("--shapes", default=",".join(ALL_SHAPES))
    ap.add_argument("--extra-shapes", default="", help="more N x K shapes, e.g. 2560x2048,1024x4096")
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1: one tiny shape, the logic only")
    args = ap.parse_args(argv)
    if DEVICE == "cpu" and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        raise SystemExit("tune_fp8_linear needs a CUDA GPU (FP8 tensor cores: sm89 or newer); on a CPU only "
                         "TRITON_INTERPRET=1 ... --smoke")
    t_start = time.time()
    out = Path(args.out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    if args.smoke:
        ALL_SHAPES.update(SMOKE_SHAPES)
        args.shapes, args.jobs = ",".join(SMOKE_SHAPES), 1
    names = args.shapes.split(",") if args.shapes else []
    unknown = [s for s in names if s not in ALL_SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {','.join(ALL_SHAPES)}")
    for spec in filter(None, args.extra_shapes.split(",")):
        try:
            n, k = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--extra-shapes: {spec!r} is not NxK (e.g. 2560x2048)") from None
        if n % FP8_BLOCK or k % FP8_BLOCK:
            raise SystemExit(f"--extra-shapes: {spec} is not in whole {FP8_BLOCK}-blocks")
        ALL_SHAPES[spec] = (n, k)
        names.append(spec)
    ms = sorted(int(m) for m in args.m.split(","))
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 4
    if args.jobs > 1:
        plan = {}
        for name in names:
            n, k = ALL_SHAPES[name]
            for m in ms:
                for cfg in candidates(m, n, k, num_sms):
                    plan.setdefault(binary_key(cfg), cfg)
        precompile(list(plan.values()), args.jobs)
    ceil = measure_ceilings() if DEVICE == "cuda" else {"copy_tbps": 1.0, "bf16_tflops": 1.0, "fp8_tflops": 1.0}
    print(f"ceilings: copy {ceil['copy_tbps']:.2f} TB/s, fp8 {ceil['fp8_tflops']:.0f} TFLOP/s, {num_sms} SMs",
          flush=True)
    weights = make_weights(names, NUM_ROT if DEVICE == "cuda" else 1)
    budget = Budget(args.budget_s - (time.time() - t_start))
    cases = [sweep_case(name, m, weights, ceil, num_sms, budget, args.rep_ms) for m in ms for name in names]
    table: dict[str, dict[str, dict]] = {}
    for c in cases:
        if c["best"]:
            table.setdefault(shape_key(c["n"], c["k"]), {})[str(c["m"])] = c["best"]["cfg"]
    gpu = device_name(torch.device(DEVICE))
    path = out / "configs" / config_file_name(gpu)
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    (out / "tune_fp8_linear.json").write_text(json.dumps(
        {"device": gpu, "ceilings": ceil, "cases": cases, "skipped": budget.skipped,
         "seconds": time.time() - t_start}, indent=1, default=str))
    done = [c for c in cases if c["best"]]
    fracs = [c["floor_us"] / c["best"]["us"] for c in done]
    gain = [c["heuristic_us"] / c["best"]["us"] for c in done if math.isfinite(c["heuristic_us"])]
    worst = min(done, key=lambda c: c["floor_us"] / c["best"]["us"]) if done else None
    print(f"\ntune_fp8_linear summary ({gpu}, {time.time() - t_start:.0f} s, {len(done)}/{len(cases)} cases, "
          f"{len(budget.skipped)} candidates skipped for the budget): of floor min "
          f"{min(fracs, default=math.nan):.2f}" + (f" ({worst['shape']} M={worst['m']})" if worst else "") +
          f", geomean {math.exp(sum(map(math.log, fracs)) / max(len(fracs), 1)):.2f}; best vs heuristic geomean "
          f"x{math.exp(sum(map(math.log, gain)) / max(len(gain), 1)):.2f}")
    print(f"table: {path} (copy to kernels/configs/)")


if __name__ == "__main__":
    main()
