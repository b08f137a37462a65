"""A training-only Qwen3-MoE in plain torch, exported to transformers' Qwen3MoeForCausalLM for shipping.

transformers' eager MoE loops over experts with a host sync per layer; here every expert runs on every token and
the router's top-k weights (zero elsewhere) mix them, which is the same function, with a few large matmuls
instead of many small ones. At the demo's size (8 experts, small intermediate) the 4x expert FLOPs are cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # [seq_len, head_dim]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [batch, heads, seq, head_dim]; rotate-half convention, as transformers' Qwen3
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: Qwen3MoeConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # the norms' float32 weights promote q and k; attention runs in v's dtype (bf16 under autocast)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        groups = self.num_heads // self.num_kv_heads  # GQA: query head h reads kv head h // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DenseMixMoE(nn.Module):
    """Qwen3-MoE's sparse block (softmax router, top-k, renormalised) computed densely over all experts."""

    def __init__(self, c: Qwen3MoeConfig) -> None:
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(c.num_experts, c.hidden_size, c.moe_intermediate_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [num_tokens, hidden]
        logits = self.gate(x)  # [num_tokens, num_experts]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = (top_w / top_w.sum(dim=-1, keepdim=True)).to(logits.dtype)
        mix = torch.zeros_like(logits).scatter(1, top_i, top_w)  # [num_tokens, num_experts], zero off the top-k
        dtype = logits.dtype  # the compute dtype: bf16 under autocast, else the weights' float32
        gate, up = torch.einsum("nh,eih->eni", x.to(dtype), self.gate_up_proj.to(dtype)).chunk(2, dim=-1)
        h = F.silu(gate) * up  # [num_experts, num_tokens, intermediate]
        out = torch.einsum("eni,ehi->enh", h, self.down_proj.to(dtype))  # [num_experts, num_tokens, hidden]
        out = torch.einsum("enh,ne->nh", out, mix)
        return out.reshape(shape), logits


class Layer(nn.Module):
    def __init__(self, c: Qwen3MoeConfig, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout  # training only: the corpus is seen many times in the GPU budget
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = DenseMixMoE(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + F.dropout(self.self_attn(self.input_layernorm(x), cos, sin), self.dropout, self.training)
        moe_out, router_logits = self.mlp(self.post_attention_layernorm(x))
        return x + F.dropout(moe_out, self.dropout, self.training), router_logits


class DemoMoE(nn.Module):
    def __init__(self, c: Qwen3MoeConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c, dropout) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            if name.endswith(("o_proj.weight", "down_proj")):
                p.mul_(1.0 / (2 * self.config.num_hidden_layers) ** 0.5)  # residual branches start small

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [batch, seq, vocab] and each layer's router logits [batch * seq, num_experts]."""
        c = self.config
        theta = c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta
        cos, sin = rope_cos_sin(input_ids.shape[1], c.head_dim, theta, input_ids.device)
        x = self.embed_tokens(input_ids)
        router_logits = []
        for layer in self.layers:
            x, logits = layer(x, cos, sin)
            router_logits.append(logits)
        return self.lm_head(self.norm(x)), router_logits


def per_layer_balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style balance loss, per layer then averaged: 1.0 when every layer routes evenly.

    transformers' own aux loss pools the counts of all layers before balancing, so one layer may
    starve an expert while another overfeeds it; the demo must spread tokens in every layer.
    """
    losses = []
    for logits in router_logits:  # [num_tokens, num_experts]
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        load = torch.bincount(chosen.flatten(), minlength=num_experts).float() / chosen.numel()
        losses.append(num_experts * (load * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def to_transformers(model: DemoMoE) -> Qwen3MoeForCausalLM:
    """The same weights in transformers' module, whichever expert layout its version keeps in memory."""
    hf = Qwen3MoeForCausalLM(model.config)
    target = hf.state_dict()
    ours: dict[str, torch.Tensor] = {"lm_head.weight": model.lm_head.weight}
    for name, p in model.named_parameters():
        if name.startswith("lm_head"):
            continue
        name = name.replace("mlp.gate_up_proj", "mlp.experts.gate_up_proj").replace(
            "mlp.down_proj", "mlp.experts.down_proj"
        )
        ours[f"model.{name}"] = p
    state: dict[str, torch.Tensor] = {}
    for name, p in ours.items():
        if name in target:
            state[name] = p
        elif name.endswith("experts.gate_up_proj"):  # older transformers: one module per expert
            inter = p.shape[1] // 2
            for e in range(p.shape[0]):
                state[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = p[e, :inter]
                state[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = p[e, inter:]
        elif name.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                state[name.replace("down_proj", f"{e}.down_proj.weight")] = p[e]
        else:
            raise KeyError(f"{name} has no place in transformers' Qwen3MoeForCausalLM")
    missing = set(target) - set(state)
    if missing:
        raise KeyError(f"transformers' Qwen3MoeForCausalLM wants weights the demo model lacks: {sorted(missing)[:5]}")
    hf.load_state_dict({k: v.detach().float().cpu().contiguous() for k, v in state.items()})
    return hf
