"""The align flow end to end on a tiny model: every stage registered with lineage; the human judge via the API."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.align import align
from storage.registry import Registry
from tasks.align.config import PreferenceOptions, RewardOptions, SFTOptions, SplitOptions
from tasks.align.ppo import PPOOptions
from tasks.align.steps import AlignConfig, EvalOptions
from tasks.generation.params import DecodingParams

pytestmark = pytest.mark.slow

COLOURS = ["red", "blue", "green", "black", "white", "brown", "pink", "grey", "gold", "teal"]
ANIMALS = ["cat", "dog", "cow", "owl", "fox", "bee", "ant", "elk", "yak", "emu"]


@pytest.fixture
def instruction_file(tmp_path):
    rows = [{"prompt": f"Describe a {c} {a}.", "completion": f"The {a} is {c}."} for c in COLOURS for a in ANIMALS[:6]]
    path = tmp_path / "instructions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def tiny_config(model, dataset, **overrides) -> AlignConfig:
    values = dict(
        gates="warn",  # a random tiny model regresses; these tests are about the plumbing
        model=str(model), dataset=str(dataset), split=SplitOptions(validation_fraction=0.2, test_fraction=0.2, seed=0),
        sft=SFTOptions(max_steps=30, learning_rate=3e-3, per_device_train_batch_size=8, eval_steps=15, logging_steps=10),
        preferences=PreferenceOptions(num_samples=2, max_prompts=12, decoding=DecodingParams(strategy="sample", temperature=1.0, max_new_tokens=12)),
        reward=RewardOptions(max_steps=10, per_device_train_batch_size=4, eval_steps=10, logging_steps=5),
        ppo=PPOOptions(total_updates=2, per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=1, response_length=8, checkpoint_every=1),
        evaluation=EvalOptions(max_prompts=4, decoding=DecodingParams(strategy="sample", temperature=0.7, max_new_tokens=8)),
    )
    values.update(overrides)
    return AlignConfig(**values)


def test_align_registers_every_stage_with_lineage(registry_root, tiny_model_dir, instruction_file):
    from tasks.generation.config import GeneratorConfig

    evaluation = EvalOptions(max_prompts=4, decoding=DecodingParams(strategy="sample", temperature=0.7, max_new_tokens=8),
                             judge=GeneratorConfig(model=str(tiny_model_dir)))
    refs = align(tiny_config(tiny_model_dir, instruction_file, evaluation=evaluation))
    registry = Registry()
    assert set(refs) == {"sft", "preferences", "rm", "ppo", "eval"}
    sft = registry.resolve("model", refs["sft"]).manifest
    assert sft.metrics["eval_loss_after"] < sft.metrics["eval_loss_before"]
    ppo_lineage = {v.ref for _, _, v in registry.lineage("model", refs["ppo"])}
    assert {refs["sft"], refs["rm"], refs["preferences"]} <= ppo_lineage
    eval_version = registry.resolve("dataset", refs["eval"])
    metrics = pq.read_table(eval_version.file("metrics.parquet")).to_pylist()
    assert {row["model"] for row in metrics} >= {"base", "sft", "ppo"}
    ppo_row = next(row for row in metrics if row["model"] == "ppo")
    # Both judges compared PPO with SFT on every held-out prompt (a tiny model's verdicts are mostly ties).
    assert ppo_row["rm_wins"] + ppo_row["rm_losses"] + ppo_row["rm_ties"] == 4
    assert ppo_row["llm_wins"] + ppo_row["llm_losses"] + ppo_row["llm_ties"] == 4
    samples = pq.read_table(eval_version.file("samples.parquet"))
    assert samples.num_rows == 4
    # A second run with the same parameters reuses every finished stage.
    again = align(tiny_config(tiny_model_dir, instruction_file, evaluation=evaluation))
    assert {k: again[k] for k in ("sft", "preferences", "rm", "ppo")} == {k: refs[k] for k in ("sft", "preferences", "rm", "ppo")}


def test_human_judge_answers_through_the_prefect_api(registry_root, tiny_model_dir, instruction_file):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.flow_runs import resume_flow_run

    config = tiny_config(tiny_model_dir, instruction_file, stop_after="preferences",
                         preferences=PreferenceOptions(judge="human", num_samples=2, max_prompts=3, pairs_per_prompt=1,
                                                       decoding=DecodingParams(strategy="sample", temperature=1.5, max_new_tokens=12)))
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("refs", align(config)), daemon=True)
    runner.start()
    answered = 0
    deadline = time.time() + 600
    with get_client(sync_client=True) as client:
        while runner.is_alive() and time.time() < deadline:
            paused = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))),
                sort=FlowRunSort.START_TIME_DESC, limit=10)
            for run in paused:
                resume_flow_run(run.id, run_input={"choice": "A"})
                answered += 1
            time.sleep(0.5)
    runner.join(60)
    assert answered >= 1
    preferences = Registry().resolve("dataset", result["refs"]["preferences"])
    table = pq.read_table(preferences.file("preferences.parquet")).to_pylist()
    assert len(table) == answered
    assert all(row["judge"] == "human" for row in table)


def test_sft_stage_through_accelerate_with_two_cpu_processes(registry_root, tiny_model_dir, instruction_file):
    """The launcher's output reaches the task log, and the launched SFT is registered like any other."""
    from tasks.launch import LaunchOptions

    config = tiny_config(tiny_model_dir, instruction_file, stop_after="preferences",
                         sft_launch=LaunchOptions(launcher="accelerate", num_processes=2, cpu=True))
    refs = align(config)
    sft = Registry().resolve("model", refs["sft"]).manifest
    assert sft.metrics["world_size"] == 2
    assert sft.metrics["eval_loss_after"] < sft.metrics["eval_loss_before"]
    assert Registry().exists("dataset", refs["preferences"])


@pytest.mark.parametrize("method", ["dpo", "rloo"])
def test_dpo_and_rloo_run_from_the_align_flow_and_register_with_lineage(registry_root, tiny_model_dir, instruction_file, method):
    from tasks.align.dpo import DPOOptions
    from tasks.align.rloo import RLOOOptions

    config = tiny_config(tiny_model_dir, instruction_file, method=method,
                         dpo=DPOOptions(max_steps=4, per_device_train_batch_size=4, save_steps=2, logging_steps=2),
                         rloo=RLOOOptions(max_steps=2, per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                                          save_steps=2, logging_steps=1))
    refs = align(config)
    assert method in refs and "ppo" not in refs
    registry = Registry()
    lineage = {v.ref for _, _, v in registry.lineage("model", refs[method])}
    assert refs["sft"] in lineage
    assert (refs["preferences"] if method == "dpo" else refs["rm"]) in lineage
    evaluation = registry.resolve("dataset", refs["eval"])
    rows = {row["model"] for row in pq.read_table(evaluation.file("metrics.parquet")).to_pylist()}
    assert rows == {"base", "sft", method}
    import json

    gates = json.loads((evaluation.path / "evaluation.json").read_text())["gates"]
    assert set(gates) == {"sft", "rm", method} and {"kl", "independent"} <= set(gates[method])
