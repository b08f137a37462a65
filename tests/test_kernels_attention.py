"""Paged attention kernels vs their torch references (Triton interpreter on CPU, real sizes with -m gpu)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.attention.decode import paged_attention_decode, paged_attention_decode_ref  # noqa: E402
from kernels.attention.prefill import (  # noqa: E402
    paged_attention_prefill,
    paged_attention_prefill_ref,
    store_kv,
    store_kv_ref,
)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _make_cache(seq_lens: list[int], block_size: int, kv_heads: int, head_dim: int, dtype, device,
                extra_blocks: int = 3):
    g = torch.Generator().manual_seed(sum(seq_lens) + block_size)
    blocks_per_seq = [max(1, -(-s // block_size)) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)  # scattered, non-contiguous pages
    max_blocks = max(blocks_per_seq) + 1
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    pos = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = perm[pos : pos + n]
        pos += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    return k_cache, v_cache, tables.to(device)


CPU_CASES = [  # (heads, kv_heads, head_dim, block_size, dtype)
    (4, 2, 32, 16, torch.float32),
    (8, 1, 64, 32, torch.float16),
    (3, 3, 16, 16, torch.float32),
]


@pytest.mark.parametrize("case", CPU_CASES)
def test_store_kv(case):
    _, kv_heads, head_dim, block_size, dtype = case
    torch.manual_seed(0)
    k_cache = torch.randn(6, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    k = torch.randn(7, kv_heads, head_dim).to(dtype)
    v = torch.randn(7, kv_heads, head_dim).to(dtype)
    slots = torch.tensor([3, -1, 17, 5 * block_size + 1, -1, 0, 2 * block_size + 7])
    kr, vr = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, kr, vr, slots)
    store_kv(k, v, k_cache, v_cache, slots.to(torch.int32))
    assert torch.equal(k_cache, kr) and torch.equal(v_cache, vr)


@pytest.mark.parametrize("case", CPU_CASES)
@pytest.mark.parametrize("num_splits,fused", [(1, True), (3, True), (3, False)])
def test_decode(case, num_splits, fused):
    from kernels.attention.decode import _COUNTERS

    heads, kv_heads, head_dim, block_size, dtype = case
    seq_lens = [37, 0, 1, 150, 64]
    k_cache, v_cache, tables = _make_cache(seq_lens, block_size, kv_heads, head_dim, dtype, "cpu")
    q = torch.randn(len(seq_lens), heads, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = paged_attention_decode_ref(q, k_cache, v_cache, lens, tables, head_dim**-0.5)
    for _ in range(2 if fused and num_splits > 1 else 1):  # the fused merge leaves its counters at zero
        out = paged_attention_decode(q, k_cache, v_cache, lens, tables, head_dim**-0.5, num_splits=num_splits,
                                     fused_merge=fused)
        assert out[1].abs().max() == 0  # padding row
        assert _rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 3e-3)
        assert all(int(c.count_nonzero()) == 0 for c in _COUNTERS.values())


class _CountLaunches:
    """A Triton kernel that records each launch's grid, then launches it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_decode_config_fuses_the_merge_up_to_its_split_count(monkeypatch):
    # fused_merge_max_splits: launches of up to that many splits merge in the split kernel (no second launch),
    # more splits launch the merge kernel; the same outputs as the reference either way
    import kernels.attention.decode as decode
    from kernels.attention.config import decode_config

    heads, kv_heads, head_dim, block_size, dtype = CPU_CASES[0]
    seq_lens = [37, 0, 150]
    k_cache, v_cache, tables = _make_cache(seq_lens, block_size, kv_heads, head_dim, dtype, "cpu")
    q = torch.randn(len(seq_lens), heads, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = paged_attention_decode_ref(q, k_cache, v_cache, lens, tables, head_dim**-0.5)
    cfg = {**decode_config(head_dim, dtype), "fused_merge_max_splits": 4}
    reduce = _CountLaunches(decode._reduce_kernel)
    monkeypatch.setattr(decode, "_reduce_kernel", reduce)
    for splits, launches in ((4, 0), (5, 1)):
        reduce.grids.clear()
        out = paged_attention_decode(q, k_cache, v_cache, lens, tables, head_dim**-0.5, num_splits=splits, config=cfg)
        assert len(reduce.grids) == launches, splits
        assert _rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 3e-3)
        assert all(int(c.count_nonzero()) == 0 for c in decode._COUNTERS.values())  # left at zero for the next
    for bad in (-1, 12, True):  # a power of two: split counts share compiled kernels by them (decode_variants)
        with pytest.raises(ValueError, match="fused_merge_max_splits"):
            paged_attention_decode(q, k_cache, v_cache, lens, tables, 0.1,
                                   config={**cfg, "fused_merge_max_splits": bad})


