"""Measure the dense GEMV linear (kernels/linear/gemv.py) against its baseline on this GPU and write its tables.

python benchmarks/tune_linear_gemv.py --shapes qwen3,glm45air --tp 1,2 --m 1,2,4,8,16 --out-dir DIR [--weights bf16,fp8]
    [--budget-s 200] [--jobs 14] [--rep-ms 2] [--min-speedup 1.03]      (--shapes also takes N x K: 5120x2048)
TRITON_INTERPRET=1 python benchmarks/tune_linear_gemv.py --dry-run --out-dir DIR   (a CPU: the logic on tiny shapes)

--weights bf16 (the default): 16-bit weights, the GEMV against cuBLAS (F.linear). --weights fp8: e4m3 weights with
[128, 128] block scales, the weight-only FP8 GEMV (gemv_linear_fp8, activations stay bf16) against the W8A8 block
linear (kernels/linear/w8a8.py w8a8_block_linear with its own tuned table or heuristic config), on the shapes whose
merged parts are in whole 128-blocks (the ones the model keeps in FP8); candidates checked against the dequantized
weight's product in fp32. FP8 candidates: FMA tiles 4-64 columns wide with K steps of 128-2048 bytes a row, split K
for 2-16 programs per SM (the M=1 projections are latency-bound); tl.dot tiles with one scale block per K step.

Shapes: the 16-bit dense linears of a decoder layer (bench_e2e.py's configs), as one TP rank holds them for each
--tp size: Qwen3-30B-A3B qkv and o; GLM-4.5-Air qkv (with its bias), o, the shared expert's gate_up and down and
the first (dense) layer's gate_up and down. Per shape and M bucket: cuBLAS (F.linear) and each candidate config
(fp32-FMA tiles 16-128 columns wide; tl.dot tiles 32-128 wide for the rows padded to 16; split K for 1-8 programs
per SM) as CUDA-graph replays of one call per weight copy, the copies rotated so that no call finds its weight in
L2 (>= 4 copies and > 2x L2 in all, at most 32: weights under ~3 MB rotate through less). Each candidate's output
is checked against F.linear before it is timed.

The table (DIR/configs/linear_gemv_{gpu}.json, fp8: linear_gemv_fp8_{gpu}.json; copy it to kernels/configs/) gets a
bucket ONLY where the best GEMV, timed again against the baseline (interleaved, median of 3 each), beat it by
--min-speedup (3%): elsewhere the model keeps the baseline. It starts from the checked-in table for this GPU: the
buckets this run timed are replaced (or removed where the baseline won), all others kept. DIR/tune_linear_gemv.json
holds one report row per case {weights, shape, n, k, m, base, base_us, gemv_us, cfg, floor_us, fraction, ...}
(floor: weight (+ scale) + activation bytes over the copy bandwidth measured in this process) and every candidate's
time. Every distinct binary is compiled
first in --jobs processes; after --budget-s (counted from the start) the remaining candidates are skipped and listed.
Prints one line per case and 'tune_linear_gemv summary' last."""

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
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import tuning  # noqa: E402
from benchmarks.bench_e2e import GLM_4_5_AIR, QWEN3_30B_A3B  # noqa: E402
from benchmarks.tuning import Budget  # noqa: E402
from kernels.fp8 import FP8_BLOCK, quantize_weight_block  # noqa: E402
from kernels.linear import gemv_config as linear_gemv_config  # noqa: E402
from kernels.linear.gemv import gemv_linear, gemv_linear_fp8, gemv_linear_fp8_ref  # noqa: E402
from kernels.linear.gemv_config import MAX_ROWS, check_config, config_file_name, shape_key  # noqa: E402
from kernels.linear.w8a8 import w8a8_block_linear  # noqa: E402
from kernels.moe_config import device_name  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: --dry-run under TRITON_INTERPRET=1 (the logic only)
MODELS = {"qwen3": QWEN3_30B_A3B, "glm45air": GLM_4_5_AIR}
DRY_SHAPES = [("dry_qkv", 48, 160, True), ("dry_o", 40, 96, False)]  # (name, N, K, bias): odd-ish, a few tiles
DRY_FP8_SHAPES = [("dry_fp8_qkv", 256, 384, True), ("dry_fp8_o", 128, 256, False)]  # whole blocks (the W8A8 baseline)
ACT_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # (the interpreter computes bf16 wrongly)
TOL = 1e-2  # relative error vs F.linear (bf16 outputs on the GPU; fp32 in the interpreter)
# (BLOCK_N, BLOCK_K, num_warps, num_stages) per path; the fp32-FMA tiles keep BLOCK_M accumulator rows, so fewer
# and narrower ones as M grows (sm90 compile: 54 registers at M=1 32x256, 187 at M=16); num_stages > 1 on the FMA
# path stages the activation broadcast through shared memory too (65 KB at 32x256, 3 stages), so mostly 1
FMA_TILES = {1: [(16, 256, 4, 1), (32, 256, 4, 1), (64, 256, 8, 1), (16, 512, 4, 1), (32, 512, 8, 1),
                 (64, 128, 4, 1), (32, 256, 4, 2), (128, 128, 8, 1)],
             4: [(16, 256, 4, 1), (32, 256, 4, 1), (16, 512, 4, 1), (64, 128, 4, 1), (32, 128, 4, 1)],
             16: [(16, 256, 4, 1), (16, 128, 4, 1), (32, 128, 4, 1)]}
