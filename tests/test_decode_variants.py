"""Decode steps no CUDA graph holds run eagerly (past the largest decode graph; under lockstep a decode step padded
to another rank's prefill size; a graph-sized step re-run after an all2all overflow, at its own table width): the
start-up warmup runs one eager decode step per compiled attention variant such steps reach
(kernels/attention/decode_plan.py decode_variants; runtime/engine/model_runner.py warmup_eager_decode), so none compiles
while serving. Measured on two H200s before this: under DP=2 / EP=2 with graphs, rank 0 compiled a _decode_kernel on
the serving path (tests/test_gpu_compile.py test_no_compile_after_startup_expert_parallel)."""

from __future__ import annotations

import pytest
import torch

import kernels.attention.decode as decode
import kernels.attention.decode_plan as plan
from benchmarks.count_launches import CONFIGS
from models.args import ModelArgs
from models.loader import load_model
from runtime.engine.attention_backend import torch_attention
from runtime.engine.model_runner import ModelRunner

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 64, 16
CPU = torch.device("cpu")


def use_table(monkeypatch, num_sms: int, small_cfg: dict) -> None:
    """A decode table with a small-batch config of its own (as the H200's has: other tiles and split rule) on a GPU
    of num_sms SMs."""
    base = plan.decode_config(HEAD_DIM, torch.float16, CPU)
    table = {**base, "max_splits": 64, "small_batch": 4, "small_batch_config": {**base, **small_cfg}}
    monkeypatch.setattr(plan, "decode_config", lambda *_: dict(table))
    monkeypatch.setattr(plan, "_num_sms", lambda _: num_sms)


def variant(rows: int, width: int, heads: int = HEADS, kv_heads: int = KV_HEADS, fused_rows: int = 24) -> tuple:
    return plan.decode_variant(rows, width, BLOCK, heads, kv_heads, HEAD_DIM, torch.float16, CPU, fused_rows)


# (SMs, heads, KV heads, fused rows, widest table, a row count some variant is first reached at):
# - 132 SMs, 157 pages (2,512 tokens: 20 splits of 64 x 2, a class of 32 that only the widest table reaches, 128 pages
#   giving 16);
# - 64 SMs, 2 heads on 1 KV head, no fused limit: the merge's BLOCK_D widens at 32 rows (2 x 32 >= 64 SMs), past the
#   small-batch config, with 4 splits there;
# - one page, no fused limit: one split at every row count, the full config from 5 rows (past small_batch 4)
@pytest.mark.parametrize("sms,heads,kv_heads,fused_rows,widths,first_at",
                         [(132, 8, 2, 24, 157, 1), (64, 2, 1, 0, 64, 32), (132, 8, 2, 0, 1, 5)])
def test_variants_cover_every_shape(monkeypatch, sms, heads, kv_heads, fused_rows, widths, first_at) -> None:
    use_table(monkeypatch, sms, {"BLOCK_N": 32, "num_warps": 2, "min_split_tokens": 64})
    found = plan.decode_variants(range(1, 400), widths, BLOCK, heads, kv_heads, HEAD_DIM, torch.float16, CPU,
                                   fused_rows)
    for rows in range(1, 400):
        for width in range(1, widths + 1):
            assert variant(rows, width, heads, kv_heads, fused_rows) in found, (rows, width)
    for key, (rows, width) in found.items():
        assert variant(rows, width, heads, kv_heads, fused_rows) == key
    assert any(rows == first_at for rows, _ in found.values())
    if widths == 157:  # the 32-split class: from the widest table only
        assert any(key[2] and key[2][0] == 32 and width == widths for key, (_, width) in found.items())


def test_variants_cover_the_fused_merge(monkeypatch) -> None:
    # a small-batch config that merges up to 8 splits in the split kernel (fused_merge_max_splits): those launches
    # compile the split kernel at the merge's tile and no second kernel; wider tables (more splits) launch two again
    use_table(monkeypatch, 132, {"BLOCK_N": 32, "num_warps": 2, "min_split_tokens": 64, "fused_merge_max_splits": 8})
    found = plan.decode_variants(range(1, 40), 157, BLOCK, HEADS, KV_HEADS, HEAD_DIM, torch.float16, CPU, 24)
    for rows in range(1, 40):
        for width in range(1, 158):
            assert variant(rows, width) in found, (rows, width)
    # (rows past small_batch 4 run the base config, which never fuses)
    fused = [key for key in found if key[1] > 1 and key[2] is None]
    small_two = [key for key, (rows, _) in found.items() if rows <= 4 and key[2] is not None]
    assert fused and small_two
    assert all(rows <= 4 for key, (rows, _) in found.items() if key in fused)
    assert all(key[1] <= 8 for key in fused) and all(key[2][0] > 8 for key in small_two)


