"""The fused decode prologue (kernels/attention/decode_fused.py) inside whole models: MOE_RT_FUSE_DECODE_PROLOGUE
(models/args.py) on and off give the same logits (tiny models, the Triton kernels: the interpreter on the CPU), one
prologue launch fewer per layer in a decode step and nothing else changed; on a GPU the engine with CUDA graphs gives
the same greedy tokens."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tests.model_steps import two_sequence_logits  # noqa: E402

ENV = "MOE_RT_FUSE_DECODE_PROLOGUE"


def _logits(arch: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[str]]:
    """(logits of a 2-sequence prefill, then of a decode step of both sequences and a padding row; the Triton
    path's launches); a tiny model (the switch read when its ModelArgs is made), the Triton kernels."""
    logits, launches, _ = two_sequence_logits(arch, decode_rows=[0, 1], pad=True, dtype=dtype)
    return logits, launches


def test_switch_read_when_model_args_are_made(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.args import ModelArgs

    monkeypatch.delenv(ENV, raising=False)
    assert ModelArgs().fuse_decode_prologue  # on: measured on an H200 (B=1 2.77 -> 2.68 ms)
    monkeypatch.setenv(ENV, "0")
    assert not ModelArgs().fuse_decode_prologue
    monkeypatch.setenv(ENV, "on")
    with pytest.raises(ValueError, match=f"{ENV} must be 0 or 1"):
        ModelArgs()


@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe"])
def test_model_logits_unchanged_by_fused_decode_prologue(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # qwen3_moe: q/k norm; glm4_moe: q/k norm, partial rotary (no norm: tests/test_decode_fused.py). A 2-sequence
    # prefill (never fused), then a decode step of both (and a padding row), whose layers each run the decode kernel
    # with the prologue inside
    monkeypatch.setenv(ENV, "0")
    plain, plain_launches = _logits(arch)
    monkeypatch.setenv(ENV, "1")
    fused, fused_launches = _logits(arch)
    assert torch.equal(fused, plain)
    assert fused.abs().max() > 1e-3 and fused.argmax(-1).unique().numel() > 1  # a real signal
    prologue = "triton:_qkv_prologue_kernel"
    num_layers = 3 if arch == "glm4_moe" else 2
    assert plain_launches.count(prologue) - fused_launches.count(prologue) == num_layers
    assert [e for e in fused_launches if e != prologue] == [e for e in plain_launches if e != prologue]


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_engine_graphs_same_tokens_with_fused_decode_prologue_gpu(kv_cache_dtype: str, tmp_path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # the engine with CUDA graphs, bf16: 12 sequences finishing one by one (decode batches 12 down to 1, padded
    # graph rows), the same greedy tokens with the fusion on and off; "fp8": an FP8 KV cache (the widening decode,
    # or on the H200 table the FP8 tensor-core one, which keeps the separate prologue)
    from runtime import LLM, SamplingParams
    from tests.test_router_norm import GPU_MODEL_HIDDEN
    from tests.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path / "qwen3"), "Qwen3MoeForCausalLM", hidden_size=GPU_MODEL_HIDDEN)
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 500, (n,), generator=gen).tolist()} for n in range(3, 15)]
    params = [SamplingParams(temperature=0, max_tokens=4 + 2 * i, ignore_eos=True) for i in range(len(prompts))]
    tokens = {}
    for fuse in ("0", "1"):
        monkeypatch.setenv(ENV, fuse)
        llm = LLM(model=path, dtype="bfloat16", device="cuda", block_size=16, kv_cache_memory=64 << 20,
                  max_num_seqs=16, max_num_batched_tokens=128, max_model_len=64, kv_cache_dtype=kv_cache_dtype)
        fusing = [layer.self_attn.fuse_decode_prologue for layer in llm.engine.model.model.layers]
        assert all(fusing) == (fuse == "1"), fusing
        tokens[fuse] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert tokens["1"] == tokens["0"] and [len(t) for t in tokens["1"]] == [p.max_tokens for p in params]
