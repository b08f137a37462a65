"""A faster Triton CPU interpreter for the tests (installed by conftest.py when TRITON_INTERPRET=1).

Triton 3.6's interpreter re-patches triton.language (inspect.getmembers over tl, tl.core, tl.math and tl.tensor, a
few hundred setattrs) at every call of a @triton.jit device function, in every program of the grid: 40% of an
interpreted MoE GEMV's time. Within one launch (GridExecutor.__call__) a device function whose language modules
(tl, tl.core) were all patched already in that launch -- by the kernel's own patch, or by an earlier device call (tl.sum
sees tl.core) -- is not patched again; the first call that sees another module, and any call outside a launch, is
patched as before. What a kernel computes is unchanged: the same patched functions run, they are only not re-made."""

from __future__ import annotations

import functools
from typing import Any


class _NoPatch:
    def restore(self) -> None:
        pass


def install() -> bool:
    """Wraps the interpreter's patching; False (nothing changed) on a Triton without the expected internals."""
    import triton.language as tl
    from triton.runtime import interpreter

    if not all(hasattr(obj, name) for obj, name in ((interpreter, "_patch_lang"), (interpreter, "GridExecutor"),
                                                       (interpreter, "InterpretedFunction"))):
        return False
    if getattr(interpreter._patch_lang, "_launch_aware", False):
        return True
    patch_lang, grid_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    launches: list[frozenset[int] | None] = []  # per launch in progress: the language modules patched in it so far

    lang, core = tl, tl.core

    def langs_of(fn: Any) -> frozenset[int]:
        # the modules _patch_lang patches for fn (those of its globals that are tl or tl.core), by identity: cheap
        return frozenset(id(v) for v in fn.__globals__.values() if v is lang or v is core)

    @functools.wraps(patch_lang)
    def launch_aware_patch_lang(fn: Any) -> Any:
        langs = langs_of(fn)
        if launches and launches[-1] is not None and langs <= launches[-1]:
            return _NoPatch()  # a device function inside a launch whose kernel patched these modules already
        scope = patch_lang(fn)
        if launches:
            launches[-1] = langs | (launches[-1] or frozenset())  # the kernel's patch, or a device function's
        return scope

    @functools.wraps(grid_call)
    def launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        launches.append(None)
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches.pop()

    launch_aware_patch_lang._launch_aware = True  # type: ignore[attr-defined]
    interpreter._patch_lang = launch_aware_patch_lang
    interpreter.GridExecutor.__call__ = launch
    return True
