"""Turns the last position's logits of each sequence into its next token.

Order: logit_bias / allowed_token_ids / bad_words -> penalties -> min_tokens mask -> grammar mask ->
greedy, or temperature -> top-k -> top-p -> min-p -> sample.
Logprobs are those of the raw model distribution (before penalties and temperature), as in vLLM.
A seeded request draws its noise for output token i from a generator seeded by (seed, i), so its
tokens do not depend on the batch it runs in, and it resumes its stream after a restart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from runtime.engine.sequence import Sequence
from runtime.structured_output import apply_bitmask

Logprobs = list[tuple[int, float]]  # the sampled token first, then the top-N


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without a sync: torch.tensor(values, device=cuda) copies from pageable
    memory and then waits for the whole stream, which would make the host wait for the step in flight."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class SampledTokens:
    """One step's sampled tokens and their logprobs, on the device until to_host(): nothing here syncs, so
    the next step can be queued before they are read (async scheduling)."""

    token_ids: torch.Tensor  # [num_seqs] int64
    logprob_rows: list[int]  # rows that asked for logprobs
    top_n: list[int]  # how many top entries each of them wants
    chosen_logprobs: torch.Tensor | None = None  # [len(logprob_rows)] fp32
    top_ids: torch.Tensor | None = None  # [len(logprob_rows), max(top_n)] int64
    top_logprobs: torch.Tensor | None = None  # [len(logprob_rows), max(top_n)] fp32
    copied: torch.cuda.Event | None = None  # recorded after the non-blocking copies to pinned host memory

    def to_host(self) -> SampledTokens:
        """Starts the copies to pinned host memory; lists() waits for them."""
        if self.token_ids.device.type != "cuda":
            return self

        def pinned(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # torch's caching host allocator
            return host.copy_(t, non_blocking=True)

        host = SampledTokens(pinned(self.token_ids), self.logprob_rows, self.top_n,  # type: ignore[arg-type]
                             pinned(self.chosen_logprobs), pinned(self.top_ids), pinned(self.top_logprobs),
                             torch.cuda.Event())
        host.copied.record()  # type: ignore[union-attr]
        return host

    def lists(self) -> tuple[list[int], list[Logprobs | None]]:
        if self.copied is not None:
            self.copied.synchronize()
        tokens = self.token_ids.tolist()
        logprobs: list[Logprobs | None] = [None] * len(tokens)
        if self.logprob_rows:
            assert self.chosen_logprobs is not None
            chosen = self.chosen_logprobs.tolist()
            top_ids = self.top_ids.tolist() if self.top_ids is not None else None
            top_lps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
            for j, (row, n) in enumerate(zip(self.logprob_rows, self.top_n)):
                entry = [(tokens[row], chosen[j])]
                if n > 0 and top_ids is not None and top_lps is not None:
                    entry += list(zip(top_ids[j][:n], top_lps[j][:n]))
                logprobs[row] = entry
        return tokens, logprobs


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        eos_token_ids: set[int],
        grammar_mask: tuple[list[int], torch.Tensor] | None = None,
    ) -> tuple[list[int], list[Logprobs | None]]:
        return self.sample(logits, seqs, eos_token_ids, grammar_mask).lists()

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        eos_token_ids: set[int],
        grammar_mask: tuple[list[int], torch.Tensor] | None = None,
    ) -> SampledTokens:
        # logits: [num_seqs, vocab] fp32; grammar_mask: (rows, int32 bitmask [len(rows), ceil(vocab/32)])
        raw_logprobs = None
        logprob_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if logprob_rows:
            raw_logprobs = logits.log_softmax(dim=-1)

        logits = self._apply_token_rules(logits, seqs)
        logits = self._apply_penalties(logits, seqs)
        constrained = set(grammar_mask[0]) if grammar_mask is not None else set()
        logits = self._mask_early_stop(logits, seqs, eos_token_ids, constrained)
        if grammar_mask is not None:
            logits = apply_bitmask(logits, *grammar_mask)

        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample(logits, seqs, greedy)

        top_n = [seqs[i].params.logprobs or 0 for i in logprob_rows]
        out = SampledTokens(token_ids, logprob_rows, top_n)
        if raw_logprobs is not None:
            rows = device_tensor(logprob_rows, torch.int64, logits.device)
            picked = raw_logprobs.index_select(0, rows)  # [len(rows), vocab]
            out.chosen_logprobs = picked.gather(1, token_ids.index_select(0, rows)[:, None])[:, 0]
            if max(top_n) > 0:
                out.top_logprobs, out.top_ids = picked.topk(max(top_n), dim=-1)
        return out

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [
            i
            for i, s in enumerate(seqs)
            if s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
        ]
        if not rows:
            return logits
        logits = logits.clone()
        dev = logits.device
        for i in rows:
            p = seqs[i].params
            row = logits[i]
            # ids and counts on the host: unique() and bincount() on the device would wait for the stream
            if p.repetition_penalty != 1.0:
                seen = device_tensor(sorted(set(seqs[i].token_ids)), torch.int64, dev)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            counts = Counter(seqs[i].output_token_ids)
            if counts and (p.presence_penalty or p.frequency_penalty):
                ids = device_tensor(list(counts), torch.int64, dev)
                num = device_tensor(list(counts.values()), row.dtype, dev)
                row[ids] -= p.frequency_penalty * num + p.presence_penalty
        return logits

    def _apply_token_rules(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """vLLM's logit_bias, allowed_token_ids and bad_words (the last token of a banned sequence whose
        other tokens were just generated is masked)."""
        rows = [
            i
            for i, s in enumerate(seqs)
            if s.params.logit_bias or s.params.allowed_token_ids or s.params.bad_words_token_ids
        ]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in rows:
            p = seqs[i].params
            if p.logit_bias:
                ids = [t for t in p.logit_bias if 0 <= t < vocab]
                bias = device_tensor([p.logit_bias[t] for t in ids], logits.dtype, logits.device)
                logits[i, device_tensor(ids, torch.int64, logits.device)] += bias
            if p.allowed_token_ids:
                keep = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                # index_fill_ with a Python scalar: an assignment would copy a CPU scalar tensor over (a sync)
                keep.index_fill_(0, device_tensor([t for t in p.allowed_token_ids if 0 <= t < vocab], torch.int64,
                                                  keep.device), True)
                logits[i] = logits[i].masked_fill(~keep, float("-inf"))
            if p.bad_words_token_ids:
                out = seqs[i].output_token_ids
                banned = [w[-1] for w in p.bad_words_token_ids if len(w) == 1 or out[-(len(w) - 1) :] == w[:-1]]
                if banned:
                    logits[i].index_fill_(0, device_tensor(banned, torch.int64, logits.device), float("-inf"))
        return logits

    def _mask_early_stop(
        self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int], constrained: set[int]
    ) -> torch.Tensor:
        masked = False
        for i, s in enumerate(seqs):
            # a grammar decides when its request may end (EOS only where the grammar accepts)
            if s.num_total_generated >= s.params.min_tokens or i in constrained:
                continue
            stop_ids = set(s.params.stop_token_ids or [])
            if not s.params.ignore_eos:
                stop_ids |= eos_token_ids
            if stop_ids:
                if not masked:
                    logits, masked = logits.clone(), True
                logits[i].index_fill_(0, device_tensor(sorted(stop_ids), torch.int64, logits.device), float("-inf"))
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        params = [s.params for s in seqs]
        dev = logits.device
        temperature = device_tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32, dev)
        logits = logits / temperature[:, None]

        top_k = [p.top_k for p in params]
        if any(k > 0 for k in top_k):
            vocab = logits.shape[1]
            k = device_tensor([min(k, vocab) if k > 0 else vocab for k in top_k], torch.int64, dev)
            kth = logits.sort(dim=-1, descending=True)[0].gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            top_p = device_tensor([p.top_p for p in params], torch.float32, dev)
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the mass before it already reaches top_p (the top token always stays)
            drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = device_tensor([p.min_p for p in params], torch.float32, dev)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True)[0], 0.0)

        # Gumbel-style race: argmax(p / E) with E ~ Exp(1) samples from p.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, (seq, p) in enumerate(zip(seqs, params)):
            if p.seed is not None:
                self._seeded.manual_seed((p.seed * 1_000_003 + seq.num_total_generated) % (2**63))
                noise[i].exponential_(generator=self._seeded)
        sampled = (probs / noise).argmax(dim=-1)
        greedy_mask = device_tensor(greedy, torch.bool, dev)
        return torch.where(greedy_mask, logits.argmax(dim=-1), sampled)
