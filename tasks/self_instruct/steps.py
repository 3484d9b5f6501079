"""The self-instruct flow's Prefect tasks: per batch a plan, its shards, and a commit; never a task per instruction.

Retries sit on the shard task: a shard touches no state, so a retried shard redoes exactly that
shard, and a failed batch is planned again by the next run. The generator is built once per
process (the flow's, or each Dask/Ray worker's) and reused across shards.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE

from storage import atomic
from storage.registry import Registry, Version, fingerprint, parse_ref
from tasks.generation.config import GeneratorConfig, check_generator, load_generator, resolve_local_model
from tasks.generation.params import Generator
from tasks.publish import markdown_image, publish_markdown, publish_table, run_logger
from tasks.rouge.engine import nearest
from tasks.self_instruct import pipeline
from tasks.self_instruct.pipeline import SelfInstructConfig
from tasks.self_instruct.seeds import SeedTask, demo_seed_path, load_seed_tasks, seed_file_sha256

# The batch tasks are called again and again with the same arguments (the state lives in the work
# folder), so they must never be served from a cache: `cache_policy=NONE`.
_GENERATORS: dict[str, Generator] = {}
_GENERATORS_LOCK = threading.Lock()  # shards on the threads runner ask for it at the same time


def generator_for(config: GeneratorConfig) -> Generator:
    """The generator of this config, built once per process. Only the latest one is kept, so a
    long-lived worker or `serve` process does not pile up models run after run."""
    key = config.model_dump_json()
    with _GENERATORS_LOCK:
        if key not in _GENERATORS:
            for old in _GENERATORS.values():
                old.close()
            _GENERATORS.clear()
            _GENERATORS[key] = load_generator(config, Registry())
        return _GENERATORS[key]


def seeds_path(config: SelfInstructConfig) -> Path:
    return Path(config.seeds).expanduser() if config.seeds else demo_seed_path(config.language)


def load_seeds(config: SelfInstructConfig) -> list[SeedTask]:
    return load_seed_tasks(seeds_path(config))


def generator_parent(config: GeneratorConfig) -> str | None:
    """The registry ref of a local generator model (lineage), None for an endpoint or a plain folder."""
    if config.backend != "local":
        return None
    folder, name = resolve_local_model(config.model, Registry())
    return f"model:{name}" if "@" in name else None


def resolve_extend(config: SelfInstructConfig, seeds_sha256: str, registry: Registry) -> Version | None:
    """The version `config.extend` names, checked to be a self-instruct dataset of the same seeds and
    language; None when it names a dataset that has no version yet (the run starts from scratch)."""
    name, number = parse_ref(config.extend)
    versions = registry.versions("dataset", name)
    if number is None and not versions:
        return None
    found = [v for v in versions if number is None or v.manifest.version == number]
    if not found:
        have = f"versions: {', '.join(str(v.manifest.version) for v in versions)}" if versions else f"no dataset named {name!r} yet"
        raise pipeline.ExtendError(f"--extend {config.extend}: no such version ({have})")
    version = found[-1]
    missing = [f"{table}.parquet" for table in pipeline.BASE_TABLES if f"{table}.parquet" not in version.manifest.files]
    if missing:
        raise pipeline.ExtendError(f"--extend {config.extend}: {version.ref} is not a self-instruct dataset (it has no {', '.join(missing)})")
    if version.manifest.extra.get("seeds_sha256") != seeds_sha256:
        raise pipeline.ExtendError(f"--extend {config.extend}: {version.ref} was made from other seeds "
                                   f"({version.manifest.extra.get('seeds_file')}); extend it with the same seed file")
    if (version.manifest.config or {}).get("language", "en") != config.language:
        raise pipeline.ExtendError(f"--extend {config.extend}: {version.ref} is in language {version.manifest.config.get('language')!r}, "
                                   f"not {config.language!r}")
    return version


def extend_totals(version: Version) -> dict[str, int]:
    """Where an extended version's numbering ends. A version registered before `totals` were recorded
    was made from scratch, so its funnel's counts are its totals."""
    extra = version.manifest.extra
    if "totals" in extra:
        return extra["totals"]
    return {"requests": extra["funnel"]["requests"], "machine_numbers": extra["funnel"]["kept"]}


