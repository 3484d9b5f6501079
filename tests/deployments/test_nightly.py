"""The nightly self-instruct top-up: each night extends the latest version of the dataset.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false pytest tests/deployments/test_nightly.py -s
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from deployments import NIGHTLY_TOP_UP_CRON, NIGHTLY_TOP_UP_SLUG, SERVE_NAME, deep_merge, default_configs, nightly_parameters
from storage.registry import Registry
from tasks.self_instruct.pipeline import SelfInstructConfig

PREFECT_YAML = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"


def test_prefect_yaml_nightly_schedule_is_the_served_one() -> None:
    """prefect.yaml's schedule and its parameters say what deployments/__init__.py (serve.py) says."""
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    [deployment] = [d for d in spec["deployments"] if d["entrypoint"] == "flows/self_instruct.py:self_instruct"]
    [schedule] = deployment["schedules"]
    assert (schedule["cron"], schedule["timezone"], schedule["slug"]) == (NIGHTLY_TOP_UP_CRON, "UTC", NIGHTLY_TOP_UP_SLUG)
    defaults = default_configs()["self-instruct"]
    assert SelfInstructConfig.model_validate(deployment["parameters"]["config"]) == defaults
    nightly = SelfInstructConfig.model_validate(schedule["parameters"]["config"])
    assert nightly == SelfInstructConfig.model_validate(nightly_parameters(defaults)["config"])
    assert nightly.extend == nightly.dataset_name == "self-instruct"
    assert nightly.model_copy(update={"extend": None}) == defaults  # the schedule changes nothing else


@pytest.mark.slow
def test_two_nightly_runs_register_a_dataset_and_then_a_strict_superset(served_stack, helpers, demo_base_model) -> None:
    """Two runs of the served self-instruct deployment with its nightly schedule's parameters, on a real server."""
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with helpers.client_for(served_stack.api_url) as client:
        [schedule] = client.read_deployment_by_name(f"self-instruct/{SERVE_NAME}").schedules
    config = schedule.parameters["config"]
    assert schedule.slug == NIGHTLY_TOP_UP_SLUG and config["extend"] == config["dataset_name"] == "self-instruct"
    assert config["num_instructions"] == helpers.tiny_config("self-instruct")["num_instructions"]
    # The demo model as generator (this stack has no "base" until the chain test pretrains one), and
    # another dataset name, so that align's trigger on alignflow.dataset.self-instruct stays quiet.
    config = deep_merge(config, {"generator": {"model": str(demo_base_model)}, "dataset_name": "nightly", "extend": "nightly"})

    runs = []
    for night in (1, 2):
        with temporary_settings(updates={PREFECT_API_URL: served_stack.api_url}):
            run = run_deployment(f"self-instruct/{SERVE_NAME}", parameters={"config": config}, timeout=900, poll_interval=2)
        # run_deployment returns the run in whatever final state it reached: it does not raise.
        assert run.state_type == StateType.COMPLETED, f"night {night}: {run.state}\n{served_stack.log_tail()}"
        runs.append(run)

    registry = Registry(served_stack.alignflow_home)
    v1, v2 = registry.versions("dataset", "nightly")
    assert [v1.manifest.flow_run_id, v2.manifest.flow_run_id] == [str(r.id) for r in runs]
    assert v1.manifest.config["extend"] is None  # the first night found no version: from scratch
    assert v2.manifest.config["extend"] == v1.ref == "nightly@1"
    assert f"dataset:{v1.ref}" in v2.manifest.parents
    old, new = ({name: pq.read_table(v.path / f"{name}.parquet").to_pylist() for name in ("instructions", "instances")} for v in (v1, v2))
    for name in ("instructions", "instances"):
        assert new[name][: len(old[name])] == old[name], name  # every v1 row, unchanged and in order
    machine = [[r for r in tables["instructions"] if r["origin"] == "machine"] for tables in (old, new)]
    assert len(machine[1]) > len(machine[0]) > 0
    funnel = v2.manifest.extra["funnel"]
    assert funnel["extends"]["ref"] == v1.ref and funnel["requests"] <= config["max_requests"]
    assert v2.manifest.extra["totals"]["requests"] == v1.manifest.extra["totals"]["requests"] + funnel["requests"]
