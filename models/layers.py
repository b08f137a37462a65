"""Shared layers and one generic decoder-only LM; architectures differ only by a DecoderSpec and an MLP factory."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import norm as norm_kernels
from kernels import rope as rope_kernels
from kernels.attention import qkv_prologue as qkv_prologue_kernels
from kernels.moe_sum import TopKSlots
from models.args import ModelArgs
from models.forward_batch import ForwardBatch
from models.info import ROPE_TYPES, check_rope, model_max_len, rope_parameters
from models.parallel_layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


def pick_kernel(module: ModuleType, name: str, use_triton: bool) -> Callable[..., Any]:
    # the Triton version shares the reference's signature and is named without "_ref"; it may not exist yet
    fast = getattr(module, name, None) if use_triton else None
    return fast if fast is not None else getattr(module, f"{name}_ref")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, args: ModelArgs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=args.dtype))
        self.eps = eps
        self._rms_norm = pick_kernel(norm_kernels, "rms_norm", args.use_triton)

    def forward(self, x: torch.Tensor | TopKSlots, residual: torch.Tensor | None = None) -> Any:
        # residual given: returns (norm(x + residual), x + residual); x may be a MoE layer's un-summed top-k slots
        # (with a residual): the kernel sums them first, bit for bit as kernels/moe_sum.py would
        return self._rms_norm(x, self.weight, self.eps, residual)


def rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 nests everything in rope_parameters; older config.json files use rope_theta + rope_scaling
    params = rope_parameters(cfg)
    check_rope(params)
    return params


def _inv_freq(rotary_dim: int, theta: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    # [rotary_dim / 2], or [P, rotary_dim / 2] for a theta per position [P, 1]
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def _yarn_inv_freq(rotary_dim: int, params: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, float]:
    # YaRN: long wavelengths interpolated by factor, short ones kept, a linear ramp between them; cos/sin
    # are scaled by attention_factor (0.1 ln(factor) + 1 unless the checkpoint gives it)
    theta, factor = float(params["rope_theta"]), float(params["factor"])
    old_len = float(params["original_max_position_embeddings"])

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)

    def correction_dim(num_rotations: float) -> float:  # the dim whose wavelength fits num_rotations in old_len
        return rotary_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    inv_freq = _inv_freq(rotary_dim, theta, device)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (frequency / factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


def rope_table(rotary_dim: int, max_positions: int, params: dict[str, Any], device: torch.device) -> torch.Tensor:
    # [max_positions, rotary_dim] fp32: cos then sin, the layout kernels.rope expects
    rope_type, theta = params["rope_type"], float(params["rope_theta"])
    if rope_type == "default":
        return rope_kernels.rope_cos_sin(rotary_dim, max_positions, theta, device=device)
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    inv_freq, attention_factor = _inv_freq(rotary_dim, theta, device), 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        factor, old_len = float(params["factor"]), float(params["original_max_position_embeddings"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        # long wavelengths are slowed by factor, short ones kept, the band between interpolated
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(rotary_dim, params, device)
    elif rope_type == "dynamic":
        # NTK-aware: theta grows with the sequence length L = max(position + 1, max_position_embeddings).
        # transformers takes L from the step's largest position; a table needs one L per position, so we
        # take each token's own: identical within max_position_embeddings and for every decoded token.
        factor, old_len = float(params["factor"]), float(params["max_position_embeddings"])
        seq_len = (positions.double() + 1).clamp(min=old_len)[:, None]  # [P, 1]
        # theta in float64 then rounded once, as transformers' Python-float base is
        thetas = theta * ((factor * seq_len / old_len) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        inv_freq = _inv_freq(rotary_dim, thetas.float(), device)  # [P, rotary_dim / 2]
        freqs = positions[:, None] * inv_freq
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    else:
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_positions: int
    rope: dict[str, Any] = field(default_factory=dict)
    qk_norm: bool = False
    attention_bias: bool = False

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * float(self.rope.get("partial_rotary_factor", 1.0)))

    @staticmethod
    def from_hf(cfg: dict[str, Any], **overrides: Any) -> DecoderSpec:
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        num_heads = cfg["num_attention_heads"]
        kw: dict[str, Any] = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            intermediate_size=cfg.get("intermediate_size", 0),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_positions=model_max_len(cfg),  # the rope table covers the scaled context
            rope=rope_params(cfg),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )
        kw.update(overrides)
        return DecoderSpec(**kw)


class MLP(nn.Module):
    # under TP: gate/up column-parallel, down row-parallel; reduce_results=False leaves the partial sum to the
    # caller (a MoE block adds it to its routed experts' partial sum and reduces once)
    def __init__(self, hidden_size: int, intermediate_size: int, args: ModelArgs, reduce_results: bool = True) -> None:
        super().__init__()
        what = "intermediate_size"
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, False, args,
                                                       what=what)  # [gate; up] rows of this rank
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, args, reduce_results, what=what)

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)


# the fused decode prologue's rows: measured faster end to end on an H200 at B=1, 8, 16, 64, 128 and 256 (session 10:
# B=16 11.77 -> 11.44 ms, B=64 17.85 -> 17.38 ms; session 11: B=128 19.62 -> 19.30, B=256 23.78 -> 23.46 ms); larger
# batches keep the two launches until measured
FUSED_DECODE_MAX_ROWS = 256


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_id: int, cos_sin: torch.Tensor, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        # under TP this rank's heads only: q/k/v column-parallel by whole heads, o row-parallel + all-reduce
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads,
                                          spec.attention_bias, args)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_local_heads, self.qkv_proj.num_local_kv_heads
        self.head_dim = spec.head_dim
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, False, args)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, args) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, args) if spec.qk_norm else None
        self.scale = spec.head_dim**-0.5
        self.cos_sin = cos_sin  # shared by all layers; a plain attribute so meta-device init leaves it alone
        self.eps = spec.rms_norm_eps
        # q/k norm + RoPE + the KV-cache store in one launch (the norms above only hold their weights)
        self._prologue = pick_kernel(qkv_prologue_kernels, "qkv_prologue", args.use_triton)
        # decode steps on the Triton path: that prologue inside the decode attention kernel, one launch fewer
        # (args.fuse_decode_prologue, on by default; MOE_RT_FUSE_DECODE_PROLOGUE=0 turns it off)
        self.fuse_decode_prologue = args.use_triton and args.fuse_decode_prologue

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        num_tokens = x.shape[0]
        backend = batch.attn_backend
        k_cache, v_cache, k_scale, v_scale = backend.kv_target(self.layer_id, batch)
        q_norm = self.q_norm.weight if self.q_norm is not None else None
        k_norm = self.k_norm.weight if self.k_norm is not None else None
        qkv = self.qkv_proj(x)
        # (a backend without a fused decode, e.g. a test's own, takes the separate prologue)
        if (self.fuse_decode_prologue and batch.is_decode and num_tokens <= FUSED_DECODE_MAX_ROWS
                and getattr(backend, "decode_fused", None) is not None):
            out = backend.forward_decode_fused(qkv, positions, self.cos_sin, q_norm, k_norm, self.eps, self.layer_id,
                                               batch, self.scale)
        else:
            # q [T, heads, head_dim]; this step's k and v go straight into the cache (slot -1: padding, skipped)
            q = self._prologue(qkv, positions, self.cos_sin, q_norm, k_norm, self.eps, k_cache, v_cache,
                               batch.slot_mapping, k_scale, v_scale)
            out = backend.forward_stored(q, self.layer_id, batch, self.scale)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, -1))


MlpFactory = Callable[[int], nn.Module]  # layer_id -> module with forward(x [T, H], batch) -> [T, H]


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer_id: int, cos_sin: torch.Tensor, mlp: nn.Module,
                 args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, args)
        self.self_attn = Attention(spec, layer_id, cos_sin, args)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, args)
        self.mlp = mlp
        # a MoE block that can return its output un-summed (TopKSlots): the next layer's input norm, or the final
        # norm, then does the top-k sum, the residual add and the norm in one launch (bit for bit the two kernels).
        # A plain attribute: set False for the separate sum (tests compare the two); args.fuse_moe_sum (on by
        # default; MOE_RT_FUSE_MOE_SUM=0, models/args.py) turns it off for a whole model
        self.defer_moe_sum = bool(getattr(mlp, "can_defer_sum", False)) and args.fuse_moe_sum
        # a MoE block whose router can do the post-attention norm itself (mlp.can_fuse_norm, per batch size):
        # kernels/router_norm.py, one launch fewer. args.fuse_router_norm (off by default until measured on a GPU;
        # MOE_RT_FUSE_ROUTER_NORM=1) turns it on
        self.fuse_router_norm = hasattr(mlp, "forward_norm") and args.fuse_router_norm

    def forward(self, positions: torch.Tensor, x: torch.Tensor | TopKSlots, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor | TopKSlots, torch.Tensor]:
        # x: the embedding (residual None) or the previous layer's MLP output (summed or not) with its residual
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch)
        if self.fuse_router_norm and self.mlp.can_fuse_norm(x):
            norm = self.post_attention_layernorm
            return self.mlp.forward_norm(x, residual, norm.weight, norm.eps, batch, self.defer_moe_sum)
        x, residual = self.post_attention_layernorm(x, residual)
        if self.defer_moe_sum:
            return self.mlp(x, batch, defer_sum=True), residual
        return self.mlp(x, batch), residual


class DecoderBody(nn.Module):
    def __init__(self, spec: DecoderSpec, make_mlp: MlpFactory, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, args)
        # built on args.device explicitly: the loader builds the module tree on "meta"
        cos_sin = rope_table(spec.rotary_dim, spec.max_positions, spec.rope, args.device)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, cos_sin, make_mlp(i), args) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, args)


@dataclass(frozen=True)
class KVCacheSpec:
    """What the runner allocates per rank: [num_layers, 2, blocks, block_size, num_kv_heads, head_dim]."""

    num_layers: int
    num_kv_heads: int  # this TP rank's KV heads
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype.itemsize


Checkpoint = list[tuple[list[str], Any]]  # per source: (candidate checkpoint names, shard id for the weight loader)


class DecoderLM(nn.Module):
    """Embedding -> decoder layers -> final norm; logits through lm_head (or the tied embedding)."""

    def __init__(self, spec: DecoderSpec, make_mlp: MlpFactory, args: ModelArgs, num_experts: int = 0) -> None:
        super().__init__()
        self.spec, self.args = spec, args
        self.model = DecoderBody(spec, make_mlp, args)
        attn = self.model.layers[0].self_attn
        self.num_layers, self.num_kv_heads, self.head_dim = spec.num_layers, attn.num_kv_heads, spec.head_dim
        self.num_heads = attn.num_heads  # this TP rank's query heads
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, args)
        self.tie_weights()
        self.num_experts = num_experts  # global routed experts per MoE layer; 0 = dense
        self.num_moe_layers = sum(1 for m in self.modules() if getattr(m, "is_moe", False))
        self.load_stats: dict[str, int] = {"tensors": 0, "bytes": 0}

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_layers, self.num_kv_heads, self.head_dim)

    def checkpoint_sources(self, param_name: str, has_key: Callable[[str], bool]) -> Checkpoint:
        """The checkpoint tensors (Hugging Face names) that fill one parameter, each with the shard id its
        weight_loader takes. A model with other names overrides this (Mixtral)."""
        prefix, _, leaf = param_name.rpartition(".")
        if prefix.endswith(".qkv_proj"):
            attn = prefix[: -len(".qkv_proj")]
            return [([f"{attn}.{p}_proj.{leaf}"], p) for p in ("q", "k", "v")]
        if prefix.endswith(".gate_up_proj"):
            mlp = prefix[: -len(".gate_up_proj")]
            return [([f"{mlp}.gate_proj.{leaf}"], 0), ([f"{mlp}.up_proj.{leaf}"], 1)]
        if prefix.endswith(".experts") and leaf in ("w13", "w2"):
            return self.get_submodule(prefix).checkpoint_sources(prefix, leaf, has_key)
        return [([param_name], None)]

    def tie_weights(self) -> None:
        # call again after to_empty(): moving off "meta" gives each module its own new Parameter
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, H]
        residual: torch.Tensor | None = None
        h: torch.Tensor | TopKSlots = x
        for layer in self.model.layers:
            h, residual = layer(positions, h, residual, batch)
        x, _ = self.model.norm(h, residual)  # (a last MoE layer's top-k sum happens in here)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head.compute_logits(hidden)  # [N, V] fp32 on TP rank 0, None on its peers
