"""Tune the fused MoE block shapes per (experts, hidden, inter, token bucket, dtype, GPU).

python benchmarks/tune_moe.py --out DIR [--shapes qwen3,...] [--m 1,8,...] [--dtypes bf16,fp8] [--jobs 12]
python benchmarks/tune_moe.py --tma --out DIR [--shapes qwen3] [--m 1024,4096,16384] [--dtypes bf16,fp8] [--no-gluon]
python benchmarks/tune_moe.py --gemv ...  (the few-token GEMV kernels vs the table's entries: tune_moe_gemv.py)
python benchmarks/tune_moe.py --ep 8 [--tma] --shapes qwen3 ...  (one expert-parallel rank's local experts)

For each BLOCK_M allowed at a token count (and for FP8, each activation mode; weight-only FP8 also each
"w8_mma" mode of kernels/fused_moe.py, the best of each printed), times every candidate of the
gate_up GEMM and of the down GEMM separately (CUDA-graph replay, median), keeps the best pair, then the best
BLOCK_M / mode overall (FP8 activation quantization launches included in its total). All candidates are
first compiled in parallel worker processes (Triton's disk cache then serves the timing process).
Writes DIR/configs/moe_E.._H.._I.._{dtype}_{gpu}.json, the files kernels/moe_config.py looks up.
--tma: times the permuted TMA path (benchmarks/tune_moe_tma.py) against the table's old path at each M, and
writes the table with a "tma" entry in the buckets from the smallest M where it wins (default qwen3, bf16); on
sm90 the Gluon kernels are candidates too (--no-gluon: the Triton TMA kernel's only).
--ep EP (with or without --tma; not --gemv): tunes the local shape of expert parallelism over EP ranks (E/EP experts,
the same H, I, top-k) on the rows rank 0 receives (bench_moe.make_inputs with ep_size: global softmax top-k over E,
the rows with a slot on rank 0, other slots -1), as the sparse all2all with the engine's defaults delivers them:
a step of up to EP_STATIC_MAX_TOKENS tokens a rank in EP fixed blocks of capacity_slots rows (padding rows
included), a larger one its exact rows. --m then counts a step's tokens per rank (T); each bucket of the table
is the received row count N of such a step (printed: T=.. N=..), what get_moe_config sees there, so a step of a
tuned T hits its own bucket (other backends or flags deliver other counts: the nearest bucket serves them).
Writes DIR/configs/moe_E{E/EP}_H.._I.._{dtype}_{gpu}.json, the file the EP layer loads. The TMA entries extend
the local shape's table in kernels/configs/: tune and copy that in first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe import SHAPES, bench_graph, make_inputs  # noqa: E402

import kernels.fused_moe as fm  # noqa: E402
from kernels.fp8 import per_token_group_quant, quantize_weight_block  # noqa: E402
from kernels.moe_align import moe_align  # noqa: E402
from kernels.moe_config import CONFIG_DIR, config_file_name, device_name  # noqa: E402
from kernels.moe_w8 import W8_MMA_MODES, w8_mma_meta  # noqa: E402
from runtime.config import EngineConfig  # noqa: E402

SMALL = [(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4)]
LARGE = [(64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 4, 3)]
# weight-only FP8 also tries wide 8-warp tiles: fewer registers a thread for the widened weights (sm90 compiles,
# benchmarks/moe_ir.py: up 128 x 128 at 4 warps 248-255 registers), and with swapped operands the MMA's M side
W8_EXTRA = [(128, 128, 8, 4), (256, 128, 8, 3)]
# the sparse all2all under the engine's defaults: steps up to the largest CUDA-graph step (the mixed graphs' token
# cap, above the decode graphs' batch) exchange fixed blocks of capacity_slots rows, larger ones the exact rows
EP_STATIC_MAX_TOKENS = EngineConfig.max_mixed_cudagraph_tokens
EP_CAPACITY_FACTOR = EngineConfig.all2all_capacity_factor


def ep_slots(num_tokens: int, num_experts: int, top_k: int, ep_size: int) -> int:
    """make_inputs' slots for a step of num_tokens tokens a rank under EP: the static exchange's block per source,
    or 0 (the dynamic exchange, exact rows) above EP_STATIC_MAX_TOKENS."""
    from runtime.distributed.all2all_sparse import capacity_slots  # (bench_moe.make_inputs says why not at the top)

    if num_tokens > EP_STATIC_MAX_TOKENS:
        return 0
    return capacity_slots(num_tokens, num_experts, ep_size, top_k, EP_CAPACITY_FACTOR)


def ep_inputs_kwargs(num_tokens: int, num_experts: int, top_k: int, ep_size: int, device: str = "cuda") -> dict:
    """make_inputs' keywords for the rows EP rank 0 receives in a step of num_tokens tokens a rank ({}: no EP)."""
    if ep_size == 1:
        return {}
    return {"ep_size": ep_size, "slots": ep_slots(num_tokens, num_experts, top_k, ep_size), "device": device}


