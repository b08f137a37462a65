"""The sparse all2all's route, pack and combine kernels vs their torch references (Triton interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.all2all.pack import (
    exchange_pairs,
    exchange_pairs_ref,
    sparse_combine,
    sparse_combine_ref,
    sparse_pack,
    sparse_pack_ref,
    sparse_unpack,
    sparse_unpack_ref,
)
from kernels.all2all.route import sparse_route, sparse_route_exact, sparse_route_exact_ref, sparse_route_ref


def _pack_inputs(num_tokens: int, hidden: int, top_k: int, num_ranks: int, num_rows: int, dtype: torch.dtype,
                 fp8: bool):  # noqa: ANN202
    gen = torch.Generator().manual_seed(num_tokens * 7 + hidden)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    scales = None
    if fp8:
        x = x.to(torch.float8_e4m3fn).view(torch.uint8)
        scales = torch.rand(num_tokens, -(-hidden // 128), generator=gen)
    dest = torch.randint(-1, num_ranks, (num_tokens, top_k), generator=gen)
    local = torch.randint(0, 5, (num_tokens, top_k), generator=gen)
    w = torch.rand(num_tokens, top_k, generator=gen)
    pair_of = torch.randint(0, num_tokens * num_ranks + 1, (num_rows,), generator=gen)  # incl. empty rows
    return x, scales, w, dest, local, pair_of


@pytest.mark.parametrize("num_tokens, hidden, top_k, num_ranks, num_rows, dtype, fp8", [
    (7, 37, 3, 4, 11, torch.float32, False),
    (5, 130, 2, 2, 9, torch.float16, False),
    (6, 200, 8, 8, 20, torch.float32, True),  # FP8 bytes + 2 group scales, a partial group
])
def test_pack_matches_reference(num_tokens: int, hidden: int, top_k: int, num_ranks: int, num_rows: int,
                                dtype: torch.dtype, fp8: bool) -> None:
    x, scales, w, dest, local, pair_of = _pack_inputs(num_tokens, hidden, top_k, num_ranks, num_rows, dtype, fp8)
    g = scales.shape[1] if scales is not None else 0
    row = 8 * top_k + 4 * g + hidden * x.element_size() + 5  # odd row bytes: strided views, as in the backend
    outs = []
    for pack in (sparse_pack, sparse_pack_ref):
        buf = torch.zeros(num_rows, row + (-row % 16), dtype=torch.uint8)
        off = 8 * top_k + 4 * g
        sparse_scales = buf[:, 8 * top_k : off].view(torch.float32) if fp8 else None
        pack(x, scales, w, dest, local, pair_of, num_ranks, buf[:, : 4 * top_k].view(torch.float32),
             buf[:, 4 * top_k : 8 * top_k].view(torch.int32),
             buf[:, off : off + hidden * x.element_size()].view(x.dtype), sparse_scales)
        outs.append(buf)
    assert torch.equal(outs[0], outs[1])
    ids = outs[1][:, 4 * top_k : 8 * top_k].view(torch.int32)
    assert (ids >= 0).any() and (ids < 0).any()


def test_pack_writes_the_flag_word() -> None:
    """The overflow flag (a device scalar) lands in every row's flag word, Triton and reference alike."""
    num_tokens, hidden, top_k, num_ranks, num_rows = 5, 33, 2, 4, 12
    x, _, w, dest, local, pair_of = _pack_inputs(num_tokens, hidden, top_k, num_ranks, num_rows, torch.float32, False)
    off = 8 * top_k + 4
    outs = []
    for pack in (sparse_pack, sparse_pack_ref):
        buf = torch.zeros(num_rows, off + 4 * hidden + 12, dtype=torch.uint8)
        pack(x, None, w, dest, local, pair_of, num_ranks, buf[:, : 4 * top_k].view(torch.float32),
             buf[:, 4 * top_k : 8 * top_k].view(torch.int32), buf[:, off : off + 4 * hidden].view(torch.float32),
             None, torch.tensor([1], dtype=torch.int32), buf[:, 8 * top_k : off].view(torch.int32).view(-1))
        outs.append(buf)
    assert torch.equal(outs[0], outs[1])
    assert (outs[0][:, 8 * top_k : off].view(torch.int32) == 1).all()


