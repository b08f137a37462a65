"""The FP8 Gluon MoE GEMM's own source (kernels/moe_gluon_fp8.py's kernel, MMA partition and K steps, moe_gluon.py's
load partition and tile order) executed on the CPU by a torch emulation of the Gluon ops it calls: each partition a
thread, mbarriers with phases, parity waits and transaction bytes (a wait that never completes fails after a few
seconds: a hang), TMA boxes clipped and zero-filled, wgmmas deferred until a warpgroup_mma_wait retires them (reading
their shared memory then). It fails on: a partial read or overwritten while its wgmma is in flight, a stage released
while a pending wgmma reads it, expect-tx bytes not matching the boxes, a scale load past its buffer, and any
(k, n-block) scale paired with the wrong partial (scales are random powers of two, so a wrong one is off by 2^j),
at every chunk / tail split of the Qwen3 / GLM K step counts and each variant (cooperative 128 / 64, ping-pong)."""

import threading
import types

import pytest
import torch

from kernels import moe_gluon, moe_gluon_fp8
from kernels.moe_gluon_fp8 import (
    check_gluon_fp8_config,
    default_gluon_fp8_config,
    fp8_launch_meta,
    grouped_gemm_fp8_ref,
)

HANG_S = 5.0


class _Ptr:  # a global pointer: a flat tensor and offsets (a scalar or a tensor of them)
    def __init__(self, flat: torch.Tensor, off=0):
        self.flat, self.off = flat, off

    def __add__(self, o):
        return _Ptr(self.flat, self.off + o)


def _load(p: _Ptr):
    off = torch.as_tensor(p.off).long()
    assert bool(((off >= 0) & (off < p.flat.numel())).all()), f"a load past its buffer ({p.flat.numel()} elements)"
    return p.flat[off]


class _Smem:  # a shared-memory buffer (a torch view); stage: the ring slot it was indexed at
    def __init__(self, t: torch.Tensor, stage: int | None = None):
        self.t, self.stage = t, stage

    @property
    def shape(self):
        return list(self.t.shape)

    def index(self, i):
        return _Smem(self.t[int(i)], int(i))

    def permute(self, dims):
        return _Smem(self.t.permute(*dims), self.stage)

    def store(self, v):
        self.t.copy_(v)


class _Bar:
    def __init__(self, idx: int):
        self.idx, self.cv, self.count, self.pending, self.tx, self.phase = idx, threading.Condition(), 1, 1, 0, 0

    def _done(self):  # (under cv)
        assert self.tx >= 0, f"barrier {self.idx}: more bytes arrived than expected"
        if self.pending == 0 and self.tx == 0:
            self.phase, self.pending = self.phase + 1, self.count
            self.cv.notify_all()


class _Bars:
    def __init__(self, n: int):
        self.bars = [_Bar(i) for i in range(n)]

    def index(self, i):
        return self.bars[int(i)]


class _Desc:  # a TMA descriptor: the global tensor (float32 values), the box and its bytes at elem bytes a value
    def __init__(self, t: torch.Tensor, box: list[int], elem: int):
        self.t, self.shape, self.dtype, self.layout = t, list(t.shape), torch.float32, None
        self.block_type = types.SimpleNamespace(shape=list(box), nbytes=box[0] * box[1] * elem)


class _Pending:  # an async wgmma: computed (reading its shared memory) when a wait retires it
    def __init__(self, a: _Smem, b: _Smem, acc, use_acc: bool):
        assert not isinstance(acc, _Pending), "a wgmma's accumulator is still in flight"
        self.a, self.b, self.acc, self.use_acc, self.value = a, b, acc, use_acc, None

    def retire(self):
        self.value = self.a.t @ self.b.t + (self.acc if self.use_acc else 0.0)


_tls = threading.local()


def _wgmma(a, b, acc, use_acc=True, is_async=True):
    tok = _Pending(a, b, acc, use_acc)
    _tls.queue.append(tok)
    return tok