DOT_TILES = [(64, 128, 4, 3), (64, 128, 4, 5), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4)]
# FP8 (e4m3, a byte per weight). The M=1 projections are latency-bound (K steps in series, the split-K tail; session
# 8's probes: the best bf16 o_proj tile was 8 columns wide, split 8; the FP8 MoE GEMV's 4 x 1024 on 2 warps): narrow
# tiles with long K steps (up to 2048 bytes a row: all of Qwen3's qkv row in one step) and up to 16 programs per SM
# among them. tl.dot tiles take one 128-wide scale block per K step (BLOCK_K <= 128)
FP8_FMA_TILES = {1: [(4, 2048, 4, 1), (4, 1024, 2, 1), (8, 1024, 4, 1), (8, 512, 2, 1), (16, 512, 4, 1),
                     (16, 1024, 4, 1), (32, 256, 4, 1), (32, 512, 4, 1), (64, 256, 8, 1)],
                 4: [(8, 512, 2, 1), (16, 512, 2, 1), (16, 256, 4, 1), (32, 256, 4, 1), (32, 128, 4, 1)],
                 16: [(8, 512, 2, 1), (16, 256, 4, 1), (16, 128, 4, 1), (32, 128, 4, 1)]}
FP8_DOT_TILES = [(64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 4), (32, 128, 4, 4)]
PER_SM = {0: (2, 4, 8), 1: (1, 2, 4)}  # split-K targets: programs per SM (FMA programs are small: more of them)
FP8_PER_SM = {0: (2, 4, 8, 16), 1: (1, 2, 4)}


