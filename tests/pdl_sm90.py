"""The decode chain's kernels compiled for sm90 with PDL on and off (no GPU needed): `python tests/pdl_sm90.py`
prints one JSON line {case: {"on": ptx, "off": ptx, "params": [...], "allowed": [...]}} for tests/test_pdl.py.

Each case is a kernel at a Qwen3-30B-A3B decode config (hidden 2048, 32/4 heads of 128, 128 experts top-8, 16-token
pages), with the pointer arguments rule (1) of kernels/pdl.py lets it read before its wait ("allowed": weights,
norm weights). Must run without TRITON_INTERPRET (tests/sm90.py run_sm90_probe).
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from attention_ir import compile_sm90  # noqa: E402

from kernels import (  # noqa: E402
    fp8,
    fused_moe,
    moe_align,
    moe_gemv,
    moe_sum,
    norm,
    router_fused,
    router_norm,
)
from kernels.attention import decode as decode_attention  # noqa: E402
from kernels.attention import qkv_prologue  # noqa: E402
from kernels.linear import gemv as linear_gemv  # noqa: E402
from kernels.linear import w8a8_kernels as fp8_linear_kernels  # noqa: E402

H, INTER, E, TOPK = 2048, 768, 128, 8  # hidden, expert intermediate, experts, top-k
HEADS, KV_HEADS, D, PAGE = 32, 4, 128, 16
QKV = (HEADS + 2 * KV_HEADS) * D


def _prologue(heads: int, kv_heads: int, half: int, rest: int) -> tuple:
    cache = dict(stride_kcb=PAGE * kv_heads * D, stride_kcs=kv_heads * D, stride_kch=D)
    args = dict(qkv_ptr="bf16", pos_ptr="i64", cs_ptr="fp32", qw_ptr="bf16", kw_ptr="bf16", q_ptr="bf16",
                k_cache_ptr="bf16", v_cache_ptr="bf16", slot_ptr="i64", eps=1e-6, inv_k_scale=1.0, inv_v_scale=1.0,
                stride_t=(heads + 2 * kv_heads) * D, stride_qt=heads * D, stride_qh=D, stride_cs=2 * half, **cache,
                stride_vcb=cache["stride_kcb"], stride_vcs=cache["stride_kcs"], stride_vch=D)
    consts = dict(NUM_HEADS=heads, NUM_KV_HEADS=kv_heads, HEAD_DIM=D, HALF=half, BLOCK_SIZE=PAGE, QK_NORM=True,
                  FP8=False, FP8_MAX_C=448.0, BLOCK_H=4, BLOCK_HALF=half, BLOCK_REST=rest, BLOCK_D=D)
    return qkv_prologue._qkv_prologue_kernel, args, consts, 2, 1, ["qw_ptr", "kw_ptr"]


def _router(tokens: int, splits: int, gemv: bool, norm: bool = False) -> tuple:
    args = dict(x_ptr="bf16", w_ptr="bf16", bias_ptr="bf16", partial_ptr="fp32", counter_ptr="i32",
                weights_ptr="fp32", ids_ptr="i32", slots_ptr="i32", res_ptr="bf16", nw_ptr="bf16", x_out_ptr="bf16",
                r_out_ptr="bf16", num_tokens=tokens, stride_x=H, routed_scaling_factor=1.0, stride_r=H, N=H, eps=1e-6)
    consts = dict(HIDDEN=H, NUM_EXPERTS=E, TOP_K=TOPK, SIGMOID_GROUPED=False, NUM_GROUPS=1, TOPK_GROUPS=1,
                  RENORMALIZE=True, HAS_SLOTS=True, NUM_SPLITS=splits, SPLIT_H=H // splits, BLOCK_T=16,
                  TAIL_T=min(16, tokens), BLOCK_E=16, BLOCK_H=128, BLOCK_E_ALL=E, BLOCK_K=TOPK, BLOCK_G=1, GEMV=gemv)
    # the tail route_fused launches at this row count (TAIL_CONFIGS: at one row one warp and the packed top-k)
    tail = router_fused.tail_config(tokens)
    consts.update(PACKED=tail["packed"], KEY16=True, GROUP=E if tail["num_warps"] == 1 else 32)
    if norm:  # the post-attention norm inside (kernels/router_norm.py): h, residual and norm weight after the wait
        warps, _, reps = router_norm.norm_layout(H, torch.bfloat16, torch.device("cuda"))
        consts.update(NORM=True, NORM_BLOCK=H, NORM_W=warps, LOG_W=warps.bit_length() - 1, REPS=reps)
    return router_fused._route_fused_kernel, args, consts, tail["num_warps"], 1, ["w_ptr"]


def _linear(bm: int, bn: int, bk: int, warps: int, stages: int, split: int, dot: int, fp8: bool = False) -> tuple:
    n = QKV
    args = dict(x_ptr="bf16", w_ptr="fp8e4nv" if fp8 else "bf16", ws_ptr="fp32", bias_ptr="bf16", out_ptr="bf16",
                part_ptr="fp32", counter_ptr="i32", M=bm, N=n, K=H, k_per_split=H // split, stride_xm=H, stride_wn=H,
                stride_wsn=H // 128, stride_om=n)
    consts = dict(HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, EVEN_K=True, DOT=dot, IEEE=False,
                  NUM_STAGES=stages, FP8=fp8, WIDEN_ASM=fp8)
    return linear_gemv._gemv_linear_kernel, args, consts, warps, stages, ["w_ptr"]


def _moe_dot(kind: str) -> tuple:
    common = dict(a_scale_ptr="bf16", w_ptr="bf16", w_scale_ptr="bf16", out_ptr="bf16", sorted_ptr="i32",
                  expert_ids_ptr="i32", num_post_pad_ptr="i32", num_pairs=512, NUM_PID_M=64 + E, stride_wse=16,
                  stride_wsn=16)
    flags = dict(USE_FP8=False, ACT_FP8=False, EVEN_K=True, DIRECT=False, BLOCK_M=16, GROUP_M=1)
    if kind == "up":
        args = dict(common, a_ptr="bf16", K=H, INTER=INTER, top_k=TOPK, stride_at=H, stride_ast=H,
                    stride_we=2 * INTER * H, stride_wn=H, stride_ot=INTER)
        return fused_moe._moe_up_kernel, args, dict(flags, BLOCK_N=32, BLOCK_K=256), 4, 3, []
    args = dict(common, a_ptr="bf16", topk_weights_ptr="fp32", sum_ptr="bf16", counter_ptr="i32", K=INTER, N=H,
                stride_at=INTER, stride_ast=INTER, stride_we=H * INTER, stride_wn=INTER, stride_ot=H)
    return (fused_moe._moe_down_kernel, args, dict(flags, BLOCK_N=64, BLOCK_K=128, FUSED_SUM=False, TOP_K=1,
                                                   TOP_K_PAD=1), 4, 4, [])


def _fp8_linear() -> dict[str, tuple]:
    n = QKV
    out = dict(bias_ptr="bf16", out_ptr="bf16", part_ptr="fp32", counter_ptr="i32", N=n, K=H, stride_om=n)
    quant = dict(FP8_MAX_C=448.0, MIN_SCALE=1e-12)
    fp8k = fp8_linear_kernels
    return {
        "fp8_group_quant": (fp8._group_quant_kernel, dict(x_ptr="bf16", q_ptr="fp8e4nv", s_ptr="fp32", num_rows=64, K=H,
                                                          stride_x=H, stride_q=H, stride_s=H // 128, stride_sg=1),
                            dict(GROUP=128, BLOCK_R=16, **quant), 4, 1, []),
        "fp8_dot_decode": (fp8k._w8a8_dot_kernel, dict(out, a_ptr="bf16", a_scale_ptr="bf16", w_ptr="fp8e4nv",
                                                       w_scale_ptr="fp32", M=1, k_blocks_per_split=8, split_k=2,
                                                       group_m=1, stride_am=H, stride_asm=H, stride_wn=H,
                                                       stride_wsn=H // 128),
                           dict(HAS_BIAS=False, BLOCK_M=16, BLOCK_N=128, SPLIT_MODE=2, QUANT_A=True, SWAP_AB=True,
                                **quant), 4, 3, []),
        "fp8_dot_tma": (fp8k._w8a8_dot_tma_kernel, dict(out, a_desc="tensordesc<fp8e4nv[64, 128]>",
                                                        w_desc="tensordesc<fp8e4nv[128, 128]>", a_scale_ptr="fp32",
                                                        w_scale_ptr="fp32", M=128, k_blocks_per_split=16, split_k=1,
                                                        group_m=8, stride_asm=H // 128, stride_wsn=H // 128),
                        dict(HAS_BIAS=False, BLOCK_M=64, BLOCK_N=128, SPLIT_MODE=0), 4, 4, []),
        "fp8_gemv": (fp8k._w8a8_gemv_kernel, dict(out, a_ptr="bf16", w_ptr="fp8e4nv", w_scale_ptr="fp32", M=1,
                                                  k_blocks_per_split=4, split_k=4, stride_am=H, stride_wn=H,
                                                  stride_wsn=H // 128),
                     dict(HAS_BIAS=False, BLOCK_M=1, BLOCK_N=64, SPLIT_MODE=1, **quant), 4, 1, ["w_ptr"]),
        "fp8_split_k_reduce": (fp8k._split_k_reduce_kernel, dict(part_ptr="fp32", bias_ptr="bf16", out_ptr="bf16",
                                                                 numel=n, N=n),
                               dict(SPLIT_K=4, HAS_BIAS=True, BLOCK=1024), 4, 1, []),
    }


def cases() -> dict[str, tuple]:
    """name: (kernel, args, constexprs without PDL, num_warps, num_stages, pointers allowed before the wait)."""
    decode_args = dict(q_ptr="bf16", k_cache_ptr="bf16", v_cache_ptr="bf16", seq_lens_ptr="i32",
                       block_tables_ptr="i32", out_ptr="bf16", part_out_ptr="fp32", part_lse_ptr="fp32",
                       counter_ptr="i32", qk_scale=0.1, v_scale=1.0, num_splits=32, stride_qb=HEADS * D, stride_qh=D,
                       stride_cb=PAGE * KV_HEADS * D, stride_cs=KV_HEADS * D, stride_ch=D, stride_bt=2048,
                       stride_ob=HEADS * D, stride_oh=D)
    decode_consts = dict(NUM_HEADS=HEADS, NUM_KV_HEADS=KV_HEADS, GROUP=HEADS // KV_HEADS, GROUP_PAD=16, HEAD_DIM=D,
                         BLOCK_D=D, BLOCK_SIZE=PAGE, BLOCK_N=32, SPLITS_PAD=2, FUSED_MERGE=False, FP8_AS_F16=False,
                         OFF64=False)
    # the attention prologue fused in (kernels/attention/decode_fused.py): q_ptr is the QKV row; the q/k norm weights
    # are read after the wait too (nothing before it)
    prologue_args = dict(decode_args, stride_qb=QKV, pos_ptr="i64", cs_ptr="fp32", qw_ptr="bf16", kw_ptr="bf16",
                         slot_ptr="i64", eps=1e-6, inv_k_scale=1.0, inv_v_scale=1.0, stride_cos=D)
    prologue_consts = dict(decode_consts, BLOCK_N=64, PROLOGUE=True, HALF=D // 2, QK_NORM=True, FP8_KV=False)
    decode_consts.update(dict.fromkeys(decode_attention._NO_PROLOGUE))
    fp8_cache = dict(k_cache_ptr="fp8e4nv", v_cache_ptr="fp8e4nv")
    fp8_early = dict(BLOCK_N=128, FP8_DOT=2, FP8_Q2=True, EARLY_INPUTS=True)
    early = ["seq_lens_ptr", "block_tables_ptr", "LOADED"]  # the page ids: addresses from the loaded lengths
    wt = dict(w_ptr="bf16", ws_ptr="bf16", ids_ptr="i32", num_pairs=TOPK, stride_wse=16, stride_wsn=16)
    gemv = dict(USE_FP8=False, EVEN_K=True, BLOCK_N=16, NUM_STAGES=1)
    norm_args = dict(x_ptr="bf16", res_ptr="bf16", w_ptr="bf16", out_ptr="bf16", res_out_ptr="bf16", ids_ptr="i32",
                     extra_ptr="bf16", N=H, eps=1e-6, stride_x=H, stride_r=H, stride_o=H, stride_ro=H, stride_e=H)
    return {
        "rms_norm": (norm._rms_norm_kernel, norm_args, dict(HAS_RESIDUAL=True, BLOCK=H), 4, 1, ["w_ptr"]),
        # the MoE top-k sum (+ shared experts) fused in: the slots' rows and ids only after the wait
        "rms_norm_topk": (norm._rms_norm_kernel, norm_args, dict(HAS_RESIDUAL=True, BLOCK=H, TOP_K=TOPK,
                                                                 HAS_EXTRA=True), 4, 1, ["w_ptr"]),
        "qkv_prologue": _prologue(HEADS, KV_HEADS, D // 2, 0),
        "qkv_prologue_partial_rotary": _prologue(96, 8, D // 4, D // 2),
        "decode_attention": (decode_attention._decode_kernel, decode_args, decode_consts, 4, 3, []),
        "decode_attention_prologue": (decode_attention._decode_kernel, prologue_args, prologue_consts, 4, 3, []),
        # the config's early_inputs (the H200 table's FP8-cache small-batch config): the step's lengths, table row
        # and first page ids before the wait (rule (1)); q, the QKV row and the cache after it
        "decode_attention_early_fp8": (decode_attention._decode_kernel, dict(decode_args, **fp8_cache),
                                       dict(decode_consts, **fp8_early), 4, 3, early),
        "decode_attention_prologue_early_fp8": (decode_attention._decode_kernel, dict(prologue_args, **fp8_cache),
                                                dict(prologue_consts, FP8_KV=True, **fp8_early), 4, 3, early),
        "decode_reduce": (decode_attention._reduce_kernel, dict(part_out_ptr="fp32", part_lse_ptr="fp32",
                                                                out_ptr="bf16", num_splits=32, stride_ob=HEADS * D,
                                                                stride_oh=D),
                          dict(NUM_HEADS=HEADS, HEAD_DIM=D, BLOCK_D=32, SPLITS_PAD=32), 4, 1, []),
        "router_m1": _router(1, 16, True),
        "router_m64": _router(64, 4, False),
        "router_norm_m1": _router(1, 16, True, norm=True),
        "router_norm_m8": _router(8, 8, False, norm=True),
        "router_norm_m16": _router(16, 4, False, norm=True),
        "linear_gemv_fma": _linear(1, 32, 256, 4, 1, 4, 0),
        "linear_gemv_dot": _linear(16, 64, 128, 4, 3, 4, 1),
        "linear_gemv_fp8_fma": _linear(1, 32, 256, 4, 1, 4, 0, fp8=True),
        "linear_gemv_fp8_dot": _linear(16, 64, 128, 4, 3, 4, 1, fp8=True),
        "moe_gemv_up": (moe_gemv._gemv_up_kernel, dict(wt, x_ptr="bf16", out_ptr="bf16", w2_ptr="bf16", K=H,
                                                       INTER=INTER, top_k=TOPK, stride_xt=H, stride_we=2 * INTER * H,
                                                       stride_wn=H, stride_ot=INTER, stride_w2e=H * INTER),
                        dict(gemv, BLOCK_K=512, PREFETCH=True, PIECES=128), 4, 1, []),
        "moe_gemv_down": (moe_gemv._gemv_down_kernel, dict(wt, a_ptr="bf16", y_ptr="bf16", topk_weights_ptr="fp32",
                                                           sum_ptr="bf16", counter_ptr="i32", K=INTER, N=H,
                                                           stride_at=INTER, stride_we=H * INTER, stride_wn=INTER,
                                                           stride_yt=H),
                          dict(gemv, BLOCK_K=256, FUSED_SUM=True, TOP_K=TOPK, TOP_K_PAD=TOPK), 4, 1,
                          ["ids_ptr", "w_ptr", "LOADED"]),  # rule (1'): the router's ids, two kernels back
        "moe_gemv_down_topk": (moe_gemv._gemv_down_topk_kernel,
                               dict(w_ptr="bf16", ws_ptr="bf16", ids_ptr="i32", a_ptr="bf16", out_ptr="bf16",
                                    topk_weights_ptr="fp32", num_tokens=1, K=INTER, N=H, stride_at=INTER,
                                    stride_we=H * INTER, stride_wn=INTER, stride_wse=16, stride_wsn=16, stride_ot=H),
                               dict(gemv, BLOCK_N=2, BLOCK_K=256, TOP_K=TOPK, TOP_K_PAD=TOPK), 4, 1,
                               ["ids_ptr", "w_ptr", "LOADED"]),  # rule (1'): the router's ids, two kernels back
        "moe_sum": (moe_sum._moe_sum_kernel, dict(y_ptr="bf16", ids_ptr="i32", out_ptr="bf16", N=H),
                    dict(TOP_K=TOPK, BLOCK_N=1024), 4, 1, []),
        "align_small": (moe_align._align_small_kernel, dict(ids_ptr="i32", sorted_ptr="i32", expert_ids_ptr="i32",
                                                            num_post_pad_ptr="i32", num_pairs=64, num_blocks=68),
                        dict(NUM_EXPERTS=E, BLOCK_M=16, N_PAD=64, E_PAD=E, FILL=1024), 8, 1, []),
        "align_count": (moe_align._align_count_kernel, dict(ids_ptr="i32", chunk_counts_ptr="i32", sorted_ptr="i32",
                                                            ends_ptr="i32", num_post_pad_ptr="i32", counter_ptr="i32",
                                                            num_pairs=512, sorted_len=2560, fill_per_program=1280,
                                                            num_chunks=2),
                        dict(NUM_EXPERTS=E, BLOCK_M=16, E_PAD=E, CHUNK=256, ROWS=32, SCAN=True), 4, 1, []),
        "align_scatter": (moe_align._align_scatter_kernel, dict(ids_ptr="i32", chunk_counts_ptr="i32",
                                                                sorted_ptr="i32", expert_ids_ptr="i32", ends_ptr="i32",
                                                                num_post_pad_ptr="i32", num_pairs=512, num_chunks=2,
                                                                num_blocks=160),
                          dict(NUM_EXPERTS=E, BLOCK_M=16, E_PAD=E, CHUNK=256, ROWS=32, SCAN=True), 8, 1, []),
        "align_scatter_sort": (moe_align._align_scatter_kernel, dict(ids_ptr="i32", chunk_counts_ptr="i32",
                                                                     sorted_ptr="i32", expert_ids_ptr="i32",
                                                                     ends_ptr="i32", num_post_pad_ptr="i32",
                                                                     num_pairs=4096, num_chunks=4, num_blocks=376),
                               dict(NUM_EXPERTS=E, BLOCK_M=16, E_PAD=E, CHUNK=1024, ROWS=32, SCAN=False, SORT=True),
                               8, 1, []),  # the sort rank (kernels/moe_align.py _scatter_sorted)
        "fused_moe_up": _moe_dot("up"),
        "fused_moe_down": _moe_dot("down"),
        **_fp8_linear(),
    }


def _compile(case: tuple, pdl: bool | None) -> str:
    kernel, args, consts, warps, stages, _ = case
    if pdl is not None:
        consts = dict(consts, PDL=pdl)
    return compile_sm90(kernel, args, consts, warps, stages).asm["ptx"]


def main() -> None:
    todo = cases()
    with ThreadPoolExecutor(4) as pool:  # ptxas runs as a subprocess: threads overlap it
        on = {name: pool.submit(_compile, case, True) for name, case in todo.items()}
        off = {name: pool.submit(_compile, case, False) for name, case in todo.items()}
        out = {name: {"kernel": case[0].fn.__name__, "on": on[name].result(), "off": off[name].result(),
                      "allowed": case[5],
                      "params": [a for a in case[0].arg_names if a in case[1]]} for name, case in todo.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
