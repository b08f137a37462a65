"""The large-M MoE grouped GEMM in Gluon for FP8 block-scaled experts (e4m3 activations and weights, sm90).

kernels/moe_gluon.py's persistent warp-specialized kernel (its load partition, tile order, rings and barrier
protocol unchanged: the stage bytes are the fp8 boxes) with DeepGEMM-style "promotion" in the MMA partition:
the operands carry one scale per 128 K channels (a_scale [rows, K/128] per token group, w_scale
[E, W_ROWS/128, K/128] per 128 x 128 weight block, HF weight_scale_inv), so BLOCK_K = 128 and every K step's
product needs its own scale before it joins the sum. Triton's `acc += dot(a, w) * a_s * w_s` waits on every
wgmma (pendings 0); here each wgmma writes a fresh fp32 partial (use_acc=False), and while the next wgmma runs
the partition adds the previous finished partial into its sum, scaled by a_scale[row, k] * w_scale[e, n / 128,
k]: two partials alternate and every warpgroup_mma_wait keeps one MMA in flight (pendings 1). gate_up
interleaves its gate and up MMAs (gate k runs while up k - 1 is promoted, up k while gate k is), so its two
sums and two partials are four register tiles; down alternates its two partials by K step (three tiles).
The K loop is unrolled k_chunk steps at a time (a runtime loop over chunks, each ending with a wait of 0):
ptxas serializes every wgmma when a partial in flight over a loop's back edge is read after a wait of 1
(C7514; benchmarks/moe_gluon_ir.py repro-back-edge), and fully unrolled the steps' addresses spill. So the
binary is specialized to K_TILES = ceil(K / 128) (two per model). Registers: the sums and partials take
128 a thread at BLOCK_N 64 (the MMA partition has 240 with the load warpgroup cut to 24); BLOCK_N 128 would
need 192 (down) or 256 (gate_up) and spills, so both GEMMs run 64-wide tiles (fp8 wgmma m64n64k32 from shared
memory is near its shared-memory bandwidth: a register-A wgmma or a split 128-wide tile are the next steps).
The scales are plain loads by the MMA partition, issued a K step ahead (under the previous step's MMAs):
a_scale's rows of the thread's accumulator (two a warp's 16 rows), w_scale one scalar a K step (BLOCK_N
divides the 128-row scale block; gate_up's up tile is row block (N + n) / 128, which needs N a multiple of BLOCK_N).
Output bf16/fp16; fused_experts_tma quantizes the down GEMM's input per token group between the GEMMs
(per_token_group_quant) as on the Triton path.

Gluon has no interpreter: tests/test_kernels_moe_gluon_fp8.py compiles this for sm90 on the CPU
(benchmarks/moe_gluon_ir.py up|down --fp8 --k-tiles N prints the report); outputs are compared with the
Triton path and grouped_gemm_fp8_ref on a GPU.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kernels.fp8 import FP8_BLOCK, FP8_DTYPE, per_token_group_quant
from kernels.moe_gluon import (
    _GL_DTYPES,
    SHARED_LIMIT,
    _load_partition,
    _store_tile,
    _tile_coords,
    check_gluon_config,
    launch_meta,
)

# fp32 accumulator registers a thread of the MMA partition may hold (the sums and two partials): more spills
FP8_ACC_REGS = 128


@gluon.jit
def _after(x, dep):
    # x's values, as fresh registers defined after dep (an elementwise mov that ptxas coalesces away). The partial
    # a wgmma overwrites (use_acc=False, still an in-out operand) goes through this with the sum it was added
    # to, so that the add stays above the wgmma: in a rolled loop LLVM sank it below, kept the old partial alive
    # in copies, and ptxas serialized every wgmma (C7514). (Unrolled, the SASS is the same either way.)
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [x, dep], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _fp8_steps(k0, pos, acc, acc_up, x, y, a_bufs, w_bufs, ready_bars, empty_bars, as_ptrs, ws_ptr, wsu_ptr,
               a_n, w_n, wu_n, SILU_MUL: gl.constexpr, FIRST: gl.constexpr, RING: gl.constexpr,
               NSTEPS: gl.constexpr, K_TILES: gl.constexpr):
    # K steps k0 .. k0 + NSTEPS - 1 (ring position pos + k), straight-line (gl.static_range), their wgmma
    # waits keeping one MMA in flight, all of them finished, promoted and their stages released at the end.
    # Straight-line because ptxas cannot follow wgmma groups across a loop's back edge: a partial read there
    # after a wait of pendings 1 makes it serialize every wgmma (C7514). Chunks, not the whole K loop: the
    # unrolled steps' addresses, computed early, spill past ~4 steps of gate_up.
    # x, y: the two partials. SILU_MUL: x takes every gate MMA, y every up MMA, interleaved (gate k, then up
    # k - 1 promoted under it; up k, then gate k promoted under it): four register tiles with the sums, not
    # six. Else they alternate by K step (renamed at compile time), the previous step's promoted under this one.
    # a_n, w_n, wu_n: step k0's scales, loaded a step ahead (a load issued under its own step's gate MMA, ~500
    # cycles from L2, came back after that ~130-cycle m64n64k128 wgmma and held up its promotion); returned: step
    # k0 + NSTEPS's (the last step's again at the end of K: no load past the scale rows)
    W_PER_STAGE: gl.constexpr = 2 if SILU_MUL else 1
    a_s = a_n  # (placeholders until the first step sets them)
    w_s = w_n
    wu_s = wu_n
    for i in gl.static_range(NSTEPS):
        k = k0 + i
        s = FIRST + (pos + k) % RING
        mbarrier.wait(ready_bars.index(s), ((pos + k) // RING) & 1)
        a = a_bufs.index(s)
        # x's last partial is in acc (_after: not before that add); use_acc=False: its registers are not read
        x = warpgroup_mma(a, w_bufs.index(s * W_PER_STAGE).permute((1, 0)), _after(x, acc), use_acc=False,
                          is_async=True)
        a_s_cur = a_n  # this step's scales (loaded a step ahead); the next step's load under this step's MMAs
        w_s_cur = w_n
        k_next = gl.minimum(k + 1, K_TILES - 1)
        a_n = gl.load(as_ptrs + k_next)
        w_n = gl.load(ws_ptr + k_next)
        if SILU_MUL:
            wu_s_cur = wu_n
            wu_n = gl.load(wsu_ptr + k_next)
            if i > 0:  # the previous step's up MMA is done (so is its stage): promote it
                x, y = warpgroup_mma_wait(1, deps=(x, y))
                mbarrier.arrive(empty_bars.index(FIRST + (pos + k - 1) % RING))
                acc_up += y * (a_s * wu_s)[:, None]
            y = warpgroup_mma(a, w_bufs.index(s * 2 + 1).permute((1, 0)), _after(y, acc_up), use_acc=False,
                              is_async=True)
            y, x = warpgroup_mma_wait(1, deps=(y, x))  # this step's gate MMA is done: promote it
            acc += x * (a_s_cur * w_s_cur)[:, None]
            wu_s = wu_s_cur
        else:
            if i > 0:  # the previous step's MMA is done: release its stage, promote it
                x, y = warpgroup_mma_wait(1, deps=(x, y))
                mbarrier.arrive(empty_bars.index(FIRST + (pos + k - 1) % RING))
                acc += y * (a_s * w_s)[:, None]
            x, y = y, x  # y: the MMA in flight
        a_s = a_s_cur
        w_s = w_s_cur
    # y: the last MMA in flight (SILU_MUL: the last up MMA)
    y = warpgroup_mma_wait(0, deps=(y,))
    mbarrier.arrive(empty_bars.index(FIRST + (pos + k0 + NSTEPS - 1) % RING))
    if SILU_MUL:
        acc_up += y * (a_s * wu_s)[:, None]
    else:
        acc += y * (a_s * w_s)[:, None]
    return acc, acc_up, x, y, a_n, w_n, wu_n


@gluon.jit
def _fp8_mma_partition(out_desc, a_bufs, w_bufs, c_bufs, ready_bars, empty_bars, a_scale_ptr, w_scale_ptr,
                       expert_ids_ptr, num_post_pad_ptr, N, stride_as, stride_wse, stride_wsn,
                       SILU_MUL: gl.constexpr, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr, PART: gl.constexpr,
                       NUM_PARTS: gl.constexpr, MMA_WARPS: gl.constexpr, K_TILES: gl.constexpr,
                       K_CHUNK: gl.constexpr):
    # K_TILES = ceil(K / 128) K steps a tile, K_CHUNK of them straight-line at a time (_fp8_steps)
    BLOCK_M: gl.constexpr = out_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = out_desc.block_type.shape[1]
    RING: gl.constexpr = a_bufs.shape[0] // NUM_PARTS
    FIRST: gl.constexpr = PART * RING
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[MMA_WARPS, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)  # a thread's accumulator rows
    c_smem = c_bufs.index(PART)
    num_pid_m = gl.load(num_post_pad_ptr) // BLOCK_M
    num_pid_n = gl.cdiv(N, BLOCK_N)
    pos = 0  # K steps through this partition's ring so far
    for tile in range(gl.program_id(0) + PART * NUM_SMS, num_pid_m * num_pid_n, NUM_PARTS * NUM_SMS):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        e = gl.load(expert_ids_ptr + pid_m).to(gl.int64)
        rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_layout)
        as_ptrs = a_scale_ptr + rows.to(gl.int64) * stride_as  # [BLOCK_M] this tile's rows' scales at k = 0
        ws_ptr = w_scale_ptr + e * stride_wse + (pid_n * BLOCK_N // 128) * stride_wsn  # the gate / down block
        wsu_ptr = w_scale_ptr + e * stride_wse + ((N + pid_n * BLOCK_N) // 128) * stride_wsn  # the up block
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        acc_up = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        x = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        y = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        a_n = gl.load(as_ptrs)  # the first K step's scales (then each step loads the next's)
        w_n = gl.load(ws_ptr)
        wu_n = gl.load(wsu_ptr) if SILU_MUL else w_n
        for c in range(K_TILES // K_CHUNK):
            acc, acc_up, x, y, a_n, w_n, wu_n = _fp8_steps(c * K_CHUNK, pos, acc, acc_up, x, y, a_bufs, w_bufs,
                                                           ready_bars, empty_bars, as_ptrs, ws_ptr, wsu_ptr, a_n, w_n,
                                                           wu_n, SILU_MUL, FIRST, RING, K_CHUNK, K_TILES)
        if K_TILES % K_CHUNK:
            acc, acc_up, x, y, a_n, w_n, wu_n = _fp8_steps(K_TILES // K_CHUNK * K_CHUNK, pos, acc, acc_up, x, y,
                                                           a_bufs, w_bufs, ready_bars, empty_bars, as_ptrs, ws_ptr,
                                                           wsu_ptr, a_n, w_n, wu_n, SILU_MUL, FIRST, RING,
                                                           K_TILES % K_CHUNK, K_TILES)
        pos += K_TILES
        _store_tile(acc, acc_up, c_smem, out_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, SILU_MUL)
    tma.store_wait(0)


@gluon.jit
def _grouped_gemm_fp8_ws_kernel(a_desc, w_desc, out_desc, a_scale_ptr, w_scale_ptr, expert_ids_ptr,
                                num_post_pad_ptr, N, W_ROWS, stride_as, stride_wse, stride_wsn,
                                SILU_MUL: gl.constexpr, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr,
                                NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr, LOAD_REGS: gl.constexpr,
                                MMA_REGS: gl.constexpr, K_TILES: gl.constexpr, K_CHUNK: gl.constexpr,
                                num_warps: gl.constexpr):
    # a_desc e4m3 [rows, K] box [BLOCK_M, 128]; w_desc e4m3 [E * W_ROWS, K] box [BLOCK_N, 128]; out_desc
    # [rows, N] bf16/fp16 box [BLOCK_M, BLOCK_N]; a_scale [rows, ceil(K / 128)] fp32 (row stride stride_as);
    # w_scale [E, ceil(W_ROWS / 128), ceil(K / 128)] fp32 (strides stride_wse, stride_wsn, 1).
    # out[p, n] = sum_k (a[p, k-group] . w[e, n, k-group]) * a_scale[p, k] * w_scale[e, n / 128, k], or
    # SILU_MUL silu(that) * (the same for row N + n); moe_gluon's kernel says the rest (tails, tiles, rings).
    NUM_PARTS: gl.constexpr = 2 if PINGPONG else 1
    W_PER_STAGE: gl.constexpr = 2 if SILU_MUL else 1
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES * W_PER_STAGE] + w_desc.block_type.shape,
                                       w_desc.layout)
    c_bufs = gl.allocate_shared_memory(out_desc.dtype, [NUM_PARTS] + out_desc.block_type.shape, out_desc.layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=1)
    if PINGPONG:  # (the 4-warp MMA worker first: its warps start on a warpgroup boundary, as wgmma needs)
        gl.warp_specialize([
            (_fp8_mma_partition, (out_desc, a_bufs, w_bufs, c_bufs, ready_bars, empty_bars, a_scale_ptr,
                                  w_scale_ptr, expert_ids_ptr, num_post_pad_ptr, N, stride_as, stride_wse, stride_wsn,
                                  SILU_MUL, GROUP_M, NUM_SMS, 0, 2, num_warps, K_TILES, K_CHUNK)),
            (_fp8_mma_partition, (out_desc, a_bufs, w_bufs, c_bufs, ready_bars, empty_bars, a_scale_ptr,
                                  w_scale_ptr, expert_ids_ptr, num_post_pad_ptr, N, stride_as, stride_wse, stride_wsn,
                                  SILU_MUL, GROUP_M, NUM_SMS, 1, 2, num_warps, K_TILES, K_CHUNK)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, expert_ids_ptr,
                               num_post_pad_ptr, N, W_ROWS, SILU_MUL, GROUP_M, NUM_SMS, 2)),
        ], [num_warps, 1], [MMA_REGS, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_fp8_mma_partition, (out_desc, a_bufs, w_bufs, c_bufs, ready_bars, empty_bars, a_scale_ptr,
                                  w_scale_ptr, expert_ids_ptr, num_post_pad_ptr, N, stride_as, stride_wse, stride_wsn,
                                  SILU_MUL, GROUP_M, NUM_SMS, 0, 1, num_warps, K_TILES, K_CHUNK)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, expert_ids_ptr,
                               num_post_pad_ptr, N, W_ROWS, SILU_MUL, GROUP_M, NUM_SMS, 1)),
        ], [1], [LOAD_REGS])


def fp8_shared_bytes(block_m: int, g: dict, silu_mul: bool) -> int:
    """The FP8 kernel's shared memory: the e4m3 operand ring, the 16-bit output tile(s), two barriers a stage."""
    bn, bk, stages = g["BLOCK_N"], g["BLOCK_K"], g["num_stages"]
    c_tiles = 2 if g.get("pingpong") else 1
    return stages * (block_m * bk + (2 if silu_mul else 1) * bn * bk) + c_tiles * block_m * bn * 2 + 16 * stages


