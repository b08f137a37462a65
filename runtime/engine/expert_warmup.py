"""The local experts' start-up warmup under expert parallelism (ModelRunner.warmup_local_experts).

ModelRunner.warmup runs one step per size of kernels/moe_plan.py warmup_token_counts: without EP the experts
see the step's own rows, so that compiles every variant they can meet (DP without EP and TP without EP need
nothing more). Under EP they see the rows the all2all delivered, anywhere from 0 to the dispatcher's
max_received_rows(T) however many tokens the step has, and the collective warmup reaches only a few of those
counts: its rows are all padding (slot -1, ids -1), routed nowhere, so a dynamic exchange delivers 0 rows (the
experts launch nothing) and a static one its ep x C(T) empty slots. The rest would compile while serving, every
rank stalled in lockstep. So each rank then calls its experts alone, on dummy received rows, at every count of
warmup_token_counts up to that bound (the same rule: rows in place of tokens, with the local experts' table's
edges). No collective runs: the ranks need not agree on anything.

CUDA graphs need nothing here: a captured step's exchange has fixed blocks (the sparse backend's static
mode: ep x C(T) rows; allgather: ep x chunk), so the experts inside compiled at capture and a replay never
compiles. What runs eagerly at other counts (a prefill, a dummy step above the graphs, the exact re-run of an
overflowed static step) stays within max_received_rows(max_num_batched_tokens), which this warmup covers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kernels.moe_config import config_edges, get_moe_config
from kernels.moe_plan import experts_variant, experts_workspace_bytes, warmup_token_counts
from models.moe import MoE

logger = logging.getLogger(__name__)


def ep_expert_layers(model: nn.Module) -> list[MoE]:
    """One MoE layer per distinct expert shape among those whose dispatcher moves tokens between ranks (not an
    EP-of-one LocalBackend, whose experts see the step's rows): the kernels' variants follow the shapes, not the
    layer."""
    return _one_per_shape(m for m in model.modules() if isinstance(m, MoE) and _exchanged(m))


def _exchanged(layer: MoE) -> bool:
    # its experts see the rows an all2all delivers, not the step's own
    return layer.dispatcher is not None and layer.ep_size > 1 and not getattr(layer.dispatcher,
                                                                              "combine_is_identity", False)


def _one_per_shape(layers) -> list[MoE]:
    # the kernels' variants and workspace follow the experts' shapes, not the layer
    by_shape: dict[tuple, MoE] = {}
    for m in layers:
        by_shape.setdefault((tuple(m.experts.w13.shape), tuple(m.experts.w2.shape), m.experts.w13.dtype, m.top_k,
                             m.dtype), m)
    return list(by_shape.values())


def received_rows(layer: MoE, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dummy rows as dispatch() hands them to the experts: hidden [N, H] (layer dtype), weights [N, k] fp32,
    local ids [N, k] int32, distinct per row or -1: odd rows keep one slot (the others routed to other ranks),
    every fourth row none (a padding row of a fixed block). The kernels' variants follow the shapes only."""
    device, k, num_local = layer.experts.w13.device, layer.top_k, layer.num_local_experts
    slot, row = torch.arange(k, device=device), torch.arange(num_rows, device=device)[:, None]
    valid = (slot < num_local) & ((row % 2 == 0) | (slot == 0)) & (row % 4 != 3)  # [N, k]
    ids = torch.where(valid, (row + slot) % num_local, -1).to(torch.int32)
    hidden = torch.full((num_rows, layer.hidden_size), 0.01, dtype=layer.dtype, device=device)
    return hidden, torch.full((num_rows, k), 1.0 / k, dtype=torch.float32, device=device), ids


def _dtype(layer: MoE) -> str:
    return "fp8" if layer.experts.w13_scale is not None else str(layer.dtype).removeprefix("torch.")


def _config(layer: MoE, num_rows: int) -> dict:
    # the block config the layer's fused_experts call picks for num_rows rows
    w13, w2 = layer.experts.w13, layer.experts.w2
    return get_moe_config(num_rows, w13.shape[0], w13.shape[2], w2.shape[2], layer.top_k, _dtype(layer), w13.device)


def layer_config_edges(layer: MoE) -> list[int]:
    """The row counts from which the layer's expert config or path may change (kernels/moe_config.py config_edges):
    warmup_token_counts' edges."""
    w13, w2 = layer.experts.w13, layer.experts.w2
    return config_edges(w13.shape[0], w13.shape[2], w2.shape[2], layer.top_k, _dtype(layer), w13.device)


def model_config_edges(model: nn.Module) -> list[int]:
    """layer_config_edges of every expert shape whose experts see the step's own rows (not an EP exchange's, whose
    received rows warmup_row_counts covers): the step warmup's edges (kernels/moe_plan.py warmup_token_counts). The
    same on every rank as long as the ranks' GPUs share a name (shapes and that GPU's tables decide them), so the
    ranks' warmup steps match."""
    layers = _one_per_shape(m for m in model.modules() if isinstance(m, MoE) and not _exchanged(m))
    return sorted({e for layer in layers for e in layer_config_edges(layer)})


def warmup_bytes(layer: MoE, num_rows: int) -> int:
    """Device bytes one warmup call on num_rows rows allocates: its received rows and the experts' workspace."""
    w13, w2 = layer.experts.w13, layer.experts.w2
    itemsize = layer.dtype.itemsize
    inputs = num_rows * (layer.hidden_size * itemsize + 8 * layer.top_k)
    return inputs + experts_workspace_bytes(num_rows, layer.top_k, w13.shape[2], w2.shape[2], w13.shape[0], itemsize,
                                            _config(layer, num_rows), layer.experts.w13_scale is not None)


def _variant(layer: MoE, num_rows: int) -> tuple:
    # what a call on num_rows rows compiles: its path, that path's tiles, the align's constexprs
    return experts_variant(_config(layer, num_rows), num_rows, layer.top_k, layer.num_local_experts)


def warmup_row_counts(layer: MoE, max_num_tokens: int, reserve_bytes: int | None) -> tuple[list[int], list[int]]:
    """(counts to run, counts left out): warmup_token_counts' rule over received rows (0 launches nothing) up to
    the dispatcher's bound for steps of up to max_num_tokens tokens, cut before the first whose call would allocate
    more than reserve_bytes (None: no limit)."""
    assert layer.dispatcher is not None
    counts = warmup_token_counts(layer.dispatcher.max_received_rows(max_num_tokens), layer.top_k,
                                 layer_config_edges(layer))
    fits = [reserve_bytes is None or warmup_bytes(layer, n) <= reserve_bytes for n in counts]
    num_run = fits.index(False) if False in fits else len(counts)
    return counts[:num_run], counts[num_run:]


def ep_experts_bytes(model: nn.Module, max_num_tokens: int) -> int:
    """The most device bytes a step of up to max_num_tokens tokens can ask of one EP layer's local experts: their
    received rows (up to the dispatcher's max_received_rows, ep x the step's tokens at worst) and workspace; 0
    without EP. The memory plan reserves it beside the step's other activations (LLMEngine._activation_reserve):
    under EP it outgrows them (Qwen3-30B-A3B at EP 8, 8192 tokens: 3.3 GiB against 1 GiB for the rest)."""
    return max((warmup_bytes(layer, layer.dispatcher.max_received_rows(max_num_tokens))
                for layer in ep_expert_layers(model)), default=0)


def step_experts_bytes(model: nn.Module, max_num_tokens: int) -> int:
    """The most workspace one MoE layer's experts allocate in a step of up to max_num_tokens tokens where they see
    the step's own rows (no EP exchange: no dispatcher, an EP-of-one, TP's replicated experts), over every step size:
    the path, and so the bytes, change with the tuned table's buckets and a "tma" entry's min_rows (the permuted path
    takes ~2x the aligned one's), so the largest step alone is not the bound. 0 without such layers."""
    best = 0
    for layer in _one_per_shape(m for m in model.modules() if isinstance(m, MoE) and not _exchanged(m)):
        w13, w2, fp8 = layer.experts.w13, layer.experts.w2, layer.experts.w13_scale is not None
        for n in range(1, max_num_tokens + 1):
            best = max(best, experts_workspace_bytes(n, layer.top_k, w13.shape[2], w2.shape[2], w13.shape[0],
                                                     layer.dtype.itemsize, _config(layer, n), fp8))
    return best


def warm_local_experts(model: nn.Module, max_num_tokens: int, reserve_bytes: int | None = None) -> list[int]:
    """Runs each EP layer shape's local experts (Experts.forward, what the MoE layer calls after dispatch) once
    per count of warmup_row_counts, then its dispatcher's local kernels (warm_local_kernels): the memory plan's
    activation reserve (reserve_bytes) bounds the counts, those left out are logged, with a warning where they
    reach a variant the others do not. Returns the counts run (of the last shape); [] without EP."""
    run: list[int] = []
    for layer in ep_expert_layers(model):
        run, left_out = warmup_row_counts(layer, max_num_tokens, reserve_bytes)
        if left_out:
            assert reserve_bytes is not None
            # the (config, align plan) variants only the left-out counts reach: these may compile while serving
            missed = {_variant(layer, n) for n in left_out} - {_variant(layer, n) for n in run}
            log = logger.warning if missed else logger.info
            log("local expert warmup bounded to %d of the %d rows a step of %d tokens can deliver: more would "
                "allocate over the %.2f GiB the memory plan reserves for a step's activations (%.2f GiB at %d rows); "
                "%d kernel variant(s) only those counts reach may compile while serving", run[-1] if run else 0,
                left_out[-1], max_num_tokens, reserve_bytes / 2**30, warmup_bytes(layer, left_out[-1]) / 2**30,
                left_out[-1], len(missed))
        for n in run:
            layer.experts(*received_rows(layer, n))
        layer.dispatcher.warm_local_kernels(layer.hidden_size, layer.top_k, layer.dtype)
        logger.info("local experts warmed up at %d received-row counts up to %d (%s)", len(run),
                    run[-1] if run else 0, type(layer.dispatcher).__name__)
    return run
