"""The start-up warmup (runtime/engine/model_runner.py ModelRunner.warmup) runs prefill-shaped steps of up to
--max-num-batched-tokens tokens (8192 by default), which can be more than the model has RoPE positions (the demo
model: 2048): its positions must stay inside the cos/sin table (on the GPU a position past it reads past the table)."""

from __future__ import annotations

import torch

from benchmarks.count_launches import CONFIGS
from models.args import ModelArgs
from models.loader import load_model
from runtime.engine.attention_backend import torch_attention
from runtime.engine.model_runner import ModelRunner


def test_warmup_longer_than_the_rope_table() -> None:
    cfg = dict(CONFIGS["qwen3_moe"], num_hidden_layers=1, max_position_embeddings=16)
    model = load_model("", cfg, ModelArgs(dtype=torch.float32, device="cpu", seed=0), "dummy")
    assert model.spec.max_positions == 16
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, num_blocks=8, block_size=8, max_model_len=16,
                         attn_backend=torch_attention())
    runner.warmup([8, 40])  # 40 tokens: positions past the table's 16 (the torch path's cos_sin lookup would raise)
    assert runner.kv_cache.abs().max() == 0  # the warmup writes no KV
