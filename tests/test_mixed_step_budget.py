"""One rank's long prefill must not freeze another rank's decode under EP lockstep: with
--mixed-step-token-budget the prompt goes in chunks, in step with the other rank's decode (DP=2/EP=2 gloo)."""

from __future__ import annotations

import pytest

from benchmarks.bench_mixed_itl import run_once

pytestmark = [pytest.mark.slow, pytest.mark.serial]

LONG_LEN = 1500
BUDGET = 128


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_moe_long")), "Qwen3MoeForCausalLM",
                                max_position_embeddings=2048)


def test_stream_keeps_decoding_while_another_rank_prefills(model: str) -> None:
    r = run_once(model, BUDGET, LONG_LEN, timeout_s=120)
    print(f"\n{r}")
    # 1500 tokens in chunks of 128: about 12 steps, each one token of the stream (in one step it would be 1)
    assert r["tokens_in_window"] >= LONG_LEN // BUDGET - 3, r
