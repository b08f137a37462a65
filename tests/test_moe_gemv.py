"""The few-token MoE GEMV kernels (kernels/moe_gemv.py) vs the torch reference and the tl.dot kernels."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.sm90 import run_sm90_probe

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.count_launches import count_launches  # noqa: E402
from kernels.fp8 import quantize_weight_block  # noqa: E402
from kernels.fused_moe import fused_experts, fused_experts_ref  # noqa: E402
from kernels.moe_config import default_config  # noqa: E402


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _gemv(up=(8, 64), down=(16, 32), **extra) -> dict:
    tile = {"num_warps": 4, "num_stages": 2}
    return {"up": dict(tile, BLOCK_N=up[0], BLOCK_K=up[1]), "down": dict(tile, BLOCK_N=down[0], BLOCK_K=down[1]),
            "max_tokens": 8, **extra}


def _problem(num_tokens, num_experts, hidden, inter, top_k, dtype, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, hidden).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter) / inter**0.5).to(dtype)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
    ids[0, top_k // 2] = -1  # a slot another expert-parallel rank handles
    weights = torch.rand(num_tokens, top_k) + 0.1
    return x, w13, w2, weights, ids


def _run(x, w13, w2, weights, ids, gemv, **kw):
    cfg = dict(default_config(x.shape[0], w13.shape[0], ids.shape[1], "w13_scale" in kw), gemv=gemv)
    with count_launches() as log:
        out = fused_experts(x, w13, w2, weights, ids, config=cfg, **kw)
    kernels = [e.removeprefix("triton:") for e in log.events if e.startswith("triton:")]
    return out, kernels


@pytest.mark.parametrize("num_tokens,num_experts,hidden,inter,top_k,dtype,up,down,pdl", [
    (1, 8, 200, 72, 4, torch.float32, (8, 64), (16, 32), False),  # H, I not multiples of the blocks
    (3, 5, 96, 40, 2, torch.float16, (4, 32), (32, 16), True),  # tiles wider than INTER's last block
    (8, 6, 130, 50, 3, torch.float32, (16, 128), (8, 64), True),  # a repeated expert across tokens; K < BLOCK_K
])
def test_gemv_matches_reference(num_tokens, num_experts, hidden, inter, top_k, dtype, up, down, pdl):
    # pdl: launched with PDL on an sm90+ GPU only (kernels/pdl.py); here it must change nothing
    x, w13, w2, weights, ids = _problem(num_tokens, num_experts, hidden, inter, top_k, dtype, seed=hidden)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    out, kernels = _run(x, w13, w2, weights, ids, _gemv(up, down, pdl=pdl))
    # no align, no tl.dot kernels: the GEMV pair and the top-k sum
    assert kernels == ["_gemv_up_kernel", "_gemv_down_kernel", "_moe_sum_kernel"], kernels
    assert _rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    old = fused_experts(x, w13, w2, weights, ids)  # the tl.dot path: the same outputs up to summation order
    assert _rel_err(out, old) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_gemv_only_up_to_max_tokens():
    x, w13, w2, weights, ids = _problem(5, 4, 64, 32, 2, torch.float32)
    _, kernels = _run(x, w13, w2, weights, ids, _gemv(max_tokens=4))
    assert "_gemv_up_kernel" not in kernels and "_moe_up_kernel" in kernels
    _, kernels = _run(x[:4], w13, w2, weights[:4], ids[:4], _gemv(max_tokens=4))
    assert "_gemv_up_kernel" in kernels
    with pytest.raises(ValueError, match="powers of two"):
        _run(x[:1], w13, w2, weights[:1], ids[:1], _gemv(up=(12, 64)))


def _blocky(shape, block=128):
    # per-[128, 128]-block magnitudes 2^-3..2^3: a wrong scale index shows as a large error
    w = torch.randn(shape)
    nb, kb = -(-shape[-2] // block), -(-shape[-1] // block)
    mag = 2.0 ** torch.randint(-3, 4, (*shape[:-2], nb, kb)).float()
    return w * mag.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., : shape[-2], : shape[-1]]


@pytest.mark.parametrize("dtype,up,down,pdl", [
    (torch.float32, (8, 64), (16, 64), True),  # K steps inside one scale block
    (torch.float32, (8, 256), (16, 256), False),  # steps over two scale blocks (per-128 partial sums), K not even
    (torch.float16, (16, 128), (32, 128), True),
])
def test_gemv_fp8_weights(dtype, up, down, pdl):
    torch.manual_seed(7)
    num_tokens, num_experts, hidden, inter, top_k = 2, 4, 320, 200, 3  # 3 / 2 scale blocks, the last partial
    x = _blocky((num_tokens, hidden)).to(dtype)
    w13, s13 = quantize_weight_block(_blocky((num_experts, 2 * inter, hidden)) / 16)
    w2, s2 = quantize_weight_block(_blocky((num_experts, hidden, inter)) / 16)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
    ids[1, 0] = -1
    weights = torch.rand(num_tokens, top_k) + 0.1
    # weight-only FP8 (W8A16): the reference dequantizes the weights to the activation dtype
    ref = fused_experts_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, act_fp8=False)
    out, kernels = _run(x, w13, w2, weights, ids, _gemv(up, down, pdl=pdl), w13_scale=s13, w2_scale=s2)
    assert kernels[:2] == ["_gemv_up_kernel", "_gemv_down_kernel"]
    # fp32: only the summation order differs; fp16: the reference rounds each dequantized weight to fp16
    assert _rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("fp8", [False, True])
def test_gemv_fused_sum_one_token(fp8):
    # config "fused_sum": the down GEMV's last slot per column tile sums the token's rows: the separate sum
    # kernel's bits, counters re-armed, zeros when no slot is handled here
    import kernels.moe_sum as fm

    x, w13, w2, weights, _ = _problem(1, 8, 96, 64, 4, torch.float32, seed=3)
    kw = {}
    if fp8:
        (w13, s13), (w2, s2) = quantize_weight_block(w13), quantize_weight_block(w2)
        kw = {"w13_scale": s13, "w2_scale": s2}
    for ids in ([[3, 0, 6, 1]], [[-1, 5, -1, 2]], [[-1, -1, -1, -1]]):
        ids = torch.tensor(ids, dtype=torch.int32)
        got, kernels = _run(x, w13, w2, weights, ids, _gemv(down=(32, 64), fused_sum=True, pdl=fp8), **kw)
        want, _ = _run(x, w13, w2, weights, ids, _gemv(down=(32, 64)), **kw)
        assert torch.equal(got, want), ids
        assert kernels == ["_gemv_up_kernel", "_gemv_down_kernel"]
        assert fm._COUNTERS[x.device].eq(0).all()
    assert got.eq(0).all()


@pytest.mark.parametrize("num_tokens,num_experts,hidden,inter,top_k,dtype,down,pdl", [
    (1, 8, 200, 72, 4, torch.float32, (4, 32), False),  # H not a multiple of BLOCK_N, I not of BLOCK_K
    (3, 5, 96, 40, 3, torch.float16, (2, 16), True),  # top_k 3: padded slot rows; a token with no slot here
    (8, 6, 70, 50, 3, torch.float32, (8, 64), True),  # a repeated expert across tokens; K < BLOCK_K
])
def test_gemv_down_topk_same_bits(num_tokens, num_experts, hidden, inter, top_k, dtype, down, pdl):
    # config "down_topk": one program per (column tile, token) runs all of the token's slots and sums them in
    # registers: two launches, and the bits of the per-pair down kernel + the top-k sum (a launch, or at one token
    # the fused sum), i.e. each slot rounded to the output dtype, then added in slot order in fp32
    x, w13, w2, weights, ids = _problem(num_tokens, num_experts, hidden, inter, top_k, dtype, seed=hidden + 1)
    if num_tokens > 1:
        ids[1] = -1  # every slot of this token on other expert-parallel ranks: a zero row
    got, kernels = _run(x, w13, w2, weights, ids, _gemv(down=down, pdl=pdl, down_topk=True, fused_sum=True))
    assert kernels == ["_gemv_up_kernel", "_gemv_down_topk_kernel"], kernels
    for fused_sum in (False, True) if num_tokens == 1 else (False,):
        want, _ = _run(x, w13, w2, weights, ids, _gemv(down=down, pdl=pdl, fused_sum=fused_sum))
        assert torch.equal(got, want), fused_sum
    if num_tokens > 1:
        assert got[1].eq(0).all()
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    assert _rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype,down", [(torch.float32, (4, 256)), (torch.float16, (16, 128))])
def test_gemv_down_topk_fp8_weights(dtype, down):
    # FP8 weights (W8A16) in the down_topk kernel: per-row [128, 128] block scales for every slot's rows (K steps
    # inside one scale block, over two with a partial last one), the per-pair kernel's bits
    torch.manual_seed(11)
    num_tokens, num_experts, hidden, inter, top_k = 2, 4, 320, 200, 3
    x = _blocky((num_tokens, hidden)).to(dtype)
    w13, s13 = quantize_weight_block(_blocky((num_experts, 2 * inter, hidden)) / 16)
    w2, s2 = quantize_weight_block(_blocky((num_experts, hidden, inter)) / 16)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
    ids[1, 0] = -1
    weights = torch.rand(num_tokens, top_k) + 0.1
    kw = {"w13_scale": s13, "w2_scale": s2}
    got, kernels = _run(x, w13, w2, weights, ids, _gemv(down=down, pdl=True, down_topk=True), **kw)
    assert kernels == ["_gemv_up_kernel", "_gemv_down_topk_kernel"]
    want, _ = _run(x, w13, w2, weights, ids, _gemv(down=down, pdl=True), **kw)
    assert torch.equal(got, want)
    ref = fused_experts_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, act_fp8=False)
    assert _rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


def test_gemv_pdl_and_prefetch_only_from_sm90(monkeypatch):
    # griddepcontrol / cp.async.bulk.prefetch do not assemble before sm_90, and a pre-Hopper GPU can get the
    # H200's table (pdl on) through moe_config's other-GPU fallback: those flags must fall away there
    from kernels import moe_gemv

    for cap, want in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert moe_gemv._sm90(torch.device("cuda", 0)) is want, cap
    assert moe_gemv._sm90(torch.device("cpu")) is False


_SM90_PROBE = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
sys.path.insert(0, "benchmarks")
from attention_ir import compile_sm90, report


def e4m3_f2f(k):  # per-value e4m3 conversions (F2F.*.E4M3) in the SASS; F2F.BF16.F32 roundings are not counted
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return len(re.findall(r"F2F\.\w*E4M3", subprocess.run([str(tool), "-sass", f.name], capture_output=True,
                                                               text=True).stdout))


from kernels.moe_gemv import _gemv_down_kernel, _gemv_down_topk_kernel, _gemv_up_kernel
E, H, I = 128, 2048, 768  # Qwen3-30B-A3B experts
out = []
for fp8 in (False, True):
    wt, st = ("fp8e4nv", "fp32") if fp8 else ("bf16", "bf16")
    up = dict(x_ptr="bf16", w_ptr=wt, ws_ptr=st, out_ptr="bf16", ids_ptr="i32", w2_ptr=wt, num_pairs=8, K=H, INTER=I,
              top_k=8, stride_xt=H, stride_we=2 * I * H, stride_wn=H, stride_wse=192, stride_wsn=16, stride_ot=I,
              stride_w2e=H * I)
    stages = 1 if fp8 else 3  # (cp.async copies drop the eviction hint)
    k = compile_sm90(_gemv_up_kernel, up, dict(USE_FP8=fp8, EVEN_K=True, BLOCK_N=16, BLOCK_K=256, NUM_STAGES=stages,
                                                PDL=True, PREFETCH=True, PIECES=128), 4, stages)
    out.append(dict(report(k), pdl="griddepcontrol.launch_dependents" in k.asm["ptx"]
                    and "cp.async.bulk.prefetch.L2.global" in k.asm["ptx"], evict="evict_first" in k.asm["ptx"]))
    down = dict(a_ptr="bf16", w_ptr=wt, ws_ptr=st, y_ptr="bf16", ids_ptr="i32", topk_weights_ptr="fp32",
                sum_ptr="bf16", counter_ptr="i32", num_pairs=8, K=I, N=H, stride_at=I, stride_we=I * H, stride_wn=I,
                stride_wse=96, stride_wsn=6, stride_yt=H)
    k = compile_sm90(_gemv_down_kernel, down, dict(USE_FP8=fp8, EVEN_K=True, BLOCK_N=16, BLOCK_K=128, NUM_STAGES=1,
                                                    PDL=True, FUSED_SUM=True, TOP_K=8,
                                                    TOP_K_PAD=8), 4, 1)
    out.append(dict(report(k), pdl="griddepcontrol.wait" in k.asm["ptx"]))
    topk = dict(a_ptr="bf16", w_ptr=wt, ws_ptr=st, out_ptr="bf16", ids_ptr="i32", topk_weights_ptr="fp32",
                num_tokens=1, K=I, N=H, stride_at=I, stride_we=I * H, stride_wn=I, stride_wse=96, stride_wsn=6,
                stride_ot=H)
    k = compile_sm90(_gemv_down_topk_kernel, topk, dict(USE_FP8=fp8, EVEN_K=True, BLOCK_N=4, BLOCK_K=256,
                                                         NUM_STAGES=1, PDL=True, TOP_K=8, TOP_K_PAD=8), 4, 1)
    out.append(dict(report(k), pdl="griddepcontrol.wait" in k.asm["ptx"], e4m3_f2f=e4m3_f2f(k)))
print(json.dumps(out))
"""


