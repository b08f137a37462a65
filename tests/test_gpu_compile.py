"""On a CUDA GPU (pytest -m gpu): after start-up no Triton kernel compiles, whatever the serving mix.

Counts Triton's JIT cache misses (knobs.runtime.jit_cache_hook runs before every compile or disk load of a
kernel variant the process has not launched yet) over a workload of random prompt lengths, batch mixes and
sampling options, after the engine is built (graphs captured, warm-up done). On 2 GPUs the same under DP=2 / EP=2,
where the experts run on the rows the all2all delivers (runtime/engine/expert_warmup.py).
"""

import json
import os
import random
from typing import Any

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


# ------------------------------------------------------------------ expert parallel: 2 GPUs, DP=2 / EP=2

EP_WORLD = 2


def _zero_token0_copy(src: str, dst: str) -> str:
    """The checkpoint with token 0's embedding zeroed (every router ties on it). Not needed for the worst case: the
    start-up warmup's rows are padding (slot -1), routed nowhere, so no rank receives a row in its eager (dynamic
    all2all) steps whatever the weights; the prompts below never hold token 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"][0].zero_()
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def _ep_worker(rank: int, port: int, model: str, mixed_tokens: int, eager: bool, result_dir: str) -> None:
    import torch.distributed as dist
    import triton

    from runtime.cluster.rank_loop import build_engine
    from runtime.config import EngineConfig
    from runtime.distributed.parallel import destroy_parallel, init_parallel
    from runtime.messages import AddRequest
    from tests.test_gpu_all2all import _lockstep

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(EP_WORLD), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(EP_WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    config = EngineConfig(model=model, device="cuda", dtype="bfloat16", kv_cache_memory=256 << 20,
                          max_num_batched_tokens=1024, max_num_seqs=48, max_model_len=4096,
                          data_parallel_size=EP_WORLD, enable_expert_parallel=True,
                          max_mixed_cudagraph_tokens=mixed_tokens, enforce_eager=eager)
    parallel = init_parallel(config)
    group = dist.new_group(backend="gloo")
    engine, _ = build_engine(config, parallel)  # graphs captured, both warmups done
    compiled: list[str] = []
    previous = triton.knobs.runtime.jit_cache_hook

    def hook(*, repr: str, fn: Any, **_) -> bool:
        # eager: only the MoE / all2all kernels count (eager decode attention at any batch size is not this test's
        # business: the one-GPU test above has no eager case either)
        module = str(getattr(fn.module, "__name__", fn.module))  # the kernel's module (a name in Triton 3.6)
        if not eager or module.startswith(("kernels.all2all", "kernels.fused_moe", "kernels.moe", "kernels.fp8")):
            compiled.append(repr)
        return False

    triton.knobs.runtime.jit_cache_hook = hook
    try:
        rng = random.Random(rank)  # each rank its own load: real and dummy steps, every received-row count
        for round_ in range(4):
            for i in range(rng.choice([1, 3, 17, 48])):
                prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, 1500))]
                params = SamplingParams(temperature=rng.choice([0.0, 0.7]), max_tokens=rng.randint(1, 40),
                                        ignore_eos=True)
                engine.add_request(AddRequest(request_id=f"{rank}-{round_}-{i}", prompt_token_ids=prompt,
                                              params=params))
            _lockstep(engine, group)
    finally:
        triton.knobs.runtime.jit_cache_hook = previous
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(compiled, f)
    destroy_parallel()


@pytest.mark.skipif(torch.cuda.device_count() < EP_WORLD, reason="needs 2 CUDA GPUs")
# prefills eager (dynamic all2all past the decode graphs' 48) / in mixed-step graphs up to 512 and eager past it. Not
# 2048 (>= max_num_batched_tokens): every step would then be a graph size, static, its received rows fixed at capture.
# Eager (no graphs, no static exchange): every exchange dynamic, the sparse pack / unpack never launched at start-up
# but by the local warmup (the collective warmup's rows route nowhere)
@pytest.mark.parametrize("mixed_tokens,eager", [(0, False), (512, False), (0, True)])
def test_no_compile_after_startup_expert_parallel(tmp_path, mixed_tokens, eager):
    from tests.test_all2all import free_port, spawn_ranks_json

    path = make_tiny_checkpoint(str(tmp_path / "qwen"), "Qwen3MoeForCausalLM", max_position_embeddings=4096,
                                num_experts=64, num_experts_per_tok=8)
    path = _zero_token0_copy(path, str(tmp_path / "qwen_token0"))
    results = spawn_ranks_json(_ep_worker, lambda d: (free_port(), path, mixed_tokens, eager, d), EP_WORLD, 540,
                               "GPU EP ranks")
    for r, compiled in enumerate(results):
        assert compiled == [], f"rank {r}: kernels compiled on the serving path: {compiled}"
