"""The Gluon warp-specialized MoE grouped GEMM (kernels/moe_gluon.py): compiled for sm90 on the CPU (Gluon has
no interpreter), its config checks and dispatch; on a GPU its outputs vs the torch reference and the Triton
TMA path, at odd sizes, under graph capture."""

import os

import pytest
import torch

from tests.sm90 import SM90_DRIVER_PRELUDE, run_sm90_probe

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.fused_moe import fused_experts, fused_experts_ref  # noqa: E402
from kernels.moe_config import default_config  # noqa: E402
from kernels.moe_gluon import (  # noqa: E402
    SHARED_LIMIT,
    check_gluon_config,
    default_gluon_config,
    launch_meta,
    shared_bytes,
)
from kernels.moe_grouped_tma import default_tma_config, fused_experts_tma  # noqa: E402
from tests.tiny import tiny_moe_inputs  # noqa: E402

_SM90_PROBE = """
import json
from benchmarks.moe_gluon_ir import compile_gluon_sm90, gluon_report
from kernels.moe_gluon import default_gluon_config
cfg = default_gluon_config(block_m={block_m}, pingpong={pingpong})
print(json.dumps([gluon_report(compile_gluon_sm90(kind, cfg[kind], {block_m})) for kind in ("up", "down")]))
"""


@pytest.mark.parametrize("block_m,pingpong", [
    (128, False), (128, True),
    pytest.param(64, False, marks=pytest.mark.slow), pytest.param(64, True, marks=pytest.mark.slow),
])
def test_gluon_gemm_compiles_for_sm90_warp_specialized(block_m, pingpong):
    # the default up (SiLU-and-mul, two accumulators) and down tiles, for Qwen3-30B-A3B or any shape (the binary
    # depends on the tiles only): no spills, shared memory under the limit, TMA loads fed by a load partition
    # whose registers shrink to 40 (setmaxnreg) while the MMA partitions' grow to 232+, async wgmma with one K
    # step left in flight (wait pendings = the MMAs of a step, > 0) before the tile's final wait 0, and a TMA
    # store of the tile; pingpong: all of it twice, once per MMA partition
    cfg = default_gluon_config(block_m=block_m, pingpong=pingpong)
    parts = 2 if pingpong else 1
    for kind, r in zip(("up", "down"), run_sm90_probe(_SM90_PROBE.format(block_m=block_m, pingpong=pingpong))):
        g = cfg[kind]
        assert r["spill_bytes"] == 0 and r["shared_bytes"] <= SHARED_LIMIT, r
        # the host's estimate (what check_gluon_config rejects on) is within barriers' bytes of the compiler's
        assert abs(r["shared_bytes"] - shared_bytes(block_m, g, kind == "up")) < 1024, r
        per_step = (2 if kind == "up" else 1) * g["BLOCK_K"] // 16 * block_m // (16 * g["num_warps"])
        assert r["wgmma_ptx"] == parts * per_step and r["hgmma_sass"] == r["wgmma_ptx"], r
        groups = 2 if kind == "up" else 1  # commit groups a K step: gate and up
        assert sorted(r["wgmma_wait_pendings_ptx"]) == sorted([0, groups] * parts), r
        assert sorted(r["wgmma_wait_pendings_sass"]) == sorted([0, groups] * parts), r  # ptxas kept the pipelining
        regs = {n for _, n in r["setmaxnreg"]}
        assert 40 in regs and max(regs) >= 232, r
        # ptxas took the launch's maxnreg (it ignores one over 255, and setmaxnreg needs a valid one to act)
        assert r["registers_cap"] == launch_meta(g)["maxnreg"], r
        assert r["tma_loads_ptx"] == 1 + groups and r["tma_stores_ptx"] == parts, r
        # the barrier protocol as compiled: the load warp expects a stage's box bytes (zero-filled tails counted
        # by TMA too); each MMA partition (its own named barrier) syncs all its warps between their wgmma wait
        # and the one-thread release of the stage (in the K loop and after the tile's last step), and between
        # the TMA store wait (only the issuing thread's group) and rewriting the output tile
        threads = 32 * g["num_warps"]
        assert r["expect_tx_bytes"] == [2 * (block_m + groups * g["BLOCK_N"]) * g["BLOCK_K"]], r
        assert r["release_syncs"] == [threads] * 2 * parts and r["store_wait_syncs"] == [threads] * 2 * parts, r
        assert len(r["named_barriers"]) == parts and {n for _, n in r["named_barriers"]} == {threads}, r


