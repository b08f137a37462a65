"""Tiny random Hugging Face checkpoints (config, safetensors, tokenizer) for CPU tests."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

ARCHS = ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "Glm4MoeForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM")
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few "
    "feed forward networks chosen by a small router. Paged attention keeps keys and values in fixed "
    "size blocks so that many sequences share one cache without fragmentation. Hello world! "
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation: ; , . ? ! and some code: def f(x): return x + 1\n"
)

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.08,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=0,
    pad_token_id=0,
)


def _config(arch: str, overrides: dict[str, Any]) -> Any:
    import transformers

    kw = dict(_COMMON)
    if arch == "Qwen3MoeForCausalLM":
        cls = transformers.Qwen3MoeConfig
        kw.update(head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2, norm_topk_prob=True)
    elif arch == "MixtralForCausalLM":
        cls = transformers.MixtralConfig
        kw.update(head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    elif arch == "Glm4MoeForCausalLM":
        cls = transformers.Glm4MoeConfig
        kw.update(head_dim=32, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                  norm_topk_prob=True, routed_scaling_factor=1.5, attention_bias=True, use_qk_norm=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    elif arch == "LlamaForCausalLM":
        cls = transformers.LlamaConfig
        kw.update(head_dim=16, intermediate_size=96, num_hidden_layers=2)
    elif arch == "Qwen3ForCausalLM":
        cls = transformers.Qwen3Config
        kw.update(head_dim=32, intermediate_size=96, num_hidden_layers=2, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    kw.update(overrides)
    config = cls(**kw)
    config.architectures = [arch]
    return config


def _randomize(model: torch.nn.Module, std: float, seed: int) -> None:
    # HF init leaves norms at 1 and some biases at 0; perturb everything so each code path matters
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def write_tokenizer(path: str, vocab_size: int = VOCAB_SIZE) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|bos|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_tiny_checkpoint(path: str, arch: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                         std: float = 0.08, max_shard_size: str | None = None, **overrides: Any) -> str:
    """Writes config.json, model.safetensors, tokenizer files and generation_config.json into path."""
    import transformers

    os.makedirs(path, exist_ok=True)
    config = _config(arch, overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, std, seed)
    model = model.to(dtype)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    write_tokenizer(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"] == [arch]
    return path


def tiny_moe_inputs(num_tokens: int, num_experts: int, hidden: int, top_k: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x fp16 [T, hidden], top-k weights fp32, ids int32) on the CPU: benchmarks/bench_moe.make_inputs' signature,
    for the MoE tuner tests that run it on tiny shapes in the interpreter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).half()
    weights, ids = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=-1)
    return x, weights.float().contiguous(), ids.to(torch.int32).contiguous()
