"""The registry on a remote root (s3:// on a local moto server, and memory://).

Same manifests and the same rules as a local root: files first, manifest last; a version without a
manifest does not exist and its number is never reused; concurrent writers get distinct numbers.
Versions resolve to a local cache folder, downloaded lazily and checked against the manifest's sha256.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.core import url_to_fs
from pydantic import BaseModel, SecretStr

from storage import atomic
from storage.registry import Registry, RegistryError, sha256_file

REPO = Path(__file__).resolve().parents[2]


class ToyConfig(BaseModel):
    rows: int = 3
    api_key: SecretStr | None = None


def toy_table(rows: int) -> pa.Table:
    return pa.table({"x": list(range(rows)), "s": [f"row {i}" for i in range(rows)]})


def write_dataset(registry: Registry, name: str = "toy", rows: int = 3, parents=None, extra=None) -> str:
    with registry.new_version("dataset", name, config=ToyConfig(rows=rows), parents=parents) as draft:
        atomic.write_parquet(draft.path / "table.parquet", toy_table(rows))
        draft.extra.update(extra or {})
    return draft.ref


def fresh_cache(tmp_path: Path, monkeypatch, label: str) -> Path:
    """Point ALIGNFLOW_CACHE at a new empty folder: the next Registry downloads everything again."""
    path = tmp_path / f"cache-{label}"
    monkeypatch.setenv("ALIGNFLOW_CACHE", str(path))
    return path


def version_folders(cache: Path) -> list[Path]:
    """Complete version folders in a cache (digit-named folders holding a manifest)."""
    return [p.parent for p in cache.rglob("manifest.json") if p.parent.name.isdigit()]


def test_roots_urls_are_strings_and_local_roots_stay_paths(s3_root, tmp_path):
    assert Registry().root == s3_root
    assert Registry().is_remote
    assert Registry(f"file://{tmp_path}").root == tmp_path
    assert not Registry(tmp_path).is_remote
    assert Registry(tmp_path).local_dir("demo") == tmp_path / "demo"
    assert Registry(tmp_path).work_dir("flow", "key") == tmp_path / "work" / "flow" / "key"


def test_dataset_round_trip_matches_a_local_registry(remote_root, tmp_path, monkeypatch):
    remote_ref = write_dataset(Registry(), rows=5)
    local_ref = write_dataset(Registry(tmp_path / "local"), rows=5)
    assert remote_ref == local_ref == "toy@1"

    cache = fresh_cache(tmp_path, monkeypatch, "reader")
    reader = Registry()
    version = reader.resolve("dataset", "toy")
    local = Registry(tmp_path / "local").resolve("dataset", "toy")
    assert version.manifest.files == local.manifest.files  # same bytes: same sha256, rows, schema
    assert version.manifest.files["table.parquet"]["rows"] == 5
    assert version.location == f"{remote_root}/datasets/toy/1"
    assert version_folders(cache) == []  # resolving reads the manifest only

    path = version.path
    assert path.is_relative_to(cache) and path.parts[-3:] == ("datasets", "toy", "1")
    assert pq.read_table(version.file("table.parquet")).equals(toy_table(5))
    assert sha256_file(path / "table.parquet") == local.manifest.files["table.parquet"]["sha256"]
    assert json.loads((path / "manifest.json").read_text())["version"] == 1
    assert reader.resolve("dataset", "toy@1").path == path  # reused, not downloaded again


def test_model_round_trip_loads_with_transformers(s3_root, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with Registry().new_version("model", "tiny") as draft:
        shutil.copytree(tiny_model_dir, draft.path, dirs_exist_ok=True)
    assert draft.ref == "tiny@1"

    fresh_cache(tmp_path, monkeypatch, "reader")
    version = Registry().resolve("model", "tiny")
    expected_files = {str(p.relative_to(tiny_model_dir)) for p in tiny_model_dir.rglob("*") if p.is_file()}
    assert set(version.manifest.files) == expected_files
    loaded = AutoModelForCausalLM.from_pretrained(version.path)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.embed_tokens.weight"
    assert loaded.state_dict()[name].equal(original.state_dict()[name])
    tokenizer = AutoTokenizer.from_pretrained(version.path)
    assert tokenizer("hello world")["input_ids"] == AutoTokenizer.from_pretrained(tiny_model_dir)("hello world")["input_ids"]


def test_lineage_find_and_names_read_manifests_without_downloading(remote_root, tmp_path, monkeypatch):
    writer = Registry()
    raw = write_dataset(writer, "raw")
    clean = write_dataset(writer, "clean", parents=[f"dataset:{raw}"], extra={"fingerprint": "abc"})
    with writer.new_version("model", "m", parents=[f"dataset:{clean}", f"dataset:{raw}"]) as draft:
        atomic.write_text(draft.path / "weights.txt", "w")
        atomic.write_text(draft.path / "sub" / "empty.txt", "")  # nested and empty files travel too

    cache = fresh_cache(tmp_path, monkeypatch, "reader")
    reader = Registry()
    lineage = [(depth, kind, v.ref) for depth, kind, v in reader.lineage("model", draft.ref)]
    assert lineage == [(0, "model", "m@1"), (1, "dataset", "clean@1"), (2, "dataset", "raw@1")]
    assert reader.resolve("model", "m").manifest.parents == ["dataset:clean@1", "dataset:raw@1"]
    assert reader.find("dataset", "clean", "abc").ref == "clean@1"
    assert reader.find("dataset", "clean", "other") is None
    assert reader.names("dataset") == ["clean", "raw"] and reader.names("model") == ["m"]
    assert version_folders(cache) == []
    model_dir = reader.resolve("model", "m").path
    assert (model_dir / "weights.txt").read_text() == "w" and (model_dir / "sub" / "empty.txt").read_text() == ""


def test_concurrent_writers_get_distinct_versions(s3_root):
    refs: list[str] = []
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            registry = Registry()
            for i in range(3):
                refs.append(write_dataset(registry, "shared", rows=10 * worker + i + 1))
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert sorted(refs, key=lambda r: int(r.split("@")[1])) == [f"shared@{n}" for n in range(1, 13)]
    registry = Registry()
    versions = registry.versions("dataset", "shared")
    assert [v.manifest.version for v in versions] == list(range(1, 13))
    # Each manifest describes the table its own writer uploaded.
    assert len({v.manifest.files["table.parquet"]["rows"] for v in versions}) == 12
    for version in versions:
        registry.verify("dataset", version.ref)


def test_version_without_manifest_is_invisible_and_its_number_not_reused(remote_root, tmp_path):
    fs, base = url_to_fs(remote_root)
    # What a writer leaves when it dies between uploading files and writing the manifest.
    local = tmp_path / "t.parquet"
    pq.write_table(toy_table(2), local)
    fs.pipe_file(f"{base}/datasets/toy/1/.reserved", b"{}")
    fs.put_file(str(local), f"{base}/datasets/toy/1/table.parquet")
    fs.put_file(str(local), f"{base}/datasets/toy/2/table.parquet")  # even without a reservation

    registry = Registry()
    assert registry.versions("dataset", "toy") == []
    assert registry.names("dataset") == []
    with pytest.raises(RegistryError, match="no dataset named 'toy'"):
        registry.resolve("dataset", "toy")
    assert write_dataset(registry) == "toy@3"
    assert [v.ref for v in Registry().versions("dataset", "toy")] == ["toy@3"]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal
    import pyarrow as pa
    from storage import atomic, registry as reg
    # Die when the manifest is being built: every file is uploaded, the manifest is not.
    reg.code_version = lambda: os.kill(os.getpid(), signal.SIGKILL)
    with reg.Registry().new_version("dataset", "toy") as draft:
        atomic.write_parquet(draft.path / "table.parquet", pa.table({"x": [1, 2, 3]}))
    """
)


