"""Tune the few-token GEMV MoE kernels (kernels/moe_gemv.py) and decide, per token bucket, GEMV vs tl.dot.

python benchmarks/tune_moe.py --gemv --out DIR [--shapes qwen3] [--m 1,8] [--dtypes bf16,fp8] [--jobs 12]
                               [--gemv-keep-up]

For each bucket M <= 8 of the GPU's existing table (kernels/configs/, or DIR/configs/ if that holds one):
times every GEMV tile for the gate_up and the down kernel separately (CUDA-graph replay over 4 routings,
5 ms each), then the whole layer for the best pair with and without "fused_sum" (M=1), "pdl" and "prefetch",
and the whole layer of the table's tl.dot entry; prints them side by side with the bandwidth floor and writes
the table to DIR/configs/ with the entry's "gemv" key set where GEMV is faster (removed where not). The down
GEMM is timed in both forms: per pair (then the top-k sum) and "down_topk" (all of a token's slots per program,
the sum in registers). --gemv-keep-up takes the gate_up tile from the table's GEMV entry nearest to each M
instead of timing every one (about half the time, for a down-only retune). Other
buckets and keys are copied unchanged. tune_moe.py keeps the "gemv" entries it finds: run this after it anyway.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import triton
from bench_moe import NUM_ROT, SHAPES, bench_graph, measure_ceilings

from kernels import pdl as pdl_switch
from kernels.fp8 import quantize_weight_block
from kernels.fused_moe import fused_experts
from kernels.moe_config import CONFIG_DIR, config_file_name, device_name, get_moe_config
from kernels.moe_gemv import _gemv_down_kernel, _gemv_down_topk_kernel, _gemv_up_kernel

MAX_GEMV_TOKENS = 8
_MAX_SMEM = 160 << 10
DEVICE, DTYPE = "cuda", torch.bfloat16  # (a CPU test runs the tuner in the interpreter with float32)


def gemv_candidates(fp8: bool, k: int, two_tiles: bool) -> list[dict]:
    """GEMV tiles worth timing for a K of k: at least one 16-byte vector per thread and at most 16 KiB per
    tile (fewer warps and more rows give each thread several rows that share one activation load and
    conversion), the cp.async ring in shared memory, no K step wider than k needs. K steps of 1024-2048 too
    (the same 16 KiB tile in fewer, longer steps: at one token the loop's K steps run one after the other, each a
    full memory latency; FP8 gained from them in session 8, 16-bit weights were not tried before session 10: a
    bf16 down GEMV at K=768 then runs one masked step instead of three)."""
    elem = 1 if fp8 else 2
    out = []
    for bn in (4, 8, 16, 32, 64):
        for bk in (128, 256, 512, 1024, 2048):
            for warps, stages in ((2, 1), (2, 3), (4, 1), (4, 3), (8, 1)):
                tile = bn * bk * elem
                if not warps * 32 * 16 <= tile <= 16 << 10 or tile * (2 if two_tiles else 1) * stages > _MAX_SMEM:
                    continue
                if bk > max(128, triton.next_power_of_2(k)):
                    continue
                out.append({"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages})
    return out


def topk_candidates(fp8: bool, k: int, top_k: int) -> list[dict]:
    """Tiles of the "down_topk" kernel (all of a token's top-k slots per program: rows = top_k (padded) x
    BLOCK_N): one 16-byte weight vector to 64 values per thread (the activations add as many, one row each)."""
    elem, rows_per_col = (1 if fp8 else 2), triton.next_power_of_2(top_k)
    out = []
    for bn in (1, 2, 4, 8):
        for bk in (128, 256, 512):
            for warps, stages in ((2, 1), (2, 3), (4, 1), (4, 3), (8, 1)):
                per_thread = rows_per_col * bn * bk // (warps * 32)
                if per_thread * elem < 16 or per_thread > 64 or bk > max(128, triton.next_power_of_2(k)):
                    continue
                if rows_per_col * bn * bk * (elem + 2) * stages > _MAX_SMEM:  # weights and activations ring
                    continue
                out.append({"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages})
    return out


def _inputs(num_tokens: int, num_experts: int, hidden: int, top_k: int, seed: int):
    # bench_moe.make_inputs on DEVICE: x [num_tokens, hidden], normalized top-k weights and int32 ids
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=DTYPE, generator=g)
    weights, ids = torch.randn(num_tokens, num_experts, device=DEVICE, generator=g).softmax(-1).topk(top_k, dim=-1)
    return x, (weights / weights.sum(-1, keepdim=True)).float().contiguous(), ids.to(torch.int32).contiguous()


class GemvProblem:
    """Expert weights and 4 rotated routings of one (shape, dtype, M); launches of one GEMV kernel."""

    def __init__(self, shape: str, dtype: str, m: int, num_experts: int | None = None, num_sets: int = NUM_ROT):
        num_routed, h, inter, top_k = SHAPES[shape]
        e = num_experts or num_routed
        self.shape, self.fp8, self.m = (e, h, inter, top_k), dtype == "fp8", m
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        w13 = torch.randn(e, 2 * inter, h, device=DEVICE, generator=gen, dtype=DTYPE) * h**-0.5
        w2 = torch.randn(e, h, inter, device=DEVICE, generator=gen, dtype=DTYPE) * inter**-0.5
        if self.fp8:
            (w13, self.s13), (w2, self.s2) = quantize_weight_block(w13), quantize_weight_block(w2)
            self.kw = {"w13_scale": self.s13, "w2_scale": self.s2}
        else:
            self.s13, self.s2, self.kw = w13, w2, {}
        self.w13, self.w2 = w13, w2
        self.sets = [_inputs(m, num_routed, h, top_k, seed) for seed in range(num_sets)]
        if num_experts:  # a compile-only problem with few experts: any valid ids
            self.sets = [(x, w, ids % e) for x, w, ids in self.sets]

    def kernel_run(self, kind: str, g: dict):
        e, h, inter, top_k = self.shape
        calls = []
        for x, w, ids in self.sets:
            num_pairs = ids.numel()
            meta = {"USE_FP8": self.fp8, "BLOCK_N": g["BLOCK_N"], "BLOCK_K": g["BLOCK_K"],
                    "NUM_STAGES": g["num_stages"], "PDL": False, "num_warps": g["num_warps"]}
            if kind == "up":
                out = torch.empty(num_pairs, inter, dtype=DTYPE, device=DEVICE)
                args = (x, self.w13, self.s13, out, ids, self.w2, num_pairs, h, inter, top_k, x.stride(0),
                        self.w13.stride(0), self.w13.stride(1), self.s13.stride(0), self.s13.stride(1), out.stride(0),
                        self.w2.stride(0))
                grid = (triton.cdiv(inter, g["BLOCK_N"]) * num_pairs,)
                calls.append((_gemv_up_kernel, grid, args, dict(meta, EVEN_K=h % g["BLOCK_K"] == 0, PREFETCH=False,
                                                                 PIECES=32 * g["num_warps"])))
            elif kind == "down_topk":  # the down GEMM and the top-k sum per (column tile, token)
                a = torch.randn(num_pairs, inter, device=DEVICE, dtype=DTYPE)
                out = torch.empty(self.m, h, dtype=DTYPE, device=DEVICE)
                args = (a, self.w2, self.s2, out, ids, w, self.m, inter, h, a.stride(0), self.w2.stride(0),
                        self.w2.stride(1), self.s2.stride(0), self.s2.stride(1), out.stride(0))
                grid = (triton.cdiv(h, g["BLOCK_N"]) * self.m,)
                calls.append((_gemv_down_topk_kernel, grid, args, dict(
                    meta, EVEN_K=inter % g["BLOCK_K"] == 0, TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k))))
            else:
                a = torch.randn(num_pairs, inter, device=DEVICE, dtype=DTYPE)
                y = torch.empty(num_pairs, h, dtype=DTYPE, device=DEVICE)
                args = (a, self.w2, self.s2, y, ids, w, y, ids, num_pairs, inter, h, a.stride(0), self.w2.stride(0),
                        self.w2.stride(1), self.s2.stride(0), self.s2.stride(1), y.stride(0))
                grid = (triton.cdiv(h, g["BLOCK_N"]) * num_pairs,)
                calls.append((_gemv_down_kernel, grid, args, dict(meta, EVEN_K=inter % g["BLOCK_K"] == 0,
                                                                   FUSED_SUM=False, TOP_K=1, TOP_K_PAD=1)))

        def run() -> None:
            for kernel, grid, args, meta in calls:
                kernel[grid](*args, **meta)

        return run

    def layer_run(self, cfg: dict):
        def run() -> None:
            for x, w, ids in self.sets:
                fused_experts(x, self.w13, self.w2, w, ids, config=cfg, **self.kw)

        return run


@contextmanager
def _global_pdl_off() -> Iterator[None]:
    """The global PDL switch off (kernels/pdl.py: on by default on Hopper, where it launches the GEMV pair with PDL
    whatever its "pdl" key says): inside, a variant's "pdl" key alone decides, as the key means
    (kernels/moe_gemv.py)."""
    old = os.environ.get(pdl_switch.ENV_VAR)
    os.environ[pdl_switch.ENV_VAR] = "0"
    pdl_switch.env_switch.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(pdl_switch.ENV_VAR, None)
        else:
            os.environ[pdl_switch.ENV_VAR] = old
        pdl_switch.env_switch.cache_clear()


def _time(run, rep_ms: int = 5) -> float:
    try:
        run()
        torch.cuda.synchronize()
        return bench_graph(run, rep_ms=rep_ms) / NUM_ROT
    except Exception as exc:  # noqa: BLE001  out of resources, no PDL in graphs, ...: skip the candidate
        print(f"  skip: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        torch.cuda.synchronize()
        return float("inf")


def _compile_worker(job: tuple) -> str:
    shape, dtype, items = job  # a 2-expert problem with the real H and I: the same binaries as the real one
    try:
        prob = GemvProblem(shape, dtype, 1, num_experts=2, num_sets=1)
        for kind, g in items:
            try:
                prob.kernel_run(kind, g)()
            except Exception:  # noqa: BLE001  the timing pass reports it
                pass
        torch.cuda.synchronize()
        return f"{shape}/{dtype}: {len(items)} compiled"
    except Exception as exc:  # noqa: BLE001
        return f"{shape}/{dtype}: compile worker failed: {exc!r}"[:300]


def precompile_gemv(shapes: list[str], dtypes: list[str], jobs: int, keep_up: bool = False) -> None:
    work = []
    for shape in shapes:
        _, h, inter, _ = SHAPES[shape]
        for dtype in dtypes:
            fp8 = dtype == "fp8"
            items = [] if keep_up else [("up", g) for g in gemv_candidates(fp8, h, True)]
            items += [("down", g) for g in gemv_candidates(fp8, inter, False)]
            items += [("down_topk", g) for g in topk_candidates(fp8, inter, SHAPES[shape][3])]
            step = max(1, -(-len(items) // max(1, jobs // (len(shapes) * len(dtypes)))))
            work += [(shape, dtype, items[i : i + step]) for i in range(0, len(items), step)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(jobs, len(work))) as pool:
        for msg in pool.imap_unordered(_compile_worker, work):
            if "failed" in msg:
                print(msg, flush=True)
    print(f"precompiled {sum(len(w[2]) for w in work)} GEMV variants in {time.time() - t0:.0f} s", flush=True)


def _floor_us(prob: GemvProblem, ceil: dict) -> float:
    e, h, inter, top_k = prob.shape
    touched = sum(ids.unique().numel() for _, _, ids in prob.sets) / len(prob.sets)
    weight_bytes = touched * 3 * h * inter * (1 if prob.fp8 else 2)
    return (weight_bytes + 4 * prob.m * h) / ceil["copy_tbps"] / 1e6


def extend_max_tokens(table: dict) -> None:
    """A bucket that chose GEMV also serves the larger M its lookup maps to (nearest bucket on a log scale, as
    kernels/moe_config.py picks), up to the largest M where GEMV was measured faster: both paths scale with
    the pairs in between (e.g. with GEMV at 1 and 8, bucket 1 keeps M=2 off the aligned tl.dot path)."""
    buckets = [int(b) for b in table]
    gemv_ms = [b for b in buckets if table[str(b)].get("gemv")]
    for b in gemv_ms:
        m = b
        while m + 1 <= max(gemv_ms) and min(buckets, key=lambda x: abs(math.log(max(x, 1)) - math.log(m + 1))) == b:
            m += 1
        table[str(b)]["gemv"]["max_tokens"] = m


def _table_up(table: dict, m: int) -> dict | None:
    # the gate_up tile of the table's GEMV entry nearest to m on a log scale (None: no entry has one)
    with_gemv = [int(b) for b, entry in table.items() if entry.get("gemv")]
    if not with_gemv:
        return None
    return table[str(min(with_gemv, key=lambda b: abs(math.log(max(b, 1)) - math.log(m))))]["gemv"]["up"]


def tune_gemv(shape: str, ms: list[int], dtype: str, out: Path, ceil: dict, keep_up: bool = False) -> list[dict]:
    e, h, inter, top_k = SHAPES[shape]
    fp8 = dtype == "fp8"
    dtype_name = "fp8" if fp8 else "bfloat16"
    name = config_file_name(e, h, inter, dtype_name, device_name())
    src = out / "configs" / name if (out / "configs" / name).exists() else CONFIG_DIR / name
    if not src.exists():  # extend what the lookup uses now: another GPU's table for the shape (a table holding
        # only the small buckets would serve every M)
        others = sorted(CONFIG_DIR.glob(config_file_name(e, h, inter, dtype_name, "*")))
        if not others:
            print(f"tune_moe --gemv: no table {name} to extend for {shape} {dtype}: run tune_moe.py first", flush=True)
            return []
        src = others[0]
    table = json.loads(src.read_text())
    rows = []
    for m in [m for m in ms if m <= MAX_GEMV_TOKENS]:
        base = table.get(str(m)) or get_moe_config(m, e, h, inter, top_k, dtype_name)
        base = {k: v for k, v in base.items() if k != "gemv"}
        prob = GemvProblem(shape, dtype, m)
        kept = _table_up(table, m) if keep_up else None
        if kept is not None:  # untimed (nan): the table's tile
            up = (float("nan"), 0, kept)
        else:
            up = min((_time(prob.kernel_run("up", g)), i, g) for i, g in enumerate(gemv_candidates(fp8, h, True)))
        down = min((_time(prob.kernel_run("down", g)), i, g) for i, g in enumerate(gemv_candidates(fp8, inter, False)))
        # (the per-pair down kernel's time leaves out its top-k sum, this one's includes it)
        topk = min((_time(prob.kernel_run("down_topk", g)), i, g)
                   for i, g in enumerate(topk_candidates(fp8, inter, top_k)))
        print(f"  {shape} {dtype} M={m}: gemv up {up[0]:.1f} us {json.dumps(up[2])}, down {down[0]:.1f} us "
              f"{json.dumps(down[2])}, down_topk {topk[0]:.1f} us {json.dumps(topk[2])}", flush=True)
        layers = []
        with _global_pdl_off():  # else "pdl": False would be timed with PDL too
            # per-pair down then the sum (a launch, or at M=1 "fused_sum"), or "down_topk" (its own tile)
            for down_topk, fused_sum in [(False, False)] + [(False, True)] * (m == 1) + [(True, False)]:
                for pdl in (False, True):
                    for prefetch in (False, True):
                        gemv = {"up": up[2], "down": (topk if down_topk else down)[2], "max_tokens": m,
                                "fused_sum": fused_sum, "pdl": pdl, "prefetch": prefetch, "down_topk": down_topk}
                        layers.append((_time(prob.layer_run(dict(base, gemv=gemv)), 25), len(layers), gemv))
        new_us, _, gemv = min(layers)
        old_us = _time(prob.layer_run(base), 25)
        floor = _floor_us(prob, ceil)
        use = new_us < old_us
        table[str(m)] = dict(base, gemv=gemv) if use else base
        row = {"shape": shape, "dtype": dtype, "M": m, "floor_us": floor, "old_us": old_us, "gemv_us": new_us,
               "gemv_variants_us": [t for t, _, _ in layers], "gemv": gemv, "chosen": "gemv" if use else "dot"}
        rows.append(row)
        print(f"gemv {shape} {dtype} M={m}: tl.dot {old_us:.1f} us ({floor / old_us:.2f} of floor) | gemv "
              f"{new_us:.1f} us ({floor / new_us:.2f}) | floor {floor:.1f} us -> {row['chosen']} "
              f"[(down_topk, fused_sum) x pdl x prefetch variants: "
              f"{' '.join(f'{t:.1f}' for t in row['gemv_variants_us'])}]", flush=True)
        del prob
        torch.cuda.empty_cache()
    extend_max_tokens(table)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / name).write_text(json.dumps(table, indent=1))
    print(f"tune_moe --gemv wrote {name}", flush=True)
    return rows


def main_gemv(shapes: list[str], ms: list[int], dtypes: list[str], out: Path, jobs: int, keep_up: bool = False) -> None:
    t0 = time.time()
    ceil = measure_ceilings()
    if jobs > 1:
        precompile_gemv(shapes, dtypes, jobs, keep_up)
    rows = [r for shape in shapes for dtype in dtypes for r in tune_gemv(shape, ms, dtype, out, ceil, keep_up)]
    (out / "tune_moe_gemv.json").write_text(json.dumps({"ceilings": ceil, "device": torch.cuda.get_device_name(),
                                                        "rows": rows}, indent=1))
    worst = min((r["floor_us"] / min(r["old_us"], r["gemv_us"]) for r in rows), default=float("nan"))
    print(f"tune_moe --gemv summary: {len(rows)} buckets, gemv chosen in {sum(r['chosen'] == 'gemv' for r in rows)}, "
          f"min fraction of floor {worst:.2f}, {time.time() - t0:.0f} s")
