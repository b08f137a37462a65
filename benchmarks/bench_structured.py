"""Decode step time with 0, half and all of the batch grammar-constrained (structured outputs), at
Qwen3-30B-A3B shapes with dummy weights on one GPU; plus the CPU time of the per-step mask fill alone.

The constrained requests follow a JSON schema that never has to end (an array of objects with free
strings), so every step of the run fills a real mask: inside strings most of the vocabulary is allowed,
between them a handful of tokens. A real tokenizer folder can be given (--tokenizer, e.g. a local Qwen3
checkpoint's); by default a synthetic byte-level BPE of up to 151,936 tokens is trained first (~30 s).

    python benchmarks/bench_structured.py --batch-sizes 8,64,256 --out structured.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time

import torch

from benchmarks.bench_e2e import QWEN3_30B_A3B

SCHEMA = {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}, "score": {"type": "number"}},
    "required": ["name", "tags"]}}


def synthetic_tokenizer(path: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_{}\":,[]. "
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 12))) for _ in range(150_000)]
    lines = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(12_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64, 256])
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: a synthetic 150k BPE)")
    parser.add_argument("--out", default="structured.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU: checks the script runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    from runtime.config import EngineConfig
    from runtime.engine.llm_engine import LLMEngine
    from runtime.engine.sequence import Sequence, Status
    from runtime.sampling_params import SamplingParams
    from runtime.structured_output import GrammarCompiler
    from runtime.tokenizer import load_tokenizer

    model_dir = tempfile.mkdtemp()
    cfg = dict(QWEN3_30B_A3B)
    if args.smoke:
        from tests.tiny import make_tiny_checkpoint

        make_tiny_checkpoint(model_dir, "Qwen3MoeForCausalLM")
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    else:
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(cfg, f)
    tok_dir = args.tokenizer or model_dir
    if args.tokenizer is None and not args.smoke:
        t0 = time.perf_counter()
        synthetic_tokenizer(model_dir, QWEN3_30B_A3B["vocab_size"])
        print(f"synthetic tokenizer trained in {time.perf_counter() - t0:.1f} s")
    hf_tok = load_tokenizer(tok_dir)
    print(f"tokenizer: {len(hf_tok)} tokens, logits width {cfg['vocab_size']}")
    grammar = GrammarCompiler(hf_tok, cfg["vocab_size"], [hf_tok.eos_token_id])("json", SCHEMA)

    max_b = max(args.batch_sizes)
    config = EngineConfig(model=model_dir, tokenizer=tok_dir, load_format="dummy",
                          dtype="float32" if args.smoke else "bfloat16", max_model_len=args.ctx + args.steps + 64,
                          max_num_seqs=max_b, gpu_memory_utilization=0.9,
                          kv_cache_memory=(64 << 20) if args.smoke else None)
    engine = LLMEngine(config)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch_sizes:
        for fraction in (0.0, 0.5, 1.0):
            num_constrained = int(batch * fraction)
            seqs = []
            for b in range(batch):
                rid = f"b{batch}-f{fraction}-{b}"
                constrained = b < num_constrained
                params = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True,
                                        grammar=grammar if constrained else None)
                prompt = torch.randint(0, cfg["vocab_size"] - 8, (args.ctx + 1,), generator=g).tolist()
                seq = Sequence(rid, prompt, params)
                engine.block_manager.allocate(seq)
                engine.block_manager.grow(seq, args.ctx + 1)
                seq.num_computed_tokens = args.ctx
                seq.status = Status.RUNNING
                engine.scheduler.running.append(seq)
                engine.requests[rid] = seq
                if constrained:
                    engine.structured.add(rid, grammar, [])
                seqs.append(seq)
            for _ in range(3):
                engine.step()
            sync()
            fill_s = 0.0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            sync()
            step_ms = (time.perf_counter() - t0) / args.steps * 1e3
            if num_constrained:  # the mask fill alone, on the CPU, for the same matchers
                ids = [s.request_id for s in seqs]
                t1 = time.perf_counter()
                for _ in range(args.steps):
                    engine.structured.bitmask(ids)
                fill_s = (time.perf_counter() - t1) / args.steps
            alive = sum(not s.is_finished for s in seqs)
            rows.append({"batch": batch, "constrained": num_constrained, "step_ms": step_ms,
                         "mask_fill_ms": fill_s * 1e3, "still_running": alive})
            print(f"decode B={batch:4d} constrained={num_constrained:4d}: {step_ms:8.3f} ms/step, "
                  f"mask fill {fill_s * 1e3:.3f} ms ({alive}/{batch} still running)", flush=True)
            engine.abort_requests([s.request_id for s in seqs])
    with open(args.out, "w") as f:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        json.dump({"gpu": gpu, "rows": rows}, f, indent=1)
    base = {r["batch"]: r["step_ms"] for r in rows if r["constrained"] == 0}
    print("SUMMARY structured " + " ".join(
        f"B={r['batch']}:c{r['constrained']}={r['step_ms']:.2f}ms(+{r['step_ms'] / base[r['batch']] - 1:.1%})"
        for r in rows))


if __name__ == "__main__":
    main()
