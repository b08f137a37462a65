"""--lockstep-lookahead on DP=2/EP=2 gloo ranks: each rank reports its next plan while the step runs and
schedules within the agreed pad; greedy tokens equal one rank's, and the ranks go quiet when idle."""

from __future__ import annotations

import time

import pytest

from runtime.cluster.lookahead import estimate_next_step
from runtime.engine.block_manager import BlockManager
from runtime.engine.scheduler import Scheduler
from runtime.engine.sequence import Sequence
from runtime.sampling_params import SamplingParams
from tests.test_serve import PROMPTS, reference_tokens, served, tiny_models  # noqa: F401

pytestmark = pytest.mark.serial


def test_estimate_counts_what_the_step_in_flight_leaves() -> None:
    sch = Scheduler(BlockManager(num_blocks=256, block_size=4), max_num_seqs=8, max_num_batched_tokens=64)
    a = Sequence("a", list(range(3, 103)), SamplingParams(max_tokens=4))  # 100-token prompt
    b = Sequence("b", [1, 2], SamplingParams(max_tokens=4))
    sch.add(a)
    sch.add(b)
    batch = sch.schedule()  # a's first 64-token chunk; b waits for room
    assert batch.num_new_tokens == [64]
    assert estimate_next_step(sch, batch) == (38, 0)  # a's 36 left + b's 2
    assert estimate_next_step(sch, batch, step_budget=16) == (16, 0)
    a.num_computed_tokens = 100  # a sampled: it decodes one token next
    a.token_ids.append(7)
    assert estimate_next_step(sch, None) == (3, 1)  # a's decode + b's 2-token prompt


@pytest.mark.slow
def test_dp2_ep2_lookahead_tokens_equal_and_quiet(tiny_models: dict[str, str]) -> None:  # noqa: F811
    model = tiny_models["Qwen3MoeForCausalLM"]
    ref = reference_tokens(model, PROMPTS, 8)
    with served(model, dp=2, ep=True, extra=["--lockstep-lookahead"]) as (front, _):
        front.submit("solo", PROMPTS[0], 8)  # one busy rank: the other pads with dummy steps
        front.wait_finished(120)
        assert front.tokens["solo"] == ref[0]
        for i, p in enumerate(PROMPTS):  # a batch over both ranks, arriving while they are idle
            front.submit(str(i), p, 8)
        front.wait_finished(120)
        assert [front.tokens[str(i)] for i in range(len(PROMPTS))] == ref
        assert sorted(set(front.ranks[str(i)] for i in range(len(PROMPTS)))) == [0, 1]
        before = front.wait_stats(10).num_steps_issued
        time.sleep(1.5)
        assert front.wait_stats(10).num_steps_issued == before  # quiet when idle
