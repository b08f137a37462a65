"""--kv-cache-dtype fp8 end to end on the CPU (torch reference path): logits close to the float-KV run,
checkpoint k/v scales, a pool of 4x the tokens of an fp32 cache (2x of bf16), memory planning's log and
refusal."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.config import ConfigError
from runtime.engine.attention_backend import torch_attention
from runtime.engine.kv_cache import read_kv_scales
from tests.test_engine import make_llm, ours, prompts
from tests.test_models import PagedRun, load
from tests.tiny import make_tiny_checkpoint

FP8 = torch.float8_e4m3fn
ARCHS = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fp8kv")
    return {arch: make_tiny_checkpoint(str(root / arch), arch) for arch in ARCHS}


def run_logits(model: torch.nn.Module, toks: list[list[int]], kv_dtype: torch.dtype,
               scales: list[tuple[float, float]] | None = None) -> torch.Tensor:
    run = PagedRun(model, 64, len(toks), torch_attention(scales))
    run.kv_caches = [(k.to(kv_dtype), v.to(kv_dtype)) for k, v in run.kv_caches]
    with torch.no_grad():
        prefill = run.step([p[:-1] for p in toks], [0] * len(toks))
        decode = run.step([p[-1:] for p in toks], [len(p) - 1 for p in toks])
    return torch.cat([prefill, decode])


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_kv_logits_close_to_float_kv(arch: str, checkpoints: dict[str, str]) -> None:
    model = load(checkpoints[arch])
    g = torch.Generator().manual_seed(1)
    toks = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (40, 9, 17)]
    ref = run_logits(model, toks, torch.float32)
    fp8 = run_logits(model, toks, FP8, [(0.5, 0.25)] * model.num_layers)
    cos = torch.nn.functional.cosine_similarity(ref, fp8, dim=-1)
    if model.num_experts:
        # a near-tie in a tiny random router flips some tokens to other experts: judge the mean
        assert cos.mean() > 0.98, cos
    else:
        # stated tolerance (logits' std ~0.65): every token's cosine > 0.995, no logit off by more than 0.25
        assert cos.min() > 0.995 and (ref - fp8).abs().max() < 0.25, (cos.min(), (ref - fp8).abs().max())
    assert not torch.equal(ref, fp8)  # the cache really is FP8


def test_checkpoint_kv_scales(checkpoints: dict[str, str], tmp_path: Any) -> None:
    path = str(tmp_path / "scaled")
    shutil.copytree(checkpoints["LlamaForCausalLM"], path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor([0.25])
    tensors["model.layers.1.self_attn.kv_scale"] = torch.tensor(2.0)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    assert read_kv_scales(path, 2) == [(0.5, 0.25), (2.0, 2.0)]
    assert read_kv_scales(checkpoints["LlamaForCausalLM"], 2) == [(1.0, 1.0), (1.0, 1.0)]
    llm = make_llm(path, kv_cache_dtype="fp8")
    assert llm.engine.runner.attn_backend.kv_scales == [(0.5, 0.25), (2.0, 2.0)]
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(-1.0)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="k_scale = -1.0: a KV cache scale must be positive"):
        read_kv_scales(path, 2)


def test_engine_fp8_kv_pool_and_planning_log(checkpoints: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    path = checkpoints["Qwen3ForCausalLM"]
    kw: dict[str, Any] = {"kv_cache_memory": 1 << 20, "max_num_seqs": 512, "max_model_len": 256}
    with caplog.at_level(logging.INFO, logger="runtime.engine.llm_engine"):
        fp32 = make_llm(path, **kw)
        fp8 = make_llm(path, kv_cache_dtype="fp8", **kw)
    assert fp32.engine.runner.kv_cache.dtype == torch.float32 and fp8.engine.runner.kv_cache.dtype == FP8
    # the pool holds 4x the tokens of an fp32 cache in the same bytes (2x of a bf16 one)
    assert fp8.engine.block_manager.num_blocks == 4 * fp32.engine.block_manager.num_blocks
    assert fp8.engine.runner.kv_cache.nbytes == fp32.engine.runner.kv_cache.nbytes
    blocks = fp32.engine.block_manager.num_blocks
    assert f"max_model_len 256: {blocks / 32:.2f} sequences of that length fit" in caplog.text
    assert "float8_e4m3fn" in caplog.text
    # the FP8 engine serves: greedy tokens, no leaked blocks
    got = ours(fp8, prompts(), 8)
    assert [len(t) for t in got] == [8, 8, 8] and fp8.engine.block_manager.num_used_blocks == 0


def test_memory_planning_refuses_when_no_sequence_fits(checkpoints: dict[str, str]) -> None:
    path = checkpoints["Qwen3ForCausalLM"]
    with pytest.raises(ConfigError) as err:
        make_llm(path, kv_cache_memory=64 << 10, max_model_len=200)
    msg = str(err.value)
    assert "\n" not in msg and "max_model_len 200" in msg and "--kv-cache-dtype fp8" in msg
    # FP8 fits 4x the tokens in the same bytes: enough for one sequence here
    assert make_llm(path, kv_cache_memory=64 << 10, max_model_len=200, kv_cache_dtype="fp8").engine