@task(name="prepare-self-instruct")
def prepare_run(config: SelfInstructConfig) -> dict[str, Any]:
    """Validate the seeds, pin the generator's model version and the extended dataset's version, and
    find (or start) the work folder."""
    seeds = load_seeds(config)
    path = seeds_path(config)
    base = None
    if config.extend:
        # Pin "latest" to the exact version now: the work folder's key, the resumed run and the
        # registry's fingerprint all name it, so a finished extend never finds the old version.
        base = resolve_extend(config, seed_file_sha256(path), Registry())
        if base is None:
            run_logger().info(f"extend: no dataset {config.extend!r} registered yet, so this run starts from scratch")
        config = config.model_copy(update={"extend": base.ref if base else None})
    if config.generator.backend == "openai":
        check_generator(config.generator)  # a wrong URL, key or model fails here, before the work folder exists
    parent = generator_parent(config.generator)
    if parent:
        # Pin "latest" to the exact version now, so a resumed run keeps the model it started with.
        config = config.model_copy(update={"generator": config.generator.model_copy(update={"model": parent.partition(":")[2]})})
    key = fingerprint(config.identity(), seed_file_sha256(path))
    work = Registry().work_dir("self-instruct", key)
    if base:
        tables = {name: pq.read_table(base.file(f"{name}.parquet")) for name in pipeline.BASE_TABLES}
        state = pipeline.start_extending(work, base.ref, tables, extend_totals(base))
        info = pipeline.base_info(state)
        if not state["requests"]:
            run_logger().info(f"extending {base.ref}: {info['machine_instructions']} machine instructions; requests continue at "
                              f"{info['requests']}, machine instruction ids at {pipeline.machine_instruction_id(info['machine_numbers'])}")
    state = pipeline.load_state(work)
    if state["requests"]:
        run_logger().info(f"resuming from {work}: {state['requests']} requests done, {state['kept']} instructions kept, stage {state['stage']}")
    return {"config": config.model_dump(mode="json"), "work": str(work), "seeds": len(seeds), "seeds_sha256": seed_file_sha256(path),
            "seeds_path": str(path), "generator_parent": parent, "state": state}


@task(name="plan-batch", cache_policy=NONE)
def plan_batch_step(config: SelfInstructConfig, work: str) -> dict[str, Any]:
    """The next batch's shards of requests (and, for bootstrap, the ROUGE-L pool they are scored against)."""
    return pipeline.plan_batch(config, load_seeds(config), Path(work))


@task(name="generate-shard", retries=2, retry_delay_seconds=5, cache_policy=NONE,
      task_run_name="{stage}-shard-{index}.{shard}")
def shard_step(config: SelfInstructConfig, stage: str, index: int, shard: int, requests: list[dict[str, Any]],
               decoding: dict[str, Any], pool: list[str]) -> list[dict[str, Any]]:
    """Generate one shard on whichever worker runs it; the worker loads the generator by ref, once."""
    return pipeline.run_shard(config, generator_for(config.generator), stage, requests, decoding, pool)


