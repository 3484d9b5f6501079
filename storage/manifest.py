"""The manifest of a registered version: what it holds, what made it, and what it came from."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

# Config keys whose values never reach a manifest, even when a config keeps them as plain strings.
# A key ending in "_secret" names a Prefect Secret block (not the secret itself) and is kept.
SECRET_KEYS = ("api_key", "apikey", "password", "access_token", "auth_token", "hf_token")


def is_secret_key(key: str) -> bool:
    key = key.lower()
    if key.endswith("_secret"):
        return False
    return key in ("token", "secret") or any(word in key for word in SECRET_KEYS)


class Manifest(BaseModel):
    kind: str = Field(description="dataset or model")
    name: str
    version: int
    created_at: str = Field(description="ISO 8601, UTC")
    files: dict[str, dict[str, Any]] = Field(description="relative path -> sha256, bytes, and for Parquet rows and schema")
    config: dict[str, Any] = Field(default_factory=dict, description="the config that made it, without secrets")
    parents: list[str] = Field(default_factory=list, description="qualified refs it was made from, e.g. dataset:corpus-clean@2")
    code_version: str
    flow_run_id: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    def tables(self) -> dict[str, dict[str, Any]]:
        return {path: info for path, info in self.files.items() if "rows" in info}


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "<redacted>" if is_secret_key(k) and v not in (None, "") else _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def serialize_config(config: BaseModel | dict | None) -> dict[str, Any]:
    """JSON-able config with secret values removed (the name of a Secret block is kept)."""
    if config is None:
        return {}
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    return _scrub(data)


@functools.cache
def code_version() -> str:
    """The git commit of the project (with '+dirty' when changed), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return f"git:{sha}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"alignflow {version('alignflow')}"
        except PackageNotFoundError:
            return "unknown"


def current_flow_run_id() -> str | None:
    """The Prefect flow-run id when called inside a flow run."""
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
    except Exception:  # prefect missing or no run context: plain function call
        return None
    return str(run_id) if run_id else None
