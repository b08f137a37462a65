"""Writes models/demo/TRAINING.md from training.json, so every number in it comes from the run.

Run alone to regenerate it: python -m tools.demo_report models/demo
"""

from __future__ import annotations

import json
import os
import sys


def _load_table(shares: list[list[float]]) -> list[str]:
    num_experts = len(shares[0])
    header = "| layer | " + " | ".join(f"e{i}" for i in range(num_experts)) + " | min |"
    lines = [header, "|---" * (num_experts + 2) + "|"]
    for layer, row in enumerate(shares):
        lines.append(f"| {layer} | " + " | ".join(f"{s:.3f}" for s in row) + f" | {min(row):.3f} |")
    return lines


def render(r: dict) -> str:
    m, c, t, e = r["model"], r["corpus"], r["training"], r["eval"]
    new, old, uni = e["new"], e.get("old"), e["unigram"]
    lines = [
        "# The demo model",
        "",
        f"A small Qwen3-MoE trained by `{t['command']}` (data built by `python -m tools.demo_data`).",
        "Every number below is written by that script; the same numbers are in `training.json`.",
        "",
        "## Model",
        "",
        f"- Architecture `Qwen3MoeForCausalLM`: {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_experts']} experts (top-{m['top_k']}, intermediate {m['moe_intermediate_size']}) in every layer, "
        f"{m['num_heads']} query / {m['num_kv_heads']} KV heads.",
        f"- {m['num_params'] / 1e6:.2f} M parameters ({m['active_params'] / 1e6:.2f} M active per token), stored in "
        f"bf16 ({m['safetensors_bytes'] / 1e6:.1f} MB of safetensors in {m['num_shards']} shards).",
        f"- Tokenizer: byte-level BPE trained with `tokenizers` on the training split, vocab {m['vocab_size']}, "
        "special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`; ChatML chat template, eos `<|im_end|>`.",
        "",
        "## Corpus",
        "",
        f"- Python {c['python']}: docstrings (module, class, function) of the standard library and of the installed "
        f"packages (ast, walked in sorted order), docstrings of builtins and C modules (introspected), and the "
        f".md/.rst/.txt files and READMEs shipped in the packages; skipped directories: {', '.join(c['skip_dirs'])}.",
        f"- {c['num_docs']} documents after exact deduplication ("
        + ", ".join(f"{n} {kind}{'es' if kind.endswith('s') else 's'}" for kind, n in c["num_docs_by_kind"].items())
        + f") from {c['num_packages']} "
        f"top-level packages, {c['num_chars'] / 1e6:.1f} M characters.",
        f"- {c['num_chat_pairs']} ChatML pairs: a question from a public name (\"What does json.dumps do?\", "
        "\"How do I use torch.nn.Linear?\" ...) answered by the first sentences of its docstring.",
        f"- Held out: the top-level packages with {c['heldout_rule']} ({len(c['heldout_packages'])} packages, e.g. "
        f"{', '.join(c['heldout_packages'][:12])}): {c['heldout_chars'] / 1e6:.2f} M characters, "
        f"{c['heldout_tokens']} tokens. Training split: {c['train_chars'] / 1e6:.1f} M characters, "
        f"{c['train_tokens'] / 1e6:.2f} M tokens.",
        "",
        "## Training",
        "",
        f"- {t['steps']} steps of batch {t['batch_size']} x {t['seq_len']} tokens "
        f"({t['tokens_seen'] / 1e6:.1f} M tokens seen, {t['epochs']:.1f} epochs), AdamW lr {t['lr']} "
        "(warmup, then cosine to 10% over the "
        f"{t['max_minutes']} min budget), per-layer balance loss coef {t['aux_coef']}, "
        f"residual dropout {t['dropout']}, {t['precision']}.",
        f"- {t['device_name']}, torch {t['torch']}: {t['seconds'] / 60:.1f} minutes of training "
        f"({t['tokens_per_second'] / 1e3:.0f} k tokens/s).",
        f"- Final train LM loss (mean of the last 20 logged steps): {t['final_train_loss']:.3f}.",
        "",
        "## Held-out evaluation",
        "",
        f"The held-out documents ({new['bytes'] / 1e6:.2f} MB), scored in windows of {e['window']} tokens with "
        "transformers (float32). Tokenizers differ, so bits per byte is the comparable number. The previous model "
        "was trained on standard-library docstrings with the same held-out rule, so this text is unseen by both.",
        "",
        "| model | tokens | NLL / token | perplexity | bits / byte |",
        "|---|---|---|---|---|",
        f"| unigram (training counts, add-one) | {new['tokens']} | {uni['nll_per_token']:.3f} | {uni['ppl']:.1f} | "
        f"{uni['bits_per_byte']:.3f} |",
    ]
    if old:
        lines.append(f"| previous demo model | {old['tokens']} | {old['nll_per_token']:.3f} | {old['ppl']:.1f} | "
                     f"{old['bits_per_byte']:.3f} |")  # fmt: skip
    lines += [
        f"| this model | {new['tokens']} | {new['nll_per_token']:.3f} | {new['ppl']:.1f} | "
        f"{new['bits_per_byte']:.3f} |",
        "",
        f"Expert load of this model on the held-out text (share of top-{m['top_k']} assignments; uniform = "
        f"{1 / m['num_experts']:.3f}):",
        "",
        *_load_table(new["expert_shares"]),
        "",
        "## Fixed questions (greedy, transformers, float32, chat template)",
        "",
    ]
    old_samples = {(s["kind"], s["prompt"]): s for s in r.get("samples_old", [])}
    for s in r["samples"]:
        lines += [f"**{s['kind']}** `{s['prompt']!r}`", "", f"- this model ({s['words']} words): {s['completion']!r}"]
        prev = old_samples.get((s["kind"], s["prompt"]))
        if prev is not None:
            lines.append(f"- previous model ({prev['words']} words): {prev['completion']!r}")
        lines.append("")
    chat = [s for s in r["samples"] if s["kind"] == "chat"]
    lines.append(f"{sum(s['words'] >= 8 for s in chat)} of {len(chat)} answers have 8 or more words.")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, report: dict) -> None:
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "TRAINING.md"), "w") as f:
        f.write(render(report))


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "models/demo"
    with open(os.path.join(folder, "training.json")) as f:
        write_report(folder, json.load(f))
