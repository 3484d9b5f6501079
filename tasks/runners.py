"""Where a flow's fanned-out tasks run: threads here, a Dask cluster, or a Ray cluster.

A flow takes a `TaskRunnerConfig` among its parameters and opens the runner for the part that fans
out; everything else in the flow runs as before. The same config is a form in the Prefect UI:

    TaskRunnerConfig()                                          # threads in the flow's process
    TaskRunnerConfig(runner="dask", workers=4)                  # a local Dask cluster of 4 processes
    TaskRunnerConfig(runner="dask", runner_address="tcp://10.0.0.5:8786")   # an existing scheduler
    TaskRunnerConfig(runner="ray", runner_address="ray://10.0.0.5:10001")   # an existing Ray cluster (extra: .[ray])

On the command line: `--runner dask --workers 4`, `--runner-address tcp://10.0.0.5:8786`.

Workers receive task parameters (configs, prompts, instruction texts) and return rows; models are
never shipped: a worker loads its generator from the registry by ref (see README, "Beyond one
machine"). Results never depend on the runner: what a task computes is fixed by its parameters.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import AlignflowError

if TYPE_CHECKING:  # the config is imported by CLIs and forms that never start a runner
    from prefect.task_runners import TaskRunner


class TaskRunnerConfig(BaseModel):
    """The task runner of a flow's fan-out: threads, Dask (prefect-dask) or Ray (prefect-ray)."""

    model_config = ConfigDict(extra="forbid")

    runner: Literal["threads", "dask", "ray"] = Field(
        "threads", description="threads: a thread pool in the flow's process; dask: prefect-dask's DaskTaskRunner; "
        "ray: prefect-ray's RayTaskRunner (pip install prefect-ray)."
    )
    runner_address: str | None = Field(
        None, description="dask: a scheduler address (tcp://host:8786); ray: a cluster address (ray://host:10001). "
        "Empty starts a local cluster for the run and stops it after."
    )
    workers: int = Field(
        2, ge=1, le=1024, description="Threads (threads), worker processes of a local Dask cluster, or CPUs of a local "
        "Ray cluster. Ignored when runner_address is set."
    )


class TaskRunnerUnavailable(AlignflowError, RuntimeError):
    """The chosen runner's package is not installed."""


def build_task_runner(config: TaskRunnerConfig) -> "TaskRunner":
    """The Prefect task runner a config names (not started)."""
    if config.runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=config.workers)
    if config.runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as error:  # pragma: no cover - prefect-dask is a dependency
            raise TaskRunnerUnavailable("task runner 'dask' needs prefect-dask: pip install prefect-dask") from error
        if config.runner_address:
            return DaskTaskRunner(address=config.runner_address)
        # One thread per worker process: the generators are CPU-heavy Python and torch, so more
        # threads in a process only contend for the GIL and the cores. The dashboard takes a free
        # port (two runs at once must not clash), and the scheduler's chatter stays out of the run log.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": ":0"})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as error:
        raise TaskRunnerUnavailable("task runner 'ray' needs prefect-ray, which is not installed: pip install prefect-ray") from error
    if config.runner_address:
        return RayTaskRunner(address=config.runner_address)
    return RayTaskRunner(init_kwargs={"num_cpus": config.workers, "include_dashboard": False})


@contextmanager
def task_runner(config: TaskRunnerConfig) -> Iterator["TaskRunner"]:
    """Start the runner for a block of `runner.submit(task, parameters)` calls; stop it after."""
    with _api_for_workers(config), build_task_runner(config) as runner:
        yield runner


@contextmanager
def _api_for_workers(config: TaskRunnerConfig) -> Iterator[None]:
    """Give worker processes the URL of this run's Prefect API.

    With the embedded Prefect (no PREFECT_API_URL), the API is a server subprocess that only this
    process knows of; a worker would start a server of its own and its task runs would land
    elsewhere. The settings travel with every submitted task, so the URL goes into them. A cluster
    on other machines cannot reach that loopback server: set PREFECT_API_URL to a real server there.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if config.runner == "threads" or PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's embedded server; start() is a no-op when it runs
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield
