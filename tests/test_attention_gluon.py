"""The Gluon FA3-style prefill (kernels/attention/prefill_gluon.py): compiled for sm90 on the CPU (Gluon has no
interpreter), its config key and the shapes it takes; on an H100/H200 its outputs vs the torch reference and the
Triton kernel (odd lengths, several sequences, a cached prefix, GQA 1, 8 and 12, pages of 16..256 tokens, head_dim 64
and 128), each launch under a hang guard (_gluon_or_exit: a spinning kernel ends the process, naming its variant)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.sm90 import run_sm90_probe

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.attention.config import check_config, default_prefill_config  # noqa: E402
from kernels.attention.prefill import (  # noqa: E402
    paged_attention_prefill,
    paged_attention_prefill_ref,
)
from kernels.attention.prefill_gluon import (  # noqa: E402
    GLUON_DEFAULTS,
    SHARED_LIMIT,
    gluon_config,
    gluon_fits,
    gluon_supported,
    paged_attention_prefill_gluon,
    shared_bytes,
)
from kernels.moe_config import CONFIG_DIR  # noqa: E402

# compiled for sm90 in a fresh process; what ptxas made of each case: registers (the cap; setmaxnreg per partition),
# spills, shared memory, the wgmma count and the pendings of every wait on them (PTX and SASS: N > 0 keeps a group in
# flight through the softmax), TMA loads. `pytest -s -k sm90` prints them.
_SM90_PROBE = r"""
import json, re, subprocess, tempfile
from pathlib import Path
import triton
from kernels.attention.prefill_gluon import compile_sm90, gluon_config


def arrives(ptx):
    # per plain mbarrier.arrive (one thread of an MMA partition): [what came last of a wgmma wait ("wait": a stage
    # release) or issue ("issue": a ping-pong turn passed), the thread count of the named barrier passed between
    # it and the arrive (None: none, so a warpgroup of the partition may still read the stage)]
    out, last, synced = [], None, None
    for line in ptx.splitlines():
        if "wgmma.commit_group" in line or "wgmma.wait_group" in line:
            last, synced = ("issue" if "commit" in line else "wait"), None
        elif "mbarrier.try_wait" in line:
            last, synced = None, None
        elif m := re.search(r"\bbar\.sync\s+\d+,\s*(\d+);", line):
            synced = int(m.group(1))
        elif "mbarrier.arrive.shared" in line:
            out.append([last, synced])
    return out


def report(kernel):
    tool = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    ptx = kernel.asm["ptx"]
    return {
        "registers_cap": int(re.search(r"REG:(\d+)", res).group(1)),
        "setmaxnreg": [[op, int(n)] for op, n in re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)],
        "spill_bytes": int(re.search(r"STACK:(\d+)", res).group(1)),
        "local_ops_sass": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "shared_bytes": kernel.metadata.shared,
        "wgmma_ptx": ptx.count("wgmma.mma_async"),
        "hgmma_sass": len(re.findall(r"\bHGMMA\.", sass)),
        "hgmma_register_a_sass": len(re.findall(r"HGMMA\.\S+ R\d+, R\d+, gdesc", sass)),  # P from registers
        "wgmma_wait_pendings_ptx": [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)],
        "wgmma_wait_pendings_sass": [int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x\w+)", sass)],
        "tma_loads_ptx": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global", ptx)),
        "mbarrier_arrives_sass": len(re.findall(r"SYNCS\.ARRIVE", sass)),
        "mbarrier_init_counts": sorted(int(n) for n in re.findall(r"mbarrier\.init\S*\s+\[[^]]+\],\s*(\d+);", ptx)),
        "expect_tx_bytes": [int(n) for n in re.findall(r"arrive\.expect_tx\S*\s+_,\s*\[[^]]+\],\s*(\d+)", ptx)],
        "arrives_ptx": arrives(ptx),
    }


cases = [("32/4", {"BLOCK_N": 128, "num_stages": 2}, "bf16"), ("96/8", {"BLOCK_N": 64, "num_stages": 3}, "bf16"),
         ("32/4", {"num_stages": 3, "split_wg": 1}, "bf16"), ("96/8", {"num_stages": 3, "split_wg": 2}, "bf16"),
         ("32/4", {"num_stages": 3, "split_wg": 1}, "fp16")]
