"""RMSNorm (+residual), RoPE (full and partial rotary) and SiLU-and-mul vs their torch references."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.norm import rms_norm, rms_norm_ref  # noqa: E402
from kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin  # noqa: E402


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("hidden", [33, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(hidden, dtype, with_residual):
    torch.manual_seed(hidden)
    x = torch.randn(7, hidden).to(dtype)
    w = (torch.rand(hidden) + 0.5).to(dtype)
    res = torch.randn(7, hidden).to(dtype) if with_residual else None
    got, want = rms_norm(x, w, 1e-6, res), rms_norm_ref(x, w, 1e-6, res)
    if with_residual:
        _close(got[0], want[0], dtype)
        _close(got[1], want[1], dtype)
    else:
        _close(got, want, dtype)


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (32, 16), (48, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope(head_dim, rotary_dim, dtype):
    torch.manual_seed(head_dim)
    cs = rope_cos_sin(rotary_dim, 100, 10000.0)
    qkv = torch.randn(5, (6 + 2 * 2) * head_dim).to(dtype)
    q = qkv[:, : 6 * head_dim].view(5, 6, head_dim)  # strided views, as the attention layer makes them
    k = qkv[:, 6 * head_dim : 8 * head_dim].view(5, 2, head_dim)
    pos = torch.tensor([0, 3, 99, 17, 42])
    for got, want in zip(apply_rope(pos, q, k, cs), apply_rope_ref(pos, q, k, cs)):
        _close(got, want, dtype)


@pytest.mark.gpu
def test_small_kernels_gpu():
    dt = torch.bfloat16
    x, res = torch.randn(2, 333, 4096, device="cuda", dtype=dt)
    w = torch.rand(4096, device="cuda", dtype=dt) + 0.5
    for got, want in zip(rms_norm(x, w, 1e-6, res), rms_norm_ref(x, w, 1e-6, res)):
        _close(got, want, dt)
    cs = rope_cos_sin(64, 40000, 1e6, device="cuda")
    q, k = torch.randn(333, 32, 128, device="cuda", dtype=dt), torch.randn(333, 4, 128, device="cuda", dtype=dt)
    pos = torch.randint(0, 40000, (333,), device="cuda")
    for got, want in zip(apply_rope(pos, q, k, cs), apply_rope_ref(pos, q, k, cs)):
        _close(got, want, dt)