def test_gemv_compiles_for_sm90():
    # no GPU needed: Triton's own ptxas for Hopper. No MMA and no spills; FP8 widened e4m3 -> f16 by packed
    # F2FP only (no per-value F2F); num_stages > 1 streams the tiles through cp.async; PDL emits griddepcontrol,
    # the w2 prefetch a bulk L2 prefetch and (one stage) evict-first w13 loads
    up16, down16, topk16, up8, down8, topk8 = run_sm90_probe(_SM90_PROBE)
    for r in (up16, down16, topk16, up8, down8, topk8):
        assert r["spill_bytes"] == 0 and r["mma"] is None and r["sass_ops"]["HMMA"] == 0 and r["pdl"], r
    for r in (up8, down8):
        assert r["sass_ops"]["F2F"] == 0 and r["sass_ops"]["F2FP"] > 0, r
    # (the top-k kernel rounds each slot's fp32 result to bf16 alone, F2F.BF16.F32, before the slot-order sum)
    assert topk8["e4m3_f2f"] == 0 and topk8["sass_ops"]["F2FP"] > 0, topk8
    assert up16["sass_ops"]["LDGSTS"] > 0 and up8["evict"]  # a cp.async ring at 3 stages; evict-first w13 loads


def test_gemv_tuner_writes_table_on_tiny_case(tmp_path, monkeypatch, request):
    # the tuner's plumbing in the interpreter: candidates timed (a fake clock that favours the first of each
    # sweep and calls the tl.dot layer slowest), the bucket's "gemv" key written, other buckets kept as they were
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_moe_gemv as tg

    from kernels.moe_config import config_file_name, device_name

    monkeypatch.setattr(tg, "SHAPES", {"tiny": (4, 64, 48, 2)})
    monkeypatch.setattr(tg, "DEVICE", "cpu")
    monkeypatch.setattr(tg, "DTYPE", torch.float32)
    monkeypatch.setattr(tg, "NUM_ROT", 1)
    monkeypatch.setattr(tg, "CONFIG_DIR", tmp_path / "base")
    monkeypatch.setattr(tg, "gemv_candidates", lambda fp8, k, two: [
        {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}])
    monkeypatch.setattr(tg, "topk_candidates", lambda fp8, k, top_k: [
        {"BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1},
        {"BLOCK_N": 2, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}])
    calls = []
    from kernels import pdl

    monkeypatch.delenv(pdl.ENV_VAR, raising=False)  # the default: PDL on where supported
    pdl.env_switch.cache_clear()
    request.addfinalizer(pdl.env_switch.cache_clear)  # later tests read the environment as it is again
    switch = []  # the global PDL switch at each timing: off for the GEMV variants, whose "pdl" key decides

    def fake_time(run, rep_ms=5):
        run()
        calls.append(run)
        switch.append(pdl.env_switch())
        return float(len(calls))

    monkeypatch.setattr(tg, "_time", fake_time)
    name = config_file_name(4, 64, 48, "bfloat16", device_name())
    (tmp_path / "base").mkdir()
    base = {"1": default_config(1, 4, 2, False), "64": default_config(64, 4, 2, False)}
    (tmp_path / "base" / name).write_text(json.dumps(base))
    # no FP8 table for the shape on any GPU: nothing to extend (a table of only small buckets would serve every M)
    assert tg.tune_gemv("tiny", [1], "fp8", tmp_path / "out", {"copy_tbps": 1.0}) == [] and not calls
    rows = tg.tune_gemv("tiny", [1, 64], "bf16", tmp_path / "out", {"copy_tbps": 1.0})
    assert len(rows) == 1 and rows[0]["chosen"] == "gemv"
    # up, down and down_topk tiles; layers: (per-pair, fused_sum, down_topk) x pdl x prefetch; the tl.dot one
    assert len(calls) == 2 + 2 + 2 + 12 + 1
    assert switch[6:] == [False] * 12 + [True] and pdl.env_switch() is True  # the tl.dot layer as served
    table = json.loads((tmp_path / "out" / "configs" / name).read_text())
    assert table["64"] == base["64"]
    first = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    assert table["1"] == dict(base["1"], gemv={"up": first, "down": first, "max_tokens": 1, "fused_sum": False,
                                                "pdl": False, "prefetch": False, "down_topk": False})
    # --gemv-keep-up: the gate_up tile of the nearest GEMV entry (bucket 1's, just written), only the down tiles
    calls.clear()
    rows = tg.tune_gemv("tiny", [2], "bf16", tmp_path / "out", {"copy_tbps": 1.0}, keep_up=True)
    assert len(calls) == 2 + 2 + 8 + 1 and rows[0]["gemv"]["up"] == first  # (per-pair, down_topk) x pdl x prefetch
    assert json.loads((tmp_path / "out" / "configs" / name).read_text())["2"]["gemv"]["up"] == first


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 8])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("pdl,fused_sum,prefetch,down_topk", [
    (False, False, False, False), (True, False, True, False), (True, True, True, False), (False, True, True, False),
    (True, False, False, True), (False, False, True, True)])
