"""What a decode attention launch could reach at its size: plain streaming reads of the same bytes, graph-timed.

Issue 17 asks decode attention at B=1 ctx 32k to read its KV at >= 0.70 of copy bandwidth; at Qwen3-30B-A3B's
shapes with an FP8 cache that is 33.5 MB, a 7.9 us floor. This times, in the same process and the same way as
bench_attention.py's decode rows (CUDA-graph replays over rotated buffers, so nothing runs from L2):
  - read: one Triton launch that only streams the bytes (P programs, each a contiguous share, summed as int32 words
    so that nothing is left for the compiler to drop), for P around the decode kernel's 256 programs;
  - read + tiny: the same, then a 32-program launch that reads nothing, chained by PDL (the decode kernel and its
    merge);
  - tiny, tiny + tiny: launches that read nothing (the chain's own cost);
  - torch copy of half the bytes (read + write = the same traffic);
  - our decode attention at B=1 over the same bytes (Qwen3-30B-A3B heads, 16-token pages in random order), with its
    merge and with the merge swapped for a launch of its grid that reads nothing (the split kernel's own time and a
    chain like the real one; the output is then wrong).
Each as microseconds and as a fraction of copy bandwidth (measure_ceilings, 1 GiB copies). What a read of these
bytes alone reaches is a reference for a decode kernel over them (not a bound: a kernel with deeper copies in flight
can beat a plain one); the tiny rows are the launch's share of it. Each program reads a multiple of 64 words, so
that the loads are vectorized (16-byte), as the decode kernel's copies are.

  python benchmarks/bench_decode_floor.py --mbytes 33.5,67 --out floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe import bench_graph, measure_ceilings  # noqa: E402

import kernels.attention.decode as decode  # noqa: E402
from kernels.fp8 import FP8_DTYPE  # noqa: E402
from kernels.pdl import launch_kwargs, pdl_enabled, pdl_release, pdl_wait  # noqa: E402


@triton.jit
def _read_kernel(x_ptr, out_ptr, words_per_prog, PDL: tl.constexpr, BLOCK: tl.constexpr):
    pdl_wait(PDL)
    pdl_release(PDL)
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * words_per_prog
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, words_per_prog, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(base + offs, mask=offs < words_per_prog, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _tiny_kernel(out_ptr, PDL: tl.constexpr):
    pdl_wait(PDL)
    pdl_release(PDL)
    tl.store(out_ptr + tl.program_id(0), 1)


def read_words(x: torch.Tensor, programs: int) -> int:
    # a multiple of 64 words a program: Triton then knows each share 16-byte aligned and loads 4 words at a time
    # (a count not divisible by 16 compiles to one-word loads: 0.64 instead of 0.80 of copy bandwidth at 33.5 MB)
    return x.numel() // programs // 64 * 64


def read(x: torch.Tensor, out: torch.Tensor, programs: int, pdl: bool) -> None:
    _read_kernel[(programs,)](x, out, read_words(x, programs), PDL=pdl, BLOCK=2048, num_warps=8, **launch_kwargs(pdl))


def tiny(out: torch.Tensor, programs: int, pdl: bool) -> None:
    _tiny_kernel[(programs,)](out, PDL=pdl, num_warps=4, **launch_kwargs(pdl))


class _EmptyMerge:  # stands in for the merge kernel: a launch of its grid under PDL that reads nothing
    def __getitem__(self, grid):
        def launch(*args, PDL=False, **kwargs):
            _tiny_kernel[grid](_SINK, PDL=PDL, num_warps=4, **launch_kwargs(PDL))
        return launch


_SINK = None  # the empty merge's output (a store per program, all to its first rows)


def make_cache(blocks: int, kv_heads: int, dtype: torch.dtype, layout: str, page: int = 16) -> torch.Tensor:
    # [blocks, page, kv_heads, 128] as the kernels take it; "hnd": each KV head's page stored contiguously (the
    # tensor a transposed view of [blocks, kv_heads, page, 128]: the kernels read it through its strides)
    if layout == "hnd":
        return torch.randn(blocks, kv_heads, page, 128, device="cuda").to(dtype).transpose(1, 2)
    return torch.randn(blocks, page, kv_heads, 128, device="cuda").to(dtype)


def decode_us(ctx: int, merge: bool, config: dict | None, heads: int = 32, kv_heads: int = 4,
              dtype: torch.dtype = FP8_DTYPE, layout: str = "nhd", order: str = "random", page: int = 16) -> float:
    blocks = ctx // page
    rot = min(16, -(-(256 << 20) // (2 * ctx * kv_heads * 128 * dtype.itemsize)))
    caches = []
    for _ in range(rot):
        k, v = (make_cache(blocks, kv_heads, dtype, layout, page) for _ in range(2))
        pages = torch.randperm(blocks) if order == "random" else torch.arange(blocks)
        caches.append((k, v, pages.to(device="cuda", dtype=torch.int32)[None]))
    q = torch.randn(1, heads, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((1,), ctx, device="cuda", dtype=torch.int32)
    reduce_kernel = decode._reduce_kernel
    decode._reduce_kernel = reduce_kernel if merge else _EmptyMerge()
    try:
        run = lambda: [decode.paged_attention_decode(q, k, v, lens, t, 128**-0.5, config=config)  # noqa: E731
                       for k, v, t in caches]
        return bench_graph(run) / rot
    finally:
        decode._reduce_kernel = reduce_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mbytes", default="33.5,67", help="comma-separated sizes in MB (1e6 bytes)")
    ap.add_argument("--programs", default="132,256,264,528")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ceil = measure_ceilings()
    pdl = pdl_enabled(torch.device("cuda"))
    global _SINK
    out = _SINK = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    print(f"copy {ceil['copy_tbps']:.2f} TB/s, PDL {pdl}", flush=True)
    rows = []

    def row(name: str, nbytes: int, us: float) -> None:
        floor_us = nbytes / ceil["copy_tbps"] / 1e6
        rows.append({"name": name, "bytes": nbytes, "us": us, "frac_bw": floor_us / us if nbytes else None})
        frac = f"{floor_us / us:.2f} of copy bandwidth" if nbytes else ""
        print(f"floor {name:<32} {nbytes / 1e6:7.1f} MB {us:8.2f} us  {frac}", flush=True)

    row("tiny (1 program)", 0, bench_graph(lambda: tiny(out, 1, pdl)))
    row("tiny (256 programs)", 0, bench_graph(lambda: tiny(out, 256, pdl)))
    row("tiny 256 + tiny 32", 0, bench_graph(lambda: (tiny(out, 256, pdl), tiny(out, 32, pdl))))
    for mb in (float(s) for s in args.mbytes.split(",")):
        nbytes = int(mb * 1e6) // 4096 * 4096
        rot = min(16, -(-(256 << 20) // nbytes))  # as bench_attention: replays do not run from L2
        bufs = [torch.randint(0, 255, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(rot)]
        for p in (int(s) for s in args.programs.split(",")):
            row(f"read, {p} programs", read_words(bufs[0], p) * p * 4,
                bench_graph(lambda: [read(x, out, p, pdl) for x in bufs]) / rot)  # noqa: B023
        row("read 256 + tiny 32", read_words(bufs[0], 256) * 256 * 4,
            bench_graph(lambda: [(read(x, out, 256, pdl), tiny(out, 32, pdl)) for x in bufs]) / rot)  # noqa: B023
        halves = [(x[: x.numel() // 2], x[x.numel() // 2 :]) for x in bufs]
        row("torch copy (half read, half written)", nbytes,
            bench_graph(lambda: [b.copy_(a) for a, b in halves]) / rot)  # noqa: B023
    for ctx in (4096, 32768):
        for kv_dtype, name in ((FP8_DTYPE, "fp8"), (torch.bfloat16, "bf16")):
            nbytes = 2 * ctx * 4 * 128 * kv_dtype.itemsize
            for merge, what in ((True, "split + merge"), (False, "split + empty merge")):
                row(f"decode {name} {ctx // 1024}k, {what}", nbytes, decode_us(ctx, merge, None, dtype=kv_dtype))
    if args.out:
        Path(args.out).write_text(json.dumps({"ceilings": ceil, "pdl": pdl, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