def plans(m: int, top_k: int, num_experts: int, fp8: bool) -> list[tuple[int, bool]]:
    """(BLOCK_M, act_fp8) pairs worth timing at m tokens."""
    rows = m * top_k / num_experts
    bms = [16] if rows <= 8 else [16, 32, 64] if rows <= 48 else [32, 64, 128] if rows <= 160 else [64, 128]
    modes = [False] if rows <= 8 else [False, True] if rows <= 128 else [True]
    return [(bm, act) for bm in bms for act in (modes if fp8 else [False])]


def candidates(block_m: int, fp8: bool, act_fp8: bool = True) -> list[dict]:
    """Tile candidates of one GEMM; weight-only FP8 (fp8, not act_fp8) times each in every "w8_mma" mode."""
    out = []
    w8 = fp8 and not act_fp8
    for bn, bk, warps, stages in (SMALL if block_m <= 32 else LARGE) + (W8_EXTRA if w8 else []):
        if fp8 and 128 % bk:
            bk = 128
        g = {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1 if block_m <= 32 else 8, "num_warps": warps,
             "num_stages": stages}
        for mode in W8_MMA_MODES if w8 else [None]:
            gm = g if mode is None else dict(g, w8_mma=mode)
            if gm not in out:
                out.append(gm)
    return out


