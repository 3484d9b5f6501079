"""Self-Instruct: a few seed tasks -> a large, filtered instruction dataset with instances.

    alignflow self-instruct --num-instructions 200                   # demo seeds, the latest base model
    alignflow self-instruct --seeds my_seeds.jsonl --generator openai --base-url http://127.0.0.1:8000/v1 --model my-model
    python flows/self_instruct.py --language ko
    alignflow self-instruct --extend self-instruct --num-instructions 50   # add up to 50 to the latest version

Every batch of requests is checkpointed: a killed run started again with the same parameters goes
on where it stopped and ends with the same dataset. With `--extend NAME[@N]` the run grows a registered version: it keeps that version's
rows, adds up to `--num-instructions` new ones and registers a new version with the old one as a
parent (a name with no version yet: from scratch). A batch's shards of requests generate in
parallel on the configured task runner (`--runner dask --workers 4`); any runner gives the
same dataset. The result is announced with the event
`alignflow.dataset.ready`, which starts the align flow when deployed.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.publish import announce, run_logger
from tasks.self_instruct.pipeline import SelfInstructConfig
from tasks.runners import task_runner
from tasks.self_instruct.steps import commit_batch_step, plan_batch_step, prepare_run, register_dataset_step, shard_step

DATASET_READY = "alignflow.dataset.ready"


@flow(name="self-instruct", log_prints=True)
def self_instruct(config: SelfInstructConfig = SelfInstructConfig()) -> str:
    """Bootstrap instructions from seed tasks and return the registered dataset's ref."""
    logger = run_logger()
    prepared = prepare_run(config)
    config = SelfInstructConfig.model_validate(prepared["config"])  # the generator's model and `extend` pinned to versions
    work, state = prepared["work"], prepared["state"]
    progress = create_progress_artifact(progress=0.0, key="self-instruct-progress", description="Kept machine instructions / target.")

    with task_runner(config.task_runner) if state["stage"] != "done" else nullcontext() as runner:
        while state["stage"] != "done":
            plan = plan_batch_step(config, work)
            shards = [
                runner.submit(shard_step, parameters={
                    "config": config, "stage": plan["stage"], "index": plan["index"], "shard": number,
                    "requests": requests, "decoding": plan["decoding"], "pool": plan["pool"]})
                for number, requests in enumerate(plan["shards"], start=1)
            ]
            state = commit_batch_step(config, work, plan, [shard.result() for shard in shards])
            if plan["stage"] == "bootstrap":
                update_progress_artifact(progress, min(100.0, 100.0 * state["kept"] / config.num_instructions))

    ref = register_dataset_step(config, prepared)
    announce(DATASET_READY, "dataset", ref)
    new, extended = ("new ", f" (extending {config.extend})") if config.extend else ("", "")
    logger.info(f"registered dataset {ref}: {state['kept']} {new}machine instructions from {state['requests']} requests{extended}")
    return ref


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["self-instruct", *sys.argv[1:]]))