def test_decode_num_splits_grow_as_the_batch_shrinks():
    from kernels.attention.decode_plan import decode_num_splits

    # one long request on 132 SMs: enough splits for ~2 programs per SM; a full batch needs none
    assert decode_num_splits(1, 4, 131072, 132) == 64  # the default max_splits
    assert decode_num_splits(1, 8, 32768, 132) == 33
    assert decode_num_splits(16, 4, 131072, 132) == 5
    assert decode_num_splits(256, 4, 4096, 132) == 1
    # B=1 at 4k fills the GPU: 4 KV heads x 32 splits of 128 tokens (it was 16 splits of 256: 64 of 132 SMs)
    assert decode_num_splits(1, 4, 4096, 132) == 32
    assert decode_num_splits(1, 4, 1024, 132) == 8  # at least min_split_tokens (128) per split
    assert decode_num_splits(1, 4, 4096, 132, programs_per_sm=4, min_split_tokens=64) == 64
    assert decode_num_splits(2, 4, 4096, 132, programs_per_sm=1, min_split_tokens=64) == 17
    # more than 64 splits where max_splits allows them: 8 programs per SM at 32k / 128k, 128 tokens each at most
    assert decode_num_splits(1, 4, 131072, 132, programs_per_sm=8, max_splits=512) == 264
    assert decode_num_splits(1, 4, 32768, 132, programs_per_sm=8, max_splits=256) == 256
    assert decode_num_splits(1, 4, 32768, 132, programs_per_sm=4, min_split_tokens=512, max_splits=256) == 64
    with pytest.raises(ValueError, match="max_splits"):
        decode_num_splits(1, 4, 32768, 132, max_splits=1024)


@pytest.mark.parametrize("case", CPU_CASES)
def test_prefill(case):
    heads, kv_heads, head_dim, block_size, dtype = case
    q_lens = [5, 1, 0, 37]
    seq_lens = [5, 20, 9, 101]  # the last three have a cached prefix
    k_cache, v_cache, tables = _make_cache(seq_lens, block_size, kv_heads, head_dim, dtype, "cpu")
    num_tokens = sum(q_lens) + 2  # two padding tokens at the end
    q = torch.randn(num_tokens, heads, head_dim).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = (q, k_cache, v_cache, cu, lens, tables, head_dim**-0.5, max(q_lens))
    ref = paged_attention_prefill_ref(*args)
    out = paged_attention_prefill(*args)
    assert out[-2:].abs().max() == 0
    assert _rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 3e-3)


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 64])
def test_decode_gpu(head_dim, block_size):
    torch.manual_seed(1)
    seq_lens = [1, 0, 4000, 17, 32768, 513, 1024, 2047]
    k_cache, v_cache, tables = _make_cache(seq_lens, block_size, 4, head_dim, torch.bfloat16, "cuda")
    q = torch.randn(len(seq_lens), 32, head_dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    ref = paged_attention_decode_ref(q, k_cache, v_cache, lens, tables, head_dim**-0.5)
    for splits in (None, 1, 7):
        out = paged_attention_decode(q, k_cache, v_cache, lens, tables, head_dim**-0.5, num_splits=splits)
        assert _rel_err(out, ref) < 1e-2 and out[1].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8, 6])
