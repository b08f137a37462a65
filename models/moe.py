"""The MoE layer: router -> (EP dispatch) -> fused experts -> (EP combine) [+ shared experts].

Under tensor parallelism without EP every TP rank holds all experts with 1/TP of their intermediate size and
returns a partial sum (all-reduced once, together with the shared experts' partial sum). With EP the experts
are split over the whole DP x TP world and are not TP-split; the TP ranks of one DP rank hold the same tokens,
so each routes and dispatches only its 1/TP slice of them and the slices are all-gathered after the combine:
no expert computes a token twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fused_moe as fused_moe_kernels
from kernels import router as router_kernels
from kernels.fp8 import FP8_BLOCK, FP8_DTYPE
from kernels.moe_sum import TopKSlots
from kernels.router_fused import FUSED_MAX_TOKENS, FUSED_MAX_TOKENS_FP32, route_fused, route_fused_norm
from kernels.router_norm import FUSED_NORM_MAX_TOKENS, norm_layout
from models.args import ModelArgs, TensorParallel
from models.forward_batch import ForwardBatch
from models.layers import MLP, Checkpoint, pick_kernel
from models.parallel_layers import LoadError, Source, divide

if TYPE_CHECKING:
    from runtime.distributed.all2all import All2AllBackend


@dataclass(frozen=True)
class RoutingSpec:
    num_experts: int  # global
    top_k: int
    renormalize: bool
    scoring: str = "softmax"  # softmax (Qwen3-MoE, Mixtral) | sigmoid_grouped (GLM-4.5)
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0


class Router(nn.Module):
    def __init__(self, hidden_size: int, routing: RoutingSpec, args: ModelArgs) -> None:
        super().__init__()
        self.routing = routing
        # GLM keeps the router in fp32 (as transformers does); its correction bias only steers the choice
        grouped = routing.scoring == "sigmoid_grouped"
        self.weight = nn.Parameter(
            torch.empty(routing.num_experts, hidden_size, dtype=torch.float32 if grouped else args.dtype),
            requires_grad=False,
        )
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(routing.num_experts, dtype=torch.float32), requires_grad=False)
            if grouped else None
        )
        name = "topk_sigmoid_grouped" if grouped else "topk_softmax"
        self._route = pick_kernel(router_kernels, name, args.use_triton)
        self._route_fused = route_fused if args.use_triton else None  # GEMM + top-k in one launch, decode sizes
        self._fused_max_tokens = FUSED_MAX_TOKENS_FP32 if grouped else FUSED_MAX_TOKENS

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None,
                ids_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # slots [T]: rows with slot < 0 are padding and get expert ids -1, in the top-k kernel itself; ids_out
        # [T, k] int32: where the fused kernel may write the ids (the expert statistics' step buffer)
        r = self.routing
        if self._route_fused is not None and x.shape[0] <= self._fused_max_tokens:
            return self._route_fused(x, self.weight, r.top_k, r.renormalize, slots, self.e_score_correction_bias,
                                     r.num_groups, r.topk_groups, r.routed_scaling_factor, ids_out=ids_out)
        logits = F.linear(x.to(self.weight.dtype), self.weight)  # [T, E]; .to is free when the dtypes match
        if self.e_score_correction_bias is None:
            return self._route(logits, r.top_k, r.renormalize, slots)
        return self._route(logits, self.e_score_correction_bias, r.top_k, r.num_groups, r.topk_groups,
                           r.renormalize, r.routed_scaling_factor, slots)

    def can_fuse_norm(self, h: torch.Tensor) -> bool:
        """Whether forward_norm takes h [T, H] (a static choice per T: CUDA graphs): the fused Triton router at its
        sizes, with a known order for the norm's sum (kernels/router_norm.py)."""
        return (self._route_fused is not None and h.shape[0] <= min(self._fused_max_tokens, FUSED_NORM_MAX_TOKENS)
                and norm_layout(h.shape[1], h.dtype, h.device) is not None)

    def forward_norm(self, h: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     slots: torch.Tensor | None = None, ids_out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # where can_fuse_norm: the post-attention RMSNorm of h + residual in the router's launch; returns
        # (weights, ids, x, h + residual), bit for bit the norm then forward(x)
        r = self.routing
        return route_fused_norm(h, residual, norm_weight, eps, self.weight, r.top_k, r.renormalize, slots,
                                self.e_score_correction_bias, r.num_groups, r.topk_groups, r.routed_scaling_factor,
                                ids_out=ids_out)


def tp_token_slice(num_tokens: int, tp: TensorParallel) -> tuple[int, int]:
    """(first row, rows) of this TP rank's share of a batch under EP x TP; the batch is padded to tp * rows."""
    rows = -(-num_tokens // tp.size)
    return tp.rank * rows, rows


class Experts(nn.Module):
    def __init__(self, num_local_experts: int, first_expert: int, hidden_size: int, intermediate_size: int,
                 args: ModelArgs, tp: TensorParallel) -> None:
        super().__init__()
        # tp: the group splitting each expert's intermediate dim (size 1 under EP: experts are whole)
        self.tp, self.first_expert, self.args = tp, first_expert, args
        self.intermediate_size = intermediate_size
        e, h, i = num_local_experts, hidden_size, divide(intermediate_size, tp, "moe intermediate size")
        self.local_inter = i
        fp8 = args.quantization == "fp8"
        dtype = FP8_DTYPE if fp8 else args.dtype
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype), requires_grad=False)  # gate rows; up
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=dtype), requires_grad=False)
        self._staged: dict[int, tuple[torch.Tensor, int]] = {}  # online FP8: expert -> (float w13, halves in)
        # FP8: e4m3 weights with fp32 [128, 128] block scales, w = q * scale (HF weight_scale_inv layout)
        self.w13_scale = self.w2_scale = None
        if fp8:
            blocks = lambda n: -(-n // FP8_BLOCK)  # noqa: E731
            self.w13_scale = nn.Parameter(torch.empty(e, blocks(2 * i), blocks(h)), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(e, blocks(h), blocks(i)), requires_grad=False)
        self._fused_experts = pick_kernel(fused_moe_kernels, "fused_experts", args.use_triton)

    def checkpoint_sources(self, prefix: str, leaf: str, has_key: Any) -> Checkpoint:
        # transformers-5 stacked layout ([E, 2I, H] gate;up and [E, H, I]) or one tensor per expert (HF, Mixtral)
        stacked = f"{prefix}.gate_up_proj" if leaf == "w13" else f"{prefix}.down_proj"
        if has_key(stacked):
            return [([stacked], "stacked")]
        ids = range(self.first_expert, self.first_expert + self.w13.shape[0])
        if leaf == "w2":
            return [([f"{prefix}.{e}.down_proj.weight", f"{prefix}.{e}.w2.weight"], (j, 0)) for j, e in enumerate(ids)]
        return [([f"{prefix}.{e}.{name}.weight", f"{prefix}.{e}.{alt}.weight"], (j, half))
                for j, e in enumerate(ids) for half, (name, alt) in enumerate((("gate_proj", "w1"), ("up_proj", "w3")))]

    def weight_loader(self, param: nn.Parameter, source: Source, shard_id: Any) -> None:
        w13 = param is self.w13
        inter, local = self.intermediate_size, self.local_inter
        start = self.tp.rank * local  # this rank's first intermediate row (w13) / column (w2)
        hidden = self.w2.shape[1]
        if shard_id == "stacked":
            last = self.first_expert + param.shape[0]
            if source.shape[0] < last:
                raise LoadError(f"tensor {source.key!r} has {source.shape[0]} experts, need experts up to {last}: "
                                f"config.json does not match the weights")
            source.check_shape([source.shape[0], 2 * inter, hidden] if w13 else [source.shape[0], hidden, inter])
            for j in range(param.shape[0]):
                e = self.first_expert + j
                if w13:
                    for half in (0, 1):
                        rows = slice(half * inter + start, half * inter + start + local)
                        self._load(param, source, j, half, e, (rows, slice(None)))
                else:
                    self._load(param, source, j, 0, e, (slice(None), slice(start, start + local)))
            return
        j, half = shard_id
        if w13:
            source.check_shape([inter, hidden])
            self._load(param, source, j, half, None, (slice(start, start + local), slice(None)))
        else:
            source.check_shape([hidden, inter])
            self._load(param, source, j, 0, None, (slice(None), slice(start, start + local)))

    def _load(self, param: nn.Parameter, source: Source, j: int, half: int, expert: int | None,
              matrix: tuple[slice, slice]) -> None:
        # one expert's gate or up half (w13) or its down projection (w2), already cut to this TP rank;
        # expert: its index in a stacked source (None: a per-expert tensor); matrix: (rows, cols) of it
        lead = (slice(expert, expert + 1),) if expert is not None else ()
        index = (*lead, *matrix)
        w13, local = param is self.w13, self.local_inter
        dest = param[j, half * local : (half + 1) * local] if w13 else param[j]
        scale = self.w13_scale if w13 else self.w2_scale
        if scale is None:  # float experts (an FP8 checkpoint is dequantized by the source)
            dest.copy_(source.read(index, dest.dtype).reshape(dest.shape))
        elif getattr(source, "is_fp8", False):  # FP8 checkpoint, FP8 experts: raw e4m3 and its block scales
            if any(s.start is not None and s.start % FP8_BLOCK for s in matrix) or (
                    self.tp.size > 1 and local % FP8_BLOCK):
                raise LoadError(f"{source.key}: an FP8 expert split over {self.tp.size} tensor-parallel ranks needs "
                                f"{local} (moe intermediate size / tp) to be a multiple of {FP8_BLOCK}")
            if w13 and local % FP8_BLOCK:
                raise LoadError(f"FP8 experts need an intermediate size that is a multiple of {FP8_BLOCK} to fuse "
                                f"gate/up scales, got {local} ({source.key})")
            dest.copy_(source.read(index, FP8_DTYPE).reshape(dest.shape))
            blocks = (*lead, *(s if s.start is None else slice(s.start // FP8_BLOCK, -(-s.stop // FP8_BLOCK))
                                for s in matrix))
            s_dest = scale[j, half * (local // FP8_BLOCK) : (half + 1) * (local // FP8_BLOCK)] if w13 else scale[j]
            s_dest.copy_(source.read_scale(blocks).reshape(s_dest.shape))
        else:  # online FP8: quantize each expert once its float weights are complete
            w = source.read(index, self.args.dtype).reshape(dest.shape)
            if not w13:
                quantize_into(w, param[j], scale[j])
                return
            staged, halves = self._staged.get(j) or (torch.empty(param.shape[1:], dtype=w.dtype, device=w.device), 0)
            staged[half * local : (half + 1) * local].copy_(w)
            if halves + 1 < 2:
                self._staged[j] = (staged, halves + 1)
                return
            self._staged.pop(j, None)
            quantize_into(staged, param[j], scale[j])

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                defer_sum: bool = False) -> torch.Tensor | TopKSlots:
        # topk_ids: local expert ids, -1 = slot handled elsewhere. defer_sum: the Triton experts may return their
        # per-slot outputs un-summed (TopKSlots); the torch reference always sums
        kw: dict[str, Any] = {"defer_sum": True} if defer_sum and self.args.use_triton else {}
        if self.w13_scale is not None:
            kw.update(w13_scale=self.w13_scale, w2_scale=self.w2_scale)
        return self._fused_experts(hidden, self.w13, self.w2, topk_weights, topk_ids, **kw)


class MoE(nn.Module):
    is_moe = True

    def __init__(self, hidden_size: int, intermediate_size: int, routing: RoutingSpec, args: ModelArgs,
                 layer_id: int, moe_layer_id: int, num_moe_layers: int, shared_intermediate_size: int = 0) -> None:
        super().__init__()
        if routing.num_experts % args.ep_size:
            raise ValueError(f"{routing.num_experts} experts cannot be split evenly over ep_size={args.ep_size}")
        self.layer_id, self.moe_layer_id, self.num_moe_layers = layer_id, moe_layer_id, num_moe_layers
        self.hidden_size, self.top_k, self.dtype = hidden_size, routing.top_k, args.dtype  # what dispatch carries
        self.num_local_experts = routing.num_experts // args.ep_size
        self.first_local_expert = args.ep_rank * self.num_local_experts
        self.ep_size = args.ep_size
        self.dispatcher: All2AllBackend | None = args.dispatcher  # the EP all2all (runtime/distributed/all2all.py)
        self.tp = args.tp
        # TP without EP: experts TP-split, partial sums reduced once here; TP with EP: tokens split over TP
        self.reduce_partial = args.tp.size > 1 and args.ep_size == 1
        self.split_tokens = args.tp.size > 1 and args.ep_size > 1
        self.gate = Router(hidden_size, routing, args)
        self.experts = Experts(self.num_local_experts, self.first_local_expert, hidden_size, intermediate_size, args,
                               args.tp if self.reduce_partial else TensorParallel())
        self.shared_experts = (MLP(hidden_size, shared_intermediate_size, args, reduce_results=not self.reduce_partial)
                               if shared_intermediate_size else None)
        self.use_triton = args.use_triton

    @property
    def can_defer_sum(self) -> bool:
        """Whether forward(defer_sum=True) may leave the top-k sum to the next RMSNorm (kernels/norm.py sums, adds
        the residual and normalizes in one launch): where this rank's experts see whole tokens and their sum is the
        layer's output, i.e. the Triton experts without EP (the combine sums) and without TP (the all-reduce needs
        the sum). A served rank's EP-of-one dispatcher (LocalBackend: it counts the routing, its combine hands the
        output back as it is) is no EP."""
        local = self.dispatcher is None or bool(getattr(self.dispatcher, "combine_is_identity", False))
        return self.use_triton and self.ep_size == 1 and local and self.tp.size == 1

    def can_fuse_norm(self, h: torch.Tensor) -> bool:
        """Whether forward_norm takes the attention output h [T, H]: where the router routes every row of the
        batch (not under EP x TP, whose ranks route slices) and the fused Triton router runs at T rows."""
        return not self.split_tokens and self.gate.can_fuse_norm(h)

    def forward_norm(self, h: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     batch: ForwardBatch, defer_sum: bool = False) -> tuple[torch.Tensor | TopKSlots, torch.Tensor]:
        """forward(rms_norm(h + residual)) with the norm done by the router's kernel (where can_fuse_norm): returns
        (forward's output, h + residual), bit for bit the separate norm's."""
        ids_out = self._ids_out(h.shape[0])
        topk_weights, topk_ids, x, residual = self.gate.forward_norm(h, residual, norm_weight, eps,
                                                                     batch.slot_mapping, ids_out)
        # through __call__: the module hooks (expert statistics' timers) see the experts' part; the fused router
        # and norm count with the norms, outside it
        return self(x, batch, defer_sum, routing=(topk_weights, topk_ids)), residual

    def forward(self, x: torch.Tensor, batch: ForwardBatch, defer_sum: bool = False,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | TopKSlots:
        # defer_sum (where can_defer_sum): may return the routed experts' per-slot outputs, with the shared experts'
        # output as their extra term, for the consumer to sum; else (or where the experts' path sums itself) [T, H].
        # routing: x's (topk weights, ids), already computed (forward_norm; never under EP x TP)
        if defer_sum and self.can_defer_sum:
            routed = self._routed(x, batch.slot_mapping, defer_sum=True, routing=routing)
            if isinstance(routed, TopKSlots):
                return routed if self.shared_experts is None else routed.with_extra(self.shared_experts(x))
            out = routed
        elif self.split_tokens:
            assert routing is None, "under EP x TP each rank routes its own slice of the batch"
            # the TP peers hold the same T tokens: each routes and dispatches rows [first, first + rows) of the
            # batch padded to tp * rows, and the combined slices are gathered back in rank order
            num_tokens = x.shape[0]
            first, rows = tp_token_slice(num_tokens, self.tp)
            extra = rows * self.tp.size - num_tokens
            padded = F.pad(x, (0, 0, 0, extra)) if extra else x
            slots = F.pad(batch.slot_mapping, (0, extra), value=-1) if extra else batch.slot_mapping
            mine = slice(first, first + rows)
            out = self.tp.all_gather(self._routed(padded[mine], slots[mine]), dim=0)[:num_tokens]
        else:
            out = self._routed(x, batch.slot_mapping, routing=routing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.reduce_partial:
            self.tp.all_reduce(out)  # routed + shared partial sums over the intermediate split, one reduction
        return out

    def dummy_rows(self, num_tokens: int) -> int:
        """Rows this rank dispatches in a step of num_tokens (padded) tokens: its TP slice under EP x TP."""
        return tp_token_slice(num_tokens, self.tp)[1] if self.split_tokens else num_tokens

    def forward_dummy(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """A lockstep dummy step's share of this layer: dispatch an all-padding batch, run the local experts on
        what the other EP ranks send, combine; the result is dropped. hidden [rows, H] (self.dtype), topk_weights
        [rows, k] fp32, topk_ids [rows, k] int32 all -1, rows = dummy_rows(agreed size). The collectives are
        those of forward() on the same size: the backends derive them from rows alone (allgather, sparse
        static) or from the count matrix every rank shares (sparse dynamic). Under EP x TP the TP all-gather
        of forward() is left out: every TP peer of this rank runs the same dummy plan, so none waits for it."""
        assert self.dispatcher is not None
        stats = self.dispatcher.stats  # timed as a MoE block, as forward() is by its module hooks (eager only)
        t0 = stats.time_start() if stats is not None else None
        hidden_recv, weights_recv, local_ids_recv, handle = self.dispatcher.dispatch(hidden, topk_weights, topk_ids)
        self.dispatcher.combine(self.experts(hidden_recv, weights_recv, local_ids_recv), handle)
        if stats is not None:
            stats.time_stop("moe", t0)

    def _ids_out(self, num_tokens: int) -> torch.Tensor | None:
        # the expert statistics' step buffer, if the dispatcher keeps one (a duck-typed dispatcher need not)
        ids_slot = getattr(self.dispatcher, "routing_ids_out", None)
        return ids_slot(num_tokens, self.gate.routing.top_k) if ids_slot is not None else None

    def _routed(self, x: torch.Tensor, slots: torch.Tensor, defer_sum: bool = False,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | TopKSlots:
        # padding rows (slot -1: a padded batch's filler; slots [T]) get expert id -1 inside the top-k kernel:
        # no expert work, nothing sent, not counted (a device mask: graph replays stay exact)
        if routing is None:
            routing = self.gate(x, slots, self._ids_out(x.shape[0]))
        topk_weights, topk_ids = routing  # [T, k] fp32, [T, k] int32 global ids
        if self.dispatcher is not None:
            hidden_recv, weights_recv, local_ids_recv, handle = self.dispatcher.dispatch(x, topk_weights, topk_ids)
            out = self.experts(hidden_recv, weights_recv, local_ids_recv, defer_sum)
            if isinstance(out, TopKSlots):  # defer_sum: only where the combine is the identity (can_defer_sum)
                return out
            out = self.dispatcher.combine(out, handle)
        elif self.ep_size == 1:
            out = self.experts(x, topk_weights, topk_ids, defer_sum)
        else:
            # no dispatcher on an EP slice: this rank's partial sum over its own experts (summing the ranks'
            # outputs gives the full result)
            local_ids = topk_ids - self.first_local_expert
            local_ids = local_ids.masked_fill((local_ids < 0) | (local_ids >= self.num_local_experts), -1)
            out = self.experts(x, topk_weights, local_ids)
        return out


class DummyForward:
    """The forward of a lockstep dummy step (a rank with nothing to run while other EP ranks run a step of
    num_tokens padded tokens): for each MoE layer in order, MoE.forward_dummy; no embedding, attention, norms,
    dense layers, shared experts or router (every id is -1: there is nothing to route). Layers without a
    dispatcher issue no collective and are skipped; model None (a rank whose DP group does not step in lockstep:
    config.needs_lockstep) has no dummy step to run or capture. The all-padding inputs are allocated once for up
    to max_tokens rows and never replaced, so a CUDA graph may capture slices of them."""

    def __init__(self, model: nn.Module | None, max_tokens: int = 0) -> None:
        modules = model.modules() if model is not None else ()
        self.layers: list[MoE] = sorted((m for m in modules if isinstance(m, MoE) and m.dispatcher is not None),
                                        key=lambda m: m.moe_layer_id)
        self.static = self._inputs(max_tokens) if self.layers and max_tokens > 0 else None

    def _inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.layers[0]  # every MoE layer of a model has the same hidden size, top-k and dtype
        device = layer.experts.w13.device
        return (torch.zeros(rows, layer.hidden_size, dtype=layer.dtype, device=device),
                torch.zeros(rows, layer.top_k, dtype=torch.float32, device=device),
                torch.full((rows, layer.top_k), -1, dtype=torch.int32, device=device))

    def __call__(self, num_tokens: int) -> None:
        if not self.layers:
            return
        rows = self.layers[0].dummy_rows(num_tokens)  # the same for every layer (one TP split)
        static = self.static
        # above the static size (eager steps only): a fresh all-padding batch for this step
        inputs = static if static is not None and rows <= static[0].shape[0] else self._inputs(rows)
        hidden, topk_weights, topk_ids = (t[:rows] for t in inputs)
        for layer in self.layers:
            layer.forward_dummy(hidden, topk_weights, topk_ids)


def moe_mlp_factory(hidden_size: int, dense_intermediate_size: int, moe_layer_ids: list[int],
                    moe_intermediate_size: int, routing: RoutingSpec, args: ModelArgs,
                    shared_intermediate_size: int = 0) -> Any:
    # layer_id -> MoE for the sparse layers, a dense MLP for the rest
    def make_mlp(layer_id: int) -> nn.Module:
        if layer_id not in moe_layer_ids:
            return MLP(hidden_size, dense_intermediate_size, args)
        return MoE(hidden_size, moe_intermediate_size, routing, args, layer_id, moe_layer_ids.index(layer_id),
                   len(moe_layer_ids), shared_intermediate_size)

    return make_mlp


def quantize_into(staged: torch.Tensor, param: torch.Tensor, scale: torch.Tensor) -> None:
    from kernels.fp8 import quantize_weight_block

    q, s = quantize_weight_block(staged)
    param.copy_(q)
    scale.copy_(s)
