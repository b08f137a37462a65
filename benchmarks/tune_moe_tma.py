"""Tune the large-M MoE path (kernels/moe_grouped_tma.py) against the old one, side by side; sm90 compile helper.

python benchmarks/tune_moe.py --tma --out DIR [--shapes qwen3] [--m 1024,4096,16384] [--dtypes bf16,fp8] [--no-gluon]
                               [--ep EP]

Per M: the old path (the table's config, align included) and, per BLOCK_M, each TMA candidate of the gate_up
and of the down grouped GEMM timed alone (CUDA-graph replay, median), then the whole permuted layer with the
best pair; on sm90 (unless --no-gluon) the same for the Gluon warp-specialized kernels (kernels/moe_gluon.py,
FP8: kernels/moe_gluon_fp8.py) at BLOCK_M 128 and 64, their pair timed through fused_experts_tma with "gluon": 1;
plus the permute's own time against its floor (bytes written and read over copy bandwidth). Prints one
'moe_tma' line per M and 'tune_moe_tma summary' last; writes DIR/configs/<the table> with a "tma" entry (the
fastest layer's: Triton TMA tiles, or "gluon": 1 and the Gluon tiles; min_rows: the smallest measured M at
which the new path won, in rows) in every bucket where it won, and DIR/tune_moe_tma.json with all numbers.
--ep EP: the local shape (E/EP experts) on the rows EP rank 0 receives in a step of M tokens a rank (tune_moe.py's
docstring); a row's "M" is then that received row count N (its bucket), "step_tokens" the step's M; it extends the
local shape's table in kernels/configs/ (tune_moe.py --ep first, its table copied in), never starts one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.moe_gluon import default_gluon_config, grouped_gemm_gluon
from kernels.moe_gluon_fp8 import default_gluon_fp8_config, grouped_gemm_gluon_fp8
from kernels.moe_grouped_tma import _grouped_gemm_kernel, grouped_gemm

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, warp_specialize): the flattened persistent loop
# (kernels/moe_grouped_tma.py: "flatten" defaults to not warp_specialize). No warp-specialized tile: the first one
# the GPU tests ran on the H200, (128, 128, 64, 4, 3, True), never finished in 240 s (sessions 16 and 17), though
# it compiles for sm90 in seconds on the CPU (12 warps, no spills): the run hangs. Session 18 ran four alone (60 s
# each): three hang, one returns NaN; kernels/moe_grouped_tma.py refuses them on a GPU
TMA_CANDIDATES = [
    (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False), (64, 128, 64, 4, 4, False), (64, 256, 64, 4, 3, False),
]


def gemm_cfg(c: tuple, fp8: bool = False) -> dict:
    _, bn, bk, warps, stages, ws = c
    return {"BLOCK_N": bn, "BLOCK_K": 128 if fp8 else bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages,
            "warp_specialize": ws}


def candidates(bm: int, fp8: bool) -> tuple[list[dict], list[dict]]:
    """(gate_up configs, down configs) of TMA_CANDIDATES at this BLOCK_M. The accumulators (two in gate_up, +
    FP8's per-step partial product) must stay in registers: FP8 spills at a 256-wide down tile (sm90 compile,
    3.6), and the gate_up tile is half the down tile."""
    max_n = 128 if fp8 else 256
    cands: list[dict] = []
    up_cands: list[dict] = []
    for c in TMA_CANDIDATES:
        for n, dst in ((max_n, cands), (max_n // 2, up_cands)):
            gc = dict(gemm_cfg(c, fp8), BLOCK_N=min(c[1], n))
            if c[0] == bm and gc not in dst:
                dst.append(gc)
    return up_cands, cands


GLUON_BLOCK_MS = (128, 64)  # the Gluon kernels' row blocks (two MMA warpgroups of 64 rows, or one)


def gluon_candidates(bm: int, fp8: bool) -> tuple[list[dict], list[dict]]:
    """(gate_up configs, down configs) of the Gluon kernel at this BLOCK_M: the default's (one cooperative MMA
    partition: ping-pong lost on the H200 at 4096 and 16384 rows, session 12), at 128 rows (bf16) also
    bench_moe_gluon --sweep's tile changes (each within shared memory and registers)."""
    from bench_moe_gluon import SWEEP

    cfg = default_gluon_fp8_config(block_m=bm) if fp8 else default_gluon_config(block_m=bm)
    ups, downs = [cfg["up"]], [cfg["down"]]
    if bm == 128 and not fp8:
        ups += [dict(cfg["up"], **change) for change in SWEEP["up"].values()]
        downs += [dict(cfg["down"], **change) for change in SWEEP["down"].values()]
    return ups, downs


