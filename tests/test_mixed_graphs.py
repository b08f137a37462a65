"""Mixed steps padded to token buckets (runtime/engine/mixed_graphs.py): the tile-mapped prefill kernel vs the
torch reference (Triton interpreter on the CPU), the padded plan, and greedy tokens through the bucket path."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.attention.prefill import paged_attention_prefill, paged_attention_prefill_ref, prefill_tile_q  # noqa: E402
from runtime.engine.mixed_graphs import MixedGraphs, fill_tile_map, mixed_graph_sizes  # noqa: E402

CASES = [  # (heads, kv_heads, head_dim, block_size, dtype): tile_q 64, 16 and 128
    (4, 2, 32, 16, torch.float32),
    (8, 1, 64, 32, torch.float16),
    (3, 3, 16, 8, torch.float32),
]


def _varlen_batch(seed: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype):
    # random odd q_lens incl. decode rows (q_len 1), cached prefixes, padding rows (q_len 0) and padding tokens
    g = torch.Generator().manual_seed(seed)
    q_lens = [1, int(torch.randint(2, 40, (1,), generator=g)), 1, 150, int(torch.randint(1, 9, (1,), generator=g)), 1]
    ctx = [int(torch.randint(0, 70, (1,), generator=g)) for _ in q_lens]
    ctx[3] = 0  # a first chunk
    rows = len(q_lens) + 3  # three padding rows
    seq_lens = [c + q for c, q in zip(ctx, q_lens)] + [0] * 3
    q_lens += [0] * 3
    blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks) + 2
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(rows, max(blocks) + 1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[at : at + n]
        at += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    num_tokens = sum(q_lens) + 5  # five padding tokens in no sequence
    q = torch.randn(num_tokens, heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    return q, k_cache, v_cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, np.array(q_lens)


def _tiles(q_lens: np.ndarray, seq_lens: torch.Tensor, tile_q: int, num_tokens: int) -> torch.Tensor:
    tiles = np.zeros((-(-num_tokens // tile_q) + len(q_lens), 2), dtype=np.int32)  # the bucket's bound
    fill_tile_map(tiles, q_lens, seq_lens.numpy(), tile_q)
    return torch.from_numpy(tiles)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_tile_map_prefill_matches_reference(case, seed):
    heads, kv_heads, head_dim, block_size, dtype = case
    q, k_cache, v_cache, cu, lens, tables, q_lens = _varlen_batch(seed, heads, kv_heads, head_dim, block_size, dtype)
    tiles = _tiles(q_lens, lens, prefill_tile_q(heads, kv_heads, head_dim, dtype, q.device), q.shape[0])
    assert (tiles[:, 0] == -1).any()  # the fixed grid has programs with nothing to do
    ref = paged_attention_prefill_ref(q, k_cache, v_cache, cu, lens, tables, head_dim**-0.5, int(q_lens.max()))
    # max_seqlen_q 0: with a tile map the grid must not depend on it (a graph captures a stale value)
    out = paged_attention_prefill(q, k_cache, v_cache, cu, lens, tables, head_dim**-0.5, 0, tile_map=tiles)
    assert out[-5:].abs().max() == 0  # padding tokens
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < (1e-4 if dtype == torch.float32 else 3e-3)


def test_tile_map_is_what_runs():
    # a token whose tile is left out stays zero, in the kernel as in the reference (the map drives the grid)
    heads, kv_heads, head_dim, block_size, dtype = CASES[1]
    q, k_cache, v_cache, cu, lens, tables, q_lens = _varlen_batch(3, heads, kv_heads, head_dim, block_size, dtype)
    tile_q = prefill_tile_q(heads, kv_heads, head_dim, dtype, q.device)
    tiles = _tiles(q_lens, lens, tile_q, q.shape[0])
    dropped = int(np.nonzero((tiles[:, 0] == 3).numpy() & (tiles[:, 1] == 1).numpy())[0][0])
    tiles[dropped] = torch.tensor([-1, 0])
    args = (q, k_cache, v_cache, cu, lens, tables, head_dim**-0.5, int(q_lens.max()))
    ref = paged_attention_prefill_ref(*args, tile_map=tiles)
    out = paged_attention_prefill(*args, tile_map=tiles)
    start = int(cu[3]) + tile_q
    assert out[start : start + tile_q].abs().max() == 0 and ref[start : start + tile_q].abs().max() == 0
    assert out[start - 1].abs().max() > 0
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 3e-3


def test_tile_map_longest_first_and_bounded():
    q_lens = np.array([1, 300, 0, 17, 1])
    seq_lens = np.array([900, 300, 0, 40, 2])
    tiles = np.zeros((-(-319 // 16) + 5, 2), dtype=np.int32)
    fill_tile_map(tiles, q_lens, seq_lens, 16)
    real = tiles[tiles[:, 0] >= 0]
    assert sorted(map(tuple, real)) == sorted([(0, 0), (4, 0), (3, 0), (3, 1)] + [(1, b) for b in range(19)])
    assert tuple(real[0]) == (0, 0)  # 900 keys: the longest tile goes first
    assert (tiles[len(real) :, 0] == -1).all()
    with pytest.raises(ValueError, match="do not fit"):
        fill_tile_map(np.zeros((3, 2), dtype=np.int32), q_lens, seq_lens, 16)


def test_bucket_sizes():
    assert mixed_graph_sizes(0) == []
    assert mixed_graph_sizes(2048) == [64, 128, 256, 512, 1024, 2048]
    assert mixed_graph_sizes(3000) == [64, 128, 256, 512, 1024, 2048, 3000]
    assert mixed_graph_sizes(48) == [48]
    m = MixedGraphs([64, 128, 256], max_rows=100, tile_q=16)
    assert (m.bucket(65), m.bucket(256), m.bucket(257)) == (128, 256, None)
    assert (m.rows(64), m.rows(256), m.num_tiles(256)) == (64, 100, 116)


# ------------------------------------------------------------------------------------------- engine (CPU)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qwen3moe"), "Qwen3MoeForCausalLM")


def _staggered(path: str, buckets: list[int] | None, pad_to: int = 0) -> tuple[dict, list, object]:
    """Greedy tokens of prompts arriving one every two steps while the others decode (chunked prefill of 24
    tokens a step): most steps mix decodes and a prompt's chunk. buckets: run mixed steps padded to these
    token buckets (the CUDA-graph layout, eagerly); pad_to: every step padded to this agreed size (lockstep)."""
    from runtime import LLM, SamplingParams
    from runtime.engine.mixed_graphs import model_tile_q
    from runtime.messages import AddRequest

    llm = LLM(model=path, dtype="float32", device="cpu", kv_cache_memory=8 << 20, block_size=8, max_num_seqs=6,
              max_num_batched_tokens=24, max_mixed_cudagraph_tokens=0)
    engine, runner = llm.engine, llm.engine.runner
    if buckets:
        runner.mixed = MixedGraphs(buckets, 6, model_tile_q(runner.model, runner.kv_cache.dtype, runner.device))
    steps = []  # per step: (tokens run, bucketed, rows with q_len 1, rows with q_len > 1)
    prepare = runner.prepare

    def recording_prepare(plan):
        prepared = prepare(plan)
        q = np.diff(plan.i32[: plan.num_rows + 1])
        steps.append((plan.num_tokens, prepared.forward_batch.prefill_tiles is not None, int((q == 1).sum()),
                      int((q > 1).sum())))
        return prepared

    runner.prepare = recording_prepare
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 30, 1, 13, 50, 9)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    step = 0
    while step < 2 * len(prompts) or engine.has_unfinished():
        if step % 2 == 0 and step // 2 < len(prompts):
            engine.add_request(AddRequest(f"r{step // 2}", prompts[step // 2], params))
        if engine.schedule():
            for delta in engine.execute(pad_to=pad_to or None):
                tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        step += 1
    assert engine.block_manager.num_used_blocks == 0
    return tokens, steps, runner


@pytest.fixture(scope="module")
def plain(checkpoint):
    tokens, steps, _ = _staggered(checkpoint, None)
    assert not any(bucketed for _, bucketed, _, _ in steps)
    return tokens


def test_mixed_steps_through_buckets_give_the_same_greedy_tokens(checkpoint, plain):
    bucketed, steps, _ = _staggered(checkpoint, [8, 16, 32])
    assert bucketed == plain and all(len(t) == 12 for t in plain.values())
    mixed = [s for s in steps if s[1]]
    assert any(decodes and prefills for _, _, decodes, prefills in mixed)  # decodes and a chunk in one bucket
    assert {n for n, *_ in mixed} <= {8, 16, 32} and len({n for n, *_ in mixed}) > 1
    assert not any(bucketed for _, bucketed, _, prefills in steps if not prefills)  # pure decodes: as before


def test_lockstep_pads_every_step_to_the_agreed_bucket(checkpoint, plain):
    # an EP rank runs the size all ranks agreed on: a decode step padded to a mixed bucket runs the mixed
    # layout (the other rank may replay that bucket's graph), a mixed step runs exactly that bucket
    padded, steps, runner = _staggered(checkpoint, [8, 16, 32], pad_to=32)
    assert padded == plain
    assert all(n == 32 and bucketed for n, bucketed, _, _ in steps)
    # the size every rank pads to: the smallest bucket that holds the step (no decode graphs on the CPU)
    assert (runner.padded_size(3), runner.padded_size(17), runner.padded_size(33)) == (8, 32, 33)


def test_flag(checkpoint):
    from runtime.config import ConfigError, EngineConfig

    cuda = torch.device("cuda")  # a device object only: what the config decides for a GPU
    assert EngineConfig(model=checkpoint).mixed_cudagraph_tokens(cuda) == 2048
    assert EngineConfig(model=checkpoint, max_num_batched_tokens=512).mixed_cudagraph_tokens(cuda) == 512
    assert EngineConfig(model=checkpoint).mixed_cudagraph_tokens(torch.device("cpu")) == 0
    assert EngineConfig(model=checkpoint, enforce_eager=True).mixed_cudagraph_tokens(cuda) == 0
    assert EngineConfig(model=checkpoint, max_mixed_cudagraph_tokens=0).mixed_cudagraph_tokens(cuda) == 0
    with pytest.raises(ConfigError, match="--max-mixed-cudagraph-tokens must be >= 0"):
        EngineConfig(model=checkpoint, max_mixed_cudagraph_tokens=-1)


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,group", [(128, 8), (128, 4), (64, 6)])
def test_tile_map_prefill_gpu(head_dim, group):
    # real sizes: a 2k chunk, long-context decode rows, a first chunk, padding rows and tokens
    torch.manual_seed(4)
    kv_heads, block_size = 4, 16
    q_lens = [1, 2048, 1, 300, 1, 77] + [0] * 10
    seq_lens = [4000, 3000, 17, 300, 1, 1100] + [0] * 10
    blocks = [-(-s // block_size) for s in seq_lens]
    tables = torch.zeros(len(q_lens), max(blocks), dtype=torch.int32)
    perm, at = torch.randperm(sum(blocks) + 1), 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[at : at + n]
        at += n
    shape = (sum(blocks) + 1, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    num_tokens = 4096  # the bucket
    q = torch.randn(num_tokens, kv_heads * group, head_dim, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32, device="cuda")
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    tile_q = prefill_tile_q(kv_heads * group, kv_heads, head_dim, k_cache.dtype, q.device)
    tiles = _tiles(np.array(q_lens), lens.cpu(), tile_q, num_tokens)
    args = (q, k_cache, v_cache, cu, lens, tables.cuda(), head_dim**-0.5)
    ref = paged_attention_prefill(*args, max(q_lens))  # the eager grid
    out = paged_attention_prefill(*args, 0, tile_map=tiles.cuda())
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-3  # the same programs, placed
    assert out[int(cu[-1]) :].abs().max() == 0
    real = int(cu[-1])
    check = paged_attention_prefill_ref(q[:real], k_cache, v_cache, cu, lens, tables.cuda(), head_dim**-0.5, 2048)
    assert ((out[:real].float() - check.float()).norm() / check.float().norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mixed_graphs_match_eager(tmp_path):
    # prompts arriving while others decode, chunked: mixed steps replayed from their bucket's CUDA graph give
    # the greedy tokens of the same steps run eagerly
    from runtime import LLM, SamplingParams
    from runtime.messages import AddRequest
    from tests.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path / "qwen3moe"), "Qwen3MoeForCausalLM")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 300, 1, 40, 130, 9, 17)]

    def run(pad_to: int = 0, **kw) -> tuple[dict, int]:
        llm = LLM(model=path, dtype="float32", device="cuda", block_size=16, kv_cache_memory=64 << 20,
                  max_num_seqs=8, max_num_batched_tokens=256, **kw)
        engine, mixed = llm.engine, llm.engine.runner.mixed
        replays = []
        if mixed is not None and mixed.captured:
            replay = mixed.replay

            def counting_replay(input_ids, positions, fb):
                replays.append(input_ids.shape[0])
                return replay(input_ids, positions, fb)

            mixed.replay = counting_replay
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        tokens: dict[str, list[int]] = {}
        step = 0
        while step < 2 * len(prompts) or engine.has_unfinished():
            if step % 2 == 0 and step // 2 < len(prompts):
                engine.add_request(AddRequest(f"r{step // 2}", prompts[step // 2], params))
            if not engine.schedule():
                step += 1
                continue
            if pad_to:  # as a lockstep rank: every step at the agreed size, a dummy step of it in between
                engine.runner.execute_dummy(pad_to)
            for delta in engine.execute(pad_to=pad_to or None):
                tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
            step += 1
        return tokens, len(set(replays))

    eager, _ = run(enforce_eager=True)
    decode_graphs_only, _ = run(max_mixed_cudagraph_tokens=0)
    graphs, num_buckets = run()
    assert num_buckets >= 2  # several buckets replayed
    assert graphs == eager == decode_graphs_only
    padded, num_buckets = run(pad_to=256)  # decodes too run in the 256 bucket's graph (no decode graph holds 256)
    assert num_buckets == 1 and padded == eager
