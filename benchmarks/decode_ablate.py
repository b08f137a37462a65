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
and, for each, the split kernel with its merge swapped for an empty launch of the merge's grid (bench_decode_floor's).
The difference between two variants is what the stage costs at that context (the K/V stream is the same).

  python benchmarks/decode_ablate.py --ctxs 4096,32768,131072 --out ablate.json
  python benchmarks/decode_ablate.py --variants table --kv fp8,bf16 --layouts nhd,hnd --orders random,seq

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
VARIANTS = {"table": [], "no_pv": [(_PV, _PV_OUT)], "no_qk": [(_QK, _QK_OUT)],
            "loads_only": [(_PV, _PV_OUT), (_QK, _QK_OUT)], "q2_off": [], "q2_off_no_qscale": [(_QMATH, _QMATH_OUT)]}


def variant_kernel(name: str, tmp: Path):
    """The _decode_kernel of decode.py with VARIANTS[name]'s replacements (a module of its own, so Triton compiles
    it from its file)."""
    src = Path(decode.__file__).read_text()
    for old, new in VARIANTS[name]:
        assert src.count(old) == 1, (name, old[:60])
        src = src.replace(old, new)
    path = tmp / f"decode_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"decode_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._decode_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctxs", default="4096,32768,131072")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--kv", default="fp8", help="fp8,bf16: the cache dtypes")
    ap.add_argument("--layouts", default="nhd", help="nhd (the engine's), hnd (a KV head's page contiguous)")
    ap.add_argument("--orders", default="random", help="random (pages shuffled), seq (pages in order)")
    ap.add_argument("--pages", default="16", help="tokens a cache page (the engine's --block-size: 16)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ceil = measure_ceilings()
    bench_decode_floor._SINK = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    from kernels.attention.decode_plan import decode_launch_config

    dtypes = {"fp8": FP8_DTYPE, "bf16": torch.bfloat16}
    print(f"copy {ceil['copy_tbps']:.2f} TB/s", flush=True)
    rows = []
    real = decode._decode_kernel
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            decode._decode_kernel = variant_kernel(name, Path(tmp))
            try:
                for kv, layout, order, page, ctx in itertools.product(
                        args.kv.split(","), args.layouts.split(","), args.orders.split(","),
                        map(int, args.pages.split(",")), map(int, args.ctxs.split(","))):
                    dtype = dtypes[kv]
                    table = decode_launch_config(128, dtype, torch.device("cuda"), 1, None)
                    config = dict(table, fp8_q2=0) if name.startswith("q2_off") else table
                    how = dict(dtype=dtype, layout=layout, order=order, page=page)
                    floor_us = 2 * ctx * 4 * 128 * dtype.itemsize / ceil["copy_tbps"] / 1e6
                    us, split_us = decode_us(ctx, True, config, **how), decode_us(ctx, False, config, **how)
                    rows.append({"variant": name, "kv": kv, "layout": layout, "order": order, "page": page,
                                 "ctx": ctx, "us": us,
                                 "split_us": split_us, "floor_us": floor_us, "config": config})
                    print(f"ablate {name:<10} {kv} {layout} {order:<6} page={page:<3d} ctx={ctx:6d} split+merge "
                          f"{us:7.2f} us ({floor_us / us:.2f}), split+empty merge {split_us:7.2f} us", flush=True)
            finally:
                decode._decode_kernel = real
    if args.out:
        Path(args.out).write_text(json.dumps({"ceilings": ceil, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
