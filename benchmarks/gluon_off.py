"""Run a benchmark script with this GPU's tables' Gluon entries dropped: the A/B baseline of the Gluon kernels.

python benchmarks/gluon_off.py benchmarks/bench_e2e.py --no-hf --batch-sizes 1 --prefill 8192 ...

The MoE tables lose their "tma" entries that set "gluon" (the large-M MoE then runs the old path, as before session
12), the attention table's prefill entries lose "gluon" (the Triton prefill at every length). Everything else, and
the script's arguments, as they are.
"""

from __future__ import annotations

import functools
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels.attention.config as attention_config  # noqa: E402
import kernels.moe_config as moe_config  # noqa: E402


def without_gluon_moe(load):
    @functools.lru_cache(maxsize=64)
    def wrapped(path: str) -> dict[int, dict] | None:
        table = load(path)
        return table and {m: {k: v for k, v in cfg.items() if not (k == "tma" and v.get("gluon"))}
                          for m, cfg in table.items()}
    return wrapped


def without_gluon_attention(load):
    @functools.lru_cache(maxsize=16)
    def wrapped(path: str) -> dict:
        table = load(path)
        prefill = {key: {k: v for k, v in cfg.items() if k != "gluon"} for key, cfg in table.get("prefill", {}).items()}
        return {**table, "prefill": prefill} if "prefill" in table else table
    return wrapped


def run_script(usage: str) -> None:
    """Run sys.argv[1] as __main__ with the rest of the arguments (after the caller patched the tables)."""
    if len(sys.argv) < 2:
        sys.exit(f"usage: python {usage} SCRIPT [ARGS...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    moe_config._load = without_gluon_moe(moe_config._load.__wrapped__)
    attention_config._load = without_gluon_attention(attention_config._load.__wrapped__)
    attention_config._resolve.cache_clear()
    run_script("benchmarks/gluon_off.py")
