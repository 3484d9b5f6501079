"""GeneratorConfig and load_generator: registry refs, local folders, clear errors, described fields."""

from __future__ import annotations

import shutil

import pytest
from pydantic import BaseModel, ValidationError

from storage.registry import Registry
from tasks.generation.config import GeneratorConfig, GeneratorConfigError, load_generator
from tasks.generation.local import LocalGenerator
from tasks.generation.openai_backend import OpenAIGenerator
from tasks.generation.params import DecodingParams
from tasks.generation.server import Faults

GREEDY = DecodingParams(strategy="greedy", max_new_tokens=4)


def register_model(registry: Registry, tiny_model_dir, name: str = "base") -> str:
    with registry.new_version("model", name) as draft:
        for item in tiny_model_dir.iterdir():
            shutil.copy2(item, draft.path / item.name)
    return draft.ref


def test_the_default_is_the_latest_registered_base_model(registry_root, tiny_model_dir, tiny_generator):
    registry = Registry()
    register_model(registry, tiny_model_dir)
    register_model(registry, tiny_model_dir)
    generator = load_generator(GeneratorConfig())
    assert isinstance(generator, LocalGenerator)
    assert generator.identity() == {"backend": "local", "model": "base@2"}
    assert generator.model_dir == registry_root / "models" / "base" / "2"
    assert generator.complete(["Write"], GREEDY) == tiny_generator.complete(["Write"], GREEDY)


def test_a_registry_ref_with_a_version_and_an_explicit_registry(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "elsewhere")
    assert register_model(registry, tiny_model_dir, "sft") == "sft@1"
    generator = load_generator(GeneratorConfig(model="sft@1", device="cpu", batch_size=2), registry=registry)
    assert generator.identity()["model"] == "sft@1"
    assert generator.batch_size == 2


def test_a_local_folder(registry_root, tiny_model_dir):
    generator = load_generator(GeneratorConfig(model=str(tiny_model_dir)))
    assert generator.identity() == {"backend": "local", "model": str(tiny_model_dir.resolve())}


def test_a_missing_ref_is_a_clear_error(registry_root, tiny_model_dir):
    with pytest.raises(GeneratorConfigError, match=r"model 'base' .*no model named 'base'.*run the pretrain flow"):
        load_generator(GeneratorConfig())
    register_model(Registry(), tiny_model_dir)
    with pytest.raises(GeneratorConfigError, match=r"'nope'.*known models: base"):
        load_generator(GeneratorConfig(model="nope"))
    with pytest.raises(GeneratorConfigError, match="has no version 9"):
        load_generator(GeneratorConfig(model="base@9"))


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(GeneratorConfigError, match="no config.json"):
        load_generator(GeneratorConfig(model=str(tmp_path)))
    with pytest.raises(GeneratorConfigError, match="no such folder"):
        load_generator(GeneratorConfig(model=str(tmp_path / "missing")))


def test_the_openai_backend_needs_a_model_and_is_built_without_contacting_the_endpoint(monkeypatch):
    with pytest.raises(ValidationError, match="needs model"):
        GeneratorConfig(backend="openai")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = GeneratorConfig(backend="openai", model="gpt-x", base_url="http://127.0.0.1:9", max_concurrency=3)
    generator = load_generator(config)
    assert isinstance(generator, OpenAIGenerator)
    assert generator.max_concurrency == 3
    assert generator.identity() == {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-x", "api_style": "completions"}
    default = load_generator(GeneratorConfig(backend="openai", model="gpt-x"))
    assert default.identity()["base_url"] == "https://api.openai.com/v1"


def test_credentials_in_the_url_stay_out_of_the_identity():
    generator = load_generator(GeneratorConfig(backend="openai", model="m", base_url="https://user:pw@host.example/v1?key=k"))
    assert generator.identity()["base_url"] == "https://host.example/v1"
    assert "pw" not in repr(generator)


@pytest.mark.parametrize("model", [GeneratorConfig, DecodingParams, Faults])
def test_every_config_field_has_a_description(model: type[BaseModel]):
    missing = [name for name, field in model.model_fields.items() if not field.description]
    assert missing == []


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
        ({"strategy": "beam", "num_beams": 1}, "num_beams"),
        ({"strategy": "nucleus"}, "strategy"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_decoding_params_are_validated(bad, field):
    with pytest.raises(ValidationError, match=field):
        DecodingParams(**bad)


def test_generator_config_ranges_are_validated():
    for bad in ({"max_concurrency": 0}, {"timeout_s": 0}, {"batch_size": 0}, {"backend": "vllm"}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            GeneratorConfig(**bad)
