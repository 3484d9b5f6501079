"""The registry: refs, manifests, lineage, and the atomic-visibility guarantees under kills and races."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
from pydantic import BaseModel, SecretStr

from storage import atomic
from storage.registry import Registry, RegistryError, parse_ref, sha256_file


class ToyConfig(BaseModel):
    rows: int = 3
    api_key: SecretStr | None = None
    openai_api_key: str | None = None
    api_key_secret: str | None = None


def write_dataset(registry: Registry, name: str = "toy", rows: int = 3, parents=None, config=None) -> str:
    with registry.new_version("dataset", name, config=config or ToyConfig(rows=rows), parents=parents) as draft:
        atomic.write_parquet(draft.path / "table.parquet", pa.table({"x": list(range(rows)), "s": ["a"] * rows}))
    return draft.ref


def test_versions_are_numbered_and_latest_resolves(registry_root):
    registry = Registry()
    assert registry.root == registry_root
    assert write_dataset(registry, rows=2) == "toy@1"
    assert write_dataset(registry, rows=5) == "toy@2"
    assert registry.resolve("dataset", "toy").ref == "toy@2"
    assert registry.resolve("dataset", "toy@1").manifest.files["table.parquet"]["rows"] == 2


def test_manifest_records_schema_hash_config_and_lineage(registry_root):
    registry = Registry()
    parent = write_dataset(registry, "raw")
    ref = write_dataset(registry, "clean", parents=[f"dataset:{parent}"])
    version = registry.resolve("dataset", ref)
    manifest = version.manifest
    info = manifest.files["table.parquet"]
    assert info["schema"] == {"x": "int64", "s": "string"}
    assert info["sha256"] == sha256_file(version.path / "table.parquet")
    assert manifest.parents == ["dataset:raw@1"]
    assert manifest.config == {"rows": 3, "api_key": None, "openai_api_key": None, "api_key_secret": None}
    assert manifest.code_version and manifest.created_at
    assert [(d, v.ref) for d, _, v in registry.lineage("dataset", ref)] == [(0, "clean@1"), (1, "raw@1")]


def test_secrets_never_reach_the_manifest(registry_root):
    registry = Registry()
    config = ToyConfig(api_key=SecretStr("sk-live-123456"), openai_api_key="sk-plain-abcdef", api_key_secret="my-block")
    ref = write_dataset(registry, config=config)
    text = (registry.resolve("dataset", ref).path / "manifest.json").read_text()
    assert "sk-live-123456" not in text and "sk-plain-abcdef" not in text
    assert json.loads(text)["config"]["api_key_secret"] == "my-block"


@pytest.mark.parametrize(
    "ref, message",
    [("nope", "no dataset named 'nope'"), ("toy@7", "has no version 7"), ("bad name", "invalid ref"), ("toy@x", "must be a number")],
)
def test_bad_refs_have_clear_errors(registry_root, ref, message):
    registry = Registry()
    write_dataset(registry)
    with pytest.raises(RegistryError, match=message):
        registry.resolve("dataset", ref)


def test_parent_refs_must_exist_and_be_qualified(registry_root):
    registry = Registry()
    with pytest.raises(RegistryError, match="must be qualified"):
        write_dataset(registry, parents=["toy@1"])
    with pytest.raises(RegistryError, match="no model named"):
        write_dataset(registry, parents=["model:ghost"])
    assert registry.versions("dataset", "toy") == []


def test_an_exception_inside_the_block_leaves_nothing(registry_root):
    registry = Registry()
    with pytest.raises(RuntimeError):
        with registry.new_version("dataset", "toy") as draft:
            (draft.path / "half.txt").write_text("half")
            raise RuntimeError("crash")
    assert registry.versions("dataset", "toy") == []
    assert write_dataset(registry) == "toy@1"


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import pyarrow as pa
    from storage import atomic, registry as reg
    where = sys.argv[1]
    if where == "manifest":
        # Die at the very moment the manifest would be written: files are already in the version folder.
        atomic.write_text = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    r = reg.Registry()
    with r.new_version("dataset", "toy") as draft:
        atomic.write_parquet(draft.path / "table.parquet", pa.table({"x": [1, 2, 3]}))
        if where == "staging":
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("where", ["staging", "manifest"])
def test_sigkill_mid_write_leaves_no_visible_version(registry_root, where):
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, where], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    registry = Registry()
    assert registry.versions("dataset", "toy") == []
    with pytest.raises(RegistryError):
        registry.resolve("dataset", "toy")
    ref = write_dataset(registry)
    assert registry.resolve("dataset", "toy").ref == ref
    assert len(registry.versions("dataset", "toy")) == 1


def _writer(root: str, count: int) -> None:
    registry = Registry(root)
    for i in range(count):
        write_dataset(registry, "shared", rows=10 + i)


def test_concurrent_writers_both_land_intact(registry_root):
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(str(registry_root), 6)) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    versions = Registry().versions("dataset", "shared")
    assert len(versions) == 12
    assert len({v.manifest.version for v in versions}) == 12
    for version in versions:
        info = version.manifest.files["table.parquet"]
        assert sha256_file(version.path / "table.parquet") == info["sha256"]


def test_parse_ref():
    assert parse_ref("base") == ("base", None)
    assert parse_ref("base@12") == ("base", 12)
