"""The post-attention residual add + RMSNorm inside the fused router (kernels/router_fused.py), bit for bit norm.py.

At decode sizes the router already reads every hidden row of the batch, so it can take the attention output h and
the residual instead of the normalized x: each program computes r = round(h + residual) and
x = round(round(r * rsqrt(mean(r^2) + eps)) * w) for its split's columns exactly as kernels/norm.py's
_rms_norm_kernel does, uses x for its logits, and writes its share of x (the experts' input) and r (the new
residual). One launch fewer per MoE layer (the norm kernel between o_proj and the router, ~1.7 us at batch 1).

The one reduction, mean(r^2), needs the whole row, so every program sums the squares of its rows again (the rows
are in L2: 4 KB each at hidden 2048). Its fp32 sum must be the norm kernel's bit for bit, and a float sum's bits
depend on its order, which Triton derives from the layout (elements per thread, warps). The norm kernel runs at
min(16, max(1, BLOCK / 512)) warps, the router at its tail config's (one warp at batch 1), so the router cannot
just call tl.sum: it replays the norm kernel's order explicitly (_sum_squares_tree), with additions of two
values only (whose bits do not depend on order) and explicit FMAs. The order, read off the norm kernel's sm90 PTX
(Triton 3.6, hidden a multiple of 16, 16-bit activations: 16-byte vectors of SPT = 8 elements;
tests/test_router_norm.py test_norm_kernel_order_on_sm90 checks the layout, the FMA count and the shuffles on every
run, no GPU needed): thread t of 32 * W holds elements (j % SPT) + SPT * t + (j // SPT) * SPT * 32 * W for
j < REPS * SPT and folds them in j order, the first two as fma(e0, e0, round(e1 * e1)), the rest fma(ej, ej, acc);
then lanes are combined by a butterfly over lane bits 4..0 (shfl.bfly 16..1), then warps by one over warp bits
high..0 (W/2..1). The interpreter instead sums with np.sum as the norm kernel does there
(_sum_squares_rows: the same [BLOCK] row, the same call). Other shapes (hidden not a multiple of 16, fp32
activations on a GPU) keep the separate norm (norm_layout returns None).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.norm import rms_norm_num_warps

# the fusion is taken up to this many rows (a static choice per batch size: CUDA graphs). Every program re-reads
# its rows whole for the sum of squares (8 KB of h and residual a row at hidden 2048, from L2): nothing at one row,
# 64 KB a program at 8 against the ~1.7 us launch it saves; unmeasured past 8 (the kernel takes up to 16 rows per
# token block without spilling, tests/pdl_sm90.py router_norm_m16), so the separate norm stays there
FUSED_NORM_MAX_TOKENS = 8
# columns of x and r each program writes in turn: column c by expert tile (c // WRITE_CHUNK) % tiles
WRITE_CHUNK = tl.constexpr(16)
TREE_SPT = 8  # elements per thread of the norm kernel's 16-byte vectors of a 16-bit row


def norm_warps(block: int) -> int:
    # kernels/norm.py rms_norm's launch (one definition: a retuned norm launch moves the replayed order with it)
    return rms_norm_num_warps(block)


def norm_layout(hidden: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int] | None:
    """How the router sums a row's squares: (0, 0, 0) in the interpreter (np.sum, as the norm kernel there); on a
    GPU (warps, SPT, REPS) of the norm kernel's reduction (module docstring); None where the order is not known
    (the caller keeps the separate norm)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda":
        return (0, 0, 0)
    return _gpu_layout(hidden, dtype)


@functools.cache
def _gpu_layout(hidden: int, dtype: torch.dtype) -> tuple[int, int, int] | None:
    # (asked per MoE layer of every eager forward)
    block = triton.next_power_of_2(hidden)
    warps = norm_warps(block)
    if dtype.itemsize != 2 or hidden % 16 or block < TREE_SPT * 32 * warps:
        return None
    return warps, TREE_SPT, block // (TREE_SPT * 32 * warps)


