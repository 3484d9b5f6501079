"""The project's exception base, and the one error every input reader raises.

Every exception alignflow raises on bad input or on a failed stage derives from `AlignflowError`,
so a caller (the `alignflow` command line, a deployment, a notebook) can catch the project's errors
in one clause and let real bugs through. Each class also keeps its builtin base (`ValueError` for
bad input, `RuntimeError` for a failed stage), so `except ValueError` keeps working.

`InputError` is the error of a bad input file. Its message has one format everywhere:

    FILE: LOCATION: field 'NAME': PROBLEM

LOCATION is `line N` (text, JSON Lines, and syntax errors of any JSON file) or `row N` (Parquet
rows and items of a JSON list, followed by `(line M)` where the item starts); N is 1-based. Parts
that are unknown are left out: `seeds.jsonl: line 3: field 'instruction': missing`,
`corpus.parquet: field 'text': missing column (columns present: id, body)`, `data/*.txt: the glob
matches no files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class AlignflowError(Exception):
    """The base of every error the project raises on bad input or failed stages."""


class InputError(AlignflowError, ValueError):
    """A bad input file: the message names the file, the line or row, and the field.

    `InputError(path, problem, where=..., field=...)` builds the message in the one format (see the
    module docstring); `where` is a `storage.reader.Location` or a text such as "line 3".
    `InputError(message)` with a single argument takes a message that names no file (a bad option).
    The parts stay available as `path`, `location`, `field` and `problem`.
    """

    def __init__(self, path: str | Path | None, problem: str | None = None, *, where: Any = None, field: str | None = None):
        if problem is None:
            # One argument: a complete message that is about no particular file.
            path, problem = None, str(path)
        self.path = None if path is None else str(path)
        self.location = None if where is None else str(where)
        self.field = field
        self.problem = problem
        super().__init__(format_message(self.path, self.location, field, problem))

    def __reduce__(self):
        # Exceptions travel between processes (Dask/Ray workers, Prefect results) by pickling.
        return _rebuild, (type(self), self.path, self.problem, self.location, self.field)


def _rebuild(cls: type[InputError], path: str | None, problem: str, location: str | None, field: str | None) -> InputError:
    return cls(path, problem, where=location, field=field)


def format_message(path: str | None, location: str | None, field: str | None, problem: str) -> str:
    """`FILE: LOCATION: field 'NAME': PROBLEM`, leaving out the parts that are None."""
    parts = [part for part in (path, location) if part]
    if field:
        parts.append(f"field '{field}'")
    parts.append(problem)
    return ": ".join(parts)
