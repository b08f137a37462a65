"""The shipped demo model (models/demo): it learned something, routes over all experts, and the engine
reproduces transformers' greedy tokens on it."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# MOE_DEMO_DIR checks a freshly trained folder (tools/demo_gpu_train.sh's output) before it replaces models/demo
DEMO_DIR = os.environ.get("MOE_DEMO_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "demo"
)
MAX_FOLDER_MIB = 40  # the repo and a fresh clone stay light
WINDOW = 256  # the training sequence length; longer windows would test extrapolation, not learning


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def hf_model() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def heldout_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    with open(os.path.join(DEMO_DIR, "heldout.txt"), encoding="utf-8") as f:
        return torch.tensor(tokenizer(f.read())["input_ids"], dtype=torch.long)


def test_checkpoint_is_small_bf16_qwen3_moe() -> None:
    with open(os.path.join(DEMO_DIR, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert config["num_experts_per_tok"] == 2 and config["num_local_experts"] >= 8
    total = sum(os.path.getsize(os.path.join(DEMO_DIR, name)) for name in os.listdir(DEMO_DIR))
    assert total < MAX_FOLDER_MIB * 2**20, f"the demo folder is {total / 2**20:.1f} MiB; keep it under {MAX_FOLDER_MIB}"


def test_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    # the special tokens must be single ids, or the engine's stop check never fires
    assert len(tokenizer("<|im_end|>")["input_ids"]) == 1


@torch.no_grad()
def test_heldout_perplexity_beats_baselines(
    hf_model: PreTrainedModel, heldout_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase
) -> None:
    total_nll = 0.0
    num_predicted = 0
    for start in range(0, len(heldout_ids) - 1, WINDOW):
        window = heldout_ids[start : start + WINDOW + 1]
        logits = hf_model(input_ids=window[:-1].unsqueeze(0)).logits[0]
        total_nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        num_predicted += len(window) - 1
    model_ppl = math.exp(total_nll / num_predicted)

    # the unigram baseline uses the training split's counts (add-one), as tools/demo_train.py does
    with open(os.path.join(DEMO_DIR, "unigram_counts.json")) as f:
        counts = torch.tensor(json.load(f)["counts"], dtype=torch.float64) + 1.0
    targets = heldout_ids[1:]
    unigram_ppl = math.exp(-torch.log(counts / counts.sum())[targets].mean().item())
    uniform_ppl = float(len(tokenizer))

    print(f"held-out perplexity: model {model_ppl:.1f}  unigram {unigram_ppl:.1f}  uniform {uniform_ppl:.0f}")
    assert model_ppl < 0.5 * unigram_ppl < uniform_ppl


@torch.no_grad()
def test_router_spreads_over_all_experts(hf_model: PreTrainedModel, heldout_ids: torch.Tensor) -> None:
    num_experts = hf_model.config.num_experts
    top_k = hf_model.config.num_experts_per_tok
    counts = torch.zeros(hf_model.config.num_hidden_layers, num_experts, dtype=torch.long)
    for start in range(0, len(heldout_ids), WINDOW):
        window = heldout_ids[start : start + WINDOW].unsqueeze(0)
        router_logits = hf_model(input_ids=window, output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):
            chosen = logits.topk(top_k, dim=-1).indices  # [num_tokens, top_k]
            counts[layer] += torch.bincount(chosen.flatten(), minlength=num_experts)
    shares = counts.double() / counts.sum(dim=1, keepdim=True)
    for layer, row in enumerate(shares.tolist()):
        print(f"layer {layer} expert shares: " + " ".join(f"{s:.3f}" for s in row))
        assert min(row) >= 0.02, f"layer {layer}: an expert gets {min(row):.3%} of assignments"


PROMPTS_PLAIN = ["json.dumps\n\n", "Return the number of", "os.path.join\n\nJoin two"]
PROMPTS_CHAT = ["What does os.path.join do?", "What does collections.Counter.most_common do?"]


def test_engine_matches_transformers_greedy(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    from runtime import LLM, SamplingParams

    prompts = PROMPTS_PLAIN + [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in PROMPTS_CHAT
    ]
    max_tokens = 32
    expected: list[list[int]] = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            # one prompt at a time: no padding, so nothing but the model decides the tokens
            out = hf_model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
            expected.append(out[0, ids.shape[1] :].tolist())

    llm = LLM(model=DEMO_DIR, dtype="float32", device="cpu", kv_cache_memory=64 << 20)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    for prompt, want, output in zip(prompts, expected, outputs, strict=True):
        got = list(output.outputs[0].token_ids)
        assert got == want, f"prompt {prompt!r}: engine {got} != transformers {want}"
