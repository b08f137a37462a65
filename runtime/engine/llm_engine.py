"""One engine rank: requests in, token deltas out. Scheduler + paged KV + model runner + sampler.

A free-running rank calls step(). Under expert-parallel lockstep the coordinator splits it:
schedule() plans the next batch and reports its size, execute(pad_to) runs it padded to the size
every rank agreed on, or a dummy step of that size when this rank has nothing to do.
With async scheduling (the default) execute() returns the previous step's outputs, read once this step is queued on the
device (runtime/engine/async_step.py); drain() reads a pending step that no step follows.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from kernels import use_persistent_cache
from kernels.moe_plan import warmup_token_counts
from runtime.config import DTYPES, ConfigError, EngineConfig
from runtime.engine.async_step import PendingStep, needs_host_tokens, placeholder
from runtime.engine.attention_backend import ATTENTION_BACKENDS
from runtime.engine.block_manager import BlockManager
from runtime.engine.expert_warmup import ep_experts_bytes, model_config_edges, step_experts_bytes
from runtime.engine.kv_cache import kv_cache_dtype, read_kv_scales
from runtime.engine.model_runner import ModelRunner, kv_bytes_per_block
from runtime.engine.prompt_logprobs import prompt_rows, record_prompt_logprobs, wants_prompt_logprobs
from runtime.engine.sampler import Sampler
from runtime.engine.scheduler import ScheduledBatch, Scheduler
from runtime.engine.sequence import Sequence, Status
from runtime.messages import AddRequest, RankStats, TokenDelta
from runtime.structured_output import StructuredOutputs

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30


class RequestError(ValueError):
    """A request the engine cannot take (too long, duplicate id); the message says why."""


def resolve_dtype(config: EngineConfig, hf_config: Any, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and rarely worth it
    dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype) if dtype in DTYPES else None
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


class LLMEngine:
    def __init__(self, config: EngineConfig, parallel: Any = None, dispatcher: Any = None) -> None:
        from transformers import AutoConfig

        from models.args import ModelArgs, TensorParallel
        from models.loader import load_model

        self.config = config
        self.parallel = parallel
        self.rank = parallel.dp_rank if parallel is not None else 0  # a DP rank: its TP ranks are one engine
        tp_size = parallel.tp_size if parallel is not None else 1
        self.device = parallel.device if parallel is not None else config.resolved_device()
        self.hf_config = AutoConfig.from_pretrained(config.model)
        self.dtype = resolve_dtype(config, self.hf_config, self.device)
        # checked against max_position_embeddings and rope scaling when the config was built
        self.max_model_len = config.resolved_max_model_len()
        self.use_triton = config.use_triton(self.device)
        if self.use_triton and self.device.type == "cuda":
            use_persistent_cache(torch.cuda.get_device_name(self.device))  # before the first compile
        torch.manual_seed(config.seed)

        args = ModelArgs(
            dtype=self.dtype,
            device=self.device,
            use_triton=self.use_triton,
            quantization=config.quantization,
            ep_rank=parallel.ep_rank if parallel is not None else 0,
            ep_size=parallel.ep_size if parallel is not None else 1,
            dispatcher=dispatcher,
            seed=config.seed,  # dummy weights
            tp=TensorParallel(parallel.tp_rank, tp_size, parallel.tp_group) if tp_size > 1 else TensorParallel(),
        )
        t0 = time.perf_counter()
        self.model = load_model(config.model, self.hf_config, args, config.load_format)
        logger.info("rank %d: model loaded in %.1f s", self.rank, time.perf_counter() - t0)

        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        graph_max = config.cuda_graph_max_batch(self.device)
        # an FP8 cache dequantizes with the checkpoint's per-layer scales (1.0 where it has none)
        kv_scales = read_kv_scales(config.model, self.model.num_layers) if self.kv_dtype != self.dtype else None
        self.runner = ModelRunner(
            self.model,
            self.device,
            self.kv_dtype,
            num_blocks,
            config.block_size,
            self.max_model_len,
            ATTENTION_BACKENDS["triton" if self.use_triton else "torch"](kv_scales),
            cuda_graph_max_batch=graph_max,
            plan_group=parallel.tp_cpu_group if tp_size > 1 else None,
            plan_src=parallel.tp_src if tp_size > 1 else 0,
            mixed_graph_tokens=config.mixed_cudagraph_tokens(self.device),
            max_num_seqs=config.max_num_seqs,
            tp_group=parallel.tp_group if tp_size > 1 else None,
            dummy_steps=config.needs_lockstep,
        )
        if self.use_triton and self.device.type == "cuda":
            t0 = time.perf_counter()
            top_k = getattr(self.hf_config, "num_experts_per_tok", None) or 1
            sizes = warmup_token_counts(config.max_num_batched_tokens, top_k, model_config_edges(self.runner.model))
            self.runner.warmup(sizes)
            # under EP the experts see the rows the all2all delivers, not the step's: each rank warms them alone
            self.runner.warmup_local_experts(config.max_num_batched_tokens, self._activation_reserve())
            # the decode steps that run eagerly (ModelRunner.eager_decode_rows), up to max_rows: under lockstep a
            # decode step is padded to the size the ranks agreed on, up to another rank's largest prefill
            max_rows = config.max_num_batched_tokens if config.needs_lockstep else config.max_num_seqs
            eager = self.runner.warmup_eager_decode(self.runner.eager_decode_rows(max_rows))
            logger.info("rank %d: kernels warmed up for %d step sizes and %d eager decode variants in %.1f s "
                        "(cache %s)", self.rank, len(sizes), eager, time.perf_counter() - t0,
                        os.environ.get("TRITON_CACHE_DIR"))
        self.sampler = Sampler(self.device, config.seed + self.rank)  # used on TP rank 0 only
        self.eos_token_ids = set(config.model_info().eos_token_ids)
        self.structured = StructuredOutputs(config.tokenizer_path, self.hf_config.vocab_size, self.eos_token_ids,
                                            pin_memory=self.device.type == "cuda")
        if parallel is None or parallel.tp_rank == 0:  # a TP peer runs its TP rank 0's plans: it never samples
            self.structured.warm_up()
        self.requests: dict[str, Sequence] = {}
        self._planned: ScheduledBatch | None = None
        # --async-scheduling (runtime/engine/async_step.py): on by default, where the config allows it
        self.async_scheduling = config.use_async_scheduling
        if config.async_scheduling is None and (reason := config.sync_scheduling_reason()) is not None:
            logger.info("rank %d: async scheduling is off with %s: steps run synchronously", self.rank, reason)
        self._pending: PendingStep | None = None  # the step in flight whose tokens are not read yet
        self._host_token_requests: set[str] = set()  # ids of the requests whose steps run synchronously
        self.num_overlapped_steps = 0  # steps queued while the previous one's tokens were still unread
        self.num_steps = 0
        self.num_dummy_steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        logger.info(
            "rank %d: %d KV blocks of %d tokens (%.2f GiB, %s), max_model_len %d: %.2f sequences of that "
            "length fit, kernels %s, cuda graphs %s",
            self.rank, num_blocks, config.block_size,
            num_blocks * kv_bytes_per_block(self.model, config.block_size, self.kv_dtype) / 2**30,
            str(self.kv_dtype).removeprefix("torch."), self.max_model_len,
            num_blocks / -(-self.max_model_len // config.block_size),
            "triton" if self.use_triton else "torch", "on" if graph_max else "off",
        )  # fmt: skip

    def _num_kv_blocks(self) -> int:
        config = self.config
        per_block = kv_bytes_per_block(self.model, config.block_size, self.kv_dtype)
        max_useful = config.max_num_seqs * -(-self.max_model_len // config.block_size) + 1
        if config.num_gpu_blocks_override is not None:
            return config.num_gpu_blocks_override
        if config.kv_cache_memory is not None:
            budget = config.kv_cache_memory
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # activations of the largest step are not yet allocated: keep room for them
            activation_reserve = self._activation_reserve() + self._fp8_scratch_bytes()
            budget = int(free - total * (1 - config.gpu_memory_utilization)) - activation_reserve
        else:
            budget = min(CPU_DEFAULT_KV_BYTES, max_useful * per_block)
        num_blocks = min(budget // per_block, max_useful)
        if self.parallel is not None and self.parallel.tp_size > 1:
            # TP rank 0's block tables index every peer's cache: all TP ranks take the smallest count
            import torch.distributed as dist

            agreed = torch.tensor([num_blocks], dtype=torch.int64)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.parallel.tp_cpu_group)
            num_blocks = int(agreed.item())
        min_blocks = -(-self.max_model_len // config.block_size)
        if num_blocks < min_blocks:
            raise ConfigError(
                f"KV cache of {budget / 2**30:.2f} GiB holds {num_blocks} blocks, fewer than one sequence of "
                f"max_model_len {self.max_model_len} needs ({min_blocks}): lower --max-model-len, give more "
                "memory (--gpu-memory-utilization / --kv-cache-memory)"
                + (" or use --kv-cache-dtype fp8" if self.kv_dtype == self.dtype else "")
            )
        return int(num_blocks)

    def _activation_reserve(self) -> int:
        # the largest step's activations, not yet allocated when the KV cache is sized: room kept for them; under
        # EP the local experts' received rows and workspace on top (up to ep x the step's rows; the local experts'
        # warmup stays inside the total: ModelRunner.warmup_local_experts)
        # (64 bytes x hidden a token covers them all, but not the MoE workspace of a tuned table's permuted path at
        # every size: Qwen3-30B-A3B on the H200 tables at 2048 tokens 326 MB against 268; there the workspace plus
        # the tensors live beside it, the layer's input, residual and output: 16 bytes x hidden a token)
        tokens, hidden = self.config.max_num_batched_tokens, self.hf_config.hidden_size
        experts = step_experts_bytes(self.model, tokens) + 16 * hidden * tokens
        return max(tokens * hidden * 64, experts) + ep_experts_bytes(self.model, tokens)

    def _fp8_scratch_bytes(self) -> int:
        # an FP8 cache's extend widens its pages into a 16-bit scratch allocated on the first long step, outside the
        # cache (kernels/attention/fp8_scratch.py): its largest size, for a step of max_num_seqs rows + a padding row
        if not self.use_triton or self.kv_dtype == self.dtype:
            return 0
        from kernels.attention.fp8_scratch import scratch_reserve_bytes

        spec, block_size = self.model.kv_cache_spec(), self.config.block_size
        max_pages = (self.config.max_num_seqs + 1) * -(-self.max_model_len // block_size)
        return scratch_reserve_bytes(block_size, spec.num_kv_heads, spec.head_dim, self.dtype, max_pages, self.device)

    # ---- requests ----
    def add_request(self, req: AddRequest) -> None:
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already in use")
        num_prompt = len(req.prompt_token_ids)
        if num_prompt == 0:
            raise RequestError("the prompt is empty: give at least one token")
        if num_prompt >= self.max_model_len:
            raise RequestError(
                f"the prompt has {num_prompt} tokens, but this model's context is {self.max_model_len} tokens "
                "(prompt + output): shorten the prompt"
            )
        vocab = self.hf_config.vocab_size
        if max(req.prompt_token_ids) >= vocab or min(req.prompt_token_ids) < 0:
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        seq = Sequence(req.request_id, req.prompt_token_ids, req.params, req.arrival_time, req.num_generated_before)
        if req.params.grammar is not None:
            resumed = req.num_generated_before
            generated = req.prompt_token_ids[num_prompt - resumed :] if resumed else []
            self.structured.add(req.request_id, req.params.grammar, generated, req.params.grammar_after)
        if req.params.prompt_logprobs is not None:
            seq.prompt_logprobs = []  # sent (filled) with the first output token, also for a 1-token prompt
        self.requests[req.request_id] = seq
        if needs_host_tokens(req.params):
            self._host_token_requests.add(req.request_id)
        self.scheduler.add(seq)

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            seq = self.requests.pop(rid, None)
            if seq is not None and not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self.structured.release(rid)
            self._host_token_requests.discard(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._pending is not None

    @property
    def step_pending(self) -> bool:
        """A step's tokens are still unread: execute() must run even with nothing new planned."""
        return self._pending is not None

    # ---- stepping ----
    def schedule(self) -> int:
        self._planned = self.scheduler.schedule() if self.scheduler.has_unfinished() else None
        if self._planned is not None and not self._planned.seqs:
            self._planned = None
        return self._planned.num_tokens if self._planned is not None else 0

    @property
    def planned(self) -> ScheduledBatch | None:
        """The batch schedule() planned and execute() will run (None: nothing planned)."""
        return self._planned

    def execute(self, pad_to: int | None = None, on_launched: Any = None) -> list[TokenDelta]:
        """on_launched(): called once the step is queued on the device, before its tokens are read (the rank
        loop tells the coordinator its next plan then, while the device works). With async scheduling the
        outputs are those of the previous step, whose tokens are read once this one is queued."""
        batch, self._planned = self._planned, None
        pending, self._pending = self._pending, None
        if batch is None and pending is not None and pad_to is None:
            return self._collect(pending)  # nothing new to run: only the pending step's tokens
        self.num_steps += 1
        outputs: list[TokenDelta] = []
        if batch is not None and any(s.is_finished for s in batch.seqs):
            # aborted between schedule() and execute(): drop them; padding keeps the agreed size
            kept = [(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens) if not s.is_finished]
            batch = ScheduledBatch([s for s, _ in kept], [n for _, n in kept]) if kept else None
            pad_to = pad_to or sum(n for _, n in kept)
        if batch is None:
            self.num_dummy_steps += 1
            self.runner.execute_dummy(pad_to or 1)
            if on_launched is not None:
                on_launched()
            return outputs + (self._collect(pending) if pending is not None else [])
        prev_token_ids = pending.token_ids if pending is not None else None
        rows, plan = prompt_rows(batch) if any(wants_prompt_logprobs(s) for s in batch.seqs) else ([], [])
        if rows:
            logits, hidden = self.runner.execute(batch, pad_to or 0, rows, prev_token_ids=prev_token_ids)
            record_prompt_logprobs(self.model, hidden, plan)
        else:
            logits = self.runner.execute(batch, pad_to or 0, prev_token_ids=prev_token_ids)
        if on_launched is not None:
            on_launched()
        if pending is not None:
            self.num_overlapped_steps += 1
            if self._needs_host_tokens(batch):
                # its sampling reads the host's view of the previous step's tokens: read them now, while the
                # forward runs (a sequence they end is sampled for nothing, and skipped below)
                outputs, pending = self._collect(pending), None
        step = self._sample(batch, logits)
        self._advance(batch, step)
        if pending is not None:
            outputs += self._collect(pending)
        if step is not None:
            if self.async_scheduling and self.scheduler.has_unfinished():
                self._pending = step  # read by the next execute(), once the step after it is queued
            else:
                # synchronous, or no step can follow this one (every sequence in it ends with it): nothing to
                # overlap the read with, and a caller that finds nothing more to schedule has no step left unread
                outputs += self._collect(step)
        return outputs

    def padded_size(self, num_tokens: int) -> int:
        return self.runner.padded_size(num_tokens)

    def step(self) -> list[TokenDelta]:
        if self.schedule() == 0:
            return self.drain()
        return self.execute()

    def drain(self) -> list[TokenDelta]:
        """The pending step's outputs, read now (async scheduling, when no step follows it yet)."""
        pending, self._pending = self._pending, None
        return self._collect(pending) if pending is not None else []

    def _needs_host_tokens(self, batch: ScheduledBatch) -> bool:
        ids = self._host_token_requests
        return bool(ids) and any(s.request_id in ids for s in batch.seqs)

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor) -> PendingStep | None:
        """Queues sampling for the sequences whose last token this step computes; nothing is read back."""
        to_sample = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == len(s)]
        if not to_sample:
            return None
        # grammar masks fill on the CPU while the forward may still run on the GPU; None when unconstrained
        mask = self.structured.bitmask([s.request_id for s in to_sample]) if self.structured.active else None
        sampled = self.sampler.sample(logits, to_sample, self.eos_token_ids, mask)
        return PendingStep(to_sample, sampled.token_ids, sampled.to_host())

    def _advance(self, batch: ScheduledBatch, step: PendingStep | None) -> None:
        """The host's view of a queued step: tokens computed, full blocks of real tokens into the prefix cache,
        and a placeholder for each token being sampled, so the next step can be planned now."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:
                continue  # ended by the previous step's tokens, read early (_needs_host_tokens); blocks freed
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.prompt_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            # the previous step's placeholder (async) is the last token: hash only the blocks before it
            self.block_manager.commit(seq, len(seq) - 1 if seq.token_ids[-1] < 0 else None)
        if step is None:
            return
        for row, seq in enumerate(step.seqs):
            pos = len(seq)
            step.positions.append(pos)
            if seq.is_finished:
                continue  # its token is discarded when read
            if self._ends_anyway(seq, pos + 1):
                self.scheduler.retire(seq)  # its blocks stay until its token is read
            else:
                seq.token_ids.append(placeholder(row))

    def _ends_anyway(self, seq: Sequence, length: int) -> bool:
        """Whether the token that makes seq `length` tokens long ends it, whatever token it is."""
        p = seq.params
        generated = seq.num_generated_before + length - seq.num_prompt_tokens
        return (p.max_tokens is not None and generated >= p.max_tokens) or length >= self.max_model_len

    def _collect(self, step: PendingStep) -> list[TokenDelta]:
        """Reads a step's sampled tokens (waiting for the device), puts them in place, emits the deltas."""
        token_ids, logprobs = step.sampled.lists()
        grammar_done = self.structured.accept_many(
            [(s.request_id, t) for s, t in zip(step.seqs, token_ids) if not s.is_finished]) \
            if self.structured.active else set()
        deltas = []
        for seq, pos, token_id, lp in zip(step.seqs, step.positions, token_ids, logprobs):
            if seq.is_finished:
                continue  # aborted, or ended by the step before, while this step ran: its token is discarded
            if pos < len(seq):
                seq.token_ids[pos] = token_id
            else:
                seq.token_ids.append(token_id)
            first = pos == seq.num_prompt_tokens
            prompt_lps = None
            if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                prompt_lps, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
            self.generation_tokens += 1
            reason = self._finish_reason(seq, token_id, pos + 1)
            if seq.request_id in grammar_done and reason is None:
                reason = "stop"  # the grammar is complete (it only ends by EOS when eos is not ignored)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self.requests.pop(seq.request_id, None)
                self.structured.release(seq.request_id)
                self._host_token_requests.discard(seq.request_id)
            elif seq.status == Status.RUNNING:  # (not preempted meanwhile) a block that ended in the placeholder
                self.block_manager.commit(seq, len(seq) - 1 if seq.token_ids[-1] < 0 else None)
            timings = seq.first_token_timings() if first else (None, None)
            deltas.append(
                TokenDelta(
                    request_id=seq.request_id,
                    new_token_ids=[token_id],
                    logprobs=[lp] if lp is not None else None,
                    finish_reason=reason,
                    stop_reason=seq.stop_reason,
                    num_prompt_tokens=seq.num_prompt_tokens if first else 0,
                    num_cached_tokens=seq.num_cached_tokens if first else 0,
                    prompt_logprobs=prompt_lps,
                    queue_time=timings[0],
                    prefill_time=timings[1],
                )
            )
        return deltas

    def _finish_reason(self, seq: Sequence, token_id: int, length: int) -> str | None:
        """length: the sequence's tokens up to and including token_id (a placeholder may follow it)."""
        p = seq.params
        generated = seq.num_generated_before + length - seq.num_prompt_tokens
        if generated >= p.min_tokens:
            if p.stop_token_ids and token_id in p.stop_token_ids:
                seq.stop_reason = token_id
                return "stop"
            if not p.ignore_eos and token_id in self.eos_token_ids:
                return "stop"
        if self._ends_anyway(seq, length):
            return "length"
        return None

    def stats(self) -> RankStats:
        return RankStats(
            rank=self.rank,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.block_manager.usage,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            num_steps=self.num_steps,
            num_dummy_steps=self.num_dummy_steps,
            prefix_cache_queries=self.block_manager.num_prefix_queries,
            prefix_cache_hits=self.block_manager.num_prefix_hits,
        )
