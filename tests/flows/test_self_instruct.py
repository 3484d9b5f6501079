"""The self-instruct flow on the demo model: dataset, funnel, lineage, kill-and-resume, endpoint, bad seeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.self_instruct import self_instruct
from storage.registry import Registry
from tasks.generation.config import GeneratorConfig
from tasks.generation.params import DecodingParams
from tasks.self_instruct.pipeline import SelfInstructConfig

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def small_config(model: Path, **overrides) -> SelfInstructConfig:
    values = dict(
        min_machine_instructions=0,  # short runs check the machinery; the minimum has its own test
        generator=GeneratorConfig(model=str(model), batch_size=16),
        bootstrap_decoding=DecodingParams(strategy="sample", temperature=0.7, top_p=0.9, max_new_tokens=96),
        instance_decoding=DecodingParams(strategy="sample", temperature=0.7, top_p=0.9, max_new_tokens=64),
    )
    values.update(overrides)
    return SelfInstructConfig(**values)


def read_version(ref: str):
    version = Registry().resolve("dataset", ref)
    tables = {name: pq.read_table(version.path / f"{name}.parquet") for name in ("instructions", "instances", "rejected", "sft")}
    return version, tables


def test_demo_run_of_200_requested_instructions(registry_root, demo_base_model):
    ref = self_instruct(small_config(demo_base_model, num_instructions=200, max_requests=400, requests_per_batch=32))
    version, tables = read_version(ref)
    funnel = version.manifest.extra["funnel"]
    machine = [r for r in tables["instructions"].to_pylist() if r["origin"] == "machine"]
    assert machine, funnel
    assert tables["instances"].num_rows > 0
    # The funnel adds up: every candidate is either rejected for one reason or kept.
    assert funnel["candidates"] == sum(funnel["rejected"].values()) + funnel["kept"]
    assert funnel["requests"] <= 400 and (funnel["kept"] >= 200 or funnel["requests"] == 400)
    instances = funnel["instances"]
    assert instances["parsed"] == instances["kept"] + sum(v for k, v in instances.items() if k not in ("parsed", "kept", "tasks_dropped"))
    # Every kept instruction records its nearest neighbour, and none is above the threshold.
    assert all(r["max_rouge_l"] is not None and r["max_rouge_l"] <= 0.7 for r in machine)
    assert all(r["request_idx"] is not None and len(r["prompt_seed_ids"]) == 8 for r in machine)
    # The SFT view holds prompt/completion and chat messages for every instance.
    sft = tables["sft"].to_pylist()
    assert len(sft) == tables["instances"].num_rows
    assert sft[0]["messages"][0]["role"] == "user" and sft[0]["messages"][1]["content"] == sft[0]["completion"]
    assert {"alpaca.json", "self_instruct.jsonl", "nearest_seed_rouge_l.png"} <= set(version.manifest.files)
    assert len(json.loads((version.path / "alpaca.json").read_text())) == len(sft)
    assert version.manifest.extra["seeds_sha256"]


def test_lineage_links_the_dataset_to_the_registered_generator(registry_root, demo_base_model):
    """With a registry ref as generator, the dataset's parent is that exact model version."""
    import shutil

    registry = Registry()
    with registry.new_version("model", "base") as draft:
        for item in demo_base_model.iterdir():
            if item.is_file() and item.name != "manifest.json":
                shutil.copy2(item, draft.path / item.name)
    config = small_config(demo_base_model, num_instructions=5, max_requests=8, requests_per_batch=8)
    config = config.model_copy(update={"generator": GeneratorConfig(model=None)})  # "the latest base"
    ref = self_instruct(config)
    version = registry.resolve("dataset", ref)
    assert version.manifest.parents == ["model:base@1"]
    assert version.manifest.config["generator"]["model"] == "base@1"


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _cli_args(model: Path) -> list[str]:
    return [sys.executable, "flows/self_instruct.py", "--model", str(model), "--num-instructions", "60", "--requests-per-batch", "4",
            "--bootstrap-decoding-max-new-tokens", "96", "--instance-decoding-max-new-tokens", "48", "--batch-size", "4"]


