"""FP8 extend through a 16-bit scratch (kernels/attention/fp8_scratch.py): the page-widening kernel vs torch, the
prefill over the scratch vs the in-loop FP8 widening (bit for bit at the same tiles) and vs the torch reference, the
rule that picks it, and a tiny FP8-KV engine's greedy tokens for a long prompt in chunks with it on and off."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kernels.attention.fp8_scratch as fs  # noqa: E402
from kernels.attention.config import PREFILL_KNOB_DEFAULTS, check_config, default_prefill_config  # noqa: E402
from kernels.attention.prefill import paged_attention_prefill, paged_attention_prefill_ref  # noqa: E402

FP8 = torch.float8_e4m3fn
SCALES = (0.5, 0.125)  # k_scale, v_scale


def _fp8_pages(seq_lens: list[int], block_size: int, kv_heads: int, head_dim: int, seed: int = 0,
               strided: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # FP8 K/V caches over shuffled pages (every e4m3 magnitude class: values up to ~448 and subnormals), block
    # tables one page wider than the longest sequence, padded with a page id that must not be read (-> garbage);
    # strided: the caches are views of one [2, ..., head_dim + 8] pool, as a layer's slice of a larger buffer
    g = torch.Generator().manual_seed(seed)
    pages = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(pages) + 2
    shape = (num_blocks, block_size, kv_heads, head_dim)
    pool = torch.randn(2, *shape[:3], head_dim + 8 * strided, generator=g) * torch.exp2(
        torch.randint(-12, 9, (2, *shape[:3], head_dim + 8 * strided), generator=g).float())
    pool = pool.clamp(-448, 448).to(FP8)
    k8, v8 = pool[0, ..., :head_dim], pool[1, ..., :head_dim]
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seq_lens), max(pages) + 1), int(perm[-1]), dtype=torch.int32)
    pos = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[pos : pos + n]
        pos += n
    return k8, v8, tables


@pytest.mark.parametrize("block_size,kv_heads,head_dim,strided", [(8, 3, 24, False), (16, 2, 32, True),
                                                                   (32, 3, 128, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_widen_pages_matches_torch(block_size: int, kv_heads: int, head_dim: int, strided: bool,
                                   dtype: torch.dtype) -> None:
    # prefixes off the page grid, one empty row, more pages than one program's (4); (32, 3, 128): a page's 96 rows
    # in two row chunks of 64
    seq_lens = [37, 0, 5 * block_size + 1, 9 * block_size] if block_size < 32 else [70, 0, 33]
    k8, v8, tables = _fp8_pages(seq_lens, block_size, kv_heads, head_dim, strided=strided)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    rows, width = tables.shape
    shape = (rows * width + 3, block_size, kv_heads, head_dim)
    got = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(2)]
    ref = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(2)]
    fs.widen_kv_pages(k8, v8, lens, tables, *got)
    fs.widen_kv_pages_ref(k8, v8, lens, tables, *ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)  # exact, untouched pages stay NaN
    # and the reference is what the cache holds: page j of row b at b * width + j, e4m3 -> dtype exact
    b, j = 2, (seq_lens[2] - 1) // block_size  # the last (partial) page of row 2
    assert torch.equal(ref[0][b * width + j].double(), k8[int(tables[b, j])].double())
    assert torch.isnan(ref[1][1 * width]).all()  # the empty row widened nothing


def test_widen_pages_checks_shapes() -> None:
    k8, v8, tables = _fp8_pages([20], 8, 2, 16)
    small = torch.empty(tables.numel() - 1, 8, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="does not hold"):
        fs.widen_kv_pages(k8, v8, torch.tensor([20], dtype=torch.int32), tables, small, small.clone())


def _extend_case(q_dtype: torch.dtype, block_size: int = 8):
    # four sequences: chunks of 37 / 5 / 0 / 20 new tokens over cached prefixes of 50 / 0 / 13 / 31 tokens (none a
    # multiple of the page), heads 6 / kv 2 (GROUP 3: no packing) and head_dim 32
    heads, kv_heads, head_dim = 6, 2, 32
    q_lens, prefixes = [37, 5, 0, 20], [50, 0, 13, 31]
    seq_lens = [p + q for p, q in zip(prefixes, q_lens)]
    k8, v8, tables = _fp8_pages(seq_lens, block_size, kv_heads, head_dim, seed=1)
    # |stored| up to 448 times k_scale 0.5: a q of ~1/50 keeps the scores in a softmax that is neither flat nor one-hot
    k8, v8 = (c.float().clamp(-8, 8).to(FP8) for c in (k8, v8))
    q = (torch.randn(sum(q_lens), heads, head_dim, generator=torch.Generator().manual_seed(2)) * 0.3).to(q_dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return (q, k8, v8, cu, lens, tables, head_dim**-0.5, max(q_lens)), head_dim


@pytest.fixture
def widen_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    inner = fs.widen_kv_pages

    def spy(*args: Any) -> None:
        calls.append(args[3].shape[0])
        inner(*args)

    monkeypatch.setattr(fs, "widen_kv_pages", spy)
    return calls


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_extend_through_scratch_equals_in_loop_widening(q_dtype: torch.dtype, widen_calls: list[int]) -> None:
    args, head_dim = _extend_case(q_dtype)
    tiles = {**default_prefill_config(head_dim), "BLOCK_M": 32, "BLOCK_N": 16}
    in_loop = paged_attention_prefill(*args, *SCALES, config={**tiles, "FP8_SCRATCH_MIN_Q": 0})
    assert widen_calls == []
    scratch = paged_attention_prefill(*args, *SCALES, config={**tiles, "FP8_SCRATCH_MIN_Q": 37})
    assert widen_calls == [4]  # one widening of the batch's four rows
    # the same fp16 (fp32) values in the same tiles and order: bit for bit
    assert torch.equal(scratch, in_loop)
    ref = paged_attention_prefill_ref(*args, *SCALES)
    err = ((scratch.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < {torch.float16: 3e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[q_dtype], err  # out in q's dtype
    assert scratch[37 + 5 :].abs().amax() > 0  # the row after the empty one was attended


def test_extend_through_scratch_other_tiles_within_rounding(widen_calls: list[int]) -> None:
    # the scratch launch runs q's dtype's tiles (its table entry, or the caller's config): another BLOCK_N moves the
    # online softmax's tile boundaries, so the result equals the in-loop one within fp rounding only
    args, head_dim = _extend_case(torch.float16, block_size=16)
    base = {**default_prefill_config(head_dim), "BLOCK_M": 32}
    in_loop = paged_attention_prefill(*args, *SCALES, config={**base, "BLOCK_N": 32, "FP8_SCRATCH_MIN_Q": 0})
    scratch = paged_attention_prefill(*args, *SCALES, config={**base, "BLOCK_N": 16, "FP8_SCRATCH_MIN_Q": 1})
    assert widen_calls == [4]
    torch.testing.assert_close(scratch, in_loop, rtol=2e-3, atol=2e-3)


def test_scratch_rule(widen_calls: list[int]) -> None:
    args, head_dim = _extend_case(torch.float16)
    q, k8, _, _, _, tables, _, max_q = args
    cfg = {**default_prefill_config(head_dim), "FP8_SCRATCH_MIN_Q": max_q}
    plan = lambda c, **kw: fs.fp8_scratch_plan(c, kw.get("q", q), kw.get("k", k8), tables, 4,  # noqa: E731
                                               kw.get("max_q", max_q), kw.get("tile_map"))
    assert plan(cfg)
    assert not plan(cfg, max_q=max_q - 1)  # the step's longest query below the threshold
    assert not plan({**cfg, "FP8_SCRATCH_MIN_Q": 0})  # off
    assert not plan({**cfg, "FP8_DOT": 1})  # e4m3 dots: the stored tiles, another arithmetic
    assert not plan(cfg, tile_map=torch.zeros(1, 2, dtype=torch.int32))  # a fixed grid (CUDA graphs)
    assert not plan(cfg, k=k8.to(torch.float16))  # a 16-bit cache needs no widening
    cap = 4 * tables.shape[1] * k8.shape[1]  # rows x width pages of block_size tokens
    assert plan({**cfg, "FP8_SCRATCH_MAX_TOKENS": cap}) and not plan({**cfg, "FP8_SCRATCH_MAX_TOKENS": cap - 1})
    assert PREFILL_KNOB_DEFAULTS["FP8_SCRATCH_MIN_Q"] > 0  # on by default
    # below the threshold the prefill widens in its loop, as before
    paged_attention_prefill(*args, *SCALES, config={**cfg, "FP8_SCRATCH_MIN_Q": max_q + 1})
    assert widen_calls == []
    with pytest.raises(ValueError, match="FP8_SCRATCH"):
        check_config({**cfg, "FP8_SCRATCH_MIN_Q": -1}, ("BLOCK_M",), head_dim)


def test_scratch_grows_and_is_reused() -> None:
    fs._SCRATCH.clear()
    page, cpu = (8, 2, 16), torch.device("cpu")
    pages = lambda: [buf.shape[1] for buf, _ in fs._SCRATCH.values()]  # noqa: E731
    k1, v1, t1 = fs.scratch_pages(2, 3, page, torch.float16, cpu, max_pages=100)
    assert k1.shape == (6, *page) and t1.tolist() == [[0, 1, 2], [3, 4, 5]] and pages() == [8]  # a power of two
    assert k1.stride() == v1.stride() and k1.data_ptr() != v1.data_ptr()
    k2, _, _ = fs.scratch_pages(1, 5, page, torch.float16, cpu, max_pages=100)
    assert k2.data_ptr() == k1.data_ptr()  # fits: reused
    k3, _, t3 = fs.scratch_pages(3, 4, page, torch.float16, cpu, max_pages=13)
    assert k3.shape[0] == 12 and t3[2].tolist() == [8, 9, 10, 11] and pages() == [13]  # the cap, the old one dropped
    fs.scratch_pages(5, 4, page, torch.float16, cpu, max_pages=13)
    assert pages() == [20]  # a step past the cap (a config's) gets what it needs


def test_engine_fp8_kv_long_prompt_same_tokens_with_scratch(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                            widen_calls: list[int]) -> None:
    # a tiny FP8-KV engine on the Triton kernels (interpreter): a 139-token prompt in 64-token chunks, each chunk an
    # extend over the cache of the earlier ones; the chunks widen through the scratch (threshold 32) and give the
    # greedy tokens of the in-loop widening (threshold 0: the code before the scratch)
    from tests.test_engine import make_llm, ours
    from tests.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path / "qwen3"), "Qwen3ForCausalLM", num_hidden_layers=1)
    prompt = torch.randint(3, 500, (139,), generator=torch.Generator().manual_seed(0)).tolist()
    got = {}
    for min_q in (0, 32):
        monkeypatch.setitem(PREFILL_KNOB_DEFAULTS, "FP8_SCRATCH_MIN_Q", min_q)
        llm = make_llm(path, kv_cache_dtype="fp8", kernel_backend="triton", max_num_batched_tokens=64)
        got[min_q] = ours(llm, [prompt], 3)
        # one per 64-token chunk (one layer); the last chunk's 11 tokens stay under the threshold: in-loop widening
        assert widen_calls == ([] if min_q == 0 else [1, 1]), widen_calls
    assert got[32] == got[0] and len(got[0][0]) == 3


_SM90_PROBE = """
import json, sys
sys.path.insert(0, "benchmarks")
from attention_ir import BLOCK, HEAD_DIM, compile_sm90, report
from kernels.attention.fp8_scratch import _widen_pages_kernel
from kernels.attention.prefill import _prefill_kernel