@dataclass(frozen=True)
class FusedNorm:
    """What route_fused_norm hands the router kernel: the norm's inputs, its two outputs, the sum's order."""

    residual: torch.Tensor  # [num_tokens, hidden], rows contiguous
    weight: torch.Tensor  # [hidden] the norm weight
    eps: float
    x_out: torch.Tensor  # [num_tokens, hidden] contiguous: the normalized x (the experts' input)
    r_out: torch.Tensor  # [num_tokens, hidden] contiguous: h + residual (the next residual)
    layout: tuple[int, int, int]  # norm_layout's

    def constexprs(self, hidden: int) -> dict:
        warps, spt, reps = self.layout
        if warps and spt != TREE_SPT:
            raise ValueError(f"the router replays the norm's sum with {TREE_SPT}-element vectors, got {self.layout}")
        return dict(NORM=True, NORM_BLOCK=triton.next_power_of_2(hidden), NORM_W=warps,
                    LOG_W=max(warps, 1).bit_length() - 1, REPS=reps)


@triton.jit
def _round_sum(h, r):
    # kernels/norm.py: the residual sum in fp32, rounded to the activation dtype
    return (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)


@triton.jit
def _sum_squares_rows(h_ptr, res_ptr, row0, num_tokens, stride_h, stride_r, N, ROWS: tl.constexpr,
                      BLOCK: tl.constexpr):
    # [ROWS] fp32: rows row0.. of sum(round(h + res)^2), each as _rms_norm_kernel's tl.sum of one [BLOCK] row (the
    # interpreter's order: np.sum of the same array)
    c = tl.arange(0, BLOCK)
    ri = tl.arange(0, ROWS)
    out = tl.zeros([ROWS], tl.float32)
    for i in tl.static_range(ROWS):
        t = (row0 + i).to(tl.int64)
        mask = (c < N) & (row0 + i < num_tokens)
        x = _round_sum(tl.load(h_ptr + t * stride_h + c, mask=mask, other=0.0),
                       tl.load(res_ptr + t * stride_r + c, mask=mask, other=0.0))
        xf = x.to(tl.float32)
        out = tl.where(ri == i, tl.sum(xf * xf, 0), out)
    return out


@triton.jit
def _split8(v, ROWS: tl.constexpr, THREADS: tl.constexpr):
    # [ROWS, THREADS, 8] -> its 8 [ROWS, THREADS] slices in element order (tl.split halves the last axis of 2:
    # register moves where the 8 are one thread's vector)
    ev, od = tl.split(tl.reshape(v, [ROWS, THREADS, 4, 2]))  # elements 0 2 4 6 | 1 3 5 7
    e04, e26 = tl.split(tl.reshape(ev, [ROWS, THREADS, 2, 2]))
    e15, e37 = tl.split(tl.reshape(od, [ROWS, THREADS, 2, 2]))
    e0, e4 = tl.split(e04)
    e2, e6 = tl.split(e26)
    e1, e5 = tl.split(e15)
    e3, e7 = tl.split(e37)
    return e0, e1, e2, e3, e4, e5, e6, e7


