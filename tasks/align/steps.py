"""The align flow's config and Prefect tasks: SFT -> preferences -> reward model -> PPO -> evaluation.

Each stage registers what it makes (models `sft`, `rm`, `ppo`; datasets `preferences`, `eval`)
with its lineage, and records a fingerprint of its exact inputs: a re-run with the same parameters
reuses finished stages and resumes the interrupted one from its checkpoints.

The data is split once, by prompt, into train, validation and test; preference pairs and PPO
prompts keep their prompt's side. Validation chooses (early stopping, best checkpoint); test only
reports, and each training stage ends in the state of its quality gate (`tasks.align.gates`): a
result that does not beat its predecessor there is named Regressed.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel, Field

from storage import atomic
from storage.registry import Registry, RegistryError, Version, fingerprint
from tasks.align.config import PreferenceOptions, RewardOptions, SFTOptions, SplitOptions
from tasks.align.dpo import DPOOptions
from tasks.align.gates import Gate, GateOptions, policy_gate, reward_gate, sft_gate, stage_state
from tasks.align.ppo import PPOOptions
from tasks.align.rloo import RLOOOptions
from tasks.generation.config import GeneratorConfig, check_generator, resolve_local_model
from tasks.generation.params import DecodingParams
from tasks.launch import LaunchOptions
from tasks.publish import markdown_image, plot_curves, publish_markdown, publish_table, run_logger


class EvalOptions(BaseModel):
    """How the aligned models are compared on held-out prompts."""

    max_prompts: int = Field(256, ge=2, description="Most test prompts answered by every model (the first ones of the test split).")
    decoding: DecodingParams = Field(
        default_factory=lambda: DecodingParams(strategy="sample", temperature=0.7, max_new_tokens=40, seed=0),
        description="Decoding of the evaluation answers (the same for every model).")
    judge: GeneratorConfig | None = Field(
        None, description="An LLM judge for the win rate of PPO vs SFT, asked twice with positions swapped (a registry ref, a folder or an endpoint). Empty: the reward model's win rate only.")


class AlignConfig(GateOptions):
    """Base model + instruction dataset in, SFT, reward and PPO models and an evaluation table out."""

    model: str | None = Field(None, description="The base model: a registry model ref (name or name@version) or a local HF folder. Empty: the model that generated the dataset (its lineage), else the latest 'base'.")
    dataset: str = Field("self-instruct", description="The instruction data: a registry dataset ref (its sft table is used) or a Parquet file with prompt/completion or messages.")
    split: SplitOptions = Field(default_factory=SplitOptions, description="The deterministic train/validation/test split.")
    sft: SFTOptions = Field(default_factory=SFTOptions, description="Supervised fine-tuning (TRL SFTTrainer).")
    sft_launch: LaunchOptions = Field(default_factory=LaunchOptions, description="Run SFT in this process, or through accelerate/torchrun with N processes (multi-GPU, DeepSpeed/FSDP configs).")
    preferences: PreferenceOptions = Field(default_factory=PreferenceOptions, description="Preference pairs: sampling and the judge.")
    judge_generator: GeneratorConfig | None = Field(None, description="The LLM judge's generator when preferences.judge is 'llm' (default: the SFT model).")
    reward: RewardOptions = Field(default_factory=RewardOptions, description="Reward model (TRL RewardTrainer).")
    ppo: PPOOptions = Field(default_factory=PPOOptions, description="PPO against the reward model (our own, tasks/align/ppo.py).")
    evaluation: EvalOptions = Field(default_factory=EvalOptions, description="The final comparison of base, SFT and PPO on the test split.")
    method: Literal["ppo", "dpo", "rloo"] = Field(
        "ppo", description="How the SFT model is aligned: ppo (our own, on the reward model), dpo (TRL's DPOTrainer on the "
        "preference pairs, no reward model in training) or rloo (TRL's RLOOTrainer on the reward model). Each is evaluated "
        "and gated the same way.")
    dpo: DPOOptions = Field(default_factory=DPOOptions, description="DPO settings (method dpo).")
    rloo: RLOOOptions = Field(default_factory=RLOOOptions, description="RLOO settings (method rloo).")
    skip_ppo: bool = Field(False, description="Leave the alignment method out (the evaluation then compares base and SFT).")
    stop_after: Literal["preferences", "reward", "evaluation"] = Field(
        "evaluation", description="Stop after this stage, e.g. 'preferences' to collect human labels first and train later.")


class AlignData(BaseModel):
    """The resolved inputs and the split files, in the align run's work folder."""

    work: str
    base_dir: str
    parents: list[str]
    train: str
    validation: str
    test: str


