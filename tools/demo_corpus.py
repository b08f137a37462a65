"""The demo model's corpus: English about code that every machine with this project installed has, offline.

Sources, walked in sorted order so the corpus is deterministic for one environment:
- module, class and function docstrings of the standard library and of the installed packages (ast, no import),
- docstrings of builtins and C-extension modules (len, str.join, math.sqrt ...), by introspection,
- the .md/.rst/.txt documents and the README (long description) in each package's METADATA.
Documents are deduplicated on their whitespace-normalised text (first occurrence wins), and split into train and
held-out by top-level package: crc32(name) % 10 == 0 is held out (the same rule as the first demo model, so
its held-out stdlib packages are held out here too).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Test suites, vendored copies and the IDE hold few useful docstrings and much repetition; lib2to3 is deprecated.
SKIP_DIRS = {
    "test", "tests", "testing_data", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__",
    "_vendor", "vendor", "vendored", "_vendored", "benchmarks", "examples", "node_modules", ".agents",
}  # fmt: skip
HELDOUT_MODULUS = 10
DOC_SUFFIXES = (".md", ".rst", ".txt")
# boilerplate files that are not prose about code
SKIP_DOC_NAMES = re.compile(
    r"(licen[cs]e|copying|authors|notice|top_level|entry_points|requires|sources|dependency_links|record"
    r"|installer|requested|wheel|zip-safe|namespace_packages|not-zip-safe|requirements)",
    re.IGNORECASE,
)
MAX_DOC_CHARS = 20_000  # a few huge generated files would otherwise dominate

# C-implemented modules whose docstrings ast cannot see; their public functions and types are introspected
INTROSPECT_MODULES = [
    "builtins", "math", "cmath", "itertools", "operator", "time", "sys", "os", "functools", "collections",
    "array", "struct", "binascii", "zlib", "gc", "heapq", "bisect", "io", "datetime", "unicodedata", "select",
]  # fmt: skip
# builtin types whose methods are worth a question (str.join, dict.get, list.sort ...)
BUILTIN_TYPES = ["str", "bytes", "list", "dict", "set", "frozenset", "tuple", "int", "float", "bytearray", "object"]


@dataclass(frozen=True)
class Doc:
    package: str  # top-level package, decides the split
    title: str  # "json.dumps", "len", "numpy/README" ...
    text: str
    kind: str  # "function", "class", "module", "file"
    name: str = ""  # the qualified name inside its module ("JSONEncoder.encode"); "" for modules and files
    signature: str = ""  # "(obj, *, skipkeys=False, ...)" for functions and classes, when known


def is_heldout(package: str) -> bool:
    # by package, so held-out text is not a near copy of a training neighbour
    return zlib.crc32(package.encode()) % HELDOUT_MODULUS == 0


def _public_title(module: str) -> str:
    # numpy._core.fromnumeric -> numpy.fromnumeric: the private segments are not how users spell a name
    parts = [p for i, p in enumerate(module.split(".")) if i == 0 or not p.startswith("_")]
    return ".".join(parts)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        args = ast.unparse(node.args)
    except (ValueError, AttributeError):
        return ""
    args = re.sub(r"^self,?\s*|^cls,?\s*", "", args)
    return f"({args})" if len(args) < 120 else ""


def _docstrings(node: ast.AST, package: str, module: str, name: str, kind: str, sig: str) -> Iterator[Doc]:
    doc = ast.get_docstring(node) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                       ast.AsyncFunctionDef)) else None  # fmt: skip
    if doc and doc.strip():
        title = f"{module}.{name}" if name else module
        yield Doc(package, title, doc.strip()[:MAX_DOC_CHARS], kind, name, sig)
    for child in ast.iter_child_nodes(node):
        child_name = f"{name}.{getattr(child, 'name', '')}" if name else getattr(child, "name", "")
        if isinstance(child, ast.ClassDef):
            init = next((c for c in child.body if isinstance(c, ast.FunctionDef) and c.name == "__init__"), None)
            yield from _docstrings(child, package, module, child_name, "class", _signature(init) if init else "")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not isinstance(node, ast.FunctionDef):
            yield from _docstrings(child, package, module, child_name, "function", _signature(child))


def walk_python(root: str, prefix: str = "") -> Iterator[Doc]:
    """Docstrings of every .py file under root; module names are relative to root."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                             and not d.endswith((".dist-info", ".egg-info")))  # fmt: skip
        for filename in sorted(filenames):
            if not filename.endswith(".py") or filename.startswith("test_"):
                continue
            path = os.path.join(dirpath, filename)
            rel = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
            module = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            if not module.replace(".", "").replace("_", "").isalnum():
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, MemoryError):
                continue
            yield from _docstrings(tree, module.split(".")[0], _public_title(module), "", "module", "")


