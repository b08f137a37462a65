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
