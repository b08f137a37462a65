"""Shared test set-up. Kernel tests run Triton in its CPU interpreter when no GPU is present.

The whole CPU suite (`python -m pytest -q`, no paths: what CI runs) runs on two pytest-xdist workers when
pytest-xdist is installed: most tests are one interpreter thread, so two of them keep both cores of a 2-core runner
busy. The tests marked `serial` (a served stack or several engine ranks, with deadlines) run one at a time, first,
on one worker, while the other worker takes the rest module by module. Paths on the command line, a GPU, or `-n`
given keep pytest's own behaviour (`-n 0`: one process)."""

from __future__ import annotations

import ast
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the workers share the machine's cores: one torch thread per worker, and per process it spawns (rank processes
    # read OMP_NUM_THREADS when torch loads), not one per core each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    # must be set before any module decorates a @triton.jit kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import triton_interpreter

    triton_interpreter.install()  # the same kernels' results, without re-patching triton.language per device call

WORKERS = 2  # the project's CI runner: 2 cores
SERIAL = "serial"


@cache
def is_serial_module(path: str) -> bool:
    """Whether the test module at path is marked `serial` (a module-level pytestmark), read from its source: the
    xdist controller, which schedules, never imports the tests."""
    if not path.endswith(".py"):
        return False
    tree = ast.parse(Path(path).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return any(isinstance(n, ast.Attribute) and n.attr == SERIAL for n in ast.walk(node.value))
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    # before xdist's own hook reads -n; a worker (workerinput) runs as its controller said
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if (config.option.numprocesses is None and config.option.dist == "no" and whole_suite
            and not config.option.collectonly and not config.option.usepdb and not torch.cuda.is_available()):
        config.option.numprocesses = WORKERS
        config.option.dist = "loadscope"  # a module per work unit: its module fixtures made once
        config.option.loadscopereorder = False  # units in collection order: the serial one first


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    # a worker re-reads the command line only, which has no --dist when pytest_cmdline_main chose it
    node.workerinput["dist"] = node.config.option.dist


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.option.dist != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SerialFirst(LoadScopeScheduling):
        """loadscope (a unit per module), with every `serial` module in one unit: those run one at a time."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SERIAL if is_serial_module(str(config.rootpath / module)) else module

    return SerialFirst(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # a worker's collection, in the order the scheduler makes its units: the serial unit first (the longest)
    if getattr(config, "workerinput", {}).get("dist") == "loadscope":
        items.sort(key=lambda item: not is_serial_module(str(item.path)))  # stable: collection order otherwise
