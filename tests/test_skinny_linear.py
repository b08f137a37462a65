"""kernels/skinny_linear.py against F.linear on odd sizes (the interpreter on the CPU, fp16/fp32 inputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.skinny_linear import MAX_ROWS, linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("m,n,k,bias", [(1, 37, 300, False), (5, 129, 513, True), (16, 64, 256, False),
                                        (3, 1000, 77, True)])
def test_skinny_linear_matches_f_linear(m: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.float16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, torch.float16)
    b = torch.randn(n, generator=g).to(DEVICE, torch.float16) if bias else None
    ref = F.linear(x.float(), w.float(), b.float() if b is not None else None)
    out = linear(x, w, b)
    assert out.shape == (m, n) and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), ref, atol=3e-3, rtol=3e-3)


def test_more_rows_or_strided_input_fall_back_to_f_linear() -> None:
    w = torch.randn(24, 40, dtype=torch.float16, device=DEVICE)
    for x in (torch.randn(MAX_ROWS + 1, 40, dtype=torch.float16, device=DEVICE),
              torch.randn(40, 3, dtype=torch.float16, device=DEVICE).t()):
        torch.testing.assert_close(linear(x, w), F.linear(x, w))
