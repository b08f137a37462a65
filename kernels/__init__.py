"""Kernels: each file holds a Triton kernel, a checked wrapper and a torch reference of the same signature."""

import os


def use_persistent_cache(gpu_name: str) -> str:
    """Points Triton's compile cache at ~/.cache/moe-runtime/triton/<gpu>-triton<version> (unless the user set
    TRITON_CACHE_DIR), so a restarted rank loads its kernels instead of compiling them again."""
    import triton

    if not os.environ.get("TRITON_CACHE_DIR"):
        gpu = "".join(c if c.isalnum() else "_" for c in gpu_name)
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        name = f"{gpu}-triton{triton.__version__}"
        os.environ["TRITON_CACHE_DIR"] = os.path.join(base, "moe-runtime", "triton", name)
    return os.environ["TRITON_CACHE_DIR"]


def zeroed_counters(pool: dict, n: int, device, min_numel: int):
    """int32 counters [>= n] for a kernel whose programs count their arrivals and leave the counters at zero
    again: one buffer per device in pool (the caller's module dict), grown, never shrunk, so a CUDA graph that
    captured it keeps a valid pointer (grow it on an eager run before capture)."""
    import torch

    buf = pool.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:
            # kept alive: a CUDA graph captured before this growth (a larger batch's graph, captured first, whose
            # layer needed fewer counters) still points at the old buffer; freed, its memory would go to other
            # tensors and each replay would count on (and corrupt) whatever they hold
            _RETIRED_COUNTERS.append(buf)
        buf = torch.zeros(max(n, min_numel), dtype=torch.int32, device=device)
        pool[device] = buf
    return buf


_RETIRED_COUNTERS: list = []  # counter buffers replaced by larger ones, never freed (see zeroed_counters)
