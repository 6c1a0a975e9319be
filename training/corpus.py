"""The demo model's text: the documentation every Python installation ships, read without
importing a module (docstrings come from the source through `ast`, the language reference from
`pydoc_data.topics`). Nothing is downloaded.

Documents are split by position into train and held-out parts (every HELD_OUT_EVERY-th document
is held out), so the split is the same on every run of the same Python. Chat pairs for the SFT
phase ("What does json.dumps do?" -> the first sentence of its docstring) come from the train
documents only.
"""

from __future__ import annotations

import ast
import pydoc_data.topics
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_EVERY = 20
MIN_DOC_CHARS = 40
MAX_ANSWER_CHARS = 100
# Parts of the standard library that are tests, demos or GUI code rather than documentation.
SKIPPED_TOP = {"site-packages", "dist-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip"}
QUESTIONS = ("What does {} do?", "Explain {}.", "What is {}?", "Tell me about {}.")


@dataclass(frozen=True)
class Doc:
    name: str  # the documented object ("json.dumps", "topic:assert")
    text: str


@dataclass(frozen=True)
class Corpus:
    train: list[Doc]
    held_out: list[Doc]


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_docs(root: Path) -> list[Doc]:
    docs: list[Doc] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in SKIPPED_TOP or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = _module_name(root, path)

        def visit(node: ast.AST, qualname: str) -> None:
            text = ast.get_docstring(node)
            if text and len(text) >= MIN_DOC_CHARS:
                docs.append(Doc(qualname, text))
            for child in getattr(node, "body", []):
                if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    if not child.name.startswith("_"):
                        visit(child, f"{qualname}.{child.name}")

        visit(tree, module)
    return docs


def load_corpus(stdlib: Path | None = None) -> Corpus:
    topics = [Doc(f"topic:{key}", pydoc_data.topics.topics[key].strip()) for key in sorted(pydoc_data.topics.topics)]
    docs = topics + _source_docs(stdlib or Path(sysconfig.get_paths()["stdlib"]))
    held = [doc for i, doc in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [doc for i, doc in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return Corpus(train=train, held_out=held)


def first_sentence(text: str) -> str | None:
    """The summary a docstring opens with, on one line, if it is a short plain sentence."""
    paragraph = " ".join(text.split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    sentence = match.group(1) if match else paragraph
    if not 12 <= len(sentence) <= MAX_ANSWER_CHARS or not sentence.isascii() or sentence[0] in "(:>`":
        return None
    return sentence


def chat_pairs(docs: list[Doc]) -> list[tuple[str, str]]:
    """(question, answer) pairs: a question about a documented name, its summary sentence."""
    pairs = []
    for number, doc in enumerate(docs):
        answer = first_sentence(doc.text)
        if answer is None or " " not in answer or any(part.startswith("_") for part in doc.name.split(".")):
            continue
        name = doc.name.removeprefix("topic:")
        if doc.name.startswith("topic:"):
            name = f"the {name} topic"
        pairs.append((QUESTIONS[number % len(QUESTIONS)].format(name), answer))
    return pairs
