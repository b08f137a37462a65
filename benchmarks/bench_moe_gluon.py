"""Large-M MoE layer on the GPU: the old path vs the permuted Triton TMA path vs the Gluon warp-specialized one.

python benchmarks/bench_moe_gluon.py --out DIR [--shape qwen3] [--m 1024,4096,16384] [--sweep] [--fp8]

One process, the same inputs for all (bench_moe's: CUDA-graph replays rotating over 4 routings, bf16). Per M:
each path's microseconds and fraction of the layer's floor (max of the touched weights over copy bandwidth
and the FLOPs over the bf16 matmul rate, both measured in this run), its error vs the torch reference. The
Gluon paths: default_gluon_config's four (BLOCK_M 128 / 64, one 8- or 4-warp MMA partition or two 4-warp
ones in ping-pong), or --config's. Then each GEMM alone (gate_up with SiLU-mul, down) on the permuted rows,
Triton TMA kernel vs the first Gluon config, as a fraction of the GEMM's own floor (its weights over copy
bandwidth or its FLOPs over the matmul rate, the larger); --sweep also times a
few tile configs of it per GEMM (the best one is the table entry to try). Prints one 'moe_gluon' line per
M, 'bench_moe_gluon summary' last, and writes DIR/bench_moe_gluon.json.

--fp8: the FP8 block-scaled experts (e4m3 weights with [128, 128] scales quantized from the same bf16 ones,
activations quantized per token group): the old FP8 path vs the Triton TMA FP8 kernel vs the Gluon FP8 kernel
(kernels/moe_gluon_fp8.py: gluon = BLOCK_M 128, gluon64 = 64, gluon64_pp = 64 in ping-pong), the floor's FLOPs
over the measured FP8 matmul rate and its weights at a byte each; errors vs the torch reference with the same
activation quantization. Writes DIR/bench_moe_gluon_fp8.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe import NUM_ROT, SHAPES, bench_graph, make_inputs, measure_ceilings  # noqa: E402

from kernels.fp8 import per_token_group_quant, quantize_weight_block  # noqa: E402
from kernels.fused_moe import fused_experts, fused_experts_ref  # noqa: E402
from kernels.moe_align import moe_align  # noqa: E402
from kernels.moe_config import get_moe_config  # noqa: E402
from kernels.moe_gluon import default_gluon_config, grouped_gemm_gluon  # noqa: E402
from kernels.moe_gluon_fp8 import default_gluon_fp8_config, grouped_gemm_gluon_fp8  # noqa: E402
from kernels.moe_grouped_tma import default_tma_config, fused_experts_tma, grouped_gemm  # noqa: E402
from kernels.moe_permute import permute_tokens  # noqa: E402

# --sweep: changes to the first Gluon config's GEMMs (BLOCK_M 128), each within shared memory and registers
SWEEP = {"up": {"s3": {"num_stages": 3}, "n64_s6": {"BLOCK_N": 64, "num_stages": 6}},
         "down": {"n128_s4": {"BLOCK_N": 128, "num_stages": 4}, "n128_s6": {"BLOCK_N": 128, "num_stages": 6}}}
SWEEP_FP8 = {"up": {"c1": {"k_chunk": 1}, "c3": {"k_chunk": 3}, "s4": {"num_stages": 4}},
             "down": {"c2": {"k_chunk": 2}, "c6": {"k_chunk": 6}, "s6": {"num_stages": 6}}}
SWEEP_PP = {"up": {"s4": {"num_stages": 4}, "k32_s8": {"BLOCK_K": 32, "num_stages": 8}},
            "down": {"n64_s8": {"BLOCK_N": 64, "num_stages": 8}, "k32_s8": {"BLOCK_K": 32, "num_stages": 8}}}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fp8_gemm(fn):
    """grouped_gemm's / grouped_gemm_gluon's call for FP8 operands: (a, a_scale) and (w, w_scale) pairs."""
    def call(a, w, out, expert_ids, npp, n, w_rows, silu_mul, bm, g):
        (a, a_s), (w, w_s) = a, w
        if fn is grouped_gemm:
            grouped_gemm(a, w, out, expert_ids, npp, n, w_rows, silu_mul, bm, g, None, a_s, w_s)
        else:
            grouped_gemm_gluon_fp8(a, a_s, w, w_s, out, expert_ids, npp, n, w_rows, silu_mul, bm, g)
    return call


def bench_gemms(sets: list, w13: torch.Tensor, w2: torch.Tensor, tma: dict, glu: dict, sweep: bool,
                scales: tuple | None = None) -> dict:
    """Each GEMM alone on the permuted rows of every routing: Triton TMA kernel vs Gluon (and the sweep).
    scales: FP8 (w13_scale, w2_scale), the rows quantized per token group."""
    num_experts, hidden, inter = w2.shape
    top_k = sets[0][2].shape[1]
    bm = glu["BLOCK_M"]
    prep = []
    for x, _, ids in sets:
        sorted_ids, expert_ids, npp = moe_align(ids, num_experts, bm)
        xq, x_scale = per_token_group_quant(x) if scales else (x, None)
        a_perm, _, a_scale = permute_tokens(xq, sorted_ids, npp, top_k, x_scale)
        act = torch.randn(a_perm.shape[0], inter, dtype=x.dtype, device=x.device)  # the down GEMM's input
        y = torch.empty(a_perm.shape[0], hidden, dtype=x.dtype, device=x.device)
        act_out = torch.empty_like(act)
        if scales:
            a_perm, act = (a_perm, a_scale), per_token_group_quant(act)
        prep.append((a_perm, expert_ids, npp, act, y, act_out))
    w13f, w2f = w13.view(num_experts * 2 * inter, hidden), w2.view(num_experts * hidden, inter)
    if scales:
        w13f, w2f = (w13f, scales[0]), (w2f, scales[1])

    def run(kind: str, fn, g: dict) -> float:
        fn = _fp8_gemm(fn) if scales else fn

        def once():
            for a_perm, expert_ids, npp, act, y, act_out in prep:
                if kind == "up":
                    fn(a_perm, w13f, act_out, expert_ids, npp, inter, 2 * inter, True, bm, g)
                else:
                    fn(act, w2f, y, expert_ids, npp, hidden, hidden, False, bm, g)
        return bench_graph(once) / len(prep)

    tma_bm = dict(tma, BLOCK_M=bm)  # the same row blocks for both kernels
    out = {f"{k}_tma_us": run(k, grouped_gemm, tma_bm[k]) for k in ("up", "down")}
    out.update({f"{k}_gluon_us": run(k, grouped_gemm_gluon, glu[k]) for k in ("up", "down")})
    if sweep:
        for k in ("up", "down"):
            sweep_k = (SWEEP_FP8 if scales else SWEEP_PP if glu[k].get("pingpong") else SWEEP)[k]
            out[f"{k}_sweep_us"] = {name: run(k, grouped_gemm_gluon, dict(glu[k], **change))
                                    for name, change in sweep_k.items()}
    return out


def bench_m(shape: str, m: int, w13: torch.Tensor, w2: torch.Tensor, ceil: dict, glu: dict, sweep: bool,
            scales: tuple | None = None) -> dict:
    num_experts, hidden, inter, top_k = SHAPES[shape]
    sets = [make_inputs(m, num_experts, hidden, top_k, seed) for seed in range(NUM_ROT)]
    cfg = get_moe_config(m, num_experts, hidden, inter, top_k, "fp8" if scales else "bf16")
    old = {k: v for k, v in cfg.items() if k != "tma"}
    tma = cfg.get("tma") or default_tma_config(fp8=bool(scales))
    kw = {"w13_scale": scales[0], "w2_scale": scales[1]} if scales else {}
    paths = {"old": lambda x, w, i: fused_experts(x, w13, w2, w, i, config=old, **kw),
             "tma": lambda x, w, i: fused_experts_tma(x, w13, w2, w, i, tma, **kw)}
    for name, c in glu.items():
        paths[name] = lambda x, w, i, c=c: fused_experts_tma(x, w13, w2, w, i, c, **kw)
    x, w, ids = sets[0]
    ref = fused_experts_ref(x, w13, w2, w, ids, **kw)  # (FP8: the kernels' activation quantization too)
    row = {"shape": shape, "M": m, "tma_config": tma, "gluon_configs": glu}
    for name, fn in paths.items():
        row[f"{name}_err"] = _rel_err(fn(x, w, ids), ref)
        row[f"{name}_us"] = bench_graph(lambda f=fn: [f(xx, ww, ii) for xx, ww, ii in sets]) / NUM_ROT
    # bench_moe's roofline: the experts each routing touches, activations in and out; FLOPs of 3 GEMMs a pair
    touched = sum(i.unique().numel() for _, _, i in sets) / NUM_ROT
    elem, rate = (1, ceil["fp8_tflops"]) if scales else (2, ceil["bf16_tflops"])  # weight bytes, matmul rate
    mem_us = (touched * 3 * hidden * inter * elem + 2 * m * hidden * 2) / ceil["copy_tbps"] / 1e6
    pairs = m * top_k
    row["floor_us"] = max(mem_us, 6 * pairs * hidden * inter / rate / 1e6)
    row.update({f"{n}_frac": row["floor_us"] / row[f"{n}_us"] for n in paths})
    row["gluon_best"] = max(glu, key=lambda n: row[f"{n}_frac"])
    row.update(bench_gemms(sets, w13, w2, tma, next(iter(glu.values())), sweep, scales))
    # each GEMM's own floor, the same roofline: its touched weights (and rows in / out) over copy bandwidth, or its
    # FLOPs (gate and up: 2 * pairs * 2I * H) over the matmul rate; FLOPs alone understate it where the weights
    # dominate (Qwen3 at M = 1024: 0.8 GB of gate_up weights, ~190 us, vs ~65 us of FLOPs)
    rows_b = pairs * (hidden + inter) * 2  # a_perm / act rows: read once, written once (bf16)
    up_floor = max((touched * 2 * inter * hidden * elem + rows_b) / ceil["copy_tbps"] / 1e6,
                   4 * pairs * hidden * inter / rate / 1e6)
    down_floor = max((touched * hidden * inter * elem + rows_b) / ceil["copy_tbps"] / 1e6,
                     2 * pairs * hidden * inter / rate / 1e6)
    for k, fl in (("up", up_floor), ("down", down_floor)):
        row[f"{k}_floor_us"] = fl
        row[f"{k}_tma_frac"], row[f"{k}_gluon_frac"] = fl / row[f"{k}_tma_us"], fl / row[f"{k}_gluon_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--shape", default="qwen3", choices=list(SHAPES))
    ap.add_argument("--m", default="1024,4096,16384")
    ap.add_argument("--config", default="", help="a JSON tma entry for the Gluon path (else default_gluon_config's)")
    ap.add_argument("--sweep", action="store_true", help="also time a few Gluon tile configs per GEMM")
    ap.add_argument("--gluon", default="",
                    help="which default Gluon configs (without --config): gluon[64][_pp], BLOCK_M 64, ping-pong "
                    "(default all four; --fp8: gluon,gluon64,gluon64_pp)")
    ap.add_argument("--fp8", action="store_true", help="FP8 block-scaled experts (kernels/moe_gluon_fp8.py)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default = default_gluon_fp8_config if args.fp8 else default_gluon_config
    names = args.gluon or ("gluon,gluon64,gluon64_pp" if args.fp8 else "gluon,gluon64,gluon_pp,gluon64_pp")
    glu = {"gluon": json.loads(args.config)} if args.config else {
        name: default(block_m=64 if "64" in name else 128, pingpong=name.endswith("_pp")) for name in names.split(",")}
    ceil = measure_ceilings()
    print(f"ceilings: copy {ceil['copy_tbps']:.2f} TB/s, bf16 {ceil['bf16_tflops']:.0f} TFLOP/s, fp8 "
          f"{ceil['fp8_tflops']:.0f} TFLOP/s on {torch.cuda.get_device_name()}", flush=True)
    num_experts, hidden, inter, _ = SHAPES[args.shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, device="cuda", generator=g, dtype=torch.bfloat16) * inter**-0.5
    scales = None
    if args.fp8:
        (w13, s13), (w2, s2) = quantize_weight_block(w13), quantize_weight_block(w2)
        scales = (s13, s2)
    rows = []
    for m in map(int, args.m.split(",")):
        r = bench_m(args.shape, m, w13, w2, ceil, glu, args.sweep, scales)
        rows.append(r)
        print(f"moe_gluon{'_fp8' if args.fp8 else ''} {args.shape} M={m:5d} floor_us={r['floor_us']:7.1f} | "
              + " | ".join(f"{n} {r[f'{n}_us']:7.1f} us {r[f'{n}_frac']:.2f} (err {r[f'{n}_err']:.1e})"
                           for n in ("old", "tma", *glu))
              + f" | GEMMs alone, fraction of their floor: up tma/gluon {r['up_tma_frac']:.2f}/"
              f"{r['up_gluon_frac']:.2f} down {r['down_tma_frac']:.2f}/{r['down_gluon_frac']:.2f}"
              + "".join(f" | {k} sweep " + " ".join(f"{c}={us:.1f}" for c, us in r[f"{k}_sweep_us"].items())
                        for k in ("up", "down") if f"{k}_sweep_us" in r), flush=True)
    result = {"ceilings": ceil, "device": torch.cuda.get_device_name(), "fp8": args.fp8, "rows": rows}
    (out / f"bench_moe_gluon{'_fp8' if args.fp8 else ''}.json").write_text(json.dumps(result, indent=1))
    print(f"bench_moe_gluon{' fp8' if args.fp8 else ''} summary: fraction of floor old/tma/best gluon " + ", ".join(
        f"M={r['M']} {r['old_frac']:.2f}/{r['tma_frac']:.2f}/{r[r['gluon_best'] + '_frac']:.2f} ({r['gluon_best']})"
        for r in rows) + f"; gluon err max {max(r[f'{n}_err'] for r in rows for n in glu):.1e}")


if __name__ == "__main__":
    main()