def fp8_acc_regs(block_m: int, g: dict, silu_mul: bool) -> int:
    """fp32 accumulator registers a thread of an MMA partition: the sum (gate_up: two) and two partials."""
    return (4 if silu_mul else 3) * block_m * g["BLOCK_N"] // (32 * g.get("num_warps", 8))


def check_gluon_fp8_config(block_m: int, g: dict, silu_mul: bool) -> None:
    """A bad FP8 config: one line saying which key and what it must be (ValueError)."""
    # the keys, warps, stages as for bf16 (shared memory: below); k_chunk: K steps unrolled at a time
    check_gluon_config(block_m, {k: v for k, v in g.items() if k != "k_chunk"}, silu_mul, elem=1)
    if not 1 <= g.get("k_chunk", 4) <= 8:
        raise ValueError(f"gluon FP8 MoE GEMM: k_chunk {g.get('k_chunk')}: need 1..8 (K steps unrolled at a time)")
    if g["BLOCK_K"] != FP8_BLOCK or g["BLOCK_N"] not in (64, 128):
        raise ValueError(f"gluon FP8 MoE GEMM: BLOCK_K {g['BLOCK_K']} / BLOCK_N {g['BLOCK_N']}: need BLOCK_K "
                         f"{FP8_BLOCK} (one scale group a K step) and BLOCK_N 64 or 128 (one weight scale a step)")
    if (smem := fp8_shared_bytes(block_m, g, silu_mul)) > SHARED_LIMIT:
        raise ValueError(f"gluon FP8 MoE GEMM: {smem} bytes of shared memory over the {SHARED_LIMIT} a block may "
                         "hold: fewer num_stages or a smaller BLOCK_N")
    if (regs := fp8_acc_regs(block_m, g, silu_mul)) > FP8_ACC_REGS:
        raise ValueError(f"gluon FP8 MoE GEMM: a {block_m} x {g['BLOCK_N']} tile needs {regs} accumulator registers "
                         f"a thread ({'two sums' if silu_mul else 'a sum'} and two partials), over "
                         f"{FP8_ACC_REGS}: a smaller BLOCK_N or BLOCK_M 64 with 4 warps")


