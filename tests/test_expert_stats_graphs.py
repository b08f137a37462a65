"""Expert statistics' traffic counters around CUDA-graph captures, on the CPU: a capture is modelled by a dispatch
mode in which nothing runs (in-place ops are skipped, new tensors hold junk), as on a GPU stream being captured."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from runtime.distributed import expert_stats
from runtime.distributed.expert_stats import ExpertStats

JUNK = 1 << 40


class _Captured(TorchDispatchMode):
    """Ops issued while a stream is captured are recorded, not run: allocations hold whatever was in memory,
    fills and adds leave their output as it was."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.is_view:
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name.endswith("_"):  # in place (fill_, add_): not run until the graph replays
            return args[0]
        out = func(*args, **kwargs)
        if name in ("zeros", "empty", "full", "new_zeros", "new_empty") and isinstance(out, torch.Tensor):
            out.fill_(JUNK)
        return out


def test_a_row_made_inside_a_capture_is_not_reused_outside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once 256 rows are cached (the dynamic mode's varying host ints), a capture makes its row by fills that run
    only when that graph replays. The next eager exchange with the same values (a dummy step's warm-up of the same
    size, an eager prefill of as many tokens) must not add that row's undefined contents."""
    stats = ExpertStats(num_moe_layers=1, num_experts=4, device=torch.device("cpu"))
    for i in range(256):  # eager dynamic exchanges, each with other host ints
        stats.record_exchange(0, i, i, 10 * i, 10 * i, 100, 1)
    before = stats._traffic.clone()
    monkeypatch.setattr(expert_stats, "_capturing", lambda device: True)
    with _Captured():  # a static exchange captured in a decode graph: recorded, not run
        stats.record_exchange(0, None, None, 64, 64, 256)
    monkeypatch.setattr(expert_stats, "_capturing", lambda device: False)
    assert torch.equal(stats._traffic, before)  # the capture ran nothing
    stats.record_exchange(0, None, None, 64, 64, 256)  # eager, the same values, before any replay
    assert (stats._traffic - before).tolist() == [[0, 0, 64, 64, 1, 0, 256]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA stream sync")
def test_an_eager_exchange_of_new_values_does_not_wait_for_the_gpu() -> None:
    """The dynamic mode's host ints differ step to step: each makes a row, whose copy must not wait for the stream
    (the all2all just launched; a pageable torch.tensor(..., device=cuda) copy does)."""
    stats = ExpertStats(num_moe_layers=1, num_experts=4, device=torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats.record_exchange(0, 3, 5, 100, 80, 400, 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert stats._traffic[0].tolist() == [3, 5, 100, 80, 2, 0, 400]
