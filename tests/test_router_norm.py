"""The post-attention residual add + RMSNorm inside the fused router (kernels/router_norm.py): x and the new residual
bit for bit kernels/norm.py's, the routing that of the separate router on that x, and whole models' logits with
the fusion on and off, one norm launch fewer per MoE layer (on the CPU: tests/test_fusion_model_logits.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels import router_fused, router_norm  # noqa: E402
from kernels.moe_sum import TopKSlots  # noqa: E402
from kernels.norm import rms_norm  # noqa: E402
from kernels.router_fused import route_fused, route_fused_norm, route_fused_norm_ref  # noqa: E402
from tests.sm90 import run_sm90_probe  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
HIDDEN = 200  # not a power of two: masked columns in the norm's 256-wide row
# the bf16 GPU model test's hidden size: the tiny configs' 64 has no known GPU sum order (norm_layout None: a
# 64-wide row is under one warp's 16-byte vectors), so there the fusion would not run at all; 1024 is a 2-warp,
# 2-repeat layout (the warp butterfly and the second repeat in play)
GPU_MODEL_HIDDEN = 1024


def _inputs(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int, router_dtype: torch.dtype | None = None,
            hidden: int = HIDDEN):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    res = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(dtype)
    norm_w = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    w = (torch.randn(num_experts, hidden, generator=gen) * 2 / hidden**0.5).to(router_dtype or dtype)
    bias = torch.randn(num_experts, generator=gen) * 0.3
    return tuple(t.to(DEV) for t in (h, res, norm_w, w, bias))


# the tail configs' row classes (1-2 rows: one warp, packed; 3-4: the default; 5-64: packed), the GEMM forms (GEMV
# up to 4 rows, tl.dot past: at 6 rows the norm's 8 rows repeated to the dot's 16), two token blocks at 17
@pytest.mark.parametrize("num_tokens,dtype", [(1, torch.float16), (3, torch.float32), (6, torch.float16),
                                              (17, torch.float32)])
@pytest.mark.parametrize("grouped", [False, True])
def test_fused_norm_equals_norm_then_router(num_tokens: int, dtype: torch.dtype, grouped: bool) -> None:
    h, res, norm_w, w, bias = _inputs(num_tokens, 24, dtype, num_tokens + grouped,
                                      router_dtype=torch.float32 if grouped else None)  # GLM: an fp32 router
    slots = torch.arange(num_tokens, device=DEV)
    slots[num_tokens // 2] = -1  # a padding row: ids -1, its x and r still normalized
    routing = (bias, 4, 2, 2.5) if grouped else (None,)
    top_k = 5
    x, r = rms_norm(h, norm_w, EPS, res)  # today's two launches: the norm, then the router on its x
    want = route_fused(x, w, top_k, True, slots, *routing)
    got = route_fused_norm(h, res, norm_w, EPS, w, top_k, True, slots, *routing)
    assert torch.equal(got[2], x) and torch.equal(got[3], r)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert (got[1][num_tokens // 2] == -1).all() and (got[1] >= 0).sum() == (num_tokens - 1) * top_k
    ref = route_fused_norm_ref(h, res, norm_w, EPS, w, top_k, True, slots, *routing)
    assert torch.equal(ref[3], r)
    torch.testing.assert_close(ref[2], x, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("variant", [dict(num_splits=3), dict(num_splits=1, gemv=True), dict(num_warps=2)])
def test_fused_norm_grid_variants(variant: dict) -> None:
    # any H split (3: 128-column splits, the third past the last column: all masked; a split is whole BLOCK_H steps,
    # so its boundaries never cut a 16-column write chunk), GEMM form or warp count writes all of x and r (40
    # experts: 3 expert tiles take the 16-column chunks in turn) and routes as the separate router would
    h, res, norm_w, w, _ = _inputs(5, 40, torch.float32, 7)
    x, r = rms_norm(h, norm_w, EPS, res)
    want = route_fused(x, w, 3, False, **variant)
    got = route_fused_norm(h, res, norm_w, EPS, w, 3, False, **variant)
    assert torch.equal(got[2], x) and torch.equal(got[3], r)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's stores")
@pytest.mark.parametrize("num_tokens,num_experts,variant", [(3, 40, {}), (17, 40, {}), (5, 40, dict(num_splits=3)),
                                                            (2, 72, dict(num_splits=1, gemv=True))])
def test_fused_norm_stores_each_element_once(num_tokens: int, num_experts: int, variant: dict,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel's own stores, counted per address: every element of x and r exactly once over the grid (hidden 200
    # is no multiple of 16 x the 3 or 5 expert tiles; two token blocks at 17; an empty split; the GEMV form)
    from triton.runtime import interpreter

    addresses: list[np.ndarray] = []
    store = interpreter.InterpreterBuilder.create_masked_store

    def counted(self, ptrs, value, mask, *args):  # noqa: ANN001, ANN202
        addresses.append(ptrs.data[mask.data].astype(np.int64).ravel())
        return store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", counted)
    h, res, norm_w, w, _ = _inputs(num_tokens, num_experts, torch.float32, 11)
    _, _, x, r = route_fused_norm(h, res, norm_w, EPS, w, 3, True, **variant)
    stored = np.concatenate(addresses)
    for out in (x, r):
        first = out.data_ptr()
        mine = stored[(stored >= first) & (stored < first + out.numel() * out.element_size())]
        counts = np.bincount((mine - first) // out.element_size(), minlength=out.numel())
        assert counts.min() == 1 and counts.max() == 1, (counts.min(), counts.max())


def _tree_sum(rows: torch.Tensor, warps: int, spt: int, reps: int) -> torch.Tensor:
    """sum(rows^2) per row [T] fp32 in the order of the norm kernel's sm90 reduction (kernels/router_norm.py): each
    of 32 * warps threads folds its REPS x SPT elements in register order, then a butterfly over lane bits 4..0 and
    warp bits high..0. The fold's products are rounded first, as the interpreter's tl.fma does (sm90's is fused;
    with 16-bit activations, what the GPU path takes, the products are exact and both agree)."""
    threads = 32 * warps
    e = torch.nn.functional.pad(rows.float(), (0, reps * threads * spt - rows.shape[1]))
    e = e.view(-1, reps, threads, spt).permute(0, 2, 1, 3).reshape(-1, threads, reps * spt)  # [T, thread, j]
    acc = e[..., 0] * e[..., 0] + e[..., 1] * e[..., 1]
    for j in range(2, reps * spt):
        acc = acc + e[..., j] * e[..., j]
    s = acc.view(-1, warps, 32)
    for b in range(5):
        s = s.view(-1, warps, 2, 16 >> b).sum(2)  # two values each: one rounding, no order
    s = s.view(-1, warps)
    while s.shape[1] > 1:
        s = s.view(-1, 2, s.shape[1] // 2).sum(1)
    return s.view(-1)


@pytest.mark.parametrize("layout,num_tokens,dtype", [((1, 8, 4), 1, torch.float16), ((2, 8, 2), 3, torch.float32),
                                                     ((4, 8, 1), 17, torch.float32), ((1, 8, 4), 17, torch.float32)])
def test_gpu_sum_order_replayed(layout: tuple[int, int, int], num_tokens: int, dtype: torch.dtype) -> None:
    # the GPU path's sum of squares (_sum_squares_tree, in the interpreter) equals the tree it replays, at hidden
    # 1000 (a 1024 row); fp32: the order shows in x's bits, which the interpreter's own order (np.sum) does not give
    hidden = 1000
    h, res, norm_w, w, _ = _inputs(num_tokens, 24, dtype, sum(layout), hidden=hidden)
    got = route_fused_norm(h, res, norm_w, EPS, w, 4, True, layout=layout)
    r = ((h.float() + res.float()).to(dtype)).cpu()
    total = _tree_sum(r, *layout).numpy()
    inv = torch.from_numpy(np.float32(1) / np.sqrt(total / np.float32(hidden) + np.float32(EPS)))  # as the interpreter
    x = ((r.float() * inv[:, None]).to(dtype).float() * norm_w.cpu().float()).to(dtype)
    assert torch.equal(got[3].cpu(), r) and torch.equal(got[2].cpu(), x)
    assert torch.equal(got[1], route_fused(got[2], w, 4, True)[1])
    if num_tokens == 17:
        assert not torch.equal(x, rms_norm(h, norm_w, EPS, res)[0].cpu())  # another order: other bits


def test_norm_layout_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    assert router_norm.norm_layout(200, torch.float32, torch.device("cpu")) == (0, 0, 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda = torch.device("cuda", 0)
    # the norm kernel's warps and 16-byte vectors: 16 elements a thread in two repeats at these sizes
    assert router_norm.norm_layout(2048, torch.bfloat16, cuda) == (4, 8, 2)
    assert router_norm.norm_layout(4096, torch.float16, cuda) == (8, 8, 2)
    assert router_norm.norm_layout(5120, torch.bfloat16, cuda) == (16, 8, 2)  # GLM-4.5: an 8192 row, 16 warps
    assert router_norm.norm_layout(256, torch.bfloat16, cuda) == (1, 8, 1)
    for hidden, dtype in ((2040, torch.bfloat16), (2048, torch.float32), (64, torch.bfloat16)):
        assert router_norm.norm_layout(hidden, dtype, cuda) is None  # unknown order: the separate norm
    # the GPU model test's hidden size is one the fusion takes on a GPU (the tiny configs' 64 is not)
    assert router_norm.norm_layout(GPU_MODEL_HIDDEN, torch.bfloat16, cuda) == (2, 8, 2)
    monkeypatch.setattr(router_fused, "norm_layout", lambda *_: None)
    with pytest.raises(ValueError, match="no known sum order"):
        route_fused_norm(*(torch.zeros(1, 64),) * 2, torch.ones(64), EPS, torch.zeros(4, 64), 2, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's launches")
def test_norm_layout_follows_the_norm_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    # the warps norm_layout replays (and the sm90 probe below compiles the norm kernel at) are those rms_norm really
    # launches with, recorded (nothing runs), at the sizes of the models and of the GPU tests
    from triton.runtime.interpreter import InterpretedFunction

    hiddens = (256, 1024, 2048, 4096, 5120, 7168)
    launched = []

    def record(self, *args, grid, warmup, **kw):  # noqa: ANN001, ANN202
        launched.append((self.fn.__name__, kw["num_warps"]))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    for hidden in hiddens:
        rms_norm(torch.zeros(1, hidden), torch.ones(hidden), EPS, torch.zeros(1, hidden))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # norm_layout's GPU answer
    want = [router_norm.norm_layout(h, torch.bfloat16, torch.device("cuda"))[0] for h in hiddens]
    assert launched == [("_rms_norm_kernel", w) for w in want], launched


_NORM_PTX_PROBE = """
import json, re, sys, torch, triton
sys.path.insert(0, "benchmarks")
from attention_ir import compile_sm90
from kernels import norm, router_norm
out = {}
for hidden in (2048, 4096, 5120):
    block = triton.next_power_of_2(hidden)
    args = dict(x_ptr="bf16", res_ptr="bf16", w_ptr="bf16", out_ptr="bf16", res_out_ptr="bf16", ids_ptr="i32",
                extra_ptr="bf16", N=hidden, eps=1e-6, stride_x=hidden, stride_r=hidden, stride_o=hidden,
                stride_ro=hidden, stride_e=hidden)
    k = compile_sm90(norm._rms_norm_kernel, args, dict(HAS_RESIDUAL=True, BLOCK=block, PDL=True),
                     router_norm.norm_warps(block), 1)
    ptx = k.asm["ptx"]
    # each fp32 register's element j in its thread's register order: the unpacked bf16 pairs in program order
    half = {}
    for p, (lo, hi) in enumerate(re.findall(r"mov.b32\\s+\\{(%rs\\d+), (%rs\\d+)\\}", ptx)):
        half[lo], half[hi] = 2 * p, 2 * p + 1
    elem = {r: half[rs] for r, rs in re.findall(r"cvt.f32.bf16\\s+(%r\\d+), (%rs\\d+);", ptx) if rs in half}
    squares = re.findall(r"(?:mul.f32|fma.rn.f32)\\s+%r\\d+, (%r\\d+), (%r\\d+)", ptx)
    fold = [elem.get(a, -1) for a, b in squares if a == b]
    out[hidden] = dict(layout=re.findall(r"#blocked\\d* = (.*)", k.asm["ttgir"]),
                       fma=len(re.findall(r"fma.rn.f32", ptx)), fold=fold,
                       bfly=[int(m) for m in re.findall(r"shfl.sync.bfly.b32\\s+%r\\d+, %r\\d+, (\\d+),", ptx)])
