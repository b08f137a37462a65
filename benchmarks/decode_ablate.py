"""Where the FP8-cache decode kernel's time goes at B=1: the kernel with one stage of its tile left out, timed as
bench_attention.py's decode rows are (CUDA-graph replays over rotated caches, PDL on, this GPU's table).

Each variant is kernels/attention/decode.py with _fp8_dot_update's text changed (written to a temporary module and
swapped in for the real kernel); outputs are wrong by design, only the time counts:
  table:      the kernel as it is;
  no_pv:      the PV dot (V's e4m3 tile through its transposed shared-memory copy, the byte gathers) replaced by a
              column sum of V (V is still loaded and used);
  no_qk:      the QK^T dots (q's one or two e4m3 terms) replaced by an outer product of K's and q's row sums;
  loads_only: both (the loads, the softmax bookkeeping and the stores are left);
  q2_off:     the table with fp8_q2 0 (one QK^T dot);
  q2_off_no_qscale: q2_off without q's per-head absmax scale (q cast to e4m3 as it is: what the chain before the
              first K/V copies costs);
  v_t:        the cache read as if each page held V transposed ([KV head][head_dim][token]: the tokens contiguous, as
              the PV dot's e4m3 operand wants them): no byte gathers, V still through registers;
  v_t_smem:   v_t with V^T read by the PV wgmma straight from shared memory (its A operand);
  v_t_smem1:  v_t with fp8_dot 1 (O = P V, the query rows padded to 64, V^T the B operand from shared memory);
  pf2, pf4:   the split's first 2 / 4 tiles prefetched into L2 (prefetch.global.L2, a line a token) before the PDL
              wait; pf2_loop, pf4_loop: and tile i + 2 / 4 at each tile i;
and, for each, the split kernel with its merge swapped for an empty launch of the merge's grid (bench_decode_floor's).
The difference between two variants is what the stage costs at that context (the K/V stream is the same).

  python benchmarks/decode_ablate.py --ctxs 4096,32768,131072 --out ablate.json
  python benchmarks/decode_ablate.py --variants table --kv fp8,bf16 --layouts nhd,hnd --orders random,seq
  python benchmarks/decode_ablate.py --variants table,v_t_smem --pages 16,64 --sets ";BLOCK_N=64,num_stages=4"

--sets: config overrides (decode config keys, kernels/attention/config.py), ';' between sets, each run in turn.

--layouts / --orders time the same kernel over caches stored another way: "hnd" keeps each KV head's page
contiguous (16 tokens x 128 values; the engine's "nhd" interleaves the heads token by token, so a program reads
128-byte pieces 512 bytes apart with an FP8 cache), "seq" gives the sequence its pages in order.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode_floor  # noqa: E402
from bench_decode_floor import decode_us  # noqa: E402
from bench_moe import measure_ceilings  # noqa: E402

import kernels.attention.decode as decode  # noqa: E402
from kernels.attention.config import DECODE_KEYS  # noqa: E402
from kernels.attention.decode_plan import decode_launch_config, decode_plan  # noqa: E402
from kernels.fp8 import FP8_DTYPE  # noqa: E402

_PV = "acc = acc * alpha[None, :] + tl.dot(tl.trans(_hold_fp8(v, V_DIRECT)), _to_e4m3(pt, INTERP))"
_PV_OUT = "acc = acc * alpha[None, :] + tl.sum(v.to(tl.float32), 0)[:, None]"
_QK = ("""        if FP8_Q2:
            st = tl.dot(k, tl.trans(q), tl.dot(k, tl.trans(q_lo)) * Q_LO_INV)
        else:
            st = tl.dot(k, tl.trans(q))
