"""Programmatic dependent launch for the decode chain (kernels/pdl.py): the switch, the safety rule checked on the
sm90 PTX of every kernel that takes PDL, a decode layer's kernels against their references with the switch set (off
on the CPU), and on a Hopper GPU the same chain in a CUDA graph with PDL on, bit for bit the chain with it off."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels import pdl  # noqa: E402
from kernels.attention.decode import paged_attention_decode, paged_attention_decode_ref  # noqa: E402
from kernels.attention.decode_fused import paged_attention_decode_fused  # noqa: E402
from kernels.attention.qkv_prologue import qkv_prologue, qkv_prologue_ref  # noqa: E402
from kernels.fused_moe import fused_experts, fused_experts_ref  # noqa: E402
from kernels.linear.gemv import gemv_linear  # noqa: E402
from kernels.moe_config import default_config  # noqa: E402
from kernels.norm import rms_norm, rms_norm_ref  # noqa: E402
from kernels.rope import rope_cos_sin  # noqa: E402
from kernels.router_fused import route_fused, route_fused_ref  # noqa: E402
from tests.sm90 import run_sm90_probe  # noqa: E402


def _switch(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(pdl.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(pdl.ENV_VAR, value)
    pdl.env_switch.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_switch():
    pdl.env_switch.cache_clear()
    yield
    pdl.env_switch.cache_clear()  # later tests read the environment as it is again


# ------------------------------------------------------------------------------------------- the switch


def test_env_switch_parses_and_is_read_once(monkeypatch):
    for value, want in ((None, True), ("", True), ("0", False), (" 0 ", False), ("1", True), (" 1 ", True)):
        _switch(monkeypatch, value)  # on unless turned off
        assert pdl.env_switch() is want, value
    monkeypatch.setenv(pdl.ENV_VAR, "0")  # cached: a change after the first read is not seen
    assert pdl.env_switch() is True
    _switch(monkeypatch, "yes")
    with pytest.raises(ValueError, match="MOE_RT_PDL must be 0 or 1, got 'yes'"):
        pdl.env_switch()


def test_enabled_only_on_sm90_cuda(monkeypatch):
    _switch(monkeypatch, "1")
    assert pdl.pdl_enabled(torch.device("cpu")) is False  # the interpreter: never
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for major, want in ((8, False), (10, False), (12, False), (9, True)):  # Hopper only (kernels/pdl.py)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, m=major: (m, 0))
        pdl._capability_major.cache_clear()
        assert pdl.pdl_supported(torch.device("cuda", 0)) is want
        assert pdl.pdl_enabled(torch.device("cuda", 0)) is want
    _switch(monkeypatch, "0")
    assert pdl.pdl_enabled(torch.device("cuda", 0)) is False  # sm90, switch off
    pdl._capability_major.cache_clear()
    assert pdl.launch_kwargs(True) == {"launch_pdl": True} and pdl.launch_kwargs(False) == {}


# ------------------------------------------------------------------------------------------- sm90 PTX

_REG = re.compile(r"%[a-z]+\d+")
_STORE = re.compile(r"\b(?:st|red|atom)\.(?:global|async)|\bcp\.reduce|\bst\.bulk")


def pre_wait(ptx: str, params: list[str]) -> dict:
    """What a kernel's PTX does before its first griddepcontrol.wait: branches (the wait must sit in the entry block,
    so that it precedes everything after it on every path), stores, an early launch_dependents, and for each global
    load the arguments its address derives from (a register dataflow from the ld.param's; "LOADED" when the address
    derives from a value loaded from memory)."""
    name_of = {}  # PTX parameter -> argument name
    deps: dict[str, frozenset] = {}
    rep: dict = {"wait": False, "branch": False, "stores": [], "loads": [], "release": False}
    for raw in ptx.splitlines():
        ln = raw.split("//")[0].strip()
        if m := re.match(r"\.param \..* (\w+_param_(\d+)),?$", ln):
            name_of[m.group(1)] = params[int(m.group(2))] if int(m.group(2)) < len(params) else m.group(1)
        if not ln or ln.startswith(".") or ln in ("{", "}", ")"):
            continue
        if "griddepcontrol.wait" in ln:
            rep["wait"] = True
            break
        rep["release"] |= "griddepcontrol.launch_dependents" in ln
        rep["branch"] |= bool(re.match(r"\$L__BB\w*:", ln) or re.search(r"\b(?:bra|ret|exit)\b", ln))
        if ln.endswith(":"):
            continue
        ins = re.sub(r"^@!?%p\d+\s+", "", ln).rstrip(";")
        op, _, rest = ins.partition(" ")
        if _STORE.search(ins):
            rep["stores"].append(ins)
            continue
        if op.startswith("ld.param"):
            for r in _REG.findall(rest.split(",")[0]):
                deps[r] = frozenset([name_of.get(re.search(r"\[(\w+)\]", rest).group(1), "?")])
            continue
        # the first operand is the destination (a register or a {vector}), the rest are sources
        cut = rest.index("}") + 1 if rest.startswith("{") else rest.find(",")
        dst, src_txt = rest[:cut], rest[cut:]
        src = frozenset().union(*[deps.get(r, frozenset()) for r in _REG.findall(src_txt)])
        if op.startswith(("ld.global", "cp.async", "ld.")) and ("global" in op or op.startswith("cp.async")):
            addr = re.search(r"\[([^\]]*)\]", src_txt)
            src = frozenset().union(*[deps.get(r, frozenset()) for r in _REG.findall(addr.group(1) if addr else "")])
            rep["loads"].append(src)
            src = src | {"LOADED"}
        for r in _REG.findall(dst):
            deps[r] = src
    return rep


def _jit_kernels_with_pdl() -> set[str]:
    import importlib

    names = set()
    for mod in ("attention.decode", "fp8", "linear.w8a8_kernels", "fused_moe", "linear.gemv", "moe_align", "moe_gemv",
                "moe_sum", "norm", "attention.qkv_prologue", "router_fused"):
        for name, obj in vars(importlib.import_module(f"kernels.{mod}")).items():
            if "PDL" in getattr(obj, "arg_names", ()) and name.endswith("_kernel"):
                names.add(name)
    return names


def test_pdl_rule_in_sm90_ptx():
    # every kernel of the decode chain, compiled for Hopper with PDL on: griddepcontrol.wait in its entry block;
    # before it no store and only loads whose address derives from the allowed (weight) arguments, at least one
    # where the kernel prefetches; launch_dependents only after it. PDL off: no griddepcontrol at all.
    cases = run_sm90_probe("from tests.pdl_sm90 import main; main()")
    assert {c["kernel"] for c in cases.values()} == _jit_kernels_with_pdl()
    for name, c in cases.items():
        rep = pre_wait(c["on"], c["params"])
        pointers = {p for p in c["params"] if p.endswith("_ptr")}
        read = set().union(*rep["loads"]) & (pointers | {"LOADED"})
        assert rep["wait"] and not rep["branch"] and not rep["stores"] and not rep["release"], (name, rep)
        assert read <= set(c["allowed"]), (name, read)
        assert bool(rep["loads"]) == bool(c["allowed"]), (name, rep["loads"])  # the prefetch is there
        assert "griddepcontrol.launch_dependents" in c["on"], name
        assert "griddepcontrol" not in c["off"], name


def test_pre_wait_finds_violations():
    # the checker itself, on hand-written PTX: an early store, an ids-dependent load, a release before the wait
    ptx = """.param .u64 .ptr .global .align 1 k_param_0,
