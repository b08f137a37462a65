"""On a CUDA GPU (pytest -m gpu): after start-up no Triton kernel compiles, whatever the serving mix.

Counts Triton's JIT cache misses (knobs.runtime.jit_cache_hook runs before every compile or disk load of a
kernel variant the process has not launched yet) over a workload of random prompt lengths, batch mixes and
sampling options, after the engine is built (graphs captured, warm-up done).
"""

import random

import pytest
import torch

from runtime import LLM, SamplingParams
from tests.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch,experts,kv", [
    ("Qwen3MoeForCausalLM", {"num_experts": 64, "num_experts_per_tok": 8}, "auto"),
    ("Glm4MoeForCausalLM", {"n_routed_experts": 16, "num_experts_per_tok": 6}, "auto"),
    # an FP8 cache: chunks of >= 256 tokens widen their pages into the 16-bit scratch (kernels/attention/fp8_scratch.py)
    ("Qwen3MoeForCausalLM", {"num_experts": 64, "num_experts_per_tok": 8}, "fp8")])
def test_no_compile_after_startup(tmp_path, arch, experts, kv):
    import triton

    path = make_tiny_checkpoint(str(tmp_path / arch), arch, max_position_embeddings=4096, **experts)
    llm = LLM(model=path, dtype="bfloat16", device="cuda", max_num_batched_tokens=1024, max_num_seqs=48,
              kv_cache_memory=256 << 20, max_model_len=4096, kv_cache_dtype=kv)
    compiled: list[str] = []
    previous = triton.knobs.runtime.jit_cache_hook

    def hook(*, repr: str, **_) -> bool:
        compiled.append(repr)  # the kernel and the specialization it compiles
        return False  # go on and compile

    triton.knobs.runtime.jit_cache_hook = hook
    try:
        rng = random.Random(0)
        for round_ in range(4):
            n = rng.choice([1, 3, 17, 48])
            prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(rng.randint(1, 1500))]}
                       for _ in range(n)]
            params = [SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.9]),
                                     top_k=rng.choice([-1, 5]), max_tokens=rng.randint(1, 40), ignore_eos=True,
                                     seed=rng.choice([None, round_]))
                      for _ in range(n)]
            llm.generate(prompts, params)
    finally:
        triton.knobs.runtime.jit_cache_hook = previous
    assert compiled == [], f"kernels compiled on the serving path: {compiled}"
