"""--model org/name through the Hugging Face cache (offline), its one-line error, and --generation-config."""

from __future__ import annotations

import json
import os

import pytest

from runtime.config import ConfigError, EngineConfig
from runtime.model_source import generation_defaults
from runtime.sampling_params import SamplingParams
from server.metrics import Metrics
from server.protocol import CompletionRequest
from server.serving import Serving


def _fake_cache(root: str, repo: str) -> str:
    """A snapshot laid out as huggingface_hub's cache keeps it: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    snap = os.path.join(base, "snapshots", commit)
    os.makedirs(snap)
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 512, "max_position_embeddings": 64}, f)
    with open(os.path.join(snap, "generation_config.json"), "w") as f:
        json.dump({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True}, f)
    return snap


def test_hf_id_resolves_through_the_cache(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _fake_cache(str(tmp_path), "some-org/Tiny-Model")
    config = EngineConfig(model="some-org/Tiny-Model")
    assert os.path.samefile(config.model, snap) and config.model_name == "some-org/Tiny-Model"
    assert EngineConfig(model="some-org/Tiny-Model", served_model_name="x").model_name == "x"
    with pytest.raises(ConfigError, match="not in the Hugging Face cache") as err:
        EngineConfig(model="some-org/missing")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        EngineConfig(model="/no/such/folder")


def test_generation_config_defaults(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = _fake_cache(str(tmp_path), "org/m")
    assert generation_defaults("auto", snap) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert generation_defaults("vllm", snap) == {}
    assert generation_defaults(snap, "/elsewhere") == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    with pytest.raises(ConfigError, match="generation-config"):
        EngineConfig(model=snap, generation_config=str(tmp_path))
    serving = Serving("m", 64, 512, None, None, None, Metrics("m"))  # type: ignore[arg-type]
    serving.generation_defaults = generation_defaults("auto", snap)
    req = CompletionRequest.model_validate({"prompt": [1, 2]})
    p = serving.sampling_params(req, None)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 20)
    req = CompletionRequest.model_validate({"prompt": [1], "temperature": 0.0, "top_k": -1})
    p = serving.sampling_params(req, None)
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.95, 0)
    assert SamplingParams().temperature == 1.0  # the engine's own default is untouched
