"""The FP8 block-scaled Gluon MoE grouped GEMM (kernels/moe_gluon_fp8.py): compiled for sm90 on the CPU (Gluon has no
interpreter): async wgmma waits of pendings 1 in the K loop (the promotion under the next MMA), no spills, the
barrier protocol; its config checks; the per-K-step torch reference (vs the Triton TMA FP8 kernel in the interpreter
and vs the dequantized product) and fused_experts_tma's FP8 Gluon flow around it. On a GPU (-m gpu): a one-program
smoke of each GEMM first (benchmarks/gpu_session_moe_gluon.sh runs it under a short timeout: a wrong barrier phase
hangs), then the layer vs the reference and the Triton TMA FP8 path at odd sizes, zero-row experts, graph replay."""

import os

import pytest
import torch

from tests.sm90 import SM90_DRIVER_PRELUDE, run_sm90_probe

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.fp8 import per_token_group_quant_ref, quantize_weight_block  # noqa: E402
from kernels.fused_moe import fused_experts_ref  # noqa: E402
from kernels.moe_gluon import SHARED_LIMIT, launch_meta  # noqa: E402
from kernels.moe_gluon_fp8 import (  # noqa: E402
    check_gluon_fp8_config,
    default_gluon_fp8_config,
    fp8_launch_args,
    fp8_shared_bytes,
    grouped_gemm_fp8_ref,
)
from kernels.moe_grouped_tma import default_tma_config, fused_experts_tma, grouped_gemm  # noqa: E402

E4M3 = torch.float8_e4m3fn

_SM90_PROBE = """
import json
from benchmarks.moe_gluon_ir import compile_gluon_sm90, gluon_report
from kernels.moe_gluon_fp8 import default_gluon_fp8_config
cfg = default_gluon_fp8_config(block_m={block_m}, pingpong={pingpong})
print(json.dumps([gluon_report(compile_gluon_sm90(kind, cfg[kind], {block_m}, True, kt))
                  for kind, kt in (("up", {k_up}), ("down", {k_down}))]))
"""


@pytest.mark.parametrize("block_m,pingpong,k_up,k_down", [
    (128, False, 16, 6),  # Qwen3-30B-A3B: H 2048, I 768
    (64, True, 16, 6),
    pytest.param(128, False, 32, 11, marks=pytest.mark.slow),  # GLM-4.5-Air: H 4096, I 1408
    pytest.param(64, False, 32, 11, marks=pytest.mark.slow),
])
def test_gluon_fp8_gemm_compiles_for_sm90(block_m, pingpong, k_up, k_down):
    # the default up (gate and up interleaved, SiLU-and-mul) and down tiles at a model's K steps (the K loop is
    # unrolled k_chunk steps at a time, so the binary depends on K): no spills; e4m3 wgmma (QGMMA) waited with
    # pendings 1 in the K loop (each step's partial promoted while the next MMA runs; ptxas turns every wait
    # into 0 when it serializes, C7514) and 0 once per unrolled chunk; the load warp's expect-tx = a stage's
    # e4m3 boxes; every stage release after a wgmma wait and a named barrier of the whole MMA partition
    cfg = default_gluon_fp8_config(block_m=block_m, pingpong=pingpong)
    parts = 2 if pingpong else 1
    probe = _SM90_PROBE.format(block_m=block_m, pingpong=pingpong, k_up=k_up, k_down=k_down)
    for kind, k_tiles, r in zip(("up", "down"), (k_up, k_down), run_sm90_probe(probe)):
        g, groups = cfg[kind], 2 if kind == "up" else 1
        assert r["spill_bytes"] == 0 and r["shared_bytes"] <= SHARED_LIMIT, r
        assert abs(r["shared_bytes"] - fp8_shared_bytes(block_m, g, kind == "up")) < 1024, r
        chunk = min(g["k_chunk"], k_tiles)
        unrolled = chunk + k_tiles % chunk  # the chunk loop's body and the static tail
        assert r["wgmma_ptx"] == parts * unrolled * groups * 128 // 32, r  # k32 instructions a step
        assert r["qgmma_sass"] == r["wgmma_ptx"] and r["hgmma_sass"] == 0, r
        chunks = 1 + (k_tiles % chunk > 0)
        pend = r["wgmma_wait_pendings_sass"]
        assert pend == r["wgmma_wait_pendings_ptx"], r  # ptxas kept every wait as written: no serialization
        # a wait after each MMA but a chunk's first (SILU_MUL: its first gate), pendings 1; one wait 0 a chunk
        assert pend.count(0) == parts * chunks and set(pend) == {0, 1}, r
        assert pend.count(1) == parts * sum(groups * n - 1 for n in (chunk, k_tiles % chunk) if n), r
        regs = {n for _, n in r["setmaxnreg"]}
        meta = launch_meta(g)  # the load warpgroup shrinks to its 24, the MMA warps grow to 240
        assert meta["LOAD_REGS"] == 24 and min(regs) == 24 and max(regs) >= 240, r
        assert r["registers_cap"] == meta["maxnreg"], r
        assert r["tma_loads_ptx"] == 1 + groups and r["tma_stores_ptx"] == parts, r
        assert r["expect_tx_bytes"] == [(block_m + groups * g["BLOCK_N"]) * 128], r  # e4m3: a byte an element
        threads = 32 * g["num_warps"]
        assert r["release_syncs"] and set(r["release_syncs"]) == {threads}, r
        assert r["store_wait_syncs"] == [threads] * 2 * parts, r
        assert len(r["named_barriers"]) == parts and {n for _, n in r["named_barriers"]} == {threads}, r


