"""The registry on a remote file system: a root URL such as `s3://bucket/prefix`, `gs://...` or `memory://name`.

`storage.registry.Registry` uses this module when its root holds "://" (other than file://); flows
and tasks see no difference. The layout under the URL is the local one:

    <root>/<kind>s/<name>/<version>/{files..., .reserved, manifest.json}

Reading. A version exists when its `manifest.json` exists. Listing a name reads one manifest per
version (memoised in the process: versions are immutable) and downloads no file. The files are
downloaded when `Version.path` is first used, into a local cache folder

    $ALIGNFLOW_CACHE (default ~/.cache/alignflow) / <hash of the root URL and endpoint> / <kind>s/<name>/<version>/

Each file is checked against the manifest's sha256 while it lands in a temporary folder, which is
then renamed into place in one step, so a cache folder that exists is complete; later uses check
only the file sizes (`Registry.verify` rehashes everything).

Writing. A draft is staged in a local folder under the cache. On commit the files are hashed, the
next version number is reserved by creating `<version>/.reserved` exclusively (`open(..., "xb")`:
s3fs sends a conditional PUT with `If-None-Match: *`, so of two writers racing for a number one gets
FileExistsError and tries the next), the files are uploaded, and `manifest.json` is PUT last in a
single request: a reader sees all of a version or nothing. The staging folder then becomes the
cache of the new version, so the writer never downloads what it just wrote. A crash before the
manifest leaves a version folder without one: invisible, and its number is never reused.

Storage options (endpoint, credentials, ...) for fsspec come from `ALIGNFLOW_STORAGE_OPTIONS`, a
JSON object. It may hold credentials, so it is never logged, written to a manifest, or put in an
error message. Without it, the backend reads its own environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3; GOOGLE_APPLICATION_CREDENTIALS for GCS).

Limits:
- Distinct version numbers under concurrent writers need a file system whose "xb" is atomic on the
  server (S3 through s3fs). fsspec's memory file system, and backends that emulate "xb" by checking
  then writing, can give one number to two writers that race within the same instant; the later
  manifest then replaces the earlier one.
- Run state (`Registry.work_dir`) and scratch files (`Registry.local_dir`) stay on the machine,
  under the cache folder: a run resumes from its checkpoints only on the machine that made them.
- Leftovers are harmless: `.staging/` and `.download/` folders in the cache after a crash, and
  remote version folders without a manifest.

Run its tests with `pytest tests/storage/test_remote_registry.py` (a local S3 server, moto).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from fsspec.core import url_to_fs

from storage import atomic
from storage.manifest import Manifest
from storage.registry import MANIFEST, NAME_PATTERN, RegistryError, sha256_file

RESERVED = ".reserved"
STORAGE_OPTIONS_ENV = "ALIGNFLOW_STORAGE_OPTIONS"

# (cache key, remote manifest path) -> Manifest. Safe to keep for the whole process: a manifest,
# once written, never changes.
_MANIFESTS: dict[tuple[str, str], Manifest] = {}


def cache_root() -> Path:
    """Where remote versions are downloaded: `$ALIGNFLOW_CACHE`, else `~/.cache/alignflow`."""
    return Path(os.environ.get("ALIGNFLOW_CACHE") or Path.home() / ".cache" / "alignflow").expanduser()


def storage_options_from_env() -> dict[str, Any]:
    """The fsspec options in `$ALIGNFLOW_STORAGE_OPTIONS` (a JSON object), else none."""
    text = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        # `from None`: the decode error carries the text, which may hold credentials.
        raise RegistryError(
            f"{STORAGE_OPTIONS_ENV} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "its value is not shown because it may hold credentials"
        ) from None
    if not isinstance(options, dict):
        raise RegistryError(f"{STORAGE_OPTIONS_ENV} must be a JSON object, not a {type(options).__name__}")
    return options


def _endpoint(url: str, options: dict[str, Any]) -> str:
    """The server the URL points at, when it is not implied by the URL (S3-compatible stores)."""
    client_kwargs = options.get("client_kwargs") or {}
    endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    if not endpoint and url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint or ""


def _safe_relpath(relpath: str, where: str) -> PurePosixPath:
    """A manifest's file path, refused if it could land outside the version folder."""
    path = PurePosixPath(relpath)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise RegistryError(f"{where}: manifest lists an unsafe file path {relpath!r}")
    return path


