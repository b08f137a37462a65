"""Tokenizer loading and chat templating (transformers' AutoTokenizer), shared by LLM and the server."""

from __future__ import annotations

import os
from typing import Any


def load_tokenizer(path: str) -> Any | None:
    """The folder's tokenizer, or None when it has none (then prompts must be token ids)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def apply_chat_template(
    tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None = None, add_generation_prompt: bool = True
) -> list[int]:
    if tokenizer is None:
        raise ValueError("this model folder has no tokenizer, so chat messages cannot be templated")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: pass --chat-template FILE")
    ids = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


class _RustDecode:
    """The tokenizer, with decode() going straight to the Rust tokenizer: the detokenizer decodes
    twice per token, and transformers' Python wrapper around it was two thirds of that cost.
    Same text as long as the tokenizer does no clean-up of spaces (checked in fast_decoding)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._rust = tokenizer._tokenizer

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._rust.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def fast_decoding(tokenizer: Any) -> Any:
    if tokenizer is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer
    if not hasattr(getattr(tokenizer, "_tokenizer", None), "decode"):
        return tokenizer
    return _RustDecode(tokenizer)