class Recorder:
    """Stands in for a Triton kernel: records each launch's keyword arguments (the constexprs and launch options
    that pick the compiled variant; the positional ones are pointers and runtime values)."""

    def __init__(self) -> None:
        self.launches: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


@pytest.mark.parametrize("fused", [0, 4])
def test_a_variant_fixes_what_compiles(monkeypatch, fused) -> None:
    use_table(monkeypatch, 20, {"BLOCK_N": 32, "num_warps": 2, "max_splits": 16, "fused_merge_max_splits": fused})
    split, merge = Recorder(), Recorder()
    monkeypatch.setattr(decode, "_decode_kernel", split)
    monkeypatch.setattr(decode, "_reduce_kernel", merge)
    k_cache = torch.zeros(8, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.float16)
    compiled: dict[tuple, tuple] = {}
    for rows in (1, 3, 4, 5, 9, 30, 31, 64):
        for width in (1, 2, 3, 8, 9, 24, 40, 200):  # (24 pages at one row: 3 splits, a fused SPLITS_PAD 4)
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
            assert split.launches[0]["FUSED_MERGE"] == (key[1] > 1 and key[2] is None)
    assert len(set(compiled.values())) == len(compiled) > 4  # and no two variants compile the same
    fused_pads = {key[1] for key in compiled if key[1] > 1 and key[2] is None}
    assert len(fused_pads) > 1 if fused else not fused_pads


def test_eager_decode_warmup_writes_no_kv() -> None:
    cfg = dict(CONFIGS["qwen3_moe"], num_hidden_layers=1)
    model = load_model("", cfg, ModelArgs(dtype=torch.float32, device="cpu", seed=0), "dummy")
    for layer in model.model.layers:
        layer.self_attn.fuse_decode_prologue = True  # as on the Triton path: rows <= 256 through the fused decode
    runner = ModelRunner(model, CPU, torch.float32, num_blocks=16, block_size=8, max_model_len=128,
                         attn_backend=torch_attention())
    runs = runner.warmup_eager_decode(range(1, 300))
    assert runs >= 2  # the fused-prologue rows and the rest, at least
    assert runner.kv_cache.abs().max() == 0
    assert runner.warmup_eager_decode(range(5, 5)) == 0


