"""The align flow's input resolution: the base model follows the dataset's lineage unless given."""

import pyarrow as pa

from storage import atomic
from storage.registry import Registry
from tasks.align.steps import AlignConfig, base_model_of


def register(registry: Registry, kind: str, name: str, parents=()) -> str:
    with registry.new_version(kind, name, parents=list(parents)) as draft:
        atomic.write_parquet(draft.path / "t.parquet", pa.table({"x": [1]}))
    return draft.ref


def test_base_model_comes_from_the_datasets_generator(registry_root):
    registry = Registry()
    first = register(registry, "model", "base")
    register(registry, "model", "base")  # a newer base that did not make the dataset
    register(registry, "dataset", "self-instruct", parents=[f"model:{first}"])
    assert base_model_of(AlignConfig(dataset="self-instruct")) == "base@1"
    assert base_model_of(AlignConfig(dataset="self-instruct", model="base@2")) == "base@2"


def test_a_parquet_file_without_lineage_falls_back_to_the_latest_base(registry_root, tmp_path):
    path = tmp_path / "data.parquet"
    atomic.write_parquet(path, pa.table({"prompt": ["a"], "completion": ["b"]}))
    assert base_model_of(AlignConfig(dataset=str(path))) == "base"
