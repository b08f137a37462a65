"""prompt_logprobs from the engine's prefill (chunked, batched with other requests) against transformers'
log-softmax over the same prompt."""

from __future__ import annotations

import pytest
import torch

from runtime.sampling_params import SamplingParams
from tests.tiny import make_tiny_checkpoint


def test_prompt_logprobs_match_transformers(tmp_path: pytest.TempPathFactory) -> None:
    import transformers

    from runtime.llm import LLM

    path = make_tiny_checkpoint(str(tmp_path), "Qwen3ForCausalLM")
    torch.manual_seed(0)
    prompts = [torch.randint(4, 500, (n,)).tolist() for n in (45, 7, 1)]
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        want = [hf(torch.tensor([p])).logits[0].float().log_softmax(-1) for p in prompts]
    # 16-token chunks: the 45-token prompt is scored over three steps
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_memory=8 << 20, max_num_batched_tokens=16)
    params = [SamplingParams(max_tokens=2, prompt_logprobs=3), SamplingParams(max_tokens=2, prompt_logprobs=0),
              SamplingParams(max_tokens=2, prompt_logprobs=1)]
    # the same prompt again without prompt_logprobs would hit the prefix cache; with them it must not
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, lp, out, sp in zip(prompts, want, outs, params):
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(p) and got[0] is None
        for j in range(1, len(p)):
            entry = got[j]
            assert abs(entry[p[j]] - lp[j - 1, p[j]].item()) < 1e-4
            top = lp[j - 1].topk(sp.prompt_logprobs or 1)
            for tid in top.indices.tolist()[: sp.prompt_logprobs]:
                assert tid in entry
    again = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert again.num_cached_tokens == 0 and len(again.prompt_logprobs) == len(prompts[0])


def test_prompt_top_n_does_not_depend_on_the_batch() -> None:
    """Logits with many ties (bf16 upcast): a request's top-N ids are those of topk(N), whatever else shares its
    scoring chunk (a larger N beside it must not reorder its ties)."""
    from runtime.engine.prompt_logprobs import record_prompt_logprobs
    from runtime.engine.sequence import Sequence

    class Identity:  # the hidden rows are the logits
        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden

    vocab = 64
    logits = (torch.arange(vocab) // 8).float().repeat(4, 1)  # 8 ids per value: ties everywhere

    def score(with_other: bool) -> list:
        a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams(prompt_logprobs=2), 0.0)
        plan = [(a, 0, 4)]
        hidden = logits
        if with_other:
            plan.append((Sequence("b", [9, 8, 7, 6, 5], SamplingParams(prompt_logprobs=20), 0.0), 0, 4))
            hidden = torch.cat([logits, logits])
        record_prompt_logprobs(Identity(), hidden, plan)
        return a.prompt_logprobs

    alone = score(False)
    assert [len(e) for e in alone] == [3] * 4
    assert score(True) == alone
