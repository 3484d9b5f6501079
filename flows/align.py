"""Align the pretrained model the InstructGPT way: SFT -> preference pairs -> reward model -> PPO -> evaluation.

    alignflow align --model base --dataset self-instruct
    alignflow align --judge human          # the flow pauses with a form in the Prefect UI for each pair
    python flows/align.py --sft-max-steps 300 --ppo-total-episodes 2000

Every stage registers its output with lineage back to the corpus and the seeds; a re-run with the
same parameters reuses finished stages and resumes an interrupted one from its checkpoints. A GPU
is used when present (bf16), the CPU otherwise (fp32).
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
from tasks.align.steps import (
    AlignConfig,
    build_preference_table,
    evaluate_step,
    ppo_step,
    preferences_key,
    prepare_data,
    register_preferences,
    reward_step,
    sft_step,
)
from tasks.publish import run_logger


class PreferenceChoice(RunInput):
    """A person's verdict on one pair of responses."""

    choice: Literal["A", "B", "skip"] = Field(description="Which response is better: A, B, or skip this pair.")


def ask_in_the_ui(prompt: str, response_a: str, response_b: str) -> str:
    """Pause the flow run with a form showing the prompt and both responses; resume with the choice."""
    description = f"## Which response is better?\n\n**Prompt**\n\n{prompt}\n\n**A**\n\n{response_a}\n\n**B**\n\n{response_b}\n"
    answer = pause_flow_run(wait_for_input=PreferenceChoice.with_initial_data(description=description), timeout=24 * 3600)
    return answer.choice


@task(name="preferences")
def preferences_step(config: AlignConfig, data: dict, sft: dict) -> str:
    table = build_preference_table(config, data, sft)
    path = Path(data["work"]) / f"preferences-{preferences_key(config, sft)}.parquet"
    atomic.write_parquet(path, table)
    return str(path)


# log_prints stays off: datasets fingerprints functions with dill, which reads the output of
# dis.dis() from a captured stdout, and a patched print() would flood the run log with bytecode.
@flow(name="align")
def align(config: AlignConfig = AlignConfig()) -> dict[str, str]:
    """Run SFT, preferences, reward model, PPO and evaluation; return the registered refs."""
    logger = run_logger()
    data = prepare_data(config)
    sft = sft_step(config, data)

    preferences_ref = Registry().find("dataset", "preferences", preferences_key(config, sft))
    if preferences_ref:
        preferences_ref = preferences_ref.ref
    elif config.preferences.judge == "human":
        # Pausing needs the flow's own context, so the human judge runs here rather than in a task.
        table = build_preference_table(config, data, sft, ask=ask_in_the_ui)
        path = Path(data["work"]) / f"preferences-{preferences_key(config, sft)}.parquet"
        atomic.write_parquet(path, table)
        preferences_ref = register_preferences(config, data, sft, str(path))
    else:
        preferences_ref = register_preferences(config, data, sft, preferences_step(config, data, sft))

    if config.stop_after == "preferences":
        return {"sft": sft["ref"], "preferences": preferences_ref}
    rm = reward_step(config, sft, preferences_ref)
    if config.stop_after == "reward":
        return {"sft": sft["ref"], "preferences": preferences_ref, "rm": rm["ref"]}
    models = {"sft": sft}
    if not config.skip_ppo:
        models["ppo"] = ppo_step(config, data, sft, rm)
    eval_ref = evaluate_step(config, data, models, rm)
    refs = {"sft": sft["ref"], "preferences": preferences_ref, "rm": rm["ref"], **({"ppo": models["ppo"]["ref"]} if "ppo" in models else {}), "eval": eval_ref}
    logger.info(f"registered: {refs}")
    return refs


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["align", *sys.argv[1:]]))