@triton.jit
def _sum_squares_tree(h_ptr, res_ptr, row0, num_tokens, stride_h, stride_r, N, ROWS: tl.constexpr,
                      NORM_W: tl.constexpr, LOG_W: tl.constexpr, REPS: tl.constexpr):
    # [ROWS] fp32: the same sums in the order of the norm kernel's sm90 reduction at NORM_W warps, SPT = 8 (module
    # docstring): thread t's repeat rep is the 16-byte vector at columns rep * 8 * THREADS + 8 * t
    THREADS: tl.constexpr = 32 * NORM_W
    t = row0 + tl.arange(0, ROWS)
    rmask = t < num_tokens
    hp = h_ptr + t.to(tl.int64)[:, None, None] * stride_h
    rp = res_ptr + t.to(tl.int64)[:, None, None] * stride_r
    vec = (8 * tl.arange(0, THREADS))[:, None] + tl.arange(0, 8)[None, :]  # [THREADS, 8]
    acc = tl.zeros([ROWS, THREADS], tl.float32)
    for rep in tl.static_range(REPS):
        col = (rep * 8 * THREADS + vec)[None, :, :]
        mask = rmask[:, None, None] & (col < N)
        v = _round_sum(tl.load(hp + col, mask=mask, other=0.0), tl.load(rp + col, mask=mask, other=0.0))
        e0, e1, e2, e3, e4, e5, e6, e7 = _split8(v.to(tl.float32), ROWS, THREADS)
        if rep == 0:  # the fold's first add, as the norm kernel's PTX has it: fma(e0, e0, e1 * e1)
            acc = tl.fma(e0, e0, e1 * e1)
        else:
            acc = tl.fma(e1, e1, tl.fma(e0, e0, acc))
        acc = tl.fma(e7, e7, tl.fma(e6, e6, tl.fma(e5, e5, tl.fma(e4, e4, tl.fma(e3, e3, tl.fma(e2, e2, acc))))))
    # lanes: shfl.bfly 16, 8, 4, 2, 1, i.e. pairs differing in lane bit 4 first; each step adds two values
    s = tl.reshape(acc, [ROWS, NORM_W, 32])
    for b in tl.static_range(5):
        s = tl.sum(tl.reshape(s, [ROWS, NORM_W, 2, 16 >> b]), 2)
    s = tl.reshape(s, [ROWS, NORM_W])
    # warps: the same butterfly over the warp bits, the highest first
    for b in tl.static_range(LOG_W):
        s = tl.sum(tl.reshape(s, [ROWS, 2, NORM_W >> (b + 1)]), 1)
    return tl.reshape(s, [ROWS])


@triton.jit
def _inv_rms(h_ptr, res_ptr, row0, num_tokens, stride_h, stride_r, N, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr,
             NORM_W: tl.constexpr, LOG_W: tl.constexpr, REPS: tl.constexpr):
    # [ROWS] fp32 rsqrt(mean(r^2) + eps) of rows row0.., as _rms_norm_kernel computes it (N a runtime int there too)
    if NORM_W == 0:
        s = _sum_squares_rows(h_ptr, res_ptr, row0, num_tokens, stride_h, stride_r, N, ROWS, BLOCK)
    else:
        s = _sum_squares_tree(h_ptr, res_ptr, row0, num_tokens, stride_h, stride_r, N, ROWS, NORM_W, LOG_W, REPS)
    return tl.rsqrt(s / N + eps)


@triton.jit
def _normed_tile(h_ptr, res_ptr, nw_ptr, x_out_ptr, r_out_ptr, inv, t, tmask, cols, pid_e, num_e_tiles, stride_h,
                 stride_r, HIDDEN: tl.constexpr):
    # [rows, BLOCK_H] x = round(round(r * inv) * w) of the tokens t at columns cols (rows: inv's), and r = round(h +
    # res), as _rms_norm_kernel; this program stores the columns of its turn (WRITE_CHUNK each): every element of
    # x and r once over the grid (x_out / r_out contiguous [num_tokens, HIDDEN])
    cmask = cols < HIDDEN
    mask = tmask[:, None] & cmask[None, :]
    t64 = t.to(tl.int64)[:, None]
    r = _round_sum(tl.load(h_ptr + t64 * stride_h + cols[None, :], mask=mask, other=0.0),
                   tl.load(res_ptr + t64 * stride_r + cols[None, :], mask=mask, other=0.0))
    y = (r.to(tl.float32) * inv[:, None]).to(r.dtype).to(tl.float32)
    y = (y * tl.load(nw_ptr + cols, mask=cmask).to(tl.float32)[None, :]).to(x_out_ptr.dtype.element_ty)
    mine = mask & (((cols // WRITE_CHUNK) % num_e_tiles) == pid_e)[None, :]
    tl.store(r_out_ptr + t64 * HIDDEN + cols[None, :], r, mask=mine)
    tl.store(x_out_ptr + t64 * HIDDEN + cols[None, :], y, mask=mine)
    return y