def test_gemv_gpu(num_tokens, fp8, pdl, fused_sum, prefetch, down_topk, monkeypatch, request):
    # Qwen3-30B-A3B experts: the reference's answer, the same bits on every run, and in CUDA-graph replays with
    # new routings (PDL edges and the fused sum's counters inside a graph)
    from kernels import pdl as pdl_switch

    # the global switch (on by default on Hopper) would launch the pair with PDL whatever the table's "pdl" says
    monkeypatch.setenv(pdl_switch.ENV_VAR, "1" if pdl else "0")
    pdl_switch.env_switch.cache_clear()
    request.addfinalizer(pdl_switch.env_switch.cache_clear)
    num_experts, hidden, inter, top_k = 128, 2048, 768, 8
    torch.manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden**0.5).to(torch.bfloat16)
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5).to(torch.bfloat16)
    kw = {}
    if fp8:
        (w13, s13), (w2, s2) = quantize_weight_block(w13), quantize_weight_block(w2)
        kw = {"w13_scale": s13, "w2_scale": s2}

    def routing():
        ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
        ids[0, 1] = -1
        return (torch.rand(num_tokens, top_k) + 0.1).cuda(), ids.cuda()

    weights, ids = routing()
    gemv = {"up": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
            "down": {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 2, "num_stages": 1},
            "max_tokens": 8, "fused_sum": fused_sum, "pdl": pdl, "prefetch": prefetch, "down_topk": down_topk}
    if down_topk:  # 8 slots x 2 columns a program
        gemv["down"] = {"BLOCK_N": 2, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1}
    cfg = dict(default_config(num_tokens, num_experts, top_k, fp8), gemv=gemv)
    out = fused_experts(x, w13, w2, weights, ids, config=cfg, **kw)
    ref = fused_experts_ref(x, w13, w2, weights, ids, **kw, **({"act_fp8": False} if fp8 else {}))
    assert _rel_err(out, ref) < 1e-2
    assert torch.equal(out, fused_experts(x, w13, w2, weights, ids, config=cfg, **kw))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = fused_experts(x, w13, w2, weights, ids, config=cfg, **kw)
    for _ in range(5):
        new_w, new_ids = routing()
        weights.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        assert torch.equal(g_out, fused_experts(x, w13, w2, weights, ids, config=cfg, **kw))