def test_sigkill_mid_run_resumes_to_the_same_dataset(tmp_path, demo_base_model):
    env = {**os.environ, "PREFECT_API_URL": _api_url()}
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    args = _cli_args(demo_base_model)

    process = subprocess.Popen(args, cwd=ROOT, env={**env, "ALIGNFLOW_HOME": str(killed_root)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list(killed_root.glob("work/self-instruct/*/parts/bootstrap-00002.parquet")):
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not Registry(killed_root).names("dataset")

    resumed = subprocess.run(args, cwd=ROOT, env={**env, "ALIGNFLOW_HOME": str(killed_root)}, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    clean = subprocess.run(args, cwd=ROOT, env={**env, "ALIGNFLOW_HOME": str(clean_root)}, capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]

    for name in ("instructions", "instances", "rejected"):
        a = pq.read_table(Registry(killed_root).resolve("dataset", "self-instruct").path / f"{name}.parquet")
        b = pq.read_table(Registry(clean_root).resolve("dataset", "self-instruct").path / f"{name}.parquet")
        assert a.to_pylist() == b.to_pylist(), name
    state = json.loads(next(killed_root.glob("work/self-instruct/*/state.json")).read_text())
    assert state["stage"] == "done"


def test_openai_endpoint_generator_and_the_key_stays_secret(registry_root, demo_base_model, monkeypatch, caplog):
    from tasks.generation.local import LocalGenerator
    from tasks.generation.server import start_server

    secret = "sk-test-do-not-leak-1234567890"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    url, stop = start_server(LocalGenerator(demo_base_model, identity_name="demo"), host="127.0.0.1", port=0)
    try:
        config = small_config(demo_base_model, num_instructions=10, max_requests=16, requests_per_batch=8)
        config = config.model_copy(update={"generator": GeneratorConfig(backend="openai", base_url=url, model="demo", max_concurrency=4)})
        ref = self_instruct(config)
    finally:
        stop()
    version, tables = read_version(ref)
    assert version.manifest.extra["generator"]["backend"] == "openai"
    for path in version.path.iterdir():
        assert secret.encode() not in path.read_bytes(), path.name
    assert secret not in caplog.text


def test_bad_seed_file_fails_with_file_line_and_field(registry_root, demo_base_model, tmp_path):
    from tasks.self_instruct.seeds import SeedFormatError

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}\n{"instruction": "Say bye."}\n')
    with pytest.raises(SeedFormatError, match=r"seeds\.jsonl: line 2: field 'instances'"):
        self_instruct(small_config(demo_base_model, seeds=str(seeds)))
    assert Registry().names("dataset") == []


def test_a_generator_that_yields_nothing_usable_registers_nothing(registry_root, tiny_model_dir):
    """An untrained model writes nothing that parses: a clear error with the funnel, and an empty registry."""
    from tasks.self_instruct.pipeline import DatasetTooSmallError

    config = small_config(tiny_model_dir, min_machine_instructions=1, num_instructions=8, max_requests=16, requests_per_batch=8,
                          instance_attempts=2)
    with pytest.raises(DatasetTooSmallError) as caught:
        self_instruct(config)
    message = str(caught.value)
    assert message.startswith("self-instruct: 0 machine instructions with instances, fewer than min_machine_instructions=1; "
                              "nothing was registered. 16 requests gave ")
    assert "rejected: " in message and "in 2 tries" in message
    assert Registry().names("dataset") == []


def test_korean_run_keeps_hangul_instructions(registry_root, demo_base_model):
    """The paper's non-ASCII first-character rule would drop every Korean instruction; language=ko does not."""
    ref = self_instruct(small_config(demo_base_model, language="ko", num_instructions=8, max_requests=16, requests_per_batch=8))
    version, tables = read_version(ref)
    funnel = version.manifest.extra["funnel"]
    assert funnel["candidates"] == sum(funnel["rejected"].values()) + funnel["kept"]
    seeds = [r["instruction"] for r in tables["instructions"].to_pylist() if r["origin"] == "seed"]
    assert seeds and all(any("\uac00" <= ch <= "\ud7a3" for ch in s) for s in seeds)
    hangul_first = [r for r in tables["rejected"].to_pylist() if r["candidate"] and "\uac00" <= r["candidate"][0] <= "\ud7a3"]
    assert all(r["reason"] != "bad_first_char" for r in hangul_first)
    assert version.manifest.config["language"] == "ko"


@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_cluster_runner_with_two_workers_gives_the_default_runners_dataset(runner, tmp_path, monkeypatch, demo_base_model):
    """Shards generate on two worker processes; the committed dataset is the threads run's, row for row.

    Ray runs only where the optional extra is installed (`pip install -e '.[ray]'`).
    """
    from tasks.runners import TaskRunnerConfig

    if runner == "ray":
        pytest.importorskip("prefect_ray")
    config = small_config(demo_base_model, num_instructions=24, max_requests=24, requests_per_batch=8, shard_size=4)
    refs = {}
    for name in ("threads", runner):
        monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path / name))  # separate work folders: no resume across runs
        refs[name] = self_instruct(config.model_copy(update={"task_runner": TaskRunnerConfig(runner=name, workers=2)}))
    _, threads_tables = read_version_at(tmp_path / "threads", refs["threads"])
    version, tables = read_version_at(tmp_path / runner, refs[runner])
    assert version.manifest.config["task_runner"]["runner"] == runner
    machine = [r for r in tables["instructions"].to_pylist() if r["origin"] == "machine"]
    assert machine and tables["rejected"].num_rows > 0
    for name in ("instructions", "instances", "rejected", "sft"):
        assert tables[name].to_pylist() == threads_tables[name].to_pylist(), name