_LAUNCH_PROBE = SM90_DRIVER_PRELUDE + """
from kernels.moe_gluon_fp8 import _grouped_gemm_fp8_ws_kernel, default_gluon_fp8_config, fp8_launch_args

num_experts, hidden, inter, rows, bm = 4, 1024, 384, 512, 128
cfg = default_gluon_fp8_config()
out = []
for kind, (k, n, w_rows) in (("up", (hidden, inter, 2 * inter)), ("down", (inter, hidden, hidden))):
    f8 = torch.float8_e4m3fn
    a, w = torch.empty(rows, k, dtype=f8), torch.empty(num_experts * w_rows, k, dtype=f8)
    a_s, w_s = torch.empty(rows, -(-k // 128)), torch.empty(num_experts, -(-w_rows // 128), -(-k // 128))
    res = torch.empty(rows, n, dtype=torch.bfloat16)
    expert_ids, npp = torch.zeros(rows // bm, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    grid, args, kwargs = fp8_launch_args(a, a_s, w, w_s, res, expert_ids, npp, n, w_rows, kind == "up", bm,
                                         cfg[kind], 132)
    kern = _grouped_gemm_fp8_ws_kernel.warmup(*args, grid=grid, **kwargs)
    out.append({"kind": kind, "n": n, "grid": grid, "warps": kern.metadata.num_warps, "k_tiles": kwargs["K_TILES"],
                "shared": kern.metadata.shared, "boxes": [m["block_size"] for m in kern.metadata.tensordesc_meta]})
print(json.dumps(out))
"""