# Triton's own compile keys (its binder for an sm90 target: constexprs, integer and pointer-alignment specialization,
# warps and stages) of the decode launches, on the CPU: graph capture's warm-up forwards (full table width), the
# eager-decode warmup, then real eager decode steps through ModelRunner.execute (random sequences and contexts,
# padded to a lockstep size past the largest graph; and graph-sized steps at their own width, as an all2all
# overflow re-runs them). Prints the real steps' keys that start-up did not compile.
_KEYS_PROBE = """
import json, random, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
import kernels.attention.decode as D
import kernels.attention.decode_fused as DF
from kernels.attention.qkv_prologue import qkv_prologue_ref
from models.args import ModelArgs
from models.forward_batch import ForwardBatch
from models.loader import load_model
from runtime.engine.attention_backend import triton_attention
from runtime.engine.cuda_graph import graph_batch_sizes
from runtime.engine.model_runner import ModelRunner
from runtime.engine.scheduler import ScheduledBatch
from runtime.engine.sequence import Sequence
from runtime.sampling_params import SamplingParams

warm_lo = int(sys.argv[1])  # the eager warmup's first row count (0: no eager warmup)
heads, kv_heads, head_dim = (int(x) for x in sys.argv[2].split(","))
kv_dtype = torch.float8_e4m3fn if sys.argv[4] == "fp8" else torch.bfloat16  # the KV cache's
if sys.argv[3]:  # this GPU's attention table (its small-batch config and split rule), read on the CPU
    import kernels.attention.config as attention_config
    attention_config.device_name = lambda device=None: sys.argv[3]
backend = make_backend(GPUTarget("cuda", 90, 32))
keys, phase = {}, ["graph"]

class Recorder:
    def __init__(self, kernel):
        self.name, self.bind = kernel.fn.__name__, create_function_from_signature(kernel.signature, kernel.params,
                                                                                  backend)
    def __getitem__(self, grid):
        def launch(*args, **kw):
            spec = self.bind(*args, **kw)[1]
            opts = sorted((k, kw[k]) for k in ("num_warps", "num_stages", "launch_pdl") if k in kw)
            keys.setdefault(phase[0], set()).add(repr((self.name, spec, opts)))
        return launch

D._decode_kernel, D._reduce_kernel = Recorder(D._decode_kernel), Recorder(D._reduce_kernel)
DF.qkv_prologue = qkv_prologue_ref  # the separate prologue's kernel cannot run here (and compiles once anyway)
cfg = dict(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
           head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
           rope_theta=10000.0, architectures=["Qwen3MoeForCausalLM"], intermediate_size=96, moe_intermediate_size=32,
           num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
model = load_model("", cfg, ModelArgs(dtype=torch.bfloat16, device="cpu", seed=0), "dummy")
for layer in model.model.layers:
    layer.self_attn.fuse_decode_prologue = True  # as on a GPU (the Triton path)
BS, MML, GMAX, HI = 16, 4096, 8, 300
runner = ModelRunner(model, torch.device("cpu"), kv_dtype, num_blocks=300, block_size=BS, max_model_len=MML,
                     attn_backend=triton_attention())
i32 = dict(dtype=torch.int32)
with torch.inference_mode():
    for size in graph_batch_sizes(GMAX):  # CudaGraphRunner's capture: each bucket at the full table width
        fb = ForwardBatch(slot_mapping=torch.full((size,), -1, dtype=torch.int64),
                          cu_seqlens_q=torch.arange(size + 1, **i32), seq_lens=torch.zeros(size, **i32),
                          block_tables=torch.zeros(size, runner.max_blocks_per_seq, **i32), max_seqlen_q=1,
                          max_seqlen_k=MML, is_decode=True, kv_caches=runner.kv_caches,
                          attn_backend=runner.attn_backend)
        model(torch.zeros(size, dtype=torch.int64), torch.zeros(size, dtype=torch.int64), fb)
phase[0] = "warm"
if warm_lo:
    runner.warmup_eager_decode(range(warm_lo, HI + 1))
rng = random.Random(0)
for name, lo, hi in (("lockstep", GMAX + 1, HI), ("rerun", 1, GMAX)):
    phase[0] = name
    for trial in range(40):
        rows = rng.randint(lo, hi)
        seqs = []
        for i in range(rng.randint(1, min(rows, 8))):
            n = rng.choice([1, 17, 100, 1000, rng.randint(1, MML - 1), MML - 1])
            seq = Sequence(f"{name}{trial}-{i}", [rng.randrange(3, 200) for _ in range(n)], SamplingParams())
            seq.num_computed_tokens = n - 1
            seq.block_table = [rng.randrange(300) for _ in range(-(-n // BS))]
            seqs.append(seq)
        runner.execute(ScheduledBatch(seqs, [1] * len(seqs)), rows)
start = keys.get("graph", set()) | keys.get("warm", set())
print(json.dumps({p: len(keys.get(p, set()) - start) for p in ("lockstep", "rerun")}))
"""


def probe(warm_from: int, shape: str, gpu: str = "", kv: str = "bf16") -> dict[str, int]:
    from tests.sm90 import run_sm90_probe

    return run_sm90_probe(_KEYS_PROBE.replace("import json, random, sys", f"import json, random, sys\n"
                                                  f"sys.argv[1:] = ['{warm_from}', '{shape}', '{gpu}', '{kv}']"))


# tiny heads; Qwen3-30B-A3B's on the H200 table, bf16 and FP8 KV (its fp8_dot variants)
@pytest.mark.parametrize("shape,gpu,kv", [("8,2,32", "", "bf16"), ("32,4,128", "NVIDIA_H200", "bf16"),
                                          ("32,4,128", "NVIDIA_H200", "fp8")])
def test_eager_decode_steps_compile_nothing_new(shape: str, gpu: str, kv: str) -> None:
    # the engine's range with a fixed-capacity all2all (re-runs): every row count
    assert probe(1, shape, gpu, kv) == {"lockstep": 0, "rerun": 0}
    # and the check can fail: without the eager warmup both kinds of step compile kernels start-up did not; from past
    # the largest graph only (the range without re-runs), on the H200 table the re-runs still do
    missed = probe(0, shape, gpu, kv)
    assert missed["lockstep"] > 0 and missed["rerun"] > 0
    if gpu:
        past_graphs = probe(9, shape, gpu, kv)
        assert past_graphs["lockstep"] == 0 and past_graphs["rerun"] > 0


def test_eager_decode_rows() -> None:
    from types import SimpleNamespace

    runner = SimpleNamespace(graphs=None, dispatcher=None)
    rows = ModelRunner.eager_decode_rows
    assert rows(runner, 48) == range(1, 49)  # no graphs: every decode step is eager
    runner.graphs = SimpleNamespace(sizes=[1, 2, 4, 8, 16])
    assert rows(runner, 16) == range(17, 17)  # graphs hold them all
    assert rows(runner, 8192) == range(17, 8193)  # lockstep padding past the largest graph
    runner.dispatcher = object()  # a fixed-capacity all2all: an overflow re-runs a graph-sized step eagerly
    assert rows(runner, 8192) == range(1, 8193)
