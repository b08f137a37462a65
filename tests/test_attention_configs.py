"""Attention tile configs: every config the tuner sweeps computes the same attention (Triton interpreter, small
odd sizes, fp16 / fp32 q, bf16-like and FP8 caches); the per-GPU table lookup; the tuner's sweep and pick
logic on tiny CPU cases."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.sm90 import run_sm90_probe

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kernels.attention.config as acfg  # noqa: E402
from kernels.attention.decode import paged_attention_decode, paged_attention_decode_ref  # noqa: E402
from kernels.attention.prefill import paged_attention_prefill, paged_attention_prefill_ref  # noqa: E402
from tests.test_kernels_attention import _fp8_cache, _make_cache, _rel_err  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

FP8 = torch.float8_e4m3fn
# tile configs of the tuner's kinds, small enough for the interpreter (64-wide blocks)
DECODE_CFGS = [
    {"BLOCK_N": 16, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2, "min_split_tokens": 16},
    {"BLOCK_N": 64, "num_warps": 8, "num_stages": 4, "programs_per_sm": 4, "min_split_tokens": 64},
]
PREFILL_CFGS = [
    {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
]


@pytest.mark.parametrize("cfg", DECODE_CFGS)
@pytest.mark.parametrize("kv", ["fp16", "fp8"])
def test_decode_configs(cfg, kv):
    heads, kv_heads, head_dim, block_size = 6, 2, 48, 16  # GQA group 3, head_dim not a power of two
    seq_lens = [77, 0, 1, 200, 33]
    scales = (0.5, 2.0) if kv == "fp8" else (1.0, 1.0)
    if kv == "fp8":
        k, v, tables = _fp8_cache(seq_lens, block_size, kv_heads, head_dim, scales)
    else:
        k, v, tables = _make_cache(seq_lens, block_size, kv_heads, head_dim, torch.float16, "cpu")
    q = torch.randn(len(seq_lens), heads, head_dim, generator=torch.Generator().manual_seed(9)).to(torch.float16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = paged_attention_decode_ref(q, k, v, lens, tables, head_dim**-0.5, *scales)
    for splits in (None, 5):  # the config's split rule, and a count that leaves some splits empty
        out = paged_attention_decode(q, k, v, lens, tables, head_dim**-0.5, *scales, num_splits=splits, config=cfg)
        assert out[1].abs().max() == 0
        assert _rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("cfg", PREFILL_CFGS)
@pytest.mark.parametrize("kv,heads", [("fp32", 8), ("fp8", 8), ("fp16", 6)])
def test_prefill_configs(cfg, kv, heads):
    kv_heads, head_dim, block_size = 2, 32, 16  # group 4 packs into the tile (BLOCK_M >= 64); group 3 does not
    q_lens, seq_lens = [5, 1, 0, 70], [5, 40, 9, 131]
    scales = (2.0, 0.25) if kv == "fp8" else (1.0, 1.0)
    if kv == "fp8":
        k, v, tables = _fp8_cache(seq_lens, block_size, kv_heads, head_dim, scales)
    else:
        k, v, tables = _make_cache(seq_lens, block_size, kv_heads, head_dim, getattr(torch, f"float{kv[2:]}"), "cpu")
    q_dtype = torch.float32 if kv == "fp32" else torch.float16
    q = torch.randn(sum(q_lens) + 1, heads, head_dim, generator=torch.Generator().manual_seed(4)).to(q_dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    args = (q, k, v, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, head_dim**-0.5, max(q_lens), *scales)
    out = paged_attention_prefill(*args, config=cfg)
    assert out[-1].abs().max() == 0
    assert _rel_err(out, paged_attention_prefill_ref(*args)) < (1e-4 if q_dtype == torch.float32 else 3e-3)


def test_tiles_narrower_than_a_page():
    # BLOCK_N < block_size: tiles start inside pages, so the in-page offset is computed per tile
    seq_lens, q_lens = [150, 0, 61], [20, 0, 61]
    k, v, tables = _make_cache(seq_lens, 64, 2, 32, torch.float16, "cpu")
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(3, 4, 32).half()
    dec_cfg = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2, "min_split_tokens": 16}
    out = paged_attention_decode(q, k, v, lens, tables, 32**-0.5, num_splits=3, config=dec_cfg)
    assert _rel_err(out, paged_attention_decode_ref(q, k, v, lens, tables, 32**-0.5)) < 3e-3
    q = torch.randn(sum(q_lens), 4, 32).half()
    cu = torch.tensor([0, 20, 20, 81], dtype=torch.int32)
    args = (q, k, v, cu, lens, tables, 32**-0.5, 61)
    out = paged_attention_prefill(*args, config={"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
    assert _rel_err(out, paged_attention_prefill_ref(*args)) < 3e-3


def test_fp8_kv_with_bf16_range_q_saturates_not_nan():
    # the FP8 path runs its dots in fp16: a bf16 q beyond fp16's range must saturate, not become inf / NaN
    k, v, tables = _fp8_cache([20], 16, 1, 16, (1.0, 1.0))
    q = torch.full((1, 2, 16), 1e5, dtype=torch.bfloat16)
    out = paged_attention_decode(q, k, v, torch.tensor([20], dtype=torch.int32), tables, 0.25)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_64bit_cache_offsets(kernel, monkeypatch):
    # a cache past 2^31 elements switches the kernels to 64-bit row offsets: the same results (forced here)
    import kernels.attention.decode as dec
    import kernels.attention.prefill as attn

    big = torch.empty(1 << 20, 16, 8, 256, device="meta")  # 2^35 elements: offsets past int32
    assert attn.needs_off64(big) and not attn.needs_off64(torch.empty(1000, 16, 8, 128, device="meta"))
    monkeypatch.setattr(attn, "needs_off64", lambda cache: True)
    monkeypatch.setattr(dec, "needs_off64", lambda cache: True)
    seq_lens = [40, 0, 75]
    k, v, tables = _make_cache(seq_lens, 16, 2, 32, torch.float16, "cpu")
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    if kernel == "decode":
        q = torch.randn(3, 4, 32).half()
        args = (q, k, v, lens, tables, 32**-0.5)
        out, ref = paged_attention_decode(*args, num_splits=2), paged_attention_decode_ref(*args)
    else:
        q = torch.randn(30, 4, 32).half()
        cu = torch.tensor([0, 10, 10, 30], dtype=torch.int32)
        args = (q, k, v, cu, lens, tables, 32**-0.5, 20)
        out, ref = paged_attention_prefill(*args), paged_attention_prefill_ref(*args)
    assert _rel_err(out, ref) < 3e-3


def test_k_and_v_caches_must_share_strides():
    # the kernels compute one row offset for K and V: a V with the same shape but other strides is refused
    k, v, tables = _make_cache([20], 16, 2, 32, torch.float32, "cpu")
    v_pad = torch.empty(v.shape[0], v.shape[1], v.shape[2], 64)[..., :32].copy_(v)  # head_dim padded to 64
    with pytest.raises(ValueError, match="same strides"):
        paged_attention_decode(torch.randn(1, 4, 32), k, v_pad, torch.tensor([20], dtype=torch.int32), tables, 0.2)


def test_config_table_lookup(tmp_path, monkeypatch):
    cpu = torch.device("cpu")  # the CPU's table (none checked in), on a GPU host too
    default = acfg.decode_config(128, torch.bfloat16, cpu)
    assert default == acfg.default_decode_config(128)
    assert acfg.prefill_config(128, FP8, cpu) == acfg.default_prefill_config(128)
    tuned = {"decode": {"d128_fp8": {"BLOCK_N": 128, "num_stages": 3}},
             "prefill": {"d128_bf16": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2,
                                       "PIPE_QK": 1}}}  # an older table's key: ignored
    (tmp_path / acfg.config_file_name("cpu")).write_text(json.dumps(tuned))
    monkeypatch.setattr(acfg, "CONFIG_DIR", tmp_path)
    acfg.clear_cache()
    try:
        assert acfg.decode_config(128, FP8, cpu) == dict(default, BLOCK_N=128, num_stages=3)  # missing keys: default
        assert acfg.decode_config(128, torch.bfloat16, cpu) == default
        assert acfg.prefill_config(128, torch.bfloat16, cpu)["BLOCK_N"] == 128
        assert acfg.prefill_config(64, torch.bfloat16, cpu) == acfg.default_prefill_config(64)  # another head_dim
    finally:
        acfg.clear_cache()
    with pytest.raises(ValueError, match="power of two"):
        acfg.check_config(dict(default, BLOCK_N=48), acfg.DECODE_KEYS, 128)
    with pytest.raises(ValueError, match="lacks"):
        acfg.check_config({"BLOCK_N": 64}, acfg.DECODE_KEYS, 128)
    for knob in ("fp8_q2", "early_inputs"):  # switches: a 2 would compile a variant of its own for nothing
        with pytest.raises(ValueError, match=f"{knob}=2 must be 0 or 1"):
            acfg.check_config(dict(default, **{knob: 2}), acfg.DECODE_KEYS, 128)


def test_another_gpus_table_lends_tiles_not_the_gluon_kernel(tmp_path, monkeypatch):
    # an H100 without a table of its own runs the H200's tiles, but not the Gluon prefill only the H200 measured
    h200 = {"prefill": {"d128_bf16": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2,
                                      "gluon": {"split_wg": 1}, "GLUON_MIN_Q": 2048}}}
    (tmp_path / acfg.config_file_name("NVIDIA_H200")).write_text(json.dumps(h200))
    monkeypatch.setattr(acfg, "CONFIG_DIR", tmp_path)
    acfg.clear_cache()
    try:
        monkeypatch.setattr(acfg, "device_name", lambda device=None: "NVIDIA_H100_80GB_HBM3")
        on_h100 = acfg.prefill_config(128, torch.bfloat16, torch.device("cpu"))
        monkeypatch.setattr(acfg, "device_name", lambda device=None: "NVIDIA_H200")
        acfg.clear_cache()
        on_h200 = acfg.prefill_config(128, torch.bfloat16, torch.device("cpu"))
    finally:
        acfg.clear_cache()
    assert on_h200["gluon"] == {"split_wg": 1} and on_h100 == {k: v for k, v in on_h200.items() if k != "gluon"}


_SM90_PROBE = """
import json, sys
sys.path.insert(0, "benchmarks")
from attention_ir import inspect
print(json.dumps([inspect("decode", "bf16", stages=3), inspect("decode", "fp8", stages=3),
                  inspect("prefill", "bf16", warps=8, stages=3)]))
