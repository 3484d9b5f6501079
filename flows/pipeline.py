"""The whole product on one machine: pretrain -> self-instruct -> align, as subflows of one run.

    alignflow pipeline                     # the demo: built-in corpus and seeds, embedded Prefect
    alignflow pipeline --language ko       # the same demo in Korean
    python flows/pipeline.py --num-instructions 500 --sft-max-steps 400

Refs, never Python objects, pass between the subflows: the pretrained model's ref becomes the
self-instruct generator and the align base model; the dataset's ref becomes the align dataset.
"""

from __future__ import annotations

import sys
from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

from flows.align import align
from flows.pretrain import pretrain
from flows.self_instruct import self_instruct
from tasks.align.steps import AlignConfig
from tasks.pretrain.steps import PretrainConfig
from tasks.publish import run_logger
from tasks.timing import stage_timer
from tasks.self_instruct.pipeline import SelfInstructConfig


class PipelineConfig(BaseModel):
    """The three flows' configs; the refs that connect them are filled in by the pipeline."""

    language: Literal["en", "ko"] | None = Field(None, description="Run the whole demo in this language: the demo corpus, the demo seeds and the self-instruct templates. Empty: each flow's own setting.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="The upstream pretraining.")
    self_instruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig, description="Instruction bootstrapping with the pretrained model.")
    align: AlignConfig = Field(default_factory=AlignConfig, description="SFT, reward model, PPO and evaluation.")


@flow(name="pipeline")
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, str]:
    """Pretrain, bootstrap a dataset with the new model, align it; return every registered ref."""
    pretrain_config, self_instruct_config = config.pretrain, config.self_instruct
    if config.language:
        pretrain_config = pretrain_config.model_copy(update={"language": config.language})
        self_instruct_config = self_instruct_config.model_copy(update={"language": config.language})
    with stage_timer("pretrain"):
        model_ref = pretrain(pretrain_config)
    generator = self_instruct_config.generator.model_copy(update={"backend": "local", "model": model_ref})
    with stage_timer("self-instruct"):
        dataset_ref = self_instruct(self_instruct_config.model_copy(update={"generator": generator}))
    refs = align(config.align.model_copy(update={"model": model_ref, "dataset": dataset_ref}))
    refs = {"base": model_ref, "self-instruct": dataset_ref, **refs}
    run_logger().info(f"pipeline finished: {refs}")
    return refs


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["pipeline", *sys.argv[1:]]))