def default_gluon_fp8_config(min_rows: int = 0, block_m: int = 128, pingpong: bool = False) -> dict:
    """A sane FP8 "tma" entry for the Gluon kernel (the H200 Qwen3-30B-A3B FP8 table's: sessions 12-13):
    BLOCK_K 128, the widest BLOCK_N whose sums and partials fit FP8_ACC_REGS, as many stages (<= 8) as fit."""
    if pingpong and block_m != 64:  # a 4-warp partition's 128 rows: twice the accumulator registers a thread
        raise ValueError("the gluon FP8 MoE GEMM's ping-pong takes BLOCK_M 64 (a warpgroup's 64 rows a tile)")
    warps = 4 if pingpong or block_m == 64 else 8
    cfg = {"min_rows": min_rows, "BLOCK_M": block_m, "gluon": 1}
    for kind, silu_mul in (("up", True), ("down", False)):
        # k_chunk: the most K steps unrolled without spills at every K of Qwen3-30B-A3B / GLM-4.5-Air (16 / 32
        # up, 6 / 11 down), with the load warpgroup's registers cut to setmaxnreg's least (24: it holds a few
        # coordinates) so that the MMA partition gets 240
        g = {"BLOCK_N": 128, "BLOCK_K": FP8_BLOCK, "GROUP_M": 8, "num_stages": 8, "num_warps": warps,
             "pingpong": pingpong, "k_chunk": 3 if silu_mul else 4, "load_regs": 24}
        while fp8_acc_regs(block_m, g, silu_mul) > FP8_ACC_REGS:
            g["BLOCK_N"] //= 2
        while fp8_shared_bytes(block_m, g, silu_mul) > SHARED_LIMIT:
            g["num_stages"] -= 2 if pingpong else 1
        cfg[kind] = g
    return cfg


