"""Paged KV bookkeeping: fixed-size blocks, refcounts, hash-chained prefix caching, LRU eviction.

Pure CPU; knows nothing of tensors. A block is cached (findable by hash) once all its tokens are
computed. Free blocks that still hold a cached prefix stay findable until they are evicted, least
recently freed first, and only after every never-cached free block is used.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from runtime.engine.sequence import Sequence


def block_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # to rule out hash collisions
        self.hash_to_block: dict[int, int] = {}
        self.free_uncached: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # LRU order, oldest first
        # per sequence: hashes of its leading full blocks, so chains are extended, not recomputed
        self._seq_hashes: dict[str, list[int]] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # prompt tokens found

    # ---- counts ----
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # ---- allocation ----
    def _take_free_block(self) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.popleft()
        else:
            block_id, _ = self.free_cached.popitem(last=False)  # evict the least recently freed
            h = self.block_hashes[block_id]
            if h is not None and self.hash_to_block.get(h) == block_id:
                del self.hash_to_block[h]
            self.block_hashes[block_id] = None
            self.block_tokens[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def _ref_cached(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_cached[block_id]
        self.ref_counts[block_id] += 1

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the sequence's leading full blocks; the last token is always recomputed
        so that the step has a position to sample from."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # (prompt logprobs need every prompt position computed)
        matched: list[int] = []
        parent: int | None = None
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.block_tokens[block_id] != tokens:
                break
            matched.append(block_id)
            parent = h
        return matched

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether admitting seq with num_tokens computed this step (prefix hits aside) fits."""
        matched = self._match_prefix(seq)
        num_reusable_free = sum(1 for b in matched if self.ref_counts[b] == 0)
        cached_tokens = len(matched) * self.block_size
        needed = -(-max(num_tokens + cached_tokens, 1) // self.block_size) - len(matched)
        return needed <= self.num_free_blocks - num_reusable_free

    def allocate(self, seq: Sequence) -> int:
        """Admits a waiting sequence: takes its prefix-cache hits. Returns the number of cached tokens."""
        assert not seq.block_table
        matched = self._match_prefix(seq)
        for block_id in matched:
            self._ref_cached(block_id)
        seq.block_table = list(matched)
        self._seq_hashes[seq.request_id] = [self.block_hashes[b] for b in matched]  # type: ignore[misc]
        num_cached = len(matched) * self.block_size
        self.num_prefix_queries += len(seq)
        self.num_prefix_hits += num_cached
        seq.num_cached_tokens = num_cached
        seq.num_computed_tokens = num_cached
        return num_cached

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Makes the block table cover num_tokens tokens."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_free_block())

    def commit(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Registers the sequence's newly completed full blocks in the prefix cache; num_tokens: of its computed
        tokens, only the first this many (the rest is not known yet: async scheduling's placeholder)."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        num_full = min(seq.num_computed_tokens, len(seq) if num_tokens is None else num_tokens) // self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            block_id = seq.block_table[i]
            if self.block_hashes[block_id] is None and h not in self.hash_to_block:
                self.block_hashes[block_id] = h
                self.block_tokens[block_id] = tokens
                self.hash_to_block[h] = block_id

    def free(self, seq: Sequence) -> None:
        # Release in reverse so the tail of a sequence is evicted before its shared head.
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                if self.block_hashes[block_id] is not None:
                    self.free_cached[block_id] = None
                else:
                    self.free_uncached.append(block_id)
        seq.block_table = []
        self._seq_hashes.pop(seq.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block_id in list(self.free_cached):
            self.block_hashes[block_id] = None
            self.block_tokens[block_id] = None
            self.free_uncached.append(block_id)
        self.free_cached.clear()
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.ref_counts[b] > 0}
