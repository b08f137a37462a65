"""Decode steps no CUDA graph holds run eagerly (past the largest decode graph; under lockstep a decode step padded
to another rank's prefill size): the start-up warmup runs one eager decode step per compiled attention variant such
steps reach (kernels/attention/decode.py decode_variants; runtime/engine/model_runner.py warmup_eager_decode), so
none compiles while serving. Measured on two H200s before this: under DP=2 / EP=2 with graphs, rank 0 compiled a
_decode_kernel on the serving path (tests/test_gpu_compile.py test_no_compile_after_startup_expert_parallel)."""

from __future__ import annotations

import pytest
import torch

import kernels.attention.decode as decode
from benchmarks.count_launches import CONFIGS
from models.args import ModelArgs
from models.loader import load_model
from runtime.engine.attention_backend import torch_attention
from runtime.engine.model_runner import ModelRunner

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 64, 16
CPU = torch.device("cpu")


@pytest.fixture
def small_batch_table(monkeypatch):
    """A table with a small-batch config of its own tiles and a lower split cap (as the H200's has)."""
    base = decode.decode_config(HEAD_DIM, torch.float16, CPU)
    table = {**base, "max_splits": 64, "small_batch": 4,
             "small_batch_config": {**base, "BLOCK_N": 32, "num_warps": 2, "max_splits": 16}}
    monkeypatch.setattr(decode, "decode_config", lambda *_: dict(table))
    monkeypatch.setattr(decode, "_num_sms", lambda _: 20)  # few SMs: several split classes at small widths


def variant(rows: int, width: int) -> tuple:
    return decode.decode_variant(rows, width, BLOCK, HEADS, KV_HEADS, HEAD_DIM, torch.float16, CPU, fused_rows=24)


def test_variants_cover_every_shape(small_batch_table) -> None:
    widths = 200  # 3,200 tokens: up to 25 splits of 128
    found = decode.decode_variants(range(3, 400), widths, BLOCK, HEADS, KV_HEADS, HEAD_DIM, torch.float16, CPU,
                                   fused_rows=24)
    assert len(found) > 6  # both configs, split classes 1..32, the fused-row limit
    for rows in range(3, 400):
        for width in range(1, widths + 1):
            assert variant(rows, width) in found, (rows, width)
    for key, (rows, width) in found.items():
        assert variant(rows, width) == key


class Recorder:
    """Stands in for a Triton kernel: records each launch's keyword arguments (the constexprs and launch options
    that pick the compiled variant; the positional ones are pointers and runtime values)."""

    def __init__(self) -> None:
        self.launches: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


def test_a_variant_fixes_what_compiles(small_batch_table, monkeypatch) -> None:
    split, merge = Recorder(), Recorder()
    monkeypatch.setattr(decode, "_decode_kernel", split)
    monkeypatch.setattr(decode, "_reduce_kernel", merge)
    k_cache = torch.zeros(8, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.float16)
    compiled: dict[tuple, tuple] = {}
    for rows in (1, 3, 4, 5, 9, 30, 31, 64):
        for width in (1, 2, 3, 8, 9, 40, 200):
            split.launches.clear()
            merge.launches.clear()
            decode.paged_attention_decode(torch.zeros(rows, HEADS, HEAD_DIM, dtype=torch.float16), k_cache, k_cache,
                                          torch.zeros(rows, dtype=torch.int32),
                                          torch.zeros(rows, width, dtype=torch.int32), 0.125)
            launched = (tuple(sorted(split.launches[0].items())),
                        tuple(sorted(merge.launches[0].items())) if merge.launches else None)
            key = variant(rows, width)[:3]  # (the fused-prologue flag: that step takes decode_fused's launch)
            assert compiled.setdefault(key, launched) == launched, (rows, width)
            assert (key[2] is None) == (not merge.launches)
    assert len(set(compiled.values())) == len(compiled) > 4  # and no two variants compile the same


def test_eager_decode_warmup_writes_no_kv() -> None:
    cfg = dict(CONFIGS["qwen3_moe"], num_hidden_layers=1)
    model = load_model("", cfg, ModelArgs(dtype=torch.float32, device="cpu", seed=0), "dummy")
    runner = ModelRunner(model, CPU, torch.float32, num_blocks=16, block_size=8, max_model_len=128,
                         attn_backend=torch_attention())
    runs = runner.warmup_eager_decode(range(1, 300))
    assert runs >= 2  # the fused-prologue rows and the rest, at least
    assert runner.kv_cache.abs().max() == 0
    assert runner.warmup_eager_decode(range(5, 5)) == 0