def walk_doc_files(site_packages: str) -> Iterator[Doc]:
    """Markdown / reStructuredText / text documents shipped inside packages, and each METADATA's README."""
    for dirpath, dirnames, filenames in os.walk(site_packages):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, site_packages)
        if rel_dir == ".":
            continue
        top = rel_dir.split(os.sep)[0]
        is_dist_info = top.endswith(".dist-info")
        package = re.split(r"-\d", top)[0].lower().replace("-", "_") if is_dist_info else top
        for filename in sorted(filenames):
            wanted = filename == "METADATA" if is_dist_info else filename.endswith(DOC_SUFFIXES)
            if not wanted or SKIP_DOC_NAMES.search(filename):
                continue
            try:
                with open(os.path.join(dirpath, filename), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if is_dist_info:
                text = text.split("\n\n", 1)[1] if "\n\n" in text else ""  # the body after the email headers
            text = text.strip()[:MAX_DOC_CHARS]
            if len(text) >= 200:
                yield Doc(package, f"{package}/{filename}", text, "file")


def walk_introspected() -> Iterator[Doc]:
    """Docstrings of C-implemented functions and types (len, str.join, math.sqrt, itertools.chain ...)."""
    for module_name in INTROSPECT_MODULES:
        module = importlib.import_module(module_name)
        prefix = "" if module_name == "builtins" else f"{module_name}."
        for name in sorted(dir(module)):
            obj = getattr(module, name, None)
            if name.startswith("_") or not (inspect.isbuiltin(obj) or (inspect.isclass(obj) and _is_c_type(obj))):
                continue
            if module_name != "builtins" and inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            yield from _introspect(module_name, f"{prefix}{name}", name, obj)
            if inspect.isclass(obj) and (module_name != "builtins" or name in BUILTIN_TYPES):
                for attr in sorted(vars(obj)):
                    member = vars(obj)[attr]
                    if not attr.startswith("_") and callable(member):
                        yield from _introspect(module_name, f"{prefix}{name}.{attr}", f"{name}.{attr}", member)


def _is_c_type(cls: type) -> bool:
    return not hasattr(inspect.getmodule(cls), "__file__") or not str(getattr(inspect.getmodule(cls), "__file__",
                                                                              "")).endswith(".py")  # fmt: skip


def _introspect(package: str, title: str, name: str, obj: object) -> Iterator[Doc]:
    doc = inspect.getdoc(obj)
    if not doc or len(doc) < 20:
        return
    try:
        sig = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        sig = ""
    kind = "class" if inspect.isclass(obj) else "function"
    yield Doc(package, title, doc.strip()[:MAX_DOC_CHARS], kind, name, sig if len(sig) < 120 else "")


def collect_docs(stdlib: str, site_packages: str) -> list[Doc]:
    """Every source above, exact duplicates (after whitespace normalisation) removed, in a fixed order."""
    docs: list[Doc] = []
    seen: set[int] = set()
    sources = [walk_introspected(), walk_python(stdlib), walk_python(site_packages), walk_doc_files(site_packages)]
    for source in sources:
        for doc in source:
            key = zlib.crc32(" ".join(doc.text.split()).encode()) ^ (len(doc.text) << 32)
            if key in seen:
                continue
            seen.add(key)
            docs.append(doc)
    return docs


def plain_text(doc: Doc) -> str:
    head = f"{doc.title}{doc.signature}" if doc.kind in ("function", "class") else doc.title
    return f"{head}\n\n{doc.text}"