""")
_QK_OUT = "        st = tl.sum(k.to(tl.float32), 1)[:, None] * tl.sum(q.to(tl.float32), 1)[None, :]\n"
_QMATH = "        qs, q_scale = _scale_q(q)\n"
_QMATH_OUT = "        qs, q_scale = q.to(tl.float32), tl.full([GROUP_PAD], 1.0, tl.float32)\n"
# V stored transposed within each page ([page][KV head][head_dim][token]: a token's values BLOCK_SIZE apart), read
# with the tokens contiguous, as the PV dot's K-major operand wants them (no byte gathers); the cache is read as if
# so stored (the output is then wrong, the bytes and the pages the same); no mask on V (the tiles of these runs are
# whole)
_V = ("        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)\n"
      "        m_i, l_i, acc = _tile")
_V_T = """        vin = (n0 + offs) % BLOCK_SIZE  # rows = page * stride_cb + vin * stride_cs + kvh * stride_ch
        vrows = rows + vin * (1 - stride_cs) + kvh * (HEAD_DIM * BLOCK_SIZE - stride_ch)
        voffs = vrows[:, None] + d[None, :] * BLOCK_SIZE
        VRUN: tl.constexpr = min(BLOCK_SIZE, BLOCK_N)  # tokens contiguous in a tile's piece of a page
        v = tl.load(v_cache_ptr + tl.max_contiguous(tl.multiple_of(voffs, [VRUN, 1]), [VRUN, 1]))
        m_i, l_i, acc = _tile"""
_V_HELD = "tl.dot(tl.trans(_hold_fp8(v, V_DIRECT)), _to_e4m3(pt, INTERP))"  # V^T through registers (A operand)
_V_SMEM = "tl.dot(tl.trans(v), _to_e4m3(pt, INTERP))"  # V^T as stored (transposed) from shared memory, no register trip
# fp8_dot 1 (O = P V, V the B operand along the tokens): V as stored transposed is K-major, straight from shared memory
_V_HELD1 = "tl.dot(_to_e4m3(p, INTERP), _hold_fp8(v, INTERP))"
_V_SMEM1 = "tl.dot(_to_e4m3(p, INTERP), v)"
# the split's first PF tiles prefetched into L2 before the PDL wait (prefetch.global.L2, a line a token), so that DRAM
# streams while the program waits and rounds q; pf_loop: and tile i + PF at each tile i
_PF_FN = ("\n\n@triton.jit\ndef _tile_update(", """

