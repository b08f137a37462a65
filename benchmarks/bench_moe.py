"""Fused MoE layer on the GPU: our Triton kernels vs torch._grouped_mm and the torch reference.

python benchmarks/bench_moe.py --out DIR [--shapes qwen3,mixtral,glm45air] [--m 1,8,...] [--dtypes bf16,fp8] [--tma]

Times CUDA-graph replays (triton.testing.do_bench_cudagraph, median), rotating over 4 routings so that
replays do not find the previous one's weights in L2. Reports microseconds, TB/s of the expert weights
actually touched, TFLOP/s, and the fraction of the roofline max(bytes / copy bandwidth, FLOPs / matmul
rate), both ceilings measured in this run. Prints one summary line per row and 'bench_moe summary' last.
FP8 rows whose config is weight-only (act_fp8 false) also time the same tiles in each "w8_mma" mode of
kernels/fused_moe.py (both GEMMs in that mode, without the GEMV entry): w8_mma dequant=.. f16=.. f16_swap=.. us.
--tma: also the old path alone (the config without its "tma" entry) and the permuted TMA path
alone (the config's "tma" entry, else moe_grouped_tma's default), and the permute's time vs its floor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.fp8 import per_token_group_quant, quantize_weight_block  # noqa: E402
from kernels.fused_moe import fused_experts, fused_experts_aligned, fused_experts_ref, moe_dtype_name  # noqa: E402
from kernels.moe_align import moe_align  # noqa: E402
from kernels.moe_config import get_moe_config  # noqa: E402
from kernels.moe_gemv import gemv_experts  # noqa: E402
from kernels.moe_grouped_tma import default_tma_config, fused_experts_tma  # noqa: E402
from kernels.moe_permute import permute_tokens  # noqa: E402
from kernels.moe_w8 import W8_MMA_MODES  # noqa: E402

SHAPES = {  # name: (num_experts, hidden, inter, top_k)
    "qwen3": (128, 2048, 768, 8),  # Qwen3-30B-A3B
    "mixtral": (8, 4096, 14336, 2),  # Mixtral-8x7B
    "glm45air": (128, 4096, 1408, 8),  # GLM-4.5-Air
}
NUM_ROT = 4


def bench_graph(fn, rep_ms: int = 60) -> float:
    """Median microseconds of one fn() call, replayed from a CUDA graph."""
    torch.cuda.synchronize()  # do_bench_cudagraph runs fn on a side stream: inputs must be ready
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def measure_ceilings() -> dict[str, float]:
    """Copy bandwidth (read + write) and dense matmul rates, measured now on this GPU."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_us = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median") * 1e3
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = triton.testing.do_bench(lambda: a @ b, rep=200, return_mode="median") * 1e3
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    fp8_us = triton.testing.do_bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16),
                                     rep=200, return_mode="median") * 1e3
    flops = 2 * 8192**3
    return {"copy_tbps": 2 * n / copy_us / 1e6, "bf16_tflops": flops / mm_us / 1e6,
            "fp8_tflops": flops / fp8_us / 1e6}