def read_version_at(root: Path, ref: str):
    version = Registry(root).resolve("dataset", ref)
    return version, {name: pq.read_table(version.path / f"{name}.parquet") for name in ("instructions", "instances", "rejected", "sft")}


def test_extend_grows_the_registered_version_into_a_new_one(registry_root, demo_base_model):
    """`extend`: the old rows unchanged, new ones appended with continued ids, the old version a parent."""
    config = small_config(demo_base_model, num_instructions=6, max_requests=8, requests_per_batch=8)
    first = self_instruct(config)
    second = self_instruct(config.model_copy(update={"extend": "self-instruct"}))  # the latest: pinned to @1
    assert (first, second) == ("self-instruct@1", "self-instruct@2")
    (v1, old), (v2, new) = read_version(first), read_version(second)
    assert v2.manifest.config["extend"] == "self-instruct@1" and "dataset:self-instruct@1" in v2.manifest.parents
    for name in ("instructions", "instances", "rejected", "sft"):
        rows, old_rows = new[name].to_pylist(), old[name].to_pylist()
        assert rows[: len(old_rows)] == old_rows, name
    added = new["instructions"].to_pylist()[old["instructions"].num_rows:]
    assert added and all(r["origin"] == "machine" for r in added)
    old_ids = [int(r["id"].rpartition("_")[2]) for r in old["instructions"].to_pylist() if r["origin"] == "machine"]
    assert min(int(r["id"].rpartition("_")[2]) for r in added) >= v1.manifest.extra["totals"]["machine_numbers"] > max(old_ids)
    assert min(r["request_idx"] for r in added) >= v1.manifest.extra["funnel"]["requests"]
    funnel = v2.manifest.extra["funnel"]
    assert funnel["requests"] <= 8 and funnel["extends"]["ref"] == "self-instruct@1"
    assert v2.manifest.metrics["requests"] == v1.manifest.metrics["requests"] + funnel["requests"]
    # Every new instruction is novel against the old ones too.
    from tasks.rouge.engine import nearest

    old_machine = [r["instruction"] for r in old["instructions"].to_pylist() if r["origin"] == "machine"]
    assert all(score <= config.rouge_threshold for score, _ in nearest([r["instruction"] for r in added], old_machine))
    # Its work folder is keyed by the exact version it extends, with that version's tables in it.
    [work] = [p.parent for p in registry_root.glob("work/self-instruct/*/state.json")
              if json.loads(p.read_text()).get("base", {}).get("ref") == "self-instruct@1"]
    assert pq.read_table(work / "base" / "instructions.parquet").to_pylist() == old["instructions"].to_pylist()


def test_extend_of_a_missing_version_fails_naming_the_option(registry_root, tiny_model_dir):
    """A version named exactly must exist (the command line's message: tests/test_bad_inputs.py)."""
    from tasks.self_instruct.pipeline import ExtendError

    with pytest.raises(ExtendError, match=r"--extend self-instruct@9: no such version \(no dataset named 'self-instruct' yet\)"):
        self_instruct(small_config(tiny_model_dir, extend="self-instruct@9"))
    assert Registry().names("dataset") == [] and not list(registry_root.glob("work/self-instruct/*"))
