"""Paged attention on the GPU: Triton decode and prefill vs torch scaled_dot_product_attention.

python benchmarks/bench_attention.py --out DIR

Qwen3-30B-A3B attention (32 query heads, 4 KV heads, head_dim 128, bf16, 16-token pages). Decode:
B in 1..256, context 1k..32k; its floor is the KV bytes over the copy bandwidth. SDPA gets the same KV as
contiguous tensors (no paging) with enable_gqa. Prefill: causal, one or several sequences, vs SDPA's causal flash
path; its floor is the causal FLOPs over the bf16 matmul rate. Rows are timed from CUDA-graph replays (ours, SDPA,
Gluon; no host launch in the time), but for the FP8 extend rows whose path is the 16-bit scratch (kv "fp8",
"fp8scratch": eager_us). (Until session 18 prefill and extend were timed by do_bench's eager loop, whose host launch
set the small rows: the 1k causal prefill read 73 us, 0.17 of the matmul rate, where tune_attention's graph replays
timed the table's tile at 35 us in session 7, SDPA's rate.)
Prints one line per row and 'bench_attention summary' last.

--kv-dtypes bf16,fp8 runs decode (and extend) on a bf16 and on an FP8 (e4m3, per-tensor scales) cache: the decode
floor counts the bytes of that dtype, and each FP8 decode row reports its output's error vs the bf16 cache.
kv "fp8" runs the kernels as this GPU's table configures them (what --kv-cache-dtype fp8 runs: on an H200 decode's
fp8_dot 2); "fp8widen" the same tiles with the tensor-core variant off (decode fp8_dot 0, prefill FP8_DOT 0: the FP8
tiles widened to fp16), "fp8dot" / "fp8dot2" / "fp8dot3" with it on (decode fp8_dot 1 / 2 / 3, prefill FP8_DOT:
e4m3 x e4m3 dots, q and p rounded to e4m3), "fp8dot2q2" decode's fp8_dot 2 with fp8_q2 (q as two e4m3 terms: the
accuracy option); fp8dot2 / 3 / 2q2 differ in decode only (their extend rows would be fp8dot's: skipped).
Extend on an FP8 cache: "fp8widen" widens every tile in the kernel's loop (FP8_SCRATCH_MIN_Q 0: the path before the
scratch), "fp8scratch" widens the pages once into a 16-bit scratch and runs the bf16 cache's tiles over it
(kernels/attention/fp8_scratch.py; its rows add widen_us, the widening alone, and maxdiff, the largest difference
to fp8widen's output: 0 where both run the same BLOCK_M / BLOCK_N), "fp8" whatever the table picks (the scratch
from FP8_SCRATCH_MIN_Q query tokens, default 256); fp8scratch has no decode rows (decode reads the cache as is).
--extend CHUNK:PREFIX rows time one chunk of CHUNK new tokens attending over PREFIX cached ones (chunked prefill
of a long prompt).
--gluon (optionally JSON: a dict of the Gluon tiles, e.g. '{"num_stages": 3}', or a list of them): prefill and bf16
extend rows also time the Gluon FA3-style kernel (kernels/attention/prefill_gluon.py, sm90 only: a prefill config's
"gluon") in the same process, once per tile dict, at every query length (GLUON_MIN_Q 0): gluon{i}_us, gluon{i}_frac_mm
(frac_mm and SDPA's on the same line) and its error vs the main column's output. The main column runs what this GPU's
table picks (on an H200 the Gluon kernel from 2048 query tokens); a tile dict 0 is the Triton kernel at every length.
Variants side by side: --gluon '[0, 1, {"num_stages": 3, "split_wg": 1}, {"num_stages": 3, "split_wg": 2},
{"BLOCK_N": 64, "num_stages": 3}]'.
Long context, one request: --batches 1 --ctxs 32768,131072 --kv-dtypes bf16,fp8widen,fp8dot,fp8dot2,fp8dot3
--extend 8192:122880. FP8 extend, old vs new, no decode rows: --ctxs "" --kv-dtypes bf16,fp8widen,fp8scratch,fp8
--extend 8192:122880 --no-prefill.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe import bench_graph, measure_ceilings  # noqa: E402

from kernels.attention.config import decode_config, prefill_config, with_fp8_dot  # noqa: E402
from kernels.attention.decode import paged_attention_decode  # noqa: E402
from kernels.attention.fp8_scratch import widen_to_scratch  # noqa: E402
from kernels.attention.prefill import paged_attention_prefill  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 4, 128, 16
SHAPES = {"qwen3-30b-a3b": (32, 4), "glm-4.5-air": (96, 8)}  # query heads, KV heads (head_dim 128 both)
DT = torch.bfloat16
# decode's fp8_dot per pseudo cache dtype (an FP8 cache; prefill's FP8_DOT: on where > 0); "fp8": the table's own
FP8_DOT = {"fp8widen": 0, "fp8dot": 1, "fp8dot2": 2, "fp8dot3": 3, "fp8dot2q2": 2}
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn} | dict.fromkeys([*FP8_DOT, "fp8scratch"],
                                                                                  torch.float8_e4m3fn)
FP8_SCALES = (0.02, 0.02)  # k_scale, v_scale: the cache holds x / scale


def kernel_config(kind: str, kv: str) -> dict | None:
    # None: the kernels' own lookup (this GPU's table); fp8widen / fp8dot*: that config with the FP8 tensor-core
    # variant off / on (the table may have it on: H200's decode) and the prefill's scratch off (fp8widen: the in-loop
    # widening); fp8scratch: the prefill's scratch forced, with the bf16 cache's tiles (what the table path runs)
    dev = torch.device("cuda")
    if kv == "fp8scratch":
        return {**prefill_config(HEAD_DIM, DT, dev), "FP8_SCRATCH_MIN_Q": 1}
    if kv not in FP8_DOT:
        return None
    get = decode_config if kind == "decode" else prefill_config
    cfg = with_fp8_dot(get(HEAD_DIM, KV_DTYPES[kv], dev), kind, FP8_DOT[kv], int(kv.endswith("q2")))
    return {**cfg, "FP8_SCRATCH_MIN_Q": 0} if kind == "prefill" else cfg


def paged_cache(batch: int, ctx: int, kv_dtype: torch.dtype = DT):
    blocks_per_seq = -(-ctx // BLOCK)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DT)
    v_cache = torch.randn_like(k_cache)
    if kv_dtype != DT:
        k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)  # N(0, 1): e4m3's range, scale aside
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    return k_cache, v_cache, tables


def bench_decode(batch: int, ctx: int, ceil: dict, kv: str = "bf16", num_splits: int | None = None,
                 fused_merge: bool = False) -> dict:
    kv_dtype = KV_DTYPES[kv]
    kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * kv_dtype.itemsize
    num_rot = min(16, -(-(256 << 20) // kv_bytes))  # rotate caches so that replays do not run from L2
    caches = [paged_cache(batch, ctx, kv_dtype) for _ in range(num_rot)]
    k_cache, v_cache, tables = caches[0]
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=DT)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    scales = FP8_SCALES if kv_dtype != DT else (1.0, 1.0)
    cfg = kernel_config("decode", kv)
    us = bench_graph(lambda: [paged_attention_decode(q, kc, vc, lens, tb, scale, *scales, num_splits=num_splits,
                                                     fused_merge=fused_merge, config=cfg)
                              for kc, vc, tb in caches])
    us /= num_rot
    floor_us = kv_bytes / ceil["copy_tbps"] / 1e6
    row = {"kind": "decode", "kv": kv, "merge": "fused" if fused_merge else "separate", "B": batch, "ctx": ctx,
           "us": us, "floor_us": floor_us,
           "frac_bw": floor_us / us, "tbps": kv_bytes / us / 1e6}
    if kv_dtype != DT:  # accuracy vs the same values in a bf16 cache (dequantized: exactly what FP8 holds)
        ours = paged_attention_decode(q, k_cache, v_cache, lens, tables, scale, *scales, config=cfg)
        ref = paged_attention_decode(q, (k_cache.float() * scales[0]).to(DT), (v_cache.float() * scales[1]).to(DT),
                                     lens, tables, scale)
        row["rel_err_vs_dequant"] = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
        return row
    if batch * ctx <= 1 << 21:  # SDPA needs its own contiguous copy of the KV
        k = k_cache[tables.long()].view(batch, -1, KV_HEADS, HEAD_DIM)[:, :ctx].transpose(1, 2).contiguous()
        v = v_cache[tables.long()].view(batch, -1, KV_HEADS, HEAD_DIM)[:, :ctx].transpose(1, 2).contiguous()
        qs = q[:, :, None, :]
        sdpa = lambda: F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)
        row["sdpa_us"] = bench_graph(sdpa)
        ours = paged_attention_decode(q, k_cache, v_cache, lens, tables, scale)
        row["rel_err"] = ((ours.float() - sdpa()[:, :, 0].float()).norm() / ours.float().norm()).item()
    return row


def chunk_kv(cache: torch.Tensor, tables: torch.Tensor, start: int, end: int) -> torch.Tensor:
    # [batch * (end - start), kv_heads, head_dim]: positions [start, end) of each sequence, contiguous (this step's
    # K or V as the model has them before the cache store: what --ragged passes to the prefill kernel)
    batch = tables.shape[0]
    return cache[tables.long()].view(batch, -1, KV_HEADS, HEAD_DIM)[:, start:end].reshape(-1, KV_HEADS,
                                                                                          HEAD_DIM).contiguous()


def eager_us(fn) -> float:
    """Median microseconds of fn() in do_bench's eager loop (L2 flushed between calls, the host launch included):
    for the FP8 extend rows whose path is the 16-bit scratch, which kernels/attention/fp8_scratch.py turns off under
    stream capture (a graph replay would time the in-loop widening instead). At their sizes (an 8k chunk over a long
    prefix, milliseconds) the host launch is noise."""
    return triton.testing.do_bench(fn, rep=100, return_mode="median") * 1e3


def graph_us(fn) -> tuple[float, str]:
    """(microseconds, how): bench_graph's, or eager_us's where the capture fails (e.g. a kernel not yet run inside a
    CUDA graph: the Gluon prefill the table picks from 2048 query tokens), so that the row still comes back."""
    try:
        return bench_graph(fn), "graph"
    except Exception as exc:  # noqa: BLE001
        print(f"  (CUDA-graph timing failed, {type(exc).__name__}: {str(exc)[:160]}; timed eagerly)", flush=True)
        torch.cuda.synchronize()
        return eager_us(fn), "eager"


def gluon_row(row: dict, run, gluon: list | None, ours: torch.Tensor) -> dict:
    # the same call on the Gluon kernel once per tile dict (a prefill config's "gluon"): its time and matmul-rate
    # fraction, and its output's difference to the main column's (ours); g = 0: the Triton kernel
    if gluon is None:
        return row
    variants = []
    for g in gluon:
        cfg = {**prefill_config(HEAD_DIM, DT, torch.device("cuda")), "gluon": g, "GLUON_MIN_Q": 0}
        us, timing = graph_us(lambda: run(cfg))  # noqa: B023
        err = ((run(cfg).float() - ours.float()).norm() / ours.float().norm()).item()
        variants.append({"tiles": g, "us": us, "timing": timing, "frac_mm": row["floor_us"] / us, "err_vs_main": err})
    return dict(row, gluon=variants)


def gluon_text(r: dict) -> str:
    return "".join(f" gluon{i}_us={v['us']:8.1f} gluon{i}_frac_mm={v['frac_mm']:.2f} "
                   f"gluon{i}_err_vs_main={v['err_vs_main']:.1e}" for i, v in enumerate(r.get("gluon", ())))


def bench_prefill(batch: int, seq: int, ceil: dict, ragged: bool = False, gluon: dict | None = None) -> dict:
    k_cache, v_cache, tables = paged_cache(batch, seq)
    q = torch.randn(batch * seq, HEADS, HEAD_DIM, device="cuda", dtype=DT)
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * seq
    lens = torch.full((batch,), seq, device="cuda", dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    new = dict(k=chunk_kv(k_cache, tables, 0, seq), v=chunk_kv(v_cache, tables, 0, seq)) if ragged else {}
    us, timing = graph_us(lambda: paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, scale, seq, **new))
    flops = batch * 4 * HEADS * HEAD_DIM * seq * seq / 2  # causal: half of QK^T and PV
    floor_us = flops / ceil["bf16_tflops"] / 1e6
    k = k_cache[tables.long()].view(batch, -1, KV_HEADS, HEAD_DIM)[:, :seq].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].view(batch, -1, KV_HEADS, HEAD_DIM)[:, :seq].transpose(1, 2).contiguous()
    qs = q.view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
    sdpa = lambda: F.scaled_dot_product_attention(qs, k, v, scale=scale, is_causal=True, enable_gqa=True)
    sdpa_us = bench_graph(sdpa)
    ours = paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, scale, seq, **new)
    err = ((ours.float() - sdpa().transpose(1, 2).reshape_as(ours).float()).norm() / ours.float().norm()).item()
    row = {"kind": "prefill", "ragged": ragged, "B": batch, "ctx": seq, "us": us, "timing": timing,
           "floor_us": floor_us, "frac_mm": floor_us / us, "tflops": flops / us / 1e6, "sdpa_us": sdpa_us,
           "sdpa_frac_mm": floor_us / sdpa_us, "rel_err": err}
    return gluon_row(row, lambda cfg: paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, scale, seq,
                                                              config=cfg), None if ragged else gluon, ours)


def bench_extend(chunk: int, prefix: int, ceil: dict, kv: str = "bf16", ragged: bool = False,
                 gluon: dict | None = None) -> dict:
    # one sequence: chunk new queries over prefix cached tokens plus themselves (causal)
    k_cache, v_cache, tables = paged_cache(1, prefix + chunk, KV_DTYPES[kv])
    q = torch.randn(chunk, HEADS, HEAD_DIM, device="cuda", dtype=DT)
    cu = torch.tensor([0, chunk], device="cuda", dtype=torch.int32)
    lens = torch.tensor([prefix + chunk], device="cuda", dtype=torch.int32)
    scales = FP8_SCALES if KV_DTYPES[kv] != DT else (1.0, 1.0)
    cfg = kernel_config("prefill", kv)
    # (an FP8 cache: the kernel reads the chunk back from the pages whatever is passed)
    new = dict(k=chunk_kv(k_cache, tables, prefix, prefix + chunk).to(DT),
               v=chunk_kv(v_cache, tables, prefix, prefix + chunk).to(DT)) if ragged else {}
    timer = (lambda fn: (eager_us(fn), "eager")) if kv in ("fp8", "fp8scratch") else graph_us  # the scratch: eager
    us, timing = timer(lambda: paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, HEAD_DIM**-0.5, chunk,
                                                       *scales, config=cfg, **new))
    flops = 4 * HEADS * HEAD_DIM * chunk * (prefix + chunk / 2)
    floor_us = flops / ceil["bf16_tflops"] / 1e6
    row = {"kind": "extend", "kv": kv, "ragged": ragged, "B": 1, "ctx": prefix + chunk, "chunk": chunk, "us": us,
           "timing": timing,
           "floor_us": floor_us, "frac_mm": floor_us / us, "tflops": flops / us / 1e6}
    if scales != (1.0, 1.0) and not ragged:  # accuracy vs the same values in a bf16 cache, as decode's rows
        ours = paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, HEAD_DIM**-0.5, chunk, *scales,
                                       config=cfg)
        kd, vd = ((c.float() * sc).to(DT) for c, sc in zip((k_cache, v_cache), scales))
        ref = paged_attention_prefill(q, kd, vd, cu, lens, tables, HEAD_DIM**-0.5, chunk)
        row["rel_err_vs_dequant"] = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
    if kv == "fp8scratch" and not ragged:  # the widening alone (traffic: e4m3 read, fp16 written); the in-loop output
        row["widen_us"] = eager_us(lambda: widen_to_scratch(q, k_cache, v_cache, lens, tables))
        widen_bytes = 2 * (prefix + chunk) * KV_HEADS * HEAD_DIM * 3
        row["widen_frac_bw"] = widen_bytes / ceil["copy_tbps"] / 1e6 / row["widen_us"]
        in_loop = paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, HEAD_DIM**-0.5, chunk, *scales,
                                          config=kernel_config("prefill", "fp8widen"))
        ours = paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, HEAD_DIM**-0.5, chunk, *scales,
                                       config=cfg)
        row["maxdiff_vs_fp8widen"] = (ours.float() - in_loop.float()).abs().max().item()
    if kv == "bf16" and not ragged and gluon is not None:
        run = lambda c: paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, HEAD_DIM**-0.5, chunk,  # noqa: E731
                                                config=c)
        row = gluon_row(row, run, gluon, run(cfg))
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    dec = [r for r in rows if r["kind"] == "decode" and r["kv"] == "bf16"]
    dec = [r for r in dec if r["merge"] == dec[0]["merge"]] if dec else []  # one merge mode: the first timed
    for ctx in sorted({r["ctx"] for r in dec}):
        rs = [r for r in dec if r["ctx"] == ctx]
        a1.plot([r["B"] for r in rs], [r["frac_bw"] for r in rs], "o-", label=f"ctx {ctx}")
    a1.axhline(0.85, color="gray", lw=0.5)
    a1.set(xscale="log", xlabel="batch", ylabel="fraction of copy bandwidth", title="decode (Triton, paged)",
           ylim=(0, 1.05))
    a1.legend(fontsize=7)
    pre = [r for r in rows if r["kind"] == "prefill" and not r.get("ragged")]
    labels = [f"{r['B']}x{r['ctx']}" for r in pre]
    a2.plot(labels, [r["frac_mm"] for r in pre], "o-", label="triton paged")
    a2.plot(labels, [r["sdpa_frac_mm"] for r in pre], "s--", label="torch SDPA (contiguous)")
    a2.set(xlabel="batch x seq", ylabel="fraction of bf16 matmul rate", title="causal prefill", ylim=(0, 1.05))
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--ctxs", default="1024,4096,16384,32768")
    ap.add_argument("--kv-dtypes", default="bf16", help=f"comma list of {', '.join(KV_DTYPES)}")
    ap.add_argument("--num-splits", type=int, default=None, help="decode split-K count (default: the heuristic)")
    ap.add_argument("--decode-merge", default="separate",
                    help="comma list of separate (two launches: the kernels' default), fused (one launch)")
    ap.add_argument("--extend", default="", help="comma list of CHUNK:PREFIX, e.g. 8192:122880")
    ap.add_argument("--no-prefill", action="store_true", help="skip the causal prefill rows")
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b", help="attention heads of this model")
    ap.add_argument("--ragged", action="store_true", help="prefill / extend rows also with this step's K/V passed "
                    "to the kernel (its RAGGED path when the config has it; the model passes none yet)")
    ap.add_argument("--gluon", nargs="?", const="1", default=None,
                    help="prefill / bf16 extend rows also on the Gluon kernel (sm90); optional JSON tiles")
    args = ap.parse_args()
    gluon = None if args.gluon is None else json.loads(args.gluon)
    gluon = gluon if gluon is None or isinstance(gluon, list) else [gluon]
    if gluon is not None and torch.cuda.get_device_capability() != (9, 0):  # else its rows would time Triton's kernel
        ap.error("--gluon: the Gluon prefill runs on sm90 (H100 / H200) only")
    if unknown := set(args.kv_dtypes.split(",")) - set(KV_DTYPES):
        ap.error(f"--kv-dtypes: unknown {sorted(unknown)}, choose from {list(KV_DTYPES)}")
    global HEADS, KV_HEADS
    HEADS, KV_HEADS = SHAPES[args.shape]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ceil = measure_ceilings()
    rows = []
    for ctx in map(int, filter(None, args.ctxs.split(","))):  # --ctxs "": no decode rows
        for batch in map(int, args.batches.split(",")):
            if batch * ctx > 256 * 16384:  # keep the KV under ~9 GB
                continue
            for kv, merge in ((kv, m) for kv in args.kv_dtypes.split(",") for m in args.decode_merge.split(",")
                              if kv != "fp8scratch"):  # an extend-only path
                r = bench_decode(batch, ctx, ceil, kv, args.num_splits, merge == "fused")
                rows.append(r)
                sd = f"{r['sdpa_us']:8.1f}" if "sdpa_us" in r else "     n/a"
                err = f" err_vs_dequant={r['rel_err_vs_dequant']:.1e}" if "rel_err_vs_dequant" in r else ""
                print(f"attn decode kv={kv} merge={merge} B={batch:4d} ctx={ctx:6d} us={r['us']:8.1f} "
                      f"floor_us={r['floor_us']:8.1f} frac_bw={r['frac_bw']:.2f} TB/s={r['tbps']:.2f} "
                      f"sdpa_us={sd}{err}", flush=True)
                torch.cuda.empty_cache()
    modes = (False, True) if args.ragged else (False,)
    for spec, kv, ragged in ((s, kv, m) for s in filter(None, args.extend.split(","))
                             for kv in args.kv_dtypes.split(",") if FP8_DOT.get(kv, 1) <= 1 for m in modes):
        chunk, prefix = map(int, spec.split(":"))
        r = bench_extend(chunk, prefix, ceil, kv, ragged, gluon)
        rows.append(r)
        err = f" err_vs_dequant={r['rel_err_vs_dequant']:.1e}" if "rel_err_vs_dequant" in r else ""
        if "widen_us" in r:
            err += (f" widen_us={r['widen_us']:.1f} widen_frac_bw={r['widen_frac_bw']:.2f} "
                    f"maxdiff_vs_fp8widen={r['maxdiff_vs_fp8widen']:.1e}")
        print(f"attn extend kv={kv} ragged={int(ragged)} chunk={chunk} prefix={prefix} us={r['us']:9.1f} "
              f"({r['timing']}) floor_us={r['floor_us']:9.1f} frac_mm={r['frac_mm']:.2f} TFLOP/s={r['tflops']:.0f}{err}"
              f"{gluon_text(r)}", flush=True)
        torch.cuda.empty_cache()
    for (batch, seq), ragged in ((c, m) for c in (() if args.no_prefill else ((1, 1024), (1, 4096), (1, 8192),
                                                                           (4, 2048), (1, 16384))) for m in modes):
        r = bench_prefill(batch, seq, ceil, ragged, gluon)
        rows.append(r)
        print(f"attn prefill ragged={int(ragged)} B={batch} seq={seq:6d} us={r['us']:8.1f} ({r['timing']}) "
              f"floor_us={r['floor_us']:8.1f} frac_mm={r['frac_mm']:.2f} TFLOP/s={r['tflops']:.0f} "
              f"sdpa_us={r['sdpa_us']:8.1f} sdpa_frac_mm={r['sdpa_frac_mm']:.2f} err={r['rel_err']:.1e}"
              f"{gluon_text(r)}", flush=True)
    (out / "bench_attention.json").write_text(json.dumps({"ceilings": ceil, "rows": rows,
                                                          "device": torch.cuda.get_device_name(),
                                                          "shape": args.shape}, indent=1))
    pre = [r for r in rows if r["kind"] == "prefill" and not r["ragged"]]
    if pre:
        plot(rows, out / "bench_attention.png")
    parts = []
    for kv, merge in ((kv, m) for kv in args.kv_dtypes.split(",") for m in args.decode_merge.split(",")):
        long = [r for r in rows if r["kind"] == "decode" and r["kv"] == kv and r["merge"] == merge
                and r["ctx"] >= 16384]
        if long:
            parts.append(f"decode {kv} {merge} ctx>=16k frac_bw min {min(r['frac_bw'] for r in long):.2f} "
                         f"max {max(r['frac_bw'] for r in long):.2f}")
    for kv in args.kv_dtypes.split(","):
        ext = [r for r in rows if r["kind"] == "extend" and not r["ragged"] and r["kv"] == kv]
        if ext:
            parts.append(f"extend {kv} frac_mm {min(r['frac_mm'] for r in ext):.2f}-"
                         f"{max(r['frac_mm'] for r in ext):.2f}")
    rag = [r for r in rows if r["kind"] in ("prefill", "extend") and r["ragged"]]
    if rag:
        parts.append(f"ragged (K/V passed) frac_mm {min(r['frac_mm'] for r in rag):.2f}-"
                     f"{max(r['frac_mm'] for r in rag):.2f}")
    if pre:
        parts.append(f"prefill frac_mm {min(r['frac_mm'] for r in pre):.2f}-{max(r['frac_mm'] for r in pre):.2f} "
                     f"(sdpa {min(r['sdpa_frac_mm'] for r in pre):.2f}-{max(r['sdpa_frac_mm'] for r in pre):.2f})")
        if gluon is not None:  # frac_mm per row: the table's kernel / each Gluon variant / SDPA
            cols = " / ".join(["table", *(f"gluon{i} {json.dumps(g)}" for i, g in enumerate(gluon)), "sdpa"])
            fracs = [[r["frac_mm"], *(v["frac_mm"] for v in r["gluon"]), r["sdpa_frac_mm"]] for r in pre]
            parts.append(f"prefill frac_mm {cols}: " + ", ".join(
                f"{r['B']}x{r['ctx']} " + "/".join(f"{x:.2f}" for x in f) for r, f in zip(pre, fracs)))
    print(f"bench_attention summary ({args.shape}): " + "; ".join(parts))


if __name__ == "__main__":
    main()
