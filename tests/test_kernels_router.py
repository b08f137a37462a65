"""Router top-k kernels vs their torch references; ids compared as sets (ties may reorder)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.router import (  # noqa: E402
    topk_sigmoid_grouped,
    topk_sigmoid_grouped_ref,
    topk_softmax,
    topk_softmax_ref,
)


def _check(weights, ids, ref_weights, ref_ids):
    # sort each row by id so that order differences do not matter
    ids_s, order = ids.long().sort(dim=-1)
    ref_s, ref_order = ref_ids.long().sort(dim=-1)
    assert torch.equal(ids_s, ref_s)
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), rtol=1e-5, atol=1e-6)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (60, 4), (128, 8), (5, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_softmax(num_experts, top_k, renormalize, dtype):
    torch.manual_seed(num_experts)
    logits = (torch.randn(19, num_experts) * 3).to(dtype)
    _check(*topk_softmax(logits, top_k, renormalize), *topk_softmax_ref(logits, top_k, renormalize))


@pytest.mark.parametrize("num_experts,top_k,groups,topk_groups", [(64, 6, 8, 3), (128, 8, 1, 1), (96, 4, 4, 2)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_sigmoid_grouped(num_experts, top_k, groups, topk_groups, renormalize):
    torch.manual_seed(num_experts + groups)
    logits = torch.randn(23, num_experts) * 2
    bias = torch.randn(num_experts) * 0.5
    args = (logits, bias, top_k, groups, topk_groups, renormalize, 2.5)
    _check(*topk_sigmoid_grouped(*args), *topk_sigmoid_grouped_ref(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 333, 4096])
def test_routers_gpu(num_tokens):
    logits = torch.randn(num_tokens, 128, device="cuda", dtype=torch.bfloat16) * 3
    _check(*topk_softmax(logits, 8, True), *topk_softmax_ref(logits, 8, True))
    bias = torch.randn(256, device="cuda") * 0.1
    logits = torch.randn(num_tokens, 256, device="cuda")
    args = (logits, bias, 8, 8, 4, True, 2.5)
    _check(*topk_sigmoid_grouped(*args), *topk_sigmoid_grouped_ref(*args))
