"""A long prompt end to end on the CPU: 6,000 tokens prefilled in 512-token chunks (each chunk attends over
the cache of the earlier ones), then decoded, gives transformers' greedy tokens; the context reaches past
the checkpoint's original length through yarn, as Qwen3 reaches 128k."""

from __future__ import annotations

from typing import Any

import torch

from tests.test_engine import hf_greedy, make_llm, ours
from tests.tiny import make_tiny_checkpoint


def test_6k_prompt_in_512_token_chunks_matches_transformers(tmp_path: Any) -> None:
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048}
    path = make_tiny_checkpoint(str(tmp_path / "qwen3"), "Qwen3ForCausalLM", max_position_embeddings=2048,
                                num_hidden_layers=1, rope_parameters=yarn)
    prompt = torch.randint(3, 500, (6000,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = make_llm(path, max_num_batched_tokens=512, kv_cache_memory=16 << 20)
    assert llm.engine.max_model_len == 8192  # 2048 * 4 through yarn
    steps = []
    inner = llm.engine.runner.execute

    def spy(batch: Any, pad_to: int = 0, **kwargs: Any) -> torch.Tensor:
        steps.append(batch.num_tokens)
        return inner(batch, pad_to, **kwargs)

    llm.engine.runner.execute = spy  # type: ignore[method-assign]
    got = ours(llm, [prompt], 8)
    assert steps[:12] == [512] * 11 + [6000 - 11 * 512] and max(steps) <= 512
    assert got == hf_greedy(path, [prompt], 8)