def test_sigkill_before_the_manifest_leaves_no_visible_version_on_s3(s3_root):
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    fs, base = url_to_fs(s3_root)
    fs.invalidate_cache()
    assert fs.exists(f"{base}/datasets/toy/1/table.parquet")  # the files did land
    registry = Registry()
    assert registry.versions("dataset", "toy") == []
    assert write_dataset(registry) == "toy@2"


def _flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


def test_a_corrupted_remote_file_is_refused(remote_root, tmp_path, monkeypatch):
    ref = write_dataset(Registry())
    fs, base = url_to_fs(remote_root)
    remote_file = f"{base}/datasets/toy/1/table.parquet"
    fs.pipe_file(remote_file, _flip_first_byte(fs.cat_file(remote_file)))

    cache = fresh_cache(tmp_path, monkeypatch, "reader")
    version = Registry().resolve("dataset", ref)
    with pytest.raises(RegistryError, match=r"toy@1: file 'table.parquet' .* sha256 .* corrupt"):
        version.path
    assert version_folders(cache) == []  # nothing that looks complete was left behind


def test_a_damaged_cached_file_is_detected(remote_root, tmp_path, monkeypatch):
    ref = write_dataset(Registry())
    fresh_cache(tmp_path, monkeypatch, "reader")
    registry = Registry()
    cached = registry.resolve("dataset", ref).path / "table.parquet"
    registry.verify("dataset", ref)

    cached.write_bytes(_flip_first_byte(cached.read_bytes()))  # same size: only the hash sees it
    with pytest.raises(RegistryError, match=r"table\.parquet has sha256 .* manifest says"):
        registry.verify("dataset", ref)
    cached.write_bytes(cached.read_bytes()[:10])  # truncated: seen on every use
    with pytest.raises(RegistryError, match="missing or damaged"):
        registry.resolve("dataset", ref).path


