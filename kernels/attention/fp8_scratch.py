"""FP8 KV cache -> a 16-bit scratch, once per extend step, so the prefill kernel runs 16-bit tiles over a long prefix.

Why: the prefill kernel (kernels/attention/prefill.py) widens every FP8 K/V tile to fp16 inside its loop, and every
program (BLOCK_M query rows: BLOCK_M // PACK tokens x PACK heads of one KV head) widens the whole cached prefix again:
an 8k chunk over a 120k prefix (Qwen3-30B-A3B heads) widens each cached element 512 times, ALU work as large as the
MMA work (H200: 51.6 ms vs 36.5 ms on a bf16 cache). As vLLM's MLA and FlashInfer's backends do for chunked prefill,
the wrapper instead widens the batch's cached pages once into a scratch laid out as a paged cache (sequence row b's
page j at scratch page b * width + j, width = the block table's), then runs the 16-bit kernel over it.

Exactness: the scratch holds the e4m3 values unscaled, as fp16 (every e4m3 value is an fp16 value: 3 mantissa bits,
exponents 2^-9..2^8), or in q's dtype under a float32 q (the CPU tests), exactly what the in-loop widening produces;
k_scale / v_scale stay where the kernel applies them (k_scale in the softmax scale, v_scale on the output) and q is
cast to fp16 as on an FP8 cache. The widened launch therefore computes on the same values in the same order: its
output equals the in-loop path's bit for bit when both run the same BLOCK_M / BLOCK_N (num_warps, num_stages,
MASK_FREE, LPT_GRID change no arithmetic), and within fp rounding (the online softmax's tile boundaries) otherwise.
Where q's dtype's entry sets "gluon" (H200: from GLUON_MIN_Q query tokens) the scratch runs the Gluon kernel
(kernels/attention/prefill.py): its own tiles, its output rounded to fp16 before v_scale, so within fp rounding too.

When it pays (fp8_scratch_plan): per cached element, widening once costs ~3 bytes of traffic (e4m3 read, fp16 write),
~0.6 ps at an H200's ~4.8 TB/s (the kernel then reads 2 bytes instead of 1, from L2 mostly: its programs share the
prefix); the in-loop widening costs ~0.23 ps per element per program that reads it (measured: (51.6 - 36.5) ms over
512 programs x 126M elements). A KV element is read by GROUP * q_len / BLOCK_M programs (GROUP query heads per KV
head), 8 * q_len / 128 at Qwen3's 32 / 4 heads: break-even near 3 programs (q_len ~48); FP8_SCRATCH_MIN_Q (prefill
config, default 256: ~16 programs per element, GLM-4.5-Air's 96 / 8 heads ~24) leaves a margin for short prefixes,
where the launch itself costs. The step's longest query is the rule's input (the wrapper knows no other per-sequence
length without a device sync): every row of such a step is widened. The scratch (rows x width pages of K and V) is
capped at FP8_SCRATCH_MAX_TOKENS tokens (default 262144: one 128k sequence plus a lockstep padding row; Qwen3-30B-A3B:
512 MiB, GLM-4.5-Air: 1 GiB at TP 1): a larger step keeps the in-loop widening. The scratch is allocated on first use
and grown; the KV memory plan keeps its largest size free (scratch_reserve_bytes).

CUDA graphs: the mixed-step graphs replay the prefill over a fixed tile map (tile_map); that path never widens (the
scratch size follows the step's block table), nor does anything under stream capture, so no graph holds a scratch
pointer and a grown scratch may free the old one (unlike kernels.zeroed_counters' buffers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.config import PREFILL_KNOB_DEFAULTS, prefill_config
from kernels.fp8 import FP8_DTYPE

_SCRATCH: dict = {}  # (device, dtype, page shape) -> (k/v scratch [2, pages, block_size, kv_heads, head_dim], ids)
_PAGES_PER_PROGRAM = 4
_Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PagedKv = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # k cache, v cache, block tables


def scratch_dtype(q_dtype: torch.dtype) -> torch.dtype:
    # fp16 for a 16-bit q (the FP8 path's dots run in fp16, fp8_dot.fp8_as_f16); q's own dtype otherwise (fp32)
    return torch.float16 if q_dtype in (torch.bfloat16, torch.float16) else q_dtype


def fp8_scratch_plan(cfg: dict, q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, batch: int,
                     max_seqlen_q: int, tile_map: torch.Tensor | None) -> bool:
    """Whether this prefill widens its FP8 pages into the scratch first (module docstring: when it pays)."""
    knobs = {**PREFILL_KNOB_DEFAULTS, **cfg}
    min_q, max_tokens = knobs["FP8_SCRATCH_MIN_Q"], knobs["FP8_SCRATCH_MAX_TOKENS"]
    if (k_cache.dtype != FP8_DTYPE or cfg.get("FP8_DOT") or tile_map is not None or min_q <= 0 or batch == 0
            or q.shape[0] == 0 or max_seqlen_q < min_q or q.dtype not in _Q_DTYPES):
        return False
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return batch * block_tables.shape[1] * k_cache.shape[1] <= max_tokens


def _grown_pages(need: int, max_pages: int) -> int:
    # the scratch's size for a need of pages: a power of two, at most max_pages (0: no cap) unless the need is larger
    return max(need, min(triton.next_power_of_2(need), max_pages or need))


def scratch_pages(rows: int, width: int, page_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  max_pages: int = 0) -> PagedKv:
    """(k scratch, v scratch [rows * width, *page_shape], block table [rows, width] int32: row b -> pages
    b * width ...): one buffer per (device, dtype, page shape), reused by every layer (they run in stream order)
    and grown to a power of two of pages (at most max_pages, the cap, unless the need is larger), so a long
    prompt's growing prefix reallocates it a few times only."""
    key = (device, dtype, tuple(page_shape))
    need = rows * width
    buf, ids = _SCRATCH.get(key, (None, None))
    if buf is None or buf.shape[1] < need:
        pages = _grown_pages(need, max_pages)
        _SCRATCH.pop(key, None)  # free the old one first: never graph-captured (module docstring)
        buf = torch.empty((2, pages, *page_shape), dtype=dtype, device=device)
        ids = torch.arange(pages, dtype=torch.int32, device=device)
        _SCRATCH[key] = (buf, ids)
    return buf[0, :need], buf[1, :need], ids[:need].view(rows, width)