class Problem:
    """Weights and rotated inputs of one (shape, dtype, M), aligned for each BLOCK_M; ep_size > 1: rank 0's local
    experts and the rows it receives in a step of M tokens a rank (num_rows of them)."""

    def __init__(self, shape: str, dtype: str, m: int, block_ms: list[int], num_sets: int = 2,
                 real_weights: bool = True, device: str = "cuda", ep_size: int = 1) -> None:
        num_routed, h, inter, top_k = SHAPES[shape]
        e = num_routed // ep_size
        self.shape, self.fp8 = (e, h, inter, top_k), dtype == "fp8"
        if real_weights:
            gen = torch.Generator(device=device).manual_seed(0)
            w13 = torch.randn(e, 2 * inter, h, device=device, generator=gen, dtype=torch.bfloat16) * h**-0.5
            w2 = torch.randn(e, h, inter, device=device, generator=gen, dtype=torch.bfloat16) * inter**-0.5
        else:  # compile-only: any bits will do
            wdt = torch.float8_e4m3fn if self.fp8 else torch.bfloat16
            w13 = torch.empty(e, 2 * inter, h, device=device, dtype=wdt)
            w2 = torch.empty(e, h, inter, device=device, dtype=wdt)
        if self.fp8 and real_weights:
            (w13, self.s13), (w2, self.s2) = quantize_weight_block(w13), quantize_weight_block(w2)
        elif self.fp8:
            self.s13 = torch.ones(e, triton.cdiv(2 * inter, 128), triton.cdiv(h, 128), device=device)
            self.s2 = torch.ones(e, triton.cdiv(h, 128), triton.cdiv(inter, 128), device=device)
        else:
            self.s13, self.s2 = w13, w2
        self.w13, self.w2 = w13, w2
        ep_kw = ep_inputs_kwargs(m, num_routed, top_k, ep_size, device)
        self.sets = [make_inputs(m, num_routed, h, top_k, seed, **ep_kw) for seed in range(num_sets)]
        self.num_rows = self.sets[0][0].shape[0]  # what the layer's get_moe_config sees (N under EP)
        self.aligned = {bm: [moe_align(ids, e, bm) for _, _, ids in self.sets] for bm in block_ms}

    def launches(self, kind: str, g: dict, bm: int, act_fp8: bool):
        e, h, inter, top_k = self.shape
        calls = []
        for (x, w_pairs, ids), (sorted_ids, expert_ids, npp) in zip(self.sets, self.aligned[bm]):
            num_pid_m = sorted_ids.numel() // bm
            num_pairs = ids.numel()
            if kind == "up":
                a, a_s = per_token_group_quant(x) if act_fp8 else (x, x)
                out = torch.empty(sorted_ids.numel(), inter, dtype=x.dtype, device=x.device)
                grid = (num_pid_m * triton.cdiv(inter, g["BLOCK_N"]),)
                args = (a, a_s, self.w13, self.s13, out, sorted_ids, expert_ids, npp, num_pairs, h, inter,
                        num_pid_m, top_k, a.stride(0), a_s.stride(0), self.w13.stride(0), self.w13.stride(1),
                        self.s13.stride(0), self.s13.stride(1), out.stride(0))
                meta = {"EVEN_K": h % g["BLOCK_K"] == 0}
                kernel = fm._moe_up_kernel
            else:
                act = torch.randn(sorted_ids.numel(), inter, device=x.device, dtype=x.dtype)
                a, a_s = per_token_group_quant(act) if act_fp8 else (act, act)
                y = torch.empty(num_pairs, h, dtype=x.dtype, device=x.device)
                grid = (num_pid_m * triton.cdiv(h, g["BLOCK_N"]),)
                # (sum_ptr, counter_ptr: unused without FUSED_SUM, the one-token option)
                args = (a, a_s, self.w2, self.s2, y, sorted_ids, expert_ids, npp, w_pairs.reshape(-1), y, ids,
                        num_pairs, inter, h, num_pid_m, a.stride(0), a_s.stride(0), self.w2.stride(0),
                        self.w2.stride(1), self.s2.stride(0), self.s2.stride(1), y.stride(0))
                meta = {"EVEN_K": inter % g["BLOCK_K"] == 0, "FUSED_SUM": False, "TOP_K": 1, "TOP_K_PAD": 1}
                kernel = fm._moe_down_kernel
            meta.update(USE_FP8=self.fp8, ACT_FP8=act_fp8, DIRECT=False, BLOCK_M=bm, BLOCK_N=g["BLOCK_N"],
                        BLOCK_K=g["BLOCK_K"], GROUP_M=g["GROUP_M"], num_warps=g["num_warps"],
                        num_stages=g["num_stages"], **w8_mma_meta(g, self.fp8, act_fp8, self.w13.device))
            calls.append((kernel, grid, args, meta))

        def run() -> None:
            for kernel, grid, args, meta in calls:
                kernel[grid](*args, **meta)

        return run, len(calls)


def _compile_worker(job: tuple) -> str:
    # runs each candidate once on a small problem with the same shapes, filling Triton's disk cache
    shape, dtype, items = job
    try:
        prob = Problem(shape, dtype, 4, sorted({bm for _, _, bm, _ in items}), num_sets=1, real_weights=False)
        for kind, g, bm, act in items:
            try:
                prob.launches(kind, g, bm, act)[0]()
            except Exception:  # noqa: BLE001  e.g. out of shared memory: the timing pass skips it
                pass
        torch.cuda.synchronize()
        return f"{shape}/{dtype}: {len(items)} compiled"
    except Exception as exc:  # noqa: BLE001
        return f"{shape}/{dtype}: compile worker failed: {exc!r}"[:300]


