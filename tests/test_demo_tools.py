"""The demo trainer's pieces (tools/): the training model is transformers' Qwen3-MoE, the chat pairs read well,
and the held-out split is a fixed rule. The trained checkpoint itself is tested in test_demo_model.py."""

from __future__ import annotations

import torch
from transformers import Qwen3MoeConfig

from tools.demo_corpus import Doc, is_heldout
from tools.demo_model import DemoMoE, per_layer_balance_loss, to_transformers
from tools.demo_pairs import chat_pairs, first_sentences, short_title


def tiny_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip


@torch.no_grad()
def test_training_model_equals_transformers() -> None:
    torch.manual_seed(0)
    model = DemoMoE(tiny_config())
    for p in model.parameters():
        if p.dim() == 1:
            p.normal_(1.0, 0.1)  # norms away from 1, so a misplaced norm weight shows
    hf = to_transformers(model).eval()
    ids = torch.randint(0, 96, (2, 11))
    logits, router_logits = model(ids)
    want = hf(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(logits, want.logits, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(router_logits, want.router_logits, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_balance_loss_is_one_when_routing_is_even() -> None:
    even = [torch.zeros(64, 8)]  # equal logits: top-2 ties resolve to experts 0 and 1, but probs are uniform
    assert abs(per_layer_balance_loss(even, 2).item() - 1.0) < 1e-6
    skewed = [torch.tensor([[5.0, 4.0] + [0.0] * 6] * 64)]
    assert per_layer_balance_loss(skewed, 2).item() > 3.0


def test_chat_pairs_from_docstrings() -> None:
    doc = Doc("json", "json.dumps", "Serialize ``obj`` to a JSON formatted ``str``.\n\nIf ``skipkeys`` is true then "
              "dict keys that are not basic types are skipped.\n\nArgs:\n    obj: x", "function", "dumps",
              "(obj, *, skipkeys=False)")  # fmt: skip
    pairs = chat_pairs(doc)
    assert len(pairs) == 2 and all(p.startswith("<|im_start|>user\n") for p in pairs)
    assert "json.dumps" in pairs[0] and "Serialize obj to a JSON formatted str. If skipkeys is true" in pairs[0]
    assert "Args" not in pairs[0]
    private = Doc("json", "json._helper", "Does a private thing for the module.", "function", "_helper")
    assert chat_pairs(private) == []
    assert first_sentences(">>> dumps(1)\n'1'") is None
    assert first_sentences("Return the number of items in a container.") == "Return the number of items in a container."


def test_short_titles_are_how_users_spell_names() -> None:
    linear = Doc("torch", "torch.nn.modules.linear.Linear", "Applies a linear map.", "class", "Linear")
    assert short_title(linear) == "torch.nn.Linear"
    join = Doc("posixpath", "posixpath.join", "Join two or more pathname components.", "function", "join")
    assert short_title(join) == "os.path.join"


def test_heldout_rule_is_fixed() -> None:
    # the same packages as the first demo model held out; json and torch are trained on
    assert is_heldout("calendar") and is_heldout("pickle") and is_heldout("pygments")
    assert not is_heldout("json") and not is_heldout("torch") and not is_heldout("builtins")