_LAUNCH_PROBE = SM90_DRIVER_PRELUDE + """
from kernels.moe_gluon import _grouped_gemm_ws_kernel, default_gluon_config, launch_args

num_experts, hidden, inter, rows, bm = 8, 2048, 768, 1024, 128
out = []
for pingpong in (False, True):
    cfg = default_gluon_config(pingpong=pingpong)
    for kind, (k, n, w_rows) in (("up", (hidden, inter, 2 * inter)), ("down", (inter, hidden, hidden))):
        a, w = torch.empty(rows, k, dtype=torch.bfloat16), torch.empty(num_experts * w_rows, k, dtype=torch.bfloat16)
        res = torch.empty(rows, n, dtype=torch.bfloat16)
        expert_ids, npp = torch.zeros(rows // bm, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        grid, args, kwargs = launch_args(a, w, res, expert_ids, npp, n, w_rows, kind == "up", bm, cfg[kind], 132)
        kern = _grouped_gemm_ws_kernel.warmup(*args, grid=grid, **kwargs)
        out.append({"kind": kind, "pingpong": pingpong, "n": n, "grid": grid, "warps": kern.metadata.num_warps,
                    "shared": kern.metadata.shared, "boxes": [m["block_size"] for m in kern.metadata.tensordesc_meta]})
print(json.dumps(out))
"""


def test_launch_args_bind_and_compile_for_sm90():
    # grouped_gemm_gluon's launch, bound by Triton's JIT as on a GPU (its descriptors, constexprs and maxnreg)
    # and compiled for sm90 (warmup: nothing runs): 8 MMA warps + the load warpgroup, or 2 x 4 + 4 for
    # ping-pong; every TMA box split to 64 columns (128-byte swizzle); one program per SM when the rows allow
    rows = run_sm90_probe(_LAUNCH_PROBE)
    assert len(rows) == 4
    for r in rows:
        g = default_gluon_config(pingpong=r["pingpong"])[r["kind"]]
        assert r["grid"] == [1024 // 128 * -(-r["n"] // g["BLOCK_N"])], r  # all tiles (< 132 here)
        assert r["warps"] == 12 and abs(r["shared"] - shared_bytes(128, g, r["kind"] == "up")) < 1024, r
        assert all(box[1] == 64 for box in r["boxes"]), r


@pytest.mark.parametrize("g,silu_mul,match", [
    (dict(BLOCK_N=96), False, "BLOCK_N 96"),
    (dict(BLOCK_K=16), False, "BLOCK_K 16"),
    (dict(num_stages=6), True, "shared memory"),
    (dict(num_stages=1), False, "num_stages 1"),
    (dict(num_warps=4), True, "accumulator registers"),
    (dict(num_warps=2), False, "num_warps 2"),
    (dict(tile=3), False, "unknown keys"),
    (dict(pingpong=1), False, "pingpong takes num_warps 4"),
    (dict(pingpong=1, num_warps=4, BLOCK_N=128, num_stages=3), False, "even"),
])
def test_bad_gluon_config_says_which_key(g, silu_mul, match):
    base = default_gluon_config()["up" if silu_mul else "down"]
    with pytest.raises(ValueError, match=match):
        check_gluon_config(128, dict(base, **g), silu_mul)
    with pytest.raises(ValueError, match="BLOCK_M 96"):
        check_gluon_config(96, base, silu_mul)


@pytest.mark.parametrize("k,n", [(1001, 256), (256, 1001)])
def test_launch_args_refuse_unaligned_rows(k, n):
    # a K or N that is not a multiple of 8 (bf16: rows not 16-byte aligned, which TMA needs): a ValueError naming
    # the operand, not the descriptor's bare assert (fused_experts takes the old path there: tma_supported)
    from kernels.moe_gluon import launch_args
    cfg = default_gluon_config()
    a, w = torch.zeros(256, k, dtype=torch.bfloat16), torch.zeros(2 * n, k, dtype=torch.bfloat16)
    out, ids, npp = torch.zeros(256, n, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.int32), torch.zeros(1)
    with pytest.raises(ValueError, match="16-byte aligned"):
        launch_args(a, w, out, ids, npp, n, n, False, 128, cfg["down"], 132)


def test_defaults_leave_gluon_off_and_fit():
    assert "gluon" not in default_tma_config() and "tma" not in default_config(4096, 128, 8, False)
    cfg = default_gluon_config()
    check_gluon_config(cfg["BLOCK_M"], cfg["up"], True)
    check_gluon_config(cfg["BLOCK_M"], cfg["down"], False)


def test_fused_experts_dispatches_to_gluon():
    # a table's tma entry with "gluon" takes the Gluon kernel: on the CPU that is a clear error (no interpreter),
    # after the align and the permute ran; FP8 experts take kernels/moe_gluon_fp8.py, which wants BLOCK_K 128
    x, weights, ids = tiny_moe_inputs(40, 4, 64, 2, seed=0)
    w13, w2 = torch.randn(4, 64, 64).half(), torch.randn(4, 64, 32).half()
    gl_cfg = default_gluon_config()
    cfg = dict(default_config(40, 4, 2, False), tma=dict(gl_cfg, BLOCK_M=64, up=dict(gl_cfg["up"], num_warps=4)))
    with pytest.raises(ValueError, match="only on an NVIDIA GPU"):
        fused_experts(x, w13, w2, weights, ids, config=cfg)
    s13 = torch.ones(4, 1, 1)
    with pytest.raises(ValueError, match="only on an NVIDIA GPU"):
        fused_experts_tma(x, w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn), weights, ids,
                          cfg["tma"], w13_scale=s13, w2_scale=s13)
    from kernels.moe_gluon import moe_gemms_gluon
    with pytest.raises(ValueError, match="moe_gluon_fp8"):
        moe_gemms_gluon(x, x, w13, w2, ids, ids, cfg["tma"], None, True)


