"""The MoE layer: router -> (EP dispatch) -> fused experts -> (EP combine) [+ shared experts]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fused_moe as fused_moe_kernels
from kernels import router as router_kernels
from kernels.fp8 import FP8_BLOCK, FP8_DTYPE
from models.args import ModelArgs
from models.layers import MLP, pick_kernel
from runtime.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from runtime.all2all import All2AllBackend


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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.routing
        logits = F.linear(x.to(self.weight.dtype), self.weight)  # [T, E]
        if self.e_score_correction_bias is None:
            return self._route(logits, r.top_k, r.renormalize)
        return self._route(logits, self.e_score_correction_bias, r.top_k, r.num_groups, r.topk_groups,
                           r.renormalize, r.routed_scaling_factor)


class Experts(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int, args: ModelArgs) -> None:
        super().__init__()
        e, h, i = num_local_experts, hidden_size, intermediate_size
        fp8 = args.quantization == "fp8"
        dtype = FP8_DTYPE if fp8 else args.dtype
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype), requires_grad=False)  # gate rows; up
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=dtype), requires_grad=False)
        # FP8: e4m3 weights with fp32 [128, 128] block scales, w = q * scale (HF weight_scale_inv layout)
        self.w13_scale = self.w2_scale = None
        if fp8:
            blocks = lambda n: -(-n // FP8_BLOCK)  # noqa: E731
            self.w13_scale = nn.Parameter(torch.empty(e, blocks(2 * i), blocks(h)), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(e, blocks(h), blocks(i)), requires_grad=False)
        self._fused_experts = pick_kernel(fused_moe_kernels, "fused_experts", args.use_triton)

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        # topk_ids: local expert ids, -1 = slot handled elsewhere
        if self.w13_scale is None:
            return self._fused_experts(hidden, self.w13, self.w2, topk_weights, topk_ids)
        return self._fused_experts(hidden, self.w13, self.w2, topk_weights, topk_ids,
                                   w13_scale=self.w13_scale, w2_scale=self.w2_scale)


class MoE(nn.Module):
    is_moe = True

    def __init__(self, hidden_size: int, intermediate_size: int, routing: RoutingSpec, args: ModelArgs,
                 layer_id: int, moe_layer_id: int, num_moe_layers: int, shared_intermediate_size: int = 0) -> None:
        super().__init__()
        if routing.num_experts % args.ep_size:
            raise ValueError(f"{routing.num_experts} experts cannot be split evenly over ep_size={args.ep_size}")
        self.layer_id, self.moe_layer_id, self.num_moe_layers = layer_id, moe_layer_id, num_moe_layers
        self.num_local_experts = routing.num_experts // args.ep_size
        self.first_local_expert = args.ep_rank * self.num_local_experts
        self.ep_size = args.ep_size
        self.dispatcher: All2AllBackend | None = args.dispatcher  # the EP all2all (runtime/all2all.py)
        self.gate = Router(hidden_size, routing, args)
        self.experts = Experts(self.num_local_experts, hidden_size, intermediate_size, args)
        self.shared_experts = MLP(hidden_size, shared_intermediate_size, args) if shared_intermediate_size else None

    def _count_experts(self, topk_ids: torch.Tensor, batch: ForwardBatch) -> None:
        counts = batch.extras.get("expert_counts")  # [num_moe_layers or num_layers, E] on the device
        if not isinstance(counts, torch.Tensor) or batch.is_dummy:
            return
        row = self.moe_layer_id if counts.shape[0] == self.num_moe_layers else self.layer_id
        ids = topk_ids if batch.num_real_tokens is None else topk_ids[: batch.num_real_tokens]
        ids = ids.reshape(-1).long()
        counts[row].index_add_(0, ids, torch.ones(ids.shape, dtype=counts.dtype, device=counts.device))

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # a dummy batch still runs router, dispatch and combine so every EP rank issues the same collectives
        topk_weights, topk_ids = self.gate(x)  # [T, k] fp32, [T, k] int32 global ids
        self._count_experts(topk_ids, batch)
        # padding rows (slot -1: a padded batch's filler, every row of a dummy step) get expert id -1: no
        # expert work, nothing sent, not counted (a device mask, so CUDA-graph replays stay exact)
        topk_ids = topk_ids.masked_fill((batch.slot_mapping < 0).unsqueeze(1), -1)
        if self.dispatcher is not None:
            hidden_recv, weights_recv, local_ids_recv, handle = self.dispatcher.dispatch(x, topk_weights, topk_ids)
            out = self.dispatcher.combine(self.experts(hidden_recv, weights_recv, local_ids_recv), handle)
        elif self.ep_size == 1:
            out = self.experts(x, topk_weights, topk_ids)
        else:
            # no dispatcher on an EP slice: this rank's partial sum over its own experts (summing the ranks'
            # outputs gives the full result)
            local_ids = topk_ids - self.first_local_expert
            local_ids = local_ids.masked_fill((local_ids < 0) | (local_ids >= self.num_local_experts), -1)
            out = self.experts(x, topk_weights, local_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


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
