"""Grammar masks on the logits: tokens whose bit is 0 in a row's packed bitmask get -inf, in place.

The bitmask is llguidance's / xgrammar's layout: int32 words [num_masked_rows, ceil(vocab / 32)], bit j of
word w allows token 32 * w + j. Only the constrained rows of the batch are listed (rows), so an
unconstrained neighbour costs nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def apply_token_bitmask_ref(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [num_seqs, vocab] (masked in place); rows [n] int; bitmask [n, num_words] int32."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1).bool()  # [n, 32 * num_words]
    if allowed.shape[1] < vocab:  # tokens past the mask are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    index = rows.long()
    logits[index] = logits[index].masked_fill(~allowed[:, :vocab], float("-inf"))


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, rows_ptr, mask_ptr, VOCAB, NUM_WORDS, stride_l, stride_m,
                                BLOCK: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < VOCAB
    word_ids = tokens // 32
    words = tl.load(mask_ptr + r * stride_m + word_ids, mask=in_vocab & (word_ids < NUM_WORDS), other=0)
    bits = (words >> (tokens % 32)) & 1
    tl.store(logits_ptr + row * stride_l + tokens, float("-inf"), mask=in_vocab & (bits == 0))


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Same as apply_token_bitmask_ref; one program per (masked row, 4096 tokens), writes only the -inf."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [num_seqs, vocab] with contiguous rows, got {tuple(logits.shape)}")
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.stride(1) != 1:
        raise ValueError(f"bitmask must be contiguous int32 [rows, words], got {bitmask.dtype} {tuple(bitmask.shape)}")
    if rows.dim() != 1 or rows.shape[0] != bitmask.shape[0]:
        raise ValueError(f"rows [{tuple(rows.shape)}] must list one logits row per bitmask row ({bitmask.shape[0]})")
    if not (logits.device == rows.device == bitmask.device):
        raise ValueError("logits, rows and bitmask must be on one device")
    n, vocab = rows.shape[0], logits.shape[1]
    if n == 0:
        return
    block = 4096
    _apply_token_bitmask_kernel[(n, triton.cdiv(vocab, block))](
        logits, rows, bitmask, vocab, bitmask.shape[1], logits.stride(0), bitmask.stride(0), BLOCK=block,
        num_warps=4)
