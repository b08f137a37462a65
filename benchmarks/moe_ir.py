"""Compile the fused MoE GEMMs (kernels/fused_moe.py) for a Hopper GPU (sm90) on any machine, no GPU needed, and
report what the compiler made of a tile and weight-only FP8 mode: MMA kind (mma.sync / wgmma), registers, spills,
shared memory, conversion instructions in the SASS (benchmarks/attention_ir.py's report).

python benchmarks/moe_ir.py up --block-n 128 --warps 4 --stages 4 --mode f16_swap [--shape qwen3] [--block-m 16]

Prints one JSON line. Must run without TRITON_INTERPRET. The arguments get a launch's specializations, for the
shape's sizes (default Qwen3-30B-A3B: 128 experts, hidden 2048, inter 768), FP8 weights, bf16 activations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_ir import compile_sm90, report  # noqa: E402
from bench_moe import SHAPES  # noqa: E402

import kernels.fused_moe as fm  # noqa: E402
from kernels.moe_w8 import W8_MMA_MODES, w8_mma_meta  # noqa: E402


def inspect_moe(kind: str, block_n: int, warps: int, stages: int, mode: str = "dequant", shape: str = "qwen3",
                block_m: int = 16, act_fp8: bool = False) -> dict:
    """kind "up" (gate_up GEMM + SiLU-and-mul) or "down"; mode: a "w8_mma" value (act_fp8 false)."""
    e, h, inter, top_k = SHAPES[shape]
    k, n = (h, inter) if kind == "up" else (inter, h)
    w_rows = 2 * inter if kind == "up" else h
    nb, kb = -(-w_rows // 128), -(-k // 128)
    args = {"a_ptr": "fp8e4nv" if act_fp8 else "bf16", "a_scale_ptr": "fp32", "w_ptr": "fp8e4nv",
            "w_scale_ptr": "fp32", "out_ptr": "bf16", "sorted_ptr": "i32", "expert_ids_ptr": "i32",
            "num_post_pad_ptr": "i32", "num_pairs": 512, "K": k, "NUM_PID_M": 200, "stride_at": k,
            "stride_ast": kb, "stride_we": w_rows * k, "stride_wn": k, "stride_wse": nb * kb, "stride_wsn": kb,
            "stride_ot": n}
    consts = {"USE_FP8": True, "ACT_FP8": act_fp8, "EVEN_K": k % 128 == 0, "DIRECT": False, "BLOCK_M": block_m,
              "BLOCK_N": block_n, "BLOCK_K": 128, "GROUP_M": 1 if block_m <= 32 else 8}
    meta = w8_mma_meta({"w8_mma": mode}, True, act_fp8, torch.device("cpu"))
    consts.update(meta, WIDEN_ASM=meta["F16_MMA"] and not mode.endswith("_cast"))  # the PTX widening, as on sm89+
    if kind == "up":
        args.update(INTER=inter, top_k=top_k)
        fn = fm._moe_up_kernel
    else:
        args.update(N=h, topk_weights_ptr="fp32", sum_ptr="bf16", counter_ptr="i32")
        consts.update(FUSED_SUM=False, TOP_K=1, TOP_K_PAD=1)
        fn = fm._moe_down_kernel
    return report(compile_sm90(fn, args, consts, warps, stages))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("moe_ir.py compiles for the GPU: unset TRITON_INTERPRET")
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["up", "down"])
    ap.add_argument("--shape", default="qwen3", choices=list(SHAPES))
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--mode", default="dequant", choices=list(W8_MMA_MODES))
    a = ap.parse_args()
    print(json.dumps(inspect_moe(a.kind, a.block_n, a.warps, a.stages, a.mode, a.shape, a.block_m)))


if __name__ == "__main__":
    main()
