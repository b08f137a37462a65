"""The demo model's corpus: docstrings of the Python standard library, split by package into train and
held-out text, as plain documents and ChatML question/answer pairs."""

from __future__ import annotations

import ast
import os
import random
import zlib
from dataclasses import dataclass

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Test suites and the IDE hold few useful docstrings and much repetition; lib2to3 is deprecated.
SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__"}
HELDOUT_MODULUS = 10  # a package is held out when crc32(name) % 10 == 0: about 7% of the text


@dataclass(frozen=True)
class Doc:
    module: str  # dotted module name, e.g. "json.decoder"
    name: str  # qualified name inside the module; "" for the module docstring
    text: str


def collect_docs(stdlib: str) -> list[Doc]:
    """Every module, class and function docstring of the stdlib, in sorted path order (deterministic)."""
    docs: list[Doc] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            rel = os.path.relpath(path, stdlib)[: -len(".py")].replace(os.sep, ".")
            module = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            docs.extend(_docstrings(tree, module, ""))
    return docs


def _docstrings(node: ast.AST, module: str, prefix: str) -> list[Doc]:
    found: list[Doc] = []
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            found.append(Doc(module, prefix, doc.strip()))
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{child.name}" if prefix else child.name
            found.extend(_docstrings(child, module, name))
    return found


def is_heldout(module: str) -> bool:
    # by module, so held-out text is not a near copy of a training neighbour
    top = module.split(".")[0]
    return zlib.crc32(top.encode()) % HELDOUT_MODULUS == 0


def plain_text(doc: Doc) -> str:
    title = f"{doc.module}.{doc.name}" if doc.name else doc.module
    return f"{title}\n\n{doc.text}"


def chat_text(doc: Doc) -> str | None:
    """A ChatML question/answer pair, so the shipped chat template leads somewhere sensible."""
    if not doc.name or doc.name.split(".")[-1].startswith("_"):
        return None
    answer = doc.text.split("\n\n")[0].strip()
    if len(answer) < 20:
        return None
    question = f"What does {doc.module}.{doc.name} do?"
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"


def build_texts(docs: list[Doc]) -> list[str]:
    texts: list[str] = []
    for doc in docs:
        texts.append(plain_text(doc) + ENDOFTEXT)
        chat = chat_text(doc)
        if chat is not None:
            texts.append(chat + ENDOFTEXT)
    return texts


def heldout_sample(docs: list[Doc], max_chars: int) -> str:
    """A few KB of held-out plain text, shipped with the model so tests can measure perplexity."""
    parts: list[str] = []
    size = 0
    rng = random.Random(0)
    for doc in rng.sample(docs, len(docs)):
        text = plain_text(doc)
        if len(text) < 200 or len(text) > 1500:
            continue
        parts.append(text)
        size += len(text) + 2
        if size > max_chars:
            break
    return "\n\n".join(parts) + "\n"