@task(name="commit-batch", cache_policy=NONE)
def commit_batch_step(config: SelfInstructConfig, work: str, plan: dict[str, Any], rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
    state = pipeline.commit_batch(config, Path(work), plan, rows)
    if plan["stage"] == "bootstrap":
        run_logger().info(f"batch {plan['index']}: {state['requests']} requests, {state['kept']} instructions kept")
    return state


@task(name="register-self-instruct-dataset")
def register_dataset_step(config: SelfInstructConfig, prepared: dict[str, Any]) -> str:
    """Write the tables and exports as one dataset version, and publish the funnel, samples and plots."""
    work = Path(prepared["work"])
    seeds = load_seeds(config)
    tables, funnel = pipeline.assemble_tables(config, seeds, work)
    try:
        pipeline.check_dataset_size(config, tables, funnel)
    except pipeline.DatasetTooSmallError:
        publish_funnel(funnel, f"the unregistered run in {work}")  # the UI shows why
        raise
    if tables["instructions"].num_rows == len(seeds):
        run_logger().warning("no machine instruction was kept: the dataset holds the seeds only")
    registry = Registry()
    parents = [prepared["generator_parent"]] if prepared["generator_parent"] else []
    if config.extend:
        parents.append(f"dataset:{config.extend}")
    identity = json.loads(tables["instructions"]["generator"].drop_null()[0].as_py()) if tables["instructions"]["generator"].null_count < tables["instructions"].num_rows else {"backend": config.generator.backend, "model": config.generator.model}
    state = pipeline.load_state(work)
    key = fingerprint(config.identity(), prepared["seeds_sha256"], state)
    done = pipeline.totals(state)
    existing = registry.find("dataset", config.dataset_name, key)
    if existing:
        return existing.ref
    histogram = nearest_seed_histogram(config, seeds, tables["instructions"])
    with registry.new_version("dataset", config.dataset_name, config=config, parents=parents) as draft:
        for name, table in tables.items():
            atomic.write_parquet(draft.path / f"{name}.parquet", table)
        export_alpaca(tables["sft"], draft.path / "alpaca.json")
        export_self_instruct(tables["instructions"], tables["instances"], draft.path / "self_instruct.jsonl")
        atomic.write_bytes(draft.path / "nearest_seed_rouge_l.png", histogram)
        draft.extra.update(fingerprint=key, funnel=funnel, seeds_sha256=prepared["seeds_sha256"], seeds_file=prepared["seeds_path"],
                           generator=identity, totals=done)
        # Counted over the extended versions too (for a run from scratch, the funnel's counts).
        draft.metrics.update(instructions=tables["instructions"].num_rows, machine_instructions=done["machine_numbers"],
                             instances=tables["instances"].num_rows, requests=done["requests"])
    publish_funnel(funnel, draft.ref)
    publish_samples(tables, draft.ref, histogram)
    return draft.ref


def nearest_seed_histogram(config: SelfInstructConfig, seeds: list[SeedTask], instructions) -> bytes:
    """The paper's figure: each kept instruction's ROUGE-L to its nearest seed; plus lengths and leading verbs."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    machine = [r for r in instructions.to_pylist() if r["origin"] == "machine"]
    scores = [score for score, _ in nearest([r["instruction"] for r in machine], [s.instruction for s in seeds], config.rouge_tokenizer)]
    lengths = [len(r["instruction"].split()) for r in machine]
    verbs = Counter(r["instruction"].split()[0].lower().strip(",.:") for r in machine if r["instruction"].split()).most_common(10)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100)
    axes[0].hist(scores, bins=20, range=(0, 1), color="#4c72b0")
    axes[0].set(title="ROUGE-L to the nearest seed", xlabel="ROUGE-L F", ylabel="instructions")
    axes[1].hist(lengths, bins=20, color="#55a868")
    axes[1].set(title="Instruction length", xlabel="words")
    if verbs:
        axes[2].barh([v for v, _ in verbs][::-1], [c for _, c in verbs][::-1], color="#c44e52")
    axes[2].set(title="Most common leading words")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def export_alpaca(sft, path: Path) -> None:
    rows = []
    for row in sft.to_pylist():
        instruction, _, input_text = row["prompt"].partition("\n\n")
        rows.append({"instruction": instruction, "input": input_text, "output": row["completion"]})
    atomic.write_json(path, rows)


def export_self_instruct(instructions, instances, path: Path) -> None:
    by_id: dict[str, list[dict[str, str]]] = {}
    for row in instances.to_pylist():
        by_id.setdefault(row["instruction_id"], []).append({"input": row["input"], "output": row["output"]})
    atomic.write_jsonl(path, [
        {"id": r["id"], "instruction": r["instruction"], "instances": by_id.get(r["id"], []), "is_classification": r["is_classification"], "origin": r["origin"]}
        for r in instructions.to_pylist()
    ])


def publish_funnel(funnel: dict[str, Any], ref: str) -> None:
    rows = [{"stage": "requests", "count": funnel["requests"]},
            {"stage": "failed requests", "count": funnel["failed_requests"]},
            {"stage": "unparseable responses", "count": funnel["unparseable_responses"]},
            {"stage": "candidate instructions", "count": funnel["candidates"]}]
    rows += [{"stage": f"rejected: {reason}", "count": count} for reason, count in funnel["rejected"].items()]
    rows += [{"stage": "kept instructions", "count": funnel["kept"]}]
    rows += [{"stage": f"instances: {k}", "count": v} for k, v in funnel["instances"].items()]
    rows += [{"stage": f"instance tries: {k}", "count": v} for k, v in funnel.get("instance_tries", {}).items()]
    publish_table("self-instruct-funnel", rows, f"Funnel of {ref}: candidates = rejections + kept.")


def publish_samples(tables: dict[str, Any], ref: str, histogram: bytes) -> None:
    machine = [r for r in tables["instructions"].to_pylist() if r["origin"] == "machine"][:20]
    publish_table("self-instruct-samples", [
        {"instruction": r["instruction"], "classification": r["is_classification"], "max_rouge_l": round(r["max_rouge_l"] or 0, 3), "most_similar": r["most_similar"]}
        for r in machine
    ], f"First kept machine instructions of {ref}.")
    publish_markdown("self-instruct-diversity", f"# {ref}\n\n{markdown_image(histogram, 'ROUGE-L to nearest seed, lengths, leading words')}\n",
                     "ROUGE-L of each kept instruction to its nearest seed, instruction lengths and leading words.")
