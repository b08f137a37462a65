"""Where a --model comes from: a local folder, or a Hugging Face id (org/name) resolved through the HF
cache as vLLM does (downloaded when online); and the checkpoint's generation_config.json defaults."""

from __future__ import annotations

import json
import os
import re

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# the sampling fields vLLM takes from generation_config.json (--generation-config auto)
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def resolve_model(model: str) -> str | None:
    """The local folder for model, or None when it is neither a folder nor a Hugging Face id. Raises
    ValueError (one line) for an id that is neither cached nor downloadable."""
    if os.path.isdir(model) or not _HF_ID.match(model):
        return model if os.path.isdir(model) else None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub"
    )
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
    try:
        return snapshot_download(model, cache_dir=cache, local_files_only=True, allow_patterns=patterns)
    except (HFValidationError, OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline:
        try:
            return snapshot_download(model, cache_dir=cache, allow_patterns=patterns)
        except Exception as err:  # network, auth, no such repo: all end the same way for the user
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise ValueError(f"model {model!r} is not a local folder, not in the Hugging Face cache ({cache}), "
                             f"and could not be downloaded ({reason[:160]})") from None
    raise ValueError(f"model {model!r} is not a local folder and not in the Hugging Face cache ({cache}); "
                     "HF_HUB_OFFLINE is set, so it was not downloaded")


def generation_defaults(source: str, model_dir: str) -> dict[str, float | int]:
    """vLLM's --generation-config: 'auto' reads the model folder's generation_config.json, 'vllm' uses
    none, anything else is a folder holding one. Only the sampling fields a request may leave unset."""
    if source == "vllm":
        return {}
    folder = model_dir if source == "auto" else source
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        if source != "auto":
            raise ValueError(f"--generation-config {source!r}: no generation_config.json in that folder")
        return {}
    with open(path) as f:
        config = json.load(f)
    return {k: config[k] for k in GENERATION_DEFAULT_KEYS if isinstance(config.get(k), int | float)}
