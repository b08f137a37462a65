"""The MoE router at decode sizes on the GPU: the fused one-launch router vs F.linear (cuBLAS) + the top-k kernel.

python benchmarks/bench_router.py --out DIR [--m 1,8,32,64] [--shapes qwen3,glm45air] [--sweep 1,2,4,8,16,32]
                                 [--tails 4,4p,2,2p,1,1p] [--norm]

Times CUDA-graph replays (triton.testing.do_bench_cudagraph, median) of calls over NUM_ROT-weight rotations
totalling >= ROT_BYTES, so that a replay never finds its weight in L2 (a model's 48 routers are far apart in a
step), and once more with one weight (L2-hot). The unfused path is what Router.forward ran before: F.linear(x
.to(W.dtype), W) then topk_softmax / topk_sigmoid_grouped. Checks on the GPU that both return the same ids (in
order) and weights. The floor is the weight's bytes over the copy bandwidth measured now (the GEMM is latency
bound: it shows how far from bandwidth both are). --sweep also times the fused kernel at each forced H split;
up to 16 rows both of its GEMM forms are timed (products summed in registers, used up to GEMV_MAX_TOKENS
rows, and a tl.dot tile). --tails times the scoring tail's variants (kernels/router_fused.py TAIL_CONFIGS): "W" is
the launch at W warps, "Wp" with the packed-key softmax top-k; each is checked to give the default's ids in
order (weights: the largest difference is printed), and the fastest per row is printed (set TAIL_CONFIGS to the
ones that win). --norm also times the post-attention residual add + RMSNorm fused into the router
(route_fused_norm, kernels/router_norm.py) against the norm kernel then the fused router, and checks that x, the
new residual, the ids and the weights are the same bits.
Prints one line per row and 'bench_router summary' last; DIR/bench_router.json holds every number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_moe import bench_graph, measure_ceilings  # noqa: E402
from kernels.norm import rms_norm  # noqa: E402
from kernels.router import topk_sigmoid_grouped, topk_softmax  # noqa: E402
from kernels.router_fused import (  # noqa: E402
    FUSED_MAX_TOKENS,
    GEMV_MAX_TOKENS,
    TAIL_DEFAULT,
    _fused_config,
    _num_sms,
    route_fused,
    route_fused_norm,
)

# name: (num_experts, hidden, top_k, grouped, router weight dtype); GLM-4.5-Air: n_group=1, topk_group=1
SHAPES = {
    "qwen3": (128, 2048, 8, False, torch.bfloat16),  # Qwen3-30B-A3B
    "glm45air": (128, 4096, 8, True, torch.float32),  # GLM-4.5-Air, routed_scaling_factor 1.0
}
ROT_BYTES = 128 << 20  # > 2x an H200's 60 MB L2


def unfused(x, w, bias, top_k):
    logits = F.linear(x.to(w.dtype), w)  # [M, E]
    if bias is None:
        return topk_softmax(logits, top_k, True)
    return topk_sigmoid_grouped(logits, bias, top_k, 1, 1, True, 1.0)


def fused(x, w, bias, top_k, num_splits=None, gemv=None, num_warps=None, packed=None):
    return route_fused(x, w, top_k, True, None, bias, 1, 1, 1.0, num_splits=num_splits, gemv=gemv,
                       num_warps=num_warps, packed=packed)


def with_norm(h, res, norm_w, w, bias, top_k, fuse: bool):
    # the post-attention norm then the router: one launch (fuse) or two; (weights, ids, x, new residual)
    if fuse:
        return route_fused_norm(h, res, norm_w, 1e-6, w, top_k, True, None, bias, 1, 1, 1.0)
    x, r = rms_norm(h, norm_w, 1e-6, res)
    return (*fused(x, w, bias, top_k), x, r)


def parse_tail(name: str) -> dict:
    # "4" / "4p": num_warps, and the packed-key top-k when it ends in p
    return {"num_warps": int(name.rstrip("p")), "packed": name.endswith("p")}


def compare(a, b) -> dict:
    # ids in order (both paths pick with the same helper), weights to fp32 rounding of differently summed logits
    rows_differ = int((a[1] != b[1]).any(dim=1).sum())
    same = (a[1] == b[1]).all(dim=1)
    w_err = float((a[0][same] - b[0][same]).abs().max()) if same.any() else float("nan")
    return {"rows_ids_differ": rows_differ, "max_weight_diff": w_err}


def bench_one(name: str, m: int, ceil: dict[str, float], sweep: list[int], tails: list[str], norm: bool) -> dict:
    num_experts, hidden, top_k, grouped, wdtype = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(m)
    w_bytes = num_experts * hidden * wdtype.itemsize
    num_rot = max(1, ROT_BYTES // w_bytes)
    ws = [(torch.randn(num_experts, hidden, device="cuda", generator=gen) / hidden**0.5).to(wdtype)
          for _ in range(num_rot)]
    bias = torch.randn(num_experts, device="cuda", generator=gen) * 0.1 if grouped else None
    x = torch.randn(m, hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    check = [compare(fused(x, w, bias, top_k), unfused(x, w, bias, top_k)) for w in ws[:16]]
    again = fused(x, ws[0], bias, top_k)
    deterministic = all(torch.equal(u, v) for u, v in zip(again, fused(x, ws[0], bias, top_k)))

    def timed(fn, rot: bool) -> float:
        weights = ws if rot else ws[:1] * 32

        def calls() -> None:
            for w in weights:
                fn(x, w, bias, top_k)

        return bench_graph(calls) / len(weights)

    row = {"shape": name, "m": m, "num_experts": num_experts, "hidden": hidden, "top_k": top_k,
           "weight_dtype": str(wdtype), "fused_us": timed(fused, True), "unfused_us": timed(unfused, True),
           "fused_hot_us": timed(fused, False), "unfused_hot_us": timed(unfused, False),
           "floor_us": w_bytes / ceil["copy_tbps"] / 1e6, "num_splits": _fused_config(m, num_experts, hidden,
                                                                                        _num_sms(x.device))[0],
           "rows_ids_differ": sum(c["rows_ids_differ"] for c in check), "rows_checked": m * len(check),
           "max_weight_diff": max(c["max_weight_diff"] for c in check), "deterministic": deterministic}
    row["speedup"] = row["unfused_us"] / row["fused_us"]
    row["sweep_us"] = {s: timed(lambda *a, s=s: fused(*a, num_splits=s), True) for s in sweep}
    # both GEMM forms where both apply (one token block): where products summed in registers stop paying
    row["forms_us"] = ({form: timed(lambda *a, g=form == "gemv": fused(*a, gemv=g), True) for form in ("gemv", "dot")}
                       if m <= 16 else {})
    # the tail variants: the default's ids in the same order and its weights (to the order of an 8-value sum at
    # another warp count), then timed. The default spelled out: with TAIL_CONFIGS on, fused()'s own pick is a variant
    pairs = [(fused(x, w, bias, top_k, **parse_tail(t)), fused(x, w, bias, top_k, **TAIL_DEFAULT))
             for t in tails for w in ws[:4]]
    row["tails_same_ids"] = all(torch.equal(u[1], v[1]) for u, v in pairs)
    row["tails_max_weight_diff"] = max((float((u[0] - v[0]).abs().max()) for u, v in pairs), default=0.0)
    row["tails_us"] = {t: timed(lambda *a, t=t: fused(*a, **parse_tail(t)), True) for t in tails}
    if norm:  # h the attention output, res the residual stream (~10x larger), as in a decoder layer
        res = torch.randn(m, hidden, device="cuda", generator=gen).to(torch.bfloat16) * 10
        norm_w = torch.rand(hidden, device="cuda", generator=gen).to(torch.bfloat16) + 0.5
        row["norm_bit_exact"] = all(all(torch.equal(u, v) for u, v in zip(
            with_norm(x, res, norm_w, w, bias, top_k, True), with_norm(x, res, norm_w, w, bias, top_k, False)))
            for w in ws[:16])
        row["norm_us"] = {kind: timed(lambda x, w, bias, top_k, f=kind == "fused": with_norm(
            x, res, norm_w, w, bias, top_k, f), True) for kind in ("separate", "fused")}
    best = f"  best split {min(row['sweep_us'], key=row['sweep_us'].get)}" if sweep else ""
    if norm:
        best += (f"  norm+router {row['norm_us']['separate']:.2f} -> fused {row['norm_us']['fused']:.2f} us "
                 f"bit exact {row['norm_bit_exact']}")
    if tails:
        best += (f"  tails {' '.join(f'{t}:{us:.2f}' for t, us in row['tails_us'].items())} best "
                 f"{min(row['tails_us'], key=row['tails_us'].get)} same ids {row['tails_same_ids']} max dw "
                 f"{row['tails_max_weight_diff']:.1e}")
    best += "".join(f"  {form} {us:.2f}" for form, us in row["forms_us"].items())
    print(f"{name:9s} M={m:3d} fused {row['fused_us']:6.2f} us  unfused {row['unfused_us']:6.2f} us  "
          f"x{row['speedup']:.2f}  (L2-hot {row['fused_hot_us']:5.2f} / {row['unfused_hot_us']:5.2f})  "
          f"floor {row['floor_us']:.2f}  splits {row['num_splits']}{best}  ids differ in {row['rows_ids_differ']} "
          f"rows  max dw {row['max_weight_diff']:.1e}  deterministic {deterministic}", flush=True)
    if sweep:
        print("   sweep: " + "  ".join(f"{s}: {us:.2f}" for s, us in row["sweep_us"].items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--m", default="1,8,32,64", help=f"rows; the Router fuses up to {FUSED_MAX_TOKENS}")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--sweep", default="", help="H splits to time the fused kernel at, e.g. 1,2,4,8,16,32")
    parser.add_argument("--tails", default="", help="tail variants to time: W warps, Wp with the packed top-k, "
                        "e.g. 4,4p,2,2p,1,1p")
    parser.add_argument("--norm", action="store_true", help="also time the post-attention norm fused into the router")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_router needs a CUDA GPU")
    ceil = measure_ceilings()
    print(f"ceilings: copy {ceil['copy_tbps']:.2f} TB/s; fused up to {FUSED_MAX_TOKENS} rows, gemv form up to "
          f"{GEMV_MAX_TOKENS}", flush=True)
    sweep = [int(s) for s in args.sweep.split(",") if s]
    tails = [t for t in args.tails.split(",") if t]
    for t in tails:
        if not t.rstrip("p").isdigit():
            raise SystemExit(f"--tails: {t!r} is not W or Wp (W warps, p: packed top-k), e.g. 4,4p,1,1p")
    rows = [bench_one(s, int(m), ceil, sweep, tails, args.norm) for s in args.shapes.split(",")
            for m in args.m.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_router.json").write_text(json.dumps(
        {"ceilings": ceil, "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    differ = sum(r["rows_ids_differ"] for r in rows)
    checked = sum(r["rows_checked"] for r in rows)
    deterministic = all(r["deterministic"] for r in rows)
    same_ids = all(r["tails_same_ids"] for r in rows)
    worst = min(rows, key=lambda r: r["speedup"])
    print("bench_router summary: fused vs unfused us " + ", ".join(
        f"{r['shape']} M={r['m']} {r['fused_us']:.2f}/{r['unfused_us']:.2f}" for r in rows)
        + f"; worst x{worst['speedup']:.2f} ({worst['shape']} M={worst['m']}); ids differ in {differ} of {checked} "
        f"tokens; deterministic: {'yes' if deterministic else 'NO'}"
        + (f"; tails same ids: {'yes' if same_ids else 'NO'}; best tail per M: " + ", ".join(
            f"{r['shape']} M={r['m']} {min(r['tails_us'], key=r['tails_us'].get)} "
            f"{min(r['tails_us'].values()):.2f}" for r in rows) if tails else "")
        + ("; norm + router separate/fused us: " + ", ".join(
            f"{r['shape']} M={r['m']} {r['norm_us']['separate']:.2f}/{r['norm_us']['fused']:.2f}" for r in rows)
           + f"; norm bit exact: {'yes' if all(r['norm_bit_exact'] for r in rows) else 'NO'}" if args.norm else ""))
    # a logit summed in another order may round to the other side of a bf16 step: rare, never systematic
    if not deterministic or not same_ids or differ > checked // 100 or not all(r.get("norm_bit_exact", True)
                                                                               for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
