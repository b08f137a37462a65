"""Decode attention's early_kv knob: each split's first K/V tile loaded before q (with the prologue fused in, before
the PDL wait too). Bit for bit the kernel without it under the interpreter: the split's first tile a plain one, the
owner's only tile (the new token in it, masked out of the early load and taken from registers), an empty split, a
padding row; 16-bit, float and FP8 caches, the FP8 tensor-core dots; with the prologue fused in and as the second of
two launches. On the sm90 PTX (no GPU): the cache is read before the wait only with the prologue fused in. On a GPU
(-m gpu): bit for bit compiled, and test_pdl.py's poisoned CUDA-graph chain with early_kv on."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.attention.decode import paged_attention_decode, paged_attention_decode_ref  # noqa: E402
from kernels.attention.decode_fused import paged_attention_decode_fused  # noqa: E402
from kernels.fp8 import FP8_DTYPE  # noqa: E402
from tests.test_decode_fused import SMALL, _inputs, _run, _same, _two_launches  # noqa: E402
from tests.test_decode_splits import CFG  # noqa: E402
from tests.test_decode_splits import _inputs as _split_inputs  # noqa: E402
from tests.test_kernels_attention import _rel_err  # noqa: E402

EARLY = dict(SMALL, early_kv=1)
_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9  # where PDL is on


def _early(cfg: dict) -> dict:
    # a decode config with early_kv on, its small-batch config's too
    small = cfg.get("small_batch_config")
    return {**cfg, "early_kv": 1, **({"small_batch_config": {**small, "early_kv": 1}} if small else {})}


def _early_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # this GPU's decode table with early_kv on: the launches given no config, and the tests that read the table
    import kernels.attention.config as acfg
    import kernels.attention.decode_plan as plan

    table = acfg.decode_config
    for module in (acfg, plan):
        monkeypatch.setattr(module, "decode_config", lambda *args, **kw: _early(table(*args, **kw)))


@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("page", [4, 24])
def test_fused_prologue_early_equals_late(splits, page):
    # 16-token tiles: 17 = the new token first in its split's tile (3 splits: chunks of 16, the owner's tile is its
    # first), 1 = alone, 20 / 37 / 50 mid-tile, 0 = padding; 7 splits: empty ones; pages of 24: tiles inside pages
    kw = _inputs([37, 0, 20, 50, 17, 1], 4, 2, 32, 16, torch.float32, torch.float32, seed=splits, page=page)
    got = _run(paged_attention_decode_fused, kw, num_splits=splits, config=EARLY)
    _same(got, _run(paged_attention_decode_fused, kw, num_splits=splits, config=SMALL))
    _same(got, _run(_two_launches, kw, num_splits=splits, config=EARLY))  # the plain kernel's early path
    assert not torch.equal(got[1], kw["k_cache"])  # it stored the new token


@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_fused_prologue_early_16_bit_and_fp8_cache(cache):
    dtype = torch.bfloat16 if cache == "bf16" else torch.float16
    kw = _inputs([70, 9, 0, 33], 4, 2, 32, 32, dtype, FP8_DTYPE if cache == "fp8" else dtype, seed=1)
    scales = dict(k_scale=0.02, v_scale=0.05) if cache == "fp8" else {}
    for splits in (1, 2, 5):
        got = _run(paged_attention_decode_fused, kw, num_splits=splits, config=EARLY, **scales)
        _same(got, _run(paged_attention_decode_fused, kw, num_splits=splits, config=SMALL, **scales))


@pytest.mark.parametrize("kv,fp8_dot", [("float", 0), ("fp8", 0), ("fp8", 1), ("fp8", 2), ("fp8", 3)])
def test_plain_kernel_early_equals_late(kv, fp8_dot):
    # the kernel on a q (no prologue): the new token's row is read from the cache, early load included; contexts of
    # 1100 (many tiles per split), 70 (at 8 splits one tile each, the early one alone, then empty splits), 16 and 1
    # (one partial tile) and a padding row; FP8: the widening dots and the e4m3 tensor-core ones (1, 2 with q's
    # second term, 3). (8 splits, not the split rule's 69: the early tile does not touch the merge, and each program
    # costs the interpreter)
    dtype = torch.float32 if kv == "float" else torch.float16
    args = _split_inputs(dtype, kv, seq_lens=(1100, 0, 70, 16, 1))
    cfg = dict(CFG, BLOCK_N=32 if fp8_dot else 16, fp8_dot=fp8_dot, fp8_q2=int(fp8_dot == 2))
    for splits in (1, 3, 8):
        late = paged_attention_decode(*args, num_splits=splits, config=cfg)
        early = paged_attention_decode(*args, num_splits=splits, config=dict(cfg, early_kv=1))
        assert torch.equal(early, late), (splits, (early - late).abs().max().item())
    if not fp8_dot:
        assert _rel_err(early, paged_attention_decode_ref(*args)) < (1e-5 if kv == "float" else 3e-3)


@pytest.mark.parametrize("fp8_dot", [1, 2])
def test_fused_fp8_dot_early_equals_late(fp8_dot, monkeypatch):
    # the fused kernel's FP8 tensor-core path (FUSED_FP8_DOT, off by default): e4m3 early tiles; 21 and 33 at 2 splits
    # (32-token tiles): the owner's tile is its split's first, reused with the new token's e4m3 k / v from registers;
    # 33 at 1 split: a full early tile, then the owner's; a padding row. fp8_dot 2 with q's second term (the H200
    # table's); 3 differs from 2 only on the GPU (the interpreter stages V directly in both)
    import kernels.attention.decode_fused as decode_fused

    monkeypatch.setattr(decode_fused, "FUSED_FP8_DOT", True)
    kw = _inputs([33, 21, 0], 4, 2, 32, 32, torch.float16, FP8_DTYPE, seed=4)
    cfg = dict(SMALL, BLOCK_N=32, fp8_dot=fp8_dot, fp8_q2=int(fp8_dot == 2))
    scales = dict(k_scale=0.02, v_scale=0.05)
    for splits in (1, 2):
        got = _run(paged_attention_decode_fused, kw, num_splits=splits, config=dict(cfg, early_kv=1), **scales)
        _same(got, _run(paged_attention_decode_fused, kw, num_splits=splits, config=cfg, **scales))


def test_cache_read_before_the_wait_only_with_the_prologue_fused():
    # the sm90 PTX of the early variants (tests/pdl_sm90.py's cases, test_pdl.py's checker; test_pdl.py checks the
    # rule for every case): with the prologue fused in the K/V caches join the step inputs read before
    # griddepcontrol.wait; without it (the predecessor stores the new token) they do not; no spills
    from tests.sm90 import run_sm90_probe
    from tests.test_pdl import pre_wait

    probe = """
