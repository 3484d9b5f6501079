"""SFT through TRL's SFTTrainer: it learns, targets end with EOS, it resumes after SIGKILL, NaN stops it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoTokenizer, TrainerCallback

from tasks.align.config import LoraOptions, SFTOptions
from tasks.align.data import load_sft_table
from tasks.align.sft import AlignError, NonFiniteLossError, build_sft_trainer, latest_checkpoint, train_sft


def test_cpu_settings_make_trl_configs_that_train_without_a_gpu(tmp_path, monkeypatch):
    from trl import RewardConfig, SFTConfig

    from tasks.align.devices import training_device_kwargs

    monkeypatch.setenv("ALIGNFLOW_DEVICE", "cpu")
    kwargs = training_device_kwargs()
    assert kwargs["bf16"] is False and kwargs["fp16"] is False and kwargs["use_cpu"] is True
    assert kwargs["report_to"] == "none" and kwargs["dataloader_num_workers"] == 0 and kwargs["disable_tqdm"] is True
    for config_class in (SFTConfig, RewardConfig):
        config = config_class(output_dir=str(tmp_path), **kwargs)
        # TRL's own defaults would be bf16=True and activation checkpointing on.
        assert config.bf16 is False and config.use_cpu is True
        assert config.activation_checkpointing is False and config.gradient_checkpointing is False


@pytest.mark.slow
def test_sft_lowers_held_out_loss_against_the_base(sft_run):
    metrics = sft_run["metrics"]
    print("SFT metrics:", {k: v for k, v in metrics.items() if k not in ("train_loss", "eval_loss_curve")})
    assert metrics["steps"] == 200
    # Held-out completion NLL per token: the random-init base is near ln(vocab) = 6.4.
    assert metrics["eval_loss_before"] > 5.5
    assert metrics["eval_loss_after"] < 0.5 * metrics["eval_loss_before"]
    curve = metrics["train_loss"]
    assert curve[0][0] < curve[-1][0] and curve[-1][1] < 0.5 * curve[0][1]
    # Training output went through `log` (the flow passes a Prefect logger there).
    assert any(line.startswith("sft step 200/200") for line in sft_run["log"])
    saved = sft_run["model_dir"]
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(saved).chat_template


def test_every_target_ends_with_eos_and_the_prompt_is_masked(align_base_dir, instruction_data, tmp_path):
    """The exact tokens SFTTrainer trains on: an SFT model without EOS in its targets never stops."""
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(align_base_dir)
    model = AutoModelForCausalLM.from_pretrained(align_base_dir)
    table = load_sft_table(instruction_data["train"])
    trainer = build_sft_trainer(model, tokenizer, table, None, SFTOptions(max_steps=1), tmp_path / "ckpt")
    dataset = trainer.train_dataset
    assert len(dataset) == table.num_rows
    eos = tokenizer.eos_token_id
    for example, completion in zip(dataset, table.column("completion").to_pylist()):
        ids, labels = example["input_ids"], example["labels"]
        assert ids[-1] == eos and labels[-1] == eos
        target = [label for label in labels if label != -100]
        # The loss covers the answer and its EOS, nothing of the prompt.
        assert tokenizer.decode(target) == completion + tokenizer.eos_token
        first = labels.index(target[0])
        assert all(label == -100 for label in labels[:first])
        assert tokenizer.decode(ids[:first]).endswith("<|assistant|>\n")


def test_tokenizer_without_chat_template_is_refused_before_training(align_base_dir, instruction_data, tmp_path):
    broken = tmp_path / "no-template"
    shutil.copytree(align_base_dir, broken)
    tokenizer = AutoTokenizer.from_pretrained(broken)
    tokenizer.chat_template = None
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(broken)
    with pytest.raises(AlignError, match=r"sft: the tokenizer in .*no-template has no chat template"):
        train_sft(broken, instruction_data["train"], instruction_data["eval"], tmp_path / "out", SFTOptions(), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_template_with_text_after_eos_is_refused(align_base_dir, instruction_data, tmp_path):
    """A newline after EOS would make PPO read the reward at the wrong token (a trap from the issue)."""
    broken = tmp_path / "newline-after-eos"
    shutil.copytree(align_base_dir, broken)
    tokenizer = AutoTokenizer.from_pretrained(broken)
    tokenizer.chat_template = tokenizer.chat_template.replace("{{ eos_token }}{% endgeneration %}", "{{ eos_token }}\n{% endgeneration %}")
    tokenizer.save_pretrained(broken)
    with pytest.raises(AlignError, match="does not end the assistant turn with EOS"):
        train_sft(broken, instruction_data["train"], instruction_data["eval"], tmp_path / "out", SFTOptions(), tmp_path / "ck")


def test_missing_model_or_columns_are_refused_before_training(align_base_dir, instruction_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(AlignError, match="model folder .*does-not-exist does not exist"):
        train_sft(tmp_path / "does-not-exist", instruction_data["train"], instruction_data["eval"], tmp_path / "o", SFTOptions(), tmp_path / "ck")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"instruction": ["x"], "output": ["y"]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet: missing column\(s\) completion, prompt"):
        train_sft(align_base_dir, bad, instruction_data["eval"], tmp_path / "o", SFTOptions(), tmp_path / "ck")


class PoisonWeights(TrainerCallback):
    """Fault injection: after optimizer step `at`, the embeddings become NaN, so the next loss is NaN."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch

        if state.global_step == self.at:
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(float("nan"))


