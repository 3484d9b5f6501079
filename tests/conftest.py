"""Shared test fixtures: a temporary registry root, one ephemeral Prefect for the session, tiny models.

The environment is fixed before anything imports torch or prefect: one torch thread (two threads
on a loaded 2-core machine make training 5-8x slower), no hub access, no analytics.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="alignflow-tests-"))
os.environ.update(
    OMP_NUM_THREADS="1",
    MKL_NUM_THREADS="1",
    TOKENIZERS_PARALLELISM="false",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRL_EXPERIMENTAL_SILENCE="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_HOME=str(_SESSION_TMP / "prefect"),
    ALIGNFLOW_HOME=str(_SESSION_TMP / "alignflow-home"),
    WANDB_DISABLED="true",
    DISABLE_MLFLOW_INTEGRATION="TRUE",
)

import pytest  # noqa: E402

TINY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the wind.",
    "Return the list of numbers sorted in ascending order.",
    "Classify the sentiment of the sentence as positive or negative.",
    "A function computes the sum of two numbers and returns it.",
    "Translate the following sentence into French.",
    "Summarize the paragraph in one sentence.",
    "Instruction: Give three tips for staying healthy.\nOutput: Eat well, sleep enough, and move every day.",
] * 8


@pytest.fixture(scope="session", autouse=True)
def prefect_backend():
    """One ephemeral Prefect API for the whole session (starting one per test is slow)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def registry_root(tmp_path, monkeypatch) -> Path:
    """A fresh, empty registry root for one test."""
    root = tmp_path / "registry"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A randomly initialised tiny Llama with the project's tokenizer, saved as an HF folder."""
    from tasks.pretrain.model import build_model
    from tasks.pretrain.tokenizer import train_tokenizer

    folder = _SESSION_TMP / "tiny-model"
    if not (folder / "config.json").exists():
        tokenizer = train_tokenizer(TINY_TEXTS, vocab_size=400, min_frequency=1)
        model = build_model("tiny", tokenizer, max_positions=256, seed=0)
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def demo_base_model() -> Path:
    """A small model pretrained by the real pretrain flow on the demo corpus (docstrings + demo seeds).

    It lives in its own registry root, so tests use it as a local folder (a generator `model` path).
    """
    from flows.pretrain import pretrain
    from storage.registry import Registry
    from tasks.pretrain.steps import PretrainConfig
    from tasks.pretrain.training import TrainingOptions

    root = _SESSION_TMP / "demo-registry"
    previous = os.environ["ALIGNFLOW_HOME"]
    os.environ["ALIGNFLOW_HOME"] = str(root)
    try:
        if not Registry(root).exists("model", "base"):
            pretrain(PretrainConfig(demo_documents=800, training=TrainingOptions(
                vocab_size=1024, seq_len=256, batch_size=16, max_steps=250, warmup_steps=10, eval_every=125, checkpoint_every=125)))
        return Registry(root).resolve("model", "base").path
    finally:
        os.environ["ALIGNFLOW_HOME"] = previous


def realistic_instructions(n: int, seed: int = 11) -> list[str]:
    """bench/rouge_filter.py's seeded stream: fresh instructions, near-duplicates and recombinations."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "rouge_filter.py"
    spec = importlib.util.spec_from_file_location("bench_rouge_filter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_stream(n, seed=seed)


@pytest.fixture(scope="session")
def instruction_stream():
    """`realistic_instructions` as a fixture: call it with (n, seed)."""
    return realistic_instructions