class RemoteStore:
    """Versions under one root URL, with their local cache. Holds the fsspec file system, no state."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        self.url = url.rstrip("/")
        self.fs, base = url_to_fs(self.url, **storage_options)
        self.base = base.rstrip("/")
        # Two servers can hold the same bucket name (a local MinIO and AWS), so the endpoint is
        # part of the key; credentials are not (they do not change what a version holds).
        key = f"{self.fs.unstrip_protocol(self.base)}\n{_endpoint(self.url, storage_options)}"
        self.cache_key = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        self.cache = cache_root() / self.cache_key

    # ---- paths ---------------------------------------------------------------------------------

    def _remote(self, *parts: str | int) -> str:
        return "/".join([self.base, *(str(p) for p in parts)])

    def location(self, kind: str, name: str, version: int) -> str:
        """The URL of a version folder (for messages and list views)."""
        return f"{self.url}/{kind}s/{name}/{version}"

    def cached_dir(self, kind: str, name: str, version: int) -> Path:
        return self.cache / f"{kind}s" / name / str(version)

    def staging_dir(self, kind: str, name: str) -> Path:
        return self.cache / f"{kind}s" / name / ".staging" / uuid.uuid4().hex

    # ---- reading -------------------------------------------------------------------------------

    def _children(self, path: str) -> list[str]:
        """Names directly under a remote folder; none when it does not exist."""
        # Another process may have written since this process last listed it.
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [PurePosixPath(entry.rstrip("/")).name for entry in entries]

    def _numbers(self, kind: str, name: str) -> list[int]:
        """Every version folder, complete or not."""
        return sorted(int(child) for child in self._children(self._remote(f"{kind}s", name)) if child.isdigit())

    def names(self, kind: str) -> list[str]:
        """Candidate names (folders) of a kind; the registry keeps those with a complete version."""
        return sorted(child for child in self._children(self._remote(f"{kind}s")) if NAME_PATTERN.match(child))

    def manifests(self, kind: str, name: str) -> list[Manifest]:
        """The manifests of all complete versions of `name`, oldest first. Downloads no data file."""
        paths = {number: self._remote(f"{kind}s", name, number, MANIFEST) for number in self._numbers(kind, name)}
        unread = [path for path in paths.values() if (self.cache_key, path) not in _MANIFESTS]
        if unread:
            # One concurrent batch of GETs; a folder without a manifest is simply absent from the answer.
            for path, data in self.fs.cat(unread, on_error="omit").items():
                try:
                    _MANIFESTS[(self.cache_key, path)] = Manifest.model_validate_json(data)
                except ValueError as exc:
                    raise RegistryError(f"{self.fs.unstrip_protocol(path)} is not a valid manifest: {exc}") from None
        found = [_MANIFESTS.get((self.cache_key, path)) for path in paths.values()]
        return [manifest for manifest in found if manifest is not None]

    def fetch(self, manifest: Manifest) -> Path:
        """The local folder holding the version's files, downloaded and checked on first use."""
        kind, name, number = manifest.kind, manifest.name, manifest.version
        ref = f"{kind} {name}@{number}"
        target = self.cached_dir(kind, name, number)
        if (target / MANIFEST).is_file():
            self._check_sizes(target, manifest, ref)
            return target
        tmp = target.parent / ".download" / uuid.uuid4().hex
        try:
            for relpath, info in manifest.files.items():
                rel = _safe_relpath(relpath, ref)
                dest = tmp.joinpath(*rel.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = self._remote(f"{kind}s", name, number, rel.as_posix())
                try:
                    self.fs.get_file(source, str(dest))
                except FileNotFoundError:
                    raise RegistryError(f"{ref}: file {relpath!r} is listed in its manifest but missing at "
                                        f"{self.fs.unstrip_protocol(source)}") from None
                actual = sha256_file(dest)
                if actual != info.get("sha256"):
                    raise RegistryError(
                        f"{ref}: file {relpath!r} downloaded from {self.fs.unstrip_protocol(source)} has sha256 "
                        f"{actual}, but the manifest says {info.get('sha256')}: the stored copy is corrupt"
                    )
                with open(dest, "rb+") as handle:
                    os.fsync(handle.fileno())
            atomic.write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2))
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process filled the same folder first; its copy is as good as ours.
                if not (target / MANIFEST).is_file():
                    raise
            atomic.fsync_dir(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _check_sizes(self, folder: Path, manifest: Manifest, ref: str) -> None:
        """A cheap check of a cached copy: every file there, with its recorded size."""
        for relpath, info in manifest.files.items():
            path = folder.joinpath(*_safe_relpath(relpath, ref).parts)
            if not path.is_file() or ("bytes" in info and path.stat().st_size != info["bytes"]):
                raise RegistryError(f"{ref}: the cached file {path} is missing or damaged; "
                                    f"delete {folder} to download the version again")

    # ---- writing -------------------------------------------------------------------------------

    def publish(self, kind: str, name: str, staging: Path, files: dict[str, dict[str, Any]],
                build: Callable[[int], Manifest]) -> Manifest:
        """Upload a staged version under the next free number; the manifest goes last."""
        number = self._reserve(kind, name)
        for relpath in files:
            self.fs.put_file(str(staging / relpath), self._remote(f"{kind}s", name, number, relpath))
        manifest = build(number)
        manifest_path = self._remote(f"{kind}s", name, number, MANIFEST)
        # A single PUT: the version becomes visible, complete, at this moment.
        self.fs.pipe_file(manifest_path, manifest.model_dump_json(indent=2).encode("utf-8"))
        _MANIFESTS[(self.cache_key, manifest_path)] = manifest
        # The staged files are exactly what was uploaded: keep them as the cached copy.
        atomic.write_text(staging / MANIFEST, manifest.model_dump_json(indent=2))
        target = self.cached_dir(kind, name, number)
        try:
            os.rename(staging, target)
        except OSError:
            pass  # a stale folder of the same name: fetch checks it; nothing is lost remotely
        return manifest

    def _reserve(self, kind: str, name: str) -> int:
        """Take the next free number by creating `<number>/.reserved` exclusively."""
        number = max(self._numbers(kind, name), default=0) + 1
        # Not empty: s3fs stores an empty file with a plain (unconditional) PUT.
        note = json.dumps({"reserved_at": datetime.now(timezone.utc).isoformat(),
                           "host": socket.gethostname(), "pid": os.getpid()}).encode("utf-8")
        while True:
            try:
                with self.fs.open(self._remote(f"{kind}s", name, number, RESERVED), "xb") as handle:
                    handle.write(note)
            except FileExistsError:
                number += 1
                continue
            return number
