"""FP8 (e4m3) KV cache pieces of the paged attention kernels (kernels/attention/prefill.py and decode.py).

A stored value is x / scale (clamped to +-448), one scale per tensor (k_scale, v_scale per layer). The kernels read
the cache as FP8 and widen each tile to fp16 right after the load (exact; under a float32 q, the CPU tests, to fp32),
with q in fp16 too, and fold the scales into the math: scores times k_scale, the output times v_scale (decode's
fp8_widen: the widening by PTX, _widen_fp8). A config's FP8_DOT (prefill) / fp8_dot (decode;
kernels/attention/config.py) instead runs the dots on FP8 tensor cores, as FlashAttention-3's FP8 path: q rounded to
e4m3 in the kernel with a per-(token, head) scale from its absmax (folded into the softmax scale with k_scale;
_quantize_q), QK^T as e4m3 x e4m3 with fp32 accumulation, the probabilities (in [0, 1] after the running max, times
2^P_LOG2_SCALE) rounded to e4m3 for an e4m3 x e4m3 PV dot with V as stored, v_scale and the 2^P_LOG2_SCALE on the
output (a split's log-sum-exp takes the P_LOG2_SCALE off again). Its error (e4m3's 3-bit mantissa: <= 2^-4 relative
per rounded q / p value; through q, a score's error grows with its size) is checked in tests/test_attention_fp8_dot.py;
kernels/attention/decode.py gives the measured numbers, and decode's fp8_q2 (q as two e4m3 terms, _q_low_part).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.fp8 import FP8_DTYPE, FP8_MAX
from kernels.fp8 import native_e4m3_cvt as _native_fp8_cvt  # noqa: F401 (the attention kernels' name)
from kernels.fp8 import widen_e4m3 as _widen_fp8  # noqa: F401 (the attention kernels' name)

# FP8 tensor-core attention (the FP8_DOT variant): q and the softmax probabilities rounded to e4m3 for e4m3 x e4m3
# dots with fp32 accumulation, as FlashAttention-3's FP8 path. p is scaled by 2^P_LOG2_SCALE (exact) so that its
# [0, 1] range sits on e4m3's normal numbers down to 2^-14 instead of the subnormals below 2^-6.
P_LOG2_SCALE = tl.constexpr(8.0)
E4M3_MAX = tl.constexpr(448.0)
# decode's fp8_q2: q as two e4m3 terms, q8 + q_lo / 16 (_q_low_part)
Q_LO_SCALE = tl.constexpr(16.0)
Q_LO_INV = tl.constexpr(0.0625)
FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def _round_e4m3(x):
    # fp32 -> the nearest e4m3 value (ties to even) as fp32, for |x| <= 448. The Triton interpreter's cast to e4m3
    # rounds a value that should carry into the next power of two down to the current one (1.97 -> 1.0), so under
    # the interpreter the kernels round here first (the cast of an e4m3 value is exact there); the GPU's cast
    # (cvt.rn.satfinite) is round-to-nearest-even already. Normals: keep 3 of the 23 mantissa bits (the carry
    # moves into the exponent); below 2^-6 (subnormal steps of 2^-9): add and subtract 1.5 * 2^14, whose ulp is 2^-9
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576: 0xFFF00000
    sub = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, sub, bits.to(tl.float32, bitcast=True))


@triton.jit
def _to_e4m3(x, INTERP: tl.constexpr):
    # fp32 within +-448 -> e4m3 (INTERP: under the interpreter, see _round_e4m3)
    if INTERP:
        x = _round_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _hold_fp8(x, INTERP: tl.constexpr):
    # an e4m3 tile [BLOCK_N, BLOCK_D] as is, through an impure no-op Triton cannot move: V's copy into the K-major
    # shared layout its FP8 dot needs (it is the B operand of P @ V along the tokens, stored along head_dim) goes
    # through registers, and Triton places it at the value's definition, so right after a plain load its wait for
    # global memory would stall every tile before the QK^T dot; placed here (before the PV dot) the load overlaps
    # QK^T and the softmax. (The interpreter runs no PTX: there it is x.)
    if INTERP:
        return x
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float8e4nv, is_pure=False, pack=4)


@triton.jit
def _scale_q(q):
    # q [ROWS, BLOCK_D] -> (q / row scale in fp32, within +-448; row scale [ROWS] fp32): each row (one token's head)
    # scaled so its largest |value| maps to 448; an all-zero row (padding) gets scale 1. A 16-bit q is saturated to
    # fp16's range first, as the widening kernels do (their dots run in fp16): an inf (or a bf16 value near its max)
    # would make the row's scale inf (or its scores overflow) and its output NaN, or zeros through the split merge
    qf = q.to(tl.float32)
    if q.dtype.is_fp16() or q.dtype.is_bf16():
        qf = tl.clamp(qf, -FP16_MAX, FP16_MAX)
    amax = tl.max(tl.abs(qf), 1)
    inv = tl.where(amax > 0, E4M3_MAX / tl.maximum(amax, 1e-30), 1.0)
    return tl.clamp(qf * inv[:, None], -E4M3_MAX, E4M3_MAX), 1.0 / inv


@triton.jit
def _quantize_q(q, INTERP: tl.constexpr):
    # q [ROWS, BLOCK_D] -> (e4m3 q / row scale, row scale [ROWS] fp32): _scale_q, rounded to e4m3
    qs, q_scale = _scale_q(q)
    return _to_e4m3(qs, INTERP), q_scale


@triton.jit
def _q_low_part(qs, q8, INTERP: tl.constexpr):
    # the decode's fp8_q2: what q's rounding to e4m3 left (qs: _scale_q's fp32 q, q8 its e4m3), times 16 (exact; the
    # residual is at most half an ulp of 448, 16, so 256 at most), rounded to e4m3 too: qs ~ q8 + q_lo / 16 to ~2^-8
    # of each value instead of 2^-4, for one more QK^T dot on the same K tile
    return _to_e4m3((qs - q8.to(tl.float32)) * Q_LO_SCALE, INTERP)


# ---------------------------------------------------------------- host side


def interpreted() -> bool:
    # under the Triton interpreter (CPU tests): the FP8_DOT variant rounds to e4m3 itself (_round_e4m3)
    return os.environ.get("TRITON_INTERPRET") == "1"


def fp8_as_f16(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    # an FP8 cache under a 16-bit q: the dots run in fp16 (e4m3 -> fp16 is exact and one packed conversion per
    # two values; -> bf16 needs a second, slower one per value); a float32 q (CPU tests) keeps fp32 dots
    return k_cache.dtype == FP8_DTYPE and q.dtype in (torch.bfloat16, torch.float16)


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    # float -> the cache dtype; FP8 stores x / scale, saturated to e4m3's range
    if dtype != FP8_DTYPE:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)