def test_prefill_gpu(head_dim, group):
    torch.manual_seed(2)
    q_lens, seq_lens = [300, 1, 2048, 77], [300, 900, 4096, 77]
    k_cache, v_cache, tables = _make_cache(seq_lens, 16, 2, head_dim, torch.bfloat16, "cuda")
    q = torch.randn(sum(q_lens), 2 * group, head_dim, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    args = (q, k_cache, v_cache, cu, lens, tables, head_dim**-0.5, max(q_lens))
    assert _rel_err(paged_attention_prefill(*args), paged_attention_prefill_ref(*args)) < 1e-2


@pytest.mark.gpu
def test_store_kv_gpu():
    k_cache = torch.randn(100, 16, 4, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    k, v = torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(1600, device="cuda")[:300]
    slots[::7] = -1
    kr, vr = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, kr, vr, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, kr) and torch.equal(v_cache, vr)


# ------------------------------------------------------------------------------------------- FP8 KV

FP8 = torch.float8_e4m3fn


def _fp8_cache(seq_lens: list[int], block_size: int, kv_heads: int, head_dim: int, scales: tuple[float, float],
               device="cpu"):
    # a float cache and its FP8 copy (value / scale), the float one rounded to what FP8 holds
    k_cache, v_cache, tables = _make_cache(seq_lens, block_size, kv_heads, head_dim, torch.float32, device)
    k8, v8 = ((c / s).clamp(-448, 448).to(FP8) for c, s in zip((k_cache, v_cache), scales))
    return k8, v8, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_fp8(dtype):
    kv_heads, head_dim, block_size = 2, 32, 16
    g = torch.Generator().manual_seed(5)
    k8 = torch.zeros(6, block_size, kv_heads, head_dim, dtype=FP8)
    v8 = torch.zeros_like(k8)
    k = (3 * torch.randn(9, kv_heads, head_dim, generator=g)).to(dtype)
    v = (3 * torch.randn(9, kv_heads, head_dim, generator=g)).to(dtype)
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, 448 * 0.5])  # saturates at +-448 * scale, never NaN
    slots = torch.tensor([3, -1, 17, 5 * block_size + 1, -1, 0, 2 * block_size + 7, 40, 41])
    kr, vr = k8.clone(), v8.clone()
    store_kv_ref(k, v, kr, vr, slots, 0.5, 2.0)
    store_kv(k, v, k8, v8, slots.to(torch.int32), 0.5, 2.0)
    assert not k8.float().isnan().any() and k8.float().abs().max() == 448
    _assert_fp8_close(k8, kr)
    _assert_fp8_close(v8, vr)
    assert kr.float()[0, 3, 0, 0] == 448 and kr.float()[0, 3, 0, 2] == 0


def _assert_fp8_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    got, ref = got.float(), ref.float()
    if torch.cuda.is_available():
        assert torch.equal(got, ref)
        return
    # Triton's interpreter rounds ties away from zero, subnormals (< 2^-6) its own way, and drops the carry
    # when rounding up to a power of two (1.96 -> 1.0, not 2.0): allow one e4m3 step, or that carry
    pow2 = (ref != 0) & (torch.log2(ref.abs()) == torch.log2(ref.abs()).round())
    one_step = (got - ref).abs() <= 0.125 * ref.abs() + 2**-9
    assert (one_step | (pow2 & (got == ref / 2))).all()
    assert (got == ref).float().mean() > 0.9


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_fp8(num_splits):
    from kernels.attention.decode import paged_attention_decode_ref as ref_fn

    heads, kv_heads, head_dim, block_size = 8, 2, 32, 16
    seq_lens = [37, 0, 1, 150]
    scales = (0.25, 0.5)
    k8, v8, tables = _fp8_cache(seq_lens, block_size, kv_heads, head_dim, scales)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=torch.Generator().manual_seed(6))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = ref_fn(q, k8, v8, lens, tables, head_dim**-0.5, *scales)
    out = paged_attention_decode(q, k8, v8, lens, tables, head_dim**-0.5, *scales, num_splits=num_splits)
    assert out[1].abs().max() == 0
    assert _rel_err(out, ref) < 1e-4
    # the same as attending over the dequantized float cache
    deq = paged_attention_decode_ref(q, k8.float() * scales[0], v8.float() * scales[1], lens, tables, head_dim**-0.5)
    assert _rel_err(ref, deq) < 1e-6


def test_prefill_fp8():
    heads, kv_heads, head_dim, block_size = 4, 2, 32, 16
    q_lens, seq_lens = [5, 1, 37], [5, 20, 101]
    scales = (2.0, 0.125)
    k8, v8, tables = _fp8_cache(seq_lens, block_size, kv_heads, head_dim, scales)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=torch.Generator().manual_seed(7)).to(torch.float16)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    args = (q, k8, v8, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, head_dim**-0.5, max(q_lens))
    ref = paged_attention_prefill_ref(*args, *scales)
    assert _rel_err(paged_attention_prefill(*args, *scales), ref) < 3e-3
    deq = paged_attention_prefill_ref(q.float(), k8.float() * scales[0], v8.float() * scales[1], *args[3:])
    assert _rel_err(ref, deq) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 4), (96, 8)])  # Qwen3-30B-A3B, GLM-4.5-Air
