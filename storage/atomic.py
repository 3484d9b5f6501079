"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Each write goes to a temporary file in the same folder (so the final rename stays on one file
system), is flushed and fsynced, then renamed over the target with `os.replace`.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner alone; published files get the usual mode.
FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable: a crash after it cannot bring the old name back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, FILE_MODE)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(target: str | os.PathLike, rows: list[dict]) -> Path:
    return write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_parquet(target: str | os.PathLike, table: pa.Table) -> Path:
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return Path(target)
