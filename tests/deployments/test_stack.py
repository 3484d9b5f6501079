"""Deployments on a real `prefect server` process: the event chain, schedules, parameter validation,
and the one-command stack with work pools and workers.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false pytest tests/deployments -m slow -s
"""

from __future__ import annotations

import pytest

from deployments import SERVE_NAME, WORKER_NAME
from deployments import stack
from storage.registry import Registry

pytestmark = pytest.mark.slow


def test_pretrain_run_starts_self_instruct_then_align_through_events(chain, served_stack, helpers):
    tiny_config = helpers.tiny_config
    from prefect.client.schemas.objects import StateType

    states = {flow: (run.name, run.state_type, run.state.message if run.state else None) for flow, run in chain.items()}
    assert set(chain) == {"pretrain", "self-instruct", "align"}, f"{states}\n{served_stack.log_tail()}"
    assert all(run.state_type == StateType.COMPLETED for run in chain.values()), f"{states}\n{served_stack.log_tail()}"

    registry = Registry(served_stack.alignflow_home)
    base = registry.resolve("model", "base")
    dataset = registry.resolve("dataset", "self-instruct")
    # The automation put the new model's ref from the event payload into self-instruct's config,
    # and the new dataset's ref into align's; the rest of each config is the deployment's defaults.
    si_config = chain["self-instruct"].parameters["config"]
    assert si_config["generator"]["model"] == base.ref
    assert si_config["num_instructions"] == tiny_config("self-instruct")["num_instructions"]
    align_config = chain["align"].parameters["config"]
    assert align_config["dataset"] == dataset.ref
    assert align_config["sft"]["max_steps"] == tiny_config("align")["sft"]["max_steps"]

    # Each output records the run that made it, and the lineage links them all.
    assert base.manifest.flow_run_id == str(chain["pretrain"].id)
    assert dataset.manifest.flow_run_id == str(chain["self-instruct"].id)
    assert dataset.manifest.parents == [f"model:{base.ref}"]
    for name in ("sft", "rm", "ppo"):
        model = registry.resolve("model", name)
        assert model.manifest.flow_run_id == str(chain["align"].id), name
    ancestry = {(kind, version.ref) for _, kind, version in registry.lineage("model", "ppo")}
    assert {("model", "sft@1"), ("dataset", dataset.ref), ("model", base.ref)} <= ancestry
    corpus = registry.resolve("dataset", "corpus-clean")
    assert ("dataset", corpus.ref) in ancestry  # ppo -> sft -> self-instruct -> base -> corpus


