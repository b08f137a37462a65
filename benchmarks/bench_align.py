"""MoE align (kernels/moe_align.py) on both sides of ONE_PROGRAM_PAIRS: the one-program kernel (up to a chunk of
pairs) and the two launches (a program a chunk, the default chunk rule and --chunks; the chunks' counts summed
once by the count kernel's last program or by every scatter program), CUDA-graph replays of a chain of calls, per
token count; issue 16's target is <= 10 us at every M for 128 experts. The default plan (two_launches, scan,
noscan) ranks pairwise below SORT_FROM_PAIRS pairs and sorts from there: a "pairwise" column beside it then.
--sort-chunks adds the sort rank (a bitonic sort of each chunk instead of pairwise compares: chunks up to
SORT_MAX_CHUNK) at its own chunk rule ("sort", where the default does not sort) and at each chunk given
("sort_c512"), --sort-one-program N its one program up to N pairs ("sort_one_program"). Random softmax-like routing
(distinct experts per token), Qwen3-30B-A3B's 128 experts top-8 by default, BLOCK_M from this GPU's bf16 table for
--hidden / --inter (the default config without one).

python benchmarks/bench_align.py [--m 8,16,...] [--experts 128] [--top-k 8] [--chunks 32,64] [--baseline OLD.py]
    [--hidden 2048 --inter 768] [--sort-chunks 256,512,1024,2048] [--sort-one-program 1024]
  --baseline: another moe_align module file (e.g. `git show REV:kernels/moe_align.py > old.py`) timed beside,
  the same inputs, its default path.

Prints one line per M and `bench_align summary: ...` (the default's worst, then each M's fastest column); the
numbers go to --out (JSON). Without CUDA (and without --device cpu) it says so and stops.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tuning import time_graph_us  # noqa: E402
from kernels.moe_align import (  # noqa: E402
    ONE_PROGRAM_PAIRS,
    SMALL_PAIRS,
    SORT_MAX_CHUNK,
    align_plan,
    moe_align,
    moe_align_ref,
)
from kernels.moe_config import get_moe_config  # noqa: E402

# calls per timed graph: one lone kernel's replay measures the graph launch (~9.5 us on an H200 for an empty
# kernel), not the kernel; in a chain each call costs what it costs between a decode step's other kernels
CHAIN = 16


def routing(m: int, experts: int, top_k: int, device: str) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(m)
    return torch.rand(m, experts, generator=g).topk(top_k, dim=1).indices.to(torch.int32).to(device)


def block_m_for(m: int, top_k: int, experts: int, hidden: int, inter: int, device: str) -> int:
    # the BLOCK_M the bf16 MoE table of this GPU (or the default config) gives m tokens of this shape
    return get_moe_config(m, experts, hidden, inter, top_k, "bfloat16", torch.device(device))["BLOCK_M"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="8,16,32,64,96,128,192,256,512,1024,4096,8192")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048, help="the MoE shape whose table picks BLOCK_M (Qwen3-30B-A3B)")
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--chunks", default="", help="also time the pairwise rank at these chunk sizes (pairs a program)")
    ap.add_argument("--sort-chunks", default="", help="also time the sort rank at its chunk rule and these chunks")
    ap.add_argument("--sort-one-program", type=int, default=0,
                    help=f"also time the sort rank's one program up to this many pairs (<= {SORT_MAX_CHUNK})")
    ap.add_argument("--baseline", default=None, help="another moe_align module file, timed beside")
    ap.add_argument("--out", default="bench_align.json")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_align: no CUDA device here; run it on a GPU (or --device cpu under TRITON_INTERPRET=1)")
    chunks = [int(c) for c in a.chunks.split(",") if c]
    sort_chunks = [int(c) for c in a.sort_chunks.split(",") if c]
    baseline = None
    if a.baseline:
        spec = importlib.util.spec_from_file_location("baseline_moe_align", a.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    rows = []
    for m in map(int, a.m.split(",")):
        ids = routing(m, a.experts, a.top_k, a.device)
        bm = block_m_for(m, a.top_k, a.experts, a.hidden, a.inter, a.device)
        ref = moe_align_ref(ids, a.experts, bm)
        row = {"m": m, "pairs": ids.numel(), "block_m": bm}
        # one program only up to a chunk of pairs; the two launches at the default chunk rule and at --chunks
        # (name, one_program_pairs, chunk, scan_chunks, rank): the counts summed by the count kernel's last program
        # (scan) or by every scatter program (noscan), both at the default chunk rule; the sort rank's columns
        # sum them as its plan says (SCAN past SCAN_CHUNKS chunks)
        variants = [("one_program", SMALL_PAIRS, None, None, None)] if ids.numel() <= SMALL_PAIRS else []
        variants += [("two_launches", 0, None, None, None), ("scan", 0, None, 0, None),
                     ("noscan", 0, None, 1 << 30, None)]
        default_sorts = align_plan(ids.numel(), a.experts)[3]
        if default_sorts:  # pairwise beside it (and no "sort" column: the default is that)
            variants.append(("pairwise", 0, None, None, "pairwise"))
        variants += [(f"two_launches_c{c}", 0, c, None, "pairwise") for c in chunks]
        if ids.numel() <= min(a.sort_one_program, SORT_MAX_CHUNK):
            variants.append(("sort_one_program", a.sort_one_program, None, None, "sort"))
        if sort_chunks and not default_sorts:
            variants.append(("sort", 0, None, None, "sort"))
        variants += [(f"sort_c{c}", 0, c, None, "sort") for c in sort_chunks]
        for name, limit, chunk, scan, rank in variants:
            run = functools.partial(moe_align, ids, a.experts, bm, one_program_pairs=limit, chunk=chunk,
                                    scan_chunks=scan, rank=rank)
            out, n = run(), int(ref[2].item())
            # both keep the flat order within an expert: equal to the reference bit for bit
            row[name + "_exact"] = (int(out[2].item()) == n and torch.equal(out[1], ref[1])
                                    and torch.equal(out[0][:n], ref[0][:n]))
            row[name + "_us"] = time_graph_us([run] * CHAIN, 100, device=a.device)
        if baseline is not None:
            row["baseline_us"] = time_graph_us([functools.partial(baseline.moe_align, ids, a.experts, bm)] * CHAIN,
                                               100, device=a.device)
        row["default"] = "one_program" if ids.numel() <= ONE_PROGRAM_PAIRS else "two_launches"
        row["best"] = min((name for name, *_ in variants), key=lambda name: row[name + "_us"])
        rows.append(row)
        base = f"  baseline {row['baseline_us']:6.2f} us" if baseline is not None else ""
        times = "  ".join(f"{name} {row[name + '_us']:.2f} us" for name, *_ in variants)
        exact = all(row[name + "_exact"] for name, *_ in variants)
        print(f"align M={m:<5} pairs={row['pairs']:<6} BLOCK_M={bm:<3} {times}{base}  default {row['default']}  "
              f"exact={exact}", flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    worst = max(r[r["default"] + "_us"] for r in rows)
    print(f"bench_align summary: worst default {worst:.2f} us (target <= 10), ONE_PROGRAM_PAIRS {ONE_PROGRAM_PAIRS}, "
          + " ".join(f"M{r['m']}={r[r['default'] + '_us']:.1f}" for r in rows) + "; fastest: "
          + " ".join(f"M{r['m']}={r['best']} {r[r['best'] + '_us']:.1f}" for r in rows))


if __name__ == "__main__":
    main()
