"""Decode attention with the attention prologue fused in (kernels/attention/decode_fused.py) against the launches it
replaces (qkv_prologue, then paged_attention_decode), Qwen3-30B-A3B's attention (32 q / 4 KV heads of 128, q/k
norm, 16-token pages), per layer: one CUDA graph holds LAYERS layers' calls, each on its own KV cache, as a decode
step does; this GPU's tiles and split rule. Also says whether the two give the same bits.

python benchmarks/bench_decode_fused.py [--batches 1,8,64] [--ctxs 1024,4096] [--kv bf16,fp8w]
  kv: bf16; fp8w: an FP8 cache with the widening decode (fp8_dot 0); fp8: this GPU's FP8 table (on the H200 fp8_dot),
  the fused column with decode_fused.FUSED_FP8_DOT on (the fused FP8 tensor-core path, off by default until measured)

Prints one line per case and a summary line `decode_fused: ...`; the numbers go to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.attention.decode_fused as decode_fused  # noqa: E402
from benchmarks.tuning import time_graph_us  # noqa: E402
from kernels.attention.config import decode_config, with_fp8_dot  # noqa: E402
from kernels.attention.decode import paged_attention_decode  # noqa: E402
from kernels.attention.decode_fused import paged_attention_decode_fused  # noqa: E402
from kernels.attention.qkv_prologue import qkv_prologue  # noqa: E402
from kernels.fp8 import FP8_DTYPE  # noqa: E402
from kernels.rope import rope_cos_sin  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS = 32, 4, 128, 16, 8
DEV = "cuda"  # main(--device cpu): a smoke run under TRITON_INTERPRET=1


def case(batch: int, ctx: int, kv: str) -> dict:
    g = torch.Generator(device=DEV).manual_seed(batch * 7 + ctx)
    cache_dtype = torch.bfloat16 if kv == "bf16" else FP8_DTYPE
    cfg = decode_config(HEAD_DIM, cache_dtype, torch.device(DEV))
    cfg = with_fp8_dot(cfg, "decode", 0) if kv == "fp8w" else cfg
    decode_fused.FUSED_FP8_DOT = kv == "fp8"  # the table's FP8 tensor-core decode fused (off in serving, unmeasured)
    scales = (0.05, 0.05) if cache_dtype == FP8_DTYPE else (1.0, 1.0)
    pages = -(-ctx // PAGE)
    tables = torch.randperm(batch * pages, device=DEV, generator=g).to(torch.int32).view(batch, pages)
    pos = torch.full((batch,), ctx - 1, device=DEV)
    slots = tables[:, (ctx - 1) // PAGE].long() * PAGE + (ctx - 1) % PAGE
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    cos_sin = rope_cos_sin(HEAD_DIM, ctx + 1, 1e6, device=DEV)
    qn = (torch.rand(HEAD_DIM, device=DEV, generator=g) + 0.5).to(torch.bfloat16)
    kn = (torch.rand(HEAD_DIM, device=DEV, generator=g) + 0.5).to(torch.bfloat16)
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=DEV, generator=g).to(torch.bfloat16)
    caches = [tuple(torch.randn(batch * pages, PAGE, KV_HEADS, HEAD_DIM, device=DEV, generator=g).to(cache_dtype)
                    for _ in "kv") for _ in range(LAYERS)]
    scale = HEAD_DIM**-0.5

    def separate(kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        q = qkv_prologue(qkv, pos, cos_sin, qn, kn, 1e-6, kc, vc, slots, *scales)
        return paged_attention_decode(q, kc, vc, seq_lens, tables, scale, *scales, config=cfg)

    def fused(kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        return paged_attention_decode_fused(qkv, pos, cos_sin, qn, kn, 1e-6, kc, vc, slots, seq_lens, tables, scale,
                                            *scales, config=cfg)

    results = []  # (output, k cache, v cache) of each, from copies of layer 0's cache
    for fn in (separate, fused):
        kc, vc = (c.clone() for c in caches[0])
        results.append((fn(kc, vc), kc, vc))
    same = all(torch.equal(a, b) for a, b in zip(*results))
    times = {name: time_graph_us([lambda kc=kc, vc=vc, fn=fn: fn(kc, vc) for kc, vc in caches], 300, device=DEV)
             for name, fn in (("separate", separate), ("fused", fused))}
    return {"batch": batch, "ctx": ctx, "kv": kv, "separate_us": times["separate"], "fused_us": times["fused"],
            "saved_us": times["separate"] - times["fused"], "bit_exact": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--ctxs", default="1024,4096")
    ap.add_argument("--kv", default="bf16,fp8w")
    ap.add_argument("--out", default="decode_fused.json")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    global DEV
    DEV = a.device
    rows = []
    for kv in a.kv.split(","):
        for ctx in map(int, a.ctxs.split(",")):
            for batch in map(int, a.batches.split(",")):
                r = case(batch, ctx, kv)
                rows.append(r)
                print(f"B={batch:<3} ctx={ctx:<6} kv={kv:<5} separate {r['separate_us']:7.2f} us  fused "
                      f"{r['fused_us']:7.2f} us  saved {r['saved_us']:6.2f} us/layer  bit_exact={r['bit_exact']}",
                      flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print("decode_fused: " + " ".join(f"B{r['batch']}/{r['ctx']}/{r['kv']}={r['saved_us']:+.2f}us" for r in rows)
          + f" all_bit_exact={all(r['bit_exact'] for r in rows)}")


if __name__ == "__main__":
    main()
