"""Block-scaled FP8 linear (W8A8) on the GPU: our Triton kernel vs bf16 F.linear (cuBLAS), cuBLAS's own block-scaled
FP8 GEMM (torch.nn.functional.scaled_mm, 1x128 activation x 128x128 weight scales, after our activation quant) and
the floor.

python benchmarks/bench_fp8_linear.py --out DIR [--m 1,8,64,256,1024,4096] [--shapes qkv,o,...]

Each row runs the config the wrapper picks: the tuned table's (kernels/configs/fp8_linear_<gpu>.json, written by
benchmarks/tune_fp8_linear.py) or, without one, the heuristic's (the row's JSON holds it): 'ours' its Triton tile,
'cuBLAS fp8' the same call with CUBLAS 1 (the line says 'table: cuBLAS' where the table routes the shape there);
'heuristic' times the heuristic's config too where the table picked another.

Times CUDA-graph replays (median) of NUM_ROT weight copies in turn, so that replays do not find the previous
one's weights in L2 (a Qwen3-30B-A3B qkv weight is 10 MiB; L2 is 50-60 MiB). The floor is max(bytes / copy
bandwidth, FLOPs / FP8 matmul rate), both measured in this run; bytes count the FP8 weight and its scales, the
bf16 input and output. Prints one line per row and 'bench_fp8_linear summary' last; DIR/bench_fp8_linear.json
holds every number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_moe import bench_graph, measure_ceilings  # noqa: E402
from kernels.fp8 import quantize_weight_block  # noqa: E402
from kernels.linear.w8a8 import (  # noqa: E402
    _config,
    _num_sms,
    _resolve,
    cublas_block_scaled_available,
    w8a8_block_linear,
    w8a8_block_linear_ref,
)

SHAPES = {  # name: (N, K)
    "qkv": (5120, 2048),  # Qwen3-30B-A3B: 32 q + 4 k + 4 v heads of 128, hidden 2048
    "o": (2048, 4096),
    "gate_up": (2 * 14336, 4096),  # a dense 8B MLP (Llama-3-8B)
    "down": (4096, 14336),
}
GLM_SHAPES = {  # GLM-4.5-Air: 96 q + 8 k + 8 v heads of 128, hidden 4096; the shared expert (intermediate 1408)
    "glm_qkv": (14336, 4096),
    "glm_o": (4096, 12288),
    "glm_shared_gate_up": (2 * 1408, 4096),
    "glm_shared_down": (4096, 1408),
}
ALL_SHAPES = {**SHAPES, **GLM_SHAPES}
NUM_ROT = 8


def bench_one(name: str, m: int, ceil: dict[str, float]) -> dict:
    n, k = ALL_SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(m)
    ws = [torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5 for _ in range(NUM_ROT)]
    qs = [quantize_weight_block(w) for w in ws]
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    ref = w8a8_block_linear_ref(x, *qs[0])
    # the tuned table's config (kernels/configs/fp8_linear_<gpu>.json) or the heuristic's: "ours" runs its Triton
    # tile, the cuBLAS column cuBLAS's block-scaled FP8 GEMM (CUBLAS 1) after our activation quantization
    cfg = _resolve(m, n, k, x.device)
    ours_cfg, cublas_cfg = dict(cfg, CUBLAS=0), dict(cfg, CUBLAS=1)
    err = ((w8a8_block_linear(x, *qs[0], config=ours_cfg).float() - ref.float()).norm() / ref.float().norm()).item()

    def ours() -> None:
        for q, s in qs:
            w8a8_block_linear(x, q, s, config=ours_cfg)

    def bf16() -> None:
        for w in ws:
            F.linear(x, w)

    us = bench_graph(ours) / NUM_ROT
    bf16_us = bench_graph(bf16) / NUM_ROT
    try:  # cuBLAS's block-scaled FP8 (needs a CUDA build whose cuBLASLt has it: 12.9+ on sm90)
        if not cublas_block_scaled_available(x.device):  # CUBLAS 1 would time the Triton tile again
            raise RuntimeError(f"not available with torch {torch.__version__} (CUDA {torch.version.cuda}) here")
        out = w8a8_block_linear(x, *qs[0], config=cublas_cfg)
        cublas_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        cublas_us = bench_graph(lambda: [w8a8_block_linear(x, q, s, config=cublas_cfg) for q, s in qs]) / NUM_ROT
    except (RuntimeError, ValueError) as e:
        cublas_us, cublas_err = float("nan"), float("nan")
        print(f"{name} M={m}: cuBLAS block-scaled FP8 not run: {str(e).splitlines()[0][:200]}", flush=True)
    weight_bytes = n * k + 4 * (n // 128) * (k // 128)
    io_bytes = 2 * m * (k + n)
    floor_us = max((weight_bytes + io_bytes) / ceil["copy_tbps"] / 1e6, 2 * m * n * k / ceil["fp8_tflops"] / 1e6)
    heur = dict(_config(m, n, k, _num_sms(x.device)), CUBLAS=0)  # the heuristic's Triton tile
    heur_us = us if heur == ours_cfg else bench_graph(
        lambda: [w8a8_block_linear(x, q, s, config=heur) for q, s in qs]) / NUM_ROT
    row = {"shape": name, "n": n, "k": k, "m": m, "us": us, "bf16_us": bf16_us, "floor_us": floor_us,
           "of_floor": floor_us / us, "vs_bf16": bf16_us / us, "weight_tbps": weight_bytes / us / 1e6,
           "rel_err_vs_ref": err, "config": cfg, "heuristic_us": heur_us, "cublas_fp8_us": cublas_us,
           "cublas_fp8_rel_err": cublas_err}
    print(f"{name:8s} M={m:5d} [{n}x{k}] ours {us:8.1f} us  bf16 {bf16_us:8.1f} us  cuBLAS fp8 {cublas_us:8.1f} us "
          f"(err {cublas_err:.1e})  floor {floor_us:7.1f} us  "
          f"of floor {row['of_floor']:.2f}  x bf16 {row['vs_bf16']:.2f}  heuristic {heur_us:8.1f} us  "
          f"{cfg['KERNEL']} {cfg['BLOCK_M']}x{cfg['BLOCK_N']} split {cfg['SPLIT_K']}  err {err:.1e}"
          f"{'  table: cuBLAS' if cfg['CUBLAS'] else ''}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--m", default="1,8,64,256,1024,4096")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"of {','.join(ALL_SHAPES)}, or NxK (e.g. 7168x4096: GLM-4.5-Air's qkv shard at TP=2)")
    args = parser.parse_args()
    for name in args.shapes.split(","):
        if name not in ALL_SHAPES:
            n, _, k = name.partition("x")
            if not (n.isdigit() and k.isdigit() and int(n) % 128 == 0 and int(k) % 128 == 0):
                raise SystemExit(f"--shapes: {name!r} is neither one of {','.join(ALL_SHAPES)} nor NxK in whole "
                                 f"128-blocks")
            ALL_SHAPES[name] = (int(n), int(k))
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_linear needs a CUDA GPU (FP8 tensor cores: sm89 or newer)")
    ceil = measure_ceilings()
    print(f"ceilings: copy {ceil['copy_tbps']:.2f} TB/s, fp8 {ceil['fp8_tflops']:.0f} TFLOP/s", flush=True)
    rows = [bench_one(s, int(m), ceil) for s in args.shapes.split(",") for m in args.m.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_fp8_linear.json").write_text(json.dumps(
        {"ceilings": ceil, "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    worst = min(rows, key=lambda r: r["of_floor"])
    print(f"bench_fp8_linear summary: of floor min {worst['of_floor']:.2f} ({worst['shape']} M={worst['m']}), "
          f"x bf16 at M=1: " + ", ".join(f"{r['shape']} {r['vs_bf16']:.2f}" for r in rows if r["m"] == 1))


if __name__ == "__main__":
    main()
