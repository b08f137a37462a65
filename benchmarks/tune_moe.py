"""Tune the fused MoE block shapes per (experts, hidden, inter, token bucket, dtype, GPU).

python benchmarks/tune_moe.py --out DIR [--shapes qwen3,...] [--m 1,8,...] [--dtypes bf16,fp8]

For each BLOCK_M allowed at a token count, times every candidate of the gate_up GEMM and of the down GEMM
separately (CUDA-graph replay, median), keeps the best pair per BLOCK_M, then the best BLOCK_M overall.
Writes DIR/configs/E=..,H=..,I=..,dtype=..,device=...json, the files kernels/moe_config.py looks up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe import SHAPES, bench_graph, make_inputs  # noqa: E402

import kernels.fused_moe as fm  # noqa: E402
from kernels.fp8 import per_token_group_quant, quantize_weight_block  # noqa: E402
from kernels.moe_align import moe_align  # noqa: E402
from kernels.moe_config import config_file_name, device_name  # noqa: E402


def block_ms(m: int, top_k: int, num_experts: int) -> list[int]:
    rows = m * top_k / num_experts
    if rows <= 8:
        return [16]
    if rows <= 48:
        return [16, 32, 64]
    if rows <= 160:
        return [32, 64, 128]
    return [64, 128]


def candidates(block_m: int, fp8: bool) -> list[dict]:
    if block_m <= 32:
        shapes = [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 5), (128, 128, 4, 3), (32, 256, 4, 3),
                  (64, 256, 4, 3), (128, 64, 4, 4), (64, 128, 8, 4)]
    else:
        shapes = [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3),
                  (64, 128, 4, 3), (128, 64, 8, 4), (256, 128, 8, 3)]
    out = []
    for (bn, bk, warps, stages), group_m in itertools.product(shapes, [1, 8] if block_m >= 64 else [1]):
        if fp8 and bk > 128:
            continue
        if block_m * bk * 2 + bk * bn * 2 * 2 > 200_000 // max(stages - 1, 1) * 2:  # rough smem guard
            continue
        out.append({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": warps, "num_stages": stages})
    return out


def time_gemm(kind: str, g: dict, block_m: int, st: dict) -> float:
    """Microseconds of one GEMM (kind 'up' or 'down') with config g, averaged over the rotated inputs."""
    import triton

    e, h, inter, top_k = st["shape"]
    fp8 = st["fp8"]
    calls = []
    for (_, w_pairs, ids), (sorted_ids, expert_ids, npp), a in zip(st["sets"], st["aligned"][block_m], st["acts"]):
        num_pid_m = sorted_ids.numel() // block_m
        num_pairs = ids.numel()
        if kind == "up":
            a_q, a_s = a
            w, ws = st["w13"], st["s13"]
            out = torch.empty(sorted_ids.numel(), inter, dtype=torch.bfloat16, device="cuda")
            grid = (num_pid_m * triton.cdiv(inter, g["BLOCK_N"]),)
            args = (a_q, a_s, w, ws, out, sorted_ids, expert_ids, npp, num_pairs, h, inter, num_pid_m,
                    a_q.stride(0), a_s.stride(0), w.stride(0), w.stride(1), ws.stride(0), ws.stride(1),
                    out.stride(0))
            kw = {"TOP_K": top_k, "USE_FP8": fp8, "EVEN_K": h % g["BLOCK_K"] == 0}
            kernel = fm._moe_up_kernel
        else:
            inter_act = torch.randn(sorted_ids.numel(), inter, device="cuda", dtype=torch.bfloat16)
            a_q, a_s = per_token_group_quant(inter_act) if fp8 else (inter_act, inter_act)
            w, ws = st["w2"], st["s2"]
            y = torch.empty(num_pairs, h, dtype=torch.bfloat16, device="cuda")
            grid = (num_pid_m * triton.cdiv(h, g["BLOCK_N"]),)
            args = (a_q, a_s, w, ws, y, sorted_ids, expert_ids, npp, w_pairs.reshape(-1), num_pairs, inter, h,
                    num_pid_m,
                    a_q.stride(0), a_s.stride(0), w.stride(0), w.stride(1), ws.stride(0), ws.stride(1), y.stride(0))
            kw = {"USE_FP8": fp8, "EVEN_K": inter % g["BLOCK_K"] == 0}
            kernel = fm._moe_down_kernel
        calls.append((grid, args))
    meta = dict(kw, BLOCK_M=block_m, BLOCK_N=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"], GROUP_M=g["GROUP_M"],
                num_warps=g["num_warps"], num_stages=g["num_stages"])

    def run():
        for grid, args in calls:
            kernel[grid](*args, **meta)

    try:
        run()
        torch.cuda.synchronize()
        return bench_graph(run, rep_ms=30) / len(calls)
    except Exception as exc:  # noqa: BLE001  out of shared memory etc.: skip the candidate
        print(f"  skip {kind} BM={block_m} {g}: {type(exc).__name__}", flush=True)
        return float("inf")


def tune_shape(shape: str, ms: list[int], dtype: str, out: Path) -> None:
    e, h, inter, top_k = SHAPES[shape]
    fp8 = dtype == "fp8"
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * inter, h, device="cuda", generator=gen, dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(e, h, inter, device="cuda", generator=gen, dtype=torch.bfloat16) * inter**-0.5
    if fp8:
        (w13, s13), (w2, s2) = quantize_weight_block(w13), quantize_weight_block(w2)
    else:
        s13, s2 = w13, w2
    table = {}
    for m in ms:
        sets = [make_inputs(m, e, h, top_k, seed) for seed in range(2)]
        acts = [per_token_group_quant(x) if fp8 else (x, x) for x, _, _ in sets]
        bms = block_ms(m, top_k, e)
        st = {"shape": SHAPES[shape], "fp8": fp8, "sets": sets, "acts": acts, "w13": w13, "w2": w2, "s13": s13,
              "s2": s2,
              "aligned": {bm: [moe_align(ids, e, bm) for _, _, ids in sets] for bm in bms}}
        best = None
        for bm in bms:
            cands = candidates(bm, fp8)
            up = min(((time_gemm("up", g, bm, st), i) for i, g in enumerate(cands)))
            down = min(((time_gemm("down", g, bm, st), i) for i, g in enumerate(cands)))
            total = up[0] + down[0]
            print(f"  {shape} {dtype} M={m} BM={bm}: up {up[0]:.1f} us, down {down[0]:.1f} us", flush=True)
            if best is None or total < best[0]:
                best = (total, {"BLOCK_M": bm, "up": cands[up[1]], "down": cands[down[1]]})
        table[str(m)] = best[1]
        print(f"best {shape} {dtype} M={m}: {best[0]:.1f} us {best[1]}", flush=True)
    name = config_file_name(e, h, inter, "fp8" if fp8 else "bfloat16", device_name())
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / name).write_text(json.dumps(table, indent=1))
    print(f"tune_moe wrote {name}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--shapes", default="qwen3,mixtral,glm45air")
    ap.add_argument("--m", default="1,8,64,256,1024,4096")
    ap.add_argument("--dtypes", default="bf16,fp8")
    args = ap.parse_args()
    ms = [int(m) for m in args.m.split(",")]
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            tune_shape(shape, ms, dtype, Path(args.out))
    print("tune_moe summary: done")


if __name__ == "__main__":
    main()
