"""The upstream flow: corpus -> cleaning -> BPE tokenizer -> next-token pretraining -> base model.

    alignflow pretrain --max-steps 300            # the demo corpus, embedded Prefect
    python flows/pretrain.py --corpus 'data/*.jsonl' --preset small

It ends by registering the model with its lineage (corpus -> tokenizer -> model) and announcing
it with the event `alignflow.model.pretrained`, which starts self-instruct when deployed.
"""

from __future__ import annotations

import sys

from prefect import flow

from tasks.pretrain.steps import (
    PretrainConfig,
    prepare_corpus,
    pretrain_step,
    register_model_step,
    train_tokenizer_step,
)
from tasks.publish import announce, run_logger

MODEL_PRETRAINED = "alignflow.model.pretrained"


@flow(name="pretrain", log_prints=True)
def pretrain(config: PretrainConfig = PretrainConfig()) -> str:
    """Pretrain a base model from a text corpus and return its registry ref."""
    logger = run_logger()
    corpus = prepare_corpus(config)
    tokenizer_ref = train_tokenizer_step(corpus["ref"], config.training, config.model_name)
    trained = pretrain_step(corpus["ref"], tokenizer_ref, config.training)
    model_ref = register_model_step(trained, corpus["ref"], tokenizer_ref, config)
    announce(MODEL_PRETRAINED, "model", model_ref)
    logger.info(f"registered model {model_ref}")
    return model_ref


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["pretrain", *sys.argv[1:]]))
