"""The whole pipeline as subflows of one run: refs flow from pretrain to self-instruct to align."""

from __future__ import annotations

import pytest

from flows.pipeline import PipelineConfig, pipeline
from storage.registry import Registry
from tasks.align.config import PreferenceOptions, RewardOptions, SFTOptions
from tasks.align.ppo import PPOOptions
from tasks.align.steps import AlignConfig, EvalOptions
from tasks.generation.params import DecodingParams
from tasks.pretrain.steps import PretrainConfig
from tasks.pretrain.training import TrainingOptions
from tasks.self_instruct.pipeline import SelfInstructConfig

pytestmark = pytest.mark.slow


def test_pipeline_end_to_end_links_every_ref(registry_root):
    config = PipelineConfig(
        pretrain=PretrainConfig(demo_documents=200, demo_world_tasks=300, training=TrainingOptions(
            preset="tiny", vocab_size=512, seq_len=64, batch_size=8, max_steps=30, warmup_steps=3, eval_every=15, checkpoint_every=15)),
        # A 30-step model: the test is about the refs between subflows, so no minimum and no gates.
        self_instruct=SelfInstructConfig(num_instructions=4, max_requests=8, requests_per_batch=8, min_machine_instructions=0,
                                         bootstrap_decoding=DecodingParams(max_new_tokens=48),
                                         instance_decoding=DecodingParams(max_new_tokens=32)),
        align=AlignConfig(
            gates="off",
            sft=SFTOptions(max_steps=10, per_device_train_batch_size=8, eval_steps=10),
            preferences=PreferenceOptions(num_samples=2, max_prompts=16, decoding=DecodingParams(max_new_tokens=8)),
            reward=RewardOptions(max_steps=5, per_device_train_batch_size=4, eval_steps=5),
            ppo=PPOOptions(total_updates=1, per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=1, response_length=8),
            evaluation=EvalOptions(max_prompts=4, decoding=DecodingParams(max_new_tokens=8)),
        ),
    )
    refs = pipeline(config)
    registry = Registry()
    assert refs["base"].startswith("base@") and refs["self-instruct"].startswith("self-instruct@")
    dataset = registry.resolve("dataset", refs["self-instruct"])
    assert dataset.manifest.parents == [f"model:{refs['base']}"]
    sft_lineage = {f"{kind}:{v.ref}" for _, kind, v in registry.lineage("model", refs["sft"])}
    assert {f"model:{refs['base']}", f"dataset:{refs['self-instruct']}", "dataset:corpus-clean@1", "model:base-tokenizer@1"} <= sft_lineage
    ppo_lineage = {v.ref for _, _, v in registry.lineage("model", refs["ppo"])}
    assert {refs["rm"], refs["sft"], refs["self-instruct"], "corpus-clean@1"} <= ppo_lineage
