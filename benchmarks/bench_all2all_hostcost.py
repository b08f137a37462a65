"""The host's cost of one expert dispatch + combine (benchmarks/bench_all2all_dist.py --host-cost): wall time, the
part spent inside the collectives, kernel-running aten ops and host syncs, counted on whatever device runs it.

A host sync is anything that makes the host wait for the device, counted the same way on the CPU (where nothing
waits) as on a GPU:
- reads: .tolist() / .item() / int() of a tensor, a copy to the host;
- uploads: a tensor made from host data (torch.tensor(list, device=...), a copy from the host), which waits for the
  stream unless it comes from pinned memory, non-blocking (a Python scalar stored into a tensor is a fill, not
  counted);
- shapes: ops whose output size depends on the data (nonzero, masked_select, boolean-mask indexing,
  repeat_interleave without output_size, unique): the host reads the size.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that run no kernel: allocation and metadata (views are skipped by func.is_view)
FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
            "resolve_conj", "resolve_neg", "set_", "_unsafe_view", "t", "split", "split_with_sizes", "chunk",
            "unbind", "_local_scalar_dense"}
SHAPE_OPS = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"}
COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "all_gather")


class HostSyncs(TorchDispatchMode):
    """Inside it: ops (kernel-running aten ops, in order) and Counter syncs {'reads', 'uploads', 'shapes'} with
    one example op each in sync_ops. tolist() runs no aten op on a CPU tensor: it is patched while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs: Counter[str] = Counter()
        self.sync_ops: list[str] = []
        self._in_tolist = False
        self._tolist: Any = None
        self._triton_runs: dict[type, Any] = {}

    def _sync(self, kind: str, what: str) -> None:
        self.syncs[kind] += 1
        self.sync_ops.append(f"{kind}:{what}")

    def __enter__(self) -> HostSyncs:
        self._tolist = torch.Tensor.tolist
        original, counter = self._tolist, self

        def tolist(t: torch.Tensor) -> Any:
            counter._sync("reads", "tolist")
            counter._in_tolist = True
            try:
                return original(t)
            finally:
                counter._in_tolist = False

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        for cls, run in self._triton_runs.items():
            cls.run = run
        super().__exit__(*exc)

    def _patch_triton(self) -> None:
        """A Triton launch (compiled or interpreted) is one op 'triton:<kernel>'; its own host-side tensor
        handling (the interpreter's copies) is not counted."""
        from torch.utils._python_dispatch import _pop_mode_temporarily
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self._triton_runs = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
        counter = self

        def wrap(original: Any) -> Any:
            def run(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
                if not warmup:
                    counter.ops.append(f"triton:{fn.fn.__name__}")
                with _pop_mode_temporarily():
                    return original(fn, *args, grid=grid, warmup=warmup, **kwargs)
            return run

        for cls, original in self._triton_runs.items():
            cls.run = wrap(original)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not func.is_view and name not in FREE_OPS:
            self.ops.append(name)
        if name == "_local_scalar_dense" and not self._in_tolist:
            self._sync("reads", "item")
        elif name == "lift_fresh" and (args[0].dim() > 0 or args[0].device.type != "cpu"):
            # (a 0-dim host tensor is how `t[i] = 3` passes its scalar: a fill on the device, no copy)
            self._sync("uploads", "tensor(host data)")
        elif name in ("_to_copy", "copy_") and not self._in_tolist:
            src = args[1] if name == "copy_" else args[0]
            dst_device = args[0].device if name == "copy_" else kwargs.get("device", src.device)
            if src.device.type == "cpu" and torch.device(dst_device).type != "cpu":
                self._sync("uploads", name)
            elif src.device.type != "cpu" and torch.device(dst_device).type == "cpu":
                self._sync("reads", name)
        elif name in SHAPE_OPS:
            self._sync("shapes", name)
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self._sync("shapes", "boolean index")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
            self._sync("shapes", "repeat_interleave")
        return func(*args, **kwargs)

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())


class CollectiveClock:
    """Wall seconds spent inside torch.distributed's collectives while on (patched at the module, where the
    backends look them up at call time)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> CollectiveClock:
        for name in COLLECTIVES:
            original = self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(original))
        return self

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)


class OpClock(TorchDispatchMode):
    """Host seconds per aten op name and per Triton kernel ('triton:<name>', the whole Python launch path) while
    on: where an eager exchange's host time goes when it is neither syncs nor collectives. The mode's own cost
    (a Python call per op) is in every entry."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: Counter[str] = Counter()
        self._triton_runs: dict[type, Any] = {}

    def __enter__(self) -> OpClock:
        from torch.utils._python_dispatch import _pop_mode_temporarily
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self._triton_runs = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
        clock = self

        def wrap(original: Any) -> Any:
            def run(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                with _pop_mode_temporarily():
                    out = original(fn, *args, grid=grid, warmup=warmup, **kwargs)
                clock.seconds[f"triton:{fn.fn.__name__}"] += time.perf_counter() - t0
                return out
            return run

        for cls, original in self._triton_runs.items():
            cls.run = wrap(original)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for cls, run in self._triton_runs.items():
            cls.run = run
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[func.overloadpacket.__name__] += time.perf_counter() - t0
        return out


def host_cost(step: Callable[[], Any], barrier: Callable[[], None], reps: int, warmup: int = 2) -> dict[str, Any]:
    """step() = one dispatch + expert + combine. Per rep (after barrier(), which should also let the device go
    idle): host wall from the call to the return (no device sync after it: only the syncs inside count), and the
    part inside the collectives; medians. One more rep counts the ops and the syncs, and reps more split the host
    time by op and Triton kernel (OpClock; op_us: median microseconds per rep, largest first)."""
    for _ in range(warmup):
        step()
    walls, inside = [], []
    for _ in range(reps):
        barrier()
        with CollectiveClock() as clock:
            t0 = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t0)
        inside.append(clock.seconds)
    barrier()
    with HostSyncs() as counted:
        step()
    split: dict[str, list[float]] = {}
    for _ in range(reps):
        barrier()
        with OpClock() as ops:
            step()
        for name, sec in ops.seconds.items():
            split.setdefault(name, []).append(sec * 1e6)
    op_us = {name: statistics.median(v + [0.0] * (reps - len(v))) for name, v in split.items()}
    op_us = dict(sorted(op_us.items(), key=lambda kv: -kv[1]))
    wall_us, coll_us = statistics.median(walls) * 1e6, statistics.median(inside) * 1e6
    return dict(wall_us=wall_us, collectives_us=coll_us, own_us=statistics.median(w - c for w, c in zip(walls, inside))
                * 1e6, num_ops=len(counted.ops), num_syncs=counted.num_syncs, syncs=dict(counted.syncs),
                sync_ops=counted.sync_ops, ops=dict(Counter(counted.ops)), op_us=op_us)


def host_profile(step: Callable[[], Any], barrier: Callable[[], None], reps: int, top: int = 15) -> str:
    """Where step()'s host time goes, Python function by function (cProfile over reps steps after a barrier), the
    top functions by their own time: what OpClock's per-op split cannot name (the Python between the ops, the
    launchers' argument handling). Every rank must call it (the steps hold collectives); the caller prints one."""
    import cProfile
    import io
    import pstats

    barrier()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(reps):
        step()
    profile.disable()
    barrier()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()
