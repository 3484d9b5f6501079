"""Align the pretrained model the InstructGPT way: SFT -> preference pairs -> reward model -> PPO -> evaluation.

    alignflow align --model base --dataset self-instruct
    alignflow align --judge human          # the flow pauses with a form in the Prefect UI for each pair
    alignflow align --gates warn           # report regressions without stopping the run
    python flows/align.py --sft-num-train-epochs 20 --ppo-total-episodes 2000

Every stage registers its output with lineage back to the corpus and the seeds; a re-run with the
same parameters reuses finished stages and resumes an interrupted one from its checkpoints. Each
training stage is judged on the test split against its predecessor (SFT vs base on NLL, the RM vs
chance on accuracy, PPO vs SFT on reward, KL and ROUGE-L to the reference); the verdicts are the
stages' state names and the `align-gates` table. A GPU is used when present (bf16), the CPU
otherwise (fp32).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from storage import atomic
from storage.registry import Registry
from tasks.align.gates import Gate, QualityGateFailed
from tasks.align.steps import (
    AlignConfig,
    AlignData,
    EvaluationResult,
    StageResult,
    build_preference_table,
    dpo_step,
    evaluate_step,
    ppo_step,
    preferences_key,
    prepare_data,
    register_preferences,
    reward_step,
    rloo_step,
    sft_step,
)
from tasks.publish import publish_table, run_logger
from tasks.timing import stage_timer


class PreferenceChoice(RunInput):
    """A person's verdict on one pair of responses."""

    choice: Literal["A", "B", "skip"] = Field(description="Which response is better: A, B, or skip this pair.")


def ask_in_the_ui(prompt: str, response_a: str, response_b: str) -> str:
    """Pause the flow run with a form showing the prompt and both responses; resume with the choice."""
    description = f"## Which response is better?\n\n**Prompt**\n\n{prompt}\n\n**A**\n\n{response_a}\n\n**B**\n\n{response_b}\n"
    answer = pause_flow_run(wait_for_input=PreferenceChoice.with_initial_data(description=description), timeout=24 * 3600)
    return answer.choice


@task(name="preferences")
def preferences_step(config: AlignConfig, data: AlignData, sft: StageResult) -> str:
    table = build_preference_table(config, data, sft)
    path = Path(data.work) / f"preferences-{preferences_key(config, sft)}.parquet"
    atomic.write_parquet(path, table)
    return str(path)


def publish_gates(gates: dict[str, Gate]) -> None:
    rows = [gate.row() for gate in gates.values()]
    publish_table("align-gates", rows, "Quality gates: each stage against its predecessor on the test split.")
    for row in rows:
        run_logger().info(f"gate {row['stage']}: {'passed' if row['passed'] else 'FAILED'}: {row['why']}")


def passed_or_stop(state, gates: dict[str, Gate]):
    """The stage's result; a Failed (Regressed) stage ends the run after the gates are published."""
    if state.is_failed() and state.name != "Regressed":
        state.result()  # a stage that crashed raises its own error, not a gate's
    result = state.result(raise_on_failure=False) if state.is_failed() else state.result()
    if isinstance(result, (StageResult, EvaluationResult)):
        gates.update(result.gates if isinstance(result, EvaluationResult) else {result.stage: result.gate} if result.gate else {})
    if state.is_failed():
        publish_gates(gates)
        raise QualityGateFailed(state.message)
    return result


def preferences_ref_for(config: AlignConfig, data: AlignData, sft: StageResult) -> str:
    found = Registry().find("dataset", "preferences", preferences_key(config, sft))
    if found:
        return found.ref
    if config.preferences.judge == "human":
        # Pausing needs the flow's own context, so the human judge runs here rather than in a task.
        table = build_preference_table(config, data, sft, ask=ask_in_the_ui)
        path = Path(data.work) / f"preferences-{preferences_key(config, sft)}.parquet"
        atomic.write_parquet(path, table)
        return register_preferences(config, data, sft, str(path))
    return register_preferences(config, data, sft, preferences_step(config, data, sft))


# log_prints stays off: datasets fingerprints functions with dill, which reads the output of
# dis.dis() from a captured stdout, and a patched print() would flood the run log with bytecode.
@flow(name="align")
def align(config: AlignConfig = AlignConfig()) -> dict[str, str]:
    """Run SFT, preferences, reward model, PPO and evaluation; return the registered refs.

    Each training stage must beat its predecessor on the test split (its gate); with gates=fail a
    regression ends the run there, with the gates table published.
    """
    logger = run_logger()
    gates: dict[str, Gate] = {}
    with stage_timer("split"):
        data = prepare_data(config)
    with stage_timer("sft"):
        sft = passed_or_stop(sft_step(config, data, return_state=True), gates)
    with stage_timer("preferences"):
        preferences_ref = preferences_ref_for(config, data, sft)
    refs = {"sft": sft.ref, "preferences": preferences_ref}
    if config.stop_after == "preferences":
        return refs
    with stage_timer("reward model"):
        rm = passed_or_stop(reward_step(config, sft, preferences_ref, return_state=True), gates)
    refs["rm"] = rm.ref
    if config.stop_after == "reward":
        publish_gates(gates)
        return refs
    models = {"sft": sft}
    if not config.skip_ppo:
        with stage_timer(config.method):
            if config.method == "dpo":
                policy = dpo_step(config, sft, preferences_ref)
            elif config.method == "rloo":
                policy = rloo_step(config, data, sft, rm)
            else:
                policy = ppo_step(config, data, sft, rm)
        models[config.method] = policy
        refs[config.method] = policy.ref
    with stage_timer("evaluation"):
        state = evaluate_step(config, data, models, rm, return_state=True)
        evaluation = passed_or_stop(state, gates)
    publish_gates(gates)
    refs["eval"] = evaluation.ref
    logger.info(f"registered: {refs}")
    return refs


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["align", *sys.argv[1:]]))
