"""Kernel launches per decode layer: every Triton launch and every torch op that runs a kernel, layer by layer.

Runs one decode step of a small model with the model's real structure (q/k norm, MoE top-k, ...) and dummy
weights. On a machine without a GPU it runs the Triton kernels in the interpreter (set before triton is
imported); the launch sequence is the same as on the GPU for the same path (B=1 takes the one-token MoE
path, B>1 the aligned one), only a cuBLAS call may be more than one kernel there.

    python benchmarks/count_launches.py [--arch qwen3_moe] [--batch-sizes 1,64] [--out launches.json]

Prints one line per (arch, batch): launches per decoder layer, then each layer's launches in order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is decorated

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

_COMMON: dict[str, Any] = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
                               tie_word_embeddings=False, rope_theta=10000.0)
# small configs with the structure of the real ones (Qwen3-30B-A3B: q/k norm, softmax top-8 of 128; GLM-4.5:
# a leading dense layer, grouped sigmoid routing, shared experts, partial rotary, qkv bias)
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": _COMMON | dict(architectures=["Qwen3MoeForCausalLM"], intermediate_size=96, moe_intermediate_size=32,
                                num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
    "glm4_moe": _COMMON | dict(architectures=["Glm4MoeForCausalLM"], intermediate_size=96, moe_intermediate_size=32,
                               n_routed_experts=16, num_experts_per_tok=4, n_group=2, topk_group=1,
                               n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
                               routed_scaling_factor=1.5, attention_bias=True, use_qk_norm=True,
                               partial_rotary_factor=0.5),
    "llama": _COMMON | dict(architectures=["LlamaForCausalLM"], intermediate_size=96),
}

# aten ops that run no kernel: allocation, views and metadata
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
         "resolve_conj", "resolve_neg", "set_", "promote_types", "_unsafe_view", "t", "split", "split_with_sizes",
         "chunk", "unbind"}


@dataclass
class LaunchLog:
    events: list[str] = field(default_factory=list)  # "triton:<kernel>" | "torch:<op>" | "mark:<label>"

    def between(self, start: str, end: str) -> list[str]:
        # the launches between two marks, without the marks
        i = self.events.index(f"mark:{start}")
        j = self.events.index(f"mark:{end}", i)
        return [e for e in self.events[i + 1 : j] if not e.startswith("mark:")]


class _TorchOps(TorchDispatchMode):
    def __init__(self, log: LaunchLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _FREE:
            self.log.events.append(f"torch:{name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchLog]:
    """Records Triton launches (JITFunction / interpreter run) and kernel-running torch ops, in order."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    log = LaunchLog()
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def wrap(cls: type) -> Any:
        def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if not warmup:
                log.events.append(f"triton:{self.fn.__name__}")
            with _paused(mode):  # a kernel's own host-side tensor handling is not a launch
                return originals[cls](self, *args, grid=grid, warmup=warmup, **kwargs)
        return run

    mode = _TorchOps(log)
    try:
        for cls in originals:
            cls.run = wrap(cls)
        with mode:
            yield log
    finally:
        for cls, fn in originals.items():
            cls.run = fn


@contextlib.contextmanager
def _paused(mode: TorchDispatchMode) -> Iterator[None]:
    from torch.utils._python_dispatch import _pop_mode_temporarily

    try:
        with _pop_mode_temporarily():
            yield
    except (AssertionError, RuntimeError):  # the mode is not on top (nested): nothing to pause
        yield


def decode_launches(cfg: dict[str, Any], batch_size: int, ctx: int = 300, block_size: int = 16,
                    device: str | None = None) -> dict[str, list[str]]:
    """One decode step of batch_size sequences with ctx cached tokens each: launches per decoder layer
    ("layer0".."layerN-1") and "outside" (embedding, final norm)."""
    from models.args import ModelArgs
    from models.forward_batch import ForwardBatch
    from models.loader import load_model
    from runtime.engine.attention_backend import triton_attention

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 as served (a dtype cast is a launch); the interpreter's bf16 values are off, which counting ignores
    dtype = torch.bfloat16
    model = load_model("", cfg, ModelArgs(dtype=dtype, device=dev, use_triton=True), "dummy")
    blocks_per_seq = -(-(ctx + 1) // block_size)
    shape = (batch_size * blocks_per_seq + 1, block_size, model.num_kv_heads, model.head_dim)
    kv_caches = [(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
                 for _ in range(model.num_layers)]
    block_tables = torch.arange(batch_size * blocks_per_seq, dtype=torch.int32, device=dev).view(batch_size, -1)
    slots = block_tables[:, ctx // block_size].long() * block_size + ctx % block_size
    i32 = dict(dtype=torch.int32, device=dev)
    batch = ForwardBatch(
        slot_mapping=slots, cu_seqlens_q=torch.arange(batch_size + 1, **i32),
        seq_lens=torch.full((batch_size,), ctx + 1, **i32), block_tables=block_tables, max_seqlen_q=1,
        max_seqlen_k=ctx + 1, is_decode=True, kv_caches=kv_caches, attn_backend=triton_attention(),
    )
    ids = torch.zeros(batch_size, dtype=torch.int64, device=dev)
    positions = torch.full((batch_size,), ctx, dtype=torch.int64, device=dev)
    layers = model.model.layers
    # no_grad, not inference_mode: under inference mode some composite ops' copies (reshape's clone) skip the
    # Python dispatch mode and would go uncounted
    with torch.no_grad():
        model(ids, positions, batch)  # warm: lazily made workspaces are not per-step launches
        with count_launches() as log:
            hooks = []
            for i, layer in enumerate(layers):
                hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: log.events.append(f"mark:in{i}")))
                hooks.append(layer.register_forward_hook(lambda *_, i=i: log.events.append(f"mark:out{i}")))
            log.events.append("mark:start")
            model(ids, positions, batch)
            log.events.append("mark:end")
            for h in hooks:
                h.remove()
    per_layer = {f"layer{i}": log.between(f"in{i}", f"out{i}") for i in range(len(layers))}
    inside, outside = False, []
    for e in log.events:
        if e.startswith(("mark:in", "mark:out")):
            inside = e.startswith("mark:in")
        elif not inside and not e.startswith("mark:"):
            outside.append(e)
    per_layer["outside"] = outside
    return per_layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen3_moe", help=f"one of {', '.join(CONFIGS)}, or 'all'")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--out", default=None, help="write every layer's launch list here (JSON)")
    a = p.parse_args()
    archs = list(CONFIGS) if a.arch == "all" else [a.arch]
    results: dict[str, Any] = {}
    for arch in archs:
        for b in (int(x) for x in a.batch_sizes.split(",")):
            layers = decode_launches(CONFIGS[arch], b)
            last = layers[f"layer{CONFIGS[arch]['num_hidden_layers'] - 1}"]
            triton_n = sum(e.startswith("triton:") for e in last)
            print(f"launches arch={arch} batch={b} per_layer={len(last)} triton={triton_n} "
                  f"torch={len(last) - triton_n}")
            print("   " + " ".join(e.split(":", 1)[1] for e in last))
            results[f"{arch}/B{b}"] = layers
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
