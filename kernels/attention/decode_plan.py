"""What a paged decode launch does, from shapes alone (CUDA graphs): its config at a batch size, its split count, the
tile split counts share compiled kernels by, the merge's columns (decode_plan, which kernels/attention/decode.py
launches with), and the compiled variants a range of decode steps can reach (decode_variants: the start-up warmup of
the eager decode steps no CUDA graph holds, runtime/engine/model_runner.py warmup_eager_decode)."""

from __future__ import annotations

import torch
import triton

from kernels.attention.config import DECODE_KEYS, DECODE_KNOB_DEFAULTS, check_config, decode_config, decode_config_for

MAX_SPLITS = 512  # splits per (sequence, KV head); the config's max_splits (default 64) caps the split rule


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int, programs_per_sm: int = 2,
                      min_split_tokens: int = 128, max_splits: int = 64) -> int:
    """Splits per (sequence, kv head): enough programs for programs_per_sm per SM, each with at least
    min_split_tokens tokens of the longest possible context, at most max_splits; shapes only, never tensor values
    (CUDA graphs). One sequence at 4k-32k on 132 SMs: 32-64 splits per KV head, so every SM streams KV; more
    (max_splits up to MAX_SPLITS) give each SM more programs to hide latency with at long context."""
    if not 1 <= max_splits <= MAX_SPLITS:
        raise ValueError(f"max_splits must be in [1, {MAX_SPLITS}], got {max_splits}")
    programs = batch * num_kv_heads
    want = triton.cdiv(programs_per_sm * num_sms, programs)
    return max(1, min(want, triton.cdiv(max_context, min_split_tokens), max_splits))


def decode_plan(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, max_context: int, cfg: dict,
                device: torch.device, num_splits: int | None = None) -> tuple[int, int, int]:
    """(num_splits, SPLITS_PAD, the merge's column width) of a decode launch: its split count (cfg's rule unless
    given), the power-of-two tile that split counts share compiled kernels by (1: no partials), and the merge's
    BLOCK_D. Shapes only (CUDA graphs); launch_decode runs it, decode_variants enumerates it."""
    num_sms = _num_sms(device)
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, max_context, num_sms, cfg["programs_per_sm"],
                                       cfg["min_split_tokens"], cfg["max_splits"])
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    # split counts share compiled kernels: 1 (no partials), then one per power of two (the merge's tile); the
    # split kernel itself needs the tile only when it merges (fused), so two-launch runs compile it twice at most
    # (SPLITS_PAD 1 and 2)
    splits_pad = 1 if num_splits == 1 else max(2, triton.next_power_of_2(num_splits))
    # few (sequence, head) pairs (small batch): split the merge's columns too, so it is not a few SMs each reading
    # [splits, head_dim] partials one after the other (merge_block_d > 0: the config's column width instead)
    block_d = triton.next_power_of_2(head_dim)
    auto_d = block_d if batch * num_heads >= num_sms else min(block_d, 32)
    merge_d = min(block_d, cfg["merge_block_d"]) if cfg["merge_block_d"] else auto_d
    return num_splits, splits_pad, merge_d


def merge_fused(cfg: dict, num_splits: int) -> bool:
    """Whether a launch of num_splits splits merges them in the split kernel (the last split of each sequence and KV
    head, one launch) rather than in a second one: the config's fused_merge_max_splits (0: never)."""
    return 1 < num_splits <= cfg["fused_merge_max_splits"]


# what launch_decode compiles
_COMPILED_KNOBS = ("BLOCK_N", "num_warps", "num_stages", "fp8_dot", "fp8_widen", "fp8_q2", "early_inputs")


def decode_variant(rows: int, width: int, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   kv_dtype: torch.dtype, device: torch.device, fused_rows: int = 0) -> tuple:
    """What a decode step of `rows` sequences with block tables `width` pages wide compiles: the config's
    tiles and kernel knobs, the split kernel's SPLITS_PAD (1 at one split, 2 with a second launch, the merge's
    tile when the split kernel merges: merge_fused), the second launch's SPLITS_PAD and BLOCK_D (None without
    one), and whether the step has at most fused_rows rows (the model's fused-prologue limit: a variant of its
    own)."""
    cfg = decode_launch_config(head_dim, kv_dtype, device, rows)
    splits, splits_pad, merge_d = decode_plan(rows, num_heads, num_kv_heads, head_dim, width * block_size, cfg,
                                              device)
    tiles = tuple(cfg[k] for k in _COMPILED_KNOBS)  # the rest of the config acts through decode_plan
    if merge_fused(cfg, splits):
        return tiles, splits_pad, None, rows <= fused_rows
    return tiles, min(splits_pad, 2), (splits_pad, merge_d) if splits > 1 else None, rows <= fused_rows


def decode_variants(rows: range, widths: int, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    kv_dtype: torch.dtype, device: torch.device, fused_rows: int = 0) -> dict[tuple, tuple[int, int]]:
    """Every decode_variant that steps of `rows` sequences reach with block tables up to `widths` pages wide:
    {variant: (rows, pages)}, the smallest such shape for each (a start-up warmup runs one step per variant:
    runtime/engine/model_runner.py warmup_eager_decode). The split count depends on the width only through
    cdiv(width * block_size, min_split_tokens), capped: widths of powers of two and the widest reach every
    power-of-two class the cap allows."""
    pages = sorted({1 << i for i in range(max(1, widths).bit_length()) if 1 << i <= widths} | {max(1, widths)})
    small_batch = decode_config(head_dim, kv_dtype, device)["small_batch"]
    shape = (block_size, num_heads, num_kv_heads, head_dim, kv_dtype, device, fused_rows)
    variants: dict[tuple, tuple[int, int]] = {}
    for n in rows:
        for w in pages:  # widest last
            key = decode_variant(n, w, *shape)
            variants.setdefault(key, (n, w))
        # one split at the widest: so at every width and every larger n, whose config no longer changes
        if n > max(fused_rows, small_batch) and key[1] == 1:
            break
    return variants


def decode_config_splits(cfg: dict, batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    # the split rule of a decode config (kernels/attention/config.py) at this batch (its small-batch config there)
    cfg = decode_config_for(cfg, batch)
    return decode_num_splits(batch, num_kv_heads, max_context, num_sms, cfg["programs_per_sm"],
                             cfg["min_split_tokens"], cfg["max_splits"])


def decode_launch_config(head_dim: int, kv_dtype: torch.dtype, device: torch.device, batch: int,
                         config: dict | None = None) -> dict:
    """The decode config a launch of `batch` sequences runs: config (checked) or this GPU's table / the default, its
    small-batch config at batch <= small_batch (kernels/attention/config.py)."""
    if config is None:
        cfg = decode_config(head_dim, kv_dtype, device)
    else:
        cfg = {**DECODE_KNOB_DEFAULTS, **config}  # a config written before a knob existed runs as it did
        check_config(cfg, DECODE_KEYS, head_dim)
    return decode_config_for(cfg, batch)
