"""What a fused_experts call (kernels/fused_moe.py) will do, from shapes and its config alone: the path it takes,
what it compiles, the token counts whose start-up steps compile every variant, the workspace it allocates. Read by
fused_experts itself, the engine's warmup and memory plan (runtime/engine) and the tests."""

from __future__ import annotations

import json
from collections.abc import Iterable

import triton

from kernels.fp8 import FP8_BLOCK
from kernels.moe_align import align_plan, align_token_ranges, max_blocks


def experts_path(config: dict, num_tokens: int, top_k: int, tma_ok: bool = True) -> str:
    """The path fused_experts takes for num_tokens rows under a config: "tma", the permuted TMA-fed one of a "tma"
    entry (only where a tuned table measured it) from its min_rows (tma_ok: the shapes allow it, tma_supported);
    "gemv", the per-pair GEMVs of a "gemv" entry up to its max_tokens (no align); else "aligned"."""
    tma = config.get("tma")
    if tma is not None and tma_ok and num_tokens * top_k >= tma["min_rows"]:
        return "tma"
    if config.get("gemv") and num_tokens <= config["gemv"].get("max_tokens", 1):
        return "gemv"
    return "aligned"


def experts_variant(config: dict, num_tokens: int, top_k: int, num_experts: int) -> tuple:
    """What a fused_experts call on num_tokens rows compiles (its kernels' constexprs follow it): the path, that
    path's tiles and the align's constexprs (align_plan; BLOCK_M is in the tiles; none for one token or the GEMV)."""
    path = experts_path(config, num_tokens, top_k)
    if path == "gemv":
        return path, json.dumps(config["gemv"], sort_keys=True)
    if path == "tma":  # (its align runs for one token too)
        tiles, plan = config["tma"], align_plan(num_tokens * top_k, num_experts)
    else:
        tiles = {k: v for k, v in config.items() if k not in ("tma", "gemv")}
        plan = align_plan(num_tokens * top_k, num_experts) if num_tokens > 1 else ()
    return path, json.dumps(tiles, sort_keys=True), *plan


def warmup_token_counts(max_tokens: int, top_k: int, edges: Iterable[int] = ()) -> list[int]:
    """Token counts whose steps, run once at start-up, compile every variant of the MoE kernels a server can
    hit up to max_tokens. A variant (experts_variant) is the config's bucket, the path and the align's constexprs
    (kernels/moe_align.py align_plan), each constant over ranges of token counts, so it is constant from the
    largest of their first counts on: the align's (align_token_ranges, first and last, for every expert count that
    sets another chunk cap) are taken here, the config's and path's are edges (kernels/moe_config.py config_edges,
    for each expert shape). Without edges a power of two stands in for them: it lands in every bucket range at
    least 2x wide, but not in one a tma entry's min_rows cuts short. Every other per-step size is a runtime
    argument."""
    counts = {1 << i for i in range(max_tokens.bit_length())} | set(edges)
    for num_experts in (16 << i for i in range(8)):  # E_PAD 16 .. 2048: each chunk cap (past 2048 it stays 16)
        counts |= {m for r in align_token_ranges(max_tokens, top_k, num_experts) for m in r}
    counts.add(max_tokens)
    return sorted(c for c in counts if 1 <= c <= max_tokens)


def experts_workspace_bytes(num_tokens: int, top_k: int, hidden: int, inter: int, num_experts: int, itemsize: int,
                            config: dict, fp8: bool) -> int:
    """Bytes a fused_experts call on num_tokens rows allocates (the GEMV path takes less): the align's outputs (its
    chunk counts, a few KiB, aside), the gate_up output and the sum; on the align path the per-pair down output, on
    the permuted one (config "tma" from its min_rows: kernels/moe_grouped_tma.py, Triton or Gluon) the permuted
    tokens, their inverse and the per-row down output, all rows padded to the sorted positions (Qwen3-30B-A3B at
    8192 tokens: 0.83 GB against the align path's 0.43); with FP8 activations their quantized copies and scales."""
    pairs, tma = num_tokens * top_k, config.get("tma")
    permuted = experts_path(config, num_tokens, top_k) == "tma"  # (a call tma_supported refuses: less)
    bm = tma["BLOCK_M"] if permuted else config["BLOCK_M"]
    rows = max_blocks(pairs, num_experts, bm) * bm  # sorted positions: the gate_up output's rows
    total = 4 * (rows + rows // bm + 1) + (rows * inter + num_tokens * hidden) * itemsize
    if permuted:  # the permuted tokens (FP8: e4m3 with their scales), their inverse, the per-row down output
        a_perm = rows * (hidden + 4 * triton.cdiv(hidden, FP8_BLOCK)) if fp8 else rows * hidden * itemsize
        total += a_perm + 4 * pairs + rows * hidden * itemsize
    else:
        total += pairs * hidden * itemsize
    if fp8 and (permuted or config.get("act_fp8", True)):  # e4m3 copies and one fp32 scale per 128 channels
        total += num_tokens * (hidden + 4 * triton.cdiv(hidden, FP8_BLOCK)) + rows * (inter + 4 * triton.cdiv(
            inter, FP8_BLOCK))
    return total