class StageResult(BaseModel):
    """What a training stage hands on: its registered model, its metrics, and its gate."""

    stage: str
    ref: str
    dir: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    gate: Gate | None = None


class EvaluationResult(BaseModel):
    ref: str
    gates: dict[str, Gate]


# ---- helpers -----------------------------------------------------------------------------------


def model_folder(ref_or_path: str) -> tuple[Path, str | None]:
    """(HF folder, qualified registry ref or None for a plain folder)."""
    folder, name = resolve_local_model(ref_or_path, Registry())
    return folder, (f"model:{name}" if "@" in name else None)


def base_model_of(config: AlignConfig) -> str:
    """The configured base model, else the `model:` parent of the dataset (the generator), else 'base'."""
    if config.model:
        return config.model
    if not Path(config.dataset).expanduser().exists():
        for parent in dataset_version(config.dataset).manifest.parents:
            kind, _, ref = parent.partition(":")
            if kind == "model":
                return ref
    return "base"


def dataset_version(ref: str) -> Version:
    """The registered dataset `--dataset` names; errors name the option."""
    try:
        return Registry().resolve("dataset", ref)
    except RegistryError as err:
        raise RegistryError(f"--dataset {ref!r} is neither a file nor a registered dataset: {err}") from None


def dataset_sft_file(ref_or_path: str) -> tuple[Path, str | None]:
    path = Path(ref_or_path).expanduser()
    if path.exists():
        return path, None
    version = dataset_version(ref_or_path)
    if "sft.parquet" not in version.manifest.files:
        raise RegistryError(
            f"--dataset {ref_or_path!r}: dataset {version.ref} has no sft table (sft.parquet; it holds "
            f"{', '.join(sorted(version.manifest.files)) or 'no files'}); give a dataset made by self-instruct, "
            "or a Parquet file with prompt/completion or messages"
        )
    return version.file("sft.parquet"), f"dataset:{version.ref}"


def check_later_inputs(config: AlignConfig) -> None:
    """What later stages read (the labels file, LLM judges' endpoints), checked before the first stage writes."""
    from tasks.align.preferences import PreferenceError, load_preference_file

    if config.preferences.judge == "file":
        if not config.preferences.labels_path:
            raise PreferenceError("--labels-path: judge 'file' needs a file with prompt, chosen, rejected")
        load_preference_file(config.preferences.labels_path)
    judges = [config.evaluation.judge, config.judge_generator if config.preferences.judge == "llm" else None]
    for generator in judges:
        if generator is not None and generator.backend == "openai":
            check_generator(generator)


def register_folder(kind: str, name: str, folder: Path, config, parents: list[str], metrics: dict, key: str, extra_files: dict[str, bytes] | None = None) -> str:
    registry = Registry()
    with registry.new_version(kind, name, config=config, parents=[p for p in parents if p]) as draft:
        for item in folder.iterdir():
            if item.is_file():
                shutil.copy2(item, draft.path / item.name)
        for filename, data in (extra_files or {}).items():
            atomic.write_bytes(draft.path / filename, data)
        draft.metrics.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None})
        draft.extra["fingerprint"] = key
    return draft.ref