def scratch_reserve_bytes(block_size: int, num_kv_heads: int, head_dim: int, q_dtype: torch.dtype, max_pages: int,
                          device: torch.device | None = None) -> int:
    """The most memory the scratch can take under an FP8 cache of this page shape (this rank's KV heads) when no
    step's block tables hold more than max_pages pages (rows x width), at this device's prefill config: what the KV
    memory plan keeps free for it (scratch_pages' growth: a power of two of pages, at most the cap)."""
    knobs = {**PREFILL_KNOB_DEFAULTS, **prefill_config(head_dim, FP8_DTYPE, device)}
    cap_pages = knobs["FP8_SCRATCH_MAX_TOKENS"] // block_size
    if knobs["FP8_SCRATCH_MIN_Q"] <= 0 or knobs.get("FP8_DOT") or cap_pages == 0 or max_pages <= 0:
        return 0
    pages = _grown_pages(min(max_pages, cap_pages), cap_pages)  # a step past the cap widens nothing
    return 2 * pages * block_size * num_kv_heads * head_dim * scratch_dtype(q_dtype).itemsize


def widen_kv_pages_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                       block_tables: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    # pages [0, ceil(seq_lens[b] / block_size)) of row b, as stored, widened to the scratch's dtype at page
    # b * width + j (width = block_tables.shape[1]); the scratch's other pages are left as they are
    block_size, width = k_cache.shape[1], block_tables.shape[1]
    for b, seq_len in enumerate(seq_lens.tolist()):
        n = -(-seq_len // block_size)
        src = block_tables[b, :n].long()
        k_out[b * width : b * width + n] = k_cache[src].to(k_out.dtype)
        v_out[b * width : b * width + n] = v_cache[src].to(v_out.dtype)


@triton.jit(do_not_specialize=["stride_bt", "width"])  # the block-table width follows the step: one variant for all
def _widen_pages_kernel(
    k_ptr, v_ptr, k_out_ptr, v_out_ptr, seq_lens_ptr, block_tables_ptr, stride_bt, width,
    stride_cb, stride_cs, stride_ch,  # the cache's strides (K and V share them; head_dim contiguous)
    stride_ob, stride_os, stride_oh,  # the scratch's
    BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGES: tl.constexpr,
):
    # one program: PAGES pages of row b (grid: (cdiv(width, PAGES), rows)); a page's BLOCK_SIZE x NUM_KV_HEADS rows
    # of head_dim values go BLOCK_R rows at a time. Bandwidth-bound: 1 byte read, 2 (or 4) written per value.
    b = tl.program_id(1)
    num_pages = tl.cdiv(tl.load(seq_lens_ptr + b), BLOCK_SIZE)
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    ROWS: tl.constexpr = BLOCK_SIZE * NUM_KV_HEADS
    for i in tl.static_range(PAGES):
        p = tl.program_id(0) * PAGES + i
        if p < num_pages:
            page = tl.load(block_tables_ptr + b.to(tl.int64) * stride_bt + p).to(tl.int64)
            dst = b.to(tl.int64) * width + p
            for r0 in tl.static_range(0, ROWS, BLOCK_R):
                row = r0 + r
                slot, head = row // NUM_KV_HEADS, row % NUM_KV_HEADS
                mask = (row < ROWS)[:, None] & (d < HEAD_DIM)[None, :]
                src = page * stride_cb + (slot * stride_cs + head * stride_ch)[:, None] + d[None, :]
                out = dst * stride_ob + (slot * stride_os + head * stride_oh)[:, None] + d[None, :]
                k = tl.load(k_ptr + src, mask=mask)
                v = tl.load(v_ptr + src, mask=mask)  # both loads in flight before the stores
                tl.store(k_out_ptr + out, k.to(k_out_ptr.dtype.element_ty), mask=mask)
                tl.store(v_out_ptr + out, v.to(v_out_ptr.dtype.element_ty), mask=mask)


def widen_kv_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                   block_tables: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """k_cache / v_cache [num_blocks, block_size, kv_heads, head_dim] (FP8, or any dtype) -> k_out / v_out
    [>= rows * width, block_size, kv_heads, head_dim] in their dtype, values as stored (no scale): the pages
    [0, ceil(seq_lens[b] / block_size)) of row b through block_tables [rows, width] to pages b * width + j."""
    rows, width = block_tables.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k/v caches must be [blocks, block_size, kv_heads, head_dim] with one layout, got "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if k_out.shape[1:] != k_cache.shape[1:] or k_out.shape != v_out.shape or k_out.stride() != v_out.stride() \
            or k_out.shape[0] < rows * width or k_out.dtype != v_out.dtype:
        raise ValueError(f"scratch {tuple(k_out.shape)} / {tuple(v_out.shape)} does not hold {rows} x {width} pages "
                         f"of {tuple(k_cache.shape[1:])}")
    if k_cache.stride(3) != 1 or k_out.stride(3) != 1 or block_tables.stride(1) != 1:
        raise ValueError("widen_kv_pages needs a contiguous head_dim and block-table rows")
    if seq_lens.shape != (rows,):
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} does not match block_tables {tuple(block_tables.shape)}")
    if rows == 0 or width == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    block_d = triton.next_power_of_2(head_dim)
    block_r = min(triton.next_power_of_2(block_size * num_kv_heads), max(1, 8192 // block_d))
    _widen_pages_kernel[(triton.cdiv(width, _PAGES_PER_PROGRAM), rows)](
        k_cache, v_cache, k_out, v_out, seq_lens, block_tables, block_tables.stride(0), width,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        BLOCK_SIZE=block_size, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d,
        PAGES=_PAGES_PER_PROGRAM, num_warps=4,
    )


def widen_to_scratch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, cfg: dict | None = None) -> PagedKv:
    """The batch's pages widened into the scratch: (k, v [rows * width, block_size, kv_heads, head_dim] in
    scratch_dtype(q.dtype), block table [rows, width] int32), a paged cache the prefill kernel takes as is; the
    scratch grows to cfg's FP8_SCRATCH_MAX_TOKENS at most (unless this step needs more)."""
    rows = seq_lens.shape[0]
    max_tokens = {**PREFILL_KNOB_DEFAULTS, **(cfg or {})}["FP8_SCRATCH_MAX_TOKENS"]
    k16, v16, table = scratch_pages(rows, block_tables.shape[1], tuple(k_cache.shape[1:]), scratch_dtype(q.dtype),
                                    q.device, max_tokens // k_cache.shape[1])
    widen_kv_pages(k_cache, v_cache, seq_lens, block_tables[:rows], k16, v16)
    return k16, v16, table
