"""The registry: immutable, versioned datasets and models under one root folder or URL.

Layout under the root (`ALIGNFLOW_HOME`, default `~/.alignflow`):

    datasets/<name>/<version>/{files..., manifest.json}
    models/<name>/<version>/{files..., manifest.json}
    work/<flow>/<key>/                 checkpoints of runs in progress (see `Registry.work_dir`)

A version is a folder whose `manifest.json` is written last; a folder without one does not exist.
A write stages its files in `<name>/.staging/<uuid>/`, reserves the next version number with an
exclusive `mkdir` (so two concurrent writers never take the same number), moves the files in and
then writes the manifest atomically. A crash or SIGKILL at any point leaves, at worst, a staging
folder or a version folder without a manifest: both are invisible and never reused.

The root may also be an fsspec URL (`s3://bucket/prefix`, `gs://...`, `memory://name`; `file://`
means a local path), with options from `ALIGNFLOW_STORAGE_OPTIONS` (see `storage/remote.py`). The
same layout and rules hold there; callers see no difference: `Version.path` and `Draft.path` are
still local folders. A remote version is downloaded into a local cache (`$ALIGNFLOW_CACHE`,
default `~/.cache/alignflow`) the first time its `.path` is used, and checked against the manifest's
sha256; listing, `find` and `lineage` read manifests only. `work_dir` and `local_dir` are local
folders under that cache for a remote root: run checkpoints belong to the machine.

    registry = Registry()
    with registry.new_version("dataset", "corpus-clean", config=cfg, parents=[]) as draft:
        storage.atomic.write_parquet(draft.path / "corpus.parquet", table)
        draft.metrics["documents"] = table.num_rows
    print(draft.ref)   # corpus-clean@3
    Registry().resolve("dataset", "corpus-clean").path   # a local folder, for a remote root too
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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel

from storage import atomic
from storage.errors import AlignflowError
from storage.manifest import Manifest, code_version, current_flow_run_id, serialize_config

if TYPE_CHECKING:
    from storage.remote import RemoteStore

ModelKind = Literal["dataset", "model"]
KINDS: tuple[str, ...] = ("dataset", "model")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MANIFEST = "manifest.json"


class RegistryError(AlignflowError, ValueError):
    """A ref that does not resolve, a bad name, or a broken version."""


def is_remote(root: str | os.PathLike) -> bool:
    """A root URL other than file:// names a remote file system (handled through fsspec)."""
    text = str(root)
    return "://" in text and not text.startswith("file://")


def normalize_root(root: str | os.PathLike) -> Path | str:
    """A local root as a Path (`file://` stripped, `~` expanded); a remote root as its URL string."""
    text = str(root)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_remote(text):
        return text.rstrip("/")
    return Path(text).expanduser()


def default_root() -> Path | str:
    """The registry root: `$ALIGNFLOW_HOME` (a folder or a URL), else `~/.alignflow`."""
    env = os.environ.get("ALIGNFLOW_HOME")
    return normalize_root(env) if env else Path.home() / ".alignflow"


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
    """A registered dataset or model version, read from its manifest.

    `location` is where the version lives: its folder, or its URL for a remote root. `path` is
    always a local folder; for a remote root, `fetch` downloads the files there on first use.
    """

    location: Path | str
    manifest: Manifest
    fetch: Callable[[], Path] | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.fetch() if self.fetch else Path(self.location)

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