def _wgmma_wait(n, deps):
    while len(_tls.queue) > n:
        _tls.queue.pop(0).retire()
    out = tuple(d.value if isinstance(d, _Pending) and d.value is not None else d for d in deps)
    return out[0] if len(out) == 1 else out


def _mb_wait(bar: _Bar, parity):
    with bar.cv:  # a parity wait passes once the phase of that parity completed (a fresh one: "phase -1" did)
        assert bar.cv.wait_for(lambda: bar.phase % 2 != int(parity), HANG_S), f"hang: barrier {bar.idx} parity {parity}"


def _mb_arrive(bar: _Bar, pred=True):
    if not pred:
        return
    # an MMA partition releasing a stage: none of its pending wgmmas may still read that stage's buffers
    assert all(t.a.stage != bar.idx for t in _tls.queue), f"stage {bar.idx} released under a wgmma reading it"
    with bar.cv:
        bar.pending -= 1
        bar._done()


def _mb_expect(bar: _Bar, nbytes):
    with bar.cv:
        bar.tx += nbytes
        bar.pending -= 1
        bar._done()


def _mb_init(bar: _Bar, count):
    bar.count = bar.pending = count


def _tma_load(desc: _Desc, coord, bar: _Bar, buf: _Smem):
    r, c = (int(x) for x in coord)
    box = torch.zeros(desc.block_type.shape)  # the clipped part zero-filled (and counted in the bytes)
    part = desc.t[r:r + box.shape[0], c:c + box.shape[1]]
    box[:part.shape[0], :part.shape[1]] = part
    buf.store(box)
    with bar.cv:
        bar.tx -= desc.block_type.nbytes
        bar._done()


def _tma_store(desc: _Desc, coord, smem: _Smem):
    r, c = (int(x) for x in coord)
    part = desc.t[r:r + smem.t.shape[0], c:c + smem.t.shape[1]]
    part.copy_(smem.t[:part.shape[0], :part.shape[1]])


def _inline_asm(asm, constraints, args, dtype, is_pure, pack):  # moe_gluon_fp8._after: x's values
    assert not isinstance(args[0], _Pending), "a partial overwritten while its wgmma is in flight"
    return args[0]


def _alloc(dtype, shape, layout):
    return _Bars(shape[0]) if dtype == torch.int64 else _Smem(torch.zeros(shape))


def _warp_specialize(parts, warps, regs):
    errors, pid = [], _tls.pid

    def run(fn, args):
        _tls.pid, _tls.queue = pid, []
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            errors.append(e)

    threads = [threading.Thread(target=run, args=p, daemon=True) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10 * HANG_S)
        assert not t.is_alive(), "hang: a partition never finished"
    if errors:
        raise errors[0]


_GL = types.SimpleNamespace(
    static_range=range, load=_load, zeros=lambda shape, dtype, layout=None: torch.zeros(shape, dtype=dtype),
    arange=lambda a, b, layout=None: torch.arange(a, b), cdiv=lambda a, b: (a + b - 1) // b,
    minimum=lambda a, b: min(int(a), int(b)), exp2=torch.exp2, program_id=lambda axis: _tls.pid,
    NVMMADistributedLayout=lambda **kw: None, SliceLayout=lambda *a: None, float32=torch.float32, int64=torch.int64,
    inline_asm_elementwise=_inline_asm, allocate_shared_memory=_alloc, warp_specialize=_warp_specialize,
    constexpr=object)


def _emulated_kernel():
    g = {"gl": _GL, "warpgroup_mma": _wgmma, "warpgroup_mma_wait": _wgmma_wait, "fence_async_shared": lambda: None,
         "mbarrier": types.SimpleNamespace(wait=_mb_wait, arrive=_mb_arrive, expect=_mb_expect, init=_mb_init,
                                           MBarrierLayout=lambda: None),
         "tma": types.SimpleNamespace(async_copy_global_to_shared=_tma_load, async_copy_shared_to_global=_tma_store,
                                      store_wait=lambda n: None)}
    for mod, names in ((moe_gluon, ("_tile_coords", "_load_partition", "_store_tile")),
                       (moe_gluon_fp8, ("_after", "_fp8_steps", "_fp8_mma_partition", "_grouped_gemm_fp8_ws_kernel"))):
        for name in names:
            fn = getattr(mod, name).fn
            g[name] = types.FunctionType(fn.__code__, g, name, fn.__defaults__)
    return g["_grouped_gemm_fp8_ws_kernel"]