.param .u64 .ptr .global .align 1 k_param_1,
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	@%p1 ld.global.b32 { %r1 }, [ %rd1 + 0 ];
	mul.wide.s32 	%rd3, %r1, 2;
	add.s64 	%rd4, %rd2, %rd3;
	ld.global.b16 { %rs1 }, [ %rd4 + 0 ];
	griddepcontrol.launch_dependents; // dummy %r2
	st.global.b32 [ %rd1 + 0 ], { %r1 };
	griddepcontrol.wait; // dummy %r3
"""
    rep = pre_wait(ptx, ["ids_ptr", "w_ptr"])
    assert rep["wait"] and rep["release"] and len(rep["stores"]) == 1
    assert rep["loads"] == [{"ids_ptr"}, {"ids_ptr", "w_ptr", "LOADED"}]


# ------------------------------------------------------------------------------------------- a decode layer

EPS = 1e-6


def _problem(device: str, dtype: torch.dtype, batch: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
             experts: int, inter: int, top_k: int, ctx: int, page: int, seed: int = 0) -> tuple[dict, dict]:
    """(weights and configs of one layer, one decode step's inputs); KV of ctx tokens per sequence."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    qkv_n = (heads + 2 * kv_heads) * head_dim
    pages = -(-(ctx + 1) // page)
    p = dict(ln1=rnd(hidden, scale=0.1) + 1, ln2=rnd(hidden, scale=0.1) + 1, qn=rnd(head_dim, scale=0.1) + 1,
             kn=rnd(head_dim, scale=0.1) + 1, qkv=rnd(qkv_n, hidden, scale=hidden**-0.5),
             o=rnd(hidden, heads * head_dim, scale=(heads * head_dim) ** -0.5),
             router=rnd(experts, hidden, scale=hidden**-0.5),
             w13=rnd(experts, 2 * inter, hidden, scale=hidden**-0.5), w2=rnd(experts, hidden, inter, scale=inter**-0.5),
             cos_sin=rope_cos_sin(head_dim, ctx + 8, 10000.0, device=device), top_k=top_k)
    # the GEMV linear up to 16 rows (split K: the counters in the chain), cuBLAS above; MoE GEMVs up to 8 tokens
    split = {"BLOCK_N": 32, "BLOCK_K": 32 if hidden < 256 else 256, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1,
             "DOT": int(batch > 4)}
    p["lin_cfg"] = split if batch <= 16 else None
    p["moe_cfg"] = default_config(batch, experts, top_k, False, dtype == torch.float32)
    if batch in (1, 8):  # else the align and the tl.dot kernels
        tile = {"BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
        p["moe_cfg"]["gemv"] = {"up": tile, "down": tile, "max_tokens": 8, "fused_sum": batch == 1, "pdl": False,
                                "prefetch": False}
    perm = torch.randperm(batch * pages + 2, generator=gen).to(torch.int32)
    block_tables = perm[: batch * pages].view(batch, pages).to(device)
    slots = (block_tables[:, ctx // page].long() * page + ctx % page).to(device)
    caches = [rnd(batch * pages + 2, page, kv_heads, head_dim) for _ in range(4)]  # k, v of two layers
    step = dict(x=rnd(batch, hidden), residual=rnd(batch, hidden), positions=torch.full((batch,), ctx, device=device),
                slots=slots, seq_lens=torch.full((batch,), ctx + 1, dtype=torch.int32, device=device),
                block_tables=block_tables, caches=caches)
    return p, step


def _linear(x: torch.Tensor, w: torch.Tensor, cfg: dict | None) -> torch.Tensor:
    return gemv_linear(x, w, None, cfg) if cfg is not None else F.linear(x, w)


def _layer(p: dict, x: torch.Tensor, residual: torch.Tensor, step: dict, kc: torch.Tensor,
           vc: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Triton kernels of one Qwen3-MoE decode layer, back to back; every intermediate."""
    batch, head_dim = x.shape[0], kc.shape[3]
    h, res = rms_norm(x, p["ln1"], EPS, residual)
    qkv = _linear(h, p["qkv"], p["lin_cfg"])
    if p.get("fused_prologue"):  # the prologue inside the decode kernel (kernels/attention/decode_fused.py)
        q = None
        attn = paged_attention_decode_fused(qkv, step["positions"], p["cos_sin"], p["qn"], p["kn"], EPS, kc, vc,
                                            step["slots"], step["seq_lens"], step["block_tables"], head_dim**-0.5)
    else:
        q = qkv_prologue(qkv, step["positions"], p["cos_sin"], p["qn"], p["kn"], EPS, kc, vc, step["slots"])
        attn = paged_attention_decode(q, kc, vc, step["seq_lens"], step["block_tables"], head_dim**-0.5)
    o = _linear(attn.reshape(batch, -1), p["o"], p["lin_cfg"])
    h2, res2 = rms_norm(o, p["ln2"], EPS, res)
    topk_weights, topk_ids = route_fused(h2, p["router"], p["top_k"], True)
    y = fused_experts(h2, p["w13"], p["w2"], topk_weights, topk_ids, config=p["moe_cfg"])
    outs = dict(h=h, res=res, qkv=qkv, q=q, attn=attn, o=o, h2=h2, res2=res2, topk_weights=topk_weights,
                topk_ids=topk_ids, y=y)
    return {k: t for k, t in outs.items() if t is not None}


def _two_layers(p: dict, step: dict) -> list[dict[str, torch.Tensor]]:
    k0, v0, k1, v1 = step["caches"]
    first = _layer(p, step["x"], step["residual"], step, k0, v0)
    return [first, _layer(p, first["y"], first["res2"], step, k1, v1)]  # layer 2's norm follows layer 1's MoE


def _check_against_references(p: dict, step: dict, outs: dict, x: torch.Tensor, residual: torch.Tensor,
                              kc: torch.Tensor, vc: torch.Tensor, tol: float) -> None:
    # each stage against its torch reference, fed the chain's own previous stage (kc / vc: the cache as the layer
    # left it; the prologue's reference stores the same k / v into a copy of it)
    def close(a, b, what):
        err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()
        assert err < tol, (what, err)

    h, res = rms_norm_ref(x, p["ln1"], EPS, residual)
    close(outs["h"], h, "rms_norm")
    close(outs["res"], res, "residual")
    close(outs["qkv"], F.linear(outs["h"].float(), p["qkv"].float()), "qkv")
    kc2, vc2 = kc.clone(), vc.clone()
    q = qkv_prologue_ref(outs["qkv"], step["positions"], p["cos_sin"], p["qn"], p["kn"], EPS, kc2, vc2, step["slots"])
    close(outs["q"], q, "prologue q")
    kv_heads, head_dim = kc.shape[2], kc.shape[3]
    close(kc.view(-1, kv_heads, head_dim)[step["slots"]], kc2.view(-1, kv_heads, head_dim)[step["slots"]], "cache k")
    close(vc.view(-1, kv_heads, head_dim)[step["slots"]], vc2.view(-1, kv_heads, head_dim)[step["slots"]], "cache v")
    attn = paged_attention_decode_ref(outs["q"], kc, vc, step["seq_lens"], step["block_tables"], kc.shape[3] ** -0.5)
    close(outs["attn"], attn, "decode attention")
    close(outs["o"], F.linear(outs["attn"].reshape(x.shape[0], -1).float(), p["o"].float()), "o_proj")
    h2, _ = rms_norm_ref(outs["o"], p["ln2"], EPS, outs["res"])
    close(outs["h2"], h2, "post norm")
    weights, _ = route_fused_ref(outs["h2"], p["router"], p["top_k"], True)
    close(outs["topk_weights"].sort(1).values, weights.sort(1).values, "router")  # ids: near-ties may swap
    y = fused_experts_ref(outs["h2"], p["w13"], p["w2"], outs["topk_weights"], outs["topk_ids"])
    close(outs["y"], y, "experts")


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_layer_kernels_with_switch_set_match_references(monkeypatch, batch):
    # MOE_RT_PDL=1 on a CPU: PDL stays off (the interpreter), and each of a layer's kernels still equals its
    # reference; the same chain runs on the GPU below with PDL on
    _switch(monkeypatch, "1")
    p, step = _problem("cpu", torch.float32, batch, hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, inter=32,
                       top_k=2, ctx=9, page=4)
    caches = [c.clone() for c in step["caches"]]
    first, second = _two_layers(p, step)
    _check_against_references(p, step, first, step["x"], step["residual"], step["caches"][0], step["caches"][1],
                              1e-4)
    _check_against_references(p, step, second, first["y"], first["res2"], step["caches"][2], step["caches"][3],
                              1e-4)
    assert not torch.equal(caches[0], step["caches"][0])  # the prologue stored this step's k


_PDL_MODULES = ("attention.decode", "fp8", "linear.w8a8", "fused_moe", "linear.gemv", "moe_align", "norm",
                "attention.qkv_prologue", "router_fused")


def _force_pdl(monkeypatch: pytest.MonkeyPatch) -> None:
    # every wrapper as on a Hopper GPU with the switch on; the interpreter runs the PDL=True kernels without the two
    # griddepcontrol instructions (kernels/pdl.py _GDC)
    import importlib

    for name in _PDL_MODULES:
        monkeypatch.setattr(importlib.import_module(f"kernels.{name}"), "pdl_enabled", lambda device: True)
    monkeypatch.setattr(importlib.import_module("kernels.moe_gemv"), "pdl_supported", lambda device: True)
    _switch(monkeypatch, "1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's launches")
def test_every_launch_has_launch_pdl_exactly_when_compiled_with_pdl(monkeypatch):
    # a kernel launched with PDL but compiled without its wait would race; compiled with it but launched without,
    # it would only lose the overlap: both are wrapper bugs. No kernel runs here (the launches are recorded)
    from triton.runtime.interpreter import InterpretedFunction

    from kernels.linear import w8a8 as fp8_linear

    seen = []

    def record(self, *args, grid, warmup, **kw):  # noqa: ANN001, ANN202
        seen.append((self.fn.__name__, kw.get("PDL", "absent"), kw.get("launch_pdl", False)))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    _force_pdl(monkeypatch)
    for batch in (1, 3, 64):
        p, step = _problem("cpu", torch.float32, batch, hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8,
                           inter=32, top_k=2, ctx=9, page=4)
        if "gemv" in p["moe_cfg"]:
            p["moe_cfg"]["gemv"]["pdl"] = True
        _two_layers(p, step)
    # the decode attention with the prologue fused in (kernels/attention/decode_fused.py), one launch of _decode_kernel
    qkv = torch.randn(64, (4 + 2 * 2) * 16)
    before = len(seen)
    paged_attention_decode_fused(qkv, step["positions"], p["cos_sin"], p["qn"], p["kn"], EPS, *step["caches"][:2],
                                 step["slots"], step["seq_lens"], step["block_tables"], 0.25)
    assert [name for name, *_ in seen[before:]][:1] == ["_decode_kernel"], seen[before:]
    fp8_linear.w8a8_block_linear(torch.randn(2, 256), torch.zeros(256, 256, dtype=torch.float8_e4m3fn),
                                 torch.ones(2, 2))
    assert len({name for name, *_ in seen}) >= 8, seen
    assert all(pdl_arg is True and launch is True for _, pdl_arg, launch in seen), seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter")
@pytest.mark.parametrize("batch", [1, 3])
def test_pdl_variants_run_in_the_interpreter_and_match_references(monkeypatch, batch):
    # the PDL=True kernels' own code (peeled first K steps, weight tiles loaded before the wait, the MoE GEMV down
    # kernel's early ids) against the references: the GPU adds only the two griddepcontrol instructions
    _force_pdl(monkeypatch)
    p, step = _problem("cpu", torch.float32, batch, hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, inter=32,
                       top_k=2, ctx=9, page=4)
    if "gemv" in p["moe_cfg"]:
        p["moe_cfg"]["gemv"]["pdl"] = True
    first, second = _two_layers(p, step)
    _check_against_references(p, step, first, step["x"], step["residual"], step["caches"][0], step["caches"][1],
                              1e-4)
    _check_against_references(p, step, second, first["y"], first["res2"], step["caches"][2], step["caches"][3],
                              1e-4)


# ------------------------------------------------------------------------------------------- GPU

_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9  # where PDL is on (kernels/pdl.py)


def _flat(outs: list[dict]) -> list[torch.Tensor]:
    return [t.clone() for layer in outs for t in layer.values()]


@pytest.mark.gpu
@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("batch,fused_prologue", [(1, False), (8, False), (64, False), (1, True), (64, True)])
def test_pdl_chain_in_cuda_graph_equals_serial(monkeypatch, batch, fused_prologue):
    # Qwen3-30B-A3B shapes, two layers (B=1/8: the GEMV linears and MoE GEMVs, B=64: cuBLAS linears, align and the
    # tl.dot experts): PDL off against the references, then PDL on bit for bit equal to PDL off, eager and in CUDA
    # graphs replayed on new inputs. The kernels are deterministic: any difference is a race that the rule of
    # kernels/pdl.py should have excluded. fused_prologue: the decode attention with the prologue inside (its own
    # references: tests/test_decode_fused.py)
    p, step = _problem("cuda", torch.bfloat16, batch, hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128,
                       inter=768, top_k=8, ctx=1000, page=16)
    p["fused_prologue"] = fused_prologue
    _switch(monkeypatch, "0")
    off = _two_layers(p, step)
    if not fused_prologue:
        _check_against_references(p, step, off[0], step["x"], step["residual"], step["caches"][0], step["caches"][1],
                                  2e-2)
    # each graph its own KV cache (a race between the prologue's store and the attention's read must show in the
    # graph that has it, not be masked by the other graph's identical store) and its own inputs
    steps = {"0": step, "1": dict(step, x=step["x"].clone(), caches=[c.clone() for c in step["caches"]])}
    graphs = {}
    for value in ("0", "1"):  # eager first (compiles, sizes the counters), then captured
        _switch(monkeypatch, value)
        assert pdl.pdl_enabled(torch.device("cuda")) is (value == "1")
        eager = _flat(_two_layers(p, steps[value]))
        if value == "1":
            assert all(torch.equal(a, b) for a, b in zip(eager, _flat(off)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _two_layers(p, steps[value])
        graphs[value] = (graph, outs)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for i in range(200):  # many replays: a race need not show every time
        x = torch.randn(step["x"].shape, device="cuda", generator=gen)
        got = {}
        for value, (graph, outs) in graphs.items():
            s = steps[value]
            s["x"].copy_(x)
            for layer in outs:  # poisoned: a value read before its kernel wrote it turns the result into NaN
                for t in layer.values():
                    if t.is_floating_point():
                        t.fill_(float("nan"))
            for c in s["caches"]:  # this step's k / v rows, which the prologue stores and the attention reads
                c.view(-1, c.shape[2], c.shape[3])[s["slots"]] = float("nan")
            graph.replay()
            got[value] = _flat(outs)
        assert all(torch.equal(a, b) for a, b in zip(got["1"], got["0"])), f"replay {i}"
        assert not torch.equal(got["1"][0], eager[0])  # new inputs went through


@pytest.mark.gpu
@pytest.mark.skipif(not _HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Glm4MoeForCausalLM", "fp8"])
def test_engine_greedy_tokens_with_pdl(tmp_path, monkeypatch, arch):
    # the engine (Triton kernels, CUDA graphs) gives the same greedy tokens with MOE_RT_PDL=1 as without; "fp8": a
    # GLM-4.5 checkpoint with block-scaled FP8 linears (the W8A8 kernels, their activation quant and split K)
    from runtime import LLM, SamplingParams
    from tests.tiny import make_tiny_checkpoint

    if arch == "fp8":
        from tests.test_fp8_linear_model import SHAPES, _fp8_checkpoint

        src = make_tiny_checkpoint(str(tmp_path / "f32"), "Glm4MoeForCausalLM", **SHAPES)
        path = str(tmp_path / "fp8")
        _fp8_checkpoint(src, path)
    else:
        path = make_tiny_checkpoint(str(tmp_path / arch), arch, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 11, 17, 33, 2, 9)]

    def run() -> list[list[int]]:
        llm = LLM(model=path, dtype="bfloat16", device="cuda", block_size=16, kv_cache_memory=64 << 20)
        outs = llm.generate([{"prompt_token_ids": q} for q in prompts], SamplingParams(temperature=0, max_tokens=24))
        return [o.outputs[0].token_ids for o in outs]

    _switch(monkeypatch, "0")
    off = run()
    _switch(monkeypatch, "1")
    assert run() == off
