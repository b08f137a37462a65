"""FP8 attention / dense linears of a block-FP8 checkpoint: loaded raw with their scales, run by the W8A8 GEMM."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import pytest
import torch

import models.parallel_layers as parallel_layers
from kernels.fp8 import FP8_DTYPE, dequantize_weight_block, quantize_weight_block
from models.args import ModelArgs, TensorParallel
from models.loader import load_model
from tests.test_models import PagedRun, _fp8_checkpoint, load, prompts, read_config
from tests.tiny import make_tiny_checkpoint

# every linear in whole 128-blocks: q 4 x 64, k/v 2 x 64 = 128, dense MLP 256, shared expert 256
SHAPES = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=256,
              moe_intermediate_size=256, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=2)
FP8_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
               "mlp.shared_experts.gate_up_proj", "mlp.shared_experts.down_proj")


@pytest.fixture(scope="module")
def fp8_glm(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("fp8_linear")
    src = make_tiny_checkpoint(str(root / "f32"), "Glm4MoeForCausalLM", **SHAPES)
    stored = _fp8_checkpoint(src, str(root / "fp8"))
    return src, str(root / "fp8"), stored


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith(FP8_LINEARS)}


def _generate(model: torch.nn.Module, toks: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    # prefill, then greedy decode; returns each step's logits [B, V] (of each sequence's last token) and the tokens
    run = PagedRun(model, max(map(len, toks)) + steps, len(toks))
    with torch.no_grad():
        step_logits = [run.step(toks, [0] * len(toks))[torch.tensor([len(t) for t in toks]).cumsum(0) - 1]]
        for i in range(steps - 1):
            last = step_logits[-1].argmax(-1).tolist()
            step_logits.append(run.step([[t] for t in last], [len(t) + i for t in toks]))
    return step_logits, torch.stack([x.argmax(-1) for x in step_logits], 1).tolist()


def test_fp8_checkpoint_linears_stay_fp8(fp8_glm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path, stored = fp8_glm
    model = load(path)
    linears = _linears(model)
    assert len(linears) == 2 * 2 + 2 + 2  # attention x 2 layers, the dense MLP (layer 0), the shared expert
    for name, m in linears.items():
        assert m.weight.dtype == FP8_DTYPE and m.weight_scale_inv.dtype == torch.float32, name
    # raw e4m3 and scales as stored: q rows then k, v (the merged parts on 128-row boundaries)
    qkv = model.model.layers[1].self_attn.qkv_proj
    p = "model.layers.1.self_attn"
    want = torch.cat([stored[f"{p}.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(qkv.weight.view(torch.uint8), want.view(torch.uint8))
    scales = torch.cat([stored[f"{p}.{x}_proj.weight_scale_inv"] for x in "qkv"])
    torch.testing.assert_close(qkv.weight_scale_inv, scales)
    assert qkv.bias is not None and qkv.bias.dtype == torch.float32  # GLM's qkv bias, added in the GEMM
    # what stays in the model dtype: embeddings, lm head, the fp32 router
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32

    # the same checkpoint with those linears dequantized at load (the behaviour before): identical weights, so the
    # difference is the per-token-group FP8 rounding of their activations (~2^-4 relative per element)
    monkeypatch.setattr(parallel_layers, "_use_fp8", lambda *a: False)
    dequantized = load(path)
    assert dequantized.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32
    torch.testing.assert_close(dequantized.model.layers[1].self_attn.qkv_proj.weight,
                               dequantize_weight_block(qkv.weight, qkv.weight_scale_inv, torch.float32))
    toks = prompts(512)  # 3 prompts of 5, 11, 17 tokens
    with torch.no_grad():
        a, b = (PagedRun(m, 24, len(toks)).step(toks, [0] * len(toks)) for m in (model, dequantized))
    # a random tiny router has near-ties: a few tokens take another expert; judge most tokens
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert (cos > 0.99).float().mean() > 0.9, cos


def test_fp8_dense_model_logits_and_greedy_tokens(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # a dense model (no router to flip): FP8 linears vs the same weights dequantized, logits and greedy tokens
    src = make_tiny_checkpoint(str(tmp_path / "f32"), "Qwen3ForCausalLM", **{k: SHAPES[k] for k in (
        "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")})
    _fp8_checkpoint(src, str(tmp_path / "fp8"))
    path = str(tmp_path / "fp8")
    model = load(path)
    assert all(m.weight.dtype == FP8_DTYPE for m in _linears(model).values()) and len(_linears(model)) == 8
    monkeypatch.setattr(parallel_layers, "_use_fp8", lambda *a: False)
    dequantized = load(path)
    toks = prompts(512)  # 3 prompts of 5, 11, 17 tokens
    steps, tokens = _generate(model, toks, 8)
    ref_steps, ref_tokens = _generate(dequantized, toks, 8)
    # only the per-token-group FP8 rounding of the linears' inputs differs (~2^-4 relative per element)
    logits, ref_logits = steps[0], ref_steps[0]
    cos = torch.nn.functional.cosine_similarity(logits, ref_logits, dim=-1)
    assert cos.min() > 0.99, cos.min()  # measured 0.9938 min, 0.997 typical
    assert (logits - ref_logits).abs().max() < 0.1 * ref_logits.abs().max()
    # greedy tokens: equal up to the first step where the reference had a near-tie (a random tiny model's logits
    # are flat: top-2 gaps of a few hundredths occur); from there on the two continue from different contexts
    num_equal = 0
    for b, (ours, ref) in enumerate(zip(tokens, ref_tokens)):
        i = next((i for i, (x, y) in enumerate(zip(ours, ref)) if x != y), len(ref))
        num_equal += i
        if i < len(ref):
            gap = ref_steps[i][b].max() - ref_steps[i][b, ours[i]]
            assert gap < 0.05 * ref_steps[i][b].std(), (b, i, gap)
    assert num_equal >= 0.5 * sum(map(len, ref_tokens)), (tokens, ref_tokens)  # measured: 15 of 24


def test_fp8_linears_under_tp_split(fp8_glm: Any, caplog: pytest.LogCaptureFixture) -> None:
    # TP=2, rank 1 (loading only: no collective): o_proj / the MLPs split by whole blocks stay FP8; q/k/v do not
    # (a rank holds 64 rows of k), so qkv falls back to the model dtype with a log line
    _, path, stored = fp8_glm
    with caplog.at_level(logging.INFO, logger="models.parallel_layers"):
        parallel_layers._LOGGED.clear()
        model = load_model(path, read_config(path), ModelArgs(dtype=torch.float32, tp=TensorParallel(1, 2)))
    attn = model.model.layers[1].self_attn
    assert attn.qkv_proj.weight.dtype == torch.float32 and attn.qkv_proj.weight_scale_inv is None
    assert "QKVParallelLinear weight of local rows [128, 64, 64]" in caplog.text
    w = stored["model.layers.1.self_attn.o_proj.weight"]  # [256, 256]: rank 1 holds columns 128..255
    assert attn.o_proj.weight.dtype == FP8_DTYPE
    assert torch.equal(attn.o_proj.weight.view(torch.uint8), w[:, 128:].view(torch.uint8))
    torch.testing.assert_close(attn.o_proj.weight_scale_inv,
                               stored["model.layers.1.self_attn.o_proj.weight_scale_inv"][:, 1:])
    mlp = model.model.layers[0].mlp.gate_up_proj  # [gate rows 128..255; up rows 128..255]
    want = torch.cat([stored[f"model.layers.0.mlp.{x}_proj.weight"][128:] for x in ("gate", "up")])
    assert torch.equal(mlp.weight.view(torch.uint8), want.view(torch.uint8))
    # the fallback layer holds the dequantized checkpoint rows (q rows 128..255 of rank 1)
    q = dequantize_weight_block(stored["model.layers.1.self_attn.q_proj.weight"],
                                stored["model.layers.1.self_attn.q_proj.weight_scale_inv"], torch.float32)
    torch.testing.assert_close(attn.qkv_proj.weight[:128], q[128:])


def test_online_fp8_quantizes_linears(fp8_glm: Any) -> None:
    src, _, _ = fp8_glm
    online, full = load(src, quantization="fp8"), load(src)
    for name, m in _linears(online).items():
        assert m.weight.dtype == FP8_DTYPE, name
    o = online.model.layers[1].self_attn.o_proj
    q, s = quantize_weight_block(full.model.layers[1].self_attn.o_proj.weight)
    assert torch.equal(o.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(o.weight_scale_inv, s)
    toks = prompts(512)  # 3 prompts of 5, 11, 17 tokens
    with torch.no_grad():
        a, b = (PagedRun(m, 24, len(toks)).step(toks, [0] * len(toks)) for m in (online, full))
    # e4m3 weights and activations, and router near-ties (a few tokens take another expert): most tokens close
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.median() > 0.98 and cos.mean() > 0.9, cos  # measured: median 0.993, 5 of 33 tokens below 0.98
    # dummy weights (the benchmark's path): quantized float draws, positive scales
    dummy = load_model(src, read_config(src), ModelArgs(dtype=torch.float32, quantization="fp8"), "dummy")
    for name, m in _linears(dummy).items():
        assert m.weight.dtype == FP8_DTYPE and m.weight_scale_inv.gt(0).all(), name
        assert m.weight.float().abs().max() == 448  # each block's largest element maps to the e4m3 maximum


def _tp_worker(rank: int, world: int, port: int, path: str, result_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tp = TensorParallel(rank, world, dist.group.WORLD)
        model = load_model(path, read_config(path), ModelArgs(dtype=torch.float32, tp=tp))
        assert all(m.weight.dtype == FP8_DTYPE for m in _linears(model).values())
        with torch.no_grad():
            logits = PagedRun(model, 24, 3).step(prompts(512), [0, 0, 0])
        torch.save(logits, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fp8_linears_tp2_forward_matches_tp1(tmp_path: Any) -> None:
    # TP=2 on gloo: q/k/v and gate/up split by whole 128-row blocks, o and down by whole 128-column blocks (each
    # rank quantizes its own activation groups, the same groups as TP=1), partial sums all-reduced
    from tests.test_all2all import free_port, spawn_ranks

    src = make_tiny_checkpoint(str(tmp_path / "f32"), "Qwen3ForCausalLM", **{k: SHAPES[k] for k in (
        "hidden_size", "num_attention_heads", "head_dim", "intermediate_size")}, num_key_value_heads=4)
    _fp8_checkpoint(src, str(tmp_path / "fp8"))
    path = str(tmp_path / "fp8")
    with torch.no_grad():
        ref = PagedRun(load(path), 24, 3).step(prompts(512), [0, 0, 0])
    with tempfile.TemporaryDirectory() as d:
        ctx = spawn_ranks(_tp_worker, (2, free_port(), path, d), 2, 60, "TP ranks")
        for r in range(2):
            out = os.path.join(d, f"rank{r}.pt")
            assert os.path.exists(out), f"rank {r} crashed (exit code {ctx.processes[r].exitcode})"
            if r > 0:  # the logits are gathered onto TP rank 0, the one that samples
                assert torch.load(out) is None
                continue
            # the all-reduce sums in another order: fp32 rounding, and rarely an e4m3 step of an activation
            torch.testing.assert_close(torch.load(out), ref, atol=2e-3 * ref.abs().max().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_linears_triton_match_reference_on_gpu(fp8_glm: Any) -> None:
    # bf16 on the GPU: the W8A8 Triton GEMM (and the other Triton kernels) vs the torch references
    from runtime.engine.attention_backend import ATTENTION_BACKENDS

    _, path, _ = fp8_glm
    toks = prompts(512)  # 3 prompts of 5, 11, 17 tokens
    logits = []
    for use_triton in (False, True):
        model = load(path, dtype=torch.bfloat16, device="cuda", use_triton=use_triton)
        assert model.model.layers[1].self_attn.o_proj.weight.dtype == FP8_DTYPE
        run = PagedRun(model, 25, len(toks), ATTENTION_BACKENDS["triton" if use_triton else "torch"]())
        with torch.no_grad():
            prefill = run.step(toks, [0] * len(toks))
            decode = run.step([t[-1:] for t in toks], [len(t) for t in toks])
        logits.append(torch.cat([prefill, decode]))
    cos = torch.nn.functional.cosine_similarity(*logits, dim=-1)
    assert (cos > 0.99).float().mean() > 0.9, cos  # bf16 router near-ties may flip a few tokens' experts


def test_wrong_scale_blocks_fail_clearly(fp8_glm: Any, tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    from models.loader import LoadError
    from tests.test_models import _copy

    path = _copy(fp8_glm[1], str(tmp_path / "bad"))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)  # [2, 2] blocks expected
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(LoadError, match="o_proj.weight_scale_inv: expected .* shape \\[2, 2\\]"):
        load(path)
