"""Trains the built-in demo model (models/demo): a small Qwen3-MoE on English about code, with its own tokenizer.

  python -m tools.demo_data                        # once, on any machine (CPU, offline): corpus and tokenizer
  python -m tools.demo_train --out models/demo     # trains on cuda if there is one, for --max-minutes
  bash tools/demo_gpu_train.sh                     # the GPU run that made the shipped model, output in $OUT/demo

After training it saves the checkpoint (bf16, sharded), reloads it with transformers and scores it against the
model in --compare-with and a unigram baseline, then writes training.json and TRAINING.md beside the weights.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, Qwen3MoeConfig

from tools.demo_corpus import ENDOFTEXT, IM_END
from tools.demo_data import DEFAULT_DATA_DIR, build
from tools.demo_eval import WINDOW, greedy_answers, load, score_text, unigram_score
from tools.demo_model import DemoMoE, per_layer_balance_loss, to_transformers
from tools.demo_report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class TrainArgs:
    data: str
    out: str
    compare_with: str
    device: str
    max_minutes: float
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    moe_intermediate_size: int
    aux_coef: float
    dropout: float
    bf16: bool | None
    seed: int
    threads: int
    eval_max_tokens: int
    shard_size: str


def make_config(args: TrainArgs, tokenizer: PreTrainedTokenizerBase) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,  # unused (every layer is sparse) but part of the schema
        moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,  # GQA, as in the real Qwen3-MoE models
        head_dim=args.hidden_size // args.num_heads,
        num_experts=args.num_experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        router_aux_loss_coef=args.aux_coef,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
    )


def uses_bf16(args: TrainArgs) -> bool:
    return args.device.startswith("cuda") if args.bf16 is None else args.bf16


def lr_at(step: int, elapsed: float, args: TrainArgs) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    # the wall budget (or --steps, whichever ends first) is the schedule: the cosine reaches its floor at the end
    progress = min(1.0, max(elapsed / (args.max_minutes * 60), step / max(1, args.steps)))
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(model: DemoMoE, stream: torch.Tensor, heldout: torch.Tensor, args: TrainArgs) -> dict:
    """stream, heldout: 1-D token ids on the device. Returns the loss curves and counts."""
    cuda = args.device.startswith("cuda")
    bf16 = uses_bf16(args)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=cuda,
    )  # fmt: skip
    gen = torch.Generator(device=stream.device).manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1, device=stream.device)
    num_eval = min(32, max(1, (len(heldout) - 1) // (args.seq_len + 1)))
    eval_batch = heldout[: num_eval * (args.seq_len + 1)].view(num_eval, args.seq_len + 1).long()
    top_k = model.config.num_experts_per_tok
    log_every = 50 if cuda else 5
    pending: list[torch.Tensor] = []  # losses stay on the device until a log step, so no step waits for the host
    curve: list[tuple[int, float, float]] = []
    heldout_curve: list[tuple[int, float]] = []
    model.train()
    start = time.time()
    step = 0
    while step < args.steps:
        elapsed = time.time() - start
        if elapsed >= args.max_minutes * 60:
            break
        lr = lr_at(step, elapsed, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch_size,), device=stream.device,
                               generator=gen)  # fmt: skip
        batch = stream[starts[:, None] + offsets].long()  # [batch, seq_len + 1]
        with torch.autocast(stream.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, router_logits = model(batch[:, :-1])
            lm_loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            aux_loss = per_layer_balance_loss(router_logits, top_k)
        (lm_loss + args.aux_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(torch.stack([lm_loss.detach(), aux_loss.detach()]))
        step += 1
        if step % log_every == 0:
            values = torch.stack(pending).mean(dim=0).tolist()
            pending.clear()
            curve.append((step, round(values[0], 4), round(values[1], 4)))
            msg = f"step {step:5d}  lm_loss {values[0]:.3f}  aux {values[1]:.3f}  lr {lr:.2e}  {elapsed / 60:.2f} min"
            if step % (log_every * 10) == 0:
                heldout_curve.append((step, round(heldout_loss(model, eval_batch, bf16), 4)))
                msg += f"  held-out {heldout_curve[-1][1]:.3f}"
            print(msg, flush=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.time() - start
    if not curve:  # fewer steps than one log interval (a dry run)
        values = torch.stack(pending).mean(dim=0).tolist()
        curve.append((step, round(values[0], 4), round(values[1], 4)))
    heldout_curve.append((step, round(heldout_loss(model, eval_batch, bf16), 4)))
    print(f"trained {step} steps in {seconds / 60:.2f} min; held-out loss {heldout_curve[-1][1]:.3f}", flush=True)
    return {"steps": step, "seconds": seconds, "curve": curve, "heldout_curve": heldout_curve}


@torch.no_grad()
def heldout_loss(model: DemoMoE, batch: torch.Tensor, bf16: bool) -> float:
    model.eval()
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, _ = model(batch[:, :-1])
    model.train()
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).item()


def save_checkpoint(model: DemoMoE, tokenizer: PreTrainedTokenizerBase, args: TrainArgs, counts: np.ndarray) -> None:
    hf = to_transformers(model)
    hf.config.output_router_logits = False
    hf.config.use_cache = True
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):  # no stale shard of an earlier, differently sharded save
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            os.remove(os.path.join(args.out, name))
    hf.to(torch.bfloat16).save_pretrained(args.out, max_shard_size=args.shard_size)
    tokenizer.save_pretrained(args.out)
    im_end, eot = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False).save_pretrained(args.out)
    with open(os.path.join(args.out, "unigram_counts.json"), "w") as f:
        json.dump({"smoothing": "add-one", "counts": counts.tolist()}, f, separators=(",", ":"))
    shutil.copy(os.path.join(args.data, "heldout.txt"), os.path.join(args.out, "heldout.txt"))
    open(os.path.join(args.out, "__init__.py"), "a").close()  # so setuptools packages the folder as models.demo


def parse_args(argv: list[str] | None) -> TrainArgs:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA_DIR, help="built by python -m tools.demo_data (built if absent)")
    p.add_argument("--out", default=os.path.join(REPO, "models", "demo"))
    p.add_argument("--compare-with", default=os.path.join(REPO, "models", "demo"), help="the model to score against")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-minutes", type=float, default=5.25, help="training wall budget; the LR anneals by then")
    p.add_argument("--steps", type=int, default=1_000_000, help="a cap on steps, for dry runs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-intermediate-size", type=int, default=192)
    p.add_argument("--aux-coef", type=float, default=0.05, help="weight of the per-layer balance loss")
    p.add_argument("--dropout", type=float, default=0.1, help="residual dropout (training only; many epochs)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="autocast (default: on cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--eval-max-tokens", type=int, default=0, help="score only this many held-out tokens (0: all)")
    p.add_argument("--shard-size", default="15MB", help="safetensors shard size (files off the GPU machine <16 MiB)")
    return TrainArgs(**{k.replace("-", "_"): v for k, v in vars(p.parse_args(argv)).items()})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    if not os.path.exists(os.path.join(args.data, "corpus.json")):
        print(f"{args.data} has no corpus; building it (python -m tools.demo_data)", flush=True)
        build(args.data, 8192, args.seed)
    t0 = time.time()
    with open(os.path.join(args.data, "corpus.json")) as f:
        corpus = json.load(f)
    with gzip.open(os.path.join(args.data, "train.u16.gz")) as f:
        train_ids = np.frombuffer(f.read(), dtype=np.uint16)
    with open(os.path.join(args.data, "heldout_eval.txt"), encoding="utf-8") as f:
        heldout_text = f.read()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.data, "tokenizer"))
    heldout_ids = torch.tensor(tokenizer(heldout_text, verbose=False)["input_ids"], dtype=torch.int32)
    stream = torch.from_numpy(train_ids.astype(np.int32)).to(args.device)
    print(f"data: {len(train_ids)} train / {len(heldout_ids)} held-out tokens, loaded in {time.time() - t0:.1f} s")

    config = make_config(args, tokenizer)
    model = DemoMoE(config, args.dropout).to(args.device)
    num_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    print(f"{num_params / 1e6:.2f} M parameters on {args.device}", flush=True)
    result = train(model, stream, heldout_ids.to(args.device), args)

    counts = np.bincount(train_ids, minlength=len(tokenizer))
    save_checkpoint(model.cpu(), tokenizer, args, counts)
    del model, stream
    shards = [n for n in os.listdir(args.out) if n.endswith(".safetensors")]

    new_model, new_tok = load(args.out, args.device)
    new = score_text(new_model, new_tok, heldout_text, args.device, args.eval_max_tokens)
    unigram = unigram_score(torch.from_numpy(counts), new_tok, heldout_text, args.eval_max_tokens)
    samples = greedy_answers(new_model, new_tok, args.device)
    del new_model
    old, samples_old = None, []
    if os.path.exists(os.path.join(args.compare_with, "config.json")) and os.path.realpath(
        args.compare_with
    ) != os.path.realpath(args.out):
        old_model, old_tok = load(args.compare_with, args.device)
        # the same held-out bytes as the new model (its token cap scaled by the tokenizers' ratio)
        old_cap = int(args.eval_max_tokens * 1.3) if args.eval_max_tokens else 0
        old = score_text(old_model, old_tok, heldout_text, args.device, old_cap)
        samples_old = greedy_answers(old_model, old_tok, args.device)
        del old_model

    active = num_params - expert_params * (1 - config.num_experts_per_tok / config.num_experts)
    tokens_seen = result["steps"] * args.batch_size * args.seq_len
    report = {
        "args": asdict(args),
        "model": {
            "num_params": num_params, "active_params": int(active), "vocab_size": len(tokenizer),
            "hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": args.num_heads,
            "num_kv_heads": args.num_kv_heads, "num_experts": args.num_experts, "top_k": config.num_experts_per_tok,
            "moe_intermediate_size": args.moe_intermediate_size, "num_shards": len(shards),
            "safetensors_bytes": sum(os.path.getsize(os.path.join(args.out, n)) for n in shards),
        },
        "corpus": corpus,
        "training": {
            "command": "python -m tools.demo_train" + (" (tools/demo_gpu_train.sh)" if args.device != "cpu" else ""),
            "steps": result["steps"], "batch_size": args.batch_size, "seq_len": args.seq_len,
            "tokens_seen": tokens_seen, "epochs": tokens_seen / len(train_ids), "lr": args.lr,
            "max_minutes": args.max_minutes, "aux_coef": args.aux_coef, "dropout": args.dropout,
            "precision": "bf16 autocast" if uses_bf16(args) else "float32", "seconds": result["seconds"],
            "tokens_per_second": tokens_seen / max(result["seconds"], 1e-9), "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
            "final_train_loss": sum(c[1] for c in result["curve"][-20:]) / len(result["curve"][-20:]),
            "loss_curve": result["curve"], "heldout_loss_curve": result["heldout_curve"],
        },
        "eval": {"window": WINDOW, "new": new, "old": old, "unigram": unigram},
        "samples": samples,
        "samples_old": samples_old,
    }  # fmt: skip
    write_report(args.out, report)
    print(summary(report))


def summary(r: dict) -> str:
    e, t = r["eval"], r["training"]
    lines = [
        f"trained {t['steps']} steps, {t['tokens_seen'] / 1e6:.1f} M tokens ({t['epochs']:.1f} epochs) in "
        f"{t['seconds'] / 60:.2f} min, {t['tokens_per_second'] / 1e3:.0f} k tokens/s; "
        f"{r['model']['safetensors_bytes'] / 1e6:.1f} MB in {r['model']['num_shards']} shards",
        f"held-out bits/byte: new {e['new']['bits_per_byte']:.3f} (ppl {e['new']['ppl']:.1f})"
        + (f"  previous {e['old']['bits_per_byte']:.3f} (ppl {e['old']['ppl']:.1f})" if e["old"] else "")
        + f"  unigram {e['unigram']['bits_per_byte']:.3f} (ppl {e['unigram']['ppl']:.1f})",
        "min expert share per layer: " + " ".join(f"{min(row):.3f}" for row in e["new"]["expert_shares"]),
    ]
    old = {(s["kind"], s["prompt"]): s["completion"] for s in r["samples_old"]}
    for s in r["samples"]:
        lines.append(f"[{s['kind']}] {s['prompt']!r}\n  new: {s['completion']!r}")
        if (s["kind"], s["prompt"]) in old:
            lines.append(f"  old: {old[(s['kind'], s['prompt'])]!r}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