def test_fp8_kv_attention_gpu(heads, kv_heads):
    # real shapes: the FP8 cache written by store_kv, read by decode and by an extend over a long prefix;
    # vs the same kernels on a bf16 cache (accuracy) and vs the FP8 torch reference (kernel correctness)
    from kernels.attention.decode import paged_attention_decode_ref as decode_ref

    torch.manual_seed(3)
    head_dim, block_size, scales = 128, 16, (0.05, 0.02)
    seq_lens = [32768, 1, 4000, 130]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 1
    tables = torch.zeros(len(seq_lens), max(-(-s // block_size) for s in seq_lens), dtype=torch.int32)
    perm, pos = torch.randperm(num_blocks), 0
    slots = []
    for b, s in enumerate(seq_lens):
        n = -(-s // block_size)
        tables[b, :n] = perm[pos : pos + n]
        pos += n
        slots += [int(tables[b, i // block_size]) * block_size + i % block_size for i in range(s)]
    tables, slots = tables.cuda(), torch.tensor(slots, device="cuda")
    k = 0.05 * torch.randn(len(slots), kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = 0.05 * torch.randn_like(k)
    caches = {}
    for dtype in (torch.bfloat16, FP8):
        kc = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
        vc = torch.zeros_like(kc)
        store_kv(k, v, kc, vc, slots, *(scales if dtype == FP8 else (1.0, 1.0)))
        caches[dtype] = (kc, vc)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    # |k| ~ 0.05: q of 20 gives scores of std ~1, a softmax that is neither flat nor one-hot
    q = 20 * torch.randn(len(seq_lens), heads, head_dim, device="cuda", dtype=torch.bfloat16)
    dec_bf16 = paged_attention_decode(q, *caches[torch.bfloat16], lens, tables, head_dim**-0.5)
    dec_fp8 = paged_attention_decode(q, *caches[FP8], lens, tables, head_dim**-0.5, *scales)
    assert _rel_err(dec_fp8, decode_ref(q, *caches[FP8], lens, tables, head_dim**-0.5, *scales)) < 1e-2
    assert _rel_err(dec_fp8, dec_bf16) < 0.06  # e4m3 keeps 3 mantissa bits: ~4% on random data
    # extend: the last 512 tokens of the 32k sequence over its cached prefix (the reference holds all scores)
    q_ext = 20 * torch.randn(512, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 512], dtype=torch.int32, device="cuda")
    args = (cu, lens[:1], tables[:1], head_dim**-0.5, 512)
    ext_bf16 = paged_attention_prefill(q_ext, *caches[torch.bfloat16], *args)
    ext_fp8 = paged_attention_prefill(q_ext, *caches[FP8], *args, *scales)
    assert _rel_err(ext_fp8, paged_attention_prefill_ref(q_ext, *caches[FP8], *args, *scales)) < 1e-2
    assert _rel_err(ext_fp8, ext_bf16) < 0.06
    print(f"fp8 vs bf16 KV, heads {heads}/{kv_heads}: decode rel err {_rel_err(dec_fp8, dec_bf16):.4f}, "
          f"extend rel err {_rel_err(ext_fp8, ext_bf16):.4f}")


@pytest.mark.gpu
def test_store_kv_fp8_gpu():
    k8 = torch.zeros(100, 16, 4, 128, device="cuda", dtype=FP8)
    v8 = torch.zeros_like(k8)
    k, v = 3 * torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16)
    k[0, 0, :2] = 1e4
    slots = torch.randperm(1600, device="cuda")[:300]
    slots[::7] = -1
    kr, vr = k8.clone(), v8.clone()
    store_kv_ref(k, v, kr, vr, slots, 0.5, 0.25)
    store_kv(k, v, k8, v8, slots, 0.5, 0.25)
    _assert_fp8_close(k8, kr)  # on the GPU: equal to torch's rounding
    _assert_fp8_close(v8, vr)


@pytest.mark.parametrize("head_dim,num_splits", [(36, 1), (36, 3), (18, 2)])
def test_decode_fp8_f16_q(head_dim, num_splits):
    # a 16-bit q over an FP8 cache: the dots run in fp16
    heads, kv_heads, block_size = 6, 2, 16
    seq_lens = [37, 0, 1, 150]
    scales = (0.25, 0.5)
    k8, v8, tables = _fp8_cache(seq_lens, block_size, kv_heads, head_dim, scales)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=torch.Generator().manual_seed(8)).to(torch.float16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = paged_attention_decode_ref(q, k8, v8, lens, tables, head_dim**-0.5, *scales)
    out = paged_attention_decode(q, k8, v8, lens, tables, head_dim**-0.5, *scales, num_splits=num_splits)
    assert out[1].abs().max() == 0
    assert _rel_err(out, ref) < 3e-3
