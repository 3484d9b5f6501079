"""alignflow as Prefect deployments: the chain of events, schedules and default parameters, shared by
`deployments/serve.py` (one process, no work pools) and `deployments/prefect.yaml` (work pools and
workers, brought up by `deployments/stack.py`).

The chain: a finished pretraining run emits `alignflow.model.pretrained` with {"ref": "base@N"};
an automation starts self-instruct with that model as its generator. The finished dataset emits
`alignflow.dataset.ready` with {"ref": "self-instruct@M"}; an automation starts align on it.
Automations cannot pass results, so refs travel in the events' payloads.

Prefect renders `{{ event.payload.ref }}` anywhere inside a trigger's parameters (nested dicts
included), but the rendered parameters then REPLACE the deployment's default value of each
top-level parameter (a shallow merge): a trigger that sets only `config.generator.model` would drop
every other default of `config`. The triggers built here therefore carry the full default config
with the ref templated into it (`trigger_parameters`).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

MODEL_PRETRAINED = "alignflow.model.pretrained"
DATASET_READY = "alignflow.dataset.ready"
EVENT_REF = "{{ event.payload.ref }}"

# Deployment names: `<flow>/local` when served by serve.py, `<flow>/worker` from prefect.yaml.
SERVE_NAME = "local"
WORKER_NAME = "worker"
FLOWS = ("pretrain", "self-instruct", "align", "pipeline")
# Training deployments: one run at a time (they would fight over one GPU).
TRAINING_FLOWS = ("pretrain", "align", "pipeline")
NIGHTLY_TOP_UP_CRON = "0 2 * * *"  # 02:00 UTC
NIGHTLY_TOP_UP_SLUG = "nightly-top-up"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of base with override's values put in, recursing into dicts (lists are replaced)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def config_classes() -> dict[str, type[BaseModel]]:
    """The pydantic config each flow takes as its one parameter `config`, by flow name."""
    from flows.pipeline import PipelineConfig
    from tasks.align.steps import AlignConfig
    from tasks.pretrain.steps import PretrainConfig
    from tasks.self_instruct.pipeline import SelfInstructConfig

    return {"pretrain": PretrainConfig, "self-instruct": SelfInstructConfig, "align": AlignConfig, "pipeline": PipelineConfig}


def default_configs(overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, BaseModel]:
    """Each flow's default config, with partial overrides (by flow name) validated by its model."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(FLOWS))
    if unknown:
        raise ValueError(f"overrides for unknown flows {unknown}; the flows are {list(FLOWS)}")
    configs = {}
    for name, cls in config_classes().items():
        values = deep_merge(cls().model_dump(mode="json"), overrides.get(name, {}))
        try:
            configs[name] = cls.model_validate(values)
        except ValueError as err:
            raise ValueError(f"default parameters of deployment {name!r}: {err}") from err
    return configs


def trigger_parameters(config: BaseModel, templated: dict[str, Any]) -> dict[str, Any]:
    """The `config` parameter of a triggered run: the full default config with the templated fields."""
    return {"config": deep_merge(config.model_dump(mode="json"), templated)}


def nightly_parameters(self_instruct: BaseModel) -> dict[str, Any]:
    """The nightly top-up's `config`: the deployment's default config, extending the latest version of
    its own dataset (`extend: <dataset_name>`), so each night adds up to `num_instructions` to it.
    On the first night, with no version registered yet, the run starts from scratch."""
    return trigger_parameters(self_instruct, {"extend": self_instruct.dataset_name})


def self_instruct_trigger(pretrain: BaseModel, self_instruct: BaseModel):
    """Start self-instruct when a model named like the pretrain config's model_name is announced."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="self-instruct on a new pretrained model",
        expect={MODEL_PRETRAINED},
        match={"prefect.resource.id": f"alignflow.model.{pretrain.model_name}"},
        parameters=trigger_parameters(self_instruct, {"generator": {"backend": "local", "model": EVENT_REF}}),
    )


def align_trigger(self_instruct: BaseModel, align: BaseModel):
    """Start align when a self-instruct dataset is announced. The base model stays the config's
    `model` (by default "base": the latest version), since the event carries only the dataset ref."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="align on a new self-instruct dataset",
        expect={DATASET_READY},
        match={"prefect.resource.id": f"alignflow.dataset.{self_instruct.dataset_name}"},
        parameters=trigger_parameters(align, {"dataset": EVENT_REF}),
    )