def precompile(shapes: list[str], dtypes: list[str], ms: list[int], jobs: int, ep_size: int = 1) -> None:
    # one compile per distinct binary: shapes share binaries unless EVEN_K differs
    seen: set[str] = set()
    by_problem: dict[tuple[str, str], list] = {}
    for shape in shapes:
        e, h, inter, top_k = SHAPES[shape]
        for dtype in dtypes:
            for m in ms:
                for bm, act in plans(m * ep_size, top_k, e, dtype == "fp8"):  # (tune_shape's plans)
                    for g in candidates(bm, dtype == "fp8", act):
                        for kind in ("up", "down"):
                            even = (h if kind == "up" else inter) % g["BLOCK_K"] == 0
                            key = json.dumps([dtype, kind, g, bm, act, even])
                            if key not in seen:
                                seen.add(key)
                                by_problem.setdefault((shape, dtype), []).append((kind, g, bm, act))
    total = sum(len(v) for v in by_problem.values())
    work = []
    for (shape, dtype), items in by_problem.items():
        step = max(1, -(-total // jobs))
        work += [(shape, dtype, items[i : i + step]) for i in range(0, len(items), step)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(jobs, len(work))) as pool:
        for msg in pool.imap_unordered(_compile_worker, work):
            if "failed" in msg:
                print(msg, flush=True)
    print(f"precompiled {sum(len(w[2]) for w in work)} variants in {time.time() - t0:.0f} s", flush=True)


def time_run(run, n: int) -> float:
    try:
        run()
        torch.cuda.synchronize()
        return bench_graph(run, rep_ms=25) / n
    except Exception as exc:  # noqa: BLE001  out of shared memory etc.: skip the candidate
        print(f"  skip: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        torch.cuda.synchronize()
        return float("inf")


def tune_shape(shape: str, ms: list[int], dtype: str, out: Path, ep_size: int = 1) -> None:
    num_routed, h, inter, top_k = SHAPES[shape]
    e = num_routed // ep_size
    fp8 = dtype == "fp8"
    dtype_name = "fp8" if fp8 else "bfloat16"
    name = config_file_name(e, h, inter, dtype_name, device_name())
    table = {}
    for m in ms:
        # rows per local expert: under EP, ep_size x m tokens routed over all experts (padding rows route nowhere)
        ps = plans(m * ep_size, top_k, num_routed, fp8)
        prob = Problem(shape, dtype, m, sorted({bm for bm, _ in ps}), ep_size=ep_size)
        at = f"M={m}" if ep_size == 1 else f"EP={ep_size} T={m} N={prob.num_rows}"
        quant_us = 0.0
        if fp8:  # the two activation-quant launches that act_fp8 adds
            x = prob.sets[0][0]
            act = torch.randn(prob.aligned[ps[0][0]][0][0].numel(), inter, device=x.device, dtype=x.dtype)
            quant_us = bench_graph(lambda x=x, act=act: (per_token_group_quant(x), per_token_group_quant(act)),
                                   rep_ms=25)
        best = None
        for bm, act_fp8 in ps:
            cands = candidates(bm, fp8, act_fp8)
            up = best_per_mode([time_run(*prob.launches("up", g, bm, act_fp8)) for g in cands], cands, "up")
            down = best_per_mode([time_run(*prob.launches("down", g, bm, act_fp8)) for g in cands], cands, "down")
            total = up[0] + down[0] + (quant_us if act_fp8 else 0.0)
            print(f"  {shape} {dtype} {at} BM={bm} act_fp8={act_fp8}: up {up[0]:.1f} down {down[0]:.1f} "
                  f"total {total:.1f} us", flush=True)
            if best is None or total < best[0]:
                best = (total, {"BLOCK_M": bm, "up": cands[up[1]], "down": cands[down[1]], "act_fp8": act_fp8})
        table[str(prob.num_rows)] = best[1]
        print(f"best {shape} {dtype} {at}: {best[0]:.1f} us {json.dumps(best[1])}", flush=True)
        del prob
        torch.cuda.empty_cache()
        # after every M: a run cut by its timeout keeps what it measured
        (out / "configs").mkdir(parents=True, exist_ok=True)
        (out / "configs" / name).write_text(
            json.dumps(keep_tma_entries(dict(table), *table_in_use(e, h, inter, dtype_name)), indent=1))
    print(f"tune_moe wrote {out / 'configs' / name}", flush=True)


def best_per_mode(times: list[float], cands: list[dict], kind: str) -> tuple[float, int]:
    """(best time, its candidate index); prints the best of each "w8_mma" mode where there are several (the A/B of
    weight-only FP8's MMA modes at the same tile choices)."""
    modes = {g.get("w8_mma") for g in cands}
    if len(modes) > 1:
        for mode in sorted(modes, key=str):
            t, i = min((t, i) for i, (t, g) in enumerate(zip(times, cands)) if g.get("w8_mma") == mode)
            print(f"    {kind} w8_mma={mode}: {t:.1f} us {json.dumps(cands[i])}", flush=True)
    best = min((t, i) for i, t in enumerate(times))
    if best[0] == float("inf"):
        raise RuntimeError(f"tune_moe: every {kind} candidate failed (the skip lines above say why)")
    return best


def table_in_use(num_experts: int, hidden: int, inter: int, dtype: str) -> tuple[Path, bool]:
    """(the table kernels/moe_config.py looks up here for the shape, whether it is another GPU's): this GPU's file,
    else another GPU's, as get_moe_config falls back to (its "tma" entries then stay off)."""
    own = CONFIG_DIR / config_file_name(num_experts, hidden, inter, dtype, device_name())
    others = sorted(CONFIG_DIR.glob(config_file_name(num_experts, hidden, inter, dtype, "*")))
    return (own, False) if own.exists() or not others else (others[0], True)


def keep_tma_entries(table: dict, old_path: Path, foreign: bool = False) -> dict:
    """The table in use with this run's buckets replaced: a tuned bucket keeps the old entry's "tma" and "gemv"
    entries (tune_moe --tma / --gemv measure those; this tuner does not), a bucket not tuned now comes along whole
    (so a run over a few M, e.g. --m 64, gives the whole table to install). foreign (another GPU's table): without
    its "tma" entries, never measured here."""
    if not old_path.exists():
        return table
    for m, cfg in json.loads(old_path.read_text()).items():
        if foreign:
            cfg = {k: v for k, v in cfg.items() if k != "tma"}
        table[m] = dict(table[m], **{k: cfg[k] for k in ("tma", "gemv") if k in cfg}) if m in table else cfg
    return dict(sorted(table.items(), key=lambda kv: int(kv[0])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--shapes", default="qwen3,mixtral,glm45air")
    ap.add_argument("--m", default="1,8,64,256,1024,4096",
                    help="tokens of a step; with --ep tokens a rank (T): the table's buckets are then the rows N "
                         "that the sparse all2all delivers to a rank's local experts in such a step (printed)")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--tma", action="store_true",
                    help="the large-M TMA path vs the old one (default qwen3 bf16 at M 1024,4096,16384)")
    ap.add_argument("--no-gluon", action="store_true", help="with --tma: no Gluon kernel candidates (sm90 only anyway)")
    ap.add_argument("--gemv", action="store_true", help="only time GEMV vs the table at M <= 8 and update it")
    ap.add_argument("--gemv-keep-up", action="store_true",
                    help="with --gemv: the gate_up tile from the table's nearest GEMV entry, only the down GEMM timed")
    ap.add_argument("--ep", type=int, default=1,
                    help="expert-parallel size: tune one rank's local experts (E/EP) on the rows it receives")
    args = ap.parse_args()
    # (--tma's default: qwen3 only)
    shape_names = args.shapes.split(",") if args.shapes != ap.get_default("shapes") or not args.tma else ["qwen3"]
    for shape in shape_names:
        if args.ep < 1 or SHAPES[shape][0] % args.ep:
            ap.error(f"--ep {args.ep}: {shape}'s {SHAPES[shape][0]} experts do not split evenly over {args.ep} ranks")
    if args.ep > 1 and args.gemv:
        ap.error("--gemv does not take --ep (tune_moe_gemv.py builds its own non-EP inputs): tune without --gemv")
    if args.tma:
        from tune_moe_tma import tune_tma

        ms = [int(m) for m in (args.m if args.m != ap.get_default("m") else "1024,4096,16384").split(",")]
        for shape in shape_names:
            for dtype in args.dtypes.split(",") if args.dtypes != ap.get_default("dtypes") else ["bf16"]:
                tune_tma(shape, dtype, ms, Path(args.out), args.jobs, not args.no_gluon, args.ep)
        return
    ms = [int(m) for m in args.m.split(",")]
    shapes, dtypes = shape_names, args.dtypes.split(",")
    if args.gemv:
        from tune_moe_gemv import main_gemv

        return main_gemv(shapes, ms, dtypes, Path(args.out), args.jobs, args.gemv_keep_up)
    t0 = time.time()
    if args.jobs > 1:
        precompile(shapes, dtypes, ms, args.jobs, args.ep)
    for shape in shapes:
        for dtype in dtypes:
            tune_shape(shape, ms, dtype, Path(args.out), args.ep)
    print(f"tune_moe summary: {len(shapes) * len(dtypes)} tables in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