def test_library_logs_reach_the_run_logs(chain, served_stack, helpers):
    """serve.py sets PREFECT_LOGGING_EXTRA_LOGGERS, so transformers' records land in the align run's logs."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs: list = []
    with helpers.client_for(served_stack.api_url) as client:
        while True:  # all of the run's logs, a page at a time
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[chain["align"].id])), limit=200, offset=len(logs))
            logs += page
            if len(page) < 200:
                break
    names = {log.name for log in logs}
    assert any(name.startswith("transformers") for name in names), names
    assert any("sft" in log.message for log in logs if log.name == "prefect.task_runs")


def test_schedule_triggers_and_limits_are_registered(served_stack, helpers):
    client_for, wait_for, deployment_runs = helpers.client_for, helpers.wait_for, helpers.deployment_runs
    from prefect.client.schemas.objects import StateType

    with client_for(served_stack.api_url) as client:
        self_instruct = client.read_deployment_by_name(f"self-instruct/{SERVE_NAME}")
        [schedule] = self_instruct.schedules
        assert schedule.active and schedule.slug == "nightly-top-up"
        assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
        # The server's scheduler turns the schedule into upcoming runs at 02:00 UTC.
        upcoming = wait_for(lambda: [r for r in deployment_runs(client, self_instruct.id) if r.auto_scheduled],
                            120, "the scheduler to create the nightly runs", interval=3, on_timeout=lambda: served_stack.log_tail("server"))
        assert all(r.state_type == StateType.SCHEDULED and r.expected_start_time.hour == 2 for r in upcoming)

        automations = {a.name: a for a in client.read_automations()}
        trigger = automations["self-instruct on a new pretrained model"].trigger
        assert trigger.expect == {"alignflow.model.pretrained"}
        assert automations["align on a new self-instruct dataset"].actions[0].parameters["config"]["dataset"] == "{{ event.payload.ref }}"

        for flow in ("pretrain", "align", "pipeline"):
            deployment = client.read_deployment_by_name(f"{flow}/{SERVE_NAME}")
            assert deployment.global_concurrency_limit and deployment.global_concurrency_limit.limit == 1, flow
            assert deployment.enforce_parameter_schema


@pytest.mark.parametrize("bad_config, field", [
    ({"training": {"max_steps": 0}}, "max_steps"),
    ({"demo_documents": "many"}, "demo_documents"),
    ({"training": {"preset": "huge"}}, "preset"),
])
def test_server_refuses_a_run_with_invalid_parameters(served_stack, helpers, bad_config, field):
    client_for, deployment_runs = helpers.client_for, helpers.deployment_runs
    from prefect.exceptions import PrefectHTTPStatusError

    with client_for(served_stack.api_url) as client:
        pretrain = client.read_deployment_by_name(f"pretrain/{SERVE_NAME}")
        before = len(deployment_runs(client, pretrain.id))
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(pretrain.id, parameters={"config": bad_config})
        assert refused.value.response.status_code in (409, 422)
        assert field in refused.value.response.text
        assert len(deployment_runs(client, pretrain.id)) == before


def test_stack_up_deploys_prefect_yaml_runs_on_a_worker_and_stops_by_pid(tmp_path, helpers):
    """`stack up`: server, pools, `prefect deploy --all`, workers; a run through the GPU pool's worker; `stack down`."""
    from prefect.client.schemas.objects import StateType

    client_for, wait_for, tiny_config = helpers.client_for, helpers.wait_for, helpers.tiny_config
    state = tmp_path / "stack"
    home = tmp_path / "alignflow-home"
    info = stack.up(state, port=None, extra_env={"ALIGNFLOW_HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "2"}, die_with_parent=True)
    pids = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
    try:
        assert set(pids) == {"server", "worker-cpu", "worker-gpu"}
        assert all(stack.pid_alive(pid) for pid in pids.values())
        assert (state / "prefect.db").exists() and (state / "logs" / "server.log").exists()
        with client_for(info["api_url"]) as client:
            pools = {flow: client.read_deployment_by_name(f"{flow}/{WORKER_NAME}").work_pool_name
                     for flow in ("pretrain", "self-instruct", "align", "pipeline")}
            assert pools == {"pretrain": stack.GPU_POOL, "self-instruct": stack.CPU_POOL, "align": stack.GPU_POOL, "pipeline": stack.GPU_POOL}
            self_instruct = client.read_deployment_by_name(f"self-instruct/{WORKER_NAME}")
            assert [s.schedule.cron for s in self_instruct.schedules] == ["0 2 * * *"]
            pretrain = client.read_deployment_by_name(f"pretrain/{WORKER_NAME}")
            assert pretrain.global_concurrency_limit.limit == 1 and pretrain.enforce_parameter_schema
            assert pretrain.job_variables["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "transformers,trl,accelerate"
            automations = {a.name: a for a in client.read_automations()}
            templated = automations["self-instruct on a new pretrained model"].actions[0].parameters["config"]
            assert templated["generator"]["model"] == "{{ event.payload.ref }}" and templated["num_instructions"] == 250

            # A tiny run through the GPU pool's process worker. Another model name, so that the
            # self-instruct trigger (on alignflow.model.base) does not start a full-size run.
            config = {**tiny_config("pretrain"), "model_name": "probe"}
            run = client.create_flow_run_from_deployment(pretrain.id, parameters={"config": config})
            final = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
            run = wait_for(lambda: (r := client.read_flow_run(run.id)).state_type in final and r, 300,
                           "the worker's pretrain run", interval=2,
                           on_timeout=lambda: (state / "logs" / "worker-gpu.log").read_text()[-5000:])
            assert run.state_type == StateType.COMPLETED, (state / "logs" / "worker-gpu.log").read_text()[-5000:]
        assert Registry(home).resolve("model", "probe").manifest.flow_run_id == str(run.id)
    finally:
        stopped = stack.down(state)
    # Workers first, the server last; every process is gone and its PID file removed.
    assert [entry.split(" ")[0] for entry in stopped] == ["worker-gpu", "worker-cpu", "server"]
    assert not any(stack.pid_alive(pid) for pid in pids.values())
    assert not list((state / "pids").glob("*.pid"))


def test_stack_refuses_a_second_up_on_a_running_state(tmp_path):
    """Stale PID files of dead processes are cleared; a live one blocks `up`."""
    import subprocess
    import sys

    state = tmp_path / "stack"
    (state / "pids").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (state / "pids" / "server.pid").write_text(str(sleeper.pid))
        with pytest.raises(stack.StackError, match="already holds a running stack"):
            stack.up(state, port=None)
        assert stack.pid_alive(sleeper.pid)
    finally:
        stopped = stack.down(state, timeout=10)
        sleeper.wait(timeout=10)
    assert stopped == [f"server (pid {sleeper.pid})"]
    assert not stack.pid_alive(sleeper.pid)


def test_stack_processes_of_a_killed_test_run_do_not_outlive_it(tmp_path, helpers):
    """With die_with_parent, a stack process gets SIGTERM when the process that started it is SIGKILLed."""
    import signal
    import subprocess
    import sys

    state = tmp_path / "stack"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from pathlib import Path; from deployments import stack; "
        f"stack.start_process('child', [sys.executable, '-c', 'import time; time.sleep(120)'], Path({str(state)!r}), dict(os.environ), True); "
        "time.sleep(120)")], cwd=stack.ROOT)
    try:
        pid_file = state / "pids" / "child.pid"
        helpers.wait_for(pid_file.exists, 60, "the child's PID file", interval=0.2)
        child = int(pid_file.read_text())
        assert stack.pid_alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        helpers.wait_for(lambda: not stack.pid_alive(child), 20, "the child to stop after its parent was killed", interval=0.2)
    finally:
        parent.kill()
        stack.down(state, timeout=5)