def describe_tree(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's `files`: every file under `folder` but a manifest, by relative path."""
    return {
        str(p.relative_to(folder)): describe_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


class Registry:
    """Datasets and models under one root. Cheap to construct; holds no open handles.

    `root` is a Path for a local root and the URL string for a remote one. `storage_options`
    (fsspec options for a remote root) default to `$ALIGNFLOW_STORAGE_OPTIONS`.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, storage_options: dict[str, Any] | None = None):
        self.root: Path | str = normalize_root(root) if root else default_root()
        self._remote: RemoteStore | None = None
        if isinstance(self.root, str):
            from storage.remote import RemoteStore, storage_options_from_env  # fsspec only when needed

            options = storage_options if storage_options is not None else storage_options_from_env()
            self._remote = RemoteStore(self.root, options)

    @property
    def is_remote(self) -> bool:
        return self._remote is not None

    def _check(self, kind: str, name: str) -> None:
        if kind not in KINDS:
            raise RegistryError(f"unknown kind {kind!r}; expected one of {KINDS}")
        if not NAME_PATTERN.match(name):
            raise RegistryError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-'")

    def _name_dir(self, kind: str, name: str) -> Path:
        """The local folder of a name (local roots only)."""
        self._check(kind, name)
        return Path(self.root) / f"{kind}s" / name

    def _remote_version(self, manifest: Manifest) -> Version:
        store = self._remote
        location = store.location(manifest.kind, manifest.name, manifest.version)
        return Version(location, manifest, fetch=partial(store.fetch, manifest))

    # ---- reading -------------------------------------------------------------------------------

    def versions(self, kind: str, name: str) -> list[Version]:
        """All complete versions of `name`, oldest first (for a remote root: manifests only, no download)."""
        if self._remote:
            self._check(kind, name)
            return [self._remote_version(m) for m in self._remote.manifests(kind, name)]
        name_dir = self._name_dir(kind, name)
        if not name_dir.is_dir():
            return []
        found = []
        for child in name_dir.iterdir():
            if child.name.isdigit() and (child / MANIFEST).is_file():
                found.append(Version(child, Manifest.model_validate_json((child / MANIFEST).read_text())))
        return sorted(found, key=lambda v: v.manifest.version)

    def names(self, kind: str) -> list[str]:
        if self._remote:
            return [name for name in self._remote.names(kind) if self.versions(kind, name)]
        kind_dir = Path(self.root) / f"{kind}s"
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
        self._check(kind, name)
        qualified_parents = [self._qualify(p) for p in parents or []]
        if self._remote:
            staging = self._remote.staging_dir(kind, name)
        else:
            staging = self._name_dir(kind, name) / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        draft = Draft(path=staging, kind=kind, name=name)
        try:
            yield draft
            files = describe_tree(staging)

            def build(number: int) -> Manifest:
                return Manifest(
                    kind=kind,
                    name=name,
                    version=number,
                    created_at=datetime.now(timezone.utc).isoformat(),
                    files=files,
                    config=serialize_config(config),
                    parents=qualified_parents,
                    code_version=code_version(),
                    flow_run_id=current_flow_run_id(),
                    metrics=draft.metrics,
                    extra=draft.extra,
                )

            if self._remote:
                draft.version = self._remote_version(self._remote.publish(kind, name, staging, files, build))
            else:
                draft.version = self._publish_local(self._name_dir(kind, name), staging, build)
            draft.ref = draft.version.ref
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish_local(self, name_dir: Path, staging: Path, build: Callable[[int], Manifest]) -> Version:
        """Move the staged files into the next free version folder, then write the manifest."""
        version_dir = self._reserve(name_dir)
        for entry in staging.iterdir():
            os.rename(entry, version_dir / entry.name)
        manifest = build(int(version_dir.name))
        atomic.write_text(version_dir / MANIFEST, manifest.model_dump_json(indent=2))
        return Version(version_dir, manifest)

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

    def _local_base(self) -> Path:
        """The local folder for run state: the root itself, or the cache of a remote root."""
        return self._remote.cache if self._remote else Path(self.root)

    def work_dir(self, flow: str, key: str) -> Path:
        """A folder for a run's checkpoints; the same flow and key (a config hash) find it again.

        Always local: for a remote root it lies in the cache, so a run resumes on the same machine.
        """
        path = self._local_base() / "work" / flow / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def local_dir(self, name: str) -> Path:
        """A local scratch folder (e.g. `demo` for the generated demo corpus): `root/name`, or under the cache."""
        if not NAME_PATTERN.match(name) or name in ("datasets", "models", "work"):
            raise RegistryError(f"invalid scratch folder name {name!r}")
        path = self._local_base() / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def verify(self, kind: str, ref: str) -> Version:
        """Rehash every file of a version against its manifest (for a remote root: the local copy)."""
        version = self.resolve(kind, ref)
        folder = version.path
        for relpath, info in version.manifest.files.items():
            path = folder / relpath
            if not path.is_file():
                raise RegistryError(f"{kind} {version.ref}: file {relpath!r} is missing from {folder}")
            actual = sha256_file(path)
            if actual != info.get("sha256"):
                raise RegistryError(f"{kind} {version.ref}: file {path} has sha256 {actual}, "
                                    f"but the manifest says {info.get('sha256')}")
        return version


def describe(version: Version) -> dict[str, Any]:
    """A short summary used by list views."""
    m = version.manifest
    rows = {f: info["rows"] for f, info in m.files.items() if "rows" in info}
    return {"ref": version.ref, "created_at": m.created_at, "rows": rows, "parents": m.parents, "metrics": m.metrics}



def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs, parent refs, file hashes)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