# ------------------------------------------------------------------------------------------- GPU

GPU_SHAPES = {"qwen3": (128, 2048, 768, 8), "odd": (16, 1000, 352, 4)}  # odd: K and N tails in both GEMMs


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _gpu_problem(shape: str, num_tokens: int, seed: int = 0, skew: bool = False):
    num_experts, hidden, inter, top_k = GPU_SHAPES[shape]
    torch.manual_seed(num_tokens + seed)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden**0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5).bfloat16()
    # skew: a quarter of the experts take every slot, the others get zero rows and the busy ones many blocks
    used = max(top_k, num_experts // 4) if skew else num_experts
    ids = torch.stack([torch.randperm(used, device="cuda")[:top_k] for _ in range(num_tokens)]).int()
    ids[::5, 0] = -1  # slots another expert-parallel rank handles
    weights = torch.rand(num_tokens, top_k, device="cuda") + 0.1
    return x, w13, w2, weights, ids


def _variants() -> dict[str, dict]:
    # named so that a GPU run can take the ping-pong ones apart (-k pp / -k "not pp")
    d = default_gluon_config()
    return {"coop128": d, "pp128": default_gluon_config(pingpong=True), "coop64": default_gluon_config(block_m=64),
            "pp64": default_gluon_config(block_m=64, pingpong=True),
            "coop128_n64": dict(d, up=dict(d["up"], BLOCK_N=64, num_stages=6),
                                down=dict(d["down"], BLOCK_N=128, num_stages=6))}


@pytest.mark.gpu
@pytest.mark.parametrize("num_blocks", [3, 0])
@pytest.mark.parametrize("kind", ["up", "down"])
@pytest.mark.parametrize("variant", list(_variants()))
def test_gluon_gemm_smoke_gpu(variant, kind, num_blocks):
    # the first GPU step (benchmarks/gpu_session_moe_gluon.sh, under a short timeout): one GEMM of a few tiles, one
    # program (num_sms 1) looping over all of them, so the rings wrap several laps within and across tiles and, in
    # ping-pong, both MMA partitions take tiles in turn; K and N tails; a fourth row block past num_post_pad
    # (expert -1) and num_blocks 0 (no tile at all: nothing may be written, nothing may hang). The output is the
    # left N columns of a wider NaN-filled buffer: the TMA store must clip columns >= N and rows past the tiles.
    from kernels.moe_gluon import grouped_gemm_gluon
    cfg = _variants()[variant]
    bm, g, silu_mul = cfg["BLOCK_M"], cfg[kind], kind == "up"
    num_experts, k, n = 3, 200, 176  # K: 3 steps of 64 and 8 columns; N: 176 = 2 x 64 + 48 = 128 + 48
    torch.manual_seed(0)
    w_rows = 2 * n if silu_mul else n
    a = torch.randn(4 * bm, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(num_experts * w_rows, k, device="cuda") / k**0.5).bfloat16()
    expert_ids = torch.tensor([0, 2, 2, -1], device="cuda", dtype=torch.int32)
    num_post_pad = torch.tensor([num_blocks * bm], device="cuda", dtype=torch.int32)
    wide = torch.full((4 * bm, n + 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_gemm_gluon(a, w, wide[:, :n], expert_ids, num_post_pad, n, w_rows, silu_mul, bm, g, num_sms=1)
    torch.cuda.synchronize()
    rows = num_blocks * bm
    assert wide[rows:].isnan().all() and wide[:, n:].isnan().all()  # nothing past the tiles' rows or column N
    for b in range(num_blocks):
        e = expert_ids[b].item()
        a_b, w_e = a[b * bm:(b + 1) * bm].float(), w[e * w_rows:(e + 1) * w_rows].float()
        ref = a_b @ w_e[:n].T
        if silu_mul:
            ref = torch.nn.functional.silu(ref) * (a_b @ w_e[n:].T)
        assert _rel_err(wide[b * bm:(b + 1) * bm, :n], ref) < 1e-2, b


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen3", "odd"])
@pytest.mark.parametrize("num_tokens", [1, 37, 777, 4096])
@pytest.mark.parametrize("variant", list(_variants()))
@pytest.mark.parametrize("skew", [False, True])
def test_fused_experts_gluon_gpu(shape, num_tokens, variant, skew):
    x, w13, w2, weights, ids = _gpu_problem(shape, num_tokens, skew=skew)
    cfg = _variants()[variant]
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    out = fused_experts_tma(x, w13, w2, weights, ids, cfg)
    assert _rel_err(out, ref) < 1e-2
    assert _rel_err(out, fused_experts_tma(x, w13, w2, weights, ids, default_tma_config())) < 1e-2  # Triton's


@pytest.mark.gpu
def test_fused_experts_gluon_through_fused_experts_gpu():
    x, w13, w2, weights, ids = _gpu_problem("qwen3", 2048)
    cfg = dict(default_config(2048, 128, 8, False), tma=default_gluon_config())
    out = fused_experts(x, w13, w2, weights, ids, config=cfg)
    assert _rel_err(out, fused_experts_ref(x, w13, w2, weights, ids)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["coop128", "pp128"])
def test_fused_experts_gluon_graph_replay_gpu(variant):
    # the tile count comes from num_post_pad on the device: new routings (other block counts) replayed from one
    # graph stay right, including one where few experts take every slot
    x, w13, w2, weights, ids = _gpu_problem("qwen3", 512)
    cfg = _variants()[variant]
    out = fused_experts_tma(x, w13, w2, weights, ids, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts_tma(x, w13, w2, weights, ids, cfg)
    for i in range(4):
        _, _, _, new_w, new_ids = _gpu_problem("qwen3", 512, seed=i + 1, skew=i == 3)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        assert _rel_err(out, fused_experts_ref(x, w13, w2, weights, ids)) < 1e-2, i


def test_checked_in_gluon_entries_are_valid():
    # a table's "tma" entry with "gluon" (H200, Qwen3-30B-A3B: measured ahead of the old path) must pass
    # the checks its launch runs, for its dtype's kernel, with the same tiles as the default the bench measured
    import json
    from pathlib import Path

    from kernels.moe_config import CONFIG_DIR
    from kernels.moe_gluon import check_gluon_config
    from kernels.moe_gluon_fp8 import check_gluon_fp8_config

    seen = 0
    for path in Path(CONFIG_DIR).glob("moe_*.json"):
        for bucket, cfg in json.loads(path.read_text()).items():
            tma = cfg.get("tma")
            if not tma or not tma.get("gluon"):
                continue
            seen += 1
            assert tma["min_rows"] > 0, (path.name, bucket)
            for kind, silu_mul in (("up", True), ("down", False)):
                if "_fp8_" in path.name:
                    check_gluon_fp8_config(tma["BLOCK_M"], tma[kind], silu_mul)
                else:
                    check_gluon_config(tma["BLOCK_M"], tma[kind], silu_mul)
    assert seen >= 2  # the two Qwen3-30B-A3B H200 tables