@triton.jit
def _prefetch_l2(ptrs, mask):
    # prefetch.global.L2 of each address where mask (no value comes back; an impure asm Triton keeps)
    return tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; "
                                     "mov.b32 $0, 0; }", "=r,l,r", [ptrs.to(tl.int64), mask.to(tl.int32)],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_tile(bt, k_cache_ptr, v_cache_ptr, n0, end, offs, kvh, stride_cb, stride_cs, stride_ch,
                   BLOCK_SIZE: tl.constexpr, ALIGNED: tl.constexpr, OFF64: tl.constexpr):
    n = n0 + offs
    page = tl.load(bt + n // BLOCK_SIZE, mask=n < end, other=0)
    rows = _kv_rows(page, n0, offs, kvh, stride_cb, stride_cs, stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
    _prefetch_l2(k_cache_ptr + rows, n < end)
    _prefetch_l2(v_cache_ptr + rows, n < end)


@triton.jit
def _tile_update(""")
_PF_START = ("    ALIGNED: tl.constexpr = BLOCK_N % BLOCK_SIZE == 0  # splits start at multiples of BLOCK_N\n",
             """    ALIGNED: tl.constexpr = BLOCK_N % BLOCK_SIZE == 0  # splits start at multiples of BLOCK_N
    for j in tl.static_range(PF):
        _prefetch_tile(bt, k_cache_ptr, v_cache_ptr, start + j * BLOCK_N, end, offs, kvh, stride_cb, stride_cs,
                       stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
""")
_PF_LOOP = ("        kv_mask = nmask[:, None] & dmask[None, :]\n", """        kv_mask = nmask[:, None] & dmask[None, :]
        _prefetch_tile(bt, k_cache_ptr, v_cache_ptr, n0 + PF * BLOCK_N, end, offs, kvh, stride_cb, stride_cs,
                       stride_ch, BLOCK_SIZE, ALIGNED, OFF64)
""")
VARIANTS = {"table": [], "v_t": [(_V, _V_T)], "v_t_smem": [(_V, _V_T), (_V_HELD, _V_SMEM)],
            "v_t_smem1": [(_V, _V_T), (_V_HELD1, _V_SMEM1)],
            **{f"pf{n}": [_PF_FN, _PF_START] for n in (2, 4)},
            **{f"pf{n}_loop": [_PF_FN, _PF_START, _PF_LOOP] for n in (2, 4)},
            "no_pv": [(_PV, _PV_OUT)], "no_qk": [(_QK, _QK_OUT)],
            "loads_only": [(_PV, _PV_OUT), (_QK, _QK_OUT)], "q2_off": [], "q2_off_no_qscale": [(_QMATH, _QMATH_OUT)]}


def variant_source(name: str) -> str:
    """decode.py's text with VARIANTS[name]'s replacements (and a pf variant's prefetch distance PF)."""
    src = Path(decode.__file__).read_text()
    for old, new in VARIANTS[name]:
        assert src.count(old) == 1, (name, old[:60])
        src = src.replace(old, new)
    if "pf" in name:  # the prefetch distance, in tiles
        pf = int(name.split("pf")[1].split("_")[0])
        head = "from __future__ import annotations\n"
        src = src.replace(head, f"{head}import triton.language as _tl\nPF = _tl.constexpr({pf})\n", 1)
    return src


def variant_config(name: str, table: dict) -> dict:
    """The launch config a variant runs with: the table's, with what its kernel text assumes (q2_off: one QK^T dot;
    v_t_smem1: its text is fp8_dot 1's branch)."""
    config = dict(table)
    if name.startswith("q2_off"):
        config["fp8_q2"] = 0
    if name == "v_t_smem1":
        config["fp8_dot"] = 1
    return config


def load_module(src: str, name: str, tmp: Path):
    """src as module `name`, from a file under tmp (Triton compiles a kernel from its file's text)."""
    path = tmp / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def variant_kernel(name: str, tmp: Path):
    """The _decode_kernel of variant_source(name) (a module of its own)."""
    return load_module(variant_source(name), f"decode_{name}", tmp)._decode_kernel


def parse_sets(sets: str) -> dict:
    """"KEY=VALUE,..." -> {KEY: int}, each KEY a decode config key (a typo would run the table's config silently)."""
    out = {}
    for item in filter(None, (i.strip() for i in sets.split(","))):
        key, _, value = item.partition("=")
        if key.strip() not in DECODE_KEYS:
            raise SystemExit(f"--sets: {key.strip()!r} is not a decode config key ({', '.join(DECODE_KEYS)})")
        out[key.strip()] = int(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctxs", default="4096,32768,131072")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--kv", default="fp8", help="fp8,bf16: the cache dtypes")
    ap.add_argument("--layouts", default="nhd", help="nhd (the engine's), hnd (a KV head's page contiguous)")
    ap.add_argument("--orders", default="random", help="random (pages shuffled), seq (pages in order)")
    ap.add_argument("--pages", default="16", help="tokens a cache page (the engine's --block-size: 16)")
    ap.add_argument("--sets", default="", help="config overrides, ';' between sets: BLOCK_N=64,num_stages=4;...")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ceil = measure_ceilings()
    bench_decode_floor._SINK = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")

    dtypes = {"fp8": FP8_DTYPE, "bf16": torch.bfloat16}
    print(f"copy {ceil['copy_tbps']:.2f} TB/s", flush=True)
    rows = []
    real = decode._decode_kernel
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            decode._decode_kernel = variant_kernel(name, Path(tmp))
            try:
                for kv, layout, order, page, ctx, sets in itertools.product(
                        args.kv.split(","), args.layouts.split(","), args.orders.split(","),
                        map(int, args.pages.split(",")), map(int, args.ctxs.split(",")), args.sets.split(";")):
                    dtype = dtypes[kv]
                    table = decode_launch_config(128, dtype, torch.device("cuda"), 1, None)
                    config = variant_config(name, table)
                    config.update(parse_sets(sets))
                    splits = decode_plan(1, 32, 4, 128, ctx, config, torch.device("cuda"))[0]
                    how = dict(dtype=dtype, layout=layout, order=order, page=page)
                    floor_us = 2 * ctx * 4 * 128 * dtype.itemsize / ceil["copy_tbps"] / 1e6
                    us, split_us = decode_us(ctx, True, config, **how), decode_us(ctx, False, config, **how)
                    rows.append({"variant": name, "kv": kv, "layout": layout, "order": order, "page": page,
                                 "splits": splits,
                                 "ctx": ctx, "us": us,
                                 "split_us": split_us, "floor_us": floor_us, "config": config})
                    print(f"ablate {name:<10} {kv} {layout} {order:<6} page={page:<3d} ctx={ctx:6d} {sets} "
                          f"splits={splits} split+merge "
                          f"{us:7.2f} us ({floor_us / us:.2f}), split+empty merge {split_us:7.2f} us", flush=True)
            finally:
                decode._decode_kernel = real
    if args.out:
        Path(args.out).write_text(json.dumps({"ceilings": ceil, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
