"""Demo pretraining corpus that exists offline on any machine.

Real English text: the docstrings of the Python standard library (modules, classes, functions),
read with `ast` from the interpreter's own stdlib folder in sorted file order, so the corpus is
the same on every run with the same Python. Extra documents (the pretrain flow adds the demo seed
tasks in the self-instruct prompt formats) follow. The result is a JSONL file with one
{"text": ...} object a line.

    python -m tasks.pretrain.demo_corpus /tmp/demo-corpus.jsonl
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

from storage import atomic

DEFAULT_MAX_DOCUMENTS = 20_000
# Docstrings shorter than this are mostly one-liners ("Return self.") that teach little.
MIN_DOCSTRING_CHARS = 80
# Folders of the stdlib that hold tests, tools or third-party code rather than documentation.
SKIPPED_PARTS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib's .py files outside tests and tools, sorted by their path below `root`."""
    root = root or stdlib_root()
    files = [
        path
        for path in root.rglob("*.py")
        if not SKIPPED_PARTS.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _is_doctest_heavy(docstring: str) -> bool:
    """Docstrings that are mostly interactive examples are code, not prose."""
    lines = [line.strip() for line in docstring.splitlines() if line.strip()]
    examples = sum(1 for line in lines if line.startswith((">>>", "...")))
    return examples * 2 > len(lines)


def iter_docstrings(root: Path | None = None, min_chars: int = MIN_DOCSTRING_CHARS) -> Iterator[str]:
    """Module, class and function docstrings of the stdlib, cleaned with inspect.cleandoc."""
    for path in stdlib_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            # A few stdlib files are templates or use another encoding; they are not needed.
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node, clean=True)
            if not docstring or len(docstring) < min_chars or _is_doctest_heavy(docstring):
                continue
            yield docstring


def build_demo_corpus(
    path: Path,
    max_documents: int | None = DEFAULT_MAX_DOCUMENTS,
    extra_documents: Sequence[str] = (),
) -> Path:
    """Write the demo corpus to `path` atomically and return `path`.

    `max_documents` caps the stdlib docstrings (None: all of them); `extra_documents` (for example
    the demo seed tasks in the self-instruct prompt formats) are appended after them.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be at least 1, got {max_documents}")
    path = Path(path)
    documents: list[str] = []
    for docstring in iter_docstrings():
        if max_documents is not None and len(documents) >= max_documents:
            break
        documents.append(docstring)
    documents.extend(extra_documents)
    atomic.write_jsonl(path, [{"text": text} for text in documents])
    return path


if __name__ == "__main__":
    print(build_demo_corpus(Path(sys.argv[1])))