def test_fp8_launch_args_bind_and_compile_for_sm90():
    # grouped_gemm_gluon_fp8's launch bound by Triton's JIT as on a GPU (descriptors, scale pointers and strides,
    # constexprs) and compiled for sm90 (warmup: nothing runs): e4m3 boxes 128 wide (one scale group a K step)
    rows = run_sm90_probe(_LAUNCH_PROBE)
    cfg = default_gluon_fp8_config()
    for r, k_tiles in zip(rows, (8, 3)):
        g = cfg[r["kind"]]
        assert r["grid"] == [512 // 128 * -(-r["n"] // g["BLOCK_N"])] and r["k_tiles"] == k_tiles, r
        assert r["warps"] == 12 and abs(r["shared"] - fp8_shared_bytes(128, g, r["kind"] == "up")) < 1024, r
        assert r["boxes"][:2] == [[128, 128], [g["BLOCK_N"], 128]], r


@pytest.mark.parametrize("change,silu_mul,match", [
    (dict(BLOCK_K=64), False, "BLOCK_K 64"),
    (dict(BLOCK_N=256, num_stages=4), False, "BLOCK_N 256"),
    (dict(BLOCK_N=128, num_stages=4), True, "accumulator registers"),
    (dict(num_stages=8), True, "shared memory"),
    (dict(k_chunk=9), False, "k_chunk 9"),
    (dict(tile=3), False, "unknown keys"),
])
def test_bad_fp8_config_says_which_key(change, silu_mul, match):
    base = default_gluon_fp8_config()["up" if silu_mul else "down"]
    check_gluon_fp8_config(128, base, silu_mul)
    with pytest.raises(ValueError, match=match):
        check_gluon_fp8_config(128, dict(base, **change), silu_mul)
    with pytest.raises(ValueError, match="BLOCK_M 64"):
        default_gluon_fp8_config(pingpong=True)


def _fp8_operands(rows: int, k: int, w_rows: int, num_experts: int, seed: int = 0):
    from tests.test_kernels_moe import _blocky
    torch.manual_seed(seed)
    a, a_scale = per_token_group_quant_ref(_blocky((rows, k)))
    w, w_scale = quantize_weight_block(_blocky((num_experts, w_rows, k)) / 16)
    return a, a_scale, w, w_scale


def test_fp8_launch_args_refuse_bad_operands():
    cfg = default_gluon_fp8_config()
    a, a_s, w, w_s = _fp8_operands(256, 256, 384, 2)
    out, ids, npp = torch.zeros(256, 192, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.int32), torch.zeros(1)
    w2 = w.view(-1, 256)
    fp8_launch_args(a, a_s, w2, w_s, out, ids, npp, 192, 384, True, 128, cfg["up"], 132)  # fine
    with pytest.raises(ValueError, match="e4m3 operands"):
        fp8_launch_args(a.bfloat16(), a_s, w2, w_s, out, ids, npp, 192, 384, True, 128, cfg["up"], 132)
    with pytest.raises(ValueError, match="a_scale"):
        fp8_launch_args(a, a_s[:, :1], w2, w_s, out, ids, npp, 192, 384, True, 128, cfg["up"], 132)
    with pytest.raises(ValueError, match="multiple of BLOCK_N"):  # an up tile across two scale blocks
        fp8_launch_args(a, a_s, w2[: 2 * 2 * 160], w_s, out[:, :160], ids, npp, 160, 320, True, 128, cfg["up"], 132)


def test_fp8_reference_is_the_triton_fp8_kernels_sum():
    # grouped_gemm_fp8_ref, the GPU tests' reference: the Triton TMA FP8 kernel (interpreter) computes the same
    # per-K-step scaled sum, and it is the dequantized operands' product up to fp32 rounding. K tail (272 = 2 x 128
    # + 16), blocks of several experts, an N (192) whose up rows start mid scale block; the up GEMM and the down
    num_experts, k, n, bm = 3, 272, 192, 16
    expert_ids = torch.tensor([2, 0, 0, 1], dtype=torch.int32)
    npp = torch.tensor([4 * bm], dtype=torch.int32)
    for silu_mul in (True, False):
        w_rows = 2 * n if silu_mul else n
        a, a_s, w, w_s = _fp8_operands(4 * bm, k, w_rows, num_experts, seed=int(silu_mul))
        w = w.view(-1, k)
        ref = grouped_gemm_fp8_ref(a, a_s, w, w_s, expert_ids, 4, n, w_rows, silu_mul, bm)
        g = dict(default_tma_config(fp8=True)["down"], BLOCK_N=64, num_warps=4, num_stages=2)
        out = torch.empty(4 * bm, n, dtype=torch.float32)
        grouped_gemm(a, w, out, expert_ids, npp, n, w_rows, silu_mul, bm, g, 3, a_s, w_s)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
        deq_a = a.float() * a_s.repeat_interleave(128, 1)[:, :k]
        deq_w = w.float().view(num_experts, w_rows, k) * w_s.repeat_interleave(128, 1).repeat_interleave(128, 2)[
            :, :w_rows, :k]
        plain = torch.cat([deq_a[b * bm:(b + 1) * bm] @ deq_w[int(e)].T for b, e in enumerate(expert_ids)])
        if silu_mul:
            plain = torch.nn.functional.silu(plain[:, :n]) * plain[:, n:]
        assert ((plain - ref).norm() / ref.norm()).item() < 1e-5


def fp8_gluon_by_reference(monkeypatch, launched: list) -> None:
    """On the CPU (Gluon has no interpreter): the FP8 Gluon GEMM's launch by fp8_launch_args' checks and then its
    per-K-step reference, each launch appending (silu_mul, block_m, tiles) to launched; the activation quantization
    by its torch reference (the interpreter rounds e4m3 otherwise)."""
    import kernels.moe_gluon_fp8 as mgf
    import kernels.moe_grouped_tma as mg

    def kernel_by_reference(a, a_scale, w, w_scale, out, expert_ids, num_post_pad, n, w_rows, silu_mul, block_m, g,
                            num_sms=None):
        fp8_launch_args(a, a_scale, w, w_scale, out, expert_ids, num_post_pad, n, w_rows, silu_mul, block_m, g, 132)
        blocks = int(num_post_pad) // block_m
        out[: blocks * block_m] = grouped_gemm_fp8_ref(a, a_scale, w, w_scale, expert_ids, blocks, n, w_rows,
                                                       silu_mul, block_m).to(out.dtype)
        launched.append((silu_mul, block_m, g))

    monkeypatch.setattr(mgf, "grouped_gemm_gluon_fp8", kernel_by_reference)
    monkeypatch.setattr(mg, "per_token_group_quant", per_token_group_quant_ref)
    monkeypatch.setattr(mgf, "per_token_group_quant", per_token_group_quant_ref)


def test_fused_experts_fp8_gluon_flow(monkeypatch):
    # fused_experts_tma with an FP8 table's gluon entry: the permuted e4m3 rows and scales into the gate_up GEMM,
    # its 16-bit act quantized per token group, the down GEMM, the weighted sum: on the CPU the kernel launch is
    # replaced by its per-K-step reference (Gluon has no interpreter), the rest runs as on the GPU
    from tests.test_kernels_moe import _blocky
    from tests.test_kernels_moe_tma import _skewed_routing

    launched = []
    fp8_gluon_by_reference(monkeypatch, launched)
    torch.manual_seed(3)
    num_tokens, num_experts, hidden, inter, top_k = 21, 8, 256, 192, 2
    x = _blocky((num_tokens, hidden)).half()  # (the kernel's output: 16-bit)
    w13, s13 = quantize_weight_block(_blocky((num_experts, 2 * inter, hidden)) / 16)
    w2, s2 = quantize_weight_block(_blocky((num_experts, hidden, inter)) / 16)
    weights, ids = _skewed_routing(num_tokens, num_experts, top_k, 7)
    ref = fused_experts_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, act_fp8=True)
    cfg = default_gluon_fp8_config(block_m=64)
    out = fused_experts_tma(x, w13, w2, weights, ids, cfg, w13_scale=s13, w2_scale=s2)
    assert [(silu_mul, g["BLOCK_N"]) for silu_mul, _, g in launched] == [(True, 64), (False, 64)]
    # (fp16 act: a rounding can flip an e4m3 step of the down GEMM's input; a wrong scale block is off by 2^k)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    monkeypatch.undo()
    with pytest.raises(ValueError, match="only on an NVIDIA GPU"):  # the real launch, on the CPU
        fused_experts_tma(x, w13, w2, weights, ids, cfg, w13_scale=s13, w2_scale=s2)


