"""Owns the model and its paged KV cache; turns a scheduled batch into a step plan (host arrays), runs it,
returns logits. Under tensor parallelism TP rank 0 broadcasts each plan and its peers run it (follow())."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kernels.attention.decode_plan import decode_variants
from models.forward_batch import AttentionBackend, ForwardBatch
from models.layers import FUSED_DECODE_MAX_ROWS
from models.moe import DummyForward
from runtime.engine.async_step import fill_placeholders
from runtime.engine.cuda_graph import CudaGraphRunner
from runtime.engine.expert_warmup import warm_local_experts
from runtime.engine.mixed_graphs import MixedGraphs, fill_tile_map, mixed_graph_sizes, model_tile_q
from runtime.engine.prompt_logprobs import join_prompt_logprobs
from runtime.engine.sampler import device_tensor
from runtime.engine.scheduler import ScheduledBatch
from runtime.engine.tp_plan import DUMMY, RUN, STOP, SUM, StepPlan, broadcast_plan, receive_plan, sum_over_group

logger = logging.getLogger(__name__)


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # [num_padded_tokens]
    positions: torch.Tensor  # [num_padded_tokens]
    forward_batch: ForwardBatch
    sample_rows: list[int]  # token rows whose logits are sampled (the last token of a finished chunk)


def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
    return int(model.kv_cache_spec().bytes_per_block(block_size, dtype))


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        attn_backend: AttentionBackend,
        cuda_graph_max_batch: int = 0,  # 0 = eager only
        plan_group: Any = None,  # TP > 1: the TP group's gloo group; TP rank 0 broadcasts each step's plan on it
        plan_src: int = 0,  # global rank of TP rank 0
        mixed_graph_tokens: int = 0,  # > 0: mixed steps up to this many tokens replay CUDA graphs (mixed_graphs.py)
        max_num_seqs: int = 0,  # rows of a mixed graph
        tp_group: Any = None,  # TP > 1: the TP device group; async scheduling broadcasts sampled tokens on it
        dummy_steps: bool = False,  # lockstep DP ranks: an idle rank runs dummy steps (their graphs are captured)
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.attn_backend = attn_backend
        self.plan_group, self.plan_src, self.tp_group = plan_group, plan_src, tp_group
        spec = model.kv_cache_spec()  # this TP rank's KV heads
        # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]; zeros so stale slots are never NaN
        self.kv_cache = torch.zeros(
            spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(spec.num_layers)]
        self._staging: dict[torch.dtype, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        # an all2all whose fixed-capacity (graph) exchange can overflow: such a step runs again, exactly (_rerun)
        self.dispatcher = next((m.dispatcher for m in model.modules()
                                if hasattr(getattr(m, "dispatcher", None), "overflowed")), None)
        # a dummy step's forward: the MoE layers' collectives and local experts only (static inputs for the graphs)
        self.dummy_forward = DummyForward(model if dummy_steps else None, max(cuda_graph_max_batch, mixed_graph_tokens))
        self.graphs: CudaGraphRunner | None = None
        if cuda_graph_max_batch > 0:
            self.graphs = CudaGraphRunner(
                model, self.kv_caches, attn_backend, cuda_graph_max_batch, self.max_blocks_per_seq, device,
                self.dummy_forward,
            )
        # mixed steps padded to buckets; captured on the GPU, eager (the same padded plan) where set up without
        self.mixed: MixedGraphs | None = None
        if mixed_graph_tokens > 0:
            tile_q = model_tile_q(model, self.kv_cache.dtype, device)
            self.mixed = MixedGraphs(mixed_graph_sizes(mixed_graph_tokens), max_num_seqs, tile_q)
            if device.type == "cuda":
                self.mixed.capture(model, self.kv_caches, attn_backend, self.max_blocks_per_seq, device)

    def plan(self, batch: ScheduledBatch, pad_to: int = 0) -> StepPlan:
        bs = self.block_size
        num_seqs = len(batch)
        q_lens = np.array(batch.num_new_tokens, dtype=np.int64)
        starts = np.array([s.num_computed_tokens for s in batch.seqs], dtype=np.int64)
        num_tokens = int(q_lens.sum())
        is_decode = batch.is_decode and num_seqs > 0
        mixed = self._mixed_bucket(num_tokens, num_seqs, pad_to, is_decode)  # 0: not a bucketed mixed step
        is_decode = is_decode and not mixed
        pad = max(0, (mixed or pad_to) - num_tokens)
        # padding: decode rows are sequences of length 0; a prefill gets one padding sequence with no KV; a
        # bucket has a fixed row count (rows past the batch: q_len 0) and padding tokens in no sequence
        num_rows = num_seqs + (pad if is_decode else int(pad > 0))
        num_rows = self.mixed.rows(mixed) if self.mixed is not None and mixed else num_rows
        width = max(1, max((len(s.block_table) for s in batch.seqs), default=1))

        # one int64 buffer [ids | positions | slots] and one int32 buffer [cu_seqlens | seq_lens | tables (| tiles)],
        # each filled on the host and copied to the device once (parts aligned: StepPlan.i64_part / i32_part)
        n = num_tokens + pad
        layout = StepPlan(RUN, n, num_rows)
        n64, r32 = layout.i64_part, layout.i32_part
        i64 = np.zeros(3 * n64, dtype=np.int64)
        ids, pos, slots = i64[:n], i64[n64 : n64 + n], i64[2 * n64 : 2 * n64 + n]
        tiles_at = -(-num_rows * width // 4) * 4 + 2 * r32  # a bucket's tile map follows the tables, aligned
        num_tiles = self.mixed.num_tiles(mixed) if self.mixed is not None and mixed else 0
        i32 = np.zeros(tiles_at + 2 * num_tiles if num_tiles else 2 * r32 + num_rows * width, dtype=np.int32)
        cu, seq_lens = i32[: num_rows + 1], i32[r32 : r32 + num_rows]
        tables = i32[2 * r32 : 2 * r32 + num_rows * width].reshape(num_rows, width)
        cu[1 : num_seqs + 1] = np.cumsum(q_lens)
        seq_lens[:num_seqs] = starts + q_lens
        for row, (seq, start, q) in enumerate(zip(batch.seqs, starts.tolist(), batch.num_new_tokens)):
            lo = cu[row]
            ids[lo : lo + q] = seq.token_ids[start : start + q]
            tables[row, : len(seq.block_table)] = seq.block_table
        # positions and slots of the real tokens, vectorized over the whole batch
        token_row = np.repeat(np.arange(num_seqs), q_lens)
        pos[:num_tokens] = np.arange(num_tokens) - np.repeat(cu[:num_seqs].astype(np.int64), q_lens) + \
            np.repeat(starts, q_lens)
        slots[:num_tokens] = tables[token_row, pos[:num_tokens] // bs].astype(np.int64) * bs + pos[:num_tokens] % bs
        slots[num_tokens:] = -1
        if self.mixed is not None and mixed:
            cu[num_seqs + 1 :] = num_tokens
            fill_tile_map(i32[tiles_at:].reshape(num_tiles, 2), q_lens, seq_lens[:num_seqs], self.mixed.tile_q)
        elif pad:
            cu[num_seqs + 1 :] = num_tokens + np.arange(1, num_rows - num_seqs + 1) if is_decode else n
        sample_rows = [int(cu[row + 1]) - 1 for row, seq in enumerate(batch.seqs)
                       if int(seq_lens[row]) == len(seq)]
        return StepPlan(RUN, n, num_rows, width, is_decode, int(np.diff(cu).max()) if num_rows else 1,
                        int(seq_lens.max()) if num_rows else 0, num_tokens, i64, i32, sample_rows)

    def prepare(self, plan: StepPlan) -> PreparedBatch:
        n, num_rows, width = plan.num_tokens, plan.num_rows, plan.width
        n64, r32 = plan.i64_part, plan.i32_part
        dev_i64 = self._to_device(plan.i64)
        dev_i32 = self._to_device(plan.i32)
        tiles_at = -(-num_rows * width // 4) * 4 + 2 * r32
        fb = ForwardBatch(
            slot_mapping=dev_i64[2 * n64 : 2 * n64 + n],
            cu_seqlens_q=dev_i32[: num_rows + 1],
            seq_lens=dev_i32[r32 : r32 + num_rows],
            block_tables=dev_i32[2 * r32 : 2 * r32 + num_rows * width].view(num_rows, width),
            max_seqlen_q=plan.max_seqlen_q,
            max_seqlen_k=plan.max_seqlen_k,
            is_decode=plan.is_decode,
            kv_caches=self.kv_caches,
            attn_backend=self.attn_backend,
            # a bucketed mixed step's plan carries its tile map after the tables (plan(): num_tiles)
            prefill_tiles=dev_i32[tiles_at:].view(-1, 2) if plan.i32.size > 2 * r32 + num_rows * width else None,
        )
        return PreparedBatch(dev_i64[:n], dev_i64[n64 : n64 + n], fb, plan.sample_rows)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(array)
        if self.device.type == "cpu":
            return host
        # a persistent pinned staging buffer per dtype: pinning fresh memory every step costs more than the copy
        buf, copied = self._staging.get(host.dtype, (None, None))
        if buf is None or buf.numel() < host.numel():
            buf = torch.empty(max(host.numel(), 1 << 16), dtype=host.dtype, pin_memory=True)
        elif copied is not None:
            copied.synchronize()  # the previous step's copy out of this buffer must be done before we refill it
        staged = buf[: host.numel()]
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._staging[host.dtype] = (buf, event)
        return out

    def execute(self, batch: ScheduledBatch, pad_to: int = 0, extra_rows: list[int] | None = None,
                prev_token_ids: torch.Tensor | None = None) -> Any:
        """Runs one step; returns fp32 logits [num_sampled_seqs, vocab], and with extra_rows (flat token rows,
        for prompt logprobs) also their hidden states [len(extra_rows), hidden_size]: the caller scores them
        with record_prompt_logprobs before the next step (under TP the peers join those logits gathers).
        prev_token_ids: the sampled tokens [m] (device) of the step in flight, which the batch's placeholder
        ids stand for (async scheduling; TP peers get them broadcast in run())."""
        plan = self.plan(batch, pad_to)
        if prev_token_ids is not None and bool((plan.i64[: plan.num_real_tokens] < 0).any()):
            plan.num_prev_tokens = prev_token_ids.shape[0]
        plan.extra_rows = list(extra_rows or [])
        self._send(plan)
        return self.run(plan, plan.extra_rows, prev_token_ids)

    def execute_dummy(self, num_tokens: int) -> None:
        """A lockstep filler step: the same collectives as a real step of num_tokens tokens (each MoE layer's
        dispatch and combine, the local experts on what arrives), nothing else: no KV, no output."""
        plan = StepPlan(DUMMY, max(1, num_tokens))
        self._send(plan)
        self.run(plan)

    def stop_followers(self) -> None:
        self._send(StepPlan(STOP, 0))

    def sum_over_tp(self, values: torch.Tensor) -> torch.Tensor:
        """TP rank 0: the sum of an int64 host vector over its TP ranks (each peer adds its counters())."""
        self._send(StepPlan(SUM, values.numel()))
        return sum_over_group(values, self.plan_group)

    def follow(self, before_step: Any = None, counters: Any = None) -> None:
        """A TP peer's whole life: run every plan TP rank 0 broadcasts until it says stop.
        before_step(plan, rows_run): the rank's per-step hook; counters(): its share of a SUM."""
        while (plan := receive_plan(self.plan_group, self.plan_src)).kind != STOP:
            if plan.kind == SUM:
                sum_over_group(counters(), self.plan_group)
                continue
            if before_step is not None:
                before_step(plan, self.rows_run(plan))
            out = self.run(plan, plan.extra_rows)
            if plan.extra_rows:  # TP rank 0 scores these rows now: join its logits gathers
                join_prompt_logprobs(self.model, out[1])

    def padded_size(self, num_tokens: int) -> int:
        """Tokens a step of num_tokens really runs: the CUDA-graph bucket when one covers it (the runner is
        the one owner of the buckets; the rank loop agrees on this size with the other ranks)."""
        bucket = self.graphs.bucket(num_tokens) if self.graphs is not None else None
        mixed = self.mixed.bucket(num_tokens) if self.mixed is not None else None
        return min((b for b in (bucket, mixed) if b is not None), default=num_tokens)

    def _mixed_bucket(self, num_tokens: int, num_seqs: int, pad_to: int, is_decode: bool) -> int:
        """The bucket a step is planned at in the mixed layout (0: not bucketed). Alone, a step with a prefill
        (or a decode no decode graph holds) takes the smallest bucket that holds it. Under lockstep (pad_to: the
        size every rank agreed on, from padded_size) it must run exactly pad_to tokens: a bucket of that size,
        unless a decode graph of that size runs a pure decode step; otherwise it stays eager."""
        if self.mixed is None or num_tokens == 0:
            return 0
        if pad_to <= 0:
            if is_decode and (self.graphs is None or self.graphs.bucket(num_tokens) is not None):
                return 0
            size = self.mixed.bucket(num_tokens) or 0
        else:
            size = max(pad_to, num_tokens)
            if size not in self.mixed.sizes or (is_decode and self.graphs is not None
                                                and self.graphs.bucket(size) == size):
                return 0
        return size if size and num_seqs <= self.mixed.rows(size) else 0

    def rows_run(self, plan: StepPlan) -> int:
        """Token rows the forward really runs: the CUDA graph's bucket when one is replayed."""
        bucket = self.graphs.bucket(plan.num_tokens) if self.graphs is not None else None
        return bucket if bucket is not None and (plan.kind == DUMMY or plan.is_decode) else plan.num_tokens

    def _send(self, plan: StepPlan) -> None:
        if self.plan_group is not None:
            broadcast_plan(plan, self.plan_group, self.plan_src)

    @torch.inference_mode()
    def run(self, plan: StepPlan, extra_rows: list[int] | None = None,
            prev_token_ids: torch.Tensor | None = None) -> Any:
        if plan.kind == DUMMY:
            self._run_dummy(plan.num_tokens)
            return None
        prepared = self.prepare(plan)
        fb = prepared.forward_batch
        input_ids = prepared.input_ids
        if plan.num_prev_tokens:  # placeholders: the previous step's tokens go in on the device
            if self.plan_group is not None:  # TP: only TP rank 0 sampled them
                if prev_token_ids is None:
                    prev_token_ids = torch.empty(plan.num_prev_tokens, dtype=torch.int64, device=self.device)
                dist.broadcast(prev_token_ids, self.plan_src, group=self.tp_group)
            assert prev_token_ids is not None
            input_ids = fill_placeholders(input_ids, prev_token_ids, plan.i64[: plan.num_tokens])
        num_padded = input_ids.shape[0]
        if fb.prefill_tiles is not None and self.mixed is not None and self.mixed.captured:
            hidden = self.mixed.replay(input_ids, prepared.positions, fb)
        elif self.graphs is not None and fb.is_decode and self.graphs.bucket(num_padded) is not None:
            hidden = self.graphs.replay(input_ids, prepared.positions, fb)
        else:
            hidden = self.model(input_ids, prepared.positions, fb)
        if self._rerun(self.rows_run(plan)):
            with self.dispatcher.exact():  # type: ignore[union-attr]
                hidden = self.model(input_ids, prepared.positions, fb)
        num_sampled = len(prepared.sample_rows)
        if num_sampled and prepared.sample_rows[-1] == num_sampled - 1:  # rows 0..k-1: a decode step, no gather
            logits = self.model.compute_logits(hidden[:num_sampled])
        elif num_sampled:
            rows = device_tensor(prepared.sample_rows, torch.int64, self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        else:  # a prefill chunk with nothing to sample: no logits, no gather
            logits = torch.empty(0, 0, device=self.device)
        if extra_rows:
            return logits, hidden.index_select(0, device_tensor(extra_rows, torch.int64, self.device))
        return logits

    @torch.inference_mode()
    def warmup(self, token_counts: list[int]) -> None:
        """One eager prefill-shaped step per size, writing no KV: compiles every kernel variant these sizes
        reach before the first request, so none compiles on the serving path. Under EP every rank runs the
        same sizes in the same order, so the collectives inside match; the experts there see the rows the all2all
        delivers instead, which warmup_local_experts covers next."""
        for n in token_counts:
            i32 = dict(dtype=torch.int32, device=self.device)
            fb = ForwardBatch(
                slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=self.device),
                cu_seqlens_q=torch.tensor([0, n], **i32),
                seq_lens=torch.tensor([n], **i32),
                block_tables=torch.zeros(1, -(-n // self.block_size), **i32),  # reads block 0 only
                max_seqlen_q=n,
                max_seqlen_k=n,
                is_decode=False,
                kv_caches=self.kv_caches,
                attn_backend=self.attn_backend,
            )
            # wrapped into the RoPE table (max_num_batched_tokens may exceed the model's positions: the demo model's
            # 2048 against 8192 by default; a position past it reads past cos_sin). The attention masks by the
            # lengths, so the values of the positions change no kernel variant
            max_positions = getattr(getattr(self.model, "spec", None), "max_positions", 0) or n
            positions = torch.arange(n, dtype=torch.int64, device=self.device) % max_positions
            hidden = self.model(torch.zeros_like(positions), positions, fb)
            self.model.compute_logits(hidden[-1:])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def eager_decode_rows(self, max_rows: int) -> range:
        """Row counts of the decode steps up to max_rows that can run eagerly: past the largest decode graph (all
        of them without graphs), and every one with a fixed-capacity all2all, whose overflow re-runs a graph-sized
        step eagerly at its own table width (_rerun)."""
        largest = self.graphs.sizes[-1] if self.graphs is not None else 0
        return range(1 if self.dispatcher is not None else largest + 1, max_rows + 1)

    @torch.inference_mode()
    def warmup_eager_decode(self, rows: range) -> int:
        """After warmup(): eager decode steps of `rows` sequences (those no decode graph holds: past the largest, or
        all of them without graphs; under lockstep a decode step padded to another rank's size; a graph-sized step
        re-run eagerly after an all2all overflow, _rerun), one per compiled attention variant they can reach at any
        context (kernels/attention/decode_plan.py decode_variants). Their rows are padding (length 0, no KV write): only
        the launches' shapes matter. Every rank (EP and TP peers) runs the same list in the same order, so the
        collectives inside pair up. Returns the steps run."""
        if not rows:
            return 0
        spec = self.model.kv_cache_spec()
        attn = self.model.model.layers[0].self_attn  # the model's own switch (layers.py Attention.forward)
        fused = FUSED_DECODE_MAX_ROWS if getattr(attn, "fuse_decode_prologue", False) else 0
        shapes = sorted(decode_variants(rows, self.max_blocks_per_seq, self.block_size, self.model.num_heads,
                                        spec.num_kv_heads, spec.head_dim, self.kv_cache.dtype, self.device,
                                        fused).values())
        i32 = dict(dtype=torch.int32, device=self.device)
        for n, width in shapes:
            fb = ForwardBatch(
                slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=self.device),
                cu_seqlens_q=torch.arange(n + 1, **i32),
                seq_lens=torch.zeros(n, **i32),
                block_tables=torch.zeros(n, width, **i32),
                max_seqlen_q=1,
                max_seqlen_k=0,
                is_decode=True,
                kv_caches=self.kv_caches,
                attn_backend=self.attn_backend,
            )
            positions = torch.zeros(n, dtype=torch.int64, device=self.device)
            self.model(torch.zeros_like(positions), positions, fb)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return len(shapes)

    @torch.inference_mode()
    def warmup_local_experts(self, max_num_tokens: int, reserve_bytes: int | None = None) -> list[int]:
        """After warmup(), under expert parallelism: this rank's experts alone, at every received-row count a step
        of up to max_num_tokens tokens can deliver (runtime/engine/expert_warmup.py), within reserve_bytes. No
        collective: each rank runs it on its own. Returns the row counts run; [] without EP."""
        counts = warm_local_experts(self.model, max_num_tokens, reserve_bytes)
        if self.device.type == "cuda" and counts:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the largest count's workspace is not the KV cache's: give it back
        return counts

    def _rerun(self, num_tokens: int) -> bool:
        """After a forward, before anything is sampled: did its all2all overflow a fixed capacity on any EP
        rank? Then every rank runs the step again, eagerly and exactly (the KV writes repeat the same values)."""
        return self.dispatcher is not None and self.dispatcher.overflowed(num_tokens)

    def _run_dummy(self, num_tokens: int) -> None:
        # the agreed size is already a graph bucket when one covers it (padded_size); eager otherwise
        bucket = self.graphs.bucket(num_tokens) if self.graphs is not None else None
        if bucket is not None:
            self.graphs.replay_dummy(num_tokens)
        else:
            self.dummy_forward(num_tokens)
        if self._rerun(bucket or num_tokens):  # another rank's exchange overflowed: join its re-run
            with self.dispatcher.exact():  # type: ignore[union-attr]
                self.dummy_forward(num_tokens)
