"""Compile the paged attention kernels for a Hopper GPU (sm90) on any machine, no GPU needed, and report
what the compiler made of a tile config: registers, spills, shared memory, how deep K/V are buffered and
whether the next tile's copy overlaps the dots, and the conversion instructions in the SASS.

python benchmarks/attention_ir.py decode --kv fp8 --block-n 64 --warps 4 --stages 3 [--fp8-widen 1]
python benchmarks/attention_ir.py prefill --kv bf16 --block-m 128 --block-n 64 --warps 8 --stages 3 [--heads 96/8]
python benchmarks/attention_ir.py decode --kv fp8 --block-n 64 --warps 4 --stages 3 --fp8-dot 1   (e4m3 x e4m3 dots)
python benchmarks/attention_ir.py decode --kv bf16 --block-n 64 --warps 4 --stages 3 --prologue   (prologue fused in)
python benchmarks/attention_ir.py prefill --kv fp8 --block-m 128 --block-n 128 --warps 8 --stages 3 --variants FP8_DOT

Prints one JSON line. Must run without TRITON_INTERPRET (it needs the compiler, not the interpreter). The
arguments get the specializations a launch gives them (pointers and strides divisible by 16), so the binary
is the one the GPU would run for Qwen3-30B-A3B heads (32 q / 4 KV, head_dim 128, 16-token pages).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from inspect import Parameter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.attention.decode import _NO_PROLOGUE as _PROLOGUE_ARGS  # noqa: E402
from kernels.attention.decode import _decode_kernel  # noqa: E402
from kernels.attention.prefill import _prefill_kernel  # noqa: E402

HEAD_DIM, BLOCK = 128, 16
_TYPES = {"bf16": "bf16", "fp8": "fp8e4nv"}


def compile_sm90(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int):
    """triton.compile with the signature and divisibility attributes a launch with these values would get."""
    sig, attrs, consts = {}, {}, {}
    # constexprs with a default (e.g. PDL=False) take it unless given
    constexprs = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not Parameter.empty
                  and p.name not in constexprs} | constexprs
    unspecialized = {fn.arg_names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
        elif isinstance(args[name], str) and args[name].startswith("tensordesc"):  # e.g. tensordesc<fp8e4nv[64, 128]>
            sig[name] = args[name]
        elif isinstance(args[name], str):  # a pointer: its element type
            sig[name], attrs[(i,)] = "*" + args[name], [["tt.divisibility", 16]]
        elif isinstance(args[name], float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if args[name] % 16 == 0 and name not in unspecialized:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                         "num_stages": num_stages})


def cuobjdump(kernel, *flags: str) -> str:
    """cuobjdump (Triton's own copy) on a compiled kernel's cubin: "-sass", "-res-usage"."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([str(bin_dir / "cuobjdump"), *flags, f.name], capture_output=True, text=True).stdout


def report(kernel) -> dict:
    ttgir = kernel.asm["ttgir"]
    res, sass = cuobjdump(kernel, "-res-usage"), cuobjdump(kernel, "-sass")
    ops = re.findall(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass)
    # byte-wide shared loads: an FP8 operand gathered one byte at a time into a dot's layout (FP8 decode's V)
    lds_u8 = len(re.findall(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?LDS\.U8", sass))
    kv_buffers = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x(\w+)", ttgir)
    return {
        "registers": int(m.group(1)) if (m := re.search(r"REG:(\d+)", res)) else None,
        "spill_bytes": int(m.group(1)) if (m := re.search(r"STACK:(\d+)", res)) else None,
        "shared_bytes": kernel.metadata.shared,
        "mma": "wgmma" if "wgmma" in kernel.asm["ptx"] else "mma.sync" if "mma.sync" in kernel.asm["ptx"] else None,
        # depth of each [BLOCK_N, head_dim] K/V ring, and the cp.async groups left in flight at each wait: 0
        # everywhere means the next tile's copy never overlaps this tile's dots
        "kv_buffer_depths": [int(d) for d, _ in kv_buffers],
        "async_wait_in_flight": [int(n) for n in re.findall(r"async_wait[^{]*\{num = (\d+)", ttgir)],
        "tma_loads": ttgir.count("async_tma_copy_global_to_local"),  # tensor-descriptor (TMA) copies in the TTGIR
        "sass_ops": dict({op: ops.count(op) for op in ("F2F", "F2FP", "HMMA", "LDS", "LDSM", "LDGSTS", "MUFU", "PRMT")},
                         LDS_U8=lds_u8),
        "sass_total": len(ops),
        # wgmma groups vs waits on them: a wait after every HGMMA means ptxas serialized them (its C7514 note)
        "hgmma": sum(op.startswith("HGMMA") for op in ops),
        "qgmma": sum(op.startswith("QGMMA") for op in ops),  # FP8 (e4m3) wgmma: the FP8_DOT / fp8_dot variants
        "wgmma_waits": len(re.findall(r"WARPGROUP\.DEPBAR", sass)),
    }


def inspect(kernel: str, kv: str = "bf16", heads: str = "32/4", block_m: int = 128, block_n: int = 64,
            warps: int = 4, stages: int = 2, off64: bool = False, fp8_widen: int = 0,
            variants: tuple[str, ...] = (), fp8_dot: int = 0, fp8_q2: bool = False, prologue: bool = False) -> dict:
    # variants: prefill config keys set to 1 (MASK_FREE, LPT_GRID, RAGGED, FP8_DOT); fp8_dot, fp8_q2:
    # decode's knobs; prologue: decode with the q/k norm + RoPE + KV store fused in (Qwen3's full rotary and q/k norm)
    num_heads, kv_heads = map(int, heads.split("/"))
    group, kv_type = num_heads // kv_heads, _TYPES[kv]
    strides = {"stride_cb": BLOCK * kv_heads * HEAD_DIM, "stride_cs": kv_heads * HEAD_DIM, "stride_ch": HEAD_DIM,
               "stride_bt": 2048}
    common = {"q_ptr": "bf16", "k_cache_ptr": kv_type, "v_cache_ptr": kv_type, "seq_lens_ptr": "i32",
              "block_tables_ptr": "i32", "out_ptr": "bf16", "qk_scale": 0.1, "v_scale": 0.1, **strides}
    if kernel == "decode":
        args = dict(common, part_out_ptr="fp32", part_lse_ptr="fp32", counter_ptr="i32", num_splits=64,
                    stride_qb=num_heads * HEAD_DIM, stride_qh=HEAD_DIM, stride_ob=num_heads * HEAD_DIM,
                    stride_oh=HEAD_DIM)
        consts = {"NUM_HEADS": num_heads, "NUM_KV_HEADS": kv_heads, "GROUP": group,
                  "GROUP_PAD": max(64 if fp8_dot == 1 else 16, triton.next_power_of_2(group)), "HEAD_DIM": HEAD_DIM,
                  "BLOCK_D": HEAD_DIM, "BLOCK_SIZE": BLOCK, "BLOCK_N": block_n, "SPLITS_PAD": 2, "FUSED_MERGE": False,
                  "FP8_AS_F16": kv == "fp8" and not fp8_dot, "OFF64": off64,
                  "FP8_WIDEN": fp8_widen if kv == "fp8" and not fp8_dot else 0, "FP8_DOT": fp8_dot,
                  "FP8_Q2": bool(fp8_dot and fp8_q2)}
        if prologue:  # the attention prologue fused in (kernels/attention/decode_fused.py): q_ptr is the QKV row
            args.update(stride_qb=(num_heads + 2 * kv_heads) * HEAD_DIM, pos_ptr="i64", cs_ptr="fp32", qw_ptr="bf16",
                        kw_ptr="bf16", slot_ptr="i64", eps=1e-6, inv_k_scale=0.5, inv_v_scale=0.5,
                        stride_cos=HEAD_DIM)
            consts.update(PROLOGUE=True, HALF=HEAD_DIM // 2, QK_NORM=True, FP8_KV=kv == "fp8")
        else:
            consts.update(dict.fromkeys(_PROLOGUE_ARGS))
        compiled = compile_sm90(_decode_kernel, args, consts, warps, stages)
    else:
        args = dict(common, cu_seqlens_ptr="i32", stride_qt=num_heads * HEAD_DIM, stride_qh=HEAD_DIM,
                    stride_ot=num_heads * HEAD_DIM, stride_oh=HEAD_DIM)
        pack = group if (group & (group - 1)) == 0 and group <= block_m // 16 else 1
        consts = {"GROUP": group, "PACK": pack, "HEAD_DIM": HEAD_DIM, "BLOCK_D": HEAD_DIM, "BLOCK_SIZE": BLOCK,
                  "BLOCK_M": block_m, "BLOCK_N": block_n, "FP8_AS_F16": kv == "fp8", "OFF64": off64,
                  "tile_map_ptr": None, "TILE_MAP": False,  # the eager grid (a tile map: mixed-step graphs)
                  "ZERO_FILL": True, **{v: True for v in variants}}
        args.update(num_tokens=4096, batch=1)
        if "FP8_DOT" in variants:  # the wrapper's q stays bf16 (rounded to e4m3 in the kernel)
            consts.update(Q_F16=False, FP8_AS_F16=False)
        elif "Q_F16" in variants:  # the wrapper casts q to fp16 before the launch
            args.update(q_ptr="fp16")
        if "RAGGED" in variants:  # this step's K/V as [tokens, kv_heads * head_dim] descriptors of q's dtype
            args.update(k_new_desc=f"tensordesc<bf16[{block_n}, {HEAD_DIM}]>",
                        v_new_desc=f"tensordesc<bf16[{block_n}, {HEAD_DIM}]>")
        else:
            consts.update(k_new_desc=None, v_new_desc=None)
        compiled = compile_sm90(_prefill_kernel, args, consts, warps, stages)
    return report(compiled)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("attention_ir.py compiles for the GPU: unset TRITON_INTERPRET")
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=["decode", "prefill"])
    ap.add_argument("--kv", choices=list(_TYPES), default="bf16")
    ap.add_argument("--heads", default="32/4", help="query heads / KV heads")
    ap.add_argument("--block-m", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--off64", action="store_true", help="64-bit cache offsets (a cache of 2^31 elements or more)")
    ap.add_argument("--fp8-widen", type=int, default=0, help="decode, FP8 cache: the config's fp8_widen (0, 1, 2)")
    ap.add_argument("--variants", default="", help="prefill variant keys set to 1, e.g. MASK_FREE,RAGGED")
    ap.add_argument("--fp8-dot", type=int, default=0, help="decode, FP8 cache: the config's fp8_dot (0, 1, 2)")
    ap.add_argument("--prologue", action="store_true", help="decode: the attention prologue fused in")
    a = ap.parse_args()
    print(json.dumps(dict(vars(a), **inspect(a.kernel, a.kv, a.heads, a.block_m, a.block_n, a.warps, a.stages,
                                             a.off64, a.fp8_widen, tuple(filter(None, a.variants.split(","))),
                                             a.fp8_dot, prologue=a.prologue))))


if __name__ == "__main__":
    main()