def reuse(kind: str, name: str, key: str) -> str | None:
    found = Registry().find(kind, name, key)
    if found:
        run_logger().info(f"{kind} {found.ref} was made from these exact inputs: reusing it")
    return found.ref if found else None


def curve_png(points, title: str, ylabel: str) -> bytes:
    return plot_curves({title: [tuple(p) for p in points]}, title=title, xlabel="step", ylabel=ylabel)


# ---- stages ------------------------------------------------------------------------------------


def split_files(config: AlignConfig) -> AlignData:
    """Resolve the inputs and write the deterministic train/validation/test split into the work folder."""
    from tasks.align.data import SPLITS, load_sft_table, split_three_ways

    base_dir, base_parent = model_folder(base_model_of(config))
    sft_file, data_parent = dataset_sft_file(config.dataset)
    table = load_sft_table(sft_file)
    check_later_inputs(config)
    parts = split_three_ways(table, config.split.validation_fraction, config.split.test_fraction, config.split.seed)
    work = Registry().work_dir("align", fingerprint(str(base_dir), base_parent, data_parent, str(sft_file), config.split.model_dump()))
    for name in SPLITS:
        atomic.write_parquet(work / f"{name}.parquet", parts[name])
    run_logger().info(f"{table.num_rows} examples: " + ", ".join(f"{parts[n].num_rows} {n}" for n in SPLITS))
    return AlignData(work=str(work), base_dir=str(base_dir), parents=[p for p in (base_parent, data_parent) if p],
                     **{name: str(work / f"{name}.parquet") for name in SPLITS})


prepare_data = task(name="prepare-align-data")(split_files)


def stage_result(stage: str, ref: str, gate_of=None, config: GateOptions | None = None) -> StageResult:
    """A registered model as a stage result, its gate recomputed from the manifest's metrics."""
    version = Registry().resolve("model", ref)
    metrics = dict(version.manifest.metrics)
    gate = gate_of(metrics, config) if gate_of and config else None
    return StageResult(stage=stage, ref=ref, dir=str(version.path), metrics=metrics, gate=gate)


@task(name="sft")
def sft_step(config: AlignConfig, data: AlignData):
    """Fine-tune the base model; its gate: test NLL below the base model's."""
    from tasks.align.sft import train_sft

    key = fingerprint("sft", data.parents, data.base_dir, config.sft.model_dump(mode="json"), config.split.model_dump())
    ref = reuse("model", "sft", key)
    if not ref:
        work = Registry().work_dir("align-sft", key)
        inputs = (Path(data.base_dir), Path(data.train), Path(data.validation), work / "model", config.sft, work / "checkpoints")
        if config.sft_launch.launcher == "none" and config.sft_launch.num_processes == 1:
            metrics = train_sft(*inputs, log=run_logger().info, test_path=Path(data.test))
        else:
            from tasks.align.sft_main import train_sft_launched

            # The launcher's output streams into this task's log; a failed rank fails the task.
            metrics = train_sft_launched(*inputs, launch=config.sft_launch, log=run_logger().info, test_path=Path(data.test))
        png = curve_png(metrics.get("train_loss", []), "SFT training loss", "loss")
        ref = register_folder("model", "sft", work / "model", config.sft, data.parents, metrics, key, {"loss_curve.png": png})
        publish_markdown("align-sft", f"# {ref}\n\nValidation completion loss {metrics['eval_loss_before']:.3f} → "
                         f"**{metrics['eval_loss_after']:.3f}** (restored {metrics.get('best_checkpoint')}); test NLL base "
                         f"{metrics['test_nll_base']:.3f} → SFT **{metrics['test_nll_sft']:.3f}** "
                         f"(± {metrics['test_nll_diff_se']:.3f})\n\n{markdown_image(png, 'SFT loss')}\n",
                         "Supervised fine-tuning: validation and test loss and the training curve.")
    result = stage_result("sft", ref, sft_gate, config)
    return stage_state(result.gate, config, result)