@pytest.mark.parametrize("num_tokens, hidden, top_k, num_ranks, num_rows, dtype", [
    (6, 200, 3, 4, 13, torch.bfloat16),  # a partial last group
    (5, 256, 2, 2, 7, torch.float16), (3, 37, 8, 8, 5, torch.float32),
    (2, 2100, 2, 2, 3, torch.bfloat16)])  # 17 groups: two steps of up to 16, a partial last group
def test_pack_quantizes_as_per_token_group_quant(num_tokens: int, hidden: int, top_k: int, num_ranks: int,
                                                  num_rows: int, dtype: torch.dtype) -> None:
    """FP8 dispatch: the pack quantizes each row as it writes it (scales None, an FP8 out_hidden), byte for byte
    what quantizing first (kernels/fp8.py, one launch more) and packing the bytes gives: Triton against Triton
    (the interpreter's own e4m3 rounding on both sides), the reference against the reference."""
    from kernels.fp8 import FP8_DTYPE, per_token_group_quant, per_token_group_quant_ref

    x, _, w, dest, local, pair_of = _pack_inputs(num_tokens, hidden, top_k, num_ranks, num_rows, dtype, False)
    x = x * torch.logspace(-2, 2, hidden).to(dtype)  # groups of very different magnitude
    x[1, :128] = 0  # an all-zero group: the minimum scale
    g = -(-hidden // 128)
    off = 8 * top_k + 4 * g

    def packed(pack, quant) -> torch.Tensor:  # noqa: ANN001
        buf = torch.zeros(num_rows, off + hidden + (-(off + hidden) % 16), dtype=torch.uint8)
        q, scales = quant(x) if quant is not None else (x, None)
        pack(q.view(torch.uint8) if quant is not None else x, scales, w, dest, local, pair_of, num_ranks,
             buf[:, : 4 * top_k].view(torch.float32), buf[:, 4 * top_k : 8 * top_k].view(torch.int32),
             buf[:, off : off + hidden].view(torch.uint8 if quant is not None else FP8_DTYPE),
             buf[:, 8 * top_k : off].view(torch.float32))
        return buf

    assert torch.equal(packed(sparse_pack, None), packed(sparse_pack, per_token_group_quant))
    assert torch.equal(packed(sparse_pack_ref, None), packed(sparse_pack_ref, per_token_group_quant_ref))
    with pytest.raises(ValueError, match="out_hidden as hidden"):
        sparse_pack(x, None, w, dest, local, pair_of, num_ranks, torch.empty(num_rows, top_k),
                    torch.empty(num_rows, top_k, dtype=torch.int32), torch.empty(num_rows, hidden, dtype=dtype),
                    torch.empty(num_rows, g))


@pytest.mark.parametrize("num_tokens, hidden, num_ranks, dtype", [(9, 37, 4, torch.float32),
                                                                  (4, 1100, 2, torch.float16)])
def test_combine_matches_reference(num_tokens: int, hidden: int, num_ranks: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(hidden)
    num_rows = num_tokens * num_ranks // 2
    back = torch.randn(num_rows + 1, hidden, generator=gen).to(dtype)
    back[num_rows] = 0
    slot_of = torch.randint(0, num_rows + 1, (num_tokens, num_ranks), generator=gen)
    ref = sparse_combine_ref(back, slot_of, num_rows)
    back[num_rows] = float("nan")  # the kernel never reads row N (the backend leaves it uninitialized there)
    out = sparse_combine(back, slot_of, num_rows)
    assert out.dtype == dtype and torch.equal(out, ref) and not out.isnan().any()


@pytest.mark.parametrize("num_tokens, top_k, num_local, num_ranks", [(1, 2, 2, 4), (70, 3, 2, 4), (13, 8, 4, 8),
                                                                     (9, 2, 3, 3)])
def test_route_matches_reference(num_tokens: int, top_k: int, num_local: int, num_ranks: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    logits = torch.randn(num_tokens, num_local * num_ranks, generator=gen)
    ids = logits.topk(top_k, dim=-1).indices.to(torch.int32)
    ids[num_tokens * 2 // 3 :] = -1  # padding rows
    got = sparse_route(ids, num_local, num_ranks)
    want = sparse_route_ref(ids, num_local, num_ranks)
    for name, a, b in zip(("dest", "local", "slot_of", "pair_of", "counts"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("num_tokens, top_k, num_local, num_ranks, capacity", [(70, 3, 2, 4, 9), (13, 8, 4, 8, 5),
                                                                               (9, 2, 3, 3, 1)])
def test_route_with_capacity(num_tokens: int, top_k: int, num_local: int, num_ranks: int, capacity: int) -> None:
    """C slots per destination: the first C pairs of each destination (token order) keep their slot, the rest
    get none; the counts still hold every pair wanted (what overflowed = counts - C)."""
    gen = torch.Generator().manual_seed(num_tokens + capacity)
    logits = torch.randn(num_tokens, num_local * num_ranks, generator=gen)
    ids = logits.topk(top_k, dim=-1).indices.to(torch.int32)
    ids[num_tokens - 2 :] = -1
    got = sparse_route(ids, num_local, num_ranks, capacity)
    want = sparse_route_ref(ids, num_local, num_ranks, capacity)
    for name, a, b in zip(("dest", "local", "slot_of", "pair_of", "counts"), got, want):
        assert torch.equal(a, b), name
    dest, _, slot_of, pair_of, counts = want
    full = sparse_route_ref(ids, num_local, num_ranks)
    assert pair_of.shape == (num_ranks * capacity,) and torch.equal(counts, full[4])
    assert (counts > capacity).any()  # the sizes above overflow
    kept = slot_of < num_ranks * capacity  # [T, P]
    assert torch.equal(kept.sum(0), counts.clamp(max=capacity))
    # a kept pair sits in its destination's block at the same place as without the capacity
    rank_of = torch.arange(num_ranks).expand_as(slot_of)
    assert torch.equal(slot_of[kept] - rank_of[kept] * capacity, full[2][kept] - rank_of[kept] * num_tokens)


@pytest.mark.parametrize("num_tokens, top_k, num_local, num_ranks, round_rows, rank", [
    (1, 2, 2, 4, 64, 3), (70, 3, 2, 4, 9, 0), (13, 8, 4, 8, 5, 5), (9, 2, 3, 3, 1, 1), (29, 2, 3, 3, 100, 2),
    (0, 2, 2, 2, 4, 1), (1100, 2, 2, 8, 100, 6),  # 3 tiles of tokens carry the counts, 2 rounds
    (8, 2, 2, 1, 2, 0),  # one rank (a [512, 1] tile), 3 rounds
    (40, 2, 1, 5, 3, 4)])  # skewed (below): every token to rank 0 (9 rounds), none to rank 4, P not a power of 2
def test_route_exact_matches_reference(num_tokens: int, top_k: int, num_local: int, num_ranks: int, round_rows: int,
                                       rank: int) -> None:
    """The dynamic layout: Triton equals the reference, and the send rows are, round after round (R rows of each
    destination per round), each destination's pairs in token order; slot N = no row; the count matrix holds this
    rank's counts in its row and zeros elsewhere (the all_reduce's input)."""
    gen = torch.Generator().manual_seed(num_tokens + round_rows)
    ids = torch.randn(num_tokens, num_local * num_ranks, generator=gen).topk(top_k, dim=-1).indices.to(torch.int32)
    if num_ranks == 5:  # expert 0 always, then one of 1 .. E - 2: ranks 0 and 1-3 get rows in different rounds
        ids[:, 0], ids[:, 1] = 0, 1 + ids[:, 1] % (num_ranks * num_local - 2)
    ids[num_tokens * 2 // 3 :] = -1  # padding rows (T = 1: all)
    got = sparse_route_exact(ids, num_local, num_ranks, round_rows, rank)
    want = sparse_route_exact_ref(ids, num_local, num_ranks, round_rows, rank)
    dest, local, slot_of, pair_of, matrix = want
    counts = sparse_route_ref(ids, num_local, num_ranks)[4]
    num_rows = int(counts.sum())
    for name, a, b in zip(("dest", "local", "slot_of", "pair_of", "matrix"), got, want):
        n = num_rows if name == "pair_of" else None  # past N: unspecified
        assert torch.equal(a[:n], b[:n]), name
    expected_matrix = torch.zeros(num_ranks, num_ranks, dtype=torch.int64)
    expected_matrix[rank] = counts
    assert torch.equal(matrix, expected_matrix)
    order = []  # the pairs (t * P + r) in send order, built the slow way
    for j in range(-(-int(counts.max()) // round_rows) if num_rows else 0):
        for r in range(num_ranks):
            tokens = [t for t in range(num_tokens) if (dest[t] == r).any()]
            order += [t * num_ranks + r for t in tokens[j * round_rows : (j + 1) * round_rows]]
    assert pair_of[:num_rows].tolist() == order
    for row, pair in enumerate(order):
        assert slot_of[pair // num_ranks, pair % num_ranks] == row
    assert int((slot_of == num_rows).sum()) == num_tokens * num_ranks - num_rows
    with pytest.raises(ValueError, match="round_rows 0 must be > 0"):
        sparse_route_exact(ids, num_local, num_ranks, 0, rank)


@pytest.mark.parametrize("rows, hidden, top_k, dtype, fp8", [(7, 37, 3, torch.float32, False),
                                                             (5, 300, 2, torch.float16, True),
                                                             (4, 130, 8, torch.bfloat16, True)])
def test_unpack_matches_reference(rows: int, hidden: int, top_k: int, dtype: torch.dtype, fp8: bool) -> None:
    gen = torch.Generator().manual_seed(rows + hidden)
    g = -(-hidden // 128) if fp8 else 0
    off = 8 * top_k + 4 * g
    width = off + hidden * (1 if fp8 else dtype.itemsize)
    buf = torch.zeros(rows, width + (-width % 16), dtype=torch.uint8)
    buf[:, : 4 * top_k].view(torch.float32).copy_(torch.rand(rows, top_k, generator=gen))
    buf[:, 4 * top_k : 8 * top_k].view(torch.int32).copy_(torch.randint(-1, 9, (rows, top_k), generator=gen))
    x = torch.randn(rows, hidden, generator=gen)
    if fp8:
        buf[:, 8 * top_k : off].view(torch.float32).copy_(torch.rand(rows, g, generator=gen))
        buf[:, off:width].view(torch.float8_e4m3fn).copy_(x.to(torch.float8_e4m3fn))
    else:
        buf[:, off:width].view(dtype).copy_(x.to(dtype))
    views = (buf[:, : 4 * top_k].view(torch.float32), buf[:, 4 * top_k : 8 * top_k].view(torch.int32),
             buf[:, off:width].view(torch.float8_e4m3fn if fp8 else dtype),
             buf[:, 8 * top_k : off].view(torch.float32) if fp8 else None)
    for a, b in zip(sparse_unpack(*views, dtype), sparse_unpack_ref(*views, dtype)):
        assert a.is_contiguous() and a.dtype == b.dtype
        if a.dtype == torch.bfloat16:  # the interpreter rounds fp32 -> bf16 toward zero, the GPU to nearest
            torch.testing.assert_close(a, b, atol=0, rtol=2**-7)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("num_ranks, capacity, top_k, rank", [(4, 9, 3, 1), (2, 70, 8, 0), (8, 1, 2, 7), (2, 0, 2, 1)])
def test_exchange_pairs_matches_reference(num_ranks: int, capacity: int, top_k: int, rank: int) -> None:
    """The static exchange's pair counts, added into a counter: the received ids as a strided view of packed rows
    (as the sparse backend passes them), counts above the capacity clamped, this rank's own block left out."""
    gen = torch.Generator().manual_seed(num_ranks * capacity)
    rows = torch.randint(-1, 5, (num_ranks * capacity, 4 * top_k + 3), generator=gen, dtype=torch.int32)
    rows[torch.rand(rows.shape[0], generator=gen) < 0.4, 2 * top_k : 3 * top_k] = -1  # empty slots
    ids = rows[:, 2 * top_k : 3 * top_k]  # [P * C, k], row stride 4k + 3
    counts = torch.randint(0, 2 * capacity + 1, (num_ranks,), generator=gen)
    got, want = torch.tensor([5, 7]), torch.tensor([5, 7])  # added to what was there
    exchange_pairs(counts, ids, capacity, rank, got)
    exchange_pairs_ref(counts, ids, capacity, rank, want)
    assert torch.equal(got, want)
    remote = [r for r in range(num_ranks) if r != rank]
    hit = (ids.view(num_ranks, capacity, top_k) >= 0).any(2).sum(1)
    assert want.tolist() == [5 + sum(min(int(counts[r]), capacity) for r in remote),
                             7 + sum(int(hit[r]) for r in remote)]


_SM90_PROBE = """
import json, re, sys
sys.path.insert(0, "benchmarks")
from attention_ir import compile_sm90, report
from kernels.all2all.pack import _pack_kernel
from kernels.all2all.route import _route_exact_kernel, sparse_route_exact
from kernels.fp8 import _group_quant_kernel
import inspect
src = inspect.getsource(sparse_route_exact)
warps = int(re.search(r"num_warps=(\\d+)", src).group(1))  # the wrapper's launch, not a copy of it
out = {}
for p in (1, 3, 8, 64):  # the wrapper's tile: up to [512, P] pairs
    bp = 1 << (p - 1).bit_length()
    args = dict(ids_ptr="i32", dest_ptr="i64", local_ptr="i64", slot_ptr="i64", pair_ptr="i64", matrix_ptr="i64",
                T=1000, R=1024, n_loc=16, rank=0)
    k = compile_sm90(_route_exact_kernel, args, dict(P=p, K=8, BLOCK_T=max(16, min(512, 4096 // bp)), BLOCK_P=bp),
                     warps, 3)
    out[f"route_exact P={p}"] = report(k)["spill_bytes"]
QUANT_OPS = r"\\b(div\\.[a-z0-9.]+|rcp\\.[a-z0-9.]+|cvt\\.[a-z.]*e4m3[a-z0-9.]*|(?:max|min)\\.[a-zA-Z.]*f32)"
def quant_ops(ptx):  # the instructions that decide an FP8 byte and its scale
    return sorted(set(re.findall(QUANT_OPS, ptx)))
args = dict(pair_ptr="i64", dest_ptr="i64", local_ptr="i64", w_ptr="fp32", x_ptr="bf16", xs_ptr="bf16", ow_ptr="fp32",
            oid_ptr="i32", ox_ptr="fp8e4nv", os_ptr="fp32", flag_ptr="i32", of_ptr="i32", num_tokens=100, H=2048, G=1,
            stride_x=2048, stride_xs=2048, stride_ow=532, stride_oid=532, stride_ox=2128, stride_os=532, stride_of=532)
k = compile_sm90(_pack_kernel, args, dict(P=8, K=8, BLOCK_K=8, BLOCK_H=1024, BLOCK_G=16, HAS_SCALES=False,
                                          HAS_FLAG=True, QUANT=True, GROUP=128, FP8_MAX_C=448.0, MIN_SCALE=1e-12), 4, 3)
out["pack quant"] = dict(spill=report(k)["spill_bytes"], ops=quant_ops(k.asm["ptx"]),
                         vec_loads=len(re.findall(r"ld\\.global[.a-z0-9]*\\.v[248]", k.asm["ptx"])))
args = dict(x_ptr="bf16", q_ptr="fp8e4nv", s_ptr="fp32", num_rows=100, K=2048, stride_x=2048, stride_q=2048,
            stride_s=16, stride_sg=1)
k = compile_sm90(_group_quant_kernel, args, dict(GROUP=128, BLOCK_R=16, FP8_MAX_C=448.0, MIN_SCALE=1e-12), 4, 3)
out["group quant"] = quant_ops(k.asm["ptx"])
print(json.dumps(out))
"""


def test_route_exact_and_quantizing_pack_compile_for_sm90() -> None:
    """No GPU needed (Triton's ptxas for Hopper): the dynamic mode's layout kernel keeps its [512, P] tile in
    registers at every P from 1 to 64 (4 warps spilled at P >= 8), and the pack's FP8 quantization compiles to the
    instructions kernels/fp8.py's per_token_group_quant uses (the same division, e4m3 conversion with its
    rounding and saturation, and max), so the bytes it sends are that kernel's on a GPU too; it reads the row
    with vector loads, many groups per step."""
    from tests.sm90 import run_sm90_probe

    out = run_sm90_probe(_SM90_PROBE)
    assert all(out[f"route_exact P={p}"] == 0 for p in (1, 3, 8, 64)), out
    pack = out["pack quant"]
    assert pack["spill"] == 0 and pack["ops"] == out["group quant"], out
    # a [16, 128] tile of the row per step: vector loads (one group of 128 at a time loaded 2 bytes per thread and
    # reduced across the warps 16 times in turn at H = 2048)
    assert pack["vec_loads"] > 0, out
    assert any(op.startswith("cvt.rn.satfinite.e4m3") for op in pack["ops"]), out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hidden", [2048, 2100, 7168])
def test_pack_quantizes_as_per_token_group_quant_on_gpu(hidden: int) -> None:
    """On the GPU (real e4m3 conversion, approximate fp32 division): the quantizing pack's bytes and scales equal
    per_token_group_quant's then a plain pack, bf16 rows of mixed magnitudes, an all-zero group, a partial group."""
    from kernels.fp8 import FP8_DTYPE, per_token_group_quant

    num_tokens, top_k, num_ranks, num_rows = 300, 8, 8, 1500
    x, _, w, dest, local, pair_of = (t.cuda() if t is not None else None for t in _pack_inputs(
        num_tokens, hidden, top_k, num_ranks, num_rows, torch.float32, False))
    x = (x * torch.logspace(-3, 3, hidden, device="cuda")).bfloat16()
    x[1, :128] = 0
    g = -(-hidden // 128)

    def packed(quantize_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out_h = torch.empty(num_rows, hidden, dtype=FP8_DTYPE, device="cuda")
        out_s = torch.empty(num_rows, g, dtype=torch.float32, device="cuda")
        q, s = per_token_group_quant(x, 128) if quantize_first else (x, None)
        sparse_pack(q.view(torch.uint8) if quantize_first else x, s, w, dest, local, pair_of, num_ranks,
                    torch.empty(num_rows, top_k, device="cuda"),
                    torch.empty(num_rows, top_k, dtype=torch.int32, device="cuda"),
                    out_h.view(torch.uint8) if quantize_first else out_h, out_s)
        return out_h.view(torch.uint8), out_s

    (fused_q, fused_s), (ref_q, ref_s) = packed(False), packed(True)
    assert torch.equal(fused_s, ref_s) and torch.equal(fused_q, ref_q)


_SPEC_PROBE = """
import json
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from kernels.all2all import pack, route

backend = make_backend(GPUTarget("cuda", 90, 32))
p = torch.empty(16, dtype=torch.int64)

def spec(kernel, args, consts):  # what a launch's compile key holds for each argument
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    return [list(s) for s in binder(*args, **consts)[1]]

out = {}
for n in (32, 37, 1):  # a multiple of 16, neither, one: what Triton specializes an int on
    out.setdefault("route T, C", []).append(spec(route._route_kernel, [p] * 6 + [n, n, 4],
                                               dict(P=8, K=8, BLOCK_T=64, BLOCK_P=8)))
    out.setdefault("route_exact T", []).append(spec(route._route_exact_kernel, [p] * 6 + [n, 8192, 4, 0],
                                                  dict(P=8, K=8, BLOCK_T=512, BLOCK_P=8)))
    out.setdefault("pack num_tokens", []).append(spec(pack._pack_kernel, [p] * 12 + [n, 2048, 16] + [1040] * 7,
                                                    dict(P=8, K=8, BLOCK_K=8, BLOCK_H=1024, BLOCK_G=16,
                                                         HAS_SCALES=False, HAS_FLAG=True)))
    out.setdefault("combine N", []).append(spec(pack._combine_kernel, [p] * 3 + [2048, n, 2048, 2048],
                                              dict(P=8, BLOCK_H=1024)))
    out.setdefault("exchange_pairs C", []).append(spec(pack._exchange_pairs_kernel, [p] * 3 + [n, 0, 8],
                                                     dict(K=8, BLOCK_R=64, BLOCK_K=8)))
print(json.dumps(out))
"""


def test_per_step_sizes_compile_one_variant() -> None:
    # no GPU needed (Triton's binder for sm90): the sizes that follow the step (tokens T, slots C, rows sent N) are
    # not specialized, so an eager step at a size no warm-up or capture ran compiles nothing while serving. C too:
    # 256 experts top-8 over 16 EP ranks (factor 1.25) gives C = 64 at T = 81, a multiple of 16 that no warm-up or
    # graph size reaches (their C past 32: 42, 53, 63, 73, ...)
    from tests.sm90 import run_sm90_probe

    out = run_sm90_probe(_SPEC_PROBE)
    assert [name for name, (a, b, c) in out.items() if not a == b == c] == []
