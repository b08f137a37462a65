"""The fused attention prologue (q/k norm + RoPE + KV store) vs its torch reference, which is the four separate
reference ops it replaces; float and FP8 caches, padding slots, partial rotary, GQA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.attention.prefill import store_kv  # noqa: E402
from kernels.attention.qkv_prologue import qkv_prologue, qkv_prologue_ref  # noqa: E402
from kernels.fp8 import FP8_DTYPE  # noqa: E402
from kernels.norm import rms_norm  # noqa: E402
from kernels.rope import apply_rope, rope_cos_sin  # noqa: E402

BLOCK_SIZE = 4


def _inputs(num_tokens: int, heads: int, kv_heads: int, head_dim: int, rotary_dim: int, dtype: torch.dtype,
            cache_dtype: torch.dtype, device: str = "cpu", row_pad: int = 0) -> dict:
    gen = torch.Generator().manual_seed(num_tokens * 100 + heads * 10 + head_dim)
    width = (heads + 2 * kv_heads) * head_dim
    # a strided view: rows wider than the qkv part, as a slice of a larger output would be
    qkv = (torch.randn(num_tokens, width + row_pad, generator=gen) * 2).to(dtype).to(device)[:, :width]
    num_blocks = num_tokens // BLOCK_SIZE + 3
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding tokens: nothing stored
    cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=gen).to(cache_dtype).to(device)
    return dict(
        qkv=qkv, positions=torch.randint(0, 200, (num_tokens,), generator=gen).to(device),
        cos_sin=rope_cos_sin(rotary_dim, 200, 10000.0, device=device),
        q_norm_weight=(torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(device),
        k_norm_weight=(torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(device),
        eps=1e-6, k_cache=cache, v_cache=cache.clone() * 0.5 if cache_dtype != FP8_DTYPE else cache.clone(),
        slot_mapping=slots.to(device),
    )


def _run(fn, kw: dict, **extra) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kw = dict(kw, k_cache=kw["k_cache"].clone(), v_cache=kw["v_cache"].clone(), **extra)
    q = fn(**kw)
    return q, kw["k_cache"], kw["v_cache"]


@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(6, 2, 32, 32), (5, 1, 24, 16), (3, 3, 16, 8)])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_prologue_matches_reference(heads, kv_heads, head_dim, rotary_dim, qk_norm, dtype):
    kw = _inputs(7, heads, kv_heads, head_dim, rotary_dim, dtype, dtype, row_pad=head_dim)
    if not qk_norm:
        kw.update(q_norm_weight=None, k_norm_weight=None)
    got, want = _run(qkv_prologue, kw), _run(qkv_prologue_ref, kw)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    assert got[0].shape == (7, heads, head_dim) and got[0].dtype == dtype
    for g, w in zip(got, want):  # q, then the whole k and v caches: untouched and padding slots unchanged too
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)
    assert not torch.equal(got[1], kw["k_cache"]) and not torch.equal(got[2], kw["v_cache"])  # it did store


def _separate_kernels(qkv, positions, cos_sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
                      k_scale=1.0, v_scale=1.0):
    # what the fused kernel replaces, launch by launch (Triton rms_norm x2, apply_rope, store_kv)
    kv_heads, head_dim = k_cache.shape[2:]
    q, k, v = qkv.split([qkv.shape[1] - 2 * kv_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = (x.reshape(x.shape[0], -1, head_dim) for x in (q, k, v))
    q = rms_norm(q.reshape(-1, head_dim), q_norm_weight, eps).view_as(q)
    k = rms_norm(k.reshape(-1, head_dim), k_norm_weight, eps).view_as(k)
    q, k = apply_rope(positions, q, k, cos_sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.5, 0.25), (0.3, 1.7)])
def test_qkv_prologue_fp8_cache(dtype, k_scale, v_scale):
    # against the separate Triton kernels: the interpreter's own fp32 -> e4m3 cast (which can lose a rounding
    # carry into the exponent) then applies to both sides alike
    kw = _inputs(9, 4, 2, 32, 16, dtype, FP8_DTYPE)
    kw["qkv"] = kw["qkv"] * 40  # some values past 448 * scale: saturated, not NaN
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    got, want = _run(qkv_prologue, kw, **scales), _run(_separate_kernels, kw, **scales)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-3, atol=2e-3)
    for g, w in zip(got[1:], want[1:]):
        g, w = g.float(), w.float()
        assert not g.isnan().any()
        assert (g == w).float().mean() > 0.98  # a value on a rounding boundary may land one e4m3 step away
        torch.testing.assert_close(g, w, rtol=0.13, atol=2.0**-9)
    if v_scale < 1:
        assert got[2].float().abs().max() == 448
    ref = _run(qkv_prologue_ref, kw, **scales)  # the torch reference agrees on most values (see above)
    assert all((g.float() == r.float()).float().mean() > 0.95 for g, r in zip(got[1:], ref[1:]))


def test_qkv_prologue_checks_shapes():
    kw = _inputs(3, 4, 2, 16, 16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="qkv"):
        qkv_prologue(**dict(kw, qkv=kw["qkv"][:, :-16]))
    with pytest.raises(ValueError, match="go together"):
        qkv_prologue(**dict(kw, k_norm_weight=None))
    with pytest.raises(ValueError, match="cos_sin"):
        qkv_prologue(**dict(kw, cos_sin=rope_cos_sin(32, 10, 1e4)))
    assert qkv_prologue(**dict(kw, qkv=kw["qkv"][:0], positions=kw["positions"][:0],
                               slot_mapping=kw["slot_mapping"][:0])).shape == (0, 4, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 3000])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_DTYPE])
def test_qkv_prologue_gpu(num_tokens, cache_dtype):
    # Qwen3-30B-A3B's attention: 32 q heads, 4 kv heads, head_dim 128
    kw = _inputs(num_tokens, 32, 4, 128, 128, torch.bfloat16, cache_dtype, device="cuda")
    got, want = _run(qkv_prologue, kw, k_scale=0.5, v_scale=0.5), _run(qkv_prologue_ref, kw, k_scale=0.5, v_scale=0.5)
    for g, w in zip(got, want):
        g, w = g.float(), w.float()
        assert (g == w).float().mean() > 0.97
        torch.testing.assert_close(g, w, rtol=0.13, atol=2e-2)