def test_storage_options_never_reach_manifests_or_messages(s3_root, cache_dir, monkeypatch):
    secrets = ["AKIAALIGNFLOWTEST0001", "storage-option-secret-value"]
    monkeypatch.setenv("ALIGNFLOW_STORAGE_OPTIONS", json.dumps({"key": secrets[0], "secret": secrets[1]}))
    registry = Registry()
    with registry.new_version("dataset", "toy", config=ToyConfig(api_key=SecretStr("sk-config-secret"))) as draft:
        atomic.write_parquet(draft.path / "table.parquet", toy_table(3))

    fs, base = url_to_fs(s3_root)
    fs.invalidate_cache()
    written = [fs.cat_file(path) for path in fs.find(base)]
    written += [p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()]
    assert any(b'"kind": "dataset"' in data for data in written)  # the manifest is among them
    for data in written:
        for secret in [*secrets, "sk-config-secret"]:
            assert secret.encode() not in data
    with pytest.raises(RegistryError) as missing:
        registry.resolve("dataset", "ghost")
    assert not any(secret in str(missing.value) for secret in secrets)

    monkeypatch.setenv("ALIGNFLOW_STORAGE_OPTIONS", '{"secret": "half-written-' + secrets[1])
    with pytest.raises(RegistryError, match="ALIGNFLOW_STORAGE_OPTIONS is not valid JSON") as bad:
        Registry()
    assert secrets[1] not in str(bad.value)


def test_run_state_and_scratch_folders_are_local(remote_root, cache_dir):
    registry = Registry()
    work = registry.work_dir("pretrain", "abc123")
    scratch = registry.local_dir("demo")
    assert work.is_dir() and work.is_relative_to(cache_dir) and work.parts[-3:] == ("work", "pretrain", "abc123")
    assert scratch.is_dir() and scratch.is_relative_to(cache_dir) and scratch.name == "demo"
    with pytest.raises(RegistryError):
        registry.local_dir("../outside")


@pytest.mark.slow
def test_pretrain_flow_on_s3_then_resolve_from_a_fresh_cache(s3_root, cache_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from flows.pretrain import pretrain
    from tasks.pretrain.steps import PretrainConfig
    from tasks.pretrain.training import TrainingOptions

    options = TrainingOptions(preset="tiny", vocab_size=300, seq_len=32, batch_size=4, max_steps=4, warmup_steps=1,
                              eval_every=2, checkpoint_every=2, eval_windows=4)
    # No corpus given: the flow builds the demo corpus in `registry.local_dir("demo")`, a local folder.
    ref = pretrain(PretrainConfig(demo_documents=100, demo_world_tasks=200, training=options))
    assert (Registry().local_dir("demo") / "corpus-en-100-200.jsonl").is_file()
    assert Registry().local_dir("demo").is_relative_to(cache_dir)
    assert list(cache_dir.glob("*/work/pretrain/*"))  # checkpoints stayed on this machine

    fresh_cache(tmp_path, monkeypatch, "reader")
    registry = Registry()
    assert registry.root == s3_root
    lineage = [(kind, v.manifest.name) for _, kind, v in registry.lineage("model", ref)]
    assert lineage[:3] == [("model", "base"), ("model", "base-tokenizer"), ("dataset", "corpus-clean")]
    version = registry.verify("model", ref)
    model = AutoModelForCausalLM.from_pretrained(version.path)
    assert model.config.vocab_size > 0 and "loss_curve.png" in version.manifest.files
