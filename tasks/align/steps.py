"""The align flow's config and Prefect tasks: SFT -> preferences -> reward model -> PPO -> evaluation.

Each stage registers what it makes (models `sft`, `rm`, `ppo`; datasets `preferences`, `eval`)
with its lineage, and records a fingerprint of its exact inputs: a re-run with the same parameters
reuses finished stages and resumes the interrupted one from its checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel, Field

from storage import atomic
from storage.registry import Registry, fingerprint
from tasks.align.config import PreferenceOptions, RewardOptions, SFTOptions, SplitOptions
from tasks.align.ppo import PPOOptions
from tasks.generation.config import GeneratorConfig, resolve_local_model
from tasks.generation.params import DecodingParams
from tasks.launch import LaunchOptions
from tasks.publish import markdown_image, plot_curves, publish_markdown, publish_table, run_logger


class EvalOptions(BaseModel):
    """How the aligned models are compared on held-out prompts."""

    max_prompts: int = Field(64, ge=2, description="Held-out prompts answered by every model.")
    decoding: DecodingParams = Field(
        default_factory=lambda: DecodingParams(strategy="sample", temperature=0.7, max_new_tokens=40, seed=0),
        description="Decoding of the evaluation answers (the same for every model).")
    judge: GeneratorConfig | None = Field(
        None, description="An LLM judge for the win rate of PPO vs SFT, asked twice with positions swapped (a registry ref, a folder or an endpoint). Empty: the reward model's win rate only.")


class AlignConfig(BaseModel):
    """Base model + instruction dataset in, SFT, reward and PPO models and an evaluation table out."""

    model: str | None = Field(None, description="The base model: a registry model ref (name or name@version) or a local HF folder. Empty: the model that generated the dataset (its lineage), else the latest 'base'.")
    dataset: str = Field("self-instruct", description="The instruction data: a registry dataset ref (its sft table is used) or a Parquet file with prompt/completion or messages.")
    split: SplitOptions = Field(default_factory=SplitOptions, description="The deterministic train/held-out split.")
    sft: SFTOptions = Field(default_factory=SFTOptions, description="Supervised fine-tuning (TRL SFTTrainer).")
    sft_launch: LaunchOptions = Field(default_factory=LaunchOptions, description="Run SFT in this process, or through accelerate/torchrun with N processes (multi-GPU, DeepSpeed/FSDP configs).")
    preferences: PreferenceOptions = Field(default_factory=PreferenceOptions, description="Preference pairs: sampling and the judge.")
    judge_generator: GeneratorConfig | None = Field(None, description="The LLM judge's generator when preferences.judge is 'llm' (default: the SFT model).")
    reward: RewardOptions = Field(default_factory=RewardOptions, description="Reward model (TRL RewardTrainer).")
    ppo: PPOOptions = Field(default_factory=PPOOptions, description="PPO against the reward model (our own, tasks/align/ppo.py).")
    evaluation: EvalOptions = Field(default_factory=EvalOptions, description="The final comparison of base, SFT and PPO.")
    skip_ppo: bool = Field(False, description="Leave PPO out (the evaluation then compares base and SFT).")
    stop_after: Literal["preferences", "reward", "evaluation"] = Field(
        "evaluation", description="Stop after this stage, e.g. 'preferences' to collect human labels first and train later.")


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
        for parent in Registry().resolve("dataset", config.dataset).manifest.parents:
            kind, _, ref = parent.partition(":")
            if kind == "model":
                return ref
    return "base"


def dataset_sft_file(ref_or_path: str) -> tuple[Path, str | None]:
    path = Path(ref_or_path).expanduser()
    if path.exists():
        return path, None
    version = Registry().resolve("dataset", ref_or_path)
    return version.file("sft.parquet"), f"dataset:{version.ref}"


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


@task(name="prepare-align-data")
def prepare_data(config: AlignConfig) -> dict[str, Any]:
    """Resolve the inputs and write the deterministic train/held-out split into the work folder."""
    from tasks.align.data import load_sft_table, split_train_eval

    base_dir, base_parent = model_folder(base_model_of(config))
    sft_file, data_parent = dataset_sft_file(config.dataset)
    table = load_sft_table(sft_file)
    train, held_out = split_train_eval(table, config.split.eval_fraction, config.split.seed)
    work = Registry().work_dir("align", fingerprint(str(base_dir), base_parent, data_parent, str(sft_file), config.split.model_dump()))
    atomic.write_parquet(work / "train.parquet", train)
    atomic.write_parquet(work / "heldout.parquet", held_out)
    run_logger().info(f"{table.num_rows} examples: {train.num_rows} train, {held_out.num_rows} held out")
    return {"work": str(work), "base_dir": str(base_dir), "parents": [p for p in (base_parent, data_parent) if p],
            "train": str(work / "train.parquet"), "heldout": str(work / "heldout.parquet")}


@task(name="sft")
def sft_step(config: AlignConfig, data: dict[str, Any]) -> dict[str, Any]:
    from tasks.align.sft import train_sft

    key = fingerprint("sft", data["parents"], data["base_dir"], config.sft.model_dump(mode="json"), config.split.model_dump())
    ref = reuse("model", "sft", key)
    if not ref:
        work = Registry().work_dir("align-sft", key)
        inputs = (Path(data["base_dir"]), Path(data["train"]), Path(data["heldout"]), work / "model", config.sft, work / "checkpoints")
        if config.sft_launch.launcher == "none" and config.sft_launch.num_processes == 1:
            metrics = train_sft(*inputs, log=run_logger().info)
        else:
            from tasks.align.sft_main import train_sft_launched

            # The launcher's output streams into this task's log; a failed rank fails the task.
            metrics = train_sft_launched(*inputs, launch=config.sft_launch, log=run_logger().info)
        png = curve_png(metrics.get("train_loss", []), "SFT training loss", "loss")
        ref = register_folder("model", "sft", work / "model", config.sft, data["parents"], metrics, key, {"loss_curve.png": png})
        publish_markdown("align-sft", f"# {ref}\n\nHeld-out completion loss {metrics['eval_loss_before']:.3f} → **{metrics['eval_loss_after']:.3f}**\n\n"
                         f"{markdown_image(png, 'SFT loss')}\n", "Supervised fine-tuning: held-out loss and the training curve.")
    return {"ref": ref, "dir": str(Registry().resolve("model", ref).path)}


def build_preference_table(config: AlignConfig, data: dict[str, Any], sft: dict[str, Any], ask=None) -> pa.Table:
    """Sample from the SFT model and judge the samples (plain function: the human judge pauses the flow)."""
    from tasks.align.preferences import build_preferences
    from tasks.generation.config import load_generator
    from tasks.generation.local import LocalGenerator

    table = pq.read_table(data["train"])
    generator = LocalGenerator(Path(sft["dir"]), identity_name=sft["ref"])
    judge = None
    if config.preferences.judge == "llm":
        judge = load_generator(config.judge_generator, Registry()) if config.judge_generator else generator
    return build_preferences(table if config.preferences.judge != "file" else None, config.preferences, generator=generator,
                             judge_generator=judge, ask=ask, log=run_logger().info)


def preferences_key(config: AlignConfig, sft: dict[str, Any]) -> str:
    return fingerprint("preferences", sft["ref"], config.preferences.model_dump(mode="json"), config.split.model_dump())


@task(name="register-preferences")
def register_preferences(config: AlignConfig, data: dict[str, Any], sft: dict[str, Any], table_path: str) -> str:
    from tasks.align.preferences import preference_stats

    table = pq.read_table(table_path)
    registry = Registry()
    with registry.new_version("dataset", "preferences", config=config.preferences, parents=[f"model:{sft['ref']}", *data["parents"][1:]]) as draft:
        atomic.write_parquet(draft.path / "preferences.parquet", table)
        draft.metrics.update(preference_stats(table))
        draft.extra["fingerprint"] = preferences_key(config, sft)
    publish_table("align-preference-samples", table.slice(0, 10).select(["prompt", "chosen", "rejected", "judge"]).to_pylist(),
                  f"First preference pairs of {draft.ref}.")
    return draft.ref


@task(name="reward-model")
def reward_step(config: AlignConfig, sft: dict[str, Any], preferences_ref: str) -> dict[str, Any]:
    from tasks.align.data import split_train_eval
    from tasks.align.reward import train_reward_model

    key = fingerprint("rm", sft["ref"], preferences_ref, config.reward.model_dump(mode="json"))
    ref = reuse("model", "rm", key)
    if not ref:
        work = Registry().work_dir("align-rm", key)
        prefs = pq.read_table(Registry().resolve("dataset", preferences_ref).file("preferences.parquet"))
        # Another salt than the instruction split's: the same seed would put the RM's held-out pairs
        # in a slice of the hash range that SFT's split already shapes.
        train, held_out = split_train_eval(prefs, config.reward.eval_fraction, config.reward.seed + 1_000_003)
        atomic.write_parquet(work / "train.parquet", train)
        atomic.write_parquet(work / "heldout.parquet", held_out)
        metrics = train_reward_model(Path(sft["dir"]), work / "train.parquet", work / "heldout.parquet", work / "model", config.reward,
                                     work / "checkpoints", log=run_logger().info)
        ref = register_folder("model", "rm", work / "model", config.reward, [f"model:{sft['ref']}", f"dataset:{preferences_ref}"], metrics, key)
        publish_table("align-reward-model", [{"metric": k, "value": v} for k, v in metrics.items() if isinstance(v, (int, float))],
                      f"Reward model {ref}: held-out pairwise accuracy before and after training.")
    return {"ref": ref, "dir": str(Registry().resolve("model", ref).path)}


@task(name="ppo")
def ppo_step(config: AlignConfig, data: dict[str, Any], sft: dict[str, Any], rm: dict[str, Any]) -> dict[str, Any]:
    from tasks.align.ppo import train_ppo

    key = fingerprint("ppo", sft["ref"], rm["ref"], config.ppo.model_dump(mode="json"), config.split.model_dump())
    ref = reuse("model", "ppo", key)
    if not ref:
        work = Registry().work_dir("align-ppo", key)
        prompts = pq.read_table(data["train"]).select(["prompt"])
        atomic.write_parquet(work / "prompts.parquet", prompts)
        result = train_ppo(Path(sft["dir"]), Path(rm["dir"]), work / "prompts.parquet", work / "model", config.ppo, work / "checkpoints",
                           log=run_logger().info)
        updates = result.get("updates", [])
        series = {name: [(u["update"], u[name]) for u in updates if name in u] for name in ("score", "kl")}
        png = plot_curves(series, "PPO: reward model score and KL per update", "update", "value")
        final = {k: v for k, v in (updates[-1] if updates else {}).items() if isinstance(v, (int, float))}
        ref = register_folder("model", "ppo", work / "model", config.ppo, [f"model:{sft['ref']}", f"model:{rm['ref']}"], final, key,
                              {"ppo_curves.png": png, "ppo_updates.json": json.dumps(updates).encode()})
        publish_markdown("align-ppo", f"# {ref}\n\n{markdown_image(png, 'PPO curves')}\n", "PPO reward and KL per update.")
    return {"ref": ref, "dir": str(Registry().resolve("model", ref).path)}


@task(name="evaluate")
def evaluate_step(config: AlignConfig, data: dict[str, Any], models: dict[str, dict[str, Any]], rm: dict[str, Any]) -> str:
    from tasks.align.evaluate import evaluate_models, metrics_rows, write_eval_tables

    held_out = pq.read_table(data["heldout"]).slice(0, config.evaluation.max_prompts)
    folders = {"base": Path(data["base_dir"]), **{name: Path(m["dir"]) for name, m in models.items()}}
    judge = None
    if config.evaluation.judge:
        from tasks.align.preferences import single_verdict_judge
        from tasks.generation.config import load_generator

        judge = single_verdict_judge(load_generator(config.evaluation.judge, Registry()))
    result = evaluate_models(folders, Path(rm["dir"]), held_out["prompt"].to_pylist(), held_out["completion"].to_pylist(),
                             config.evaluation.decoding, reference_model="sft", judge=judge, log=run_logger().info)
    registry = Registry()
    parents = [*data["parents"], *(f"model:{m['ref']}" for m in models.values()), f"model:{rm['ref']}"]
    with registry.new_version("dataset", "eval", config=config.evaluation, parents=parents) as draft:
        tables = write_eval_tables(result, draft.path)
        samples = pq.read_table(tables["samples"]).slice(0, 8).to_pylist()
        atomic.write_json(draft.path / "evaluation.json", result)
    rows = metrics_rows(result)
    publish_table("align-evaluation", rows, f"Base vs SFT vs PPO on {held_out.num_rows} held-out prompts ({draft.ref}).")
    publish_table("align-samples", samples, "The same held-out prompts answered by base, SFT and PPO.")
    return draft.ref