print(json.dumps([dict(heads=h, dtype=dt, **g, **report(compile_sm90(gluon_config({"gluon": g}), h, dtype=dt)))
                  for h, g, dt in cases]))
"""


def test_gluon_prefill_compiles_for_sm90_pipelined():
    # Qwen3-30B-A3B (32 q / 4 KV heads) at the default tiles and GLM-4.5-Air (96 / 8) at BLOCK_N 64 with a third
    # stage, head_dim 128, 16-token pages: no spills, shared memory under the limit (and as the host estimates it),
    # S = QK^T and O += PV as wgmma with P from registers, the main loop's wait leaving one group (the previous tile's
    # PV) in flight through the softmax, in the PTX and after ptxas; one TMA message per page box and 64 columns;
    # the load warp's registers moved to the MMA warpgroups. split_wg: the same per warpgroup partition (each its
    # own wgmmas and waits: twice the instructions of one 128-row partition); 2 (ping-pong) adds the turn barriers.
    # Last, the H200 table's tiles in fp16: what an FP8 cache's widened scratch runs (kernels/attention/fp8_scratch.py)
    tiles = [gluon_config({"gluon": g}) for g in ({"BLOCK_N": 128}, {"BLOCK_N": 64, "num_stages": 3},
                                                  {"num_stages": 3, "split_wg": 1}, {"num_stages": 3, "split_wg": 2},
                                                  {"num_stages": 3, "split_wg": 1})]
    for g, r in zip(tiles, run_sm90_probe(_SM90_PROBE)):
        print(json.dumps(r))
        parts = 2 if g["split_wg"] else 1
        assert r["spill_bytes"] == 0 and r["local_ops_sass"] == 0, r
        assert r["shared_bytes"] <= SHARED_LIMIT and abs(r["shared_bytes"] - shared_bytes(g, 128)) < 1024, r
        qk, pv = 128 // 16, g["BLOCK_N"] // 16  # wgmma K steps of one QK^T / one PV
        assert r["wgmma_ptx"] == r["hgmma_sass"] == parts * 2 * (qk + pv), r  # tile 0 + loop; loop + last PV
        assert r["hgmma_register_a_sass"] == parts * 2 * pv, r
        assert sorted(r["wgmma_wait_pendings_ptx"]) == sorted(parts * [0, 0, 0, 1]), r
        assert sorted(r["wgmma_wait_pendings_sass"]) == sorted(parts * [0, 0, 0, 1]), r  # ptxas kept the overlap
        assert r["tma_loads_ptx"] == 2 * (g["BLOCK_N"] // 16) * 2, r  # K and V, boxes a tile, 2 x 64 columns a box
        assert ["inc", 240] in r["setmaxnreg"] and ["dec", 24] in r["setmaxnreg"], r  # (JSON lists)
        assert r["registers_cap"] * 32 * 12 <= 65536, r  # 12 warps: two MMA warpgroups, the load warp's
        # arrives: the loader's 2 expects; per MMA partition 4 stage releases (tile 0, the loop's 2, the last PV),
        # and under ping-pong 3 turns passed
        assert r["mbarrier_arrives_sass"] == 2 + parts * (4 + (3 if g["split_wg"] == 2 else 0)), r
        # the barrier protocol as compiled: ready barriers count 1 (the load warp's expect) and expect a K or V tile's
        # bytes (its boxes, zero-filled ones past the cache's end included); the empty barriers one arrive per MMA
        # partition; each stage release after a wgmma wait and a named barrier of the whole partition (both
        # warpgroups done reading the stage), each ping-pong turn passed after the partition's issue
        stages, threads = g["num_stages"], 128 if g["split_wg"] else 256
        assert r["mbarrier_init_counts"] == sorted([1] * (2 * stages + 2) + [parts] * (2 * stages)), r
        assert r["expect_tx_bytes"] == [g["BLOCK_N"] * 128 * 2] * 2, r
        turns = 3 if g["split_wg"] == 2 else 0
        want = parts * (4 * [("wait", threads)] + turns * [("issue", threads)])
        assert sorted(map(tuple, r["arrives_ptx"])) == sorted(want), r


@pytest.mark.parametrize("g,match", [
    ("yes", "must be 0, 1 or a dict"),
    ({"tile": 3}, "unknown keys"),
    ({"BLOCK_N": 96}, "BLOCK_N 96"),
    ({"BLOCK_M": 64}, "BLOCK_M 64"),
    ({"num_stages": 1}, "num_stages 1"),
    ({"load_regs": 20}, "load_regs 20"),
    ({"load_regs": 256}, "load_regs 256"),  # (the MMA warps would be left too few registers: ptxas fails)
    ({"num_stages": 4}, "shared memory"),
    ({"split_wg": 3}, "split_wg 3"),
])
def test_bad_gluon_config_says_which_key(g, match):
    with pytest.raises(ValueError, match=match):
        gluon_config({"gluon": g})
    with pytest.raises(ValueError, match=match):  # a hand-written config is checked before any launch
        check_config({**default_prefill_config(128), "gluon": g}, ("BLOCK_M", "BLOCK_N"), 128)


def test_gluon_is_off_unless_set():
    assert gluon_config(default_prefill_config(128)) is None and gluon_config({"gluon": 0}) is None
    assert gluon_config({"gluon": 1}) == GLUON_DEFAULTS and gluon_config({"gluon": {"num_stages": 3}})["BLOCK_N"] == 128
    for path in Path(CONFIG_DIR).glob("attention_*.json"):  # a table turns it on with tiles it checks and from a
        # measured query length (H200: from 2048 tokens; the Triton kernel was ahead at 1024)
        for c in json.loads(path.read_text()).get("prefill", {}).values():
            assert not c.get("gluon") or gluon_config(c) and c.get("GLUON_MIN_Q", 0) > 0, path
    # BLOCK_N 128 with 3 stages fits only because the output leaves through q's buffer (no layout-change scratch)
    assert shared_bytes(gluon_config({"gluon": {"num_stages": 3}}), 128) <= SHARED_LIMIT
    gluon_config({"gluon": {"num_stages": 4}}, head_dim=256)  # a head_dim it does not run: the Triton kernel, no error


def _inputs(q_lens, seq_lens, heads, kv_heads, block_size, dtype, device, head_dim=128, lead=0, tail=0, seed=0):
    # scattered pages, padding tokens before the first / after the last sequence, a cached prefix where
    # seq_len > q_len; block-table rows padded with page 0
    g = torch.Generator().manual_seed(seed)
    per_seq = [max(1, -(-s // block_size)) for s in seq_lens]
    perm = torch.randperm(sum(per_seq) + 2, generator=g)
    tables = torch.zeros(len(seq_lens), max(per_seq) + 1, dtype=torch.int32)
    pos = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = perm[pos:pos + n]
        pos += n
    shape = (len(perm), block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(2))
    q = torch.randn(lead + sum(q_lens) + tail, heads, head_dim, generator=g).to(dtype).to(device)
    cu = torch.tensor([lead] + (lead + torch.tensor(q_lens).cumsum(0)).tolist(), dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, cu, lens, tables.to(device)


def test_gluon_fits_the_shapes_it_runs():
    q, k_cache, v_cache, cu, lens, tables = _inputs([5], [9], 8, 2, 16, torch.bfloat16, "cpu")
    g = gluon_config({"gluon": 1})

    def fits(q=q, k_cache=k_cache, v_cache=v_cache, lens=lens, k_scale=1.0, tile_map=None, g=g):
        return gluon_fits(q, k_cache, v_cache, cu, lens, tables, g, k_scale, 1.0, tile_map)

    assert fits() and not gluon_supported(q, k_cache, v_cache, cu, lens, tables, g, 1.0, 1.0, None)  # (no GPU)
    assert not fits(q=q.half())  # a cache of another dtype than q
    assert not fits(k_cache=k_cache.to(torch.float8_e4m3fn), v_cache=v_cache.to(torch.float8_e4m3fn))
    assert not fits(k_scale=2.0) and not fits(tile_map=torch.zeros(1, 2, dtype=torch.int32))
    assert not fits(lens=lens.long())
    wide = torch.zeros(k_cache.shape[0], 16, 4, 128, dtype=torch.bfloat16)[:, :, :2]  # kv heads of a wider cache
    assert not fits(k_cache=wide, v_cache=wide)
    small = _inputs([5], [9], 8, 2, 8, torch.bfloat16, "cpu")  # 8-token pages
    assert not gluon_fits(*small, g, 1.0, 1.0, None)
    d32 = _inputs([5], [9], 8, 2, 16, torch.bfloat16, "cpu", head_dim=32)
    assert not gluon_fits(*d32, g, 1.0, 1.0, None)
    assert gluon_fits(*_inputs([5], [9], 8, 2, 64, torch.float16, "cpu", head_dim=64), g, 1.0, 1.0, None)


def test_gluon_key_falls_back_to_triton_where_it_does_not_run():
    # the CPU (and any shape the kernel does not take) runs the Triton kernel, silently, with the same result
    q, k_cache, v_cache, cu, lens, tables = _inputs([5, 0, 20], [5, 3, 33], 4, 2, 16, torch.float16, "cpu",
                                                    head_dim=32, tail=2)
    args = (q, k_cache, v_cache, cu, lens, tables, 32**-0.5, 20)
    cfg = default_prefill_config(32)
    out = paged_attention_prefill(*args, config={**cfg, "gluon": 1})
    assert torch.equal(out, paged_attention_prefill(*args, config=cfg)) and out[-2:].abs().max() == 0
    with pytest.raises(ValueError, match="BLOCK_N 32"):
        paged_attention_prefill(*args, config={**cfg, "gluon": {"BLOCK_N": 32}})


def test_gluon_runs_from_gluon_min_q_and_on_the_fp8_scratch(monkeypatch):
    # which calls take the Gluon kernel (no interpreter: a stand-in with its contract records each call and answers
    # with the Triton kernel): a query of GLUON_MIN_Q tokens or more; an FP8 cache's scratch too, with q in fp16,
    # k_scale folded into the softmax scale and v_scale applied to its output, as the Triton kernel applies them
    import kernels.attention.prefill as prefill
    plain = default_prefill_config(64)
    calls = []

    def stand_in(q, k_cache, v_cache, cu, lens, tables, scale, max_q, g):
        calls.append((q.dtype, k_cache.dtype, scale, max_q))
        return paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, scale, max_q, config=plain)

    monkeypatch.setattr(prefill, "gluon_supported", gluon_fits)  # (its shape rules, without the sm90 check)
    monkeypatch.setattr(prefill, "paged_attention_prefill_gluon", stand_in)
    q, k_cache, v_cache, cu, lens, tables = _inputs([5, 20], [5, 33], 4, 2, 16, torch.float16, "cpu", head_dim=64,
                                                    lead=1)
    q[0] = float("inf")  # a row no sequence owns: the scratch path's clamp must not reach the caller's q
    cfg = {**plain, "gluon": 1, "GLUON_MIN_Q": 16}
    for max_q, gluon in ((15, False), (20, True)):  # (max_q: what the caller says the longest query is)
        calls.clear()
        out = paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, 0.125, max_q, config=cfg)
        assert bool(calls) == gluon and (not gluon or calls[0] == (torch.float16, torch.float16, 0.125, 20))
    assert torch.equal(out, paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, 0.125, 20, config=plain))
    k8, v8 = (c.clamp(-4, 4).to(torch.float8_e4m3fn) for c in (k_cache, v_cache))
    calls.clear()
    args = (q, k8, v8, cu, lens, tables, 0.125, 20, 0.5, 2.0)
    out = paged_attention_prefill(*args, config={**cfg, "FP8_SCRATCH_MIN_Q": 1})
    assert calls == [(torch.float16, torch.float16, 0.125 * 0.5, 20)] and q[0].isinf().all()
    in_loop = paged_attention_prefill(*args, config={**plain, "FP8_SCRATCH_MIN_Q": 0})
    assert (out.float() - in_loop.float()).abs().max() <= 2e-3 * in_loop.float().abs().max()


# ------------------------------------------------------------------------------------------- GPU

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _worst_row_err(a: torch.Tensor, b: torch.Tensor) -> float:
    # the largest relative error of one (token, head) row: a wrong row (a block's last query row, a diagonal tile's
    # mask off by one) hides in a sequence's norm of thousands of rows
    return ((a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1).clamp_min(1e-6)).max().item()


def _gluon_or_exit(args: tuple, g: dict, what: str, capsys, limit_s: float = 20.0) -> torch.Tensor:
    # the Gluon kernel on args, or the process ends here: a wrong mbarrier phase or tx count spins forever (no
    # error), and the device session's timeout would then take the whole pytest run, with no word of which variant.
    # The launch returns once the kernel is queued (compiling happens before): then at most limit_s for the kernel.
    # The message past pytest's capture (fd-level: sys.__stderr__ would land in its temp file, lost on _exit)
    torch.cuda.synchronize()
    out = paged_attention_prefill_gluon(*args, g)
    done = torch.cuda.Event()
    done.record()
    start = time.monotonic()
    while not done.query():
        if time.monotonic() - start > limit_s:  # the context cannot be recovered from a hung kernel: exit
            with capsys.disabled():
                sys.stdout.write(f"\nGLUON HANG (> {limit_s:.0f} s): {what} tiles {g}\n")
                sys.stdout.flush()
            os._exit(3)
        time.sleep(0.005)
    return out


GPU_CASES = [  # (q_lens, seq_lens): odd lengths, several sequences, a cached prefix, an empty query
    ([1, 17, 300, 1000], [1, 17, 300, 1000]),
    ([1, 17, 300, 1000], [40, 17 + 700, 301, 1000 + 2500]),
    ([0, 129, 3000], [10, 129 + 16, 3000]),
    ([2048], [2048 + 6000]),  # (the reference holds fp32 scores [heads, q, kv]: 6 GB at 96 heads)
]


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 4), (96, 8)])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("tiles", [{}, {"BLOCK_N": 64, "num_stages": 3}, {"num_stages": 3, "split_wg": 1},
                                   {"num_stages": 3, "split_wg": 2}], ids=["default", "n64", "split1", "pingpong"])
def test_gluon_prefill_gpu(heads, kv_heads, block_size, case, tiles, capsys):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon prefill is for sm90")
    q_lens, seq_lens = case
    q, k_cache, v_cache, cu, lens, tables = _inputs(q_lens, seq_lens, heads, kv_heads, block_size, torch.bfloat16,
                                                    "cuda", lead=3, tail=5, seed=len(q_lens) + block_size)
    args = (q, k_cache, v_cache, cu, lens, tables, 128**-0.5, max(q_lens))
    g = gluon_config({"gluon": tiles})
    assert gluon_supported(q, k_cache, v_cache, cu, lens, tables, g, 1.0, 1.0, None)
    out = _gluon_or_exit(args, g, f"{heads}/{kv_heads} heads, {block_size}-token pages, q_lens {q_lens}", capsys)
    ref = paged_attention_prefill_ref(*args)
    triton_out = paged_attention_prefill(*args)
    assert out[:3].abs().max() == 0 and out[-5:].abs().max() == 0  # tokens no sequence owns
    assert _rel_err(out, ref) < 1e-2 and _rel_err(out, triton_out) < 1e-2
    for b in range(len(q_lens)):  # each sequence on its own (a wrong row range in one would hide in the norm)
        rows = slice(int(cu[b]), int(cu[b + 1]))
        if rows.stop > rows.start:
            assert _rel_err(out[rows], ref[rows]) < 1e-2, b
    owned = slice(3, q.shape[0] - 5)  # every row as close to the reference as the Triton kernel's rows, give or take
    assert _worst_row_err(out[owned], ref[owned]) < max(2 * _worst_row_err(triton_out[owned], ref[owned]), 1e-2)
    assert torch.equal(paged_attention_prefill(*args, config={**default_prefill_config(128), "gluon": tiles}), out)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [0, 1, 2], ids=["default", "split1", "pingpong"])  # a test id each: the smoke
def test_gluon_prefill_fp16_head_dim_64_gpu(split, capsys):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon prefill is for sm90")
    q, k_cache, v_cache, cu, lens, tables = _inputs([333, 2], [333, 900], 16, 2, 32, torch.float16, "cuda",
                                                    head_dim=64)
    args = (q, k_cache, v_cache, cu, lens, tables, 64**-0.5, 333)
    out = _gluon_or_exit(args, gluon_config({"gluon": {"split_wg": split}}, 64), "fp16 head_dim 64 smoke", capsys)
    assert _rel_err(out, paged_attention_prefill_ref(*args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("block_size,head_dim", [(128, 128), (256, 128), (16, 64)])
@pytest.mark.parametrize("tiles", [{}, {"BLOCK_N": 64, "split_wg": 1}, {"BLOCK_N": 64, "split_wg": 2}],
                         ids=["default", "n64-split1", "n64-pingpong"])
def test_gluon_prefill_more_shapes_gpu(block_size, head_dim, tiles, capsys):
    # pages of 128 / 256 tokens: a page spans tiles (the box row is the key's offset in its page, not the page's
    # start), one box a tile; head_dim 64 in bf16 (one 64-column message a box) with 16-token pages and BLOCK_N 64;
    # lengths ending on a tile / page boundary and one past it; MHA (group 1); q a strided view of a fused qkv
    # buffer as the model passes it
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon prefill is for sm90")
    heads = 16
    q_lens, seq_lens = [128, 1, 257, 64], [128, 257, 257 + 256, 64 + 1000]
    q, k_cache, v_cache, cu, lens, tables = _inputs(q_lens, seq_lens, heads, heads, block_size, torch.bfloat16,
                                                    "cuda", head_dim=head_dim, lead=1, tail=2, seed=block_size)
    qkv = torch.zeros(q.shape[0], 3 * heads, head_dim, dtype=q.dtype, device=q.device)
    qkv[:, :heads] = q
    q = qkv[:, :heads]  # stride(0) 3 * heads * head_dim
    args = (q, k_cache, v_cache, cu, lens, tables, head_dim**-0.5, max(q_lens))
    g = gluon_config({"gluon": tiles}, head_dim)
    assert gluon_supported(q, k_cache, v_cache, cu, lens, tables, g, 1.0, 1.0, None)
    out = _gluon_or_exit(args, g, f"{block_size}-token pages, head_dim {head_dim}", capsys)
    ref = paged_attention_prefill_ref(*args)
    triton_out = paged_attention_prefill(*args)
    assert out[:1].abs().max() == 0 and out[-2:].abs().max() == 0
    assert _rel_err(out, ref) < 1e-2 and _rel_err(out, triton_out) < 1e-2
    assert _worst_row_err(out[1:-2], ref[1:-2]) < max(2 * _worst_row_err(triton_out[1:-2], ref[1:-2]), 1e-2)


@pytest.mark.gpu
def test_gluon_on_the_fp8_scratch_gpu(monkeypatch):
    # an FP8 cache's long prefill widens its pages into an fp16 scratch and, with the H200 table's "gluon", runs the
    # scratch on the Gluon kernel (q in fp16, k_scale in the softmax scale, v_scale on the output): the same answer
    # as the Triton kernel widening in its loop, to bf16 rounding
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon prefill is for sm90")
    import kernels.attention.prefill as prefill
    real, calls = prefill.paged_attention_prefill_gluon, []
    monkeypatch.setattr(prefill, "paged_attention_prefill_gluon", lambda *a: calls.append(a[0].dtype) or real(*a))
    q, k_cache, v_cache, cu, lens, tables = _inputs([2048, 300], [2048 + 3000, 300], 32, 4, 16, torch.bfloat16,
                                                    "cuda", lead=2)
    k8, v8 = (c.clamp(-4, 4).to(torch.float8_e4m3fn) for c in (k_cache, v_cache))
    args = (q, k8, v8, cu, lens, tables, 128**-0.5, 2048, 0.5, 2.0)
    plain = default_prefill_config(128)
    out = paged_attention_prefill(*args, config={**plain, "gluon": {"num_stages": 3, "split_wg": 1},
                                                 "GLUON_MIN_Q": 2048, "FP8_SCRATCH_MIN_Q": 256})
    assert calls == [torch.float16] and out.dtype == torch.bfloat16
    in_loop = paged_attention_prefill(*args, config={**plain, "FP8_SCRATCH_MIN_Q": 0})
    assert _rel_err(out, in_loop) < 1e-2 and _worst_row_err(out[2:], in_loop[2:]) < 2e-2
