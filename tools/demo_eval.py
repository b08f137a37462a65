"""Scores a saved demo checkpoint the ordinary way (transformers from the folder): held-out NLL, bits per byte,
expert load per layer, and greedy answers to fixed questions. Used for the new model and the one it replaces."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

WINDOW = 256  # tokens per scored window, as tests/test_demo_model.py
QUESTIONS = [
    "What does json.dumps do?",
    "What does the len function return?",
    "What does os.path.join do?",
    "What is the purpose of collections.Counter?",
    "How do I use re.compile?",
    "What does torch.nn.Linear do?",
    "What does numpy.concatenate do?",
    "What does subprocess.run do?",
    "What is itertools.chain used for?",
    "What does str.join do?",
]
PLAIN_PROMPTS = ["json.dumps\n\n", "Return the number of"]


def load(model_dir: str, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, tokenizer


@torch.no_grad()
def score_text(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, device: str, max_tokens: int = 0
) -> dict:
    """NLL of every token after the first, in windows of WINDOW+1 tokens overlapping by one; and router load."""
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    if max_tokens:
        ids = ids[:max_tokens]
    num_layers, num_experts = model.config.num_hidden_layers, model.config.num_experts
    top_k = model.config.num_experts_per_tok
    counts = torch.zeros(num_layers, num_experts, dtype=torch.long)
    total_nll = 0.0
    num_predicted = 0
    chunks = [ids[s : s + WINDOW + 1] for s in range(0, len(ids) - 1, WINDOW)]
    full = [c for c in chunks if len(c) == WINDOW + 1]
    batches = [torch.stack(full[i : i + 64]) for i in range(0, len(full), 64)]
    batches += [c.unsqueeze(0) for c in chunks if 1 < len(c) <= WINDOW]  # the shorter tail
    for windows in batches:
        windows = windows.to(device)
        out = model(input_ids=windows[:, :-1], output_router_logits=True)
        logits = out.logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                                reduction="sum")  # fmt: skip
        total_nll += nll.item()
        num_predicted += windows[:, 1:].numel()
        for layer, router_logits in enumerate(out.router_logits):
            chosen = router_logits.float().topk(top_k, dim=-1).indices  # [num_tokens, top_k]
            counts[layer] += torch.bincount(chosen.flatten().cpu(), minlength=num_experts)
    text_bytes = len(tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8"))
    shares = (counts.double() / counts.sum(dim=1, keepdim=True)).tolist()
    return {
        "tokens": int(len(ids)),
        "bytes": text_bytes,
        "nll_per_token": total_nll / num_predicted,
        "ppl": math.exp(total_nll / num_predicted),
        "bits_per_byte": total_nll / math.log(2) / text_bytes,
        "expert_shares": shares,
        "min_expert_share": min(min(row) for row in shares),
    }


def unigram_score(counts: torch.Tensor, tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int = 0) -> dict:
    """Add-one smoothed training-split unigram, scored on the same tokens as the model."""
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    if max_tokens:
        ids = ids[:max_tokens]
    logp = torch.log((counts.double() + 1.0) / (counts.double() + 1.0).sum())
    nll = -logp[ids[1:]].sum().item()
    text_bytes = len(tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8"))
    return {
        "nll_per_token": nll / (len(ids) - 1),
        "ppl": math.exp(nll / (len(ids) - 1)),
        "bits_per_byte": nll / math.log(2) / text_bytes,
    }


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str, max_new_tokens: int = 64
) -> list[dict]:
    samples = []
    prompts = [("chat", q) for q in QUESTIONS] + [("plain", p) for p in PLAIN_PROMPTS]
    for kind, prompt in prompts:
        text = prompt
        if kind == "chat":
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        samples.append({"kind": kind, "prompt": prompt, "completion": completion,
                        "words": len(completion.split())})  # fmt: skip
    return samples
