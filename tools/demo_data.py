"""Builds the demo model's training data on the CPU, offline: corpus -> tokenizer -> token streams.

Run: python -m tools.demo_data --out tools/demo_data   (about 10 minutes on 2 busy cores; 15 MB of output, git-ignored)

The folder travels to the GPU machine, where tools/demo_train.py trains from it without the corpus sources:
  train.u16.gz      the shuffled training split as uint16 token ids (gzip-compressed raw bytes)
  heldout_eval.txt  the held-out packages' documents as plain text (both models are scored on it)
  heldout.txt       a few KB of that text, shipped with the model for the tests
  tokenizer/        the byte-level BPE tokenizer with the ChatML chat template (save_pretrained format)
  corpus.json       the corpus numbers that TRAINING.md reports
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sysconfig
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tools.demo_corpus import (
    ENDOFTEXT,
    HELDOUT_MODULUS,
    IM_END,
    IM_START,
    SKIP_DIRS,
    Doc,
    collect_docs,
    is_heldout,
    plain_text,
)
from tools.demo_pairs import build_texts

SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data")


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


def encode(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for start in range(0, len(texts), 4096):
        for enc in tokenizer.encode_batch(texts[start : start + 4096], add_special_tokens=False):
            ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.uint16)


def heldout_sample(docs: list[Doc], max_chars: int) -> str:
    """A few KB of held-out plain text, shipped with the model so tests can measure perplexity."""
    parts: list[str] = []
    size = 0
    for doc in random.Random(0).sample(docs, len(docs)):
        text = plain_text(doc)
        if doc.kind == "file" or len(text) < 200 or len(text) > 1500:
            continue
        parts.append(text)
        size += len(text) + 2
        if size > max_chars:
            break
    return "\n\n".join(parts) + "\n"


def build(out: str, vocab_size: int, seed: int) -> dict:
    start = time.time()
    stdlib = sysconfig.get_paths()["stdlib"]
    site_packages = sysconfig.get_paths()["purelib"]
    docs = collect_docs(stdlib, site_packages)
    train_docs = [d for d in docs if not is_heldout(d.package)]
    heldout_docs = [d for d in docs if is_heldout(d.package)]
    print(f"{len(docs)} documents ({len(train_docs)} train / {len(heldout_docs)} held out) "
          f"in {time.time() - start:.0f} s", flush=True)  # fmt: skip

    train_texts = build_texts(train_docs)
    random.Random(seed).shuffle(train_texts)  # mix packages, so a window rarely sees one module only
    tokenizer = train_tokenizer(train_texts, vocab_size)
    train_ids = encode(tokenizer, train_texts)
    heldout_text = "".join(plain_text(d) + ENDOFTEXT for d in heldout_docs)
    heldout_ids = encode(tokenizer, [heldout_text])
    print(f"train {len(train_ids)} tokens, held out {len(heldout_ids)} tokens ({time.time() - start:.0f} s)",
          flush=True)  # fmt: skip

    os.makedirs(out, exist_ok=True)
    wrap_tokenizer(tokenizer).save_pretrained(os.path.join(out, "tokenizer"))
    # gzip, not xz: zlib is in every Python build, lzma is optional (and the GPU image is not ours)
    with gzip.open(os.path.join(out, "train.u16.gz"), "wb", compresslevel=9) as f:
        f.write(train_ids.tobytes())
    with open(os.path.join(out, "heldout_eval.txt"), "w", encoding="utf-8") as f:
        f.write(heldout_text)
    with open(os.path.join(out, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write(heldout_sample(heldout_docs, 6000))
    num_pairs = sum(t.startswith(IM_START) for t in train_texts)
    corpus = {
        "python": platform.python_version(),
        "stdlib": stdlib,
        "site_packages": site_packages,
        "skip_dirs": sorted(SKIP_DIRS),
        "heldout_rule": f"crc32(top-level package) % {HELDOUT_MODULUS} == 0",
        "num_docs": len(docs),
        "num_docs_by_kind": {k: sum(d.kind == k for d in docs) for k in ("function", "class", "module", "file")},
        "num_packages": len({d.package for d in docs}),
        "num_chars": sum(len(d.text) for d in docs),
        "num_chat_pairs": num_pairs,
        "train_chars": sum(len(t) for t in train_texts),
        "heldout_packages": sorted({d.package for d in heldout_docs}),
        "heldout_chars": len(heldout_text),
        "train_tokens": int(len(train_ids)),
        "heldout_tokens": int(len(heldout_ids)),
        "vocab_size": tokenizer.get_vocab_size(),
        "seed": seed,
    }
    with open(os.path.join(out, "corpus.json"), "w") as f:
        json.dump(corpus, f, indent=1)
    print(f"wrote {out} in {time.time() - start:.0f} s", flush=True)
    return corpus


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_DATA_DIR)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build(args.out, args.vocab_size, args.seed)


if __name__ == "__main__":
    main()
