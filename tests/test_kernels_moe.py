"""Fused MoE, its align step and its config lookup vs the torch references."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.count_launches import count_launches  # noqa: E402
from kernels.fp8 import quantize_weight_block  # noqa: E402
from kernels.fused_moe import fused_experts, fused_experts_ref  # noqa: E402
from kernels.moe_align import (  # noqa: E402
    ONE_PROGRAM_PAIRS,
    SORT_MAX_CHUNK,
    align_plan,
    align_token_ranges,
    max_blocks,
    moe_align,
    moe_align_ref,
)
from kernels.moe_config import config_edges, default_config, get_moe_config  # noqa: E402
from kernels.moe_plan import experts_variant, warmup_token_counts  # noqa: E402


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _routing(num_tokens: int, num_experts: int, top_k: int, device="cpu", drop_every: int = 3):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(torch.int32)
    if drop_every:
        ids[::drop_every, 0] = -1  # expert parallel: slots owned by another rank
    weights = torch.rand(num_tokens, top_k) + 0.1
    return weights.to(device), ids.to(device)


def _check_align(ids: torch.Tensor, num_experts: int, block_m: int, rank: str | None = None) -> None:
    sorted_ids, expert_ids, num_post_pad = moe_align(ids, num_experts, block_m, rank=rank)
    ref_sorted, ref_experts, ref_num = moe_align_ref(ids, num_experts, block_m)
    n = int(num_post_pad.item())
    assert n == int(ref_num.item()) and torch.equal(expert_ids, ref_experts)
    assert sorted_ids.numel() == max_blocks(ids.numel(), num_experts, block_m) * block_m
    # the order inside one expert's segment is free: compare (expert, pair) keys as sets
    def keys(s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return (e.long().repeat_interleave(block_m)[:n] * (ids.numel() + 1) + s[:n].long()).sort()[0]

    assert torch.equal(keys(sorted_ids, expert_ids), keys(ref_sorted, ref_experts))
    assert (sorted_ids[n:] == ids.numel()).all()


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [
    (1, 128, 8, 16), (7, 8, 2, 16), (13, 60, 4, 32), (16, 128, 8, 16),  # one program
    (100, 128, 8, 16), (300, 8, 2, 16), (700, 8, 2, 16),  # two launches, 64-pair chunks
    (301, 128, 8, 64), (520, 16, 8, 32),  # two launches, 128- and 256-pair chunks (at most ALIGN_CHUNKS programs)
    (2100, 128, 8, 128),  # the default's sort rank (33 chunks of 512); pairwise: 66 chunks of 256 and the SCAN
    (1100, 160, 8, 64),  # the sort rank from SORT_FROM_PAIRS (35 chunks of 256); pairwise: 69 of 128 and the SCAN
])
def test_moe_align(num_tokens, num_experts, top_k, block_m):
    import kernels.moe_align as align

    torch.manual_seed(num_tokens)
    _, ids = _routing(num_tokens, num_experts, top_k)
    assert (ids.numel() <= ONE_PROGRAM_PAIRS) == (num_tokens <= 16)
    _check_align(ids, num_experts, block_m)
    if ids.numel() >= align.SORT_FROM_PAIRS:  # the default sorts there: the pairwise rank (and its SCAN) too
        assert align_plan(ids.numel(), num_experts, rank="pairwise")[2]
        _check_align(ids, num_experts, block_m, rank="pairwise")


@pytest.mark.parametrize("num_tokens,block_m", [(12, 16), (97, 64)])
def test_moe_align_paths_agree(num_tokens, block_m):
    # one program, two launches, any chunk size, counts summed once or per program: the same bits (each keeps the
    # flat order within an expert)
    torch.manual_seed(num_tokens)
    _, ids = _routing(num_tokens, 128, 8, drop_every=3)
    outs = [moe_align(ids, 128, block_m), moe_align(ids, 128, block_m, one_program_pairs=0)]
    outs += [moe_align(ids, 128, block_m, one_program_pairs=0, chunk=c, scan_chunks=s)
             for c in (32, 128, 256) for s in (0, 1 << 20)]  # each chunk size with and without the SCAN
    assert all(torch.equal(a, b) for out in outs[1:] for a, b in zip(outs[0], out))
    _check_align(ids, 128, block_m)
    with pytest.raises(ValueError, match="power of two"):
        moe_align(ids, 128, block_m, chunk=48)


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m,dtype,kw", [
    (13, 8, 128, 16, torch.int32, {"one_program_pairs": ONE_PROGRAM_PAIRS}),  # one program, the default cap
    (99, 7, 160, 16, torch.int64, {"one_program_pairs": 1024}),  # one program of 693 pairs (N_PAD 1024)
    (150, 7, 160, 16, torch.int32, {"chunk": 512}),  # 3 chunks of 512, every scatter program sums the counts
    (150, 7, 160, 16, torch.int32, {"chunk": 512, "scan_chunks": 0}),  # the same, the count kernel's SCAN
    (171, 6, 128, 64, torch.int64, {"chunk": 1024, "scan_chunks": 0}),  # 2 chunks of 1024 (the 2nd holds 2 pairs)
    (255, 8, 128, 64, torch.int32, {"chunk": 2048, "scan_chunks": 0}),  # 1 chunk of 2048 (8 pairs of padding)
])
def test_moe_align_sort_rank(num_tokens, top_k, num_experts, block_m, dtype, kw):
    # the sort rank's chunks and one program past the pairwise caps: moe_align_ref's bits (flat order within an
    # expert), with EP-dropped pairs (-1) spread at random
    torch.manual_seed(num_tokens)
    _, ids = _routing(num_tokens, num_experts, top_k)
    ids[torch.rand(ids.shape) < 0.1] = -1
    ids = ids.to(dtype)
    kw = {"one_program_pairs": 0, **kw}
    plan = align_plan(ids.numel(), num_experts, kw["one_program_pairs"], kw.get("chunk"), kw.get("scan_chunks"), "sort")
    assert plan[1:] == (kw.get("chunk", 0), "scan_chunks" in kw, True)  # the chunk asked for, uncapped
    out, ref = moe_align(ids, num_experts, block_m, rank="sort", **kw), moe_align_ref(ids, num_experts, block_m)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_align_plan_sort_rank(monkeypatch):
    import kernels.moe_align as align

    # the sort rank's chunk rule: 256 pairs below 16384 pairs, 512 (SORT_CHUNK) from there, the count kernel's SCAN
    # beyond SCAN_CHUNKS chunks; any expert count (pairwise at 8192 tokens x top-8: 256 chunks of 256 at 128
    # experts, 512 of 128 at 160, SCAN)
    for num_experts in (128, 160):
        assert align_plan(8192, num_experts, rank="sort") == (0, 256, False, True)
        assert align_plan(16383, num_experts, rank="sort") == (0, 256, True, True)  # 64 chunks: SCAN
        assert align_plan(16384, num_experts, rank="sort") == (0, 512, False, True)
        assert align_plan(32768, num_experts, rank="sort") == (0, 512, True, True)  # 64 chunks: SCAN
        assert align_plan(16384 + 512, num_experts, rank="sort") == (0, 512, True, True)  # 33
        assert align_plan(8192 + 256, num_experts, rank="sort") == (0, 256, True, True)
        assert align_plan(8192 * 8, num_experts, rank="sort") == (0, 512, True, True)
        pairwise_chunk = {128: 256, 160: 128}[num_experts]
        assert align_plan(8192 * 8, num_experts, rank="pairwise")[1:] == (pairwise_chunk, True, False)
    assert align_plan(64 * 1024, 128, chunk=8192, rank="sort") == (0, SORT_MAX_CHUNK, False, True)
    assert align_plan(100, 128, rank="sort") == (128, 0, False, True)
    assert align_plan(1000, 128, 1024, rank="sort") == (1024, 0, False, True)
    assert align_plan(1000, 128, 1024, rank="pairwise") == (0, 64, False, False)  # one program <= SMALL_PAIRS
    with pytest.raises(ValueError, match="rank"):
        align_plan(1000, 128, rank="bitonic")
    # the default ("auto"): pairwise below SORT_FROM_PAIRS pairs, sort from there, as measured (H200, session 17)
    assert align.ALIGN_RANK == "auto"
    assert align_plan(100, 128) == (128, 0, False, False) and align_plan(1000, 128) == (0, 64, False, False)
    assert align_plan(align.SORT_FROM_PAIRS - 1, 128)[3] is False
    assert align_plan(align.SORT_FROM_PAIRS, 128) == align_plan(align.SORT_FROM_PAIRS, 128, rank="sort")
    assert align_plan(8192 * 8, 160) == (0, 512, True, True)
    # the sort rank everywhere: the warmup still compiles every variant a step can hit
    monkeypatch.setattr(align, "ALIGN_RANK", "sort")
    _check_warmup_covers_align(128, 8, 8192, lambda m: default_config(m, 128, 8, False))
    assert align_plan(100, 128) == (128, 0, False, True)


def test_bench_align_smoke(tmp_path, monkeypatch):
    # benchmarks/bench_align.py on the interpreter: one program at 64 pairs, two launches at 320, each exact
    from benchmarks import bench_align

    out = tmp_path / "align.json"
    monkeypatch.setattr("sys.argv", ["bench_align.py", "--device", "cpu", "--m", "8,40", "--out", str(out)])
    bench_align.main()
    rows = json.loads(out.read_text())
    assert [r["default"] for r in rows] == ["one_program", "two_launches"]
    assert rows[0]["one_program_exact"] and all(r["two_launches_exact"] for r in rows)
    # the sort rank's columns: its one program, its chunk rule, a chunk given (64 pairs: one chunk)
    argv = ["bench_align.py", "--device", "cpu", "--m", "8", "--sort-chunks", "64", "--sort-one-program", "64"]
    monkeypatch.setattr("sys.argv", argv + ["--out", str(out)])
    bench_align.main()
    row = json.loads(out.read_text())[0]
    assert all(row[f"{name}_exact"] for name in ("sort_one_program", "sort", "sort_c64")), row


@pytest.mark.parametrize("kw", [{}, {"one_program_pairs": 0}, {"one_program_pairs": 0, "scan_chunks": 0}])
def test_moe_align_int64_ids(kw):
    # int64 topk_ids (fused_experts takes them): each path as with int32, to the bit
    _, ids = _routing(20, 300, 4)  # 300 experts: E_PAD 512, 64-pair chunks
    out32, out64 = moe_align(ids, 300, 32, **kw), moe_align(ids.long(), 300, 32, **kw)
    assert all(torch.equal(a, b) for a, b in zip(out32, out64))
    _check_align(ids.long(), 300, 32)


def test_moe_align_counter_first_call(monkeypatch):
    # the SCAN counter comes with the first call on a device, whatever its size (an eager run, before any CUDA
    # graph capture); a capture holding the first call runs without it, and a SCAN call there is an error
    import kernels.moe_align as align

    _, ids = _routing(2, 16, 2)
    monkeypatch.setattr(align, "_COUNTERS", {})
    monkeypatch.setattr(align, "_capturing", lambda device: True)
    _check_align(ids, 16, 16)  # one program: no counter needed
    with pytest.raises(RuntimeError, match="eagerly once"):
        moe_align(ids, 16, 16, one_program_pairs=0, scan_chunks=0)
    assert align._COUNTERS == {}
    monkeypatch.setattr(align, "_capturing", lambda device: False)
    moe_align(ids, 16, 16)  # the first eager call, one program
    assert align._COUNTERS[ids.device].tolist() == [0]
    outs = [moe_align(ids, 16, 16), moe_align(ids, 16, 16, one_program_pairs=0, chunk=32, scan_chunks=0)]
    assert all(torch.equal(a, b) for a, b in zip(*outs)) and align._COUNTERS[ids.device].tolist() == [0]  # re-armed


def _align_variants(counts, num_experts: int, top_k: int, config_for) -> set:
    # what each token count compiles, as fused_experts picks its path (kernels/moe_plan.experts_variant)
    return {experts_variant(config_for(m), m, top_k, num_experts) for m in counts}


def _check_warmup_covers_align(num_experts: int, top_k: int, max_tokens: int, config_for, edges=()) -> None:
    # the start-up warmup's token counts (with the config's edges, as the engine passes them) compile every MoE
    # variant (the path, its GEMM tiles, the align's constexprs and BLOCK_M) that a step of up to max_tokens tokens
    # runs: none compiles on the serving path
    need = _align_variants(range(1, max_tokens + 1), num_experts, top_k, config_for)
    have = _align_variants(warmup_token_counts(max_tokens, top_k, edges), num_experts, top_k, config_for)
    assert need - have == set()
    # the ranges align_token_ranges gives are those of the plan, token by token
    plans = [align_plan(m * top_k, num_experts) for m in range(1, max_tokens + 1)]
    ranges = align_token_ranges(max_tokens, top_k, num_experts)
    assert [m for r in ranges for m in range(r[0], r[1] + 1)] == list(range(1, max_tokens + 1))
    assert all(len({plans[m - 1] for m in range(a, b + 1)}) == 1 for a, b in ranges)
    assert all(plans[a - 1] != plans[b - 1] for (_, a), (b, _) in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("num_experts,top_k,max_tokens", [
    (60, 4, 8192), (64, 6, 5000), (128, 8, 8192), (256, 8, 8192), (512, 10, 8192), (8, 2, 700), (3000, 8, 4000),
])
def test_warmup_token_counts_cover_align_default(num_experts, top_k, max_tokens):
    config_for = lambda m: default_config(m, num_experts, top_k, False)  # noqa: E731
    _check_warmup_covers_align(num_experts, top_k, max_tokens, config_for)  # its ranges hold powers of two
    edges = config_edges(num_experts, 1, 1, top_k, "bfloat16")  # no table of that shape: default_config's
    _check_warmup_covers_align(num_experts, top_k, max_tokens, config_for, edges)
    _check_edges(config_for, edges, top_k, max_tokens)


def _check_edges(config_for, edges, top_k: int, max_tokens: int) -> None:
    # every count past 1 whose config or path differs from the count before's is an edge
    from kernels.moe_plan import experts_path

    def at(m):
        cfg = config_for(m)
        return json.dumps(cfg, sort_keys=True), experts_path(cfg, m, top_k)

    changes = {m for m in range(2, max_tokens + 1) if at(m) != at(m - 1)}
    assert changes - set(edges) == set()


def test_warmup_edges_cover_a_cut_bucket(monkeypatch):
    # a bucket range that a tma entry cuts short holds no power of two (an EP table of session 18: bucket 8192's
    # aligned rows 4097..8191, the tma path from 8192): the powers of two alone miss its variants, the edges do not
    import kernels.moe_config as mc

    table = {2048: default_config(100, 16, 8, False), 8192: default_config(8192, 16, 8, False)}  # BLOCK_M 64, 128
    table[8192]["tma"] = {"min_rows": 8192 * 8, "BLOCK_M": 128, "up": {}, "down": {}}
    monkeypatch.setattr(mc, "_table", lambda *a: (table, False))
    config_for = lambda m: mc.get_moe_config(m, 16, 2048, 768, 8, "bfloat16")  # noqa: E731
    edges = mc.config_edges(16, 2048, 768, 8, "bfloat16")
    assert edges == [4097, 8192]
    with pytest.raises(AssertionError):
        _check_warmup_covers_align(16, 8, 12000, config_for)
    _check_warmup_covers_align(16, 8, 12000, config_for, edges)
    _check_edges(config_for, edges, 8, 12000)


def test_warmup_check_sees_the_permuted_path():
    # a "tma" entry that only token counts between two warmup counts reach (1025 and 2048 here) compiles on the
    # serving path: the check above must say so (it once keyed variants by the bucket's BLOCK_M alone)
    from kernels.moe_gluon import default_gluon_config

    assert not set(range(1100, 1201)) & set(warmup_token_counts(8192, 8))

    def config_for(m):
        cfg = default_config(m, 128, 8, False)
        return dict(cfg, tma=default_gluon_config(0, 64)) if 1100 <= m <= 1200 else cfg

    with pytest.raises(AssertionError):
        _check_warmup_covers_align(128, 8, 8192, config_for)


def _moe_tables() -> list[str]:
    from kernels.moe_config import CONFIG_DIR

    return sorted(p.name for p in CONFIG_DIR.glob("moe_E*.json"))


@pytest.mark.parametrize("table", _moe_tables())
def test_warmup_token_counts_cover_align_tables(monkeypatch, table):
    # each checked-in table through get_moe_config (nearest bucket, GEMV entries), on its GPU, with its model's top-k
    # (Mixtral's 8 experts top-2; the 128-expert tables Qwen3-30B-A3B's and GLM-4.5-Air's top-8)
    import re

    match = re.fullmatch(r"moe_E(\d+)_H(\d+)_I(\d+)_([a-z0-9]+)_(.+)\.json", table)
    assert match, table
    num_experts, hidden, inter = map(int, match.groups()[:3])
    dtype, gpu = match.group(4), match.group(5)
    top_k = 2 if num_experts == 8 else 8
    monkeypatch.setattr("kernels.moe_config.device_name", lambda device=None: gpu)
    config_for = lambda m: get_moe_config(m, num_experts, hidden, inter, top_k, dtype)  # noqa: E731
    edges = config_edges(num_experts, hidden, inter, top_k, dtype)
    for max_tokens in (8192, 3000):
        _check_warmup_covers_align(num_experts, top_k, max_tokens, config_for, edges)
    _check_edges(config_for, edges, top_k, 16384)


def test_moe_align_all_skipped():
    ids = torch.full((5, 2), -1, dtype=torch.int32)
    sorted_ids, expert_ids, num_post_pad = moe_align(ids, 8, 16)
    assert num_post_pad.item() == 0 and (expert_ids == -1).all() and (sorted_ids == 10).all()


@pytest.mark.parametrize("num_tokens,num_experts,hidden,inter,top_k,dtype", [
    (5, 8, 96, 80, 2, torch.float32),  # K not a multiple of BLOCK_K
    (37, 6, 128, 64, 3, torch.float16),
    (1, 16, 64, 32, 4, torch.float32),
])
def test_fused_experts(num_tokens, num_experts, hidden, inter, top_k, dtype):
    torch.manual_seed(num_tokens + hidden)
    x = torch.randn(num_tokens, hidden).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter) / inter**0.5).to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, drop_every=2)  # one token: the no-align path
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    out = fused_experts(x, w13, w2, weights, ids)
    assert _rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    cfg = default_config(200, num_experts, top_k, False)  # another BLOCK_M, same answer
    assert _rel_err(fused_experts(x, w13, w2, weights, ids, config=cfg), ref) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_sum_one_token(dtype):
    # config "fused_sum": the down GEMM's last slot per column tile does the top-k sum; the same numbers as
    # the separate sum kernel, counters re-armed after each launch, zeros for a token with no slot handled here
    import kernels.moe_sum as fm

    torch.manual_seed(11)
    num_experts, hidden, inter, top_k = 8, 96, 64, 4
    x = torch.randn(1, hidden).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter) / inter**0.5).to(dtype)
    cfg = default_config(1, num_experts, top_k, False)
    fused = dict(cfg, fused_sum=True, down=dict(cfg["down"], BLOCK_N=32))  # 3 column tiles
    weights = torch.rand(1, top_k) + 0.1
    for ids in ([[3, 0, 6, 1]], [[-1, 5, -1, 2]], [[-1, -1, -1, -1]], [[7, 4, 2, 5]]):
        ids = torch.tensor(ids, dtype=torch.int32)
        with count_launches() as log:
            got = fused_experts(x, w13, w2, weights, ids, config=fused)
        want = fused_experts(x, w13, w2, weights, ids, config=dict(cfg, down=fused["down"]))
        assert torch.equal(got, want), (ids, got, want)
        assert _rel_err(got, fused_experts_ref(x, w13, w2, weights, ids)) < 2e-3 or not (ids >= 0).any()
        assert "triton:_moe_sum_kernel" not in log.events and log.events.count("triton:_moe_down_kernel") == 1
        assert fm._COUNTERS[x.device].eq(0).all()
    assert not got.eq(0).all()


def _blocky(shape, block=128):
    # per-[128,128]-block magnitudes spread over 2^-3..2^3: a wrong scale index then shows as a large error
    w = torch.randn(shape)
    nb, kb = -(-shape[-2] // block), -(-shape[-1] // block)
    mag = 2.0 ** torch.randint(-3, 4, (*shape[:-2], nb, kb)).float()
    return w * mag.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., : shape[-2], : shape[-1]]


@pytest.mark.parametrize("act_fp8", [True, False])
def test_fused_experts_fp8(monkeypatch, act_fp8):
    import kernels.fused_moe as fm
    from kernels.fp8 import per_token_group_quant_ref

    # the interpreter rounds fp32 -> e4m3 casts wrongly for ~2% of values (test_kernels_fp8 covers the
    # quant kernel with a tolerance); with torch's quantization the GEMMs must match the reference tightly
    monkeypatch.setattr(fm, "per_token_group_quant", per_token_group_quant_ref)
    torch.manual_seed(3)
    num_tokens, num_experts, hidden, inter, top_k = 9, 4, 256, 192, 2
    x = _blocky((num_tokens, hidden))
    w13, s13 = quantize_weight_block(_blocky((num_experts, 2 * inter, hidden)) / 16)
    w2, s2 = quantize_weight_block(_blocky((num_experts, hidden, inter)) / 16)
    weights, ids = _routing(num_tokens, num_experts, top_k)
    ref = fused_experts_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, act_fp8=act_fp8)
    cfg = dict(default_config(num_tokens, num_experts, top_k, True), act_fp8=act_fp8)
    out = fused_experts(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, config=cfg)
    assert _rel_err(out, ref) < 1e-4


def test_config_lookup(tmp_path, monkeypatch):
    import kernels.moe_config as mc

    monkeypatch.setattr(mc, "CONFIG_DIR", tmp_path)
    name = mc.config_file_name(8, 64, 32, "float32", mc.device_name())
    cfg = {"BLOCK_M": 32, "up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}}
    cfg["down"] = cfg["up"]
    (tmp_path / name).write_text(json.dumps({"1": cfg, "1024": {"BLOCK_M": 64}}))
    assert get_moe_config(2, 8, 64, 32, 2, "float32")["BLOCK_M"] == 32
    assert get_moe_config(900, 8, 64, 32, 2, "float32")["BLOCK_M"] == 64
    assert get_moe_config(2, 8, 64, 48, 2, "float32") == default_config(2, 8, 2, False)


def _with_act_fp8(cfg: dict, act_fp8: bool) -> dict:
    # a table entry with act_fp8 forced; forced true, the weight-only parts go: the GEMV (<= its max_tokens) and the
    # GEMMs' "w8_mma" (kernels/moe_w8.py refuses a 16-bit-activation MMA mode with act_fp8 true)
    cfg = dict(cfg, act_fp8=act_fp8)
    if act_fp8:
        cfg.pop("gemv", None)
        cfg.update({g: {k: v for k, v in cfg[g].items() if k != "w8_mma"} for g in ("up", "down")})
    return cfg


def test_forced_act_fp8_keeps_every_table_entry_valid():
    # test_fused_experts_gpu forces act_fp8 both ways on each checked-in table's entries: each forced entry must pass
    # the kernels' config checks (the H200 FP8 table's bucket 64 has "w8_mma": "f16_cast", an error with act_fp8 true)
    from kernels.moe_config import CONFIG_DIR
    from kernels.moe_w8 import w8_mma_meta

    tables = sorted(CONFIG_DIR.glob("moe_*_fp8_*.json"))
    assert tables
    for path in tables:
        for bucket, entry in json.loads(path.read_text()).items():
            for act_fp8 in (False, True):
                cfg = _with_act_fp8(entry, act_fp8)
                assert act_fp8 or cfg == dict(entry, act_fp8=False), (path.name, bucket)
                assert not (act_fp8 and "gemv" in cfg), (path.name, bucket)
                for g in ("up", "down"):
                    w8_mma_meta(cfg[g], True, act_fp8, torch.device("cpu"))


# ------------------------------------------------------------------------------------------- GPU

GPU_SHAPES = {"qwen3": (128, 2048, 768, 8), "mixtral": (8, 4096, 14336, 2), "glm45air": (128, 4096, 1408, 8)}


@pytest.mark.gpu
def test_moe_align_scan_graph_gpu():
    # the SCAN path (the count kernel's last program, an arrival counter that re-arms itself) replayed from a CUDA
    # graph holding two SCAN aligns of other chunk counts, new routings each replay, an eager SCAN align of a third
    # count between replays (with PDL where the GPU has it): each the reference's bits, the counter back at 0
    import kernels.moe_align as align

    def exact(out, ids, block_m):
        ref = moe_align_ref(ids, 128, block_m)
        n = int(ref[2].item())
        return (int(out[2].item()) == n and torch.equal(out[1], ref[1]) and torch.equal(out[0][:n], ref[0][:n])
                and bool((out[0][n:] == ids.numel()).all()))

    ids1, ids2 = _routing(4096, 128, 8, "cuda", drop_every=7)[1], _routing(3000, 128, 8, "cuda", drop_every=0)[1]
    ids3 = _routing(8192, 128, 8, "cuda", drop_every=5)[1]
    # pairwise: 128 chunks of 256 and 375 of 64; the default at 8192 tokens, the sort rank: 128 chunks of 512
    runs = [lambda: moe_align(ids1, 128, 128, rank="pairwise"),
            lambda: moe_align(ids2, 128, 16, chunk=64, rank="pairwise"), lambda: moe_align(ids3, 128, 128)]
    plans = [align.align_plan(i.numel(), 128, chunk=c, rank=r) for i, c, r in
             ((ids1, None, "pairwise"), (ids2, 64, "pairwise"), (ids3, None, None))]
    assert all(p[2] for p in plans) and [p[3] for p in plans] == [False, False, True]
    for run in runs:
        run()  # compile; the counter exists
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [run() for run in runs]
    for i in range(20):
        ids1.copy_(_routing(4096, 128, 8, "cuda", drop_every=i % 5)[1])
        ids2.copy_(_routing(3000, 128, 8, "cuda", drop_every=3)[1])
        ids3.copy_(_routing(8192, 128, 8, "cuda", drop_every=i % 3)[1])
        graph.replay()
        eager_ids = _routing(2100 + i, 128, 8, "cuda", drop_every=2)[1]
        eager = moe_align(eager_ids, 128, 64, rank="pairwise")  # 66 chunks of 256
        assert exact(outs[0], ids1, 128) and exact(outs[1], ids2, 16) and exact(outs[2], ids3, 128), i
        assert exact(eager, eager_ids, 64), i
    torch.cuda.synchronize()
    assert align._COUNTERS[ids1.device].tolist() == [0]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen3", "glm45air"])
@pytest.mark.parametrize("num_tokens", [1, 64, 777])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("act_fp8", [False, True])
def test_fused_experts_gpu(shape, num_tokens, fp8, act_fp8):
    if act_fp8 and not fp8:
        pytest.skip("act_fp8 is an FP8-only switch")
    torch.manual_seed(num_tokens)
    num_experts, hidden, inter, top_k = GPU_SHAPES[shape]
    dt = torch.bfloat16
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dt)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden**0.5).to(dt)
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5).to(dt)
    weights, ids = _routing(num_tokens, num_experts, top_k, "cuda", drop_every=5)
    kw = {}
    if fp8:
        w13, s13 = quantize_weight_block(w13)
        w2, s2 = quantize_weight_block(w2)
        kw = {"w13_scale": s13, "w2_scale": s2}
    cfg = _with_act_fp8(get_moe_config(num_tokens, num_experts, hidden, inter, top_k, "fp8" if fp8 else "bfloat16"),
                        act_fp8)
    ref = fused_experts_ref(x, w13, w2, weights, ids, **kw, **({"act_fp8": act_fp8} if fp8 else {}))
    out = fused_experts(x, w13, w2, weights, ids, config=cfg, **kw)
    # fp8: a bf16 rounding difference before the activation quant can flip an e4m3 step (1/16)
    assert _rel_err(out, ref) < (4e-2 if fp8 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 256, 1024, 4096, 8192])
def test_moe_align_gpu(num_tokens):
    _, ids = _routing(num_tokens, 128, 8, "cuda", drop_every=7)
    for block_m in (16, 64, 128):
        _check_align(ids, 128, block_m)  # from 1024 tokens (8192 pairs) the default sorts
        _check_align(ids, 128, block_m, rank="pairwise")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen3", "glm45air"])
@pytest.mark.parametrize("fp8", [False, True])
def test_fused_sum_gpu(shape, fp8):
    # the cross-program top-k sum (atomic counter, .cg loads) gives the separate sum kernel's bits, also when
    # replayed from a CUDA graph with new routings (the counters must re-arm themselves)
    num_experts, hidden, inter, top_k = GPU_SHAPES[shape]
    dt = torch.bfloat16
    torch.manual_seed(5)
    x = torch.randn(1, hidden, device="cuda", dtype=dt)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden**0.5).to(dt)
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5).to(dt)
    kw = {}
    if fp8:
        w13, s13 = quantize_weight_block(w13)
        w2, s2 = quantize_weight_block(w2)
        kw = {"w13_scale": s13, "w2_scale": s2}
    cfg = get_moe_config(1, num_experts, hidden, inter, top_k, "fp8" if fp8 else "bfloat16")
    fused = dict(cfg, fused_sum=True)
    weights, ids = _routing(1, num_experts, top_k, "cuda", drop_every=0)
    out = fused_experts(x, w13, w2, weights, ids, config=fused, **kw)  # warm: compile, counters allocated
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids, config=fused, **kw)
    for i in range(50):
        new_w, new_ids = _routing(1, num_experts, top_k, "cuda", drop_every=0)
        new_ids[0, : i % (top_k + 1)] = -1  # 0..top_k slots handled elsewhere (all of them: a zero sum)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        want = fused_experts(x, w13, w2, weights, ids, config=cfg, **kw)
        assert torch.equal(out, want), i
