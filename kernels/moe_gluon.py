"""The large-M MoE grouped GEMM in Gluon: persistent and warp-specialized for Hopper (sm90).

Same operands and contract as kernels/moe_grouped_tma.py's _grouped_gemm_kernel (a_perm expert-contiguous, each
expert's rows padded to BLOCK_M; the weights stacked [E * W_ROWS, K]; expert_ids per row block; the tile count
from align's num_post_pad on the device, no host sync), bf16/fp16 only. Triton 3.6 warp-specializes tl.range
loops only on sm100+, so on Hopper the old kernel's epilogue and the next tile's first loads never overlap its
MMAs; with K = 2048 (up) / 768 (down), 32 / 12 K steps a tile, that prologue/epilogue is a large share. Here:

- a load partition (one warp) runs ahead through the whole persistent tile sequence, filling a ring of
  NUM_STAGES shared buffers by TMA (ready barriers: the bytes landed; empty barriers: the MMAs that read the
  stage finished), so the next tile's operands are in shared memory while this tile's epilogue runs;
- the default partition (num_warps = 8: two warpgroups, 64 rows of the 128-row tile each; 4 for BLOCK_M 64)
  issues async wgmma, keeps one K step in flight (warpgroup_mma_wait(num_outstanding = MMAs a step)), releases
  a stage as soon as the MMAs reading it are done, and runs the epilogue (SiLU-and-mul for the gate_up GEMM),
  storing the tile with a TMA store that is only waited for before the next tile's epilogue reuses its buffer;
- or, config "pingpong", two one-warpgroup MMA partitions take the tiles in turn, each from its own ring of
  stages, so one's epilogue runs under the other's MMAs (CUTLASS's ping-pong schedule).

Config keys per GEMM (a "tma" entry's "up" / "down" with "gluon": 1 at the entry's top level): BLOCK_N,
BLOCK_K, GROUP_M, num_stages, num_warps, pingpong; load_regs / mma_regs / maxnreg override the register split.

Gluon has no interpreter: the CPU checks compile this for sm90 (tests/test_kernels_moe_gluon.py,
benchmarks/moe_gluon_ir.py); outputs are compared with the Triton path on a GPU.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

GLUON_GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_stages", "num_warps", "pingpong", "load_regs", "mma_regs",
                   "maxnreg")
SHARED_LIMIT = 232448  # bytes of shared memory one H100/H200 block may hold (227 KB)
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
    # grouped order (kernels/tiles.py's): GROUP_M row blocks, mostly of one expert, sweep the column tiles
    # together, so their weight tiles are read from L2
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % group_m
    pid_n = (tile % in_group) // group_m
    return pid_m, pid_n


@gluon.jit
def _store_tile(acc, acc_up, c_smem, out_desc, off_m, off_n, SILU_MUL: gl.constexpr):
    # a tile's epilogue: SiLU-and-mul for the gate_up GEMM (silu(g) * u = g * u / (1 + e^-g)), then the TMA store
    # through c_smem, once the previous tile's store has read it
    if SILU_MUL:
        acc = acc * acc_up / (1.0 + gl.exp2(acc * -1.4426950408889634))
    tma.store_wait(0)
    c_smem.store(acc.to(out_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [off_m, off_n], c_smem)


@gluon.jit
def _load_partition(a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, expert_ids_ptr, num_post_pad_ptr,
                    N, W_ROWS, SILU_MUL: gl.constexpr, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr,
                    NUM_PARTS: gl.constexpr):
    # the stages form NUM_PARTS rings of RING stages, one per MMA partition; tile t of this program goes to ring
    # t % NUM_PARTS, its K steps at that ring's positions (t // NUM_PARTS) * k_tiles + ki. (One shared ring
    # would let the second partition wait on a slot two phases ahead, which an mbarrier parity cannot tell.)
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    RING: gl.constexpr = a_bufs.shape[0] // NUM_PARTS
    W_PER_STAGE: gl.constexpr = 2 if SILU_MUL else 1  # SILU_MUL: the gate rows' tile, then the up rows' tile
    STAGE_BYTES: gl.constexpr = a_desc.block_type.nbytes + W_PER_STAGE * w_desc.block_type.nbytes
    K = a_desc.shape[1]
    num_pid_m = gl.load(num_post_pad_ptr) // BLOCK_M
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    t = 0  # this program's tiles so far
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        e = gl.load(expert_ids_ptr + pid_m)
        off_m = pid_m * BLOCK_M
        row = e * W_ROWS + pid_n * BLOCK_N
        first = (t % NUM_PARTS) * RING  # the ring's first stage
        pos = (t // NUM_PARTS) * k_tiles  # K steps through this ring so far: the slot and its phase
        for ki in range(k_tiles):
            s = first + pos % RING
            # a fresh barrier counts as having finished the phase before 0: the first lap does not wait
            mbarrier.wait(empty_bars.index(s), ((pos // RING) & 1) ^ 1)
            bar = ready_bars.index(s)
            mbarrier.expect(bar, STAGE_BYTES)  # TMA counts a clipped box's zero fill too
            off_k = ki * BLOCK_K
            tma.async_copy_global_to_shared(a_desc, [off_m, off_k], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [row, off_k], bar, w_bufs.index(s * W_PER_STAGE))
            if SILU_MUL:
                tma.async_copy_global_to_shared(w_desc, [row + N, off_k], bar, w_bufs.index(s * 2 + 1))
            pos += 1
        t += 1


@gluon.jit
def _mma_partition(out_desc, a_bufs, w_bufs, c_bufs, ready_bars, empty_bars, num_post_pad_ptr, N, K,
                   SILU_MUL: gl.constexpr, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr, PART: gl.constexpr,
                   NUM_PARTS: gl.constexpr, MMA_WARPS: gl.constexpr):
    # NUM_PARTS MMA partitions take this program's tiles in turn (ping-pong: one's epilogue overlaps the other's
    # MMAs), each from its own ring of stages (_load_partition's comment)
    BLOCK_M: gl.constexpr = out_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = out_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.shape[2]
    RING: gl.constexpr = a_bufs.shape[0] // NUM_PARTS
    FIRST: gl.constexpr = PART * RING
    W_PER_STAGE: gl.constexpr = 2 if SILU_MUL else 1
    # the accumulators: warpgroups stacked along M (64 rows each), one wgmma of N = BLOCK_N per 64 rows
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[MMA_WARPS, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    c_smem = c_bufs.index(PART)
    num_pid_m = gl.load(num_post_pad_ptr) // BLOCK_M
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    pos = 0  # K steps through this partition's ring so far
    for tile in range(gl.program_id(0) + PART * NUM_SMS, num_pid_m * num_pid_n, NUM_PARTS * NUM_SMS):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        acc_up = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        for ki in range(k_tiles):
            s = FIRST + pos % RING
            mbarrier.wait(ready_bars.index(s), (pos // RING) & 1)
            a = a_bufs.index(s)
            acc = warpgroup_mma(a, w_bufs.index(s * W_PER_STAGE).permute((1, 0)), acc, is_async=True)
            if SILU_MUL:
                acc_up = warpgroup_mma(a, w_bufs.index(s * 2 + 1).permute((1, 0)), acc_up, is_async=True)
                # this step's two MMAs stay in flight; the previous step's are done: release its stage
                acc, acc_up = warpgroup_mma_wait(2, deps=(acc, acc_up))
            else:
                acc = warpgroup_mma_wait(1, deps=(acc,))
            mbarrier.arrive(empty_bars.index(FIRST + (pos + RING - 1) % RING), pred=ki > 0)
            pos += 1
        if SILU_MUL:
            acc, acc_up = warpgroup_mma_wait(0, deps=(acc, acc_up))
        else:
            acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty_bars.index(FIRST + (pos + RING - 1) % RING))
        _store_tile(acc, acc_up, c_smem, out_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, SILU_MUL)
    tma.store_wait(0)


@gluon.jit
def _grouped_gemm_ws_kernel(a_desc, w_desc, out_desc, expert_ids_ptr, num_post_pad_ptr, N, W_ROWS,
                            SILU_MUL: gl.constexpr, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr,
                            NUM_STAGES: gl.constexpr, PINGPONG: gl.constexpr, LOAD_REGS: gl.constexpr,
                            MMA_REGS: gl.constexpr, num_warps: gl.constexpr):
    # a_desc [rows, K] box [BLOCK_M, BLOCK_K]; w_desc [E * W_ROWS, K] box [BLOCK_N, BLOCK_K]; out_desc [rows, N]
    # box [BLOCK_M, BLOCK_N]. out[p, n] = a[p] . w[e, n], or SILU_MUL silu(a[p] . w[e, n]) * (a[p] . w[e, N + n]),
    # e = expert_ids[p // BLOCK_M]. Weight rows past N of a tile belong to the next rows (or TMA zeros): only
    # output columns >= N see them, and the output descriptor clips those; K tails are zeros on both operands.
    # PINGPONG: a second MMA partition of num_warps warps (registers MMA_REGS) takes every other tile.
    NUM_PARTS: gl.constexpr = 2 if PINGPONG else 1
    W_PER_STAGE: gl.constexpr = 2 if SILU_MUL else 1
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES * W_PER_STAGE] + w_desc.block_type.shape, w_desc.layout)
    c_bufs = gl.allocate_shared_memory(dtype, [NUM_PARTS] + out_desc.block_type.shape, out_desc.layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=1)
    K = a_desc.shape[1]
    # (the arguments spelled out each time: a tuple built here would carry the constexprs as runtime values)
    if PINGPONG:  # (the 4-warp MMA worker first: its warps then start on a warpgroup boundary, as wgmma needs)
        gl.warp_specialize([
            (_mma_partition, (out_desc, a_bufs, w_bufs, c_bufs, ready_bars, empty_bars, num_post_pad_ptr, N, K,
                              SILU_MUL, GROUP_M, NUM_SMS, 0, 2, num_warps)),
            (_mma_partition, (out_desc, a_bufs, w_bufs, c_bufs, ready_bars, empty_bars, num_post_pad_ptr, N, K,
                              SILU_MUL, GROUP_M, NUM_SMS, 1, 2, num_warps)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, expert_ids_ptr,
                               num_post_pad_ptr, N, W_ROWS, SILU_MUL, GROUP_M, NUM_SMS, 2)),
        ], [num_warps, 1], [MMA_REGS, LOAD_REGS])
    else:
        gl.warp_specialize([
            (_mma_partition, (out_desc, a_bufs, w_bufs, c_bufs, ready_bars, empty_bars, num_post_pad_ptr, N, K,
                              SILU_MUL, GROUP_M, NUM_SMS, 0, 1, num_warps)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, expert_ids_ptr,
                               num_post_pad_ptr, N, W_ROWS, SILU_MUL, GROUP_M, NUM_SMS, 1)),
        ], [1], [LOAD_REGS])


def default_gluon_config(min_rows: int = 0, block_m: int = 128, pingpong: bool = False) -> dict:
    """A sane "tma" config entry for the Gluon kernel (the H200 Qwen3-30B-A3B table's: sessions 12-13).
    Tiles whose fp32 accumulators take 128 registers a thread of the MMA warps (gate_up: two of them), as many
    ring stages (<= 6) as shared memory holds. pingpong: two one-warpgroup MMA partitions taking tiles in turn;
    else one partition of block_m / 16 warps (64 rows a warpgroup)."""
    warps = 4 if pingpong or block_m == 64 else 8
    cfg = {"min_rows": min_rows, "BLOCK_M": block_m, "gluon": 1}
    for kind, silu_mul in (("up", True), ("down", False)):
        bn = min(256, 128 * 32 * warps // block_m // (2 if silu_mul else 1))  # accumulators: 128 regs a thread
        g = {"BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8, "num_stages": 6, "num_warps": warps, "pingpong": pingpong}
        while shared_bytes(block_m, g, silu_mul) > SHARED_LIMIT:
            g["num_stages"] -= 2 if pingpong else 1  # (pingpong: a ring of stages per MMA partition)
        cfg[kind] = g
    return cfg


def shared_bytes(block_m: int, g: dict, silu_mul: bool, elem: int = 2) -> int:
    """The kernel's shared memory: the operand ring, the output tile and two barriers a stage."""
    bn, bk, stages = g["BLOCK_N"], g["BLOCK_K"], g["num_stages"]
    c_tiles = 2 if g.get("pingpong") else 1  # an output tile per MMA partition
    ring = stages * (block_m * bk + (2 if silu_mul else 1) * bn * bk) * elem
    return ring + c_tiles * block_m * bn * elem + 16 * stages


def check_gluon_config(block_m: int, g: dict, silu_mul: bool, elem: int = 2) -> None:
    """A bad config: one line saying which key and what it must be (ValueError)."""
    unknown = set(g) - set(GLUON_GEMM_KEYS) - {"warp_specialize", "store_tma", "flatten"}  # (the Triton path's)
    if unknown:
        raise ValueError(f"gluon MoE GEMM config: unknown keys {sorted(unknown)}; allowed {GLUON_GEMM_KEYS}")
    warps, bn, bk = g.get("num_warps", 8), g.get("BLOCK_N"), g.get("BLOCK_K")
    if g.get("pingpong") and warps != 4:
        raise ValueError(f"gluon MoE GEMM: pingpong takes num_warps 4 (a warpgroup per MMA partition), got {warps}")
    if warps not in (4, 8) or block_m not in (64, 128) or block_m % (16 * warps):
        raise ValueError(f"gluon MoE GEMM: BLOCK_M {block_m} with num_warps {warps}: need BLOCK_M 64 or 128 and "
                         "num_warps 4 or 8 with BLOCK_M a multiple of 16 * num_warps (64 rows a warpgroup)")
    if bn not in (64, 128, 256) or bk not in (32, 64, 128):
        raise ValueError(f"gluon MoE GEMM: BLOCK_N {bn} / BLOCK_K {bk}: need BLOCK_N in 64/128/256, "
                         "BLOCK_K in 32/64/128")
    parts = 2 if g.get("pingpong") else 1
    if not 2 * parts <= g.get("num_stages", 0) <= 8 or g["num_stages"] % parts:
        raise ValueError(f"gluon MoE GEMM: num_stages {g.get('num_stages')}: need {2 * parts}..8"
                         + (", even (pingpong: a ring of stages per MMA partition)" if parts == 2 else ""))
    if (smem := shared_bytes(block_m, g, silu_mul, elem)) > SHARED_LIMIT:
        raise ValueError(f"gluon MoE GEMM: {smem} bytes of shared memory over the {SHARED_LIMIT} a block may hold: "
                         "fewer num_stages or a smaller BLOCK_N")
    # fp32 accumulators per thread of the MMA partition: the register file holds them with room for addresses
    if (2 if silu_mul else 1) * block_m * bn // (32 * warps) > 128:
        raise ValueError(f"gluon MoE GEMM: a {block_m} x {bn} tile{' x 2 (gate and up)' if silu_mul else ''} over "
                         f"{warps} warps needs more than 128 accumulator registers a thread: a smaller BLOCK_N")


def launch_meta(g: dict) -> dict:
    """The kernel's constexprs and launch options for a GEMM config (also what benchmarks/moe_gluon_ir.py
    compiles). Registers: the register file (64K) over all warps (the MMA warps plus the load warp's whole
    warpgroup) is the launch's maxnreg, a multiple of 8 up to 248; setmaxnreg then moves the load warpgroup's share
    (load_regs) to the MMA warps (pingpong: mma_regs for the second MMA partition, the rest to the first)."""
    warps, pingpong = g.get("num_warps", 8), bool(g.get("pingpong", False))
    all_warps = (2 if pingpong else 1) * warps + 4
    # at most 248: ptxas ignores a .maxnreg over 255 (8 warps' 256: BLOCK_M 64 cooperative), and without a valid
    # one the PTX spec lets setmaxnreg have no effect
    maxnreg = g.get("maxnreg", min(248, 65536 // (32 * all_warps) // 8 * 8))
    load_regs = g.get("load_regs", 40)
    mma_regs = g.get("mma_regs", (maxnreg * all_warps - 4 * load_regs) // (2 * warps) // 8 * 8)
    return {"GROUP_M": g["GROUP_M"], "NUM_STAGES": g["num_stages"], "PINGPONG": pingpong, "LOAD_REGS": load_regs,
            "MMA_REGS": mma_regs, "num_warps": warps, "maxnreg": maxnreg}


def launch_args(
    a: torch.Tensor,  # [rows, K] bf16/fp16, rows a multiple of block_m, expert-contiguous blocks
    w: torch.Tensor,  # [E * w_rows, K]
    out: torch.Tensor,  # [rows, N]
    expert_ids: torch.Tensor,  # [rows // block_m] int32, from moe_align
    num_post_pad: torch.Tensor,  # [1] int32
    n: int, w_rows: int, silu_mul: bool, block_m: int, g: dict, num_sms: int,
) -> tuple[tuple[int], tuple, dict]:
    """The kernel's grid, arguments and keyword arguments (checked), for grouped_gemm_gluon's launch and the
    CPU test that binds them as a launch would."""
    if a.dtype not in _GL_DTYPES or w.dtype != a.dtype or out.dtype != a.dtype:
        raise ValueError(f"the gluon MoE GEMM takes bf16/fp16 operands of one dtype, got {a.dtype}, {w.dtype}, "
                         f"{out.dtype} (FP8 experts: kernels/moe_gluon_fp8.py)")
    check_gluon_config(block_m, g, silu_mul, a.element_size())
    for name, t in (("activations", a), ("weights", w), ("output", out)):  # TMA: else an assert in the descriptor
        if t.stride(1) != 1 or t.stride(0) * t.element_size() % 16 or t.data_ptr() % 16:
            raise ValueError(f"the gluon MoE GEMM's {name} {list(t.shape)} (strides {t.stride()}) need contiguous rows "
                             "with a 16-byte aligned base and row stride (TMA): K and N a multiple of 8")
    bn, bk = g["BLOCK_N"], g["BLOCK_K"]
    dt = _GL_DTYPES[a.dtype]

    def desc(t: torch.Tensor, box: list[int]) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, dt))

    max_tiles = a.shape[0] // block_m * triton.cdiv(n, bn)
    grid = (max(1, min(num_sms, max_tiles)),)
    args = (desc(a, [block_m, bk]), desc(w, [bn, bk]), desc(out, [block_m, bn]), expert_ids, num_post_pad, n, w_rows)
    return grid, args, dict(SILU_MUL=silu_mul, NUM_SMS=num_sms, **launch_meta(g))


def grouped_gemm_gluon(
    a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, expert_ids: torch.Tensor, num_post_pad: torch.Tensor,
    n: int, w_rows: int, silu_mul: bool, block_m: int, g: dict, num_sms: int | None = None,
) -> None:
    """out = the grouped GEMM (launch_args' shapes; moe_grouped_tma.grouped_gemm's contract, bf16/fp16)."""
    if a.device.type != "cuda":
        raise ValueError("the gluon MoE GEMM runs only on an NVIDIA GPU (sm90+): Gluon has no interpreter")
    num_sms = num_sms or torch.cuda.get_device_properties(a.device).multi_processor_count
    grid, args, kwargs = launch_args(a, w, out, expert_ids, num_post_pad, n, w_rows, silu_mul, block_m, g, num_sms)
    _grouped_gemm_ws_kernel[grid](*args, **kwargs)


def moe_gemms_gluon(
    a_perm: torch.Tensor,  # [rows, H] permuted tokens (kernels/moe_permute.py)
    act: torch.Tensor,  # [rows, I] out: silu(gate) * up
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    expert_ids: torch.Tensor, num_post_pad: torch.Tensor, cfg: dict, num_sms: int | None, fp8: bool,
) -> torch.Tensor:
    """fused_experts_tma's two GEMMs on the Gluon kernel; the per-row (unweighted) outputs [rows, H]."""
    if fp8:
        raise ValueError("the gluon MoE GEMM is bf16/fp16 only: FP8 experts take kernels/moe_gluon_fp8.py")
    num_experts, h, inter = w2.shape
    bm = cfg["BLOCK_M"]
    grouped_gemm_gluon(a_perm, w13.view(num_experts * 2 * inter, h), act, expert_ids, num_post_pad, inter,
                       2 * inter, True, bm, cfg["up"], num_sms)
    y = torch.empty(a_perm.shape[0], h, dtype=act.dtype, device=act.device)
    grouped_gemm_gluon(act, w2.view(num_experts * h, inter), y, expert_ids, num_post_pad, h, h, False, bm,
                       cfg["down"], num_sms)
    return y
