"""Trains the built-in demo model (models/demo): a tiny Qwen3-MoE and its own byte-level BPE tokenizer.

The corpus is the docstrings of the Python standard library that runs this script, so it is on every
machine with Python and needs no network. Run: python -m models.demo_train --out models/demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from models.demo_corpus import (
    ENDOFTEXT,
    HELDOUT_MODULUS,
    IM_END,
    IM_START,
    SKIP_DIRS,
    build_texts,
    collect_docs,
    heldout_sample,
    is_heldout,
    plain_text,
)

SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

@dataclass(frozen=True)
class TrainArgs:
    out: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_experts: int
    moe_intermediate_size: int
    router_aux_loss_coef: float
    threads: int
    seed: int
    max_minutes: float


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # the separators are added after training, so no merge ever spans a special token
    tokenizer.train_from_iterator([t.replace(ENDOFTEXT, "") for t in texts], trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def encode_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for batch_start in range(0, len(texts), 512):
        for row in tokenizer(texts[batch_start : batch_start + 512])["input_ids"]:
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


def make_config(args: TrainArgs, tokenizer: PreTrainedTokenizerFast) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,  # unused (every layer is sparse) but part of the schema
        moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, as in the real Qwen3-MoE models
        head_dim=args.hidden_size // 4,
        num_experts=args.num_experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        router_aux_loss_coef=args.router_aux_loss_coef,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
    )


def lr_at(step: int, elapsed: float, args: TrainArgs) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    # progress is whichever runs out first, steps or wall time: on a machine shared with others the
    # time budget may end the run early, and the cosine must still reach its floor when it does
    by_steps = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    by_time = elapsed / (args.max_minutes * 60)
    progress = min(1.0, max(by_steps, by_time))
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style balance loss, per layer then averaged: 1.0 when every layer routes evenly.

    transformers' own aux loss pools the counts of all layers before balancing, so one layer may
    starve an expert while another overfeeds it; the demo must spread tokens in every layer.
    """
    losses = []
    for logits in router_logits:  # [num_tokens, num_experts]
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        load = torch.bincount(chosen.flatten(), minlength=num_experts).float() / chosen.numel()
        losses.append(num_experts * (load * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def train(model: Qwen3MoeForCausalLM, stream: torch.Tensor, args: TrainArgs) -> tuple[list[float], int, float]:
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    losses: list[float] = []
    start = time.time()
    step = 0
    for step in range(args.steps):
        starts = torch.randint(0, len(stream) - args.seq_len, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + args.seq_len] for s in starts.tolist()])
        lr = lr_at(step, time.time() - start, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = model(input_ids=batch, output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        aux_loss = per_layer_balance_loss(out.router_logits, model.config.num_experts_per_tok)
        (lm_loss + args.router_aux_loss_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(lm_loss.item())
        elapsed = time.time() - start
        if step % 25 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  lm_loss {losses[-1]:.3f}  aux {aux_loss.item():.3f}  "
                f"lr {lr:.2e}  {elapsed / 60:.1f} min",
                flush=True,
            )
        if elapsed >= args.max_minutes * 60:
            print(f"stopping at step {step}: the {args.max_minutes} min budget is spent", flush=True)
            break
    return losses, step + 1, time.time() - start


@torch.no_grad()
def evaluate(
    model: Qwen3MoeForCausalLM, stream: torch.Tensor, seq_len: int, num_experts: int, top_k: int
) -> tuple[float, list[list[float]]]:
    """Mean next-token NLL over non-overlapping windows, and each layer's share of top-k assignments."""
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    counts = torch.zeros(model.config.num_hidden_layers, num_experts, dtype=torch.long)
    for s in range(0, len(stream) - 1, seq_len):
        window = stream[s : s + seq_len + 1]
        if len(window) < 2:
            break
        inputs = window[:-1].unsqueeze(0)
        out = model(input_ids=inputs, output_router_logits=True)
        nll = torch.nn.functional.cross_entropy(out.logits[0].float(), window[1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += len(window) - 1
        for layer, logits in enumerate(out.router_logits):
            chosen = logits.float().topk(top_k, dim=-1).indices  # [num_tokens, top_k]
            counts[layer] += torch.bincount(chosen.flatten(), minlength=num_experts)
    shares = (counts.float() / counts.sum(dim=1, keepdim=True)).tolist()
    return total_nll / total_tokens, shares


def unigram_nll(train_stream: torch.Tensor, eval_stream: torch.Tensor, vocab_size: int) -> float:
    # add-one smoothing so tokens unseen in training still get a finite cost
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return -logp[eval_stream[1:]].mean().item()


def write_unigram_counts(out_dir: str, train_stream: torch.Tensor, vocab_size: int) -> None:
    """Training-split token counts, so tests can score the unigram baseline the same way as here."""
    counts = torch.bincount(train_stream, minlength=vocab_size).tolist()
    with open(os.path.join(out_dir, "unigram_counts.json"), "w") as f:
        json.dump({"smoothing": "add-one", "counts": counts}, f, separators=(",", ":"))


SAMPLE_PROMPTS = [
    ("plain", "json.dumps\n\n"),
    ("plain", "Return the number of"),
    ("chat", "What does os.path.join do?"),
    ("chat", "What does collections.Counter.most_common do?"),
]


def sample_outputs(out_dir: str, max_new_tokens: int = 48) -> list[dict[str, str]]:
    """Greedy samples from the saved checkpoint, loaded the ordinary way (proves the folder is valid)."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    samples = []
    for kind, prompt in SAMPLE_PROMPTS:
        if kind == "chat":
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        samples.append({"kind": kind, "prompt": prompt, "completion": completion})
    return samples


def write_report(out_dir: str, report: dict) -> None:
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(report, f, indent=2)
    r = report
    lines = [
        "# The demo model",
        "",
        "A tiny Qwen3-MoE trained on the CPU by `python -m models.demo_train --out models/demo`",
        "(every number below is written by that script; the same numbers are in `training.json`).",
        "",
        "## Model",
        "",
        f"- Architecture `Qwen3MoeForCausalLM`: {r['model']['num_layers']} layers, hidden "
        f"{r['model']['hidden_size']}, {r['model']['num_experts']} experts (top-2, intermediate "
        f"{r['model']['moe_intermediate_size']}) in every layer, 4 query / 2 KV heads.",
        f"- {r['model']['num_params'] / 1e6:.2f} M parameters, stored in bf16 "
        f"({r['model']['safetensors_bytes'] / 1e6:.1f} MB of safetensors).",
        f"- Tokenizer: byte-level BPE trained with `tokenizers` on the training split, vocab "
        f"{r['model']['vocab_size']}, special tokens {', '.join(f'`{t}`' for t in SPECIAL_TOKENS)}; "
        "ChatML chat template, eos `<|im_end|>`.",
        "",
        "## Corpus",
        "",
        f"- Docstrings (module, class, function) of the Python {r['corpus']['python']} standard library "
        f"under `{r['corpus']['stdlib']}`, walked in sorted order, skipping {', '.join(sorted(SKIP_DIRS))}.",
        f"- {r['corpus']['num_docs']} docstrings from {r['corpus']['num_modules']} modules, "
        f"{r['corpus']['num_chars'] / 1e6:.2f} M characters. Each is a plain document "
        "(`module.name` + docstring); public functions and classes also appear as a ChatML pair "
        '("What does module.name do?" -> first paragraph).',
        f"- Held out: the top-level packages with crc32(name) % {HELDOUT_MODULUS} == 0 "
        f"({', '.join(r['corpus']['heldout_packages'])}): {r['corpus']['heldout_tokens']} tokens; "
        f"training split {r['corpus']['train_tokens']} tokens.",
        "- `heldout.txt` (a few KB of held-out plain documents) and `unigram_counts.json` (training-split "
        "token counts) ship with the model for the tests.",
        "",
        "## Training",
        "",
        f"- {r['training']['steps']} steps of batch {r['args']['batch_size']} x {r['args']['seq_len']} "
        f"tokens ({r['training']['tokens_seen'] / 1e6:.2f} M tokens, "
        f"{r['training']['tokens_seen'] / r['corpus']['train_tokens']:.1f} epochs), AdamW lr "
        f"{r['args']['lr']} (warmup, then cosine to 10% over the steps or the --max-minutes wall budget, "
        f"whichever ends first), router aux loss coef {r['args']['router_aux_loss_coef']}, "
        f"torch {r['training']['torch']} on {r['training']['threads']} CPU threads: "
        f"{r['training']['seconds'] / 60:.1f} minutes.",
        f"- Final train LM loss (mean of last 20 steps): {r['training']['final_train_loss']:.3f}.",
        "",
        "## Held-out evaluation",
        "",
        "| model | NLL / token | perplexity |",
        "|---|---|---|",
        f"| uniform over the vocab | {math.log(r['model']['vocab_size']):.3f} | {r['model']['vocab_size']} |",
        f"| unigram (training counts, add-one) | {r['eval']['unigram_nll']:.3f} | {r['eval']['unigram_ppl']:.1f} |",
        f"| this model | {r['eval']['model_nll']:.3f} | {r['eval']['model_ppl']:.1f} |",
        "",
        "Expert load on the held-out split (share of top-2 assignments, per layer; uniform = "
        f"{1 / r['model']['num_experts']:.3f}):",
        "",
        "| layer | " + " | ".join(f"e{i}" for i in range(r["model"]["num_experts"])) + " | min |",
        "|---" * (r["model"]["num_experts"] + 2) + "|",
    ]
    for layer, shares in enumerate(r["eval"]["expert_shares"]):
        lines.append(f"| {layer} | " + " | ".join(f"{s:.3f}" for s in shares) + f" | {min(shares):.3f} |")
    lines += [
        "",
        "## Samples (greedy, transformers, float32)",
        "",
        "It learned the register of stdlib docstrings, not facts: short, generic, often repetitive text.",
        "",
    ]
    for s in r["samples"]:
        lines += [f"**{s['kind']}** prompt `{s['prompt']!r}`:", "", "```", s["completion"], "```", ""]
    with open(os.path.join(out_dir, "TRAINING.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-intermediate-size", type=int, default=256)
    p.add_argument("--router-aux-loss-coef", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-minutes", type=float, default=14.0, help="wall-time budget: the LR anneals and training stops by then"
    )
    args = TrainArgs(**{k.replace("-", "_"): v for k, v in vars(p.parse_args(argv)).items()})

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    stdlib = sysconfig.get_paths()["stdlib"]
    docs = collect_docs(stdlib)
    train_docs = [d for d in docs if not is_heldout(d.module)]
    heldout_docs = [d for d in docs if is_heldout(d.module)]
    if not heldout_docs:
        sys.exit("no held-out modules found; the stdlib walk found nothing to evaluate on")
    print(f"{len(docs)} docstrings, {len(train_docs)} train / {len(heldout_docs)} held out", flush=True)

    train_texts = build_texts(train_docs)
    random.Random(args.seed).shuffle(train_texts)  # mix packages, so a window rarely sees one module only
    tokenizer = wrap_tokenizer(train_tokenizer(train_texts, args.vocab_size))
    train_stream = encode_stream(tokenizer, train_texts)
    heldout_stream = encode_stream(tokenizer, [plain_text(d) + ENDOFTEXT for d in heldout_docs])
    print(f"train {len(train_stream)} tokens, held out {len(heldout_stream)} tokens", flush=True)

    config = make_config(args, tokenizer)
    model = Qwen3MoeForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{num_params / 1e6:.2f} M parameters", flush=True)

    losses, steps_done, seconds = train(model, train_stream, args)

    model_nll, shares = evaluate(model, heldout_stream, args.seq_len, args.num_experts, 2)
    uni_nll = unigram_nll(train_stream, heldout_stream, len(tokenizer))
    print(f"held-out ppl {math.exp(model_nll):.1f}  unigram {math.exp(uni_nll):.1f}  uniform {len(tokenizer)}")
    print("min expert share per layer:", [round(min(s), 3) for s in shares])

    model.config.output_router_logits = False
    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False).save_pretrained(args.out)
    write_unigram_counts(args.out, train_stream, len(tokenizer))
    with open(os.path.join(args.out, "heldout.txt"), "w") as f:
        f.write(heldout_sample(heldout_docs, 6000))
    init_py = os.path.join(args.out, "__init__.py")
    if not os.path.exists(init_py):
        open(init_py, "w").close()  # so setuptools packages the folder as models.demo

    report = {
        "args": asdict(args),
        "model": {
            "num_params": num_params,
            "safetensors_bytes": os.path.getsize(os.path.join(args.out, "model.safetensors")),
            "vocab_size": len(tokenizer),
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "num_experts": args.num_experts,
            "moe_intermediate_size": args.moe_intermediate_size,
        },
        "corpus": {
            "python": platform.python_version(),
            "stdlib": stdlib,
            "num_docs": len(docs),
            "num_modules": len({d.module for d in docs}),
            "num_chars": sum(len(d.text) for d in docs),
            "heldout_packages": sorted({d.module.split(".")[0] for d in heldout_docs}),
            "train_tokens": len(train_stream),
            "heldout_tokens": len(heldout_stream),
        },
        "training": {
            "steps": steps_done,
            "tokens_seen": steps_done * args.batch_size * args.seq_len,
            "seconds": seconds,
            "threads": args.threads,
            "torch": torch.__version__,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "loss_curve": [round(x, 4) for x in losses[::10]],
        },
        "eval": {
            "model_nll": model_nll,
            "model_ppl": math.exp(model_nll),
            "unigram_nll": uni_nll,
            "unigram_ppl": math.exp(uni_nll),
            "uniform_ppl": len(tokenizer),
            "expert_shares": shares,
            "min_expert_share": min(min(s) for s in shares),
        },
        "samples": sample_outputs(args.out),
    }
    write_report(args.out, report)
    for s in report["samples"]:
        print(f"[{s['kind']}] {s['prompt']!r} -> {s['completion']!r}")


if __name__ == "__main__":
    main()