def gluon_runs_here() -> bool:
    """The Gluon kernels are written for Hopper (sm90): elsewhere their candidates are skipped."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def tma_entry(bm: int, up: dict, down: dict, gluon: bool) -> dict:
    """A table's "tma" entry (min_rows: with_tma_entries sets it); "gluon": 1 makes fused_experts_tma take the Gluon
    kernels (FP8 experts: kernels/moe_gluon_fp8.py) with these tiles."""
    return {"min_rows": 0, "BLOCK_M": bm, **({"gluon": 1} if gluon else {}), "up": up, "down": down}


def run_gemm(gluon: bool, a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor,
             w_scale: torch.Tensor | None, out: torch.Tensor, expert_ids: torch.Tensor, num_post_pad: torch.Tensor,
             n: int, w_rows: int, silu_mul: bool, bm: int, g: dict) -> None:
    """One grouped GEMM on the Triton TMA kernel or (gluon) the Gluon one; FP8 operands where w_scale is given."""
    if not gluon:
        grouped_gemm(a, w, out, expert_ids, num_post_pad, n, w_rows, silu_mul, bm, g, None, a_scale, w_scale)
    elif w_scale is not None:
        grouped_gemm_gluon_fp8(a, a_scale, w, w_scale, out, expert_ids, num_post_pad, n, w_rows, silu_mul, bm, g)
    else:
        grouped_gemm_gluon(a, w, out, expert_ids, num_post_pad, n, w_rows, silu_mul, bm, g)


def _compile_worker(items: list) -> str:
    """Launches each (shape, dtype, BLOCK_M, up|down, config) once on one block of rows at the real K / N / row
    counts (the same specializations as the timed launches): its binary lands in Triton's disk cache. On a cold
    cache the timing pass compiled ~20 variants one after another and the first H200 runs ran out of time."""
    from bench_moe import SHAPES

    from kernels.fp8 import per_token_group_quant, quantize_weight_block

    done = 0
    for shape, dtype, bm, kind, gc, gluon in items:
        try:
            _, h, inter, _ = SHAPES[shape]
            k, n, w_rows = (h, inter, 2 * inter) if kind == "up" else (inter, h, h)
            a = torch.randn(bm, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(2 * w_rows, k, device="cuda", dtype=torch.bfloat16)  # two experts
            a_scale = w_scale = None
            if dtype == "fp8":
                a, a_scale = per_token_group_quant(a)
                w, w_scale = quantize_weight_block(w.view(2, w_rows, k))
                w = w.view(2 * w_rows, k)
            out = torch.empty(bm, n, device="cuda", dtype=torch.bfloat16)
            expert_ids = torch.zeros(1, device="cuda", dtype=torch.int32)
            num_post_pad = torch.full((1,), bm, device="cuda", dtype=torch.int32)
            run_gemm(gluon, a, a_scale, w, w_scale, out, expert_ids, num_post_pad, n, w_rows, kind == "up", bm, gc)
            torch.cuda.synchronize()
            done += 1
        except Exception:  # noqa: BLE001, S112  the timing pass reports a config that cannot run
            continue
    return f"{done}/{len(items)}"


def precompile(shape: str, dtype: str, jobs: int, gluon: bool = False) -> None:
    import tuning

    fp8 = dtype == "fp8"
    families = [(False, bm, candidates(bm, fp8)) for bm in sorted({c[0] for c in TMA_CANDIDATES})]
    families += [(True, bm, gluon_candidates(bm, fp8)) for bm in GLUON_BLOCK_MS] if gluon else []
    items = [(shape, dtype, bm, kind, gc, is_gluon) for is_gluon, bm, cands in families
             for kind, cfgs in zip(("up", "down"), cands) for gc in cfgs]
    tuning.precompile(items, _compile_worker, jobs)


def compile_grouped_gemm_sm90(silu_mul: bool, bm: int, bn: int, bk: int, num_warps: int, num_stages: int,
                              warp_specialize: bool, fp8: bool = False, flatten: bool | None = None):
    """triton.compile of _grouped_gemm_kernel for Hopper (no GPU needed), with a launch's specializations
    (bf16 output; e4m3 operands with fp8)."""
    fn = _grouped_gemm_kernel
    op = "fp8e4nv" if fp8 else "bf16"
    types = {"a_desc": f"tensordesc<{op}[{bm}, {bk}]>", "w_desc": f"tensordesc<{op}[{bn}, {bk}]>",
             "out_desc": f"tensordesc<bf16[{bm}, {bn}]>", "out_ptr": "*bf16", "a_scale_ptr": "*fp32",
             "w_scale_ptr": "*fp32", "expert_ids_ptr": "*i32", "num_post_pad_ptr": "*i32", "K": "i32", "N": "i32",
             "W_ROWS": "i32", "stride_o": "i32", "stride_as": "i32", "stride_wse": "i32", "stride_wsn": "i32"}
    consts = {"SILU_MUL": silu_mul, "STORE_TMA": not warp_specialize, "USE_FP8": fp8, "BLOCK_M": bm, "BLOCK_N": bn,
              "BLOCK_K": bk, "GROUP_M": 8, "NUM_SMS": 132, "WARP_SPECIALIZE": warp_specialize,
              "FLATTEN": not warp_specialize if flatten is None else flatten}
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], constexprs[(i,)] = "constexpr", consts[name]
        else:  # pointers aligned, the model's sizes (2048, 768, ...) divisible by 16
            sig[name] = types[name]
            if not types[name].startswith("tensordesc"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _table_path(shape: str, dtype: str, ep_size: int = 1) -> tuple[str, Path]:
    from bench_moe import SHAPES

    from kernels.moe_config import CONFIG_DIR, config_file_name, device_name

    e, h, inter, _ = SHAPES[shape]
    name = config_file_name(e // ep_size, h, inter, dtype, device_name())
    return name, CONFIG_DIR / name


def _dtype_name(dtype: str) -> str:
    return "fp8" if dtype == "fp8" else "bfloat16"


def _measure_m(shape: str, dtype: str, m: int, weights: dict, ceil: dict, gluon: bool = False,
               ep_size: int = 1) -> dict:
    """Old path vs the best TMA config at m tokens (gluon: the Gluon kernels' too), and the permute vs its floor;
    weights: w13, w2 (+ s13, s2), ep_size > 1: rank 0's local experts, timed on the rows it receives in a step of
    m tokens a rank."""
    from bench_moe import SHAPES, bench_graph, make_inputs
    from tune_moe import ep_inputs_kwargs, time_run

    from kernels.fp8 import per_token_group_quant
    from kernels.fused_moe import fused_experts
    from kernels.moe_align import moe_align
    from kernels.moe_config import get_moe_config
    from kernels.moe_grouped_tma import fused_experts_tma
    from kernels.moe_permute import permute_tokens

    num_routed, h, inter, top_k = SHAPES[shape]
    e = num_routed // ep_size
    fp8 = dtype == "fp8"
    w13, w2 = weights["w13"], weights["w2"]
    kw = {"w13_scale": weights["s13"], "w2_scale": weights["s2"]} if fp8 else {}
    w13_2d, w2_2d = w13.view(e * 2 * inter, h), w2.view(e * h, inter)
    ep_kw = ep_inputs_kwargs(m, num_routed, top_k, ep_size, str(w13.device))
    sets = [make_inputs(m, num_routed, h, top_k, seed, **ep_kw) for seed in range(2)]
    num_rows = sets[0][0].shape[0]  # the rows fused_experts gets (N under EP): its bucket
    at = f"M={m}" if ep_size == 1 else f"T={m} M={num_rows}"
    old_cfg = {k: v for k, v in get_moe_config(num_rows, e, h, inter, top_k, _dtype_name(dtype)).items()
               if k != "tma"}
    old_us = bench_graph(lambda: [fused_experts(x, w13, w2, w, i, config=old_cfg, **kw) for x, w, i in sets]) / 2
    # (slots -1: another EP rank's, or a padding row's: no expert, no work)
    touched = sum(i[i >= 0].unique().numel() for _, _, i in sets) / 2
    num_pairs = sum(int((i >= 0).sum()) for _, _, i in sets) / 2
    elem = 1 if fp8 else 2
    floor_us = max((touched * 3 * h * inter * elem + 4 * num_rows * h) / ceil["copy_tbps"] / 1e6,
                   6 * num_pairs * h * inter / ceil["fp8_tflops" if fp8 else "bf16_tflops"] / 1e6)
    xs = [per_token_group_quant(x) if fp8 else (x, None) for x, _, _ in sets]  # the permute's inputs
    tma_bms = {c[0] for c in TMA_CANDIDATES}
    x0, w0, i0 = sets[0]
    ref = fused_experts(x0, w13, w2, w0, i0, config=old_cfg, **kw).float()
    max_err = 6e-2 if fp8 else 3e-2  # vs the old path (each measured at ~5e-3 / ~2e-2 of the fp32 answer)
    best = None
    for bm in sorted(tma_bms | (set(GLUON_BLOCK_MS) if gluon else set())):
        aligned = [moe_align(i, e, bm) for _, _, i in sets]
        perms = [permute_tokens(x, s, npp, top_k, xsc) for (x, xsc), (s, _, npp) in zip(xs, aligned)]
        permute_us = bench_graph(lambda al=aligned: [permute_tokens(x, s, npp, top_k, xsc)
                                                     for (x, xsc), (s, _, npp) in zip(xs, al)]) / 2
        used = sum(int(npp.item()) for _, _, npp in aligned) / 2
        permute_floor_us = (used + num_rows) * h * elem / ceil["copy_tbps"] / 1e6  # rows written, tokens read
        acts = [torch.randn(p.shape[0], inter, device=w2.device, dtype=sets[0][0].dtype) for p, _, _ in perms]
        acts = [per_token_group_quant(a) if fp8 else (a, None) for a in acts]
        ups = [torch.empty(p.shape[0], inter, device=w2.device, dtype=sets[0][0].dtype) for p, _, _ in perms]
        ys = [torch.empty(p.shape[0], h, device=w2.device, dtype=sets[0][0].dtype) for p, _, _ in perms]

        def launches(kind: str, gc: dict, is_gluon: bool, bm=bm, aligned=aligned, perms=perms, acts=acts, ups=ups,
                     ys=ys):
            def run() -> None:
                for (_, ex, npp), (ap, _, aps), (act, act_s), up, y in zip(aligned, perms, acts, ups, ys):
                    if kind == "up":
                        run_gemm(is_gluon, ap, aps, w13_2d, kw.get("w13_scale"), up, ex, npp, inter, 2 * inter,
                                 True, bm, gc)
                    else:
                        run_gemm(is_gluon, act, act_s, w2_2d, kw.get("w2_scale"), y, ex, npp, h, h, False, bm, gc)
            return run, len(perms)

        families = [(False, candidates(bm, fp8))] if bm in tma_bms else []
        families += [(True, gluon_candidates(bm, fp8))] if gluon and bm in GLUON_BLOCK_MS else []
        for is_gluon, (up_cands, cands) in families:
            name = f"BM={bm}{' gluon' if is_gluon else ''}"
            up = min((time_run(*launches("up", gc, is_gluon)), j) for j, gc in enumerate(up_cands))
            down = min((time_run(*launches("down", gc, is_gluon)), j) for j, gc in enumerate(cands))
            if max(up[0], down[0]) == float("inf"):
                print(f"  {shape} {dtype} {at} {name}: every up or every down candidate failed", flush=True)
                continue
            cfg = tma_entry(bm, up_cands[up[1]], cands[down[1]], is_gluon)
            total = bench_graph(lambda cfg=cfg: [fused_experts_tma(x, w13, w2, w, i, cfg, **kw)
                                                 for x, w, i in sets]) / 2
            err = ((fused_experts_tma(x0, w13, w2, w0, i0, cfg, **kw).float() - ref).norm() / ref.norm()).item()
            print(f"  {shape} {dtype} {at} {name}: up {up[0]:.1f} down {down[0]:.1f} permute {permute_us:.1f} "
                  f"(floor {permute_floor_us:.1f}) layer {total:.1f} us, err vs old {err:.1e}", flush=True)
            if not err <= max_err:  # (NaN too) a fast wrong answer never wins
                print(f"  {shape} {dtype} {at} {name}: error over {max_err:.0e}: not a candidate", flush=True)
            elif best is None or total < best[0]:
                best = (total, cfg, permute_us, permute_floor_us, err)
    if best is None:
        raise RuntimeError(f"tune_moe_tma {shape} {dtype} {at}: no candidate ran and matched the old path")
    err = best[4]
    return {"shape": shape, "dtype": dtype, "M": num_rows, "step_tokens": m, "ep_size": ep_size, "old_us": old_us,
            "tma_us": best[0], "floor_us": floor_us, "old_frac": floor_us / old_us, "tma_frac": floor_us / best[0],
            "permute_us": best[2], "permute_floor_us": best[3], "err_vs_old": err, "tma": best[1], "old": old_cfg}


def tune_tma(shape: str, dtype: str, ms: list[int], out: Path, jobs: int = 12, gluon: bool = True,
             ep_size: int = 1) -> None:
    from bench_moe import SHAPES, measure_ceilings

    from kernels.fp8 import quantize_weight_block

    t0 = time.time()
    num_routed, h, inter, _ = SHAPES[shape]
    e = num_routed // ep_size
    name, path = _table_path(shape, _dtype_name(dtype), ep_size)
    if ep_size > 1 and not path.exists():  # its buckets alone would serve every row count, small ones too
        raise SystemExit(f"tune_moe --tma --ep {ep_size}: no table {name} in {path.parent}: run tune_moe.py --ep "
                         f"{ep_size} first and copy its table there (the TMA entries extend it)")
    if gluon and not gluon_runs_here():
        print("tune_moe_tma: the Gluon candidates run on sm90 (H100 / H200) only: skipped", flush=True)
        gluon = False
    if jobs > 1:
        precompile(shape, dtype, jobs, gluon)
    ceil = measure_ceilings()
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * inter, h, device="cuda", generator=g, dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(e, h, inter, device="cuda", generator=g, dtype=torch.bfloat16) * inter**-0.5
    if dtype == "fp8":
        (w13, s13), (w2, s2) = quantize_weight_block(w13), quantize_weight_block(w2)
        weights = {"w13": w13, "w2": w2, "s13": s13, "s2": s2}
    else:
        weights = {"w13": w13, "w2": w2}
    rows = []
    numbers_name = f"tune_moe_tma_{shape}_{dtype}" + (f"_ep{ep_size}" if ep_size > 1 else "")
    for m in ms:
        r = _measure_m(shape, dtype, m, weights, ceil, gluon, ep_size)
        torch.cuda.empty_cache()
        rows.append(r)
        ep_tag = f" EP={ep_size} T={m}" if ep_size > 1 else ""
        print(f"moe_tma {shape} {dtype}{ep_tag} M={r['M']:6d} old_us={r['old_us']:9.1f} tma_us={r['tma_us']:9.1f} "
              f"floor_us={r['floor_us']:8.1f} roofline old={r['old_frac']:.2f} tma={r['tma_frac']:.2f} "
              f"speedup={r['old_us'] / r['tma_us']:.2f} permute_us={r['permute_us']:.1f} (floor "
              f"{r['permute_floor_us']:.1f}, {r['permute_floor_us'] / r['permute_us']:.2f} of BW) "
              f"err={r['err_vs_old']:.1e} tma={json.dumps(r['tma'])}", flush=True)
        # after every M: a run cut by a timeout (the first H200 run was, at 200 s) keeps what it measured
        name, table = with_tma_entries(shape, dtype, rows, ep_size)
        (out / "configs").mkdir(parents=True, exist_ok=True)
        (out / "configs" / name).write_text(json.dumps(table, indent=1))
        (out / f"{numbers_name}.json").write_text(json.dumps({"ceilings": ceil, "rows": rows}, indent=1))
    num_tma = sum("tma" in c for c in table.values())
    print(f"tune_moe_tma summary: {shape} {dtype} " + " ".join(
        f"M={r['M']}:{r['old_frac']:.2f}->{r['tma_frac']:.2f}{'(gluon)' if r['tma'].get('gluon') else ''}"
        for r in rows)
        + f" (fraction of floor, old->tma); wrote {name} ({num_tma} tma buckets) in {time.time() - t0:.0f} s")


def with_tma_entries(shape: str, dtype: str, rows: list[dict], ep_size: int = 1) -> tuple[str, dict]:
    """This GPU's table for shape (ep_size > 1: its local shape's) with a "tma" entry in each measured bucket where
    the TMA path won (the row's winner: Triton TMA tiles, or "gluon": 1 and the Gluon kernel's); min_rows is the
    rows of the smallest winning M, so smaller counts that share a bucket keep the old path."""
    from bench_moe import SHAPES

    from kernels.moe_config import get_moe_config

    num_routed, h, inter, top_k = SHAPES[shape]
    e = num_routed // ep_size
    name, path = _table_path(shape, _dtype_name(dtype), ep_size)
    table = json.loads(path.read_text()) if path.exists() else {}
    winners = {r["M"]: r["tma"] for r in rows if r["tma_us"] < r["old_us"]}
    for m, cfg in winners.items():
        nearest = get_moe_config(m, e, h, inter, top_k, _dtype_name(dtype))
        table[str(m)] = dict({k: v for k, v in nearest.items() if k != "tma"},
                             tma=dict(cfg, min_rows=min(winners) * top_k))
    return name, table
