"""Paged attention kernels vs their torch references (Triton interpreter on CPU, real sizes with -m gpu)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.attention import (  # noqa: E402
    paged_attention_decode,
    paged_attention_decode_ref,
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
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode(case, num_splits):
    heads, kv_heads, head_dim, block_size, dtype = case
    seq_lens = [37, 0, 1, 150, 64]
    k_cache, v_cache, tables = _make_cache(seq_lens, block_size, kv_heads, head_dim, dtype, "cpu")
    q = torch.randn(len(seq_lens), heads, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = paged_attention_decode_ref(q, k_cache, v_cache, lens, tables, head_dim**-0.5)
    out = paged_attention_decode(q, k_cache, v_cache, lens, tables, head_dim**-0.5, num_splits=num_splits)
    assert out[1].abs().max() == 0  # padding row
    assert _rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 3e-3)


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
