"""The MoE top-k sum fused into the next RMSNorm (kernels/norm.py with kernels/moe_sum.py TopKSlots): bit for bit
the separate sum + norm kernels, from the experts' deferred outputs, and through whole models with the fusion on
and off (on the CPU: tests/test_fusion_model_logits.py)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.fused_moe import fused_experts  # noqa: E402
from kernels.moe_config import default_config  # noqa: E402
from kernels.moe_sum import TopKSlots, moe_sum, moe_sum_ref  # noqa: E402
from kernels.norm import rms_norm, rms_norm_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def _slots(num_tokens: int, top_k: int, hidden: int, dtype: torch.dtype, shared: bool, seed: int) -> TopKSlots:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (num_tokens, top_k), generator=gen, dtype=torch.int32)
    ids[torch.rand(num_tokens, top_k, generator=gen) < 0.3] = -1  # slots handled on another rank
    y = torch.randn(num_tokens * top_k, hidden, generator=gen).to(dtype)
    y[(ids < 0).flatten()] = float("nan")  # an unhandled slot's row is never written: must not be read
    extra = torch.randn(num_tokens, hidden, generator=gen).to(dtype) if shared else None
    return TopKSlots(y.to(DEV), ids.to(DEV), None if extra is None else extra.to(DEV))


@pytest.mark.parametrize("num_tokens", [1, 3, 17])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_equals_sum_then_norm(num_tokens: int, top_k: int, dtype: torch.dtype) -> None:
    hidden = 200  # not a power of two: masked columns in the 256-wide row
    gen = torch.Generator().manual_seed(top_k)
    w = (torch.rand(hidden, generator=gen) + 0.5).to(dtype).to(DEV)
    res = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(DEV)
    for shared in (False, True):
        slots = _slots(num_tokens, top_k, hidden, dtype, shared, seed=num_tokens * 10 + top_k)
        summed = moe_sum(TopKSlots(slots.y, slots.topk_ids))  # today's two launches (+ the shared experts' add)
        if shared:
            summed = summed + slots.extra
        want, want_res = rms_norm(summed, w, EPS, res)
        got, got_res = rms_norm(slots, w, EPS, res)
        assert torch.equal(got_res, want_res) and torch.equal(got, want), (shared, (got - want).abs().max())
        assert not got.isnan().any()
        # the torch references: the same sum bit for bit, the norm to rounding
        assert torch.equal(moe_sum_ref(slots), slots.sum()) and torch.equal(slots.sum(), summed)
        ref, ref_res = rms_norm_ref(slots, w, EPS, res)
        assert torch.equal(ref_res, got_res)
        torch.testing.assert_close(ref, got, rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)


def test_bad_slots_are_refused() -> None:
    slots = _slots(3, 2, 40, torch.float32, False, 0)
    w, res = torch.ones(40, device=DEV), torch.zeros(3, 40, device=DEV)
    with pytest.raises(ValueError, match="needs the residual"):
        rms_norm(slots, w, EPS)
    with pytest.raises(ValueError, match=r"y \(5, 40\) must be \[tokens \* top_k = 6, hidden\]"):
        rms_norm(TopKSlots(slots.y[:5], slots.topk_ids), w, EPS, res)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(slots, w, EPS, res[:2])
    with pytest.raises(ValueError, match="already carry"):
        slots.with_extra(res).with_extra(res)


def _experts(num_tokens: int, top_k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    e, h, i = 8, 72, 40
    hidden = torch.randn(num_tokens, h, generator=gen).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=gen) * i**-0.5).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
    ids[0, -1] = -1  # one slot handled elsewhere
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return tuple(t.to(DEV) for t in (hidden, w13, w2, weights, ids))


_GEMV_TILE = {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}


@pytest.mark.parametrize("num_tokens,path", [(1, "dot"), (3, "dot"), (1, "gemv"), (3, "gemv"),
                                             (1, "fused_sum"), (3, "down_topk")])
def test_experts_defer_sum(num_tokens: int, path: str) -> None:
    # the experts leave their per-slot outputs where they would launch the top-k sum; the norm over them equals the
    # norm over the summed output bit for bit. fused_sum (in the down GEMM) and down_topk sum themselves
    dtype, top_k = torch.float16, 2
    hidden, w13, w2, weights, ids = _experts(num_tokens, top_k, dtype)
    config = default_config(num_tokens, w13.shape[0], top_k, False)
    if path != "dot":
        gemv = {"up": _GEMV_TILE, "down": _GEMV_TILE, "max_tokens": 8, "fused_sum": path == "fused_sum",
                "down_topk": path == "down_topk", "pdl": False, "prefetch": False}
        config = dict(config, gemv=gemv)
    summed = fused_experts(hidden, w13, w2, weights, ids, config=config)
    deferred = fused_experts(hidden, w13, w2, weights, ids, config=config, defer_sum=True)
    assert isinstance(deferred, TopKSlots) == (path in ("dot", "gemv")), type(deferred)
    w = torch.rand(hidden.shape[1], device=DEV).to(dtype) + 0.5
    res = torch.randn(num_tokens, hidden.shape[1], device=DEV).to(dtype)
    for got, want in zip(rms_norm(deferred, w, EPS, res), rms_norm(summed, w, EPS, res)):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- whole models


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe"])
def test_model_logits_unchanged_by_fusion_bf16_gpu(arch: str) -> None:
    from tests.test_fusion_model_logits import _logits

    plain, _, _ = _logits(arch, defer=False, dtype=torch.bfloat16)
    fused, launches, deferred = _logits(arch, defer=True, dtype=torch.bfloat16)
    assert torch.equal(fused, plain) and any(deferred) and "triton:_moe_sum_kernel" not in launches


def test_moe_defers_only_where_it_owns_the_sum() -> None:
    # EP (the combine sums), TP (the all-reduce needs the sum) and the torch reference keep today's output
    from benchmarks.count_launches import CONFIGS
    from models.args import ModelArgs, TensorParallel
    from models.forward_batch import ForwardBatch
    from models.loader import load_model

    cfg = dict(CONFIGS["qwen3_moe"], num_hidden_layers=1)
    x = torch.randn(3, cfg["hidden_size"], device=DEV)
    batch = ForwardBatch(slot_mapping=torch.arange(3, device=DEV), cu_seqlens_q=None, seq_lens=None,
                         block_tables=None, max_seqlen_q=1, max_seqlen_k=1, is_decode=True, kv_caches=[],
                         attn_backend=None)
    for kw, can in ((dict(use_triton=True), True), (dict(use_triton=False), False),
                    (dict(use_triton=True, ep_size=2, ep_rank=1), False),
                    (dict(use_triton=True, tp=TensorParallel(0, 2)), False)):
        model = load_model("", cfg, ModelArgs(dtype=torch.float32, device=DEV, seed=1, **kw), "dummy")
        layer = model.model.layers[0]
        assert layer.defer_moe_sum is can and layer.mlp.can_defer_sum is can, kw
        if "tp" in kw:
            continue  # a TP layer's forward needs its process group
        out = layer.mlp(x, batch, defer_sum=True)
        assert isinstance(out, TopKSlots) is can, kw
        if can:
            torch.testing.assert_close(out.sum(), layer.mlp(x, batch), atol=0, rtol=0)


def test_served_rank_with_its_local_dispatcher_defers() -> None:
    # a served MoE rank (runtime/cluster/rank_loop.py build_engine) always has a dispatcher, at EP 1 the LocalBackend
    # that counts the routing for the expert statistics: the fusion must hold there too (it was off in every server),
    # the routing still counted; a dispatcher whose combine is not known to be the identity keeps the sum
    from benchmarks.count_launches import CONFIGS
    from models.args import ModelArgs
    from models.forward_batch import ForwardBatch
    from models.loader import load_model
    from runtime.distributed.all2all import LocalBackend
    from runtime.distributed.expert_stats import ExpertStats
    from runtime.distributed.parallel import single_rank

    cfg = dict(CONFIGS["qwen3_moe"], num_hidden_layers=1)
    x = torch.randn(3, cfg["hidden_size"], device=DEV)
    batch = ForwardBatch(slot_mapping=torch.arange(3, device=DEV), cu_seqlens_q=None, seq_lens=None,
                         block_tables=None, max_seqlen_q=1, max_seqlen_k=1, is_decode=True, kv_caches=[],
                         attn_backend=None)
    num_experts = cfg["num_experts"]
    stats = ExpertStats(1, num_experts, torch.device(DEV), max_tokens=16)
    local = LocalBackend(single_rank(DEV), num_experts, 16, stats)
    served = load_model("", cfg, ModelArgs(dtype=torch.float32, device=DEV, use_triton=True, seed=1, dispatcher=local),
                        "dummy")
    plain = load_model("", cfg, ModelArgs(dtype=torch.float32, device=DEV, use_triton=True, seed=1), "dummy")
    layer = served.model.layers[0]
    assert layer.defer_moe_sum and layer.mlp.can_defer_sum
    out = layer.mlp(x, batch, defer_sum=True)
    assert isinstance(out, TopKSlots)
    torch.testing.assert_close(out.sum(), plain.model.layers[0].mlp(x, batch), atol=0, rtol=0)
    assert int(stats.routed_tokens.sum()) == 3 * cfg["num_experts_per_tok"]  # every (token, slot) counted

    class Opaque:  # a duck-typed dispatcher (tests/test_models.py LoopbackDispatcher): nothing known of its combine
        def dispatch(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> tuple:
            return hidden, topk_weights, topk_ids, None

        def combine(self, out_recv: torch.Tensor, handle: None) -> torch.Tensor:
            assert isinstance(out_recv, torch.Tensor)
            return out_recv

    model = load_model("", cfg, ModelArgs(dtype=torch.float32, device=DEV, use_triton=True, seed=1,
                                          dispatcher=Opaque()), "dummy")
    assert not model.model.layers[0].defer_moe_sum
    assert isinstance(model.model.layers[0].mlp(x, batch, defer_sum=True), torch.Tensor)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 64])
def test_fused_norm_after_experts_in_cuda_graph_gpu(num_tokens: int) -> None:
    # Qwen3-30B-A3B shapes, bf16, the GPU's tuned MoE table (H200: the GEMVs at 1 / 8 tokens, align + tl.dot at 64)
    # and PDL where it is on: the experts then the fused sum + residual + norm, eager and as CUDA-graph replays on
    # new inputs, bit for bit the experts' own sum then the norm
    gen = torch.Generator(device="cuda").manual_seed(0)
    e, h, i, top_k, dt = 128, 2048, 768, 8, torch.bfloat16
    w13 = torch.randn(e, 2 * i, h, device="cuda", generator=gen).mul_(h**-0.5).to(dt)
    w2 = torch.randn(e, h, i, device="cuda", generator=gen).mul_(i**-0.5).to(dt)
    w = torch.rand(h, device="cuda", generator=gen).to(dt) + 0.5
    x, res = (torch.randn(num_tokens, h, device="cuda", generator=gen).to(dt) for _ in "xr")
    weights = torch.rand(num_tokens, top_k, device="cuda", generator=gen)
    ids = torch.rand(num_tokens, e, device="cuda", generator=gen).argsort(-1)[:, :top_k].to(torch.int32).contiguous()

    def both() -> list[torch.Tensor]:
        slots = fused_experts(x, w13, w2, weights, ids, defer_sum=True)
        assert isinstance(slots, TopKSlots)
        return [*rms_norm(slots, w, EPS, res), *rms_norm(fused_experts(x, w13, w2, weights, ids), w, EPS, res)]

    eager = both()
    assert torch.equal(eager[0], eager[2]) and torch.equal(eager[1], eager[3])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = both()
    for _ in range(50):
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
        res.copy_(torch.randn(res.shape, device="cuda", generator=gen))
        ids.copy_(torch.rand(num_tokens, e, device="cuda", generator=gen).argsort(-1)[:, :top_k])
        graph.replay()
        assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    torch.cuda.synchronize()


def test_fusion_switches_read_once_when_model_args_are_made(monkeypatch: pytest.MonkeyPatch) -> None:
    # models/args.py: 0 / 1 / unset (the default: the MoE sum fused, the router norm not), anything else an error
    from models.args import ModelArgs

    monkeypatch.delenv("MOE_RT_FUSE_MOE_SUM", raising=False)
    monkeypatch.delenv("MOE_RT_FUSE_ROUTER_NORM", raising=False)
    args = ModelArgs()
    assert args.fuse_moe_sum and not args.fuse_router_norm
    monkeypatch.setenv("MOE_RT_FUSE_MOE_SUM", "0")
    monkeypatch.setenv("MOE_RT_FUSE_ROUTER_NORM", "1")
    assert not ModelArgs().fuse_moe_sum and ModelArgs().fuse_router_norm
    monkeypatch.setenv("MOE_RT_FUSE_MOE_SUM", "yes")
    with pytest.raises(ValueError, match="MOE_RT_FUSE_MOE_SUM must be 0 or 1"):
        ModelArgs()
