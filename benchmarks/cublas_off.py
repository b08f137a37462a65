"""Run a benchmark script with the FP8 linear table's cuBLAS routes dropped: the A/B baseline of CUBLAS 1.

python benchmarks/cublas_off.py benchmarks/bench_e2e.py --no-hf --shape glm-4.5-air --quantization fp8 ...

Every entry of kernels/configs/fp8_linear_<gpu>.json runs its own Triton tile (CUBLAS 0), as before session 15;
everything else, and the script's arguments, as they are.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels.linear.w8a8 as w8a8  # noqa: E402
import kernels.linear.w8a8_config as w8a8_config  # noqa: E402
from benchmarks.gluon_off import run_script  # noqa: E402


def without_cublas(load):
    @functools.lru_cache(maxsize=16)
    def wrapped(path: str) -> dict[str, dict[int, dict]]:
        return {key: {m: dict(cfg, CUBLAS=0) for m, cfg in buckets.items()} for key, buckets in load(path).items()}
    return wrapped


if __name__ == "__main__":
    w8a8_config._load = without_cublas(w8a8_config._load.__wrapped__)
    w8a8._resolve.cache_clear()
    run_script("benchmarks/cublas_off.py")