def model_linears(name: str, tp: int, fp8: bool = False) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, has_bias) of the dense linears one TP rank holds (models/parallel_layers.py's split); fp8: only
    those the model keeps in FP8 (each merged part's rows and the columns in whole 128-blocks, parallel_layers
    _use_fp8)."""
    cfg = MODELS[name]
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads

    def div(v: int, what: str) -> int:
        if v % tp:
            raise SystemExit(f"{name}: {what} {v} does not split over tp={tp}")
        return v // tp

    # QKVParallelLinear: whole heads per rank, a KV head replicated when there are fewer than tp
    kv_local = div(kv, "num_key_value_heads") if kv >= tp else 1
    q_local = div(heads, "num_attention_heads") * d
    # (name, merged parts' rows, cols, bias)
    out = [(f"{name}_qkv", [q_local, kv_local * d, kv_local * d], h, bool(cfg.get("attention_bias"))),
           (f"{name}_o", [h], div(heads * d, "o input"), False)]
    shared = cfg.get("moe_intermediate_size", 0) * cfg.get("n_shared_experts", 0)
    if shared:
        out += [(f"{name}_shared_gate_up", [div(shared, "shared expert")] * 2, h, False),
                (f"{name}_shared_down", [h], div(shared, "shared expert"), False)]
    if cfg.get("first_k_dense_replace", 0) or cfg.get("mlp_only_layers"):
        inter = div(cfg["intermediate_size"], "intermediate_size")
        out += [(f"{name}_dense_gate_up", [inter] * 2, h, False), (f"{name}_dense_down", [h], inter, False)]
    if fp8:
        out = [o for o in out if all(r % FP8_BLOCK == 0 for r in o[1]) and o[2] % FP8_BLOCK == 0]
    return [(f"{n}_tp{tp}" if tp > 1 else n, sum(parts), cols, bias) for n, parts, cols, bias in out]


def parse_shapes(spec: str, tps: list[int], fp8: bool = False) -> list[tuple[str, int, int, bool]]:
    """Model names (split for each tp; fp8: the FP8 linears) and explicit NxK (taken as given; fp8: in whole
    128-blocks), deduplicated by (N, K, bias)."""
    shapes: dict[tuple[int, int, bool], str] = {}
    for item in filter(None, spec.split(",")):
        if item in MODELS:
            found = [s for tp in tps for s in model_linears(item, tp, fp8)]
        else:
            try:
                n, k = (int(v) for v in item.lower().split("x"))
            except ValueError:
                raise SystemExit(f"--shapes: {item!r} is neither a model ({', '.join(MODELS)}) nor NxK") from None
            found = [(item, n, k, False)]
            if fp8 and (n % FP8_BLOCK or k % FP8_BLOCK):
                raise SystemExit(f"--shapes {item}: FP8 weights need N and K in whole {FP8_BLOCK}-blocks")
        for name, n, k, bias in found:
            key = (n, k, bias)
            if key not in shapes:
                shapes[key] = name
            elif name not in shapes[key].split("+"):
                shapes[key] += f"+{name}"
    return [(name, n, k, bias) for (n, k, bias), name in shapes.items()]


def _splits(n: int, k: int, block_n: int, block_k: int, per_sm: tuple[int, ...], num_sms: int) -> list[int]:
    # powers of two near per_sm programs per SM (fewer distinct binaries: SPLIT_K is a constexpr), at most one
    # split per K step; what the wrapper actually runs (no empty split)
    tiles, steps = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    out = set()
    for p in per_sm:
        want = max(1.0, p * num_sms / tiles)
        split = min(1 << round(math.log2(want)), steps, 16)
        out.add(triton.cdiv(steps, triton.cdiv(steps, split)))
    return sorted(out)


def candidates(m: int, n: int, k: int, num_sms: int, dry_run: bool = False, fp8: bool = False) -> list[dict]:
    if dry_run:  # two configs: an FMA tile without split, a tl.dot tile with split K
        return [{"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1, "DOT": 0},
                {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 4, "num_stages": 2, "DOT": 1}]
    fma = (FP8_FMA_TILES if fp8 else FMA_TILES)[1 if m <= 2 else 4 if m <= 8 else 16]
    out = []
    for dot, tiles in ((0, fma), (1, FP8_DOT_TILES if fp8 else DOT_TILES)):
        for bn, bk, warps, stages in tiles:
            for split in _splits(n, k, bn, bk, (FP8_PER_SM if fp8 else PER_SM)[dot], num_sms):
                out.append({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps, "num_stages": stages,
                            "DOT": dot})
    for c in out:
        check_config(c, fp8)
    return out


def binary_key(m: int, n: int, k: int, bias: bool, cfg: dict, fp8: bool = False) -> tuple:
    # what the wrapper's launch specializes on (N, K and the strides only by divisibility by 16)
    return (16 if cfg["DOT"] else triton.next_power_of_2(m), cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"],
            cfg["num_warps"], cfg["num_stages"], cfg["DOT"], bias, k % cfg["BLOCK_K"] == 0, n % 16 == 0, k % 16 == 0,
            fp8, fp8 and triton.cdiv(k, FP8_BLOCK) % 16 == 0)


def _compile_worker(items: list) -> str:
    # each binary launched once at its real shape (the same specializations as the timed launches): its binary lands
    # in Triton's disk cache for the timing process
    done, cached = 0, {}
    for m, n, k, bias, fp8, cfg in items:
        try:
            if (n, k, bias, fp8) not in cached:
                cached.clear()
                ws, b = make_weights(n, k, bias, torch.bfloat16, 0, fp8, "cuda")
                cached[(n, k, bias, fp8)] = (ws[0], b)
            w, b = cached[(n, k, bias, fp8)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            _gemv(x, w, b, cfg) if cfg is not None else _base(x, w, b)
            torch.cuda.synchronize()
            done += 1
        except Exception:  # noqa: BLE001  e.g. out of shared memory: the timing pass reports it
            torch.cuda.synchronize()
    return f"{done}/{len(items)}"


def _time(calls: list, rep_ms: float) -> float:
    return tuning.time_graph_us(calls, rep_ms, max_reps=40, device=DEVICE)


def make_weights(n: int, k: int, bias: bool, dtype: torch.dtype, l2_bytes: int, fp8: bool = False,
                 device: str = DEVICE) -> tuple[list, torch.Tensor | None]:
    # enough copies that the rotation holds > 2x L2: a replayed call never finds its weight there (>= 4). A weight:
    # a tensor [N, K] in dtype, or fp8 a pair (e4m3 [N, K], weight_scale_inv [N/128, K/128] fp32)
    elt = 1 if fp8 else dtype.itemsize
    copies = 1 if device == "cpu" or not l2_bytes else min(32, max(4, math.ceil(2 * l2_bytes / (n * k * elt))))
    gen = torch.Generator(device=device).manual_seed(n * 7 + k)
    ws = [torch.randn(n, k, device=device, generator=gen, dtype=dtype) / k**0.5 for _ in range(copies)]
    if fp8:
        ws = [quantize_weight_block(w) for w in ws]
    b = torch.randn(n, device=device, generator=gen, dtype=dtype) if bias else None
    return ws, b


def _gemv(x: torch.Tensor, w: torch.Tensor | tuple, b: torch.Tensor | None, cfg: dict) -> torch.Tensor:
    return gemv_linear_fp8(x, *w, b, cfg) if isinstance(w, tuple) else gemv_linear(x, w, b, cfg)


def _base(x: torch.Tensor, w: torch.Tensor | tuple, b: torch.Tensor | None) -> torch.Tensor:
    # what the model runs without a table entry: cuBLAS, or the W8A8 linear with its own table / heuristic config
    return w8a8_block_linear(x, *w, b) if isinstance(w, tuple) else F.linear(x, w, b)


def sweep_case(shape: tuple, m: int, ws: list, b: torch.Tensor | None, copy_tbps: float, num_sms: int,
               budget: Budget, args: argparse.Namespace) -> dict:
    name, n, k, bias = shape
    fp8 = isinstance(ws[0], tuple)
    base = "w8a8" if fp8 else "cublas"
    x = torch.randn(m, k, device=DEVICE, dtype=ACT_DTYPE, generator=torch.Generator(DEVICE).manual_seed(m))
    # FP8: the W8A16 product (the W8A8 baseline also rounds x to e4m3 per 128 columns: its error is reported)
    ref = gemv_linear_fp8_ref(x, *ws[0], b) if fp8 else F.linear(x, ws[0], b)
    base_err = tuning.rel_err(_base(x, ws[0], b), ref)
    base_us = _time([lambda w=w: _base(x, w, b) for w in ws], args.rep_ms)
    scale_bytes = 4 * triton.cdiv(n, FP8_BLOCK) * triton.cdiv(k, FP8_BLOCK)
    weight_bytes = n * k + scale_bytes if fp8 else n * k * x.element_size()
    floor_us = (weight_bytes + (n * bias + m * (k + n)) * x.element_size()) / copy_tbps / 1e6
    rows, best = tuning.sweep(candidates(m, n, k, num_sms, args.dry_run, fp8), lambda c: _gemv(x, ws[0], b, c), ref,
                              lambda c: _time([lambda w=w: _gemv(x, w, b, c) for w in ws], args.rep_ms), TOL,
                              budget, f"{name} M={m}", DEVICE)
    timed = [r for r in rows if math.isfinite(r["us"])]
    gemv_us = best["us"] if best else math.inf
    if best is not None:
        # the minimum over many noisy candidates is biased low: the gate compares the winner and the baseline timed
        # again, interleaved, three times each (the median of each)
        again = {"base": [], "gemv": []}
        for _ in range(3):
            again["base"].append(_time([lambda w=w: _base(x, w, b) for w in ws], args.rep_ms))
            again["gemv"].append(_time([lambda w=w, c=best["cfg"]: _gemv(x, w, b, c) for w in ws], args.rep_ms))
        base_us, gemv_us = (sorted(v)[1] for v in (again["base"], again["gemv"]))
    entry = best is not None and base_us >= args.min_speedup * gemv_us
    case = {"weights": "fp8" if fp8 else "16-bit", "shape": name, "n": n, "k": k, "m": m, "bias": bias, "base": base,
            "base_us": base_us, "base_err": base_err, "gemv_us": gemv_us, "cfg": best["cfg"] if best else None,
            "err": best["err"] if best else math.nan, "floor_us": floor_us, "fraction": floor_us / gemv_us,
            "base_fraction": floor_us / base_us, "speedup": base_us / gemv_us, "entry": entry, "rows": rows}
    c = best["cfg"] if best else {}
    print(f"{name + (' fp8' if fp8 else ''):28s} M={m:2d} [{n}x{k}] {base} {base_us:7.2f} us  gemv {gemv_us:7.2f} us  "
          f"floor {floor_us:6.2f} us (gemv {case['fraction']:.2f} / {base} {case['base_fraction']:.2f} of floor, "
          f"x{case['speedup']:.2f}) {'TABLE' if entry else base} {json.dumps(c)} ({len(timed)}/{len(rows)} timed)",
          flush=True)
    return case


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", "--out", dest="out_dir", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--shapes", default="qwen3,glm45air", help="model names (qwen3, glm45air) and/or NxK")
    ap.add_argument("--tp", default="1,2", help="TP sizes whose per-rank shards of the model shapes to tune")
    ap.add_argument("--m", default="1,2,4,8,16", help=f"row buckets (<= {MAX_ROWS})")
    ap.add_argument("--weights", default="bf16", help="bf16 (vs cuBLAS) and/or fp8 (vs the W8A8 linear): bf16,fp8")
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip the remaining candidates after this long")
    ap.add_argument("--rep-ms", type=float, default=2.0, help="timing window per candidate")
    ap.add_argument("--jobs", type=int, default=14, help="compile worker processes (1: compile while timing)")
    ap.add_argument("--min-speedup", type=float, default=1.03,
                    help="a bucket is written where baseline / GEMV >= this")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1: tiny shapes, two configs")
    args = ap.parse_args(argv)
    if DEVICE == "cpu" and not (args.dry_run and os.environ.get("TRITON_INTERPRET") == "1"):
        raise SystemExit("tune_linear_gemv needs a CUDA GPU; on a CPU only TRITON_INTERPRET=1 ... --dry-run")
    t_start = time.time()
    out = Path(args.out_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    try:
        ms = sorted({int(v) for v in args.m.split(",")})
        tps = sorted({int(v) for v in args.tp.split(",")})
    except ValueError:
        raise SystemExit(f"--m {args.m!r} / --tp {args.tp!r}: comma-separated integers expected") from None
    if not ms or ms[0] < 1 or ms[-1] > MAX_ROWS or any(m & (m - 1) for m in ms) or not tps or tps[0] < 1:
        raise SystemExit(f"--m needs buckets that are powers of two in 1..{MAX_ROWS} (the rows the engine compiles "
                         f"before serving) and --tp sizes >= 1, got --m {args.m} --tp {args.tp}")
    kinds = [v for v in args.weights.split(",") if v]
    if not kinds or set(kinds) - {"bf16", "fp8"}:
        raise SystemExit(f"--weights takes bf16 and/or fp8, got {args.weights!r}")
    # (fp8, shape) per case group: 16-bit first
    work = [(fp8, shape) for fp8 in sorted({kind == "fp8" for kind in kinds})
            for shape in ((DRY_FP8_SHAPES if fp8 else DRY_SHAPES) if args.dry_run else parse_shapes(args.shapes, tps,
                                                                                                     fp8))]
    if DEVICE == "cuda":
        from benchmarks.bench_moe import measure_ceilings

        props = torch.cuda.get_device_properties(0)
        num_sms, l2_bytes = props.multi_processor_count, getattr(props, "L2_cache_size", 50 << 20)
        if args.jobs > 1:
            plan = {}
            for fp8, (_, n, k, bias) in work:
                for m in ms:
                    for cfg in candidates(m, n, k, num_sms, args.dry_run, fp8):
                        plan.setdefault(binary_key(m, n, k, bias, cfg, fp8), (m, n, k, bias, fp8, cfg))
                    if fp8:  # the W8A8 baseline's own kernels (config None)
                        plan[("w8a8", m, n, k, bias)] = (m, n, k, bias, fp8, None)
            items = sorted(plan.values(), key=lambda it: it[1:5])  # a worker allocates per shape
            tuning.precompile(items, _compile_worker, args.jobs)
        copy_tbps = measure_ceilings()["copy_tbps"]
    else:
        num_sms, l2_bytes, copy_tbps = 4, 0, 1.0
    print(f"copy {copy_tbps:.2f} TB/s, {num_sms} SMs, L2 {l2_bytes >> 20} MiB, {len(work)} shapes x M {ms}", flush=True)
    budget = Budget(args.budget_s - (time.time() - t_start))
    cases = []
    for fp8, shape in work:
        ws, b = make_weights(shape[1], shape[2], shape[3], ACT_DTYPE, l2_bytes, fp8)
        cases += [sweep_case(shape, m, ws, b, copy_tbps, num_sms, budget, args) for m in ms]
        del ws, b
    gpu = device_name(torch.device(DEVICE))
    paths = [write_table(out, gpu, [c for c in cases if (c["weights"] == "fp8") == fp8], fp8)
             for fp8 in sorted({fp8 for fp8, _ in work})]
    report = [{key: c[key] for key in c if key != "rows"} for c in cases]
    (out / "tune_linear_gemv.json").write_text(json.dumps(
        {"device": gpu, "copy_tbps": copy_tbps, "min_speedup": args.min_speedup, "report": report, "cases": cases,
         "skipped": budget.skipped, "seconds": time.time() - t_start}, indent=1, default=str))
    won = [c for c in cases if c["entry"]]
    fracs = [c["fraction"] for c in cases if math.isfinite(c["gemv_us"])]
    print(f"\ntune_linear_gemv summary ({gpu}, {time.time() - t_start:.0f} s, weights {','.join(kinds)}): GEMV in the "
          f"table for {len(won)}/{len(cases)} cases (>= x{args.min_speedup:.2f} its baseline), speedup there geomean "
          f"x{math.exp(sum(math.log(c['speedup']) for c in won) / max(len(won), 1)):.2f}; GEMV of floor geomean "
          f"{math.exp(sum(map(math.log, fracs)) / max(len(fracs), 1)):.2f}; {len(budget.skipped)} candidates "
          f"skipped for the budget")
    print(f"tables: {', '.join(map(str, paths))} (copy to kernels/configs/)")


def write_table(out: Path, gpu: str, cases: list[dict], fp8: bool) -> Path:
    """One weight kind's table file under out/configs: the checked-in table for this GPU (kernels/configs/) with
    every bucket this run measured replaced by its result: the winner's config, or removed where the baseline won.
    Shapes and buckets the run did not time keep their entries (a run over one shape must not drop the others:
    session 8 lost o_proj's entries that way when tables were merged by hand)."""
    base = linear_gemv_config.CONFIG_DIR / config_file_name(gpu, fp8)
    table: dict[str, dict[str, dict]] = json.loads(base.read_text()) if base.exists() else {}
    biased = {}  # the table is keyed by (N, K): a shape tuned with and without a bias must agree to be entered
    for c in cases:
        biased.setdefault(shape_key(c["n"], c["k"]), set()).add(c["bias"])
    for c in cases:
        key, bucket = shape_key(c["n"], c["k"]), str(c["m"])
        if c["entry"] and len(biased[key]) > 1:
            print(f"{key}: tuned with and without a bias; not entered (the table has one config per N x K)")
            table.get(key, {}).pop(bucket, None)
        elif c["entry"]:
            table.setdefault(key, {})[bucket] = c["cfg"]
        else:
            table.get(key, {}).pop(bucket, None)
    table = {key: buckets for key, buckets in table.items() if buckets}
    path = out / "configs" / config_file_name(gpu, fp8)
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    return path


if __name__ == "__main__":
    main()