def test_gemv_tuner_extends_max_tokens():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_moe_gemv as tg

    table = {"1": {"gemv": {"max_tokens": 1}}, "8": {"gemv": {"max_tokens": 8}}, "64": {"BLOCK_M": 16}}
    tg.extend_max_tokens(table)  # M=2 looks up bucket 1 and M=3..8 bucket 8; nothing past 8 was measured
    assert table["1"]["gemv"]["max_tokens"] == 2 and table["8"]["gemv"]["max_tokens"] == 8
    table = {"1": {"gemv": {"max_tokens": 1}}, "8": {"BLOCK_M": 16}}
    tg.extend_max_tokens(table)  # GEMV lost at 8: M=2 is not extrapolated
    assert table["1"]["gemv"]["max_tokens"] == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8"])
def test_h200_qwen3_tables_keep_gemv_up_to_8_tokens(dtype, monkeypatch):
    # the retuned Qwen3-30B-A3B tables (buckets 1, 2, 4, 8 with GEMV): moe_config's nearest bucket on a log scale
    # gives M=3 and 5 bucket 4 and M=6, 7 bucket 8, and each entry's max_tokens covers the M it is looked up for, so
    # no M <= 8 falls to the aligned tl.dot path (bucket 1's max_tokens went 2 -> 1 with the new "2" key: without
    # that key M=2 would); every gemv entry passes check_gemv_config
    import kernels.moe_config as mc
    from kernels.moe_gemv import check_gemv_config

    monkeypatch.setattr(mc, "device_name", lambda device=None: "NVIDIA_H200")
    table = json.loads((mc.CONFIG_DIR / mc.config_file_name(128, 2048, 768, dtype, "NVIDIA_H200")).read_text())
    bucket = {1: "1", 2: "2", 3: "4", 4: "4", 5: "4", 6: "8", 7: "8", 8: "8", 9: "8"}
    for m, b in bucket.items():
        cfg = mc.get_moe_config(m, 128, 2048, 768, 8, dtype)
        assert cfg == table[b], m
        assert (m <= cfg["gemv"]["max_tokens"]) == (m <= 8), m
        check_gemv_config(cfg["gemv"])
        assert not cfg["gemv"].get("down_topk"), m  # measured slower: off everywhere
