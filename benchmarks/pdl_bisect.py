"""Which kernel makes a decode chain differ with PDL (kernels/pdl.py)? A bisect on one Hopper GPU.

    python benchmarks/pdl_bisect.py [--batches 64,8,1] [--replays 200] [--modes all,qkv_prologue,...]

The two Qwen3-30B-A3B decode layers of tests/test_pdl.py (norm, qkv GEMV / cuBLAS, qkv prologue, decode attention,
o projection, norm, fused router, MoE GEMV pair or align + tl.dot experts), with PDL off in every module but the
ones a mode names ("all": every module; "off2": none, a second PDL-off graph as the control). Each mode runs eager
once and as a CUDA graph replayed on new inputs with its outputs poisoned (NaN) and its KV rows reset; every
replay is compared bit for bit with the PDL-off graph's. A race shows as NaN or as values of an earlier replay in
the mode that has it; a mode that differs by an ulp in a few tokens, without NaN, compiled different arithmetic
(what this found on 2026-11-29: the qkv prologue's two variants loaded the norm weights at different places).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tests.test_pdl as chain  # noqa: E402
from kernels import pdl  # noqa: E402

NAMES = ["h", "res", "qkv", "q", "attn", "o", "h2", "res2", "topk_weights", "topk_ids", "y"]  # one layer's outputs
MODULES = ["decode_attention", "fused_moe", "linear_gemv", "moe_align", "norm", "qkv_prologue", "router_fused"]


def fresh(step: dict) -> dict:
    return dict(step, x=step["x"].clone(), residual=step["residual"].clone(),
                caches=[c.clone() for c in step["caches"]])


def set_mode(mp: pytest.MonkeyPatch, mode: str, p: dict) -> None:
    mp.undo()
    mp.setenv(pdl.ENV_VAR, "0")
    pdl.env_switch.cache_clear()
    if "gemv" in p["moe_cfg"]:  # the MoE GEMV pair takes PDL from its table entry
        p["moe_cfg"]["gemv"]["pdl"] = mode in ("all", "moe_gemv")
    for name in MODULES if mode == "all" else [m for m in MODULES if m == mode]:
        mp.setattr(importlib.import_module(f"kernels.{name}"), "pdl_enabled", lambda device: True)


def first_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
    for i, (a, b) in enumerate(zip(got, want)):
        if not torch.equal(a, b):
            d = (a.float() - b.float()).abs().nan_to_num(float("inf")).max().item()
            name = f"{NAMES[i % len(NAMES)]} of layer {i // len(NAMES)}"
            return f"{name}: max |diff| {d:.3g}, NaN {a.isnan().sum().item()}"
    return None


def bisect(batch: int, modes: list[str], replays: int) -> None:
    p, step = chain._problem("cuda", torch.bfloat16, batch, hidden=2048, heads=32, kv_heads=4, head_dim=128,
                             experts=128, inter=768, top_k=8, ctx=1000, page=16)
    mp = pytest.MonkeyPatch()
    set_mode(mp, "off", p)
    ref = chain._flat(chain._two_layers(p, fresh(step)))
    graphs = {}
    for mode in ["off", *modes]:
        set_mode(mp, mode, p)
        print(f"B={batch} eager {mode}: {first_difference(chain._flat(chain._two_layers(p, fresh(step))), ref)}")
        inputs = fresh(step)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = chain._two_layers(p, inputs)
        graphs[mode] = (graph, outs, inputs)
    mp.undo()
    pdl.env_switch.cache_clear()
    gen = torch.Generator(device="cuda").manual_seed(1)
    bad: dict[str, list] = {mode: [] for mode in modes}
    for i in range(replays):
        x = torch.randn(step["x"].shape, device="cuda", generator=gen).to(step["x"].dtype)
        got = {}
        for mode, (graph, outs, inputs) in graphs.items():
            inputs["x"].copy_(x)
            inputs["residual"].copy_(step["residual"])
            for t in (t for layer in outs for t in layer.values() if t.is_floating_point()):
                t.fill_(float("nan"))
            for c, c0 in zip(inputs["caches"], step["caches"]):
                c.copy_(c0)
                c.view(-1, c.shape[2], c.shape[3])[inputs["slots"]] = float("nan")
            graph.replay()
            got[mode] = chain._flat(outs)
        for mode in modes:
            if (d := first_difference(got[mode], got["off"])) is not None:
                bad[mode].append((i, d))
    for mode in modes:
        print(f"B={batch} graph {mode} vs off: {len(bad[mode])}/{replays} replays differ; first: {bad[mode][:2]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,8,1")
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--modes", default=",".join(["off2", "all", "moe_gemv", *MODULES]))
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        sys.exit("pdl_bisect needs a Hopper GPU (PDL is on there alone)")
    for batch in (int(b) for b in args.batches.split(",")):
        bisect(batch, args.modes.split(","), args.replays)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