def fp8_launch_meta(g: dict, k_tiles: int) -> dict:
    """moe_gluon.launch_meta's constexprs and options plus the K loop's: K_TILES = ceil(K / 128), K_CHUNK."""
    return dict(launch_meta(g), K_TILES=k_tiles, K_CHUNK=min(g.get("k_chunk", 4), k_tiles))


def fp8_launch_args(
    a: torch.Tensor,  # [rows, K] e4m3, rows a multiple of block_m, expert-contiguous blocks
    a_scale: torch.Tensor,  # [rows, ceil(K / 128)] fp32
    w: torch.Tensor,  # [E * w_rows, K] e4m3
    w_scale: torch.Tensor,  # [E, ceil(w_rows / 128), ceil(K / 128)] fp32
    out: torch.Tensor,  # [rows, N] bf16/fp16
    expert_ids: torch.Tensor,  # [rows // block_m] int32, from moe_align
    num_post_pad: torch.Tensor,  # [1] int32
    n: int, w_rows: int, silu_mul: bool, block_m: int, g: dict, num_sms: int,
) -> tuple[tuple[int], tuple, dict]:
    """The FP8 kernel's grid, arguments and keyword arguments (checked)."""
    if a.dtype != FP8_DTYPE or w.dtype != FP8_DTYPE or out.dtype not in _GL_DTYPES:
        raise ValueError(f"the gluon FP8 MoE GEMM takes e4m3 operands and a bf16/fp16 output, got {a.dtype}, "
                         f"{w.dtype}, {out.dtype}")
    check_gluon_fp8_config(block_m, g, silu_mul)
    rows, k = a.shape
    ks = triton.cdiv(k, FP8_BLOCK)
    if a_scale.shape != (rows, ks) or a_scale.dtype != torch.float32 or a_scale.stride(1) != 1 \
            or w_scale.dtype != torch.float32 or w_scale.shape[1:] != (triton.cdiv(w_rows, FP8_BLOCK), ks) \
            or w_scale.stride(2) != 1:
        raise ValueError(f"the gluon FP8 MoE GEMM needs fp32 a_scale [{rows}, {ks}] and w_scale "
                         f"[E, {triton.cdiv(w_rows, FP8_BLOCK)}, {ks}], got {list(a_scale.shape)} / "
                         f"{list(w_scale.shape)}")
    if silu_mul and n % g["BLOCK_N"]:  # an up tile must sit in one 128-row scale block
        raise ValueError(f"the gluon FP8 MoE GEMM's gate_up needs the intermediate size {n} a multiple of BLOCK_N "
                         f"{g['BLOCK_N']} (the up rows' weight scale block)")
    for name, t in (("activations", a), ("weights", w), ("output", out)):
        if t.stride(1) != 1 or t.stride(0) * t.element_size() % 16 or t.data_ptr() % 16:
            raise ValueError(f"the gluon FP8 MoE GEMM's {name} {list(t.shape)} (strides {t.stride()}) need contiguous "
                             "rows with a 16-byte aligned base and row stride (TMA): K a multiple of 16, N of 8")
    bn, bk = g["BLOCK_N"], g["BLOCK_K"]

    def desc(t: torch.Tensor, box: list[int]) -> TensorDescriptor:
        dt = gl.float8e4nv if t.dtype == FP8_DTYPE else _GL_DTYPES[t.dtype]
        return TensorDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, dt))

    max_tiles = rows // block_m * triton.cdiv(n, bn)
    grid = (max(1, min(num_sms, max_tiles)),)
    args = (desc(a, [block_m, bk]), desc(w, [bn, bk]), desc(out, [block_m, bn]), a_scale, w_scale, expert_ids,
            num_post_pad, n, w_rows, a_scale.stride(0), w_scale.stride(0), w_scale.stride(1))
    return grid, args, dict(SILU_MUL=silu_mul, NUM_SMS=num_sms, **fp8_launch_meta(g, ks))