print(json.dumps(out))
"""


def test_norm_kernel_order_on_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    # what _sum_squares_tree replays, read off the norm kernel compiled for Hopper (no GPU needed): one blocked
    # layout of 8-element vectors at norm_warps' warps, REPS * SPT - 1 FMAs (the in-thread fold), the lane butterfly
    # 16..1 then the warp butterfly W/2..1. A Triton that lowers the norm otherwise fails here (and the GPU test)
    probed = run_sm90_probe(_NORM_PTX_PROBE)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # norm_layout's GPU answer
    for hidden, got in probed.items():
        warps, spt, reps = router_norm.norm_layout(int(hidden), torch.bfloat16, torch.device("cuda"))
        assert got["layout"] == [f"#ttg.blocked<{{sizePerThread = [{spt}], threadsPerWarp = [32], warpsPerCTA = "
                                 f"[{warps}], order = [0]}}>"], (hidden, got)
        assert got["fma"] == reps * spt - 1, (hidden, got)
        # the fold's squares in order: round(e1 * e1) first, then fma(e0, e0, .), fma(e2, e2, .), ...
        assert got["fold"] == [1, 0, *range(2, reps * spt)], (hidden, got)
        assert got["bfly"] == [16, 8, 4, 2, 1] + [warps >> (b + 1) for b in range(warps.bit_length() - 1)], got


# ------------------------------------------------------------------------------------------- whole models


def test_served_rank_fuses_and_counts_the_routing() -> None:
    # a served rank's MoE (runtime/cluster/rank_loop.py build_engine: the LocalBackend dispatcher with the expert
    # statistics) takes the fusion too, its sum deferred: the same slots as the separate norm then the layer, and the
    # routing counted once per step in the statistics' step buffer, which the fused router writes itself
    from benchmarks.count_launches import CONFIGS
    from models.args import ModelArgs
    from models.forward_batch import ForwardBatch
    from models.loader import load_model
    from runtime.distributed.all2all import LocalBackend
    from runtime.distributed.expert_stats import ExpertStats
    from runtime.distributed.parallel import single_rank

    cfg = dict(CONFIGS["qwen3_moe"], num_hidden_layers=1)
    stats = ExpertStats(1, cfg["num_experts"], torch.device(DEV), max_tokens=16)
    local = LocalBackend(single_rank(DEV), cfg["num_experts"], 16, stats)
    model = load_model("", cfg, ModelArgs(dtype=torch.float32, device=DEV, use_triton=True, seed=1,
                                          fuse_router_norm=True, dispatcher=local), "dummy")
    layer = model.model.layers[0]
    h, res, norm_w = (t.to(DEV) for t in _inputs(3, 4, torch.float32, 5, hidden=cfg["hidden_size"])[:3])
    layer.post_attention_layernorm.weight.data.copy_(norm_w)
    batch = ForwardBatch(slot_mapping=torch.arange(3, device=DEV), cu_seqlens_q=None, seq_lens=None,
                         block_tables=None, max_seqlen_q=1, max_seqlen_k=1, is_decode=True, kv_caches=[],
                         attn_backend=None)
    assert layer.fuse_router_norm and layer.defer_moe_sum and layer.mlp.can_fuse_norm(h)
    fused, r = layer.mlp.forward_norm(h, res, norm_w, EPS, batch, defer_sum=True)
    assert int(stats.routed_tokens.sum()) == 3 * cfg["num_experts_per_tok"]
    x, want_r = rms_norm(h, norm_w, EPS, res)
    plain = layer.mlp(x, batch, defer_sum=True)
    assert isinstance(fused, TopKSlots) and torch.equal(r, want_r) and torch.equal(fused.topk_ids, plain.topk_ids)
    assert torch.equal(fused.sum(), plain.sum())
    assert int(stats.routed_tokens.sum()) == 2 * 3 * cfg["num_experts_per_tok"]


def test_fusion_only_where_the_router_sees_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # the torch reference path, EP x TP (each TP rank routes a slice) and dense layers keep the separate norm; past
    # the row limit (or GLM's fp32 router's) the choice is the separate norm too
    from benchmarks.count_launches import CONFIGS
    from models.args import ModelArgs, TensorParallel
    from models.loader import load_model

    monkeypatch.setenv("MOE_RT_FUSE_ROUTER_NORM", "1")  # off by default until measured on a GPU (models/args.py)
    limit = router_norm.FUSED_NORM_MAX_TOKENS
    for arch, kw, rows in (("qwen3_moe", dict(use_triton=True), limit), ("glm4_moe", dict(use_triton=True), 8),
                           ("qwen3_moe", dict(use_triton=False), 0),
                           ("qwen3_moe", dict(use_triton=True, ep_size=2, ep_rank=1), limit),
                           ("qwen3_moe", dict(use_triton=True, tp=TensorParallel(0, 2)), limit),
                           ("qwen3_moe", dict(use_triton=True, tp=TensorParallel(1, 2), ep_size=2, ep_rank=1), 0)):
        cfg = dict(CONFIGS[arch], num_hidden_layers=2)
        model = load_model("", cfg, ModelArgs(dtype=torch.float32, device=DEV, seed=1, **kw), "dummy")
        for layer in model.model.layers:
            if not getattr(layer.mlp, "is_moe", False):
                assert not layer.fuse_router_norm  # GLM's dense first layer
                continue
            assert layer.fuse_router_norm
            assert not load_model("", cfg, ModelArgs(dtype=torch.float32, device=DEV, seed=1, fuse_router_norm=False,
                                                     **kw), "dummy").model.layers[1].fuse_router_norm
            fused = [n for n in (1, 3, 8, 16, 17, 64) if layer.mlp.can_fuse_norm(torch.zeros(n, cfg["hidden_size"]))]
            assert fused == [n for n in (1, 3, 8, 16, 17, 64) if n <= rows], (arch, kw, fused)


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen3", "glm"])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4, 8, 16])
def test_fused_norm_gpu_bit_exact_and_replays(shape: str, num_tokens: int) -> None:
    # the GPU sum order (_sum_squares_tree) against the norm kernel at the models' shapes, bf16, realistic scales
    # (a residual stream ~10x the attention output); then 20 CUDA-graph replays of the fused launch give the same
    hidden, experts, top_k = (2048, 128, 8) if shape == "qwen3" else (5120, 160, 8)
    if shape == "glm" and num_tokens > 8:
        pytest.skip("GLM's fp32 router is fused up to 8 rows")
    gen = torch.Generator().manual_seed(num_tokens)
    h = torch.randn(num_tokens, hidden, generator=gen).to(DEV, torch.bfloat16)
    res = (torch.randn(num_tokens, hidden, generator=gen) * 10).to(DEV, torch.bfloat16)
    norm_w = (torch.rand(hidden, generator=gen) + 0.5).to(DEV, torch.bfloat16)
    w = (torch.randn(experts, hidden, generator=gen) * hidden**-0.5).to(DEV, torch.float32 if shape == "glm"
                                                                         else torch.bfloat16)
    routing = (torch.randn(experts, generator=gen).to(DEV) * 0.3, 8, 4, 2.5) if shape == "glm" else (None,)
    x, r = rms_norm(h, norm_w, EPS, res)
    want = route_fused(x, w, top_k, True, None, *routing)
    got = route_fused_norm(h, res, norm_w, EPS, w, top_k, True, None, *routing)
    assert torch.equal(got[3], r) and torch.equal(got[2], x), (got[2] != x).sum()
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = route_fused_norm(h, res, norm_w, EPS, w, top_k, True, None, *routing)
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(out, got))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe"])
def test_model_logits_unchanged_by_fusion_bf16_gpu(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the GPU sum order inside whole models: hidden GPU_MODEL_HIDDEN (at the tiny configs' 64 nothing would fuse);
    # the 1-token decode step fuses each MoE layer's norm (2 in both), the 12-token prefill is past the row limit
    from tests.test_fusion_model_logits import _logits

    monkeypatch.setenv("MOE_RT_FUSE_ROUTER_NORM", "0")
    plain, plain_launches, _ = _logits(arch, defer=True, dtype=torch.bfloat16, hidden_size=GPU_MODEL_HIDDEN)
    monkeypatch.setenv("MOE_RT_FUSE_ROUTER_NORM", "1")
    fused, fused_launches, _ = _logits(arch, defer=True, dtype=torch.bfloat16, hidden_size=GPU_MODEL_HIDDEN)
    norm = "triton:_rms_norm_kernel"
    assert plain_launches.count(norm) - fused_launches.count(norm) == 2, (plain_launches, fused_launches)
    assert torch.equal(fused, plain) and fused.abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Glm4MoeForCausalLM"])
def test_engine_graphs_same_tokens_with_fusion_gpu(arch: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the engine with CUDA graphs, bf16, hidden GPU_MODEL_HIDDEN: 12 sequences finishing one by one, so the decode
    # batches run from 12 (past the row limit: the separate norm) down to 1 (fused) in captured graphs; the same
    # greedy tokens with the fusion on and off
    from runtime import LLM, SamplingParams
    from tests.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path / arch), arch, hidden_size=GPU_MODEL_HIDDEN)
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 500, (n,), generator=gen).tolist()} for n in range(3, 15)]
    params = [SamplingParams(temperature=0, max_tokens=4 + 2 * i, ignore_eos=True) for i in range(len(prompts))]
    tokens = {}
    for fuse in ("0", "1"):
        monkeypatch.setenv("MOE_RT_FUSE_ROUTER_NORM", fuse)
        llm = LLM(model=path, dtype="bfloat16", device="cuda", block_size=16, kv_cache_memory=64 << 20,
                  max_num_seqs=16, max_num_batched_tokens=128, max_model_len=64)  # a short warm-up
        fusing = [layer.fuse_router_norm for layer in llm.engine.model.model.layers]
        assert any(fusing) == (fuse == "1"), fusing
        tokens[fuse] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert tokens["1"] == tokens["0"] and [len(t) for t in tokens["1"]] == [p.max_tokens for p in params]
