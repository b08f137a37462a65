"""Weight-only FP8 (W8A16) in the fused MoE GEMMs (kernels/fused_moe.py): the per-GEMM config key "w8_mma".

At a few rows per expert the layer is bandwidth-bound and the activations stay 16-bit (config act_fp8 false): the
e4m3 weight tile has to meet them in a 16-bit MMA. "dequant" (the default) scales every weight to 16 bits before the
dot: per weight an e4m3 -> fp32 convert, a multiply and a convert back, ALU work on every byte streamed. The fp16
modes convert only (e4m3 is exact in fp16), take the activations as fp16 times a power of two per row
(kernels/fp8.py f16_pow2_split: exact for bf16 / fp16 rows whatever their range; fp32 ones round to fp16) and
apply the weight's block scale (constant over a [128 n, 128 k] block, so over each K step of a column: BLOCK_K
divides 128) once to the step's [rows, columns] product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8 import native_e4m3_cvt, widen_e4m3

W8_MMA_MODES = ("dequant", "f16", "f16_swap", "f16_cast", "f16_swap_cast")


def w8_mma_meta(g: dict, fp8: bool, act_fp8: bool, device: torch.device) -> dict:
    """The kernel switches for a GEMM entry's "w8_mma" (FP8 weights, act_fp8 false; default "dequant"): "dequant"
    scales each weight tile to 16 bits in registers; "f16" widens it to fp16 (one packed PTX cvt per two weights),
    runs the MMA in fp16 on row-scaled activations (f16_pow2_split) and scales each step's product; "_swap" also
    puts the weight columns on the MMA's M side (a few rows fill 16 of its 64; sm90: wgmma instead of mma.sync);
    "_cast" widens with Triton's cast, which the compiler may move after the operand's layout change (no fp16 tile
    staged in shared memory; benchmarks/moe_ir.py shows either's SASS)."""
    mode = g.get("w8_mma", "dequant")
    if mode not in W8_MMA_MODES:
        raise ValueError(f"MoE config w8_mma must be one of {W8_MMA_MODES}, got {mode!r}")
    if mode != "dequant" and (not fp8 or act_fp8):
        raise ValueError(f"MoE config w8_mma {mode!r} needs FP8 weights with act_fp8 false")
    f16 = mode != "dequant"
    return {"F16_MMA": f16, "SWAP_AB": "_swap" in mode,
            "WIDEN_ASM": f16 and not mode.endswith("_cast") and native_e4m3_cvt(device)}


@triton.jit
def w8_f16_dot(a16, a_s, w, w_s, WIDEN_ASM: tl.constexpr, SWAP_AB: tl.constexpr):
    # weight-only FP8, fp16 MMA: a16 [BLOCK_M, BLOCK_K] fp16 with row scales a_s [BLOCK_M] (f16_pow2_split), w
    # [BLOCK_K, BLOCK_N] e4m3 with column scales w_s [BLOCK_N] (one 128-wide K block) -> the step's [BLOCK_M, BLOCK_N]
    # product (SWAP_AB: its transpose, the weight columns on the MMA's M side), scaled once per tile, not per weight
    if WIDEN_ASM:
        w16 = widen_e4m3(w)  # one cvt.rn.f16x2.e4m3x2 per two weights (kernels/fp8.py); e4m3 is exact in fp16
    else:
        w16 = w.to(tl.float16)
    if SWAP_AB:  # (one return: Triton wants one type per function, whichever branch)
        p = tl.dot(tl.trans(w16), tl.trans(a16)) * (w_s[:, None] * a_s[None, :])
    else:
        p = tl.dot(a16, w16) * (a_s[:, None] * w_s[None, :])
    return p
