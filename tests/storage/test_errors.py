"""Every exception class of the project derives from storage.errors.AlignflowError and keeps its builtin base.

The source is read with `ast` (importing every module would load torch and Prefect), so a new
exception class anywhere in flows/, tasks/, storage/ or deployments/ is checked without a list here.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "storage", "deployments")
BUILTIN_EXCEPTIONS = {name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)}
# Classes in files another change is rewriting; they get the base when that change lands.
PENDING: set[tuple[str, str]] = set()


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def exception_classes() -> dict[str, tuple[str, list[str]]]:
    """name -> (file, base names) of every class that derives from an exception, by name."""
    classes: dict[str, tuple[str, list[str]]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    classes[node.name] = (str(path.relative_to(REPO)), [_base_name(b) for b in node.bases])
    found: dict[str, tuple[str, list[str]]] = {}
    changed = True
    while changed:  # a class is an exception when one of its bases is a builtin or project exception
        changed = False
        for name, (file, bases) in classes.items():
            if name not in found and any(b in BUILTIN_EXCEPTIONS or b in found for b in bases):
                found[name] = (file, bases)
                changed = True
    return found


def derives_from_alignflow_error(name: str, found: dict[str, tuple[str, list[str]]]) -> bool:
    if name == "AlignflowError":
        return True
    return name in found and any(derives_from_alignflow_error(b, found) for b in found[name][1] if b != name)


def keeps_a_builtin_base(name: str, found: dict[str, tuple[str, list[str]]]) -> bool:
    bases = found[name][1]
    return any(b in BUILTIN_EXCEPTIONS - {"Exception", "BaseException"} or (b in found and b != "AlignflowError" and keeps_a_builtin_base(b, found))
               for b in bases)


def test_every_project_exception_derives_from_alignflow_error():
    found = exception_classes()
    assert len(found) >= 18, sorted(found)
    missing = sorted(f"{file}: {name}" for name, (file, _) in found.items()
                     if name != "AlignflowError" and (file, name) not in PENDING and not derives_from_alignflow_error(name, found))
    assert missing == []


def test_every_project_exception_keeps_its_builtin_base():
    found = exception_classes()
    lost = sorted(f"{file}: {name}" for name, (file, _) in found.items()
                  if name != "AlignflowError" and not keeps_a_builtin_base(name, found))
    assert lost == []


def test_the_bases_at_run_time():
    from storage.errors import AlignflowError, InputError
    from storage.registry import RegistryError
    from tasks.generation.params import GenerationError
    from tasks.pretrain.corpus import CorpusError
    from tasks.self_instruct.seeds import SeedFormatError

    assert issubclass(InputError, ValueError) and issubclass(RegistryError, ValueError)
    assert issubclass(GenerationError, RuntimeError)
    for error in (InputError, RegistryError, GenerationError, CorpusError, SeedFormatError):
        assert issubclass(error, AlignflowError), error
    assert issubclass(CorpusError, InputError) and issubclass(SeedFormatError, InputError)