"""


def test_kernels_compile_for_sm90_with_overlapped_kv_copies():
    # no GPU needed: the kernels compiled for Hopper (Triton's own ptxas) with the launch's specializations.
    # Double-buffered K/V with the next tile's copy in flight during the dots (the page ids loaded a tile
    # ahead; before, K/V waited on a same-iteration page load and were single-buffered, every wait on all
    # copies), and an FP8 cache widened to fp16 with no per-value F2F (fp16 -> bf16) conversion
    dec_bf16, dec_fp8, pre = run_sm90_probe(_SM90_PROBE)
    for r in (dec_bf16, dec_fp8, pre):
        assert r["spill_bytes"] == 0
        assert min(r["kv_buffer_depths"]) >= 2 and max(r["async_wait_in_flight"]) > 0, r
    assert dec_fp8["sass_ops"]["F2F"] == 0 and dec_fp8["sass_ops"]["F2FP"] > 0
    assert dec_fp8["shared_bytes"] < dec_bf16["shared_bytes"]  # the FP8 tiles stay FP8 in shared memory


def test_tuner_sweeps_and_picks_on_tiny_cases(monkeypatch):
    import attention_cases as ac
    import tune_attention as ta

    monkeypatch.setattr(ac, "DEVICE", "cpu")
    monkeypatch.setattr(ac, "DT", torch.float16)
    monkeypatch.setattr(ac, "HEAD_DIM", 32)
    monkeypatch.setattr(ta, "HEAD_DIM", 32)
    monkeypatch.setattr(ta, "DECODE_TILES", [(16, 4, 2), (32, 4, 3)])
    monkeypatch.setattr(ta, "DECODE_TILES_FP8", [(16, 4, 2, 1)])  # an FP8 cache's extra tile: fp8_widen 1
    monkeypatch.setattr(ta, "DECODE_TILES_FP8_DOT", [(32, 4, 2, 0, 2)])  # and a tensor-core variant: fp8_dot 2
    monkeypatch.setattr(ta, "PREFILL_FP8_DOT_TILES", [(32, 32, 4, 2)])
    monkeypatch.setattr(ta, "SPLIT_RULES", [(1, 16), (2, 64)])
    monkeypatch.setattr(ta, "PREFILL_TILES", [(32, 16, 4, 2), (16, 32, 4, 3)])
    monkeypatch.setattr(ta, "PREFILL_VARIANT_TILES", {"bf16": [(32, 16, 4, 2)], "fp8": [(32, 16, 4, 2)]})
    ceil = {"copy_tbps": 1.0, "bf16_tflops": 1.0}
    budget = ta.Budget(600)
    rows = []
    rows += ta.sweep_decode(ac.DecodeCase(1, 90, "fp8", 4, 2), ceil, 8, budget, 1.0)
    rows += ta.sweep_prefill(ac.PrefillCase(24, 40, "fp8", 4, 2), ceil, budget, 1.0)
    # a varlen launch of 2 sequences: the case's k / v of the chunk feed the RAGGED variants
    rows += ta.sweep_prefill(ac.PrefillCase(30, 0, "bf16", 6, 2, batch=2), ceil, budget, 1.0)
    # decode (FP8): 4 tiles (fp8_widen, fp8_dot on the FP8 ones) x 2 split counts; prefill fp8: 2 tiles + 3 variants
    # (no RAGGED on an FP8 cache) + FP8_DOT on its tile; bf16: 2 tiles + 4 variants (no Q_F16, no FP8_DOT)
    assert len(rows) == 4 * 2 + 6 + 6 and all(r["err"] < ta.tolerance(r["cfg"]) for r in rows)
    assert sorted(r["cfg"]["fp8_widen"] for r in rows if r["kind"] == "decode") == [0, 0, 0, 0, 0, 0, 1, 1]
    assert sorted(r["cfg"]["fp8_dot"] for r in rows if r["kind"] == "decode") == [0, 0, 0, 0, 0, 0, 2, 2]
    assert [r["kv"] for r in rows if r["cfg"].get("FP8_DOT")] == ["fp8"]
    assert all(ta.tolerance(r["cfg"]) == ta.TOL_FP8_DOT for r in rows if r["cfg"].get("FP8_DOT") or
               r["cfg"].get("fp8_dot"))
    assert {r["splits"] for r in rows if r["kind"] == "decode"} == {2, 4}  # (1 per SM, 16) / (2 per SM, 64)
    table = ta.pick(rows)
    assert set(table["decode"]) == {"d32_fp8"} and set(table["prefill"]) == {"d32_bf16", "d32_fp8"}
    best = table["prefill"]["d32_fp8"]
    assert {k: best[k] for k in acfg.PREFILL_KEYS} in [ta.prefill_cfg(t) for t in ta.PREFILL_TILES +
                                                       ta.PREFILL_FP8_DOT_TILES]
    assert not table["prefill"]["d32_bf16"].get("RAGGED")  # the model passes no K/V: RAGGED only when asked
    ragged = [r for r in rows if r["cfg"].get("RAGGED")]
    for r in ragged:
        r["frac"] = 1e3
    assert ta.pick(rows, pick_ragged=True)["prefill"]["d32_bf16"]["RAGGED"] == 1
    plan = ta.compile_plan([ac.DecodeCase(1, 90, "fp8", 4, 2)], [ac.PrefillCase(24, 40, "fp8", 4, 2)], 8)
    # per tile the split kernel for > 1 splits (2 and 4 splits share it); the merge for 2 and for 4 splits
    # (whatever the tile); one prefill binary per tile and per variant (FP8_DOT's included)
    assert len(plan) == 4 + 2 + 2 + 3 + 1
    # --fp8-dot-only: the table's config as it is (here the default: no CPU table), then the fp8_dot tiles
    only = ta.sweep_decode(ac.DecodeCase(1, 90, "fp8", 4, 2), ceil, 8, budget, 1.0, fp8_dot_only=True)
    assert [r["cfg"]["fp8_dot"] for r in only] == [0, 2, 2] and only[0]["cfg"] == acfg.decode_config(32, FP8)
    assert ta.prefill_cfgs("fp8", True) == [acfg.prefill_config(32, FP8), ta.prefill_cfg((32, 32, 4, 2),
                                                                                         ta.PREFILL_FP8_DOT)]
    assert ta.prefill_cfgs("bf16", True) == ta.prefill_cfgs("bf16")


def test_tuner_table_merge_keeps_unswept_keys():
    # a run whose FP8 cases were all skipped for the budget picks bf16 entries only: the checked-in FP8 entries of
    # the same kinds stay (a per-kind update dropped them, and FP8 fell back to the default tiles), a kind this run
    # did not sweep stays, the picks replace their keys without the geomean_frac bookkeeping
    import tune_attention as ta

    old = json.loads((acfg.CONFIG_DIR / acfg.config_file_name("NVIDIA_H200")).read_text())
    dec = {**ta.decode_cfg((64, 4, 3), (2, 64)), "geomean_frac": 0.5, "small_batch_geomean_frac": 0.6}
    pre = {**ta.prefill_cfg((128, 64, 8, 3)), "geomean_frac": 0.4}
    written = ta.merge_table(old, {"decode": {"d128_bf16": dec}, "prefill": {"d128_bf16": pre}})
    assert written["decode"]["d128_fp8"] == old["decode"]["d128_fp8"]
    assert written["prefill"]["d128_fp8"] == old["prefill"]["d128_fp8"]
    assert written["decode"]["d128_bf16"] == ta.decode_cfg((64, 4, 3), (2, 64))
    # (the Gluon prefill and its GLUON_MIN_Q, set from bench_attention --gluon, which this tuner does not time)
    gluon = {k: old["prefill"]["d128_bf16"][k] for k in ("gluon", "GLUON_MIN_Q")}
    assert written["prefill"]["d128_bf16"] == {**ta.prefill_cfg((128, 64, 8, 3)), **gluon}
    assert ta.merge_table(old, {"prefill": {"d128_bf16": pre}})["decode"] == old["decode"]
    assert ta.merge_table({}, {"prefill": {"d128_bf16": pre}}) == {"prefill": {"d128_bf16": ta.prefill_cfg(
        (128, 64, 8, 3))}}
    assert "geomean_frac" in pre  # the picks themselves are left as they are (tune_attention.json prints them)


def test_tuner_gluon_configs_are_valid():
    # --gluon's configs pass the table's checks and the Gluon kernel's (its tiles within shared memory at head_dim
    # 128), a bf16 cache only; the compile plan takes them (a tile dict in a config) once each
    import attention_cases as ac
    import tune_attention as ta

    from kernels.attention.prefill_gluon import gluon_config

    cfgs = ta.gluon_cfgs("bf16", ta.GLUON_TILES)
    assert [c["gluon"] for c in cfgs] == ta.GLUON_TILES and ta.gluon_cfgs("fp8", ta.GLUON_TILES) == []
    assert ta.gluon_cfgs("bf16", None) == []
    for cfg in cfgs:
        acfg.check_config(cfg, acfg.PREFILL_KEYS, 128)
        assert gluon_config(cfg, 128) is not None and cfg["GLUON_MIN_Q"] == 0
    cases = [ac.PrefillCase(1024, 0, "bf16"), ac.PrefillCase(4096, 0, "bf16")]  # one head shape: one binary each
    plan = ta.compile_plan([], cases, 132, gluon_tiles=ta.GLUON_TILES)
    assert len(plan) == len(ta.prefill_cfgs("bf16")) + len(ta.GLUON_TILES)
    assert [item[4] for item in plan if item[4].get("gluon")] == cfgs


def test_tuner_sweep_skips_gluon_where_it_does_not_run(monkeypatch, capsys):
    # the Gluon kernel needs sm90: on the CPU its configs would run the Triton kernel, so they are not timed
    import attention_cases as ac
    import tune_attention as ta

    monkeypatch.setattr(ac, "DEVICE", "cpu")
    monkeypatch.setattr(ac, "DT", torch.float16)
    monkeypatch.setattr(ac, "HEAD_DIM", 32)
    monkeypatch.setattr(ta, "HEAD_DIM", 32)
    monkeypatch.setattr(ta, "PREFILL_TILES", [(32, 16, 4, 2)])
    monkeypatch.setattr(ta, "PREFILL_VARIANT_TILES", {})
    rows = ta.sweep_prefill(ac.PrefillCase(20, 0, "bf16", 4, 2), {"copy_tbps": 1.0, "bf16_tflops": 1.0},
                            ta.Budget(600), 1.0, gluon_tiles=[1])
    assert [r["cfg"] for r in rows] == [ta.prefill_cfg((32, 16, 4, 2))] and rows[0]["q_len"] == 20
    assert "gluon=1: skip" in capsys.readouterr().out


def _prefill_rows(cfg: dict, us: dict[str, float], kv: str = "bf16") -> list[dict]:
    # rows as sweep_prefill writes them, us per case name; the cases: the tuner's prefill and extend lengths
    q_lens = {"p1k": 1024, "p4x2k": 2048, "p4k": 4096, "p16k": 16384, "e8k": 8192, "e8k_glm": 8192}
    return [{"kind": "prefill", "case": c, "q_len": q_lens[c], "kv": kv, "cfg": cfg, "us": t, "frac": 1.0 / t}
            for c, t in us.items()]


def test_tuner_picks_gluon_keys():
    # GLUON_MIN_Q: the shortest length from which the Gluon tiles beat the picked Triton config at every longer
    # length (both 8k cases must win there); the tiles: the best geometric mean over the cases as the table would run
    # them (Triton below GLUON_MIN_Q); never won at the longest: no Gluon keys; an entry the Gluon kernel was not
    # timed on (FP8 cache): not in the picks
    import tune_attention as ta

    a, b = ta.prefill_cfg((128, 128, 8, 3), {"MASK_FREE": 1}), ta.prefill_cfg((128, 64, 8, 3))
    g1, g2, g3 = ({**cfg, "gluon": g, "GLUON_MIN_Q": 0} for cfg, g in zip([acfg.default_prefill_config(128)] * 3, [
        {"num_stages": 3, "split_wg": 1}, 1, {"BLOCK_N": 64, "num_stages": 3}]))
    cases = ["p1k", "p4x2k", "p4k", "p16k", "e8k", "e8k_glm"]
    rows = (_prefill_rows(a, dict.fromkeys(cases, 10.0)) + _prefill_rows(b, dict.fromkeys(cases, 12.0))
            + _prefill_rows(a, {"p1k": 5.0, "p4k": 5.0}, "fp8")
            + _prefill_rows(g1, dict(zip(cases, [30.0, 8.0, 8.0, 8.0, 8.0, 8.0])))  # wins from 2048
            + _prefill_rows(g2, dict(zip(cases, [9.0, 11.0, 6.0, 6.0, 6.0, 6.0])))  # faster, but from 4096 only
            + _prefill_rows(g3, dict(zip(cases, [9.0, 9.0, 9.0, 9.0, 9.0, 11.0]))))  # lost at one 8k case: 16k only
    triton = [r for r in rows if not r["cfg"].get("gluon")]
    table = ta.pick(triton)
    assert {k: v for k, v in table["prefill"]["d128_bf16"].items() if k != "geomean_frac"} == a
    # as run: g2 (Triton's 10, 10, then 6 x 4) beats g1 (10, then 8 x 5) and g3 (won at 16k only: 10 x 5, 9)
    assert ta.pick_gluon(rows, table) == {"d128_bf16": {"gluon": 1, "GLUON_MIN_Q": 4096}}
    assert ta.pick_gluon([r for r in rows if r["cfg"] != g2], table) == {
        "d128_bf16": {"gluon": {"num_stages": 3, "split_wg": 1}, "GLUON_MIN_Q": 2048}}
    assert ta.gluon_min_q({1024: False, 2048: True, 4096: False, 8192: True, 16384: True}) == 8192
    lost = _prefill_rows(g1, dict(zip(cases, [8.0, 8.0, 8.0, 30.0, 8.0, 8.0])))  # lost at the longest
    assert ta.pick_gluon(triton + lost, table) == {"d128_bf16": {}}
    assert ta.pick_gluon(triton + lost[:-1], table) == {}  # a case not timed (the budget): the table's keys stay


def test_tuner_rewrite_keeps_prefill_keys():
    # a rewritten prefill entry keeps the keys no sweep times (the lead's hand-set Gluon keys, an FP8 scratch count)
    # from the table it started from; where --gluon timed the kernel, its picks replace them (or drop them)
    import tune_attention as ta

    old = json.loads((acfg.CONFIG_DIR / acfg.config_file_name("NVIDIA_H200")).read_text())
    old["prefill"]["d128_bf16"].update(gluon={"num_stages": 3, "split_wg": 1}, GLUON_MIN_Q=2048)
    old["prefill"]["d128_fp8"].update(FP8_SCRATCH_MIN_Q=512)
    before = json.dumps(old, sort_keys=True)
    new_bf16, new_fp8 = ta.prefill_cfg((128, 64, 8, 3)), ta.prefill_cfg((128, 128, 8, 4))
    table = {"prefill": {"d128_bf16": {**new_bf16, "geomean_frac": 0.5}, "d128_fp8": {**new_fp8, "geomean_frac": 0.4}}}
    for picks, bf16_keys in (({}, {"gluon": {"num_stages": 3, "split_wg": 1}, "GLUON_MIN_Q": 2048}),
                             ({"d128_bf16": {}}, {}),
                             ({"d128_bf16": {"gluon": 1, "GLUON_MIN_Q": 4096}}, {"gluon": 1, "GLUON_MIN_Q": 4096})):
        written = ta.with_prefill_keys(ta.merge_table(old, table), old, table, picks)
        assert written["prefill"]["d128_bf16"] == {**new_bf16, **bf16_keys}
        assert written["prefill"]["d128_fp8"] == {**new_fp8, "FP8_SCRATCH_MIN_Q": 512}
        assert written["decode"] == old["decode"]
        for entry in written["prefill"].values():
            acfg.check_config(entry, acfg.PREFILL_KEYS, 128)
    assert json.dumps(old, sort_keys=True) == before  # the table read in is left as it was
    written = ta.with_prefill_keys(ta.merge_table({}, table), {}, table, {})  # nothing checked in
    assert written["prefill"]["d128_bf16"] == new_bf16


def test_tuner_refuses_an_unknown_kv_dtype(monkeypatch, tmp_path, capsys):
    # a typo in --kv-dtypes is a one-line usage error before any GPU work (it used to time no case and write the
    # checked-in table back as this run's)
    import tune_attention as ta

    monkeypatch.setattr(sys, "argv", ["tune_attention.py", "--out", str(tmp_path), "--kv-dtypes", "fp8,bf61"])
    with pytest.raises(SystemExit):
        ta.main()
    assert "--kv-dtypes: unknown ['bf61']" in capsys.readouterr().err


def test_tuner_table_merge_of_one_batch_class():
    # the budget ran out after an FP8 decode sweep's B=1 cases: that pick is the checked-in entry's small-batch
    # config, not the config of every batch (B=64 with a B=1 tile and split rule); a sweep of the larger batches only
    # keeps the checked-in small-batch config
    import attention_pick as ap
    import tune_attention as ta

    old = json.loads((acfg.CONFIG_DIR / acfg.config_file_name("NVIDIA_H200")).read_text())
    a, b = ta.decode_cfg((64, 4, 3), (2, 64)), ta.decode_cfg((32, 4, 2), (8, 64, {"max_splits": 256}))
    key = f"d{ta.HEAD_DIM}_fp8"
    for batches, cfg in (((1,), b), ((16, 64), a)):
        rows = [{"kind": "decode", "case": f"B={n}", "batch": n, "kv": "fp8", "cfg": cfg, "frac": 0.5} for n in batches]
        table = ta.pick_small_batch(rows, ta.pick(rows))
        assert table["decode"][key]["batch_class"] == ("small" if batches == (1,) else "large")
        entry = ta.merge_table(old, table)["decode"][key]
        if batches == (1,):
            # (a knob the checked-in entry predates, e.g. fp8_dot, written at its default; the knobs the tuner does
            # not sweep, e.g. early_inputs, kept from the checked-in small-batch config)
            kept = {k: v for k, v in old["decode"][key]["small_batch_config"].items() if k in ap.UNSWEPT_DECODE_KEYS}
            assert entry == {**acfg.DECODE_KNOB_DEFAULTS, **old["decode"][key], "small_batch": ta.SMALL_BATCH,
                             "small_batch_config": {**b, **kept}}
        else:
            assert entry == {**a, "small_batch": ta.SMALL_BATCH, "small_batch_config": old["decode"][key][
                "small_batch_config"]}
        acfg.check_config(entry, acfg.DECODE_KEYS, ta.HEAD_DIM)
    assert ta.merge_table({}, table)["decode"][key] == a  # nothing checked in: the pick as it is


def test_tuner_table_merge_keeps_the_unswept_decode_knobs():
    # fused_merge_max_splits and early_inputs are set by hand (bench_attention's merge rows, A/Bs of engine steps),
    # never swept: a re-tune of either batch class, or of both, keeps each class's value
    import tune_attention as ta

    a, b = ta.decode_cfg((64, 4, 3), (2, 64)), ta.decode_cfg((32, 4, 2), (8, 64, {"max_splits": 256}))
    key = f"d{ta.HEAD_DIM}_fp8"
    old = {"decode": {key: {**a, "fused_merge_max_splits": 4, "small_batch": ta.SMALL_BATCH,
                            "small_batch_config": {**b, "fused_merge_max_splits": 64, "early_inputs": 1}}}}
    for batches, small in (((1,), b), ((16, 64), b), ((1, 16, 64), b), ((1, 16, 64), a)):  # (a, a: one pick)
        rows = [{"kind": "decode", "case": f"B={n}", "batch": n, "kv": "fp8", "cfg": a if n > 1 else small,
                 "frac": 0.5} for n in batches]
        entry = ta.merge_table(old, ta.pick_small_batch(rows, ta.pick(rows)))["decode"][key]
        assert entry["fused_merge_max_splits"] == 4 and entry["small_batch_config"]["fused_merge_max_splits"] == 64
        assert entry.get("early_inputs", 0) == 0 and entry["small_batch_config"]["early_inputs"] == 1
        acfg.check_config(entry, acfg.DECODE_KEYS, ta.HEAD_DIM)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", [torch.bfloat16, FP8])
def test_swept_configs_gpu(kv):
    # tiles of each pipelining depth, compiled for this GPU (the interpreter does not pipeline), at Qwen3-30B-A3B
    # heads: decode and an extend over a cached prefix vs the fp32 torch reference (the tuner checks the rest)
    import tune_attention as ta

    torch.manual_seed(5)
    seq_lens = [3000, 1, 700, 0]
    scales = (1.0, 0.5) if kv == FP8 else (1.0, 1.0)
    k, v, tables = _make_cache(seq_lens, 16, 4, 128, torch.bfloat16, "cuda")
    k, v = k.to(kv), v.to(kv)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(seq_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    ref = paged_attention_decode_ref(q, k, v, lens, tables, 128**-0.5, *scales)
    for tile in [(64, 4, 2), (64, 4, 3), (128, 8, 3)]:
        for rule in ta.SPLIT_RULES[:3]:
            out = paged_attention_decode(q, k, v, lens, tables, 128**-0.5, *scales, config=ta.decode_cfg(tile, rule))
            assert _rel_err(out, ref) < 1e-2, (tile, rule)
    q_ext = torch.randn(600, 32, 128, device="cuda", dtype=torch.bfloat16)
    args = (q_ext, k, v, torch.tensor([0, 600], dtype=torch.int32, device="cuda"), lens[:1], tables[:1], 128**-0.5,
            600, *scales)
    ref = paged_attention_prefill_ref(*args)
    for tile in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 2)]:
        try:
            out = paged_attention_prefill(*args, config=ta.prefill_cfg(tile))
        except Exception as exc:  # noqa: BLE001  a tile beyond this GPU's shared memory: the tuner skips it too
            assert "OutOfResources" in type(exc).__name__ or "shared memory" in str(exc), exc
            continue
        assert _rel_err(out, ref) < 1e-2, tile


def test_decode_case_rotates_disjoint_pages(monkeypatch):
    # the tuner's decode timing: one graph call per block table, each over its own pages of one pool
    import attention_cases as ac

    monkeypatch.setattr(ac, "DEVICE", "cpu")
    monkeypatch.setattr(ac, "DT", torch.float16)
    monkeypatch.setattr(ac, "HEAD_DIM", 32)
    case = ac.DecodeCase(2, 40, "bf16", 4, 2)
    case.build()
    tables = case.t["all_tables"]  # [rotations, batch, blocks]
    assert tables.shape[:2] == (case.rotations, 2) and case.rotations == 2
    assert not set(tables[0].flatten().tolist()) & set(tables[1].flatten().tolist())
    assert len(case.sdpa) == case.rotations
