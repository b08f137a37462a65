"""Paged attention over a block-structured KV cache.

Layout (one layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
A token's slot is block_id * block_size + offset; slot -1 marks a padding token.
Query token i of sequence b sits at absolute position seq_lens[b] - q_len_b + i and attends
causally to every cached position <= its own (the cached prefix included).

FP8 KV (cache dtype float8_e4m3fn, per-tensor k_scale / v_scale): read as FP8 and widened to fp16 per tile, or
(a config's FP8_DOT) run on FP8 tensor cores with q and p rounded to e4m3: kernels/attention/fp8_dot.py says how, and
its accuracy. An extend with enough query tokens widens the FP8 pages once into a 16-bit scratch first and runs as a
16-bit cache (kernels/attention/fp8_scratch.py: when, and why the result is the same). The decode kernels are in
kernels/attention/decode.py; tile configs in kernels/attention/config.py; the tile-level pieces in
kernels/attention/tiles.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.attention.config import PREFILL_KEYS, PREFILL_KNOB_DEFAULTS, check_config, prefill_config
from kernels.attention.fp8_dot import FP16_MAX, _quantize_q, fp8_as_f16, interpreted, quantize_kv
from kernels.attention.fp8_scratch import fp8_scratch_plan, widen_to_scratch
from kernels.attention.prefill_gluon import gluon_config, gluon_supported, paged_attention_prefill_gluon
from kernels.attention.tiles import _chunk_tile, _kv_rows, _prefill_tile, _zero_rows
from kernels.fp8 import FP8_DTYPE, FP8_MAX

_LOG2E = 1.4426950408889634


def store_kv_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = quantize_kv(k[valid], k_scale, k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = quantize_kv(v[valid], v_scale, v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, scale: float = 1.0) -> torch.Tensor:
    # [seq_len, kv_heads, head_dim]; an FP8 cache comes back dequantized to fp32
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    kv = cache[block_table[:num_blocks].long()].reshape(-1, *cache.shape[2:])[:seq_len]
    return kv.float() * scale if cache.dtype == FP8_DTYPE else kv


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q [q_len, H, D], k/v [kv_len, KVH, D]; causal with the query block at the end of the kv range
    q_len, num_heads, _ = q.shape
    kv_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    mask = torch.arange(kv_len, device=q.device)[None, :] > q_pos
    scores.masked_fill_(mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def paged_attention_prefill_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [batch + 1]
    seq_lens: torch.Tensor,  # [batch] kv length including the new tokens
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq]
    scale: float,
    max_seqlen_q: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    tile_map: torch.Tensor | None = None,  # [num_tiles, 2] (row, q block); only tokens of listed tiles are computed
    k: torch.Tensor | None = None,  # this step's K / V as the kernel takes them: the cache holds them too (unused)
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        if end == start or seq_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], seq_len, k_scale)
        v = gather_kv(v_cache, block_tables[b], seq_len, v_scale)
        out[start:end] = attend(q[start:end], k, v, scale)
    if tile_map is not None:  # as the kernel: a token no tile covers stays zero
        tile_q = prefill_tile_q(q.shape[1], k_cache.shape[2], q.shape[2], k_cache.dtype, q.device)
        covered = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
        for b, qb in tile_map.tolist():
            if b >= 0:
                covered[cu[b] + qb * tile_q : min(cu[b] + (qb + 1) * tile_q, cu[b + 1])] = True
        out[~covered] = 0
    return out


def prefill_tile_q(num_heads: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> int:
    """Query tokens per prefill program (BLOCK_M // PACK of paged_attention_prefill): the unit of a tile map.
    Give it what the wrapper's tile config depends on (a tuned per-GPU, per-cache-dtype table may set BLOCK_M);
    the wrapper checks that a tile map's unit is its own."""
    group = num_heads // num_kv_heads
    block_m = prefill_config(head_dim, kv_dtype, device)["BLOCK_M"]
    pack = group if (group & (group - 1)) == 0 and group <= block_m // 16 else 1
    return block_m // pack


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, inv_k_scale, inv_v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr, FP8_MAX_C: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:  # saturate: e4m3 has no inf, an out-of-range cast would be NaN
        k = tl.clamp(k.to(tl.float32) * inv_k_scale, -FP8_MAX_C, FP8_MAX_C)
        v = tl.clamp(v.to(tl.float32) * inv_v_scale, -FP8_MAX_C, FP8_MAX_C)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["stride_bt", "num_tokens", "batch"])  # the block-table width follows the batch
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_ptr, seq_lens_ptr, block_tables_ptr, out_ptr,
    qk_scale,  # softmax scale * k_scale * log2(e): the kernel works in base 2
    v_scale,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch,  # cache strides (K and V share one layout)
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8_AS_F16: tl.constexpr,
    OFF64: tl.constexpr,
    tile_map_ptr=None, TILE_MAP: tl.constexpr = False,
    num_tokens=0, batch=0, ZERO_FILL: tl.constexpr = False,
    k_new_desc=None, v_new_desc=None, RAGGED: tl.constexpr = False,
    MASK_FREE: tl.constexpr = False, LPT_GRID: tl.constexpr = False, Q_F16: tl.constexpr = False,
    FP8_DOT: tl.constexpr = False, INTERP: tl.constexpr = False,
):
    # One program: BLOCK_M // PACK query tokens of one sequence x PACK query heads that share one KV head
    # (rows r = token * PACK + head), so each K/V tile is loaded once for the packed heads.
    # Grid (head groups, query blocks, batch), the last query block first: the longest causal rows start
    # first and the short ones fill the tail of the launch. LPT_GRID: (head groups, query blocks x sequences),
    # sequence fastest: every sequence's last (longest) query block before any sequence's second-to-last.
    # ZERO_FILL (out is torch.empty): one more sequence slot, b == batch, writes zeros over the tokens no
    # sequence owns ([0, cu[0]) and [cu[batch], num_tokens): padding), instead of a memset of all of out.
    # RAGGED: keys of this step's own chunk (positions >= the cached prefix) come from the contiguous K/V
    # (k_new_desc / v_new_desc: [num_tokens, kv_heads * head_dim] tensor descriptors), only the prefix from pages.
    # Q_F16 (an FP8 cache): q comes saturated to fp16 already (the wrapper's cast): loaded as is, it stays in shared
    # memory as the dots' operand (a q converted here is reloaded into registers every tile: sm90 TTGIR)
    # FP8_DOT (an FP8 cache): q rounded to e4m3 here with a per-row (token, head) scale from its absmax, folded into
    # the softmax scale; QK^T and PV as e4m3 x e4m3 dots (tiles._softmax_step); INTERP: interpreter only
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    head0 = tl.program_id(0) * PACK
    if TILE_MAP:  # a fixed grid (CUDA graphs): program (h, t, 0) runs tile t = (row, q block); row -1: no tile
        t = tl.program_id(1)
        b = tl.load(tile_map_ptr + 2 * t)
        qb = tl.load(tile_map_ptr + 2 * t + 1)
        num_qb = 1
        if b < 0:
            return
    elif LPT_GRID:
        slots = batch + 1 if ZERO_FILL else batch
        num_qb = tl.num_programs(1) // slots
        qb = num_qb - 1 - tl.program_id(1) // slots
        b = tl.program_id(1) % slots
    else:
        num_qb = tl.num_programs(1)
        qb = num_qb - 1 - tl.program_id(1)
        b = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    if ZERO_FILL:
        if b == batch:  # the padding slot: zeros where no sequence writes
            _zero_rows(out_ptr, qb * BLOCK_Q, tl.load(cu_seqlens_ptr), head0, d, stride_ot, stride_oh, PACK,
                       BLOCK_Q, BLOCK_D, HEAD_DIM, num_qb * BLOCK_Q)
            _zero_rows(out_ptr, tl.load(cu_seqlens_ptr + batch) + qb * BLOCK_Q, num_tokens, head0, d, stride_ot,
                       stride_oh, PACK, BLOCK_Q, BLOCK_D, HEAD_DIM, num_qb * BLOCK_Q)
            return
    kvh = head0 // GROUP
    q_start = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    if qb * BLOCK_Q >= q_len:
        return
    if not ZERO_FILL:
        if seq_len == 0:  # out is zeros already
            return
    ctx = seq_len - q_len  # cached prefix before this chunk
    r = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + r // PACK
    head = head0 + r % PACK
    dmask = d < HEAD_DIM
    rmask = tok < q_len
    q_off = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if FP8_DOT:
        q, q_scale = _quantize_q(q, INTERP)
        row_scale = qk_scale * q_scale  # [BLOCK_M]
    else:
        row_scale = qk_scale
        if FP8_AS_F16 and not Q_F16:  # saturate a bf16 q beyond fp16's range
            q = tl.clamp(q.to(tl.float32), -FP16_MAX, FP16_MAX).to(tl.float16)
    q_pos = ctx + tok
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # a sequence with no keys (seq_len 0; out not zeroed beforehand under ZERO_FILL) runs no tile: zeros
    kv_end = tl.maximum(tl.minimum(seq_len, ctx + (qb + 1) * BLOCK_Q), 0)
    # keys from the pages: all of them, or (RAGGED) the cached prefix only
    kv_pages = tl.maximum(tl.minimum(ctx, kv_end), 0) if RAGGED else kv_end
    # keys below the block's first query position are visible to every row: those tiles skip the mask
    full_end = (tl.maximum(tl.minimum(ctx + qb * BLOCK_Q + 1, kv_pages), 0) // BLOCK_N) * BLOCK_N
    bt = block_tables_ptr + b.to(tl.int64) * stride_bt
    ALIGNED: tl.constexpr = BLOCK_N % BLOCK_SIZE == 0
    # page ids one tile ahead: K/V addresses that wait on a load of the same iteration make Triton's pipeliner
    # single-buffer K/V and issue the next copy after the dots (seen in the sm90 TTGIR)
    offs = tl.arange(0, BLOCK_N)
    page_next = tl.load(bt + offs // BLOCK_SIZE, mask=offs < kv_pages, other=0)
    # (tried: the next tile's QK^T in flight through this tile's softmax lost every case on an H200, matmul-rate
    # fraction plain vs pipelined: extend 8k over 120k 0.68/0.59 bf16 32/4, 0.64/0.60 96/8, 0.48/0.46 fp8;
    # prefill 1k / 4k / 16k 0.35/0.30, 0.57/0.51, 0.70/0.59)
    for n0 in range(0, full_end, BLOCK_N):
        rows = _kv_rows(page_next, n0, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
        nxt = n0 + BLOCK_N + offs
        page_next = tl.load(bt + nxt // BLOCK_SIZE, mask=nxt < kv_pages, other=0)
        m_i, l_i, acc = _prefill_tile(q, k_cache_ptr, v_cache_ptr, rows, n0, kv_pages, q_pos, d, dmask, m_i, l_i,
                                      acc, row_scale, BLOCK_N, False, MASK_FREE, EVEN_D, FP8_DOT, INTERP)
    for n0 in range(full_end, kv_pages, BLOCK_N):
        rows = _kv_rows(page_next, n0, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
        nxt = n0 + BLOCK_N + offs
        page_next = tl.load(bt + nxt // BLOCK_SIZE, mask=nxt < kv_pages, other=0)
        m_i, l_i, acc = _prefill_tile(q, k_cache_ptr, v_cache_ptr, rows, n0, kv_pages, q_pos, d, dmask, m_i, l_i,
                                      acc, row_scale, BLOCK_N, True, False, False, FP8_DOT, INTERP)
    if RAGGED:  # the chunk's own keys j = position - ctx, tiles aligned to the chunk's first token
        c_end = kv_end - kv_pages  # min(q_len, (qb + 1) * BLOCK_Q) for a sequence with keys
        c_full = tl.minimum((qb * BLOCK_Q + 1) // BLOCK_N * BLOCK_N, c_end)  # visible to every row of the block
        col = kvh * HEAD_DIM
        for j0 in range(0, c_full, BLOCK_N):
            m_i, l_i, acc = _chunk_tile(q, k_new_desc, v_new_desc, q_start, col, j0, tok, m_i, l_i, acc, qk_scale,
                                        BLOCK_N, False)
        for j0 in range(c_full, c_end, BLOCK_N):
            m_i, l_i, acc = _chunk_tile(q, k_new_desc, v_new_desc, q_start, col, j0, tok, m_i, l_i, acc, qk_scale,
                                        BLOCK_N, True)
    o = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    o_off = (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


# ---------------------------------------------------------------- checked wrappers


def needs_off64(cache: torch.Tensor) -> bool:
    # element offsets into a cache past int32: 64-bit address math in the kernels (else 32-bit, cheaper)
    return sum((n - 1) * st for n, st in zip(cache.shape, cache.stride())) >= 2**31 - 1


def check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v cache must be [blocks, block_size, kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the kv cache need a contiguous head_dim")
    if k_cache.stride() != v_cache.stride():  # the kernels compute one row offset for both
        raise ValueError(f"k and v caches need the same strides, got {k_cache.stride()} / {v_cache.stride()}")
    if q.shape[-1] != k_cache.shape[3] or q.shape[-2] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not match kv cache {tuple(k_cache.shape)} (GQA needs "
                         "num_heads divisible by num_kv_heads)")
    if k_cache.dtype not in (q.dtype, FP8_DTYPE) or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype} (the cache "
                         f"holds q's dtype or {FP8_DTYPE})")


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"store_kv shapes: k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"cache {tuple(k_cache.shape)}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{num_tokens}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("store_kv needs a contiguous head_dim")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        FP8=k_cache.dtype == FP8_DTYPE, FP8_MAX_C=FP8_MAX,
    )


def ragged_kv_ok(q: torch.Tensor, k_cache: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> bool:
    """Whether this step's K/V [num_tokens, kv_heads, head_dim] can feed the prefill's ragged path: the cache holds
    q's dtype (an FP8 cache is read back as stored, so decode and prefill see the same values), a power-of-two
    head_dim, and a layout a tensor descriptor takes ([num_tokens, kv_heads * head_dim] rows, 16-byte aligned)."""
    if k is None or v is None or k_cache.dtype != q.dtype:
        return False
    head_dim = k_cache.shape[3]
    want = (q.shape[0], k_cache.shape[2], head_dim)
    for x in (k, v):
        if (tuple(x.shape) != want or x.dtype != q.dtype or x.stride(2) != 1 or x.stride(1) != head_dim
                or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16):
            return False
    return head_dim == triton.next_power_of_2(head_dim) and head_dim * k.element_size() >= 16


def gluon_tiles(cfg: dict, head_dim: int, max_seqlen_q: int) -> dict | None:
    """The Gluon kernel's tiles when cfg asks for it ("gluon") and the step's longest query has GLUON_MIN_Q tokens
    (shorter ones: the Triton kernel, ahead of it on an H200 at 1k tokens); None: the Triton kernel."""
    g = gluon_config(cfg, head_dim)
    min_q = cfg.get("GLUON_MIN_Q", PREFILL_KNOB_DEFAULTS["GLUON_MIN_Q"])
    return g if g is not None and max_seqlen_q >= min_q else None


def paged_attention_prefill(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [batch + 1]
    seq_lens: torch.Tensor,  # [batch] kv length including the new tokens
    block_tables: torch.Tensor,  # [batch, max_blocks_per_seq]
    scale: float,
    max_seqlen_q: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    config: dict | None = None,  # tile config (kernels/attention/config.py); None: this GPU's table or the default
    tile_map: torch.Tensor | None = None,  # [num_tiles, 2] int32 (row, q block), row -1 = none: a fixed grid
    k: torch.Tensor | None = None,  # [num_tokens, kv_heads, head_dim]: this step's K/V, already in the cache too;
    v: torch.Tensor | None = None,  # with a config's RAGGED the chunk's keys are read from here (see ragged_kv_ok)
) -> torch.Tensor:
    check_cache(q, k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    if tile_map is not None and (tile_map.dim() != 2 or tile_map.shape[1] != 2 or tile_map.dtype != torch.int32
                                 or not tile_map.is_contiguous()):
        raise ValueError(f"tile_map must be contiguous int32 [num_tiles, 2], got {tile_map.dtype} "
                         f"{tuple(tile_map.shape)}")
    if cu_seqlens_q.shape != (batch + 1,) or block_tables.dim() != 2 or block_tables.shape[0] < batch:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} / block_tables "
                         f"{tuple(block_tables.shape)} do not match batch {batch}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along its last dim")
    cfg = prefill_config(head_dim, k_cache.dtype, q.device) if config is None else config
    if config is not None:
        check_config(cfg, PREFILL_KEYS, head_dim)
    g = gluon_tiles(cfg, head_dim, max_seqlen_q)  # the Gluon FA3-style kernel when the config asks for it
    if g is not None and gluon_supported(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, g, k_scale,
                                         v_scale, tile_map):
        return paged_attention_prefill_gluon(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                             max_seqlen_q, g)
    widened = fp8_scratch_plan(cfg, q, k_cache, block_tables, batch, max_seqlen_q, tile_map)
    if widened:  # an FP8 cache's pages widened once into a 16-bit scratch, run as a 16-bit cache (fp8_scratch.py)
        k_cache, v_cache, block_tables = widen_to_scratch(q, k_cache, v_cache, seq_lens, block_tables, cfg)
        cfg = cfg if config is not None else prefill_config(head_dim, q.dtype, q.device)
        g = gluon_tiles(cfg, head_dim, max_seqlen_q)  # the scratch (fp16) on the Gluon kernel: q in fp16, k_scale in
        # the softmax scale and v_scale on its output, where the Triton kernel applies them
        if g is not None and q.dtype in (torch.bfloat16, torch.float16):
            q16 = q.to(torch.float16, copy=True).clamp_(-FP16_MAX.value, FP16_MAX.value)  # inf -> fp16's max
            if gluon_supported(q16, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, g, 1.0, 1.0, tile_map):
                out = paged_attention_prefill_gluon(q16, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
                                                    scale * k_scale, max_seqlen_q, g)
                return out.float().mul_(v_scale).to(q.dtype)
    # fp16 dots on FP8 values (an FP8 cache widened in the loop, or the scratch) under a 16-bit q
    f16_dots = fp8_as_f16(q, k_cache) or (widened and q.dtype != torch.float32)
    group = num_heads // num_kv_heads
    block_m = cfg["BLOCK_M"]
    pack = group if (group & (group - 1)) == 0 and group <= block_m // 16 else 1
    num_qb = triton.cdiv(max_seqlen_q, block_m // pack)
    # eager grid: out starts empty and the kernel writes every token (zeros where no sequence's rows are);
    # a tile map (a fixed grid, graphs) may leave tokens uncovered: those must read zero, so out starts zeroed
    zero_fill = tile_map is None
    out = torch.empty_like(q) if zero_fill and num_tokens else torch.zeros_like(q)
    if batch == 0 or num_tokens == 0 or (tile_map is None and max_seqlen_q == 0) or (
            tile_map is not None and tile_map.shape[0] == 0):
        return out.zero_() if zero_fill else out
    slots = batch + 1  # the last slot zero-fills the tokens no sequence owns
    lpt = bool(cfg.get("LPT_GRID")) and num_qb * slots <= 65535
    grid = (num_heads // pack, num_qb * slots, 1) if lpt else (num_heads // pack, num_qb, slots)
    if num_qb > 65535 or slots > 65535:
        raise ValueError(f"prefill grid {grid} too large: at most 65535 query blocks and sequences per launch")
    tiles: dict = {}
    if tile_map is not None:  # the grid no longer depends on max_seqlen_q or the batch: one program per tile
        if block_m // pack != prefill_tile_q(num_heads, num_kv_heads, head_dim, k_cache.dtype, q.device):
            raise ValueError("tile map unit (prefill_tile_q) differs from the kernel's BLOCK_M // PACK")
        grid = (num_heads // pack, tile_map.shape[0], 1)
        tiles = dict(tile_map_ptr=tile_map, TILE_MAP=True)
    fp8_dot = bool(cfg.get("FP8_DOT")) and k_cache.dtype == FP8_DTYPE
    # (the scratch always: its launch is then the 16-bit kernel a bf16 cache runs, with q in fp16)
    q_f16 = bool(cfg.get("Q_F16") or widened) and f16_dots and q.dtype != torch.float16 and not fp8_dot
    q_in = q.to(torch.float16).clamp_(-FP16_MAX.value, FP16_MAX.value) if q_f16 else q  # inf -> fp16's max
    ragged: dict = {}
    if cfg.get("RAGGED") and not widened and ragged_kv_ok(q, k_cache, k, v):  # the scratch holds the chunk too
        block_d = [cfg["BLOCK_N"], head_dim]  # one KV head's dims of BLOCK_N consecutive tokens
        ragged = dict(RAGGED=True, k_new_desc=TensorDescriptor(k, [num_tokens, num_kv_heads * head_dim],
                                                               [k.stride(0), 1], block_d),
                      v_new_desc=TensorDescriptor(v, [num_tokens, num_kv_heads * head_dim], [v.stride(0), 1],
                                                  block_d))
    _prefill_kernel[grid](
        q_in, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out,
        scale * k_scale * _LOG2E, v_scale,
        q_in.stride(0), q_in.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, PACK=pack, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], FP8_AS_F16=f16_dots and not fp8_dot,
        OFF64=needs_off64(k_cache),
        num_tokens=num_tokens, batch=batch, ZERO_FILL=zero_fill, MASK_FREE=bool(cfg.get("MASK_FREE")),
        LPT_GRID=lpt and tile_map is None, Q_F16=q_f16, FP8_DOT=fp8_dot, INTERP=fp8_dot and interpreted(),
        **tiles, **ragged,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
