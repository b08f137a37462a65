"""Which DP rank gets a request: an explicit data_parallel_rank, else expected prefix-cache hits against load.

The coordinator sees every prompt, so it keeps, per rank, an LRU set of the block-hash chains of the prompts
it sent there (the same chaining as the block manager's prefix cache: a block's hash covers all tokens before
it). A prompt's expected hits on a rank are its leading blocks found there. As in SGLang's cache-aware
router: while the ranks' queues are in balance, the rank with the most expected hits wins, if they cover
cache_threshold of the prompt (a second turn goes where the first one's KV is), else the least loaded rank;
once the queues are clearly out of balance (by balance_abs requests and balance_rel times), load alone
decides. Among equals the least loaded wins, and equal loads rotate, so ties do not all land on rank 0.
(A score trading hits against queue length, in tokens, lost stickiness to the random swings of a burst's
queues: a conversation's history is worth less than one queued request, but a burst finishes together.)

The sets are an estimate (a rank evicts on its own); they are bounded per rank and dropped with a restart.
"""

from __future__ import annotations

from collections import OrderedDict

from runtime.messages import StepReport

ROUTING_POLICIES = ("prefix", "load")


def prefix_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks; the last token never counts (the rank recomputes it)."""
    hashes: list[int] = []
    parent: int | None = None
    for i in range((len(token_ids) - 1) // block_size):
        parent = hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class Router:
    def __init__(self, num_ranks: int, policy: str = "prefix", block_size: int = 16,
                 max_blocks_per_rank: int = 1 << 16, cache_threshold: float = 0.5,
                 balance_abs: int = 16, balance_rel: float = 1.5) -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {ROUTING_POLICIES}, got {policy!r}")
        self.num_ranks = num_ranks
        self.policy = policy
        self.block_size = block_size
        self.max_blocks_per_rank = max_blocks_per_rank
        self.cache_threshold = cache_threshold  # share of the prompt the best match must cover to count
        self.balance_abs, self.balance_rel = balance_abs, balance_rel  # "clearly out of balance"
        self.load: list[tuple[int, float]] = [(0, 0.0)] * num_ranks  # (running + waiting, kv usage)
        self.received = [0] * num_ranks  # AddRequests each rank has reported taking (since its start)
        self.received_base = [0] * num_ranks  # its count when this coordinator first heard it
        self.num_routed = [0] * num_ranks  # cumulative, for the metrics
        self.routed_before_start = [0] * num_ranks  # num_routed when the rank last (re)started
        self.cached: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_ranks)]
        self.next_tie = 0

    def update(self, r: StepReport) -> None:
        self.load[r.rank] = (r.num_running + r.num_waiting, r.kv_usage)
        self.received[r.rank] = max(self.received[r.rank], r.num_requests_received)

    def adopt(self, rank: int, num_requests_received: int) -> None:
        """A rank this (restarted) coordinator hears for the first time: it counts from its current total."""
        self.received[rank] = self.received_base[rank] = num_requests_received
        self.routed_before_start[rank] = self.num_routed[rank]

    def restart(self, rank: int) -> None:
        self.load[rank] = (0, 0.0)
        self.received[rank] = self.received_base[rank] = 0
        self.routed_before_start[rank] = self.num_routed[rank]
        self.cached[rank].clear()  # its KV cache is gone

    def in_flight(self, rank: int) -> int:
        return self.num_routed[rank] - self.routed_before_start[rank] - (self.received[rank] - self.received_base[rank])

    def queue_len(self, rank: int) -> int:
        return self.load[rank][0] + max(self.in_flight(rank), 0)

    def matched_blocks(self, rank: int, hashes: list[int]) -> int:
        cached = self.cached[rank]
        n = 0
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def _rotate(self, candidates: list[int]) -> int:
        """The first candidate at or after the tie cursor, cyclically; the cursor moves past it."""
        rank = min(candidates, key=lambda r: (r - self.next_tie) % self.num_ranks)
        self.next_tie = (rank + 1) % self.num_ranks
        return rank

    def _least_loaded(self, candidates: list[int]) -> int:
        keys = {r: (self.queue_len(r), self.load[r][1]) for r in candidates}
        best = min(keys.values())
        return self._rotate([r for r in candidates if keys[r] == best])

    def pick(self, prompt_token_ids: list[int] | None = None, data_parallel_rank: int | None = None) -> int:
        use_cache = self.policy == "prefix" and prompt_token_ids
        hashes = prefix_hashes(prompt_token_ids, self.block_size) if use_cache else []
        ranks = list(range(self.num_ranks))
        if data_parallel_rank is not None and 0 <= data_parallel_rank < self.num_ranks:
            rank = data_parallel_rank
        elif hashes:
            queue = [self.queue_len(r) for r in ranks]
            balanced = max(queue) - min(queue) <= self.balance_abs or max(queue) <= self.balance_rel * min(queue)
            matched = [self.matched_blocks(r, hashes) for r in ranks]
            best = max(matched)
            if balanced and best * self.block_size >= self.cache_threshold * len(prompt_token_ids or []) > 0:
                rank = self._least_loaded([r for r in ranks if matched[r] == best])
            else:
                rank = self._least_loaded(ranks)
        else:
            rank = self._least_loaded(ranks)
        if hashes:
            self._remember(rank, hashes)
        self.num_routed[rank] += 1
        return rank

    def _remember(self, rank: int, hashes: list[int]) -> None:
        cached = self.cached[rank]
        for h in hashes:
            cached[h] = None
            cached.move_to_end(h)
        while len(cached) > self.max_blocks_per_rank:
            cached.popitem(last=False)
