"""The fused router (GEMM + scoring + top-k in one launch) vs F.linear + the torch top-k references."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.count_launches import count_launches  # noqa: E402
from kernels import router_fused  # noqa: E402
from kernels.router_fused import FUSED_MAX_TOKENS, FUSED_MAX_TOKENS_FP32, route_fused, route_fused_ref  # noqa: E402
from models.args import ModelArgs  # noqa: E402
from models.moe import Router, RoutingSpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(num_tokens: int, num_experts: int, hidden: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(num_experts, hidden, generator=gen) * 2 / hidden**0.5).to(DEVICE, dtype)
    bias = (torch.randn(num_experts, generator=gen) * 0.3).to(DEVICE)
    return x, w, bias


def _check(out, ref):
    # ids compared as sets per row (the grouped kernels may order them differently), weights in the same order
    (w, ids), (ref_w, ref_ids) = out, ref
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == ref_ids.shape
    ids_s, order = ids.long().sort(dim=-1)
    ref_s, ref_order = ref_ids.long().sort(dim=-1)
    assert torch.equal(ids_s, ref_s)
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_experts,hidden", [(8, 64), (16, 200), (64, 200), (64, 64)])
@pytest.mark.parametrize("num_tokens", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_softmax(num_tokens, num_experts, hidden, dtype):
    x, w, _ = _inputs(num_tokens, num_experts, hidden, dtype, num_tokens * 100 + num_experts)
    for top_k, renormalize in ((1, False), (min(8, num_experts), True)):
        _check(route_fused(x, w, top_k, renormalize), route_fused_ref(x, w, top_k, renormalize))


@pytest.mark.parametrize("num_experts,groups,topk_groups,top_k", [(16, 1, 1, 4), (16, 4, 2, 3), (64, 8, 3, 6)])
@pytest.mark.parametrize("num_tokens", [1, 7])
@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_sigmoid_grouped(num_tokens, num_experts, groups, topk_groups, top_k, renormalize):
    # GLM keeps its router weight in fp32 while activations are 16-bit: x is cast inside the kernel
    x, w, bias = _inputs(num_tokens, num_experts, 200, torch.float32, num_experts + groups)
    x = x.half()
    args = (x, w, top_k, renormalize, None, bias, groups, topk_groups, 2.5)
    _check(route_fused(*args), route_fused_ref(*args))


@pytest.mark.parametrize("grouped", [False, True])
def test_fused_padding_rows_get_no_experts(grouped):
    x, w, bias = _inputs(7, 16, 64, torch.float32, 5)
    slots = torch.tensor([3, -1, 9, 4, -1, 0, -1], device=DEVICE)
    extra = (bias, 4, 2, 2.5) if grouped else ()
    (ids_w, ids), ref, (w_all, ids_all) = (f(x, w, 4, True, s, *extra) for f, s in
                                           ((route_fused, slots), (route_fused_ref, slots), (route_fused, None)))
    pad = slots < 0
    assert (ids[pad] == -1).all() and (ids_all[pad] >= 0).all()
    assert torch.equal(ids[~pad], ids_all[~pad]) and torch.equal(ids_w, w_all)
    _check((ids_w[~pad], ids[~pad]), (ref[0][~pad], ref[1][~pad]))
    assert (ref[1][pad] == -1).all()
    for bad in (slots[:-1], slots < 0):  # a bool padding mask is not slot ids
        with pytest.raises(ValueError, match="slots"):
            route_fused(x, w, 4, True, bad, *extra)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_fused_splits_and_token_blocks(num_splits):
    # 20 tokens = two token blocks, each with its own counter and last program; any H split sums to the same
    # logits; the counters are back at zero for the next launch (a CUDA graph replay)
    x, w, bias = _inputs(20, 64, 200, torch.float32, num_splits)
    ref = route_fused_ref(x, w, 6, True)
    first = route_fused(x, w, 6, True, num_splits=num_splits)
    _check(first, ref)
    again = route_fused(x, w, 6, True, num_splits=num_splits)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # deterministic, re-armed
    assert not router_fused._COUNTERS[x.device].any()
    _check(route_fused(x, w, 6, True, None, bias, 8, 3, 1.0, num_splits=num_splits),
           route_fused_ref(x, w, 6, True, None, bias, 8, 3, 1.0))


@pytest.mark.parametrize("num_tokens", [1, 3, 7, 16])
def test_fused_gemm_forms_agree(num_tokens):
    # products summed in registers (the default up to GEMV_MAX_TOKENS rows) or a 16-row tl.dot tile: same routing
    x, w, bias = _inputs(num_tokens, 64, 200, torch.float32, 11)
    ref = route_fused_ref(x, w, 6, True, None, bias, 8, 3, 2.5)
    for gemv in (True, False):
        _check(route_fused(x, w, 6, True, None, bias, 8, 3, 2.5, gemv=gemv), ref)
    with pytest.raises(ValueError, match="gemv"):
        route_fused(x.repeat(17, 1), w, 6, True, gemv=True)  # more rows than one token block


@pytest.mark.parametrize("num_tokens,num_experts,top_k,dtype", [
    (n, e, k, dtype) for n, e, k in ((1, 128, 8), (3, 48, 5), (2, 8, 3))
    for dtype in (torch.float32, torch.float16, torch.bfloat16)] + [(20, 64, 40, torch.float32)])  # (20 rows: slow)
def test_fused_tail_variants_same_bits(num_tokens, num_experts, top_k, dtype):
    # the tail variants (TAIL_CONFIGS): the packed-key softmax top-k (bf16 logits: int32 keys, else int64; one group
    # of all columns at one warp, groups of 32 past it: 48 experts = a group and a half, top_k 40 > 32 per group,
    # 20 rows = two token blocks) picks the same ids in the same order, and the same weights, as the default tail
    x, w, _ = _inputs(num_tokens, num_experts, 72, dtype, num_tokens + top_k)
    for renormalize in (True, False):
        # the default tail spelled out: with TAIL_CONFIGS on, route_fused's own choice at 1, 2 and 20 rows is packed
        want = route_fused(x, w, top_k, renormalize, **router_fused.TAIL_DEFAULT)
        if dtype == torch.float32:
            _check(want, route_fused_ref(x, w, top_k, renormalize))
        for num_warps in (1, 2, 4):
            got = route_fused(x, w, top_k, renormalize, num_warps=num_warps, packed=True)
            assert torch.equal(got[1], want[1]), (num_warps, renormalize)
            # renormalize: the picks' exps summed one by one in pick order in both tails, the same bits on a GPU too
            # (a tl.sum over the [rows, top_k] tile ran in its layout's order: 4 warps and 1 or 4p differ); without
            # it the softmax denominator sums every expert in the layout's order
            exact = renormalize or DEVICE == "cpu"
            torch.testing.assert_close(got[0], want[0], rtol=0 if exact else 1e-6, atol=0)
    with pytest.raises(ValueError, match="num_warps"):
        route_fused(x, w, top_k, True, num_warps=3)


def test_tail_config_by_rows(monkeypatch):
    # TAIL_CONFIGS: the first entry covering the batch, the default past the last
    one, few = {"num_warps": 1, "packed": True}, {"num_warps": 2, "packed": True}
    monkeypatch.setattr(router_fused, "TAIL_CONFIGS", ((2, one), (8, few)))
    assert [router_fused.tail_config(m) for m in (1, 2, 3, 8, 9)] == [one, one, few, few, router_fused.TAIL_DEFAULT]


def test_fused_ties_pick_lowest_expert():
    # exact ties (logits from a few bf16 values, -inf-free, zeros among them): the lowest expert id first in every
    # round, kernels/router.py's rule; the packed keys order (value, -id)
    num_experts, hidden = 64, 32
    x = torch.zeros(2, hidden)
    x[:, 0] = 1.0
    x[1, 0] = -1.0  # the second row's order reversed: ties among other values
    vals = torch.tensor([0.5, -0.25, 0.0, 0.5, 1.0, 0.0, -0.25, 1.0])
    w = torch.zeros(num_experts, hidden)
    w[:, 0] = vals.repeat(num_experts // len(vals))
    x, w = x.to(DEVICE, torch.bfloat16), w.to(DEVICE, torch.bfloat16)
    logits = torch.nn.functional.linear(x, w).float()
    # descending by value, ascending id among equals (a stable sort keeps the lower id first)
    want = logits.sort(dim=-1, descending=True, stable=True)[1][:, :20].to(torch.int32)
    for packed in (False, True):
        assert torch.equal(route_fused(x, w, 20, True, packed=packed)[1], want), packed


def test_fused_config_is_from_shapes():
    # Qwen3-30B-A3B on an H200: one program per SM or fewer, partials per token block within the bound
    for num_tokens in (1, 8, 16, 33, 64):
        splits, block_h = router_fused._fused_config(num_tokens, 128, 2048, 132)
        programs = splits * 8 * -(-num_tokens // 16)
        assert splits & (splits - 1) == 0 and programs <= 132 and 16 <= block_h <= 128
        assert splits * min(num_tokens, 16) * 128 * 4 <= router_fused.MAX_PARTIAL_BYTES
    assert router_fused._fused_config(1, 128, 2048, 132)[0] == 16


def test_fused_bad_inputs():
    x, w, bias = _inputs(3, 16, 64, torch.float32, 1)
    with pytest.raises(ValueError, match="weight"):
        route_fused(x, w[:, :32], 2, True)
    with pytest.raises(ValueError, match="top_k"):
        route_fused(x, w, 17, True)
    with pytest.raises(ValueError, match="num_groups"):
        route_fused(x, w, 2, True, None, bias, 3, 1)
    with pytest.raises(ValueError, match="correction_bias"):
        route_fused(x, w, 2, True, None, bias[:8], 2, 1)


@pytest.mark.parametrize("grouped", [False, True])
def test_router_takes_fused_path_at_decode_sizes(grouped):
    # the Triton Router: one fused launch up to FUSED_MAX_TOKENS rows, F.linear + the top-k kernel above;
    # both agree with the torch reference Router
    spec = RoutingSpec(16, 4, True, "sigmoid_grouped", 4, 2, 2.5) if grouped else RoutingSpec(16, 4, True)
    routers = [Router(64, spec, ModelArgs(dtype=torch.float32, device=DEVICE, use_triton=t)).to(DEVICE)
               for t in (False, True)]
    x, w, bias = _inputs(FUSED_MAX_TOKENS + 1, 16, 64, torch.float32, 2)
    for r in routers:
        r.weight.data.copy_(w)
        if grouped:
            r.e_score_correction_bias.data.copy_(bias)
    slots = torch.arange(x.shape[0], device=DEVICE)
    slots[::5] = -1
    limit = FUSED_MAX_TOKENS_FP32 if grouped else FUSED_MAX_TOKENS  # GLM's fp32 weight: fused only to 8 rows
    for rows in (2, limit + 1, FUSED_MAX_TOKENS + 1):
        with count_launches() as log:
            out = routers[1](x[:rows], slots[:rows])
        assert (log.events.count("triton:_route_fused_kernel") == 1) == (rows <= limit), log.events
        ref, keep = routers[0](x[:rows], slots[:rows]), slots[:rows] >= 0
        assert (out[1][~keep] == -1).all() and (ref[1][~keep] == -1).all()
        _check((out[0][keep], out[1][keep]), (ref[0][keep], ref[1][keep]))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 5, 16, 33, 64])
@pytest.mark.parametrize("shape", ["qwen3", "glm45air"])
@pytest.mark.parametrize("tail", [(4, False), (1, True), (4, True)])
def test_fused_router_gpu_matches_unfused_and_replays(num_tokens, shape, tail):
    # Qwen3-30B-A3B (bf16 weight, softmax) and GLM-4.5-Air (fp32 weight, sigmoid, 1 group): the same ids in the
    # same order as F.linear + the top-k kernel; a CUDA graph of the fused router replays exactly with new inputs
    from kernels.router import topk_sigmoid_grouped, topk_softmax

    grouped = shape == "glm45air"
    hidden, wdtype = (4096, torch.float32) if grouped else (2048, torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    w = (torch.randn(128, hidden, device="cuda", generator=gen) / hidden**0.5).to(wdtype)
    bias = torch.randn(128, device="cuda", generator=gen) * 0.1 if grouped else None
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    slots = torch.arange(num_tokens, device="cuda")
    slots[1::3] = -1
    extra = (bias, 1, 1, 1.0) if grouped else ()
    variant = dict(num_warps=tail[0], packed=tail[1])  # the tail variants (TAIL_CONFIGS) bench_router.py times
    out = route_fused(x, w, 8, True, slots, *extra, **variant)
    logits = torch.nn.functional.linear(x.to(wdtype), w)
    ref = (topk_sigmoid_grouped(logits, bias, 8, 1, 1, True, 1.0, slots) if grouped
           else topk_softmax(logits, 8, True, slots))
    assert torch.equal(out[1], ref[1])
    # bf16: a logit summed in another order may round one bf16 ulp apart (cuBLAS vs our split sums)
    tol = dict(rtol=1e-5, atol=1e-6) if grouped else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(out[0], ref[0], **tol)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [route_fused(x, w, 8, True, slots, *extra, **variant) for _ in range(3)]  # counters re-arm
    x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        expect = route_fused(x, w, 8, True, slots, *extra, **variant)
        for got in captured:
            assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


@pytest.mark.parametrize("num_experts", [64, 60])
def test_nan_logits_rank_first_with_valid_ids(num_experts):
    # NaN logits (a NaN hidden state, a NaN router weight row): tl.max skips NaN, so the float pick of
    # kernels/router.py matched no column on a row of NaN and gave expert id num_experts (E=64) or a padding column's
    # (E=60), which the GEMV/one-token MoE kernels index with. Now every path ranks NaN (of either sign) above every
    # number, lowest id first, as the packed keys do: the same ids in range and distinct, and NaN weights
    from kernels.router import topk_sigmoid_grouped, topk_softmax

    x, w, bias = _inputs(4, num_experts, 32, torch.float32, 3)
    w[5] = float("nan")  # expert 5's logit is NaN in every row: picked first
    x[1] = float("nan")  # every logit of row 1 NaN
    x[2] = -x[1]  # negative NaNs
    w[7, 0] = float("inf")
    x[3, 0] = 1.0  # row 3: expert 7's logit +inf, after NaN
    logits = torch.nn.functional.linear(x, w)
    want = torch.tensor([[5, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]], dtype=torch.int32)
    outs = [route_fused(x, w, 6, renormalize, **variant) for renormalize in (True, False)
            for variant in (router_fused.TAIL_DEFAULT, dict(num_warps=1, packed=True), dict(num_warps=4, packed=True))]
    outs += [topk_softmax(logits, 6, renormalize) for renormalize in (True, False)]
    for weights, ids in outs:
        assert torch.equal(ids[1:3], want[1:]) and ids[0, 0] == 5 and ids[3, :2].tolist() == [5, 7], ids
        assert torch.equal(ids, outs[0][1]) and weights.isnan().all()
    ids = topk_sigmoid_grouped(logits, bias, 6, 4, 2, True, 1.0)[1]
    assert ((ids >= 0) & (ids < num_experts)).all() and all(len(set(r)) == 6 for r in ids.tolist()), ids
