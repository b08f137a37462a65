"""Probe: a wider sweep of the 16-bit linear GEMV at M=1 than benchmarks/tune_linear_gemv.py's (session 8, issue 16).

  PYTHONPATH=. python3 benchmarks/probe_gemv_sweep.py [budget_s per shape, default 100]     (a GPU)

Split K up to 32, whole-K FMA programs, 8 warps; timed as the tuner times (one CUDA graph per config holding one call
per weight copy, the copies rotated past L2); prints the eight fastest per shape next to cuBLAS and the HBM floor.
"""

from __future__ import annotations

import itertools
import math
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import tuning
from kernels.linear.gemv import gemv_linear
from kernels.linear.gemv_config import check_config

COPY_TBPS = 4.24  # an H200's measured copy bandwidth
L2_BYTES = 50e6


def candidates(k: int) -> list[dict]:
    out = []
    for split, dot, bn, bk, warps, stages in itertools.product((32, 16, 8), (0, 1), (8, 16, 32, 64),
                                                              (128, 256, 512, 1024), (4, 8), (1, 3)):
        if dot and (bn < 16 or bk > 256 or stages == 1) or not dot and stages == 3:
            continue
        if not 2048 <= bn * bk <= 32768 or split > k // bk:
            continue
        out.append(dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages, DOT=dot))
    return out


def sweep(n: int, k: int, name: str, budget_s: float) -> None:
    copies = max(4, math.ceil(2 * L2_BYTES / (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, ws[0]).float()
    cublas = tuning.time_graph_us([lambda w=w: F.linear(x, w) for w in ws], 30.0, max_reps=40)
    floor = n * k * 2 / (COPY_TBPS * 1e12) * 1e6
    cands = candidates(k)
    print(f"{name}: {len(cands)} candidates; cublas {cublas:.2f} us, floor {floor:.2f} us", flush=True)
    timed, t_end = [], time.time() + budget_s
    for cfg in cands:
        if time.time() > t_end:
            print("  budget out")
            break
        check_config(cfg)
        y = gemv_linear(x, ws[0], None, cfg).float()
        if ((y - ref).norm() / ref.norm()).item() > 1e-2:
            print(f"  wrong result: {cfg}")
            continue
        us = tuning.time_graph_us([lambda w=w, c=cfg: gemv_linear(x, w, None, c) for w in ws], 30.0, max_reps=40)
        timed.append((us, cfg))
    for us, cfg in sorted(timed, key=lambda r: r[0])[:8]:
        print(f"  {us:6.2f} us ({floor / us:.2f} of floor) {cfg}", flush=True)


def main() -> None:
    budget_s = float(sys.argv[1]) if len(sys.argv) > 1 else 100.0
    for n, k, name in [(2048, 4096, "o_proj"), (5120, 2048, "qkv")]:
        sweep(n, k, name, budget_s)


if __name__ == "__main__":
    main()