def grouped_gemm_gluon_fp8(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor,
    expert_ids: torch.Tensor, num_post_pad: torch.Tensor, n: int, w_rows: int, silu_mul: bool, block_m: int, g: dict,
    num_sms: int | None = None,
) -> None:
    """out = the FP8 block-scaled grouped GEMM (fp8_launch_args' shapes)."""
    if a.device.type != "cuda":
        raise ValueError("the gluon MoE GEMM runs only on an NVIDIA GPU (sm90+): Gluon has no interpreter")
    num_sms = num_sms or torch.cuda.get_device_properties(a.device).multi_processor_count
    grid, args, kwargs = fp8_launch_args(a, a_scale, w, w_scale, out, expert_ids, num_post_pad, n, w_rows, silu_mul,
                                         block_m, g, num_sms)
    _grouped_gemm_fp8_ws_kernel[grid](*args, **kwargs)


def moe_gemms_gluon_fp8(
    a_perm: torch.Tensor,  # [rows, H] e4m3 permuted tokens (kernels/moe_permute.py)
    a_scale: torch.Tensor,  # [rows, ceil(H / 128)] fp32, permuted with them
    act: torch.Tensor,  # [rows, I] bf16/fp16 out: silu(gate) * up
    w13: torch.Tensor, w13_scale: torch.Tensor,  # [E, 2I, H] e4m3, [E, ceil(2I/128), ceil(H/128)] fp32
    w2: torch.Tensor, w2_scale: torch.Tensor,  # [E, H, I] e4m3, [E, ceil(H/128), ceil(I/128)] fp32
    expert_ids: torch.Tensor, num_post_pad: torch.Tensor, cfg: dict, num_sms: int | None,
) -> torch.Tensor:
    """fused_experts_tma's FP8 GEMMs on the Gluon kernel, its flow unchanged: gate_up (SiLU-and-mul, 16-bit act),
    act quantized per token and 128 channels (per_token_group_quant), down; the per-row outputs [rows, H]."""
    num_experts, h, inter = w2.shape
    bm = cfg["BLOCK_M"]
    grouped_gemm_gluon_fp8(a_perm, a_scale, w13.view(num_experts * 2 * inter, h), w13_scale, act, expert_ids,
                           num_post_pad, inter, 2 * inter, True, bm, cfg["up"], num_sms)
    # (rows past num_post_pad are quantized too, unused: the buffer's size is fixed by shapes)
    q, q_scale = per_token_group_quant(act)
    y = torch.empty(a_perm.shape[0], h, dtype=act.dtype, device=act.device)
    grouped_gemm_gluon_fp8(q, q_scale, w2.view(num_experts * h, inter), w2_scale, y, expert_ids, num_post_pad, h, h,
                           False, bm, cfg["down"], num_sms)
    return y


