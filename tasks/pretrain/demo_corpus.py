"""Demo pretraining corpus that exists offline on any machine.

Real English text: the docstrings of the Python standard library (modules, classes, functions),
read with `ast` from the interpreter's own stdlib folder in sorted file order, so the corpus is
the same on every run with the same Python. Optionally followed by the project's seed tasks,
rendered as "Instruction: ...\\nInput: ...\\nOutput: ..." documents so that a demo model sees the
shape of instructions. The result is a JSONL file with one {"text": ...} object a line.

Run it:

    python -m tasks.pretrain.demo_corpus /tmp/demo-corpus.jsonl [SEEDS.jsonl]
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

from tasks.pretrain.corpus import CorpusError

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


def render_seed_task(task: dict, where: str) -> list[str]:
    """One document per instance of a Self-Instruct seed task; the Input line is left out when empty."""
    instruction = task.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise CorpusError(f"{where}: field 'instruction' must be a non-empty string")
    instances = task.get("instances")
    if not isinstance(instances, list) or not instances:
        raise CorpusError(f"{where}: field 'instances' must be a non-empty list of {{input, output}} objects")
    documents = []
    for number, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise CorpusError(f"{where}: field 'instances[{number}]' must be an object")
        for name in ("input", "output"):
            if not isinstance(instance.get(name, ""), str):
                raise CorpusError(f"{where}: field 'instances[{number}].{name}' must be a string")
        task_input = instance.get("input", "").strip()
        output = instance.get("output", "").strip()
        if not output:
            raise CorpusError(f"{where}: field 'instances[{number}].output' must be a non-empty string")
        parts = [f"Instruction: {instruction.strip()}"]
        if task_input:
            parts.append(f"Input: {task_input}")
        parts.append(f"Output: {output}")
        documents.append("\n".join(parts))
    return documents


def seed_task_documents(seeds_path: Path) -> list[str]:
    """Render a Self-Instruct seed-task JSONL file as instruction-shaped text documents."""
    seeds_path = Path(seeds_path)
    try:
        data = seeds_path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{seeds_path}: cannot read seed tasks: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CorpusError(f"{seeds_path}:{line}: not valid UTF-8") from exc
    documents: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{seeds_path}:{number}"
        try:
            task = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(task, dict):
            raise CorpusError(f"{where}: expected a JSON object, got {type(task).__name__}")
        documents.extend(render_seed_task(task, where))
    return documents


def build_demo_corpus(
    path: Path,
    max_documents: int | None = DEFAULT_MAX_DOCUMENTS,
    seeds_path: Path | None = None,
) -> Path:
    """Write the demo corpus to `path` atomically and return `path`.

    `max_documents` caps the stdlib docstrings (None: all of them); the seed-task documents of
    `seeds_path`, when given, are appended after them.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be at least 1, got {max_documents}")
    path = Path(path)
    documents: list[str] = []
    for docstring in iter_docstrings():
        if max_documents is not None and len(documents) >= max_documents:
            break
        documents.append(docstring)
    if seeds_path is not None:
        documents.extend(seed_task_documents(Path(seeds_path)))
    _write_jsonl_atomic(path, documents)
    return path


def _write_jsonl_atomic(path: Path, texts: list[str]) -> None:
    """Write beside the target, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for text in texts:
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m tasks.pretrain.demo_corpus OUT.jsonl [SEEDS.jsonl]")
    out = build_demo_corpus(Path(sys.argv[1]), seeds_path=Path(sys.argv[2]) if len(sys.argv) == 3 else None)
    print(f"wrote {sum(1 for _ in out.open(encoding='utf-8'))} documents to {out}")
