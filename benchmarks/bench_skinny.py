"""Decode-time projections at M = 1..16 rows: cuBLAS (F.linear) against kernels/skinny_linear.py, each as a
fraction of the weight's bytes over the copy bandwidth measured in the same run (CUDA-graph timing, so launch
cost is excluded as it is inside the decode graph).

    python benchmarks/bench_skinny.py --out skinny.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from kernels.skinny_linear import linear

SHAPES = {  # name: (N, K) of the weight
    "qwen3-30b qkv": (5120, 2048), "qwen3-30b o_proj": (2048, 4096), "qwen3-30b router": (128, 2048),
    "glm-4.5-air qkv": (14336, 4096), "glm-4.5-air o_proj": (4096, 12288), "glm-4.5-air router": (128, 4096),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--out", default="skinny.json")
    args = parser.parse_args()
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    src = dst = None  # noqa: F841 (freed before the weights)
    rows = []
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(8)]  # rotated vs L2
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            err = (linear(x, ws[0]).float() - F.linear(x, ws[0]).float()).abs().max().item()
            times = {}
            for label, fn in (("cublas", F.linear), ("skinny", linear)):
                def run(fn=fn, x=x, ws=ws) -> None:
                    for w in ws:
                        fn(x, w)
                times[label] = do_bench_cudagraph(run, rep=200) / len(ws) * 1e3  # us per projection
            floor = n * k * 2 / bw * 1e6
            rows.append({"shape": name, "m": m, "n": n, "k": k, "max_abs_err": err, "floor_us": floor,
                         **{f"{lb}_us": t for lb, t in times.items()}})
            print(f"{name:20s} M={m:2d}: cuBLAS {times['cublas']:6.2f} us ({floor / times['cublas']:.2f}), skinny "
                  f"{times['skinny']:6.2f} us ({floor / times['skinny']:.2f}), floor {floor:.2f} us, err {err:.1e}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
