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


@pytest.mark.parametrize("grouped", [False, True])
def test_padding_rows_get_no_experts(grouped):
    # slots < 0 (padding) -> ids -1 in the top-k kernel itself, no separate mask launch; other rows unchanged
    torch.manual_seed(3)
    logits = torch.randn(21, 64) * 2
    slots = torch.randint(0, 1000, (21,))
    slots[[0, 5, 6, 20]] = -1
    if grouped:
        bias = torch.randn(64) * 0.5
        route, ref = (lambda s, f=f: f(logits, bias, 6, 8, 3, True, 2.5, s) for f in (topk_sigmoid_grouped,
                                                                               topk_sigmoid_grouped_ref))
    else:
        route, ref = (lambda s, f=f: f(logits, 4, True, s) for f in (topk_softmax, topk_softmax_ref))
    (w, ids), (ref_w, ref_ids), (w_all, ids_all) = route(slots), ref(slots), route(None)
    pad = slots < 0
    assert (ids[pad] == -1).all() and (ref_ids[pad] == -1).all() and (ids_all[pad] >= 0).all()
    _check(w[~pad], ids[~pad], ref_w[~pad], ref_ids[~pad])
    assert torch.equal(ids[~pad], ids_all[~pad]) and torch.equal(w, w_all)
    for bad in (slots[:-1], slots < 0):  # a bool padding mask is not slot ids
        for fn in (route, ref):
            with pytest.raises(ValueError, match="slots"):
                fn(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 333, 4096])
def test_routers_gpu(num_tokens):
    logits = torch.randn(num_tokens, 128, device="cuda", dtype=torch.bfloat16) * 3
    _check(*topk_softmax(logits, 8, True), *topk_softmax_ref(logits, 8, True))
    bias = torch.randn(256, device="cuda") * 0.1
    logits = torch.randn(num_tokens, 256, device="cuda")
    args = (logits, bias, 8, 8, 4, True, 2.5)
    _check(*topk_sigmoid_grouped(*args), *topk_sigmoid_grouped_ref(*args))
