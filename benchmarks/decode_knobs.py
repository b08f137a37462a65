"""Run a benchmark script with decode-attention knobs set on every decode config of this GPU's attention table (and
their small-batch configs): the A/B of a knob the table does not set yet.

python benchmarks/decode_knobs.py fp8_q2=1 benchmarks/bench_e2e.py --no-hf --batch-sizes 1 ...

KNOBS: comma-separated KEY=INT, KEY any integer key of a decode config (kernels/attention/config.py's DECODE_KEYS:
the tiles, the split rule, the knobs). Everything else, and the script's arguments, as they are.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels.attention.config as attention_config  # noqa: E402
from benchmarks.gluon_off import run_script  # noqa: E402

# every integer key of a decode config (small_batch_config is a config, not a number)
KEYS = tuple(k for k in attention_config.DECODE_KEYS if k != "small_batch_config")


def parse_knobs(spec: str) -> dict[str, int]:
    knobs = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in KEYS or not value.lstrip("-").isdigit():
            sys.exit(f"decode_knobs: {item!r} is not KEY=INT with KEY one of {', '.join(KEYS)}")
        knobs[key] = int(value)
    return knobs


def with_decode_knobs(load, knobs: dict[str, int]):
    def set_knobs(cfg: dict) -> dict:
        small = cfg.get("small_batch_config")
        return {**cfg, **knobs, **({"small_batch_config": {**small, **knobs}} if small else {})}

    @functools.lru_cache(maxsize=16)
    def wrapped(path: str) -> dict:
        table = load(path)
        decode = {key: set_knobs(cfg) for key, cfg in table.get("decode", {}).items()}
        # a head_dim / cache dtype the table lacks runs the default config, without the knobs: say which got them
        print(f"decode_knobs: {knobs} on {', '.join(decode) or 'no decode config'} of {Path(path).name}",
              file=sys.stderr, flush=True)
        return {**table, "decode": decode} if "decode" in table else table
    return wrapped


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python benchmarks/decode_knobs.py KEY=INT[,KEY=INT] SCRIPT [ARGS...]")
    knobs = parse_knobs(sys.argv.pop(1))
    attention_config._load = with_decode_knobs(attention_config._load.__wrapped__, knobs)
    attention_config._resolve.cache_clear()
    run_script("benchmarks/decode_knobs.py KEY=INT")
