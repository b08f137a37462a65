"""Compile the Gluon MoE grouped GEMM (kernels/moe_gluon.py) for a Hopper GPU (sm90) on any machine, no GPU
needed, and report what the compiler made of it: registers (the launch's cap and each partition's setmaxnreg),
spills, shared memory, the wgmma count and the pendings of every wait on them (PTX wait_group N and the SASS
WARPGROUP.DEPBAR.LE N: N > 0 in the K loop keeps an MMA in flight), and the TMA loads / stores.

python benchmarks/moe_gluon_ir.py up [--block-n 128 --block-k 64 --stages 4 --warps 8]
python benchmarks/moe_gluon_ir.py down --block-n 256 --stages 3
python benchmarks/moe_gluon_ir.py up --fp8 --block-n 64 --block-k 128 --stages 6   (kernels/moe_gluon_fp8.py)

Prints one JSON line. Must run without TRITON_INTERPRET. The binary does not depend on the model's sizes (K, N
and the row count reach it through the TMA descriptors and two i32 arguments), only on the tile config.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_ir import cuobjdump, report  # noqa: E402

from kernels.moe_gluon import _grouped_gemm_ws_kernel, check_gluon_config, launch_meta  # noqa: E402
from kernels.moe_gluon_fp8 import _grouped_gemm_fp8_ws_kernel, check_gluon_fp8_config, fp8_launch_meta  # noqa: E402


def compile_gluon_sm90(kind: str, g: dict, block_m: int = 128, fp8: bool = False, k_tiles: int = 16):
    """The kernel as grouped_gemm_gluon would launch it (bf16) for one GEMM: "up" (gate_up + SiLU-and-mul) or
    "down", compiled for sm90; fp8: grouped_gemm_gluon_fp8's (e4m3 operands, fp32 scales, bf16 output), whose
    K loop is unrolled: k_tiles = ceil(K / 128) K steps (Qwen3-30B-A3B: 16 up, 6 down)."""
    silu_mul = kind == "up"
    (check_gluon_fp8_config if fp8 else check_gluon_config)(block_m, g, silu_mul)
    bn, bk = g["BLOCK_N"], g["BLOCK_K"]
    meta = fp8_launch_meta(g, k_tiles) if fp8 else launch_meta(g)
    options = {"num_warps": meta["num_warps"], "maxnreg": meta.pop("maxnreg")}

    def desc(box: list[int], fp8_box: bool = False) -> str:  # the signature a gluon TensorDescriptor specializes to
        name, dt = ("fp8e4nv", gl.float8e4nv) if fp8_box else ("bf16", gl.bfloat16)
        return f"tensordesc<{name}[{box[0]}, {box[1]}],{gl.NVMMASharedLayout.get_default_for(box, dt)!r}>"

    fn = _grouped_gemm_fp8_ws_kernel if fp8 else _grouped_gemm_ws_kernel
    consts = dict(meta, SILU_MUL=silu_mul, NUM_SMS=132)
    args = {"a_desc": desc([block_m, bk], fp8), "w_desc": desc([bn, bk], fp8), "out_desc": desc([block_m, bn]),
            "expert_ids_ptr": "*i32", "num_post_pad_ptr": "*i32", "N": "i32", "W_ROWS": "i32",
            "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "stride_as": "i32", "stride_wse": "i32",
            "stride_wsn": "i32"}
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            sig[name] = args[name]
            if args[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    # N, W_ROWS: plain i32 (a launch with 768 / 2048 adds divisibility 16: the TMA coordinates need none)
    src = GluonASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _release_syncs(ptx: str) -> list[int | None]:
    """Per plain mbarrier.arrive (an MMA partition releasing a stage: one thread arrives, count 1), the thread
    count of the named barrier (bar.sync id, count) passed after a wgmma wait and before it, with no MMA issued
    or stage waited for in between; None if none: every warpgroup of the partition must be past its wait, i.e.
    done reading the stage, before the arrive lets the load warp overwrite it. (PTX text order: each arrive
    follows its wait there.)"""
    out, state = [], None  # None, "waited" or the synced thread count
    for line in ptx.splitlines():
        if "wgmma.commit_group" in line or "mbarrier.try_wait" in line:
            state = None
        elif "wgmma.wait_group" in line:
            state = "waited"
        elif state is not None and (m := re.search(r"\bbar\.sync\s+\d+,\s*(\d+);", line)):
            state = int(m.group(1))
        elif "mbarrier.arrive.shared" in line:
            out.append(state if isinstance(state, int) else None)
    return out


def _store_wait_syncs(ptx: str) -> list[int | None]:
    """Per TMA store wait (cp.async.bulk.wait_group.read: only the issuing thread has the group), the thread
    count of the first bar.sync after it, None if shared memory is written (st.shared / stmatrix) first: the
    other threads may rewrite the output tile only after the issuing one knows the store has read it."""
    out, pending = [], False
    for line in ptx.splitlines():
        if "cp.async.bulk.wait_group.read" in line:
            pending = True
        elif pending and (m := re.search(r"\bbar\.sync\s+\d+,\s*(\d+);", line)):
            out.append(int(m.group(1)))
            pending = False
        elif pending and re.search(r"\b(st\.shared|stmatrix)", line):
            out.append(None)
            pending = False
    return out


def gluon_report(kernel) -> dict:
    r = report(kernel)
    ptx = kernel.asm["ptx"]
    sass = cuobjdump(kernel, "-sass")  # attention_ir's report counts the waits; the SASS again for their pendings
    sass_depbar = [int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", sass)]
    return {
        "registers_cap": r["registers"],  # the launch's maxnreg: what ptxas reports for the whole kernel
        # setmaxnreg per partition (the MMA warps grow, the load warpgroup shrinks), in PTX order
        "setmaxnreg": [(op, int(n)) for op, n in re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)],
        "spill_bytes": r["spill_bytes"],
        "shared_bytes": r["shared_bytes"],
        "wgmma_ptx": ptx.count("wgmma.mma_async"),
        "wgmma_wait_pendings_ptx": [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)],
        "hgmma_sass": r["hgmma"],
        "qgmma_sass": len(re.findall(r"\bQGMMA\.", sass)),  # the FP8 kernel's (e4m3) wgmma
        "wgmma_wait_pendings_sass": sass_depbar,
        "tma_loads_ptx": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global", ptx)),
        "tma_stores_ptx": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx)),
        "mbarrier_waits_ptx": ptx.count("mbarrier.try_wait"),
        # the load warp's ready-barrier byte counts (a stage's TMA boxes, zero-filled parts at tails included)
        "expect_tx_bytes": [int(n) for n in re.findall(r"mbarrier\.arrive\.expect_tx\S*\s+_,\s*\[[^]]+\],\s*(\d+)",
                                                       ptx)],
        "release_syncs": _release_syncs(ptx),
        # (id, threads) of every partition-wide named barrier: one id per MMA partition, never shared
        "named_barriers": sorted({(int(i), int(n)) for i, n in re.findall(r"\bbar\.sync\s+(\d+),\s*(\d+);", ptx)}),
        "store_wait_syncs": _store_wait_syncs(ptx),
    }


@gluon.jit
def _promote_repro(out_ptr, s_ptr, K_STEPS, ACROSS: gl.constexpr):
    # two e4m3 wgmmas a loop iteration into two partials, each added (scaled) to a sum while the other one runs.
    # ACROSS: the second partial stays in flight over the back edge and is added after the next iteration's
    # wait(1); else the iteration ends with a wait(0) and adds it there
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32])
    sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    a_s = gl.allocate_shared_memory(gl.float8e4nv, [2, 64, 128], sl)
    b_s = gl.allocate_shared_memory(gl.float8e4nv, [2, 64, 128], sl)
    acc = gl.zeros([64, 64], gl.float32, acc_l)
    p0 = gl.zeros([64, 64], gl.float32, acc_l)
    p1 = gl.zeros([64, 64], gl.float32, acc_l)
    for k in range(K_STEPS):
        s0 = gl.load(s_ptr + 2 * k)
        s1 = gl.load(s_ptr + 2 * k + 1)
        p0 = warpgroup_mma(a_s.index(0), b_s.index(0).permute((1, 0)), p0, use_acc=False, is_async=True)
        if ACROSS:
            p0, p1 = warpgroup_mma_wait(1, deps=(p0, p1))
            acc += p1 * s1
        p1 = warpgroup_mma(a_s.index(1), b_s.index(1).permute((1, 0)), p1, use_acc=False, is_async=True)
        p1, p0 = warpgroup_mma_wait(1, deps=(p1, p0))
        acc += p0 * s0
        if not ACROSS:
            p1 = warpgroup_mma_wait(0, deps=(p1,))
            acc += p1 * s1
    p1 = warpgroup_mma_wait(0, deps=(p1,))
    acc += p1
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, acc_l))[:, None]
    gl.store(out_ptr + rows * 64 + gl.arange(0, 64, layout=gl.SliceLayout(0, acc_l))[None, :], acc)


def back_edge_repro() -> dict:
    """A minimal repro of the ptxas limit that shapes kernels/moe_gluon_fp8.py's K loop: _promote_repro compiled
    for sm90 both ways; per way the wgmma waits' pendings in PTX and SASS and whether ptxas -v says C7514 (it
    serialized the wgmmas: every SASS wait 0)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    out = {}
    for across in (False, True):
        sig = {"out_ptr": "*fp32", "s_ptr": "*fp32", "K_STEPS": "i32", "ACROSS": "constexpr"}
        k = triton.compile(GluonASTSource(_promote_repro, sig, constexprs={(3,): across}),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "k.ptx").write_text(k.asm["ptx"])
            ptxas = subprocess.run([str(bin_dir / "ptxas"), "-arch=sm_90a", "-v", str(Path(d) / "k.ptx"), "-o",
                                    str(Path(d) / "k.cubin")], capture_output=True, text=True)
            sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(Path(d) / "k.cubin")],
                                  capture_output=True, text=True).stdout
        out["across" if across else "within"] = {
            "ptx": [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", k.asm["ptx"])],
            "sass": [int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", sass)],
            "c7514": "C7514" in ptxas.stderr}
    return out


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("moe_gluon_ir.py compiles for the GPU: unset TRITON_INTERPRET")
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["up", "down", "repro-back-edge"],
                    help="repro-back-edge: back_edge_repro's minimal kernel instead (why the FP8 K loop is unrolled)")
    ap.add_argument("--block-m", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=64)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--pingpong", action="store_true", help="two 4-warp MMA partitions taking tiles in turn")
    ap.add_argument("--fp8", action="store_true", help="the FP8 block-scaled kernel (kernels/moe_gluon_fp8.py)")
    ap.add_argument("--k-tiles", type=int, default=16, help="FP8: K steps of 128 (Qwen3-30B-A3B: 16 up, 6 down)")
    ap.add_argument("--k-chunk", type=int, default=4, help="FP8: K steps unrolled at a time")
    a = ap.parse_args()
    if a.kind == "repro-back-edge":
        print(json.dumps(back_edge_repro()))
        return
    g = {"BLOCK_N": a.block_n, "BLOCK_K": a.block_k, "GROUP_M": 8, "num_stages": a.stages, "num_warps": a.warps,
         "pingpong": a.pingpong, **({"k_chunk": a.k_chunk} if a.fp8 else {})}
    try:
        kernel = compile_gluon_sm90(a.kind, g, a.block_m, a.fp8, a.k_tiles)
    except ValueError as exc:
        sys.exit(str(exc))
    print(json.dumps(dict(kind=a.kind, fp8=a.fp8, config=g, **gluon_report(kernel))))


if __name__ == "__main__":
    main()