def prefill(q, kv, fp8_as_f16, q_f16):  # the H200 table's d128_bf16 tiles at Qwen3-30B-A3B heads (32 / 4)
    args = dict(q_ptr=q, k_cache_ptr=kv, v_cache_ptr=kv, seq_lens_ptr="i32", block_tables_ptr="i32", out_ptr="bf16",
                qk_scale=0.1, v_scale=0.1, stride_cb=BLOCK * 4 * HEAD_DIM, stride_cs=4 * HEAD_DIM, stride_ch=HEAD_DIM,
                stride_bt=2048, cu_seqlens_ptr="i32", stride_qt=32 * HEAD_DIM, stride_qh=HEAD_DIM,
                stride_ot=32 * HEAD_DIM, stride_oh=HEAD_DIM, num_tokens=4096, batch=1)
    consts = dict(GROUP=8, PACK=8, HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM, BLOCK_SIZE=BLOCK, BLOCK_M=128, BLOCK_N=128,
                  FP8_AS_F16=fp8_as_f16, OFF64=False, tile_map_ptr=None, TILE_MAP=False, ZERO_FILL=True,
                  MASK_FREE=True, Q_F16=q_f16, k_new_desc=None, v_new_desc=None)
    return report(compile_sm90(_prefill_kernel, args, consts, 8, 3))