def _pow2(*shape) -> torch.Tensor:
    return torch.exp2(torch.randint(-4, 5, shape).float())


def run_emulated(block_m: int, g: dict, silu_mul: bool, k: int, n: int, expert_ids: list[int], num_blocks: int,
                 num_sms: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the emulated kernel's output [rows, n], grouped_gemm_fp8_ref's) for e4m3-exact small integer operands and
    random power-of-two scales; rows past num_blocks * block_m stay NaN in the output."""
    check_gluon_fp8_config(block_m, g, silu_mul)
    torch.manual_seed(seed)
    rows, num_experts, ks = len(expert_ids) * block_m, max(expert_ids) + 1, -(-k // 128)
    w_rows = 2 * n if silu_mul else n
    a = torch.randint(-6, 7, (rows, k)).float()
    w = torch.randint(-6, 7, (num_experts * w_rows, k)).float()
    a_s, w_s = _pow2(rows, ks), _pow2(num_experts, -(-w_rows // 128), ks)
    ids = torch.tensor(expert_ids, dtype=torch.int32)
    out = torch.full((rows, n), float("nan"))
    meta = fp8_launch_meta(g, ks)
    meta.pop("maxnreg")
    bn = g["BLOCK_N"]
    grid = max(1, min(num_sms, rows // block_m * -(-n // bn)))
    kernel = _emulated_kernel()
    for pid in range(grid):
        _tls.pid = pid
        kernel(_Desc(a, [block_m, 128], 1), _Desc(w, [bn, 128], 1), _Desc(out, [block_m, bn], 2),
               _Ptr(a_s.flatten()), _Ptr(w_s.flatten()), _Ptr(ids), _Ptr(torch.tensor([num_blocks * block_m])), n,
               w_rows, a_s.stride(0), w_s.stride(0), w_s.stride(1), SILU_MUL=silu_mul, NUM_SMS=num_sms, **meta)
    ref = grouped_gemm_fp8_ref(a, a_s, w, w_s, ids, num_blocks, n, w_rows, silu_mul, block_m)
    return out, ref


def _variants() -> dict[str, dict]:
    return {"coop128": default_gluon_fp8_config(), "coop64": default_gluon_fp8_config(block_m=64),
            "pp64": default_gluon_fp8_config(block_m=64, pingpong=True)}


# K steps: Qwen3-30B-A3B (16 up, 6 down), GLM-4.5-Air (32 up, 11 down): every chunk / tail split of k_chunk 3 / 4;
# 5 with a 16-channel K tail (528); N 192 for up (up rows from mid scale block), 176 for down (a tail tile)
@pytest.mark.parametrize("variant", list(_variants()))
@pytest.mark.parametrize("kind,k_steps", [("up", 16), ("up", 32), ("up", 5), ("down", 6), ("down", 11), ("down", 5)])
def test_emulated_fp8_kernel_matches_reference(variant, kind, k_steps):
    cfg = _variants()[variant]
    silu_mul = kind == "up"
    k = 528 if k_steps == 5 else 128 * k_steps
    n = 192 if silu_mul else 176
    out, ref = run_emulated(cfg["BLOCK_M"], cfg[kind], silu_mul, k, n, [1, 0, 1, 0], 3)
    rows = 3 * cfg["BLOCK_M"]
    assert out[rows:].isnan().all()  # the block past num_post_pad: no tile
    err = ((out[:rows] - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("variant", list(_variants()))
def test_emulated_fp8_kernel_without_tiles_writes_nothing(variant):
    # num_post_pad 0 (every slot on another rank): no tile, nothing written, every partition returns
    cfg = _variants()[variant]
    out, _ = run_emulated(cfg["BLOCK_M"], cfg["up"], True, 384, 192, [0, 0], 0)
    assert out.isnan().all()
