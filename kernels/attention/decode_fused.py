"""Decode attention with the attention prologue fused in: from the QKV projection's rows, one launch (plus the split
merge) does what kernels/attention/qkv_prologue.py and kernels/attention/decode.py do in two.

At batch 1 every launch of a decode layer costs ~1.5-3 us of fixed latency on an H200, more than the prologue's own
work (benchmarks/RESULTS.md, sessions 8 and 9). Here each decode program (sequence, KV head, split) builds its GROUP
q heads from the raw row (q/k RMSNorm, RoPE: kernels/attention/prologue_rows.py, the prologue's numerics), and the
KV head's k / v of the new token: the split whose share of the context holds the new token (position seq_len - 1)
stores them into the paged cache (bf16, or FP8 with the prologue's saturating quantization), and every program
takes that token's row of its K / V tile from registers, never from the cache: the loads stop before it, so no
program reads what this launch writes. A split that does not own it never reaches that position.

Bit for bit the two launches (tests/test_decode_fused.py: the interpreter; on the GPU at Qwen3-30B-A3B shapes): the q /
k / v values are the prologue's operation for operation, and the two steps whose result the compiler could make
depend on a kernel's tile layout are pinned down in both kernels (kernels/attention/prologue_rows.py: the RMS
statistic summed in fp64, exact for 16-bit values; RoPE by explicit FMAs); the attention's tiles are the plain
kernel's, the new token's one after the loop (sm90, no spills and the plain kernel's shared memory; registers at
BLOCK_N 64 / 32: 166 / 128 against 116 / 80; an FP8 cache's widening path at the H200 table's BLOCK_N 128: 255 against
196).

An FP8 cache whose decode config runs FP8 tensor-core dots (fp8_dot, the H200 table's FP8-KV decode): the fused
kernel has that path too (the new token's tile peeled the same way, e4m3 dots on it; bit for bit the two launches in
the interpreter), but it runs only with FUSED_FP8_DOT on, which is off: measured on an H200 (session 11) it loses
at B=1 and B=64 (FP8-KV step 2.75 -> 2.81, 16.55 -> 16.66 ms) and wins 0.06 ms at B=8; off, this runs the separate
prologue, then the decode kernel.
"""

from __future__ import annotations

import torch

from kernels.attention.decode import check_tables, launch_decode, paged_attention_decode, paged_attention_decode_ref
from kernels.attention.decode_plan import decode_launch_config
from kernels.attention.prefill import check_cache
from kernels.attention.qkv_prologue import check_prologue, qkv_prologue, qkv_prologue_ref
from kernels.fp8 import FP8_DTYPE


def paged_attention_decode_fused_ref(
    qkv: torch.Tensor,  # [batch, (num_heads + 2 * num_kv_heads) * head_dim]: one new token per sequence
    positions: torch.Tensor,  # [batch]
    cos_sin: torch.Tensor,  # [max_positions, rotary_dim] fp32
    q_norm_weight: torch.Tensor | None,  # [head_dim]; None (with k_norm_weight None): no q/k norm
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [batch], -1: padding row (with seq_len 0)
    seq_lens: torch.Tensor,  # [batch], the new token included; 0 = padding row, output zeros
    block_tables: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The two steps it fuses: the prologue's stores, then attention over the cache. [batch, num_heads, head_dim]"""
    q = qkv_prologue_ref(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                         k_scale, v_scale)
    return paged_attention_decode_ref(q, k_cache, v_cache, seq_lens, block_tables, scale, k_scale, v_scale)


# the fused launch for decode configs running FP8 tensor-core dots (fp8_dot): off, it lost on an H200 (above)
FUSED_FP8_DOT = False


def _has_fused_variant(cfg: dict, kv_dtype: torch.dtype) -> bool:
    # a decode config (decode_launch_config) that runs the FP8 tensor-core dots (fp8_dot): only with FUSED_FP8_DOT
    return kv_dtype != FP8_DTYPE or not cfg["fp8_dot"] or FUSED_FP8_DOT


def fused_decode_supported(head_dim: int, kv_dtype: torch.dtype, device: torch.device, batch: int,
                           config: dict | None = None) -> bool:
    """Whether paged_attention_decode_fused runs one fused launch at this batch (else the separate prologue)."""
    return _has_fused_variant(decode_launch_config(head_dim, kv_dtype, device, batch, config), kv_dtype)


def paged_attention_decode_fused(
    qkv: torch.Tensor,  # [batch, (num_heads + 2 * num_kv_heads) * head_dim]: one new token per sequence
    positions: torch.Tensor,  # [batch]
    cos_sin: torch.Tensor,  # [max_positions, rotary_dim] fp32, cos then sin (kernels/rope.py)
    q_norm_weight: torch.Tensor | None,  # [head_dim]; None (with k_norm_weight None): no q/k norm
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [batch], -1: padding row (with seq_len 0)
    seq_lens: torch.Tensor,  # [batch], the new token included; 0 = padding row, output zeros
    block_tables: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    num_splits: int | None = None,
    fused_merge: bool | None = None,  # None: as the config says (decode_plan.merge_fused)
    config: dict | None = None,  # decode tile config (kernels/attention/config.py); None: this GPU's table
) -> torch.Tensor:
    num_heads, _, head_dim = check_prologue(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, k_cache, v_cache,
                                            slot_mapping)
    batch = qkv.shape[0]
    check_cache(qkv.unflatten(1, (-1, head_dim)), k_cache, v_cache)  # the strides K and V share
    check_tables(seq_lens, block_tables, batch)
    cfg = decode_launch_config(head_dim, k_cache.dtype, qkv.device, batch, config)
    if not _has_fused_variant(cfg, k_cache.dtype):
        q = qkv_prologue(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                         k_scale, v_scale)
        return paged_attention_decode(q, k_cache, v_cache, seq_lens, block_tables, scale, k_scale, v_scale,
                                      num_splits, fused_merge, config)
    out = torch.empty(batch, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if batch == 0:
        return out
    half = cos_sin.shape[1] // 2  # rotary channels per half; past 2 * half: normed, not rotated
    qk_norm = q_norm_weight is not None
    prologue = dict(
        pos_ptr=positions, cs_ptr=cos_sin, qw_ptr=q_norm_weight if qk_norm else cos_sin,  # unused without the norm
        kw_ptr=k_norm_weight if qk_norm else cos_sin, slot_ptr=slot_mapping, eps=eps, inv_k_scale=1.0 / k_scale,
        inv_v_scale=1.0 / v_scale, stride_cos=cos_sin.stride(0),
        PROLOGUE=True, HALF=half, QK_NORM=qk_norm, FP8_KV=k_cache.dtype == FP8_DTYPE,
    )
    launch_decode(qkv, out, k_cache, v_cache, seq_lens, block_tables, scale, k_scale, v_scale, num_splits,
                  fused_merge, cfg, prologue)
    return out
