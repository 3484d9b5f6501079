"""The pretrain flow end to end on the ephemeral Prefect: a real (tiny) model, lineage, resume, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main as cli_main
from flows.pretrain import pretrain
from storage.registry import Registry
from tasks.pretrain.steps import PretrainConfig
from tasks.pretrain.training import TrainingOptions

pytestmark = pytest.mark.slow

TINY = dict(preset="tiny", vocab_size=512, seq_len=64, batch_size=8, max_steps=60, warmup_steps=5,
            eval_every=30, checkpoint_every=30, eval_windows=16)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    from tasks.pretrain.demo_corpus import build_demo_corpus
    from tasks.self_instruct.demo_documents import seed_documents
    from tasks.self_instruct.seeds import demo_seed_path, load_seed_tasks

    extra = seed_documents(load_seed_tasks(demo_seed_path("en")), copies=2)
    return build_demo_corpus(tmp_path_factory.mktemp("corpus") / "demo.jsonl", max_documents=500, extra_documents=extra)


def test_pretrain_registers_a_model_that_learned_and_generates(registry_root, corpus_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = pretrain(PretrainConfig(corpus=[str(corpus_file)], training=TrainingOptions(**TINY)))
    registry = Registry()
    version = registry.resolve("model", ref)
    metrics = version.manifest.metrics
    assert metrics["heldout_loss"] < metrics["heldout_loss_before"] - 0.5
    assert metrics["perplexity"] > 1
    lineage = [(kind, v.manifest.name) for _, kind, v in registry.lineage("model", ref)]
    assert lineage[:3] == [("model", "base"), ("model", "base-tokenizer"), ("dataset", "corpus-clean")]
    corpus = registry.resolve("dataset", "corpus-clean")
    assert corpus.manifest.extra["funnel"]["output"] == corpus.manifest.files["corpus.parquet"]["rows"]
    assert "loss_curve.png" in version.manifest.files

    tokenizer = AutoTokenizer.from_pretrained(version.path)
    model = AutoModelForCausalLM.from_pretrained(version.path)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give three tips for staying healthy."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|assistant|>\n")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_rerun_with_same_parameters_reuses_corpus_and_tokenizer(registry_root, corpus_file):
    config = PretrainConfig(corpus=[str(corpus_file)], training=TrainingOptions(**{**TINY, "max_steps": 10, "eval_every": 10, "checkpoint_every": 10}))
    first = pretrain(config)
    second = pretrain(config)
    registry = Registry()
    assert first != second  # a model is registered each time...
    assert len(registry.versions("dataset", "corpus-clean")) == 1  # ...but identical inputs are not
    assert len(registry.versions("model", "base-tokenizer")) == 1
    history = json.loads((registry.resolve("model", second).path / "training_history.json").read_text())
    assert history["resumed_from"] == 10  # the finished checkpoint was found: nothing retrained


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_sigkill_after_first_checkpoint_resumes_from_it(registry_root, corpus_file):
    env = {**os.environ, "PREFECT_API_URL": _api_url(), "ALIGNFLOW_HOME": str(registry_root)}
    args = [sys.executable, "flows/pretrain.py", "--corpus", str(corpus_file), "--vocab-size", "512", "--seq-len", "64",
            "--batch-size", "8", "--max-steps", "400", "--warmup-steps", "5", "--eval-every", "100", "--checkpoint-every", "10"]
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    checkpoints: list[Path] = []
    while time.time() < deadline and not checkpoints and process.poll() is None:
        checkpoints = list((registry_root / "work" / "pretrain").glob("*/checkpoint.pt"))
        time.sleep(0.2)
    assert checkpoints, "no checkpoint appeared"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not Registry().exists("model", "base")

    rerun = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "registered model: base@1" in rerun.stdout
    history = json.loads((Registry().resolve("model", "base").path / "training_history.json").read_text())
    assert history["resumed_from"] >= 10 and history["resumed_from"] % 10 == 0
    assert history["train"][0][0] == 1  # the history from before the kill was kept
    assert "resumed from checkpoint at step" in rerun.stdout + rerun.stderr


# ---- bad input: a clear message naming file, line/row and field, and nothing registered ----------


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli_main(["pretrain", *args])
    return code, capsys.readouterr().err


def assert_nothing_registered():
    registry = Registry()
    assert registry.names("dataset") == [] and registry.names("model") == []


def test_missing_file(registry_root, capsys, tmp_path):
    code, err = run_cli(["--corpus", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 2 and "missing.jsonl" in err
    assert_nothing_registered()


def test_malformed_jsonl_line(registry_root, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of text"}\n{"text": oops}\n')
    code, err = run_cli(["--corpus", str(bad)], capsys)
    assert code == 2 and re.search(r"bad\.jsonl: line 2: malformed JSON", err)
    assert_nothing_registered()


def test_jsonl_without_the_text_field(registry_root, capsys, tmp_path):
    bad = tmp_path / "fields.jsonl"
    bad.write_text('{"body": "text under another name"}\n')
    code, err = run_cli(["--corpus", str(bad)], capsys)
    assert code == 2 and re.search(r"fields\.jsonl: line 1: field 'text': missing", err)
    assert_nothing_registered()


def test_parquet_without_the_column(registry_root, capsys, tmp_path):
    bad = tmp_path / "table.parquet"
    pq.write_table(pa.table({"content": ["a"]}), bad)
    code, err = run_cli(["--corpus", str(bad), "--text-field", "body"], capsys)
    assert code == 2 and "table.parquet" in err and "body" in err and "content" in err
    assert_nothing_registered()


def test_corpus_empty_after_cleaning(registry_root, capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hi\n\nok\n\nno\n")
    code, err = run_cli(["--corpus", str(short)], capsys)
    assert code == 2 and "short.txt" in err and "too_short" in err
    assert_nothing_registered()


@pytest.mark.parametrize(
    "args, field",
    [(["--max-steps", "0"], "--max-steps: must be >= 1"), (["--learning-rate", "5"], "--learning-rate: must be < 1.0"),
     (["--warmup-steps", "500", "--max-steps", "10"], "warmup_steps (500) must be smaller than max_steps (10)"),
     (["--model-name", "bad name"], "--model-name: String should match pattern")],
)
def test_invalid_config_values_fail_before_anything_runs(registry_root, capsys, args, field):
    code, err = run_cli(args, capsys)
    # One line per bad field, naming its option, and no traceback.
    assert code == 2 and field in err and "Traceback" not in err
    assert_nothing_registered()


def test_continue_pretraining_from_a_local_checkpoint(registry_root, corpus_file, tiny_model_dir):
    """`init_from` continues an existing HF folder: its weights, architecture and tokenizer are kept."""
    from transformers import AutoConfig, AutoTokenizer

    options = TrainingOptions(**{**TINY, "init_from": str(tiny_model_dir), "max_steps": 6, "eval_every": 3, "checkpoint_every": 3})
    ref = pretrain(PretrainConfig(corpus=[str(corpus_file)], training=options))
    version = Registry().resolve("model", ref)
    assert len(AutoTokenizer.from_pretrained(version.path)) == len(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert AutoConfig.from_pretrained(version.path).hidden_size == AutoConfig.from_pretrained(tiny_model_dir).hidden_size
    assert version.manifest.metrics["heldout_loss"] < version.manifest.metrics["heldout_loss_before"]