_BACK_EDGE_PROBE = """
import json
from benchmarks.moe_gluon_ir import back_edge_repro
print(json.dumps(back_edge_repro()))
"""


def test_ptxas_serializes_a_partial_read_across_the_loop_back_edge():
    # why _fp8_steps unrolls its K steps: the same promotion written as a rolled loop, a partial left in flight
    # over the back edge and read after the next iteration's wait(1) (kernels/moe_gluon_fp8.py's first form),
    # makes ptxas serialize every wgmma (C7514: "non wgmma instructions reading accumulator registers of a wgmma
    # between start and end of the pipeline stage"): all its waits become pendings 0 in SASS. Within one
    # iteration, waited to 0 at its end, the wait(1) stays. (If a ptxas lifts this, the rolled loop would do.)
    r = run_sm90_probe(_BACK_EDGE_PROBE)  # (benchmarks/moe_gluon_ir.py --repro-back-edge prints it)
    assert r["within"]["sass"] == r["within"]["ptx"] and 1 in r["within"]["sass"], r
    assert 1 in r["across"]["ptx"] and set(r["across"]["sass"]) == {0} and r["across"]["c7514"], r


# ------------------------------------------------------------------------------------------- GPU

# odd: H 1008 (K steps of 128 and a 112 tail in the up GEMM; a tail N tile in the down), I 320 (up rows starting
# mid scale block; a 64-channel K tail in the down); glm45air: GLM-4.5-Air's experts (32 / 11 K steps)
GPU_SHAPES = {"qwen3": (128, 2048, 768, 8), "odd": (16, 1008, 320, 4), "glm45air": (128, 4096, 1408, 8)}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _gpu_problem(shape: str, num_tokens: int, seed: int = 0, skew: bool = False):
    # e4m3 experts with [128, 128] block scales (quantized from random bf16 ones), bf16 tokens
    num_experts, hidden, inter, top_k = GPU_SHAPES[shape]
    torch.manual_seed(num_tokens + seed)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w13, s13 = quantize_weight_block(torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden**0.5)
    w2, s2 = quantize_weight_block(torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5)
    # skew: a quarter of the experts take every slot, the others get zero rows and the busy ones many blocks
    used = max(top_k, num_experts // 4) if skew else num_experts
    ids = torch.stack([torch.randperm(used, device="cuda")[:top_k] for _ in range(num_tokens)]).int()
    ids[::5, 0] = -1  # slots another expert-parallel rank handles
    weights = torch.rand(num_tokens, top_k, device="cuda") + 0.1
    return x, w13, s13, w2, s2, weights, ids


def _variants() -> dict[str, dict]:
    # named so that a GPU run can take the ping-pong one apart (-k pp / -k "not pp")
    return {"coop128": default_gluon_fp8_config(), "coop64": default_gluon_fp8_config(block_m=64),
            "pp64": default_gluon_fp8_config(block_m=64, pingpong=True)}


@pytest.mark.gpu
@pytest.mark.parametrize("num_blocks", [3, 0])
@pytest.mark.parametrize("kind", ["up", "down"])
@pytest.mark.parametrize("variant", list(_variants()))
def test_gluon_fp8_gemm_smoke_gpu(variant, kind, num_blocks):
    # the first GPU step (benchmarks/gpu_session_moe_gluon.sh MODES=fp8, under a short timeout): one GEMM of a few
    # tiles, one program (num_sms 1) looping over all of them, so the rings wrap several laps and, in ping-pong,
    # both MMA partitions take tiles in turn; K 784 = 6 x 128 + 16 (7 K steps: up two unrolled chunks of 3 and a
    # tail of 1, down one of 4 and a tail of 3); N 192 for up (its up rows start mid scale block), 176 for down (a
    # tail tile); a fourth row block past num_post_pad (expert -1) and num_blocks 0 (no tile: nothing written, no hang).
    # The output is the left N columns of a wider NaN-filled buffer: the TMA store must clip the rest.
    from kernels.fp8 import per_token_group_quant
    from kernels.moe_gluon_fp8 import grouped_gemm_gluon_fp8
    cfg = _variants()[variant]
    bm, g, silu_mul = cfg["BLOCK_M"], cfg[kind], kind == "up"
    num_experts, k = 3, 784
    n = 192 if silu_mul else 176
    w_rows = 2 * n if silu_mul else n
    torch.manual_seed(0)
    a, a_s = per_token_group_quant(torch.randn(4 * bm, k, device="cuda", dtype=torch.bfloat16))
    w, w_s = quantize_weight_block(torch.randn(num_experts, w_rows, k, device="cuda") / k**0.5)
    w = w.view(-1, k)
    expert_ids = torch.tensor([0, 2, 2, -1], device="cuda", dtype=torch.int32)
    num_post_pad = torch.tensor([num_blocks * bm], device="cuda", dtype=torch.int32)
    wide = torch.full((4 * bm, n + 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_gemm_gluon_fp8(a, a_s, w, w_s, wide[:, :n], expert_ids, num_post_pad, n, w_rows, silu_mul, bm, g,
                           num_sms=1)
    torch.cuda.synchronize()
    rows = num_blocks * bm
    assert wide[rows:].isnan().all() and wide[:, n:].isnan().all()  # nothing past the tiles' rows or column N
    if num_blocks:
        ref = grouped_gemm_fp8_ref(a, a_s, w, w_s, expert_ids, num_blocks, n, w_rows, silu_mul, bm)
        for b in range(num_blocks):  # (bf16 output rounding only: same products, sums in another order)
            assert _rel_err(wide[b * bm:(b + 1) * bm, :n], ref[b * bm:(b + 1) * bm]) < 5e-3, b


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen3", "odd"])
@pytest.mark.parametrize("num_tokens", [1, 37, 777, 4096])
@pytest.mark.parametrize("variant", list(_variants()))
@pytest.mark.parametrize("skew", [False, True])
def test_fused_experts_gluon_fp8_gpu(shape, num_tokens, variant, skew):
    x, w13, s13, w2, s2, weights, ids = _gpu_problem(shape, num_tokens, skew=skew)
    cfg = _variants()[variant]
    ref = fused_experts_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, act_fp8=True)
    out = fused_experts_tma(x, w13, w2, weights, ids, cfg, w13_scale=s13, w2_scale=s2)
    # as test_fused_experts_tma_fp8_gpu: a bf16 rounding of act can flip an e4m3 step of the down GEMM's input
    assert _rel_err(out, ref) < 4e-2
    triton_fp8 = fused_experts_tma(x, w13, w2, weights, ids, default_tma_config(fp8=True), w13_scale=s13,
                                   w2_scale=s2)
    assert _rel_err(out, triton_fp8) < 4e-2


@pytest.mark.gpu
def test_fused_experts_gluon_fp8_glm_through_fused_experts_gpu():
    # GLM-4.5-Air's sizes (32 / 11 K steps: chunks and tails of the unrolled K loop) through fused_experts with an
    # FP8 table whose tma entry sets gluon
    from kernels.fused_moe import fused_experts
    from kernels.moe_config import default_config
    x, w13, s13, w2, s2, weights, ids = _gpu_problem("glm45air", 2048)
    cfg = dict(default_config(2048, 128, 8, True), tma=default_gluon_fp8_config())
    out = fused_experts(x, w13, w2, weights, ids, config=cfg, w13_scale=s13, w2_scale=s2)
    ref = fused_experts_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, act_fp8=True)
    assert _rel_err(out, ref) < 4e-2


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["coop128", "pp64"])
def test_fused_experts_gluon_fp8_graph_replay_gpu(variant):
    # the tile count comes from num_post_pad on the device: new routings (other block counts) replayed from one
    # graph stay right, including one where few experts take every slot
    x, w13, s13, w2, s2, weights, ids = _gpu_problem("qwen3", 512)
    cfg = _variants()[variant]
    out = fused_experts_tma(x, w13, w2, weights, ids, cfg, w13_scale=s13, w2_scale=s2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts_tma(x, w13, w2, weights, ids, cfg, w13_scale=s13, w2_scale=s2)
    for i in range(4):
        *_, new_w, new_ids = _gpu_problem("qwen3", 512, seed=i + 1, skew=i == 3)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        ref = fused_experts_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, act_fp8=True)
        assert _rel_err(out, ref) < 4e-2, i
