"""The layout's rule, checked on the source: every import runs down the layers and none goes round in a circle.

kernels < models < runtime's base modules < runtime/distributed < runtime/engine < runtime/cluster < server <
the top (runtime/serve.py, llm.py, generate.py). Imports under `if TYPE_CHECKING:` are type hints only.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = {"runtime.config", "runtime.sampling_params", "runtime.messages", "runtime.outputs", "runtime.tokenizer",
        "runtime.detokenizer", "runtime.model_source", "runtime.structured_output", "runtime.output_processor"}
TOP = {"runtime", "runtime.serve", "runtime.llm", "runtime.generate"}
ROOMS = [("kernels", 0), ("models", 1), ("runtime.distributed", 3), ("runtime.engine", 4), ("runtime.cluster", 5),
         ("server", 6)]


def layer(module: str) -> int:
    if module in BASE:
        return 2
    if module in TOP:
        return 7
    for prefix, rank in ROOMS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layout.py")


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in ("kernels", "models", "runtime", "server"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    hints = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
             for stmt in node.body for n in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_imports_run_down_the_layers_without_cycles() -> None:
    mods = modules()
    graph = {m: {d for d in imported(p) if d in mods and d != m} for m, p in mods.items()}
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
              if layer(d) > layer(m) and not (d == "runtime" and m.startswith("runtime."))]
    assert not upward, f"imports that run up the layers: {upward}"
    # a cycle: a module that reaches itself again
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"an import cycle through {start}"
            if m not in seen:
                seen.add(m)
                todo += graph[m]


def test_no_room_holds_a_third_of_the_code() -> None:
    sizes: dict[str, int] = {}
    for module, path in modules().items():
        room = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        sizes[room] = sizes.get(room, 0) + len(path.read_text().splitlines())
    total = sum(sizes.values())
    assert max(sizes.values()) < total / 3, sizes
