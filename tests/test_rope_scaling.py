"""RoPE scaling as checkpoints declare it (linear, dynamic NTK, yarn, llama3) vs transformers' logits; bad
rope configs fail at start-up with one line."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from runtime.config import ConfigError, EngineConfig, model_max_len
from tests.test_models import PagedRun, load
from tests.tiny import make_tiny_checkpoint

ORIGINAL_LEN = 32  # max_position_embeddings of the scaled checkpoints: the prompts below run past it
ROPES: dict[str, dict[str, Any]] = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 4.0},  # the old key name
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_LEN},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16,
                    "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}
ARCHS = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rope")
    return {arch: make_tiny_checkpoint(str(root / arch), arch, num_hidden_layers=2) for arch in ARCHS}


def with_rope(src: str, dst: str, rope: dict[str, Any] | None, **fields: Any) -> str:
    """A copy of src (weights linked) whose config.json declares rope_scaling."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "config.json":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters", None)
    cfg.update({"rope_theta": 10000.0, "max_position_embeddings": ORIGINAL_LEN, "rope_scaling": rope} | fields)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def hf_model(path: str) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["linear", "yarn", "yarn_mscale", "llama3"])
def test_static_scaling_logits_match_transformers(arch: str, kind: str, base_checkpoints: dict[str, str],
                                                  tmp_path: Any) -> None:
    # llama3 checkpoints declare the scaled context in max_position_embeddings
    fields = {"max_position_embeddings": 128} if kind == "llama3" else {}
    path = with_rope(base_checkpoints[arch], str(tmp_path / kind), ROPES[kind], **fields)
    ours, hf = load(path), hf_model(path)
    gen = torch.Generator().manual_seed(3)
    toks = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (70, 9)]
    with torch.no_grad():
        expected = [hf(torch.tensor([p])).logits[0] for p in toks]
        run = PagedRun(ours, 70, len(toks))
        prefill = run.step([p[:-1] for p in toks], [0, 0])
        decode = run.step([p[-1:] for p in toks], [len(p) - 1 for p in toks])
    torch.testing.assert_close(prefill, torch.cat([e[:-1] for e in expected]), atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(decode, torch.stack([e[-1] for e in expected]), atol=2e-4, rtol=2e-4)
    # the scaling matters: the same weights without it give other logits past the original length
    plain = load(with_rope(base_checkpoints[arch], str(tmp_path / "plain"), None, max_position_embeddings=128))
    with torch.no_grad():
        unscaled = PagedRun(plain, 70, 1).step([toks[0]], [0])
    assert (unscaled - expected[0]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_ntk_matches_transformers_decoding_past_the_original_length(
        arch: str, base_checkpoints: dict[str, str], tmp_path: Any) -> None:
    # transformers recomputes theta from the step's largest position; for a prompt within
    # max_position_embeddings and one-token decode steps beyond it, that is our per-position table
    path = with_rope(base_checkpoints[arch], str(tmp_path / "dynamic"), ROPES["dynamic"])
    ours, hf = load(path), hf_model(path)
    prompt = torch.randint(0, 512, (ORIGINAL_LEN - 4,), generator=torch.Generator().manual_seed(4)).tolist()
    steps = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        expected, cache = [out.logits[0, -1]], out.past_key_values
        for tok in steps:
            out = hf(torch.tensor([[tok]]), cache=cache, use_cache=True)
            expected.append(out.logits[0, -1])
            cache = out.past_key_values
        run = PagedRun(ours, len(prompt) + len(steps) + 1, 1)
        got = [run.step([prompt], [0])[-1]]
        for i, tok in enumerate(steps):
            got.append(run.step([[tok]], [len(prompt) + i])[0])
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=2e-4, rtol=2e-4)


def test_model_max_len_follows_rope_scaling(base_checkpoints: dict[str, str], tmp_path: Any) -> None:
    from server.api_server import max_model_len_of

    src = base_checkpoints["Qwen3ForCausalLM"]
    qwen3_yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cases = [(None, 32), (ROPES["linear"], 128), (ROPES["dynamic"], 128), (qwen3_yarn, 131072),
             (ROPES["llama3"], 32), (ROPES["yarn_mscale"], 128)]
    for i, (rope, expected) in enumerate(cases):
        path = with_rope(src, str(tmp_path / str(i)), rope)
        with open(os.path.join(path, "config.json")) as f:
            assert model_max_len(json.load(f)) == expected
        assert EngineConfig(model=path).resolved_max_model_len() == expected
        assert max_model_len_of(EngineConfig(model=path)) == expected  # the front end's 400 uses the same limit
        with pytest.raises(ConfigError, match=f"--max-model-len {expected + 1} .* <= {expected}"):
            EngineConfig(model=path, max_model_len=expected + 1)


def test_unsupported_rope_fails_at_config_time_with_one_line(base_checkpoints: dict[str, str], tmp_path: Any,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.serve import parse_args

    src = base_checkpoints["LlamaForCausalLM"]
    longrope = with_rope(src, str(tmp_path / "longrope"), {"rope_type": "longrope", "short_factor": [1.0]})
    with pytest.raises(ConfigError, match="rope_type 'longrope' is not supported"):
        EngineConfig(model=longrope)
    no_factor = with_rope(src, str(tmp_path / "nofactor"), {"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ConfigError, match="needs low_freq_factor, high_freq_factor"):
        EngineConfig(model=no_factor)
    # the launcher stops before any rank starts: exit 2 and one line on stderr
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", longrope, "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "longrope" in err