def grouped_gemm_fp8_ref(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, expert_ids: torch.Tensor,
    num_blocks: int, n: int, w_rows: int, silu_mul: bool, block_m: int,
) -> torch.Tensor:
    """What the FP8 kernel computes, in torch, step by step: for each row block b < num_blocks (expert
    e = expert_ids[b]) and K step k, the fp32 product of the e4m3 128-channel slices scaled by a_scale[row, k] *
    w_scale[e, n / 128, k], summed over k in order; SILU_MUL: silu(gate) * up. [num_blocks * block_m, n] fp32
    (the kernel rounds it to its 16-bit output)."""
    k_dim = a.shape[1]
    out = torch.zeros(num_blocks * block_m, n, dtype=torch.float32, device=a.device)
    cols = torch.arange(n, device=a.device)
    for b in range(num_blocks):
        e = int(expert_ids[b])
        rows = slice(b * block_m, (b + 1) * block_m)
        a_b, w_e = a[rows].float(), w[e * w_rows:(e + 1) * w_rows].float()
        sums = []
        for part in ((0, n), (n, 2 * n)) if silu_mul else ((0, n),):
            acc = torch.zeros(block_m, n, dtype=torch.float32, device=a.device)
            for k in range(triton.cdiv(k_dim, FP8_BLOCK)):
                ks = slice(k * FP8_BLOCK, (k + 1) * FP8_BLOCK)
                partial = a_b[:, ks] @ w_e[part[0]:part[1], ks].T
                acc += partial * a_scale[rows, k, None] * w_scale[e, (cols + part[0]) // FP8_BLOCK, k][None, :]
            sums.append(acc)
        out[rows] = torch.nn.functional.silu(sums[0]) * sums[1] if silu_mul else sums[0]
    return out
