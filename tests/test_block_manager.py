from runtime.engine.block_manager import BlockManager
from runtime.engine.scheduler import Scheduler
from runtime.engine.sequence import Sequence
from runtime.sampling_params import SamplingParams


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=4))


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    bm.allocate(s)
    bm.grow(s, len(s))
    s.num_computed_tokens = len(s)
    bm.commit(s)


def test_refcounts_and_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(10)))  # 3 blocks
    run_prefill(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.ref_counts[b] == 1 for b in a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.ref_counts)


def test_prefix_hit_shares_blocks_and_counts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq("a", list(range(13)))
    run_prefill(bm, a)
    b = seq("b", list(range(12)) + [99, 98])  # shares 3 full blocks
    cached = bm.allocate(b)
    assert cached == 12 and b.block_table == a.block_table[:3]
    assert [bm.ref_counts[x] for x in b.block_table] == [2, 2, 2]
    assert bm.num_prefix_hits == 12


def test_last_token_never_cached():
    # a full repeat of a block-aligned prompt recomputes the last block, so there is a token to sample
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq("a", list(range(8)))
    run_prefill(bm, a)
    b = seq("b", list(range(8)))
    assert bm.allocate(b) == 4


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", list(range(9)))
    run_prefill(bm, a)  # 3 blocks, 2 full & cached
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.free_cached) == 2
    b = seq("b", list(range(9)))
    assert bm.allocate(b) == 8  # hit after free
    bm.free(b)
    c = seq("c", [50 + i for i in range(16)])  # needs all 4 blocks: evicts the cached ones
    assert bm.can_allocate(c, 16)
    bm.allocate(c)
    bm.grow(c, 16)
    assert bm.num_free_blocks == 0 and not bm.hash_to_block
    bm.free(c)
    assert bm.num_free_blocks == 4


def test_can_allocate_counts_free_hits():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq("a", list(range(9)))
    run_prefill(bm, a)
    bm.free(a)
    # hits on 2 free cached blocks + 1 new block: fits exactly
    assert bm.can_allocate(seq("b", list(range(9))), 1)
    assert not bm.can_allocate(seq("c", [70 + i for i in range(13)]), 13)


def test_scheduler_chunked_prefill_and_budget():
    bm = BlockManager(num_blocks=64, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=7)
    a, b = seq("a", list(range(10))), seq("b", list(range(20, 25)))
    sch.add(a)
    sch.add(b)
    batch = sch.schedule()
    assert batch.num_new_tokens == [7] and batch.seqs == [a]
    a.num_computed_tokens += 7
    batch = sch.schedule()  # a's last 3 tokens then 4 of b
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_new_tokens == [3, 4]


def test_scheduler_decode_first():
    bm = BlockManager(num_blocks=64, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=6)
    a = seq("a", list(range(3)))
    sch.add(a)
    sch.schedule()
    a.num_computed_tokens = 3
    a.token_ids.append(5)  # sampled
    b = seq("b", list(range(30, 40)))
    sch.add(b)
    batch = sch.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 5]


def test_scheduler_preempts_newest_and_frees_everything():
    bm = BlockManager(num_blocks=4, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", list(range(7))), seq("b", list(range(10, 17)))
    sch.add(a)
    sch.add(b)
    batch = sch.schedule()
    assert batch.seqs == [a, b] and bm.num_free_blocks == 0
    for s in (a, b):
        s.num_computed_tokens = len(s)
        s.token_ids += [1, 2]  # two more tokens: a needs a third block
    batch = sch.schedule()
    assert batch.seqs == [a] and b.num_preemptions == 1 and sch.waiting[0] is b
    assert b.num_computed_tokens == 0 and not b.block_table
    sch.finish(a, "stop")
    sch.finish(b, "abort")
    assert bm.num_free_blocks == 4 and not sch.has_unfinished()


def test_scheduler_first_scheduled_time_survives_preemption():
    # vLLM's queue time ends at the first scheduling; a preempted and re-queued request keeps it
    bm = BlockManager(num_blocks=4, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", list(range(7))), seq("b", list(range(10, 17)))
    assert b.first_scheduled_time is None and b.queued_time <= a.queued_time + 1.0
    sch.add(a)
    sch.add(b)
    sch.schedule()
    first = b.first_scheduled_time
    assert first is not None and first >= b.queued_time
    for s in (a, b):
        s.num_computed_tokens = len(s)
        s.token_ids += [1, 2]
    sch.schedule()
    assert b.num_preemptions == 1 and b.first_scheduled_time == first
    sch.finish(a, "stop")
    assert sch.schedule().seqs == [b] and b.first_scheduled_time == first
    queue_time, prefill_time = b.first_token_timings()
    assert queue_time == first - b.queued_time and prefill_time > 0