import json
from tests.pdl_sm90 import cases
from attention_ir import compile_sm90, report
out = {}
for name in ("decode_attention_early", "decode_attention_prologue_early"):
    kernel, args, consts, warps, stages, allowed = cases()[name]
    k = compile_sm90(kernel, args, dict(consts, PDL=True), warps, stages)
    out[name] = dict(ptx=k.asm["ptx"], params=[a for a in kernel.arg_names if a in args], allowed=allowed,
                     spill=report(k)["spill_bytes"])
print(json.dumps(out))
"""
    res = run_sm90_probe(probe)
    for name, caches in (("decode_attention_early", False), ("decode_attention_prologue_early", True)):
        c = res[name]
        rep = pre_wait(c["ptx"], c["params"])
        read = set().union(*rep["loads"]) & ({p for p in c["params"] if p.endswith("_ptr")} | {"LOADED"})
        assert rep["wait"] and not rep["branch"] and not rep["stores"] and not rep["release"], (name, rep)
        assert read <= set(c["allowed"]), (name, read)
        assert ({"k_cache_ptr", "v_cache_ptr"} <= read) == caches and bool(read & {"k_cache_ptr"}) == caches, read
        assert c["spill"] == 0, name


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("cache", ["bf16", "fp8", "fp8dot"])
def test_early_gpu_bit_exact(batch, cache, monkeypatch):
    # compiled for this GPU (PDL on a Hopper one): early_kv 1 bit for bit early_kv 0 at Qwen3-30B-A3B's attention
    # (contexts around 1k ending anywhere in a tile, padding rows), fused and as the second of two launches, this GPU's
    # tiles; "fp8dot": its FP8 table as is with FUSED_FP8_DOT on. Then test_decode_fused.py's GPU check (the fused
    # kernel against the two launches, 20 CUDA-graph replays on new rows) with early_kv on in the table
    from tests.test_decode_fused import qwen3_gpu_case, test_fused_gpu_bit_exact_and_graph_safe

    kw, cfg, scales = qwen3_gpu_case(batch, cache, monkeypatch)
    for fn in (paged_attention_decode_fused, _two_launches):
        _same(_run(fn, kw, config=_early(cfg), **scales), _run(fn, kw, config=cfg, **scales))
    _early_in_the_table(monkeypatch)
    test_fused_gpu_bit_exact_and_graph_safe(batch, cache, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("batch,fused_prologue", [(1, True), (64, True), (8, False)])
def test_early_pdl_chain_in_cuda_graph_equals_serial(monkeypatch, batch, fused_prologue):
    # test_pdl.py's chain of two decode layers with early_kv on in the table: with the prologue fused in, the first K/V
    # tile is read before griddepcontrol.wait, under the QKV GEMV's tail (this step's cache rows NaN before each
    # replay); PDL on bit for bit PDL off, eager and over 200 CUDA-graph replays
    from kernels import pdl
    from tests.test_pdl import test_pdl_chain_in_cuda_graph_equals_serial

    _early_in_the_table(monkeypatch)
    try:
        test_pdl_chain_in_cuda_graph_equals_serial(monkeypatch, batch, fused_prologue)
    finally:
        pdl.env_switch.cache_clear()  # the switch as the environment has it again