def preference_prompts(data: AlignData) -> pa.Table:
    """Every split's prompts with their side: the RM trains, stops and reports on the same sides as SFT."""
    tables = []
    for name in ("train", "validation", "test"):
        table = pq.read_table(getattr(data, name))
        tables.append(table.append_column("split", pa.array([name] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


def build_preference_table(config: AlignConfig, data: AlignData, sft: StageResult, ask=None, splits=("train", "validation", "test")) -> pa.Table:
    """Sample from the SFT model and judge the samples (plain function: the human judge pauses the flow)."""
    from tasks.align.preferences import build_preferences
    from tasks.generation.config import load_generator
    from tasks.generation.local import LocalGenerator

    prompts = preference_prompts(data)
    # max_prompts counts per split, so that a short run still has validation and test pairs.
    limit, per_split, chosen, keep = config.preferences.max_prompts, Counter(), set(), []
    for prompt, side in zip(prompts["prompt"].to_pylist(), prompts["split"].to_pylist()):
        if prompt not in chosen and side in splits and (limit is None or per_split[side] < limit):
            chosen.add(prompt)
            per_split[side] += 1
        keep.append(prompt in chosen)
    prompts = prompts.filter(pa.array(keep))
    side = dict(zip(prompts["prompt"].to_pylist(), prompts["split"].to_pylist()))
    generator = LocalGenerator(Path(sft.dir), identity_name=sft.ref)
    judge = None
    if config.preferences.judge == "llm":
        judge = load_generator(config.judge_generator, Registry()) if config.judge_generator else generator
    report: dict[str, Any] = {}
    options = config.preferences.model_copy(update={"max_prompts": None})
    table = build_preferences(prompts.drop_columns(["split"]) if config.preferences.judge != "file" else None, options,
                              generator=generator, judge_generator=judge, ask=ask, log=run_logger().info, report=report)
    if "split" not in table.column_names:
        # Imported labels may hold prompts the dataset does not: they get a side from the same hash.
        from tasks.align.data import side_of

        sides = [side.get(p) or side_of(p, config.split.validation_fraction, config.split.test_fraction, config.split.seed)
                 for p in table["prompt"].to_pylist()]
        table = table.append_column("split", pa.array(sides, pa.string()))
    return table.replace_schema_metadata({b"judge_report": json.dumps(report).encode()})


def preferences_key(config: AlignConfig, sft: StageResult) -> str:
    return fingerprint("preferences", sft.ref, config.preferences.model_dump(mode="json"), config.split.model_dump())


@task(name="register-preferences")
def register_preferences(config: AlignConfig, data: AlignData, sft: StageResult, table_path: str) -> str:
    from tasks.align.preferences import preference_stats

    table = pq.read_table(table_path)
    report = json.loads((table.schema.metadata or {}).get(b"judge_report", b"{}"))
    registry = Registry()
    with registry.new_version("dataset", "preferences", config=config.preferences, parents=[f"model:{sft.ref}", *data.parents[1:]]) as draft:
        atomic.write_parquet(draft.path / "preferences.parquet", table.replace_schema_metadata(None))
        stats = preference_stats(table)
        draft.metrics.update(stats)
        draft.extra.update(fingerprint=preferences_key(config, sft), judge_report=report)
    publish_table("align-judge", [{"statistic": k, "value": v} for k, v in {**stats, **report}.items() if isinstance(v, (int, float))],
                  f"The {config.preferences.judge} judge's statistics for {draft.ref}: pairs, length bias, ties, agreement.")
    publish_table("align-preference-samples", table.slice(0, 10).select(["prompt", "chosen", "rejected", "judge", "split"]).to_pylist(),
                  f"First preference pairs of {draft.ref}.")
    return draft.ref


def preference_split_files(preferences_ref: str, work: Path) -> dict[str, Path]:
    """The registered pairs as one Parquet file per split, in `work`."""
    prefs = pq.read_table(Registry().resolve("dataset", preferences_ref).file("preferences.parquet"))
    paths = {}
    for name in ("train", "validation", "test"):
        part = prefs.filter(pa.array([s == name for s in prefs["split"].to_pylist()]))
        if part.num_rows == 0:
            raise ValueError(f"{preferences_ref}: no preference pairs in the {name} split; sample more prompts")
        paths[name] = atomic.write_parquet(work / f"{name}.parquet", part)
    return paths


@task(name="reward-model")
def reward_step(config: AlignConfig, sft: StageResult, preferences_ref: str):
    """Train the reward model on the train pairs, stop early on validation; its gate: test accuracy above chance."""
    from tasks.align.reward import train_reward_model

    key = fingerprint("rm", sft.ref, preferences_ref, config.reward.model_dump(mode="json"))
    ref = reuse("model", "rm", key)
    if not ref:
        work = Registry().work_dir("align-rm", key)
        paths = preference_split_files(preferences_ref, work)
        metrics = train_reward_model(Path(sft.dir), paths["train"], paths["validation"], work / "model", config.reward,
                                     work / "checkpoints", log=run_logger().info, test_prefs=paths["test"])
        ref = register_folder("model", "rm", work / "model", config.reward, [f"model:{sft.ref}", f"dataset:{preferences_ref}"], metrics, key)
        publish_table("align-reward-model", [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float))],
                      f"Reward model {ref}: pairwise accuracy on validation (before and after) and on test.")
    result = stage_result("rm", ref, reward_gate, config)
    return stage_state(result.gate, config, result)


@task(name="ppo")
def ppo_step(config: AlignConfig, data: AlignData, sft: StageResult, rm: StageResult) -> StageResult:
    """PPO on the train prompts against the RM; its gate is decided by the test evaluation."""
    from tasks.align.ppo import train_ppo

    key = fingerprint("ppo", sft.ref, rm.ref, config.ppo.model_dump(mode="json"), config.split.model_dump())
    ref = reuse("model", "ppo", key)
    if not ref:
        work = Registry().work_dir("align-ppo", key)
        prompts = pq.read_table(data.train).select(["prompt"])
        atomic.write_parquet(work / "prompts.parquet", prompts)
        result = train_ppo(Path(sft.dir), Path(rm.dir), work / "prompts.parquet", work / "model", config.ppo, work / "checkpoints",
                           log=run_logger().info)
        updates = result.get("updates", [])
        series = {name: [(u["update"], u[name]) for u in updates if name in u] for name in ("score", "kl")}
        png = plot_curves(series, "PPO: reward model score and KL per update", "update", "value")
        final = {k: v for k, v in (updates[-1] if updates else {}).items() if isinstance(v, (int, float))}
        ref = register_folder("model", "ppo", work / "model", config.ppo, [f"model:{sft.ref}", f"model:{rm.ref}"], final, key,
                              {"ppo_curves.png": png, "ppo_updates.json": json.dumps(updates).encode()})
        publish_markdown("align-ppo", f"# {ref}\n\n{markdown_image(png, 'PPO curves')}\n", "PPO reward and KL per update.")
    return stage_result("ppo", ref)


@task(name="dpo")
def dpo_step(config: AlignConfig, sft: StageResult, preferences_ref: str) -> StageResult:
    """DPO on the train pairs (no reward model in training; the evaluation still reads the RM)."""
    from tasks.align.dpo import train_dpo

    key = fingerprint("dpo", sft.ref, preferences_ref, config.dpo.model_dump(mode="json"))
    ref = reuse("model", "dpo", key)
    if not ref:
        work = Registry().work_dir("align-dpo", key)
        paths = preference_split_files(preferences_ref, work)
        metrics = train_dpo(Path(sft.dir), paths["train"], paths["validation"], work / "model", config.dpo, work / "checkpoints",
                            log=run_logger().info)
        flat = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
        flat.update({f"validation_{k}_{when}": v for when in ("before", "after") for k, v in (metrics.get(f"heldout_{when}") or {}).items()})
        ref = register_folder("model", "dpo", work / "model", config.dpo, [f"model:{sft.ref}", f"dataset:{preferences_ref}"], flat, key)
    return stage_result("dpo", ref)


@task(name="rloo")
def rloo_step(config: AlignConfig, data: AlignData, sft: StageResult, rm: StageResult) -> StageResult:
    """RLOO on the train prompts against the reward model (TRL's RLOOTrainer)."""
    from tasks.align.rloo import train_rloo

    key = fingerprint("rloo", sft.ref, rm.ref, config.rloo.model_dump(mode="json"), config.split.model_dump())
    ref = reuse("model", "rloo", key)
    if not ref:
        work = Registry().work_dir("align-rloo", key)
        prompts = atomic.write_parquet(work / "prompts.parquet", pq.read_table(data.train).select(["prompt"]))
        metrics = train_rloo(Path(sft.dir), Path(rm.dir), prompts, work / "model", config.rloo, work / "checkpoints",
                             log=run_logger().info)
        final = {k: v for k, v in metrics.get("final", {}).items() if isinstance(v, (int, float))}
        ref = register_folder("model", "rloo", work / "model", config.rloo, [f"model:{sft.ref}", f"model:{rm.ref}"],
                              {**final, "steps": metrics.get("steps")}, key)
    return stage_result("rloo", ref)


@task(name="evaluate")
def evaluate_step(config: AlignConfig, data: AlignData, models: dict[str, StageResult], rm: StageResult):
    """Base vs SFT vs PPO on the test prompts; registers the eval dataset with every stage's gate.

    The task's state is the policy gate's (PPO against SFT): the evaluation is where PPO is judged.
    """
    from tasks.align.evaluate import evaluate_models, metrics_rows, write_eval_tables

    test = pq.read_table(data.test).slice(0, config.evaluation.max_prompts)
    folders = {"base": Path(data.base_dir), **{name: Path(m.dir) for name, m in models.items()}}
    judge = None
    if config.evaluation.judge:
        from tasks.align.preferences import single_verdict_judge
        from tasks.generation.config import load_generator

        judge = single_verdict_judge(load_generator(config.evaluation.judge, Registry()))
    result = evaluate_models(folders, Path(rm.dir), test["prompt"].to_pylist(), test["completion"].to_pylist(),
                             config.evaluation.decoding, reference_model="sft", judge=judge, log=run_logger().info)
    gates = {m.stage: m.gate for m in (*models.values(), rm) if m.gate is not None}
    policy = next((name for name in models if name != "sft"), None)
    if policy:
        gates[policy] = policy_gate(policy, result, config)
    result["gates"] = {stage: gate.entry() for stage, gate in gates.items()}
    parents = [*data.parents, *(f"model:{m.ref}" for m in models.values()), f"model:{rm.ref}"]
    with Registry().new_version("dataset", "eval", config=config.evaluation, parents=parents) as draft:
        tables = write_eval_tables(result, draft.path)
        samples = pq.read_table(tables["samples"]).slice(0, 8).to_pylist()
        atomic.write_json(draft.path / "evaluation.json", result)
        draft.metrics.update({f"gate_{stage}_passed": gate.passed for stage, gate in gates.items()})
    publish_table("align-evaluation", metrics_rows(result), f"Base vs SFT vs PPO on {test.num_rows} test prompts ({draft.ref}).")
    publish_table("align-samples", samples, "The same test prompts answered by base, SFT and PPO.")
    outcome = EvaluationResult(ref=draft.ref, gates=gates)
    return stage_state(gates[policy], config, outcome) if policy else outcome
