"""Which DP rank gets a request: an explicit data_parallel_rank, else expected prefix-cache hits against load.

The coordinator sees every prompt, so it keeps, per rank, an LRU set of the block-hash chains of the prompts
it sent there (the same chaining as the block manager's prefix cache: a block's hash covers all tokens before
it). A prompt's expected hits on a rank are its leading blocks found there. Each rank's cost is in prompt
tokens: those it would have to compute (prompt - expected hits) plus load_share x the mean prompt length per
request already queued or running there; the cheapest rank wins (a second turn goes where the first one's KV
is unless that rank is busier by more than the hits are worth). As in SGLang's cache-aware router, load alone
decides when the ranks are clearly out of balance. Equal costs rotate, so ties do not all land on rank 0.

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
                 max_blocks_per_rank: int = 1 << 16, load_share: float = 0.1,
                 balance_abs: int = 16, balance_rel: float = 1.5) -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {ROUTING_POLICIES}, got {policy!r}")
        self.num_ranks = num_ranks
        self.policy = policy
        self.block_size = block_size
        self.max_blocks_per_rank = max_blocks_per_rank
        self.load_share = load_share  # what one queued request costs, in mean prompts
        self.mean_prompt_len = 0.0  # running mean of the prompts routed with the cache on
        self.balance_abs, self.balance_rel = balance_abs, balance_rel  # "clearly out of balance"
        self.load: list[tuple[int, float]] = [(0, 0.0)] * num_ranks  # (running + waiting, kv usage)
        self.received = [0] * num_ranks  # AddRequests each rank has reported taking (since its start)
        self.received_base = [0] * num_ranks  # its count when this coordinator first heard it
        self.num_routed = [0] * num_ranks  # cumulative, for the metrics
        self.routed_before_start = [0] * num_ranks  # num_routed when the rank last (re)started
        self.cached: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_ranks)]
        self.next_tie = 0
        self.num_expected_hit_blocks = 0  # sum over routed prompts of the chosen rank's match, for the log
        self.num_expected_hit_picks = 0

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
            num_tokens = len(prompt_token_ids or [])
            self.mean_prompt_len += (num_tokens - self.mean_prompt_len) / min(self.num_expected_hit_picks + 1, 100)
            self.num_expected_hit_picks += 1
            queue = [self.queue_len(r) for r in ranks]
            balanced = max(queue) - min(queue) <= self.balance_abs or max(queue) <= self.balance_rel * min(queue)
            if balanced:
                per_request = self.load_share * self.mean_prompt_len
                cost = [num_tokens - self.matched_blocks(r, hashes) * self.block_size + per_request * queue[r]
                        for r in ranks]
                rank = self._rotate([r for r in ranks if cost[r] == min(cost)])
            else:
                rank = self._least_loaded(ranks)
        else:
            rank = self._least_loaded(ranks)
        if hashes:
            self.num_expected_hit_blocks += self.matched_blocks(rank, hashes)
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