args = dict(k_ptr="fp8e4nv", v_ptr="fp8e4nv", k_out_ptr="fp16", v_out_ptr="fp16", seq_lens_ptr="i32",
            block_tables_ptr="i32", stride_bt=8192, width=8192, stride_cb=8192, stride_cs=512, stride_ch=128,
            stride_ob=8192, stride_os=512, stride_oh=128)
consts = dict(BLOCK_SIZE=16, NUM_KV_HEADS=4, HEAD_DIM=128, BLOCK_R=64, BLOCK_D=128, PAGES=4)
widen = report(compile_sm90(_widen_pages_kernel, args, consts, 4, 1))
print(json.dumps([prefill("bf16", "bf16", False, False), prefill("fp16", "fp16", True, True), widen]))
"""


def test_scratch_launch_compiles_as_the_bf16_kernel_for_sm90() -> None:
    # no GPU needed: the launch over the scratch (fp16 q and tiles; FP8_AS_F16 with Q_F16: no cast in the kernel) is
    # the 16-bit kernel a bf16 cache runs, instruction for instruction in count: triple-buffered K/V (the in-loop
    # FP8 widening compiles single-buffered), the same registers and shared memory, wgmma; the widening kernel spills
    # nothing
    from tests.sm90 import run_sm90_probe

    bf16, scratch, widen = run_sm90_probe(_SM90_PROBE)
    keys = ("registers", "spill_bytes", "shared_bytes", "mma", "hgmma", "kv_buffer_depths", "sass_total")
    assert {k: scratch[k] for k in keys} == {k: bf16[k] for k in keys}, (scratch, bf16)
    assert scratch["spill_bytes"] == 0 and scratch["mma"] == "wgmma" and min(scratch["kv_buffer_depths"]) >= 2
    assert widen["spill_bytes"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 4), (96, 8)])  # Qwen3-30B-A3B, GLM-4.5-Air
def test_fp8_scratch_gpu(heads: int, kv_heads: int) -> None:
    # real shapes: two sequences, a 1024-token chunk over a 16000-token prefix and a 300-token chunk over 777 (off
    # the page grid): the widening vs torch exactly; the extend through the scratch vs the in-loop widening at the
    # same tiles, at the tables' tiles (the bf16 entry's for the scratch: within rounding), and vs the
    # torch reference
    from kernels.attention.config import prefill_config

    torch.manual_seed(0)
    head_dim, block_size, dev = 128, 16, torch.device("cuda")
    q_lens, seq_lens = [1024, 300], [17024, 1077]  # the reference's fp32 scores: 96 x 1024 x 17024 (6.7 GB) at most
    k8, v8, tables = (t.to(dev) for t in _fp8_pages(seq_lens, block_size, kv_heads, head_dim))
    k8, v8 = ((0.05 * c.float().clamp(-8, 8)).to(FP8) for c in (k8, v8))  # |stored| <= 0.4: std ~1 scores below
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    rows, width = tables.shape
    got = [torch.full((rows * width, block_size, kv_heads, head_dim), float("nan"), dtype=torch.float16, device=dev)
           for _ in range(2)]
    ref = [g.clone() for g in got]
    fs.widen_kv_pages(k8, v8, lens, tables, *got)
    fs.widen_kv_pages_ref(k8, v8, lens, tables, *ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)
    q = 4 * torch.randn(sum(q_lens), heads, head_dim, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=dev)
    args = (q, k8, v8, cu, lens, tables, head_dim**-0.5, max(q_lens), *SCALES)
    fp8_cfg = {**prefill_config(head_dim, FP8, dev), "FP8_DOT": 0}
    in_loop = paged_attention_prefill(*args, config={**fp8_cfg, "FP8_SCRATCH_MIN_Q": 0})
    same_tiles = paged_attention_prefill(*args, config={**fp8_cfg, "FP8_SCRATCH_MIN_Q": 1})
    table = paged_attention_prefill(*args)  # the table path: the scratch (1024 >= the threshold), bf16 tiles
    ref_out = paged_attention_prefill_ref(*args)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    print(f"heads {heads}/{kv_heads}: same tiles max diff {(same_tiles.float() - in_loop.float()).abs().max():.1e}, "
          f"table path max diff {(table.float() - in_loop.float()).abs().max():.1e}, vs ref {rel(table, ref_out):.1e}")
    # the same fp16 operands in the same tiles: equal unless the two compilations pick different MMA instructions
    # (the printed max diff says which); the tables' tiles move the softmax's tile boundaries: rounding only
    assert rel(same_tiles, in_loop) < 1e-3
    assert rel(table, in_loop) < 1e-2 and rel(table, ref_out) < 1e-2


_SPEC_PROBE = """
import json
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from kernels.attention.fp8_scratch import _widen_pages_kernel as kernel

binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
ptr = torch.empty(16, dtype=torch.int32)

def specialization(width):  # what a launch's compile key holds for each argument
    _, spec, _ = binder(*[ptr] * 6, width, width, 8192, 512, 128, 8192, 512, 128, BLOCK_SIZE=16, NUM_KV_HEADS=4,
                        HEAD_DIM=128, BLOCK_R=64, BLOCK_D=128, PAGES=4)
    return [list(s) for s in spec]

print(json.dumps([specialization(w) for w in (512, 37, 1)]))
"""


def test_widen_kernel_one_variant_for_every_table_width() -> None:
    # the block table's width (stride and count) follows the step: a value Triton specialized on (== 1, % 16) would
    # compile another variant on the serving path when a real step's width is not a warm-up's (powers of two)
    from tests.sm90 import run_sm90_probe

    w512, w37, w1 = run_sm90_probe(_SPEC_PROBE)
    assert w512 == w37 == w1


def test_scratch_over_an_engine_step_layout(widen_calls: list[int]) -> None:
    # what model_runner.plan() builds: two rows sharing their first 5 pages (a prefix-cache hit), tables padded with
    # -1 past each row's pages, a row with no tokens, a lockstep padding row (q_len = the padding, no keys, table of
    # zeros) and padding tokens past the last row; this step's K/V stored into the FP8 cache first, then passed too
    # (PagedAttention.forward) under a RAGGED config: the scratch must read the chunk as stored (e4m3), as the in-loop
    # path and decode do, not the unrounded k / v
    from kernels.attention.prefill import store_kv_ref

    g = torch.Generator().manual_seed(3)
    block_size, heads, kv_heads, head_dim = 8, 4, 2, 32
    prefixes, q_lens = [40, 40, 0], [30, 26, 0]
    seq_lens = [p + q for p, q in zip(prefixes, q_lens)] + [0]  # + the padding row
    num_blocks = 20
    k8, v8 = ((torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g) * 2).to(FP8) for _ in range(2))
    shared, own0, own1 = [3, 7, 1, 12, 5], [9, 0, 17, 14], [2, 19, 11, 6]
    tables = torch.full((4, 11), -1, dtype=torch.int32)
    tables[0, :9], tables[1, :9], tables[2:] = torch.tensor(shared + own0), torch.tensor(shared + own1), 0
    pad = 7
    num_tokens = sum(q_lens) + pad + 3  # 3 tokens past the last row (cu[-1] < num_tokens)
    cu = torch.tensor([0, 30, 56, 56, 56 + pad], dtype=torch.int32)
    q = (torch.randn(num_tokens, heads, head_dim, generator=g) * 0.3).half()
    k_new, v_new = (torch.randn(num_tokens, kv_heads, head_dim, generator=g).half() for _ in range(2))
    slots = torch.full((num_tokens,), -1, dtype=torch.int64)
    for b in range(2):
        pos = torch.arange(prefixes[b], seq_lens[b])
        slots[int(cu[b]) : int(cu[b + 1])] = tables[b, pos // block_size].long() * block_size + pos % block_size
    store_kv_ref(k_new, v_new, k8, v8, slots, *SCALES)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = (q, k8, v8, cu, lens, tables, head_dim**-0.5, max(q_lens + [pad]))
    cfg = {**default_prefill_config(head_dim), "BLOCK_M": 32, "BLOCK_N": 16, "RAGGED": 1}
    in_loop = paged_attention_prefill(*args, *SCALES, config={**cfg, "FP8_SCRATCH_MIN_Q": 0}, k=k_new, v=v_new)
    scratch = paged_attention_prefill(*args, *SCALES, config={**cfg, "FP8_SCRATCH_MIN_Q": 1}, k=k_new, v=v_new)
    assert widen_calls == [4]
    assert torch.equal(scratch, in_loop)
    assert scratch[56:].abs().max() == 0  # the padding row and the tokens past it
    ref = paged_attention_prefill_ref(*args, *SCALES)
    assert ((scratch.float() - ref.float()).norm() / ref.float().norm()).item() < 3e-3


def test_scratch_reserve_bytes(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # the KV memory plan keeps the scratch's largest size free: the cap at Qwen3-30B-A3B's pages (512 MiB), a power
    # of two of the largest step's pages below it, nothing with the scratch off; an FP8-KV engine on the Triton
    # kernels reserves it for max_num_seqs + 1 rows of max_model_len, a bf16 one (or the torch kernels) nothing
    from tests.test_engine import make_llm
    from tests.tiny import make_tiny_checkpoint

    assert fs.scratch_reserve_bytes(16, 4, 128, torch.bfloat16, 10**6) == 512 << 20
    assert fs.scratch_reserve_bytes(16, 4, 128, torch.bfloat16, 100) == 2 * 128 * 16 * 4 * 128 * 2
    path = make_tiny_checkpoint(str(tmp_path / "qwen3"), "Qwen3ForCausalLM", num_hidden_layers=1)
    llm = make_llm(path, kv_cache_dtype="fp8", kernel_backend="triton", max_num_seqs=3, max_model_len=100)
    spec = llm.engine.model.kv_cache_spec()
    want = fs.scratch_reserve_bytes(8, spec.num_kv_heads, spec.head_dim, torch.float32, 4 * 13)
    assert llm.engine._fp8_scratch_bytes() == want == 2 * 64 * 8 * spec.num_kv_heads * spec.head_dim * 4
    monkeypatch.setitem(PREFILL_KNOB_DEFAULTS, "FP8_SCRATCH_MIN_Q", 0)
    assert fs.scratch_reserve_bytes(16, 4, 128, torch.bfloat16, 10**6) == 0 and llm.engine._fp8_scratch_bytes() == 0
    for kw in ({"kernel_backend": "triton"}, {"kv_cache_dtype": "fp8", "kernel_backend": "torch"}):
        monkeypatch.setitem(PREFILL_KNOB_DEFAULTS, "FP8_SCRATCH_MIN_Q", 256)
        assert make_llm(path, **kw).engine._fp8_scratch_bytes() == 0, kw
