"""Instruction-style ChatML pairs for the demo model: a question built from a public name (and its signature),
answered by the first sentences of its docstring. Templates are picked by a hash of the name (deterministic)."""

from __future__ import annotations

import re
import zlib

from tools.demo_corpus import ENDOFTEXT, IM_END, IM_START, Doc, plain_text

FUNCTION_QUESTIONS = [
    "What does {t} do?",
    "What is {t} used for?",
    "What is the purpose of {t}?",
    "Explain {t}.",
    "How do I use {t}?",
    "What does the {t} function do?",
]
CLASS_QUESTIONS = [
    "What is {t}?",
    "What is the purpose of {t}?",
    "What does the {t} class do?",
    "How do I use {t}?",
    "What does {t} do?",
]
MODULE_QUESTIONS = ["What is the {t} module for?", "What does the {t} module provide?", "What is {t}?"]
RETURN_QUESTION = "What does {t} return?"
PAIRS_PER_NAME = 2  # two phrasings of each question, so the model answers the name rather than one template
MAX_ANSWER_CHARS = 400
MIN_ANSWER_WORDS = 6
ANSWER_WORDS = 12  # a first paragraph shorter than this is followed by the next prose paragraph
MODULE_ALIASES = {"posixpath": "os.path", "genericpath": "os.path"}
NOT_PROSE = (">>>", "..", "Args", "Arguments", "Parameters", "Returns", "Raises", "Example", "Note", "Usage", "See ")
SUBPACKAGES_USERS_SPELL = {"nn", "linalg", "fft", "random", "distributed", "optim", "utils", "cuda", "ma", "path"}

_ROLE = re.compile(r":(?:py:)?[a-z]+:`~?([^`<]+?)(?:\s*<[^>]*>)?`")
_PARAM_LINE = re.compile(r"^\w+\s*\(`")  # "n_group (`int`, *optional*): ..." is a parameter list, not prose
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(])")


def clean_markup(text: str) -> str:
    """reST roles and literals read as plain words: :func:`~os.path.join` -> os.path.join, ``x`` -> x."""
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1] if "`~" in m.group(0) else m.group(1), text)
    text = text.replace("``", "")
    return " ".join(text.split())


def _is_prose(para: str) -> bool:
    head = para.lstrip()
    return (bool(head) and head[0].isalpha() and not head.startswith(NOT_PROSE) and not head.rstrip().endswith(":")
            and not _PARAM_LINE.match(head))  # fmt: skip


def first_sentences(text: str) -> str | None:
    """The first paragraph (and the next ones while it is shorter than ANSWER_WORDS words and they are prose), cut
    at a sentence end near MAX_ANSWER_CHARS; None if the docstring does not open with a prose sentence."""
    paras = text.split("\n\n")
    if not _is_prose(paras[0]) and not paras[0].rstrip().endswith(":"):
        return None
    sentences: list[str] = []
    for para in paras:
        if (sentences and len(" ".join(sentences).split()) >= ANSWER_WORDS) or not _is_prose(para):
            break
        sentences.extend(_SENTENCE_END.split(clean_markup(para)))
    answer = ""
    for sentence in sentences:
        if answer and len(answer) + len(sentence) + 1 > MAX_ANSWER_CHARS:
            break
        answer = f"{answer} {sentence}" if answer else sentence
    answer = answer[:MAX_ANSWER_CHARS].strip()
    if len(answer.split()) < MIN_ANSWER_WORDS or not answer[0].isalpha():
        return None
    return answer if answer.endswith((".", "!", "?", ":")) else answer + "."


def short_title(doc: Doc) -> str:
    """How users spell a deep name: torch.nn.modules.linear.Linear -> torch.nn.Linear (package, first sub-package,
    then the object), transformers.models.x.modeling_x.XModel -> transformers.XModel."""
    if not doc.name:
        return doc.title
    module = doc.title[: -len(doc.name) - 1]
    parts = module.split(".")
    if module in MODULE_ALIASES:
        return f"{MODULE_ALIASES[module]}.{doc.name}"
    if len(parts) < 2:
        return doc.title
    keep = parts[:2] if len(parts) > 2 and parts[1] in SUBPACKAGES_USERS_SPELL else parts[:1]
    return ".".join(keep + [doc.name])


def questions_for(doc: Doc, title: str, answer: str) -> list[str]:
    if doc.kind == "function":
        pool = FUNCTION_QUESTIONS + ([RETURN_QUESTION] if answer.lower().startswith("return") else [])
    elif doc.kind == "class":
        pool = CLASS_QUESTIONS
    else:
        pool = MODULE_QUESTIONS
    first = zlib.crc32(title.encode()) % len(pool)
    picks = [pool[(first + i * 3) % len(pool)] for i in range(min(PAIRS_PER_NAME, len(pool)))]
    return [q.format(t=title) for q in dict.fromkeys(picks)]


def chat_pairs(doc: Doc) -> list[str]:
    """ChatML pairs for a public function, class or module; [] when the docstring has no usable first sentence."""
    if doc.kind == "file" or any(p.startswith("_") for p in doc.name.split(".") if p):
        return []
    answer = first_sentences(doc.text)
    if answer is None:
        return []
    titles = list(dict.fromkeys([short_title(doc), doc.title]))
    pairs = []
    for i, question in enumerate(questions_for(doc, titles[0], answer)):
        if i == 1 and len(titles) > 1:
            question = question.replace(titles[0], titles[1])  # the second phrasing uses the full module path
        reply = answer
        if question.startswith("How do I use") and doc.signature and len(doc.signature) <= 80:
            reply = f"Call {titles[0]}{doc.signature}. {answer}"
        pairs.append(f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{reply}{IM_END}\n")
    return pairs


def build_texts(docs: list[Doc]) -> list[str]:
    """Every document as plain text, and its chat pairs, each followed by <|endoftext|>."""
    texts: list[str] = []
    for doc in docs:
        texts.append(plain_text(doc) + ENDOFTEXT)
        texts.extend(pair + ENDOFTEXT for pair in chat_pairs(doc))
    return texts
