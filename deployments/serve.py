"""Serve every alignflow flow from one process: for a single box, without work pools or workers.

    python -m deployments.serve                          # against PREFECT_API_URL (a server must run)
    python -m deployments.serve --defaults tiny.json     # partial default configs per flow (JSON)

It registers the deployments `pretrain/local`, `self-instruct/local`, `align/local` and
`pipeline/local` with the same chain as `deployments/prefect.yaml`: self-instruct starts on
`alignflow.model.pretrained` with the new model as generator, align starts on
`alignflow.dataset.ready` with the new dataset; self-instruct also has a nightly schedule (02:00
UTC, generator: the latest base model) that extends the latest version of its dataset. Each flow's one parameter is its pydantic config, so the UI
renders a form with defaults and help texts, and the server refuses a run whose parameters do not
fit the schema (`enforce_parameter_schema`). Training deployments run one at a time.

Runs execute in subprocesses of this process and inherit its environment (ALIGNFLOW_HOME, ...).
Stop with Ctrl-C or SIGTERM: the schedules are paused on shutdown.

The defaults file maps flow names to partial configs, e.g.
`{"pretrain": {"training": {"preset": "tiny", "max_steps": 20}}, "self-instruct": {"num_instructions": 5}}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# Library loggers whose records also go to the run logs (the setting is read when Prefect configures
# logging, so it is set before prefect is imported; flow-run subprocesses inherit it).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "transformers,trl,accelerate")

from deployments import (  # noqa: E402
    NIGHTLY_TOP_UP_CRON,
    NIGHTLY_TOP_UP_SLUG,
    SERVE_NAME,
    TRAINING_FLOWS,
    align_trigger,
    default_configs,
    nightly_parameters,
    self_instruct_trigger,
)


def build_deployments(overrides: dict[str, dict[str, Any]] | None = None, schedule: bool = True) -> list:
    """The four RunnerDeployments, with default parameters, the nightly schedule and the chain triggers."""
    from prefect.schedules import Cron

    from flows.align import align
    from flows.pipeline import pipeline
    from flows.pretrain import pretrain
    from flows.self_instruct import self_instruct

    configs = default_configs(overrides)
    flows = {"pretrain": pretrain, "self-instruct": self_instruct, "align": align, "pipeline": pipeline}
    triggers = {
        "self-instruct": [self_instruct_trigger(configs["pretrain"], configs["self-instruct"])],
        "align": [align_trigger(configs["self-instruct"], configs["align"])],
    }
    schedules = {
        # Each night extends the latest version of the dataset by up to num_instructions, with the
        # latest base model as generator (generator.model empty).
        "self-instruct": [Cron(NIGHTLY_TOP_UP_CRON, timezone="UTC", slug=NIGHTLY_TOP_UP_SLUG,
                               parameters=nightly_parameters(configs["self-instruct"]))] if schedule else [],
    }
    deployments = []
    for name, flow in flows.items():
        deployments.append(flow.to_deployment(
            name=SERVE_NAME,
            parameters={"config": configs[name].model_dump(mode="json")},
            triggers=triggers.get(name),
            schedules=schedules.get(name),
            concurrency_limit=1 if name in TRAINING_FLOWS else None,
            enforce_parameter_schema=True,
            tags=["alignflow", "training" if name in TRAINING_FLOWS else "generation"],
            description=(flow.description or "").strip().splitlines()[0] if flow.description else None,
        ))
    return deployments


def read_overrides(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON: {err.msg}") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected an object mapping flow names to partial configs")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--defaults", type=Path, help="JSON file of partial default configs by flow name.")
    parser.add_argument("--limit", type=int, default=2, help="Most flow runs executing at once in this process.")
    parser.add_argument("--no-schedule", action="store_true", help="Register no schedule (the nightly self-instruct top-up).")
    args = parser.parse_args(argv)
    try:
        deployments = build_deployments(read_overrides(args.defaults), schedule=not args.no_schedule)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from prefect import serve

    serve(*deployments, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
