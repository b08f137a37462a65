"""Every rank checks at start that the settings shaping collectives and graphs agree (two gloo ranks)."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from tests.test_all2all import free_port, spawn_ranks

TIMEOUT_S = 60.0


def _worker(rank: int, world: int, port: int, model_dir: str, overrides: list[dict], out_dir: str) -> None:
    from runtime.config import ConfigError, EngineConfig
    from runtime.distributed.config_agreement import check_group_agreement
    from runtime.distributed.parallel import destroy_parallel, init_parallel

    config = EngineConfig(model=model_dir, device="cpu", data_parallel_size=world, **overrides[rank])
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    parallel = init_parallel(config, env, timeout_s=TIMEOUT_S)
    try:
        check_group_agreement(config, parallel)
        result = "ok"
    except ConfigError as e:
        result = str(e)
    finally:
        destroy_parallel()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(result)


def _run(overrides: list[dict]) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2}, f)
        spawn_ranks(_worker, (2, free_port(), d, overrides, d), 2, TIMEOUT_S, "agreement ranks")
        out = []
        for r in range(2):
            with open(os.path.join(d, f"rank{r}.txt")) as f:
                out.append(f.read())
        return out


@pytest.mark.parametrize("overrides, field", [
    ([{}, {}], None),
    ([{"expert_token_capacity": 64}, {"expert_token_capacity": 32}], "--expert-token-capacity"),
    ([{"max_num_batched_tokens": 512}, {}], "--max-num-batched-tokens"),
])
def test_ranks_refuse_settings_that_differ(overrides: list[dict], field: str | None) -> None:
    results = _run(overrides)
    if field is None:
        assert results == ["ok", "ok"]
        return
    for rank, line in enumerate(results):  # both refuse (none is left waiting in a collective), in one line
        assert line.startswith(f"ranks disagree on {field}: rank {rank} has "), line
        assert "\n" not in line
