"""Paged decode attention (one query token per sequence), split-K over the context.

The cache layout, the slot rule and the FP8 scheme are those of kernels/attention/prefill.py. Each (sequence,
KV head) is cut into num_splits equal, BLOCK_N-aligned shares of its tokens; every split writes a partial
output and its log-sum-exp, and a second launch merges them. fused_merge=True instead lets the last split
of a (sequence, KV head) to finish (an atomic counter) merge them in the same launch; measured on an H200
it lost (2026-11-29, an older kernel: B=1 ctx 32k 77.5 us fused vs 48.7 us two launches; 2026-12-01, this one, B=1
Qwen3-30B-A3B heads: 4k FP8 KV 15.4 vs 6.2 us, 32k 25.6 vs 15.8, 128k bf16 106.3 vs 66.9: one program reads every
split's partials, head after head), so two launches are the default: fused_merge=None (the default) fuses where the
config's fused_merge_max_splits says, which no table sets (kernels/attention/config.py). At long context and small
batch many splits keep every SM streaming KV: up to MAX_SPLITS per (sequence, KV head), capped by the config's
max_splits (64 by default, the old limit); the merge reads them 64 at a time with an online log-sum-exp in a fixed
order, so the output bits do not change from run to run, and up to 64 splits are merged exactly as before. The split
rule, the config a batch runs and what a launch compiles, from shapes alone: kernels/attention/decode_plan.py.

PROLOGUE (kernels/attention/decode_fused.py): the attention prologue (q/k norm, RoPE, the new token's K/V store) inside
this kernel, from the raw QKV rows: one launch fewer per decode layer; bit for bit the two launches.

Tile sizes, warps, stages and the split rule come from kernels/attention/config.py (tuned per GPU by
benchmarks/tune_attention.py; at batch <= small_batch its small_batch_config: a few long requests want more
splits, and maybe other tiles, than a full batch).

An FP8 cache is read as FP8 (half the bytes) and widened to fp16 for the dots:
e4m3 -> fp16 is exact and one packed conversion per two values, where -> bf16 adds a second, slower one per
value; q is rounded to fp16 once per program, p per tile, both with fp32 accumulation; k_scale is in the softmax
scale, v_scale on the output. Reading the V tile as 32-bit words (to avoid Triton's byte-by-byte gather into the
PV dot's operand layout) was tried and measured slower on an H200 than loading it as FP8 and widening, at every
size (fraction of copy bandwidth, words vs bytes: B=1 ctx 32k 0.40 vs 0.45, B=1 128k 0.58 vs 0.67, B=16 128k 0.52
vs 0.68, B=64 32k 0.67 vs 0.75, B=64 4k 0.57 vs 0.64). What those byte loads were: Triton hoists the tile's layout
change into the dot's operand above the widening, so V (whose dot operand runs along the tokens, across rows) is
gathered from shared memory one FP8 byte per load. The config's fp8_widen widens in registers by PTX the compiler
cannot hoist through (kernels/attention/fp8_dot.py _widen_fp8): the layout change then moves fp16 through ldmatrix (an
extra 16-bit staging tile in shared memory); default 0 until the tuner measures it. The config's fp8_dot instead
keeps K and V as e4m3 for e4m3 x e4m3 tensor-core dots, no widening at all (kernels/attention/fp8_dot.py); the H200
table runs fp8_dot 2 for head_dim 128 at every batch (B=1 128k 0.64 -> 0.78 of copy bandwidth, B=64 4k 0.76 -> 0.89),
so it is what --kv-cache-dtype fp8 decodes with there (another head_dim: the widening kernel, fp8_dot 0).

Accuracy: with fp8_dot the FP8-KV decode rounds q (per-(token, head) absmax scale) and the probabilities to e4m3,
as FlashAttention-3's FP8 path does: its output's error vs attention over the dequantized cache is ~3.5e-2 relative
on random data at real shapes (measured on an H200), against 2.8e-3 for the widening path; tests bound it by 2^-4 on
such data. q's rounding moves each score by up to 2^-4 of its terms, so the error grows with the scores' spread, as in
a trained model's peaked heads: in a torch emulation (head_dim 128, 2000 keys, 5 seeds) 3.4-3.8e-2 at score std 1
(nats), 6-8e-2 at 4, 9-13e-2 at 8-16. The config's fp8_q2 keeps q as two e4m3 terms (a second QK^T dot on the
same K tile): q's part drops to ~2^-8 and p's rounding is left, 2.4-2.7e-2 at std 1 and under 1.5e-2 past it
(sm90: 140 registers instead of 133, no spills; its cost on the GPU is not measured yet, so it is off by default).
Probabilities below 2^-18 of a split's running max round to 0 in the PV dot (below 2^-14: e4m3 subnormals, fewer
mantissa bits) while the normalizer still counts them: such tokens' weight is lost (a split's own max bounds the loss
to its share of the tokens; many splits at long context keep that share small).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import zeroed_counters
from kernels.attention.decode_plan import decode_launch_config, decode_plan, merge_fused
from kernels.attention.fp8_dot import (
    FP16_MAX,
    P_LOG2_SCALE,
    Q_LO_INV,
    _hold_fp8,
    _native_fp8_cvt,
    _q_low_part,
    _scale_q,
    _to_e4m3,
    fp8_as_f16,
    interpreted,
)
from kernels.attention.prefill import _LOG2E, attend, check_cache, gather_kv, needs_off64
from kernels.attention.prologue_rows import _decode_prologue, _store_new_kv
from kernels.attention.tiles import _kv_rows, _merge_head, _softmax_update, _widen_kv
from kernels.fp8 import FP8_DTYPE
from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait


def paged_attention_decode_ref(
    q: torch.Tensor,  # [batch, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,  # [batch]; 0 = padding row, output zeros
    block_tables: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    out = torch.zeros_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], seq_len, k_scale)
        v = gather_kv(v_cache, block_tables[b], seq_len, v_scale)
        out[b : b + 1] = attend(q[b : b + 1], k, v, scale)
    return out


@triton.jit
def _fp8_dot_update(q, q_lo, k, v, nmask, m_i, l_i, acc, row_scale, FP8_DOT: tl.constexpr, FP8_Q2: tl.constexpr,
                    V_DIRECT: tl.constexpr, INTERP: tl.constexpr):
    # one K/V tile of the FP8_DOT path (see _decode_kernel): e4m3 dots on the tiles as stored, q e4m3 too
    if FP8_DOT >= 2:  # transposed: [BLOCK_N, GROUP_PAD] scores, reductions over axis 0, acc O^T
        if FP8_Q2:
            st = tl.dot(k, tl.trans(q), tl.dot(k, tl.trans(q_lo)) * Q_LO_INV)
        else:
            st = tl.dot(k, tl.trans(q))
        st = tl.where(nmask[:, None], st * row_scale[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(st, 0))
        alpha = tl.exp2(m_i - m_new)
        pt = tl.exp2(st - (m_new - P_LOG2_SCALE)[None, :])
        acc = acc * alpha[None, :] + tl.dot(tl.trans(_hold_fp8(v, V_DIRECT)), _to_e4m3(pt, INTERP))
        l_i = l_i * alpha + tl.sum(pt, 0)
    else:
        if FP8_Q2:
            s = tl.dot(q, tl.trans(k), tl.dot(q_lo, tl.trans(k)) * Q_LO_INV)
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nmask[None, :], s * row_scale[:, None], float("-inf"))  # [GROUP_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        # p in [0, 2^P_LOG2_SCALE], rounded to e4m3; l_i in the same units (the scale cancels)
        p = tl.exp2(s - (m_new - P_LOG2_SCALE)[:, None])
        acc = acc * alpha[:, None] + tl.dot(_to_e4m3(p, INTERP), _hold_fp8(v, INTERP))
        l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def _tile_update(q, q_lo, k, v, nmask, m_i, l_i, acc, row_scale, qk_scale, FP8_DOT: tl.constexpr,
                 FP8_Q2: tl.constexpr, V_DIRECT: tl.constexpr, INTERP: tl.constexpr, FP8_WIDEN: tl.constexpr):
    # one K/V tile [BLOCK_N, BLOCK_D] as loaded (the cache's dtype) into the running softmax
    if FP8_DOT:
        m_i, l_i, acc = _fp8_dot_update(q, q_lo, k, v, nmask, m_i, l_i, acc, row_scale, FP8_DOT, FP8_Q2, V_DIRECT,
                                        INTERP)
    else:
        k, v = _widen_kv(k, v, q.dtype, FP8_WIDEN)
        m_i, l_i, acc = _softmax_update(q, k, v, nmask, m_i, l_i, acc, qk_scale)
    return m_i, l_i, acc


# per-step values: one variant for all (the fused prologue's positions / slots: any slice of their buffers)
@triton.jit(do_not_specialize=["num_splits", "stride_bt"], do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr, block_tables_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    qk_scale,  # softmax scale * k_scale * log2(e): the kernel works in base 2
    v_scale,
    num_splits,  # a runtime value: one compiled kernel serves every split count up to SPLITS_PAD
    stride_qb, stride_qh, stride_cb, stride_cs, stride_ch,  # cache strides (K and V share one layout)
    stride_bt, stride_ob, stride_oh,
    # PROLOGUE only (else None): the attention prologue fused in (kernels/attention/decode_fused.py)
    pos_ptr, cs_ptr, qw_ptr, kw_ptr, slot_ptr, eps, inv_k_scale, inv_v_scale, stride_cos,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS_PAD: tl.constexpr, FUSED_MERGE: tl.constexpr, FP8_AS_F16: tl.constexpr, OFF64: tl.constexpr,
    PDL: tl.constexpr = False, FP8_WIDEN: tl.constexpr = 0, FP8_DOT: tl.constexpr = 0,
    INTERP: tl.constexpr = False, FP8_Q2: tl.constexpr = False,
    PROLOGUE: tl.constexpr = False, HALF: tl.constexpr = 1, QK_NORM: tl.constexpr = False, FP8_KV: tl.constexpr = False,
    EARLY_INPUTS: tl.constexpr = False,
):
    # One program: one sequence, one KV head (all GROUP query heads share each K/V load), one split.
    # PDL: waits first, reading nothing before it, unless EARLY_INPUTS (the config's early_inputs): the step's lengths
    # and tables (and through them the first page ids) are then read before the wait (kernels/pdl.py rule (1)): with
    # an FP8 cache (behind the PDL qkv prologue) faster in steps (one H200, B=1 32k 3.348 -> 3.305 ms), with a bf16
    # cache slower (session 17: B=1 2.69 -> 2.73 ms); each split's first K/V tile before q lost too (session 16)
    # FP8_DOT (an FP8 cache, the config's fp8_dot): e4m3 x e4m3 dots on the tiles as stored, as the prefill's FP8_DOT
    # (kernels/attention/prefill.py). 1: GROUP_PAD >= 64, so that Hopper runs them as wgmma (16 rows: mma.sync, which
    # Triton runs on sm90 as fp16 after widening both operands); 2: transposed, the tile's tokens are the dots' rows
    # (S^T = K q^T [BLOCK_N, GROUP_PAD], O^T += V^T P^T [BLOCK_D, GROUP_PAD]): wgmma at BLOCK_N >= 64 per warpgroup with
    # 16 query rows, a quarter of the exp2 of 1; V reaches the PV dot (its A operand, in registers) through _hold_fp8,
    # so its copy is pipelined, but the transposed operand is gathered from shared memory a byte at a time (sm90 SASS:
    # LDS.U8); 3: as 2 without the hold: V loaded before the dots and staged straight into shared memory (no byte
    # gathers, the A operand read from there), its load waited for every tile. FP8_Q2 (the config's fp8_q2): q as two
    # e4m3 terms (fp8_dot._q_low_part), a second QK^T dot on the same K tile: q's rounding error drops from 2^-4
    # to ~2^-8 per value, which matters once scores spread (see the module docstring)
    V_DIRECT: tl.constexpr = INTERP or FP8_DOT == 3
    if not EARLY_INPUTS:
        pdl_wait(PDL)
        pdl_release(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    hmask = g < GROUP
    dmask = d < HEAD_DIM
    chunk = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    bt = block_tables_ptr + b.to(tl.int64) * stride_bt
    offs = tl.arange(0, BLOCK_N)
    # the page ids of a tile are loaded one tile ahead: K/V addresses that wait on a load of the same
    # iteration make Triton's pipeliner single-buffer K/V and issue the next tile's copy after the dots
    # (no overlap within a program at any num_stages below 5; seen in the sm90 TTGIR); the first ones before q,
    # whose fused prologue (PROLOGUE) then runs while they are in flight
    page_next = tl.load(bt + (start + offs) // BLOCK_SIZE, mask=start + offs < end, other=0)
    ALIGNED: tl.constexpr = BLOCK_N % BLOCK_SIZE == 0  # splits start at multiples of BLOCK_N
    if EARLY_INPUTS:  # the step's lengths, table row and first page ids above ran under the predecessor's tail
        pdl_wait(PDL)
        pdl_release(PDL)
    if PROLOGUE:  # q_ptr: the raw QKV rows [batch, (NUM_HEADS + 2 NUM_KV_HEADS) * HEAD_DIM]
        q, k_new, v_new = _decode_prologue(q_ptr + b.to(tl.int64) * stride_qb, pos_ptr, cs_ptr, qw_ptr, kw_ptr, b,
                                           kvh, heads, hmask, d, eps, inv_k_scale, inv_v_scale, stride_cos,
                                           k_cache_ptr.dtype.element_ty, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, HALF,
                                           BLOCK_D, QK_NORM, FP8_KV)
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0)  # [GROUP_PAD, BLOCK_D]
    q_lo = q  # FP8_Q2 only
    if FP8_DOT:  # per-head q scale from its absmax, folded into the softmax scale: [GROUP_PAD]
        qs, q_scale = _scale_q(q)
        q = _to_e4m3(qs, INTERP)
        if FP8_Q2:  # and what that rounding left, a second e4m3 term (scores: q8 . k + (q_lo . k) / 16)
            q_lo = _q_low_part(qs, q, INTERP)
        row_scale = qk_scale * q_scale
    else:
        row_scale = qk_scale  # (unused)
        if FP8_AS_F16:  # the dots run in fp16 (see the module docstring); saturate a bf16 q beyond fp16's range
            q = tl.clamp(q.to(tl.float32), -FP16_MAX, FP16_MAX).to(tl.float16)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    if FP8_DOT >= 2:
        acc = tl.zeros([BLOCK_D, GROUP_PAD], tl.float32)  # O^T
    else:
        acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    # PROLOGUE: the new token (seq_len - 1) is never read from the cache (the split that owns it stores it there at
    # the end): that split's last tile runs after the loop, with the token's k / v rows from registers (a select
    # inside the loop kept their broadcast tiles live across it: sm90, 116 -> 241 registers at BLOCK_N 64)
    loop_end = end
    if PROLOGUE:
        owns = (seq_len > 0) & (start <= seq_len - 1) & (seq_len - 1 < end)
        last = start + (seq_len - 1 - start) // BLOCK_N * BLOCK_N  # the owner's last tile
        loop_end = tl.where(owns, last, end)
    for n0 in range(start, loop_end, BLOCK_N):
        n = n0 + offs
        nmask = n < end
        rows = _kv_rows(page_next, n0, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
        page_next = tl.load(bt + (n + BLOCK_N) // BLOCK_SIZE, mask=n + BLOCK_N < end, other=0)
        kv_mask = nmask[:, None] & dmask[None, :]
        # an FP8 cache is widened to q's (fp16) dtype right after the load (exact); its scales are in qk_scale,
        # v_scale
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _tile_update(q, q_lo, k, v, nmask, m_i, l_i, acc, row_scale, qk_scale, FP8_DOT, FP8_Q2,
                                     V_DIRECT, INTERP, FP8_WIDEN)
    if PROLOGUE:  # the new token's tile, peeled (the loop above stops before it in the split that owns it)
        if owns:
            n = last + offs
            rows = _kv_rows(page_next, last, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
            kv_mask = (n < seq_len - 1)[:, None] & dmask[None, :]  # every row but the new token's
            k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            is_new = (n == seq_len - 1)[:, None]  # its row from registers, in the cache's dtype as a load gives it
            k = tl.where(is_new, k_new, k)
            v = tl.where(is_new, v_new, v)
            m_i, l_i, acc = _tile_update(q, q_lo, k, v, n < end, m_i, l_i, acc, row_scale, qk_scale, FP8_DOT, FP8_Q2,
                                         V_DIRECT, INTERP, FP8_WIDEN)
        # this step's k / v into the cache, after every load of this program: no K/V copy waits behind these stores
        _store_new_kv(k_cache_ptr, v_cache_ptr, slot_ptr, b, kvh, owns, k_new, v_new, d, stride_cb, stride_cs,
                      stride_ch, HEAD_DIM, BLOCK_SIZE)
    if FP8_DOT >= 2:
        acc = tl.trans(acc)
    has = l_i > 0
    o = acc * (v_scale / tl.where(has, l_i, 1.0))[:, None]
    omask = hmask[:, None] & dmask[None, :]
    if SPLITS_PAD == 1:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        row = (b * NUM_HEADS + heads) * num_splits + split  # part_out [B, H, S, D], part_lse [B, H, S]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=omask)
        l_log2 = tl.log2(tl.where(has, l_i, 1.0)) - (P_LOG2_SCALE if FP8_DOT else 0.0)  # l_i in p's units
        lse = tl.where(has, m_i + l_log2, float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=hmask)
        if FUSED_MERGE:
            # every thread's partial stores precede the release of the counter; the last split merges
            tl.debug_barrier()
            counter = counter_ptr + b * NUM_KV_HEADS + kvh
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                for g2 in range(GROUP):
                    _merge_head(part_out_ptr, part_lse_ptr, out_ptr, b, kvh * GROUP + g2, 0, num_splits, stride_ob,
                                stride_oh, NUM_HEADS, HEAD_DIM, BLOCK_D, SPLITS_PAD)
                tl.atomic_xchg(counter, 0)  # ready for the next launch (CUDA graph replays reuse the buffer)


@triton.jit(do_not_specialize=["num_splits"])  # one variant per SPLITS_PAD, not per count
def _reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                   NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr,
                   PDL: tl.constexpr = False):
    # the second launch of the two-launch variant: one program per (sequence, query head, BLOCK_D columns)
    pdl_wait(PDL)  # the partials are the split kernel's output
    pdl_release(PDL)
    _merge_head(part_out_ptr, part_lse_ptr, out_ptr, tl.program_id(0), tl.program_id(1), tl.program_id(2) * BLOCK_D,
                num_splits, stride_ob, stride_oh, NUM_HEADS, HEAD_DIM, BLOCK_D, SPLITS_PAD)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(n: int, device: torch.device) -> torch.Tensor:
    return zeroed_counters(_COUNTERS, n, device, 4096)  # the fused merge's arrivals per (sequence, kv head)


def check_tables(seq_lens: torch.Tensor, block_tables: torch.Tensor, batch: int) -> None:
    if seq_lens.shape != (batch,) or block_tables.dim() != 2 or block_tables.shape[0] < batch:
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} / block_tables {tuple(block_tables.shape)} "
                         f"do not match batch {batch}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along its last dim")


def paged_attention_decode(
    q: torch.Tensor,  # [batch, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,  # [batch]; 0 = padding row, output zeros
    block_tables: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    num_splits: int | None = None,
    fused_merge: bool | None = None,  # True: the last split merges in the same launch; None: as the config says
    config: dict | None = None,  # tile config (kernels/attention/config.py); None: this GPU's table or the default
) -> torch.Tensor:
    check_cache(q, k_cache, v_cache)
    batch = q.shape[0]
    check_tables(seq_lens, block_tables, batch)
    cfg = decode_launch_config(q.shape[2], k_cache.dtype, q.device, batch, config)
    out = torch.empty_like(q)
    if batch > 0:
        launch_decode(q, out, k_cache, v_cache, seq_lens, block_tables, scale, k_scale, v_scale, num_splits,
                      fused_merge, cfg)
    return out


_NO_PROLOGUE = dict.fromkeys(("pos_ptr", "cs_ptr", "qw_ptr", "kw_ptr", "slot_ptr", "eps", "inv_k_scale", "inv_v_scale",
                              "stride_cos"))


def launch_decode(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, k_scale: float, v_scale: float,
                  num_splits: int | None, fused_merge: bool | None, cfg: dict, prologue: dict | None = None) -> None:
    # the launches behind the checked wrappers, batch >= 1: q [batch, num_heads, head_dim], or with prologue (the
    # fused prologue's kernel arguments, kernels/attention/decode_fused.py) the raw QKV rows [batch, width]; out
    # [batch, num_heads, head_dim]; cfg from decode_launch_config
    batch, num_heads, head_dim = out.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_splits, splits_pad, merge_d = decode_plan(batch, num_heads, num_kv_heads, head_dim,
                                                  block_tables.shape[1] * block_size, cfg, q.device, num_splits)
    if fused_merge is None:  # the config's rule (decode_plan.merge_fused: a split count, shapes only)
        fused_merge = merge_fused(cfg, num_splits)
    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        counters = _split_counters(batch * num_kv_heads, q.device) if fused_merge else seq_lens
    else:
        part_out = part_lse = out  # unused
        counters = seq_lens
    pdl = pdl_enabled(q.device)
    f16_dots = fp8_as_f16(q, k_cache)
    # fp8_widen needs sm89+ PTX and the compiler (not the interpreter); elsewhere Triton's cast, the same values
    fp8_dot = cfg["fp8_dot"] if k_cache.dtype == FP8_DTYPE else 0
    fp8_widen = cfg["fp8_widen"] if f16_dots and _native_fp8_cvt(q.device) and not fp8_dot else 0
    # fp8_dot 1: at least 64 query rows (one wgmma's M on Hopper; the rows past the group are zeros); 2, 3: 16
    group_pad = max(64 if fp8_dot == 1 else 16, triton.next_power_of_2(group))
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_out, part_lse, counters,
        scale * k_scale * _LOG2E, v_scale, num_splits,
        q.stride(0), head_dim if prologue else q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), **(prologue or _NO_PROLOGUE),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=group_pad,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=cfg["BLOCK_N"],
        SPLITS_PAD=splits_pad if fused_merge else min(splits_pad, 2), FUSED_MERGE=fused_merge,
        FP8_AS_F16=f16_dots and not fp8_dot, OFF64=needs_off64(k_cache), PDL=pdl, FP8_WIDEN=fp8_widen,
        FP8_DOT=fp8_dot, INTERP=fp8_dot > 0 and interpreted(), FP8_Q2=bool(fp8_dot and cfg["fp8_q2"]),
        EARLY_INPUTS=bool(cfg["early_inputs"]), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **launch_kwargs(pdl),
    )
    if num_splits > 1 and not fused_merge:
        _reduce_kernel[(batch, num_heads, triton.cdiv(head_dim, merge_d))](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1), NUM_HEADS=num_heads,
            HEAD_DIM=head_dim, BLOCK_D=merge_d, SPLITS_PAD=splits_pad, PDL=pdl, num_warps=4, **launch_kwargs(pdl),
        )