def test_nan_loss_stops_with_the_stage_and_the_step(align_base_dir, instruction_data, tmp_path):
    options = SFTOptions(max_steps=10, eval_steps=100, logging_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"^sft: non-finite gradient .* at step 4;") as caught:
        train_sft(
            align_base_dir, instruction_data["train"], instruction_data["eval"], tmp_path / "out", options,
            tmp_path / "ck", log=lambda line: None, callbacks=[PoisonWeights(at=3)],
        )
    assert (caught.value.stage, caught.value.step) == ("sft", 4)
    assert not (tmp_path / "out").exists()


def test_huge_learning_rate_diverges_into_a_clear_error(align_base_dir, instruction_data, tmp_path):
    options = SFTOptions(max_steps=30, learning_rate=1e12, eval_steps=100, logging_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"^sft: .* at step \d+;") as caught:
        train_sft(align_base_dir, instruction_data["train"], instruction_data["eval"], tmp_path / "out", options, tmp_path / "ck", log=lambda line: None)
    assert caught.value.stage == "sft" and 1 <= caught.value.step <= 30


RUN_SFT = """
import sys
from pathlib import Path
from tasks.align.config import SFTOptions
from tasks.align.sft import train_sft
base, train, held_out, out, ckpt, options = sys.argv[1:7]
train_sft(Path(base), Path(train), Path(held_out), Path(out), SFTOptions.model_validate_json(options), Path(ckpt), log=lambda line: None)
"""


@pytest.mark.slow
def test_sft_killed_with_sigkill_resumes_from_its_checkpoint(align_base_dir, instruction_data, tmp_path, subprocess_env):
    # No early stopping: the run must go the whole way for the step counts to be checked.
    options = SFTOptions(max_steps=120, learning_rate=2e-3, eval_steps=20, logging_steps=10, seed=0, early_stopping_patience=None)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    args = [str(align_base_dir), str(instruction_data["train"]), str(instruction_data["eval"]), str(out), str(ckpt)]
    child = subprocess.Popen(
        [sys.executable, "-c", RUN_SFT, *args, options.model_dump_json()],
        env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(ckpt) is None:
            assert child.poll() is None, f"the SFT child exited early: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not (out / "config.json").exists(), "the child finished before it was killed; the test proves nothing"
    killed_at = int(latest_checkpoint(ckpt).name.split("-")[1])
    assert killed_at < options.max_steps

    lines: list[str] = []
    metrics = train_sft(align_base_dir, instruction_data["train"], instruction_data["eval"], out, options, ckpt, log=lines.append)
    assert metrics["resumed_from"] == f"checkpoint-{killed_at}"
    assert any(f"resuming from {ckpt / f'checkpoint-{killed_at}'}" in line for line in lines)
    assert metrics["steps"] == options.max_steps
    # The restored trainer state carries the killed run's loss history, and this run trained only the rest.
    steps_logged = [step for step, _ in metrics["train_loss"]]
    assert steps_logged[0] <= killed_at < steps_logged[-1] == options.max_steps
    trained_here = [int(m.group(1)) for m in map(re.compile(r"sft step (\d+)/\d+: loss=").match, lines) if m]
    assert trained_here and min(trained_here) > killed_at
    assert metrics["eval_loss_after"] < 0.6 * metrics["eval_loss_before"]
    assert (out / "model.safetensors").is_file()


def test_resume_with_other_options_is_refused(align_base_dir, instruction_data, tmp_path):
    ckpt = tmp_path / "ck"
    train_sft(align_base_dir, instruction_data["train"], instruction_data["eval"], tmp_path / "o1",
              SFTOptions(max_steps=2, eval_steps=1), ckpt, log=lambda line: None)
    with pytest.raises(AlignError, match="holds checkpoints of a run with other options"):
        train_sft(align_base_dir, instruction_data["train"], instruction_data["eval"], tmp_path / "o2",
                  SFTOptions(max_steps=3, eval_steps=1), ckpt, log=lambda line: None)


@pytest.mark.slow
def test_lora_trains_adapters_and_saves_a_merged_model(align_base_dir, instruction_data, tmp_path):
    from transformers import AutoModelForCausalLM

    options = SFTOptions(max_steps=40, learning_rate=1e-2, eval_steps=100, lora=LoraOptions(enabled=True, r=8, alpha=16))
    metrics = train_sft(align_base_dir, instruction_data["train"], instruction_data["eval"], tmp_path / "out", options,
                        tmp_path / "ck", log=lambda line: None)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5
    # Merged: a plain model folder, no adapter files, loadable without peft.
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not any("lora" in name for name, _ in model.named_parameters())
