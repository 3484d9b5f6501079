"""The registry: immutable, versioned datasets and models under one root folder.

Layout under the root (`ALIGNFLOW_HOME`, default `~/.alignflow`):

    datasets/<name>/<version>/{files..., manifest.json}
    models/<name>/<version>/{files..., manifest.json}
    work/<flow>/<key>/                 checkpoints of runs in progress (see `Registry.work_dir`)

A version is a folder whose `manifest.json` is written last; a folder without one does not exist.
A write stages its files in `<name>/.staging/<uuid>/`, reserves the next version number with an
exclusive `mkdir` (so two concurrent writers never take the same number), moves the files in and
then writes the manifest atomically. A crash or SIGKILL at any point leaves, at worst, a staging
folder or a version folder without a manifest: both are invisible and never reused.

    registry = Registry()
    with registry.new_version("dataset", "corpus-clean", config=cfg, parents=[]) as draft:
        storage.atomic.write_parquet(draft.path / "corpus.parquet", table)
        draft.metrics["documents"] = table.num_rows
    print(draft.ref)   # corpus-clean@3
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel

from storage import atomic
from storage.manifest import Manifest, code_version, current_flow_run_id, serialize_config

ModelKind = Literal["dataset", "model"]
KINDS: tuple[str, ...] = ("dataset", "model")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MANIFEST = "manifest.json"


class RegistryError(ValueError):
    """A ref that does not resolve, a bad name, or a broken version."""


def default_root() -> Path:
    """The registry root: `$ALIGNFLOW_HOME`, else `~/.alignflow`."""
    env = os.environ.get("ALIGNFLOW_HOME")
    return Path(env).expanduser() if env else Path.home() / ".alignflow"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split `name` or `name@version` into (name, version or None for the latest)."""
    name, _, version = ref.partition("@")
    if not NAME_PATTERN.match(name):
        raise RegistryError(f"invalid ref {ref!r}: a name is letters, digits, '.', '_' and '-'")
    if not version:
        return name, None
    if not version.isdigit():
        raise RegistryError(f"invalid ref {ref!r}: the version after '@' must be a number")
    return name, int(version)


@dataclass(frozen=True)
class Version:
    """A registered dataset or model version, read from its manifest."""

    path: Path
    manifest: Manifest

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    def file(self, relpath: str) -> Path:
        if relpath not in self.manifest.files:
            raise RegistryError(f"{self.ref} has no file {relpath!r}; it has {sorted(self.manifest.files)}")
        return self.path / relpath


@dataclass
class Draft:
    """A version being written: put files under `path`, fill `metrics`/`extra`; `ref` is set on commit."""

    path: Path
    kind: str
    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    ref: str | None = None
    version: Version | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    """sha256 and size of a file; for Parquet also its schema and row count."""
    info: dict[str, Any] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if path.suffix == ".parquet":
        meta = pq.ParquetFile(path)
        info["rows"] = meta.metadata.num_rows
        info["schema"] = {f.name: str(f.type) for f in meta.schema_arrow}
    return info