def grouped_mm_moe(x, w13_t, w2_t, topk_weights, topk_ids):
    """A torch._grouped_mm MoE layer (no host sync): sort pairs by expert, two grouped GEMMs, index_add."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13_t.shape[0]
    flat = topk_ids.reshape(-1).long()
    order = flat.argsort()
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    tok = order // top_k
    h = torch._grouped_mm(x[tok], w13_t, offs=offs)  # [pairs, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm((F.silu(gate.float()) * up.float()).to(x.dtype), w2_t, offs=offs)  # [pairs, H]
    y = y.float() * topk_weights.reshape(-1)[order, None]
    return torch.zeros(num_tokens, x.shape[1], device=x.device).index_add_(0, tok, y).to(x.dtype)


def make_inputs(num_tokens: int, num_experts: int, hidden: int, top_k: int, seed: int, ep_size: int = 1,
                slots: int = 0, device: str = "cuda"):
    """(x [N, H] bf16, normalized top-k weights [N, k] fp32, ids [N, k] int32): softmax top-k of random logits over
    num_experts, N = num_tokens. ep_size > 1: the rows EP rank 0 of ep_size receives from the sparse all2all
    (runtime/distributed/all2all_sparse.py) when every rank routes num_tokens tokens so: ids local to its first
    num_experts / ep_size experts, -1 (weight 0) for the slots of other ranks. slots 0: the dynamic exchange, exactly
    the expected count of rows (ep_size x num_tokens x rank_hit_fraction), each with a slot here; slots C: the static
    exchange, ep_size blocks of C rows (a source's rows for rank 0, the first C, then padding rows: all -1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if ep_size == 1:
        x = torch.randn(num_tokens, hidden, device=device, dtype=torch.bfloat16, generator=g)
        return (x, *_routing(num_tokens, num_experts, top_k, g, device))
    # (here, not at the top: the runtime's import chain needs msgspec, which a bare GPU machine lacks without the
    # wheelhouse; the non-EP benches run without it)
    from runtime.distributed.all2all_sparse import rank_hit_fraction

    num_local = num_experts // ep_size
    if slots:
        blocks = [_rows_for_rank0(num_tokens, num_experts, num_local, top_k, g, device) for _ in range(ep_size)]
        blocks = [(w[:slots], ids[:slots]) for w, ids in blocks]
        weights = torch.cat([F.pad(w, (0, 0, 0, slots - w.shape[0])) for w, _ in blocks])
        ids = torch.cat([F.pad(i, (0, 0, 0, slots - i.shape[0]), value=-1) for _, i in blocks])
    else:
        num_rows = round(ep_size * num_tokens * rank_hit_fraction(num_experts, ep_size, top_k))
        weights, ids = _rows_for_rank0(0, num_experts, num_local, top_k, g, device)
        while ids.shape[0] < num_rows:  # tokens of every source alike: draw until the expected count
            w, i = _rows_for_rank0(max(64, num_rows - ids.shape[0]) * 2, num_experts, num_local, top_k, g, device)
            weights, ids = torch.cat([weights, w]), torch.cat([ids, i])
        weights, ids = weights[:num_rows], ids[:num_rows]
    x = torch.randn(ids.shape[0], hidden, device=device, dtype=torch.bfloat16, generator=g)
    return x, weights.contiguous(), ids.to(torch.int32).contiguous()


def _routing(num_tokens: int, num_experts: int, top_k: int, g: torch.Generator,
             device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # make_inputs' router: normalized top-k weights [T, k] fp32 and ids [T, k] int32
    logits = torch.randn(num_tokens, num_experts, device=device, generator=g)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).float().contiguous(), ids.to(torch.int32).contiguous()


def _rows_for_rank0(num_tokens: int, num_experts: int, num_local: int, top_k: int, g: torch.Generator,
                    device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # of num_tokens routed tokens, those with a slot on rank 0 (global ids [0, num_local)), in token order, as its
    # dispatch packs them: (weights [n, k] with 0, local ids [n, k] with -1 where the slot is another rank's)
    weights, ids = _routing(num_tokens, num_experts, top_k, g, device)
    mine = ids < num_local
    rows = mine.any(dim=1)
    return torch.where(mine, weights, 0.0)[rows], torch.where(mine, ids, -1)[rows]


def bench_tma(sets: list, cfg: dict, w13: torch.Tensor, w2: torch.Tensor, kw: dict, ceil: dict,
              ref: torch.Tensor) -> dict:
    """The old path and the TMA path side by side, and the permute alone vs bytes / copy bandwidth (FP8: the
    e4m3 rows and their scales; ref is the old path's FP8 mode, so tma_rel_err includes W8A16 vs W8A8)."""
    num_experts, _, inter = w2.shape
    hidden, top_k = sets[0][0].shape[1], sets[0][2].shape[1]
    old = {k: v for k, v in cfg.items() if k != "tma"}
    tma = cfg.get("tma") or default_tma_config(fp8=bool(kw))
    aligned = [moe_align(ids, num_experts, tma["BLOCK_M"]) for _, _, ids in sets]
    used = sum(int(npp.item()) for _, _, npp in aligned) / len(sets)
    xs = [per_token_group_quant(xx) if kw else (xx, None) for xx, _, _ in sets]
    x, w, ids = sets[0]
    err = ((fused_experts_tma(x, w13, w2, w, ids, tma, **kw).float() - ref.float()).norm()
           / ref.float().norm()).item()
    return {
        "old_us": bench_graph(lambda: [fused_experts(xx, w13, w2, ww, ii, config=old, **kw) for xx, ww, ii in sets])
        / len(sets),
        "tma_us": bench_graph(lambda: [fused_experts_tma(xx, w13, w2, ww, ii, tma, **kw) for xx, ww, ii in sets])
        / len(sets),
        "tma_config": tma, "tma_rel_err": err,
        "permute_us": bench_graph(lambda: [permute_tokens(xq, s, npp, top_k, xsc)
                                           for (xq, xsc), (s, _, npp) in zip(xs, aligned)]) / len(sets),
        # rows written (padding rows too) and the tokens read once
        "permute_floor_us": (used + x.shape[0]) * hidden * xs[0][0].element_size() / ceil["copy_tbps"] / 1e6,
    }


def bench_one(shape: str, m: int, dtype: str, weights: dict, ceil: dict, with_ref: bool,
              with_tma: bool = False) -> dict:
    num_experts, hidden, inter, top_k = SHAPES[shape]
    fp8 = dtype == "fp8"
    w13, w2 = weights["w13"], weights["w2"]
    kw = {"w13_scale": weights["s13"], "w2_scale": weights["s2"]} if fp8 else {}
    sets = [make_inputs(m, num_experts, hidden, top_k, seed) for seed in range(NUM_ROT)]
    cfg = get_moe_config(m, num_experts, hidden, inter, top_k, moe_dtype_name(sets[0][0], fp8))
    # few tokens may take the GEMV kernels (kernels/moe_gemv.py, config "gemv"): no align, 16-bit activations
    gemv_on = bool(cfg.get("gemv")) and m <= cfg["gemv"].get("max_tokens", 1)
    # one token runs without align (fused_experts' no-align path); the GEMM timing follows it
    aligned = [(None, None, None) if m == 1 or gemv_on else moe_align(ids, num_experts, cfg["BLOCK_M"])
               for _, _, ids in sets]

    def ours():
        for x, w, ids in sets:
            fused_experts(x, w13, w2, w, ids, config=cfg, **kw)

    def gemms():
        for (x, w, ids), al in zip(sets, aligned):
            if gemv_on:
                gemv_experts(x, w13, w2, w, ids, cfg["gemv"], kw.get("w13_scale"), kw.get("w2_scale"))
            else:
                fused_experts_aligned(x, w13, w2, w, ids, *al, cfg, kw.get("w13_scale"), kw.get("w2_scale"))

    def align():
        for _, _, ids in sets:
            moe_align(ids, num_experts, cfg["BLOCK_M"])

    x, w, ids = sets[0]
    ref_kw = dict(kw, act_fp8=cfg.get("act_fp8", True) and not gemv_on) if fp8 else kw  # the ref mirrors the FP8 mode
    ref = fused_experts_ref(x, w13, w2, w, ids, **ref_kw)
    err = ((fused_experts(x, w13, w2, w, ids, config=cfg, **kw).float() - ref.float()).norm()
           / ref.float().norm()).item()
    row = {"shape": shape, "M": m, "dtype": dtype, "config": cfg, "rel_err": err,
           "us": bench_graph(ours) / NUM_ROT, "gemm_us": bench_graph(gemms) / NUM_ROT,
           "align_us": bench_graph(align) / NUM_ROT}
    if gemv_on:  # A/B: the table's tl.dot entry for the same M
        cfg_dot = {k: v for k, v in cfg.items() if k != "gemv"}
        row["no_gemv_us"] = bench_graph(lambda: [fused_experts(xx, w13, w2, ww, ii, config=cfg_dot, **kw)
                                                 for xx, ww, ii in sets]) / NUM_ROT
    if fp8 and not cfg.get("act_fp8", True):  # A/B of the weight-only MMA modes (kernels/fused_moe.py "w8_mma")
        row["w8_mma_us"] = {}
        for mode in W8_MMA_MODES:  # the same tiles, both GEMMs in this mode, the GEMV entry (if any) left out
            cfg_m = {k: v for k, v in cfg.items() if k != "gemv"}
            cfg_m.update(up=dict(cfg["up"], w8_mma=mode), down=dict(cfg["down"], w8_mma=mode))
            row["w8_mma_us"][mode] = bench_graph(lambda c=cfg_m: [fused_experts(xx, w13, w2, ww, ii, config=c, **kw)
                                                                  for xx, ww, ii in sets]) / NUM_ROT
            row.setdefault("w8_mma_err", {})[mode] = (
                (fused_experts(x, w13, w2, w, ids, config=cfg_m, **kw).float() - ref.float()).norm()
                / ref.float().norm()).item()
    if m == 1:  # A/B of config "fused_sum": the top-k sum inside the down GEMM (one launch fewer)
        cfg_sum = dict(cfg, gemv=dict(cfg["gemv"], fused_sum=True)) if gemv_on else dict(cfg, fused_sum=True)
        row["fused_sum_us"] = bench_graph(lambda: [fused_experts(xx, w13, w2, ww, ii, config=cfg_sum, **kw)
                                                   for xx, ww, ii in sets]) / NUM_ROT
        out_sum = fused_experts(x, w13, w2, w, ids, config=cfg_sum, **kw)
        row["fused_sum_equal"] = bool(torch.equal(out_sum, fused_experts(x, w13, w2, w, ids, config=cfg, **kw)))
    if not fp8:
        w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)
        try:
            row["grouped_mm_us"] = bench_graph(lambda: [grouped_mm_moe(xx, w13_t, w2_t, ww, ii)
                                                        for xx, ww, ii in sets]) / NUM_ROT
        except Exception as exc:  # noqa: BLE001  report, keep going
            row["grouped_mm_error"] = repr(exc)[:200]
    if with_tma:
        row.update(bench_tma(sets, cfg, w13, w2, kw, ceil, ref))
    if with_ref:
        row["ref_us"] = triton.testing.do_bench(lambda: fused_experts_ref(x, w13, w2, w, ids, **ref_kw), rep=100,
                                                return_mode="median") * 1e3
    # roofline: the experts each routing touches (averaged over the rotation), activations in and out
    elem = 1 if fp8 else 2
    touched = sum(ids.unique().numel() for _, _, ids in sets) / NUM_ROT
    weight_bytes = touched * 3 * hidden * inter * elem
    act_bytes = 2 * m * hidden * 2
    flops = 6 * m * top_k * hidden * inter
    rate = ceil["fp8_tflops" if fp8 else "bf16_tflops"]
    mem_us = (weight_bytes + act_bytes) / ceil["copy_tbps"] / 1e6
    floor_us = max(mem_us, flops / rate / 1e6)
    row.update(experts_touched=touched, weight_tbps=weight_bytes / row["us"] / 1e6,
               tflops=flops / row["us"] / 1e6, floor_us=floor_us, frac_roofline=floor_us / row["us"],
               frac_roofline_gemm=floor_us / row["gemm_us"], bound="memory" if mem_us >= floor_us else "compute")
    if "grouped_mm_us" in row:
        row["grouped_mm_frac"] = floor_us / row["grouped_mm_us"]
    if "tma_us" in row:
        row.update(old_frac=floor_us / row["old_us"], tma_frac=floor_us / row["tma_us"])
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for dtype, style in (("bf16", "-"), ("fp8", "--")):
            rs = [r for r in rows if r["shape"] == shape and r["dtype"] == dtype]
            if not rs:
                continue
            ms = [r["M"] for r in rs]
            ax.plot(ms, [r["frac_roofline"] for r in rs], "o" + style, label=f"triton {dtype} (+align)")
            ax.plot(ms, [r["frac_roofline_gemm"] for r in rs], "s" + style, label=f"triton {dtype} gemms")
            if dtype == "bf16" and all("grouped_mm_frac" in r for r in rs):
                ax.plot(ms, [r["grouped_mm_frac"] for r in rs], "^:", label="torch._grouped_mm")
        ax.axhline(0.85, color="gray", lw=0.5)
        ax.set(xscale="log", xlabel="tokens M", ylabel="fraction of roofline", title=shape, ylim=(0, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--shapes", default="qwen3,mixtral,glm45air")
    ap.add_argument("--m", default="1,8,64,256,1024,4096")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--no-ref", action="store_true", help="skip timing the slow torch reference")
    ap.add_argument("--tma", action="store_true", help="old path vs the permuted TMA path, and the permute")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ceil = measure_ceilings()
    print(f"ceilings: copy {ceil['copy_tbps']:.2f} TB/s, bf16 {ceil['bf16_tflops']:.0f} TFLOP/s, "
          f"fp8 {ceil['fp8_tflops']:.0f} TFLOP/s on {torch.cuda.get_device_name()}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        num_experts, hidden, inter, _ = SHAPES[shape]
        g = torch.Generator(device="cuda").manual_seed(0)
        w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        w13 *= hidden**-0.5
        w2 = torch.randn(num_experts, hidden, inter, device="cuda", generator=g, dtype=torch.bfloat16)
        w2 *= inter**-0.5
        for dtype in args.dtypes.split(","):
            if dtype == "fp8":
                q13, s13 = quantize_weight_block(w13)
                q2, s2 = quantize_weight_block(w2)
                weights = {"w13": q13, "w2": q2, "s13": s13, "s2": s2}
            else:
                weights = {"w13": w13, "w2": w2}
            for m in map(int, args.m.split(",")):
                r = bench_one(shape, m, dtype, weights, ceil, with_ref=not args.no_ref, with_tma=args.tma)
                rows.append(r)
                gm = f"{r['grouped_mm_us']:9.1f}" if "grouped_mm_us" in r else "      n/a"
                ref = f"{r['ref_us']:9.1f}" if "ref_us" in r else "      n/a"
                print(f"moe {shape:8s} {dtype:4s} M={m:5d} us={r['us']:9.1f} gemm_us={r['gemm_us']:9.1f} "
                      f"align_us={r['align_us']:5.1f} floor_us={r['floor_us']:8.1f} "
                      f"roofline={r['frac_roofline']:.2f} (gemm {r['frac_roofline_gemm']:.2f}) "
                      f"TB/s={r['weight_tbps']:.2f} TFLOP/s={r['tflops']:.0f} grouped_mm_us={gm} ref_us={ref} "
                      f"err={r['rel_err']:.1e}" + (f" fused_sum_us={r['fused_sum_us']:.1f} "
                                                   f"(equal {r['fused_sum_equal']})" if "fused_sum_us" in r else "")
                      + (f" old_us={r['old_us']:.1f} tma_us={r['tma_us']:.1f} roofline old={r['old_frac']:.2f} "
                         f"tma={r['tma_frac']:.2f} tma_err={r['tma_rel_err']:.1e} permute_us={r['permute_us']:.1f} "
                         f"(floor {r['permute_floor_us']:.1f})" if "tma_us" in r else "")
                      + (f" gemv (tl.dot {r['no_gemv_us']:.1f} us)" if "no_gemv_us" in r else "")
                      + ("".join(f" w8_mma {k}={v:.1f} us (err {r['w8_mma_err'][k]:.1e})"
                                 for k, v in r["w8_mma_us"].items()) if "w8_mma_us" in r else ""),
                      flush=True)
            del weights
    (out / "bench_moe.json").write_text(json.dumps({"ceilings": ceil, "device": torch.cuda.get_device_name(),
                                                    "rows": rows}, indent=1))
    plot(rows, out / "bench_moe.png")
    worst = min(rows, key=lambda r: r["frac_roofline"])
    print(f"bench_moe summary: {len(rows)} rows, roofline fraction min {worst['frac_roofline']:.2f} "
          f"({worst['shape']} {worst['dtype']} M={worst['M']}), median "
          f"{sorted(r['frac_roofline'] for r in rows)[len(rows) // 2]:.2f}, align max "
          f"{max(r['align_us'] for r in rows):.1f} us")


if __name__ == "__main__":
    main()
