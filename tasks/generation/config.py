"""Which generator a flow uses, as a pydantic config, and `load_generator` that builds it.

The same options on every flow that generates (see DESIGN.md, "Generator options"):

    GeneratorConfig(backend="local")                                  # the latest registered model "base"
    GeneratorConfig(backend="local", model="base@3")                  # a registry ref
    GeneratorConfig(backend="local", model="/path/to/hf-folder")      # any transformers folder
    GeneratorConfig(backend="openai", base_url="http://127.0.0.1:8000/v1", model="my-model")

The config never holds a secret: the API key is read when the generator is built, from the Prefect
Secret block named `api_key_secret` or else from the OPENAI_API_KEY environment variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import AlignflowError
from storage.registry import Registry, RegistryError
from tasks.generation.params import Generator

DEFAULT_MODEL_NAME = "base"
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"


class GeneratorConfigError(AlignflowError, ValueError):
    """A generator config that cannot be turned into a generator (unknown model, missing folder...)."""


class GeneratorConfig(BaseModel):
    """The text generator: a local model (registry ref or HF folder) or an OpenAI-compatible endpoint."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "openai"] = Field(
        "local", description="local: a transformers model run in this process; openai: an OpenAI-compatible HTTP endpoint."
    )
    model: str | None = Field(
        None,
        description="local: a registry model ref (name or name@version) or a local HF model folder; empty means the "
        "latest registered model named 'base'. openai: the model name the endpoint serves (required).",
    )
    base_url: str | None = Field(
        None,
        description="openai: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1 ('/v1' is added when missing); "
        f"empty means {OPENAI_DEFAULT_URL}.",
    )
    api_key_secret: str | None = Field(
        None,
        description="openai: name of a Prefect Secret block holding the API key; empty means the OPENAI_API_KEY "
        "environment variable (or no key, for local servers).",
    )
    api_style: Literal["completions", "chat"] = Field(
        "completions",
        description="openai: how complete() calls the endpoint: /v1/completions with the prompt, or "
        "/v1/chat/completions with the prompt as one user message. chat() always uses /v1/chat/completions.",
    )
    max_concurrency: int = Field(8, ge=1, le=1024, description="openai: most requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="openai: seconds before a request is abandoned and retried.")
    max_retries: int = Field(
        5, ge=0, le=50, description="openai: retries of one request (429, 5xx, timeouts, garbage) before it counts as failed."
    )
    backoff_base_s: float = Field(
        0.5, ge=0, le=60, description="openai: first retry delay in seconds; it doubles each retry, with random jitter."
    )
    batch_size: int = Field(16, ge=1, le=1024, description="local: prompts generated together in one batch.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="local: where the model runs; auto takes the GPU (bf16) when there is one, else the CPU (fp32)."
    )

    @model_validator(mode="after")
    def _openai_needs_a_model(self) -> "GeneratorConfig":
        if self.backend == "openai" and not self.model:
            raise ValueError("backend 'openai' needs model: the name of the model the endpoint serves")
        return self


def resolve_local_model(model: str | None, registry: Registry | None = None) -> tuple[Path, str]:
    """The HF folder and the identity name of a local model: a registry ref or a folder on disk."""
    if model:
        candidate = Path(model).expanduser()
        if candidate.is_dir():
            if not (candidate / "config.json").is_file():
                raise GeneratorConfigError(
                    f"model folder {candidate} has no config.json: it is not a transformers model folder"
                )
            return candidate.resolve(), str(candidate.resolve())
        if "/" in model or model.startswith((".", "~")):
            raise GeneratorConfigError(f"model {model!r}: no such folder ({candidate.resolve()})")
    registry = registry or Registry()
    ref = model or DEFAULT_MODEL_NAME
    try:
        version = registry.resolve("model", ref)
    except RegistryError as err:
        hint = " (run the pretrain flow first, or pass --model)" if not model else ""
        raise GeneratorConfigError(
            f"model {ref!r} is neither a local model folder nor a registered model: {err}{hint}"
        ) from err
    return hf_folder(version.path, version.ref), version.ref


def hf_folder(path: Path, ref: str) -> Path:
    """The transformers folder inside a model version: the version folder itself, or its one subfolder with config.json."""
    if (path / "config.json").is_file():
        return path
    inner = sorted(p.parent for p in path.glob("*/config.json"))
    if len(inner) == 1:
        return inner[0]
    raise GeneratorConfigError(f"model {ref} ({path}) holds no transformers model (no config.json)")


def load_generator(config: GeneratorConfig, registry: Registry | None = None) -> Generator:
    """Build the generator a config describes. Local models load now; endpoints are not contacted yet."""
    if config.backend == "local":
        from tasks.generation.local import LocalGenerator

        folder, name = resolve_local_model(config.model, registry)
        return LocalGenerator(folder, identity_name=name, batch_size=config.batch_size, device=config.device)

    from tasks.generation.openai_backend import OpenAIGenerator

    return OpenAIGenerator(
        base_url=config.base_url or OPENAI_DEFAULT_URL,
        model=config.model or "",
        api_key=None,
        api_style=config.api_style,
        max_concurrency=config.max_concurrency,
        timeout_s=config.timeout_s,
        max_retries=config.max_retries,
        backoff_base_s=config.backoff_base_s,
        api_key_secret=config.api_key_secret,
    )


def check_generator(config: GeneratorConfig, registry: Registry | None = None) -> None:
    """Fail now, before a flow writes anything, when the generator cannot work: a local model that
    does not resolve (GeneratorConfigError), or an endpoint that is unreachable, refuses the key,
    is not an OpenAI-compatible API or does not serve the model (GenerationError)."""
    if config.backend == "local":
        resolve_local_model(config.model, registry)
        return
    generator = load_generator(config, registry)
    try:
        generator.check_endpoint()  # type: ignore[attr-defined]
    finally:
        generator.close()