class Registry:
    """Datasets and models under one root. Cheap to construct; holds no open handles."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_root()

    def _name_dir(self, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise RegistryError(f"unknown kind {kind!r}; expected one of {KINDS}")
        if not NAME_PATTERN.match(name):
            raise RegistryError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-'")
        return self.root / f"{kind}s" / name

    # ---- reading -------------------------------------------------------------------------------

    def versions(self, kind: str, name: str) -> list[Version]:
        """All complete versions of `name`, oldest first."""
        name_dir = self._name_dir(kind, name)
        if not name_dir.is_dir():
            return []
        found = []
        for child in name_dir.iterdir():
            if child.name.isdigit() and (child / MANIFEST).is_file():
                found.append(Version(child, Manifest.model_validate_json((child / MANIFEST).read_text())))
        return sorted(found, key=lambda v: v.manifest.version)

    def names(self, kind: str) -> list[str]:
        kind_dir = self.root / f"{kind}s"
        if not kind_dir.is_dir():
            return []
        return sorted(p.name for p in kind_dir.iterdir() if p.is_dir() and self.versions(kind, p.name))

    def resolve(self, kind: str, ref: str) -> Version:
        """The version a ref names; `name` alone is the latest."""
        name, number = parse_ref(ref)
        versions = self.versions(kind, name)
        if not versions:
            known = ", ".join(self.names(kind)) or "none"
            raise RegistryError(f"no {kind} named {name!r} in {self.root} (known {kind}s: {known})")
        if number is None:
            return versions[-1]
        for version in versions:
            if version.manifest.version == number:
                return version
        have = ", ".join(str(v.manifest.version) for v in versions)
        raise RegistryError(f"{kind} {name!r} has no version {number} (versions: {have})")

    def exists(self, kind: str, ref: str) -> bool:
        try:
            self.resolve(kind, ref)
        except RegistryError:
            return False
        return True

    def find(self, kind: str, name: str, fingerprint: str) -> Version | None:
        """The newest version whose manifest records this fingerprint (to reuse identical work)."""
        for version in reversed(self.versions(kind, name)):
            if version.manifest.extra.get("fingerprint") == fingerprint:
                return version
        return None

    def lineage(self, kind: str, ref: str) -> list[tuple[int, str, Version]]:
        """Depth-first ancestry as (depth, kind, version), the version itself first.

        Lineage is a graph (a model and its tokenizer share the corpus), so each ancestor is
        listed once, where it is first reached.
        """
        out: list[tuple[int, str, Version]] = []
        seen: set[str] = set()

        def visit(k: str, r: str, depth: int) -> None:
            version = self.resolve(k, r)
            if f"{k}:{version.ref}" in seen:
                return
            seen.add(f"{k}:{version.ref}")
            out.append((depth, k, version))
            for parent in version.manifest.parents:
                pkind, _, pref = parent.partition(":")
                visit(pkind, pref, depth + 1)

        visit(kind, ref, 0)
        return out

    # ---- writing -------------------------------------------------------------------------------

    @contextmanager
    def new_version(
        self,
        kind: str,
        name: str,
        *,
        config: BaseModel | dict | None = None,
        parents: list[str] | None = None,
    ) -> Iterator[Draft]:
        """Stage a new version; it becomes visible, complete, when the block exits without error.

        `parents` are qualified refs, `dataset:name@3` or `model:name@2`, resolved to exact versions.
        """
        name_dir = self._name_dir(kind, name)
        qualified_parents = [self._qualify(p) for p in parents or []]
        staging = name_dir / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        draft = Draft(path=staging, kind=kind, name=name)
        try:
            yield draft
            version_dir = self._reserve(name_dir)
            for entry in staging.iterdir():
                os.rename(entry, version_dir / entry.name)
            files = {
                str(p.relative_to(version_dir)): describe_file(p)
                for p in sorted(version_dir.rglob("*"))
                if p.is_file() and p.name != MANIFEST
            }
            manifest = Manifest(
                kind=kind,
                name=name,
                version=int(version_dir.name),
                created_at=datetime.now(timezone.utc).isoformat(),
                files=files,
                config=serialize_config(config),
                parents=qualified_parents,
                code_version=code_version(),
                flow_run_id=current_flow_run_id(),
                metrics=draft.metrics,
                extra=draft.extra,
            )
            atomic.write_text(version_dir / MANIFEST, manifest.model_dump_json(indent=2))
            draft.version = Version(version_dir, manifest)
            draft.ref = draft.version.ref
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _reserve(self, name_dir: Path) -> Path:
        """Take the next free version number with an exclusive mkdir; racing writers get distinct ones."""
        taken = [int(p.name) for p in name_dir.iterdir() if p.name.isdigit()]
        number = max(taken, default=0) + 1
        while True:
            candidate = name_dir / str(number)
            try:
                candidate.mkdir()
            except FileExistsError:
                number += 1
                continue
            atomic.fsync_dir(name_dir)
            return candidate

    def _qualify(self, parent: str) -> str:
        kind, sep, ref = parent.partition(":")
        if not sep or kind not in KINDS:
            raise RegistryError(f"parent {parent!r} must be qualified as 'dataset:REF' or 'model:REF'")
        return f"{kind}:{self.resolve(kind, ref).ref}"

    # ---- run state -----------------------------------------------------------------------------

    def work_dir(self, flow: str, key: str) -> Path:
        """A folder for a run's checkpoints; the same flow and key (a config hash) find it again."""
        path = self.root / "work" / flow / key
        path.mkdir(parents=True, exist_ok=True)
        return path


def describe(version: Version) -> dict[str, Any]:
    """A short summary used by list views."""
    m = version.manifest
    rows = {f: info["rows"] for f, info in m.files.items() if "rows" in info}
    return {"ref": version.ref, "created_at": m.created_at, "rows": rows, "parents": m.parents, "metrics": m.metrics}



def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs, parent refs, file hashes)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
