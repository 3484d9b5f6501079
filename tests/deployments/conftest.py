"""A real `prefect server` process with every flow served from `deployments/serve.py`, and one chained run.

The session's autouse `prefect_test_harness` points this process's PREFECT_API_URL at an ephemeral
API; everything here talks to the real server explicitly (`client_for`, and the subprocesses get
their own environment from `deployments.stack`).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deployments import SERVE_NAME, default_configs
from deployments import stack

# Tiny settings: the whole chain trains and generates in a couple of minutes on a loaded 2-core CPU.
TINY = {
    "pretrain": {"demo_documents": 200, "demo_world_tasks": 300, "training": {
        "preset": "tiny", "vocab_size": 400, "seq_len": 64, "batch_size": 8, "max_steps": 20, "warmup_steps": 2,
        "eval_every": 10, "eval_windows": 4, "checkpoint_every": 10}},
    # A 20-step model may keep nothing; the chain is about the plumbing, so the minimum and the gates are relaxed.
    "self-instruct": {"num_instructions": 5, "max_requests": 8, "requests_per_batch": 8, "min_machine_instructions": 0,
                      "generator": {"batch_size": 8},
                      "bootstrap_decoding": {"max_new_tokens": 32}, "instance_decoding": {"max_new_tokens": 24}},
    "align": {
        "gates": "warn",
        "sft": {"max_steps": 10, "per_device_train_batch_size": 4, "max_length": 128, "eval_steps": 10, "logging_steps": 5},
        "preferences": {"num_samples": 2, "max_prompts": 8, "pairs_per_prompt": 1, "decoding": {"max_new_tokens": 16}},
        "reward": {"max_steps": 10, "per_device_train_batch_size": 4, "max_length": 128, "eval_steps": 10, "logging_steps": 5},
        "ppo": {"total_updates": 1, "per_device_train_batch_size": 4, "num_mini_batches": 1, "num_ppo_epochs": 1,
                "response_length": 16, "max_prompt_length": 128},
        "evaluation": {"max_prompts": 4, "decoding": {"max_new_tokens": 16}},
    },
}
CHAIN_TIMEOUT_S = 540


@dataclass
class ServedStack:
    api_url: str
    ui_url: str
    state: Path
    alignflow_home: Path

    def log_tail(self, name: str = "serve", chars: int = 6000) -> str:
        path = self.state / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no {path})"


@contextmanager
def client_for(api_url: str):
    """A sync Prefect client for the given server, whatever this process's PREFECT_API_URL says."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            yield client


def wait_for(condition, timeout: float, what: str, interval: float = 1.0, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def deployment_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def tiny_config(flow: str) -> dict[str, Any]:
    return default_configs(TINY)[flow].model_dump(mode="json")


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """The helpers above, for the test modules (importlib import mode: conftest is not importable)."""
    return SimpleNamespace(client_for=client_for, wait_for=wait_for, deployment_runs=deployment_runs, tiny_config=tiny_config)


@pytest.fixture(scope="session")
def served_stack(tmp_path_factory) -> ServedStack:
    """`prefect server start` on a free loopback port, its own PREFECT_HOME and SQLite file, and serve.py."""
    state = tmp_path_factory.mktemp("served-stack")
    home = state / "alignflow-home"
    defaults = state / "tiny-defaults.json"
    defaults.write_text(json.dumps(TINY))
    info = stack.up(state, port=None, serve=True, serve_args=["--defaults", str(defaults), "--limit", "2"],
                    extra_env={"ALIGNFLOW_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}, die_with_parent=True)
    served = ServedStack(info["api_url"], info["ui_url"], state, home)
    try:
        with client_for(served.api_url) as client:
            def all_deployed():
                try:
                    return [client.read_deployment_by_name(f"{flow}/{SERVE_NAME}") for flow in ("pretrain", "self-instruct", "align", "pipeline")]
                except Exception:  # not registered yet
                    return None
            wait_for(all_deployed, 180, "serve.py to register the deployments", on_timeout=served.log_tail)
        yield served
    finally:
        stopped = stack.down(state)
        print(f"stopped: {stopped}")


@pytest.fixture(scope="session")
def chain(served_stack) -> dict[str, Any]:
    """Run the pretrain deployment once; wait for the self-instruct and align runs its events start."""
    from prefect.client.schemas.objects import StateType

    final = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
    deadline = time.monotonic() + CHAIN_TIMEOUT_S
    with client_for(served_stack.api_url) as client:
        deployments = {flow: client.read_deployment_by_name(f"{flow}/{SERVE_NAME}") for flow in ("pretrain", "self-instruct", "align")}
        pretrain_run = client.create_flow_run_from_deployment(deployments["pretrain"].id, parameters={"config": tiny_config("pretrain")})
        runs = {"pretrain": pretrain_run}
        for flow in ("pretrain", "self-instruct", "align"):
            def finished():
                if flow != "pretrain" and flow not in runs:
                    # The nightly schedule's runs (auto_scheduled) and runs started before this one are not the chain's.
                    found = [r for r in deployment_runs(client, deployments[flow].id)
                             if not r.auto_scheduled and r.created >= pretrain_run.created]
                    if not found:
                        return None
                    runs[flow] = found[0]
                run = client.read_flow_run(runs[flow].id)
                runs[flow] = run
                if run.state_type in final:
                    return run
                # A failed upstream run starts nothing: stop waiting for the next link.
                return None
            wait_for(finished, max(1.0, deadline - time.monotonic()), f"the {flow} run to finish", interval=2,
                     on_timeout=lambda: f"runs so far: { {k: (v.name, v.state_type) for k, v in runs.items()} }\n{served_stack.log_tail()}")
            if runs[flow].state_type != StateType.COMPLETED:
                break
    return runs
