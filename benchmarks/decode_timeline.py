"""Where a decode attention program spends its time: the FP8-cache decode kernel with timestamps inside.

Each program of the split kernel records %globaltimer (ns, one clock for every SM) at its start, after the PDL wait
(its page ids loaded), when q is scaled and rounded, after each K/V tile and after its stores (each stamp waits on
the value of the stage before it). The kernel is kernels/attention/decode.py with the stamps written into its text (a
module of its own, as benchmarks/decode_ablate.py does); the stamps go where the fused merge's counters would (the
two-launch path does not use them). Timed as bench_attention's decode rows are: a CUDA graph of calls over rotated
caches (nothing from L2); the stamps are the last call's. Printed per context: the kernel's span (first start to last
store), the programs' starts (launch skew), and each stage's time from the program's start (median and max over
programs), next to the same kernel without stamps. The stamps cost: each waits on a block-wide reduction (a
barrier before the next tile's copies), and the stamped kernel holds more registers (sm90: 195 instead of 140); on an
H200 it ran 0.2-2.5 us slower (6% at 128k). For fp8_dot with early_inputs (the H200 table's FP8 small-batch config),
at two splits or more (--variant: one of decode_ablate.py's).

  python benchmarks/decode_timeline.py --ctxs 4096,32768,131072 --out timeline.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode_floor  # noqa: E402
import decode_ablate  # noqa: E402

import kernels.attention.decode as decode  # noqa: E402
from kernels.attention.decode_plan import decode_launch_config  # noqa: E402
from kernels.fp8 import FP8_DTYPE  # noqa: E402

SLOTS = 64  # stamps a program: 0 start, 1 after the wait, 2 q ready, 3.. tiles, END after the stores
END = SLOTS - 1
_STAMP = '''

@triton.jit
def _stamp(ts_ptr, slot, dep):
    # %globaltimer once dep (a scalar of the stage before) is computed, into this program's row of ts_ptr
    t = tl.inline_asm_elementwise("{ .reg .u64 t; mov.u64 t, %globaltimer; cvt.u64.u32 $0, $1; and.b64 $0, $0, 0; "
                                  "add.u64 $0, $0, t; }", "=l,r", [dep.to(tl.int32, bitcast=True)], dtype=tl.int64,
                                  is_pure=False, pack=1)
    pid = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    tl.store(ts_ptr.to(tl.pointer_type(tl.int64)) + pid * SLOTS_C + slot, t)
'''
_EDITS = [
    ("\n\n@triton.jit\ndef _fp8_dot_update(", _STAMP + "\n\n@triton.jit\ndef _fp8_dot_update("),
    ("    split = tl.program_id(2)\n", "    split = tl.program_id(2)\n    _stamp(counter_ptr, 0, split)\n"),
    ("        pdl_wait(PDL)\n        pdl_release(PDL)\n    if PROLOGUE:",
     "        pdl_wait(PDL)\n        pdl_release(PDL)\n    _stamp(counter_ptr, 1, tl.sum(page_next, 0))\n"
     "    if PROLOGUE:"),
    ("        row_scale = qk_scale * q_scale\n",
     "        row_scale = qk_scale * q_scale\n        _stamp(counter_ptr, 2, tl.sum(row_scale, 0))\n"),
    ("                                     V_DIRECT, INTERP, FP8_WIDEN)\n    if PROLOGUE:",
     "                                     V_DIRECT, INTERP, FP8_WIDEN)\n"
     "        _stamp(counter_ptr, tl.minimum(3 + (n0 - start) // BLOCK_N, SLOTS_C - 2), tl.sum(l_i, 0))\n"
     "    if PROLOGUE:"),
    ("        tl.store(part_lse_ptr + row, lse, mask=hmask)\n",
     "        tl.store(part_lse_ptr + row, lse, mask=hmask)\n"
     "        _stamp(counter_ptr, SLOTS_C - 1, tl.sum(lse, 0))\n"),
    ("        counters = _split_counters(batch * num_kv_heads, q.device) if fused_merge else seq_lens\n",
     "        counters = TIMESTAMPS\n"),
]


def stamped_module(tmp: Path, variant: str = "table", stamps: bool = True):
    # decode.py with variant's edits (one of decode_ablate.VARIANTS), then the stamps
    src = decode_ablate.variant_source(variant)
    for old, new in _EDITS if stamps else []:
        assert src.count(old) == 1, old[:60]
        src = src.replace(old, new)
    head = "from __future__ import annotations\n"
    consts = f"import triton.language as _tl\nSLOTS_C = _tl.constexpr({SLOTS})\nTIMESTAMPS = None\n"
    src = src.replace(head, head + consts, 1)
    return decode_ablate.load_module(src, f"decode_{variant}_{'stamped' if stamps else 'plain'}", tmp)


def timeline(ts: torch.Tensor, tiles: int) -> dict:
    # ts [programs, SLOTS] int64 ns (-1: a stamp this run did not write: an empty split's tiles) -> each stage's time
    # from its program's start, median / max over the programs that reached it
    ts = ts.double()
    start = ts[:, 0:1]
    rel = (ts - start) / 1e3  # us
    span = (ts[:, END].max() - start.min()).item() / 1e3
    stages = {"wait": 1, "q": 2, **{f"tile{i}": 3 + i for i in range(min(tiles, SLOTS - 5))}, "end": END}
    out = {}
    for name, slot in stages.items():
        v = rel[ts[:, slot] >= 0, slot]
        if v.numel():
            out[name] = {"median": v.median().item(), "max": v.max().item(), "programs": v.numel()}
    return {"span_us": span, "start_skew_us": ((start.max() - start.min()) / 1e3).item(), "stages": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctxs", default="4096,32768,131072")
    ap.add_argument("--variant", default="table", help="one of decode_ablate.py's variants")
    ap.add_argument("--page", type=int, default=16, help="tokens a cache page")
    ap.add_argument("--set", default="", help="config overrides (decode config keys): BLOCK_N=64,num_stages=4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bench_decode_floor._SINK = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mod = stamped_module(Path(tmp), args.variant)
        plain = stamped_module(Path(tmp), args.variant, stamps=False)
        mod.TIMESTAMPS = torch.zeros(1 << 20, dtype=torch.int64, device="cuda")
        table = decode_launch_config(128, FP8_DTYPE, torch.device("cuda"), 1, None)
        cfg = decode_ablate.variant_config(args.variant, table)
        cfg.update(decode_ablate.parse_sets(args.set))
        # stamp 0 before the PDL wait and stamp 2 (q rounded) exist only with these (the table's small-batch FP8 config)
        assert cfg["fp8_dot"] and cfg["early_inputs"], "the stamps are placed for fp8_dot and early_inputs on"
        for ctx in map(int, args.ctxs.split(",")):
            splits = mod.decode_plan(1, 32, 4, 128, ctx, cfg, torch.device("cuda"), None)[0]
            assert splits > 1, "at one split the kernel writes the output itself: the stamps need the partials path"
            mod.TIMESTAMPS.fill_(-1)
            real = decode.paged_attention_decode
            try:
                decode.paged_attention_decode = plain.paged_attention_decode
                plain_us = bench_decode_floor.decode_us(ctx, True, cfg, page=args.page)
                decode.paged_attention_decode = mod.paged_attention_decode
                stamped_us = bench_decode_floor.decode_us(ctx, True, cfg, page=args.page)
            finally:
                decode.paged_attention_decode = real
            torch.cuda.synchronize()
            programs = 4 * splits
            tiles = -(-ctx // splits // cfg["BLOCK_N"])
            ts = mod.TIMESTAMPS[: programs * SLOTS].view(programs, SLOTS)
            t = timeline(ts, tiles)
            rows.append({"ctx": ctx, "splits": splits, "tiles": tiles, "us": plain_us, "stamped_us": stamped_us, **t})
            st = "  ".join(f"{k} {v['median']:.2f}/{v['max']:.2f}" for k, v in t["stages"].items())
            print(f"timeline ctx={ctx} splits={splits} tiles={tiles}: kernel+merge {plain_us:.2f} us, stamped "
                  f"{stamped_us:.2f}; span {t['span_us']:.2f}, start skew {t['start_skew_us']:.2f}; from the "
                  f"program's start (median/max us): {st}", flush=True)
    if args.out:
        meta = {"variant": args.variant, "page": args.page, "set": args.set}
        Path(args.out).write_text(json.dumps({**meta, "config": cfg, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
