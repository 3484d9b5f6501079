"""PPO through our interface (tasks.align.ppo): options, reward reading, learning, exact resume.

The slow tests train a tiny SFT policy and reward model from scratch (tests/tasks/align/ppo_fixtures.py):
the RM penalises an unwanted filler ("um um") that the SFT policy says about half the time.

    OMP_NUM_THREADS=1 pytest tests/tasks/align/test_ppo.py -s     # -s shows the measured numbers
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tasks.align.ppo import (
    CheckpointStore,
    PPOError,
    PPOOptions,
    PromptBatches,
    check_reward_reading,
    length_warning,
    load_prompts,
    train_ppo,
)

REPO = Path(__file__).resolve().parents[3]


def _load_fixtures_module():
    name = "align_ppo_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("ppo_fixtures.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fx = _load_fixtures_module()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Base, SFT and RM folders (built once per session, shared with test_evaluate)."""
    built = fx.build_align_fixtures(tmp_path_factory.getbasetemp() / "align-ppo-fixtures")
    assert built.rm_held_out_accuracy >= 0.9, "the toy RM must have learned its signal for these tests to mean anything"
    return built


# --------------------------------------------------------------------------------------------- fast


def test_options_refuse_gradient_accumulation():
    with pytest.raises(ValidationError, match="merges the PPO minibatches"):
        PPOOptions(gradient_accumulation_steps=2)


def test_options_count_updates_from_episodes_and_check_batches():
    assert PPOOptions().num_updates == 30
    assert PPOOptions(total_episodes=100, per_device_train_batch_size=32).num_updates == 4
    with pytest.raises(ValidationError, match="not both"):
        PPOOptions(total_updates=3, total_episodes=96)
    with pytest.raises(ValidationError, match="multiple of num_mini_batches"):
        PPOOptions(per_device_train_batch_size=30, num_mini_batches=4)


def test_options_have_help_texts():
    for name, field in PPOOptions.model_fields.items():
        assert field.description, f"PPOOptions.{name} has no description"


def test_prompt_batches_depend_only_on_seed_and_update():
    batches = PromptBatches(num_prompts=10, batch_size=4, seed=3)
    assert batches.batches_per_epoch == 2
    first_epoch = batches.batch(0) + batches.batch(1)
    assert len(set(first_epoch)) == 8  # no repeats inside an epoch
    assert batches.batch(2) != batches.batch(0) or batches.batch(3) != batches.batch(1)  # a new permutation
    resumed = PromptBatches(num_prompts=10, batch_size=4, seed=3)
    resumed.start_update = 5
    iterator = iter(resumed)
    assert [next(iterator) for _ in range(3)] == [batches.batch(5), batches.batch(6), batches.batch(7)]
    other_seed = PromptBatches(num_prompts=10, batch_size=4, seed=4)
    assert [other_seed.batch(i) for i in range(4)] != [batches.batch(i) for i in range(4)]
    with pytest.raises(PPOError, match="fewer than per_device_train_batch_size"):
        PromptBatches(num_prompts=3, batch_size=4, seed=0)


def test_length_monitor_warns_only_when_length_and_kl_grow():
    flat = [{"response_length": 8.0, "kl": 0.1 * i} for i in range(10)]
    assert length_warning(flat, window=3, growth=0.5) is None
    longer = [{"response_length": 8.0 + 3 * i, "kl": 0.5 * i} for i in range(10)]
    message = length_warning(longer, window=3, growth=0.5)
    assert message and "reward hacking" in message
    longer_same_kl = [{"response_length": 8.0 + 3 * i, "kl": 1.0} for i in range(10)]
    assert length_warning(longer_same_kl, window=3, growth=0.5) is None
    assert length_warning(longer[:5], window=3, growth=0.5) is None  # too short a history to judge


def test_load_prompts_names_file_row_and_field(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), good)
    assert load_prompts(good) == ["a", "b"]
    no_column = tmp_path / "no_column.parquet"
    pq.write_table(pa.table({"text": ["a"]}), no_column)
    with pytest.raises(PPOError, match=r"no_column.parquet: no `prompt` column"):
        load_prompts(no_column)
    blank = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"prompt": ["a", "  "]}), blank)
    with pytest.raises(PPOError, match=r"blank.parquet: row 1: field `prompt`"):
        load_prompts(blank)
    with pytest.raises(PPOError, match="not found"):
        load_prompts(tmp_path / "missing.parquet")


def test_checkpoint_store_keeps_the_last_ones_and_ignores_partial_writes(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (2, 4, 6):
        store.save(step, {"step": step}, {"step": step})
    assert [p.name for p in store.list()] == ["ppo-step-000004", "ppo-step-000006"]
    (tmp_path / "ppo-step-000008").mkdir()  # a folder without meta.json is not a checkpoint
    assert store.latest().name == "ppo-step-000006"
    state, meta = store.load(store.latest())
    assert state == {"step": 6} and meta == {"step": 6}


# --------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_reward_is_read_at_the_eos_the_rm_was_trained_on(toy):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.sft_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(toy.rm_dir, num_labels=1).eval()
    reading = check_reward_reading(rm, tokenizer, "Describe the cat.", "The cat is red.")
    assert reading["trained"] == pytest.approx(reading["ppo"], abs=1e-4)

    # The trap from the issue: a template that writes a newline after the final EOS.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{{ eos_token }}{% endgeneration %}", "{{ eos_token }}\n{% endgeneration %}"
    )
    assert tokenizer.chat_template.count("\n{% endgeneration %}") == 1
    with pytest.raises(PPOError, match="after the assistant's EOS"):
        check_reward_reading(rm, tokenizer, "Describe the cat.", "The cat is red.")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_raises_held_out_reward_with_bounded_kl_and_less_filler(toy, tmp_path, seed):
    from tasks.align.evaluate import evaluate_models
    from tasks.generation.params import DecodingParams

    options = PPOOptions(total_updates=20, seed=seed, checkpoint_every=10)
    started = time.time()
    metrics = train_ppo(
        toy.sft_dir, toy.rm_dir, toy.train_prompts_path, tmp_path / "ppo", options, tmp_path / "ckpt", log=lambda _: None
    )
    ppo_seconds = time.time() - started

    assert len(metrics["updates"]) == 20 and metrics["resumed_from_step"] is None
    for row in metrics["updates"]:
        assert {"score", "rm_score", "kl", "response_length", "missing_eos_rate"} <= set(row)
        assert 0 < row["response_length"] <= options.response_length
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ppo-step-*")) == ["ppo-step-000010", "ppo-step-000020"]
    assert not (tmp_path / "ckpt" / "trl-scratch").exists()

    # Held-out prompts (never trained on by SFT, RM or PPO), three samples each, decoded as in training.
    prompts = toy.held_out_prompts * 3
    result = evaluate_models(
        {"sft": toy.sft_dir, "ppo": tmp_path / "ppo"},
        toy.rm_dir,
        prompts,
        decoding=DecodingParams(strategy="sample", temperature=0.7, max_new_tokens=40, seed=100 + seed),
        log=lambda _: None,
    )
    sft, ppo = result["models"]["sft"], result["models"]["ppo"]
    gain = ppo["reward_mean"] - sft["reward_mean"]
    se = math.hypot(ppo["reward_se"], sft["reward_se"])
    kl = ppo["kl_from_reference"]
    filler = {name: sum(fx.has_filler(s[name]) for s in result["samples"]) / len(prompts) for name in ("sft", "ppo")}
    print(
        f"\nseed {seed}: reward sft {sft['reward_mean']:.2f}±{sft['reward_se']:.2f} -> ppo "
        f"{ppo['reward_mean']:.2f}±{ppo['reward_se']:.2f} (gain {gain:.2f}, se {se:.2f}); KL {kl:.2f} nats "
        f"(training log {metrics['final']['kl']:.2f}); filler {filler['sft']:.2f} -> {filler['ppo']:.2f}; "
        f"PPO {ppo_seconds:.0f}s"
    )
    assert gain > 3 * se
    assert 0 < kl < 10
    # The independent metric, counted on the text: the filler the RM was taught to penalise.
    assert filler["ppo"] <= filler["sft"] - 0.2
    assert ppo["missing_eos_rate"] <= 0.05


_RUNNER = """
import json, sys
from pathlib import Path
from tasks.align.ppo import PPOOptions, train_ppo
args = json.loads(sys.argv[1])
metrics = train_ppo(Path(args["sft"]), Path(args["rm"]), Path(args["prompts"]), Path(args["out"]),
                    PPOOptions(**args["options"]), Path(args["ckpt"]), log=lambda line: print(line, flush=True))
Path(args["metrics"]).write_text(json.dumps(metrics))
"""


def _start(toy, folder: Path, options: dict) -> subprocess.Popen:
    args = {
        "sft": str(toy.sft_dir),
        "rm": str(toy.rm_dir),
        "prompts": str(toy.train_prompts_path),
        "out": str(folder / "policy"),
        "ckpt": str(folder / "ckpt"),
        "metrics": str(folder / "metrics.json"),
        "options": options,
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(folder / "log.txt", "a")
    return subprocess.Popen([sys.executable, "-c", _RUNNER, json.dumps(args)], cwd=REPO, env=env, stdout=log, stderr=log)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_ppo_killed_with_sigkill_resumes_to_the_same_weights(toy, tmp_path):
    import torch

    options = {"total_updates": 8, "per_device_train_batch_size": 16, "checkpoint_every": 2, "seed": 5}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()

    # The interrupted run: SIGKILL as soon as its first checkpoint is complete.
    process = _start(toy, killed, options)
    deadline = time.time() + 300
    while not list((killed / "ckpt").glob("ppo-step-*/meta.json")):
        assert process.poll() is None, (killed / "log.txt").read_text()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "policy").exists() and not (killed / "metrics.json").exists()

    resumed = _start(toy, killed, options)
    assert resumed.wait(timeout=600) == 0, (killed / "log.txt").read_text()
    reference = _start(toy, straight, options)
    assert reference.wait(timeout=600) == 0, (straight / "log.txt").read_text()

    resumed_metrics = json.loads((killed / "metrics.json").read_text())
    straight_metrics = json.loads((straight / "metrics.json").read_text())
    assert resumed_metrics["resumed_from_step"] in (2, 4, 6)
    assert straight_metrics["resumed_from_step"] is None
    # The log history survives the kill, and the resumed updates are the same updates.
    assert resumed_metrics["updates"] == straight_metrics["updates"]

    a, b = _weights(straight / "policy"), _weights(killed / "policy")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), "policy weights differ after resume"
    # The value model and the optimizer are resumed too: the final checkpoints are identical.
    state_a = torch.load(straight / "ckpt" / "ppo-step-000008" / "state.pt", weights_only=False)
    state_b = torch.load(killed / "ckpt" / "ppo-step-000008" / "state.pt", weights_only=False)
    assert all(torch.equal(state_a["value"][k], state_b["value"][k]) for k in state_a["value"])
    moments_a = [s["exp_avg"] for s in state_a["optimizer"]["state"].values()]
    moments_b = [s["exp_avg"] for s in state_b["optimizer"]["state"].values()]
    assert len(moments_a) == len(moments_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(moments_a, moments_b))


@pytest.mark.slow
def test_finished_run_resumes_as_done_and_other_settings_are_refused(toy, tmp_path):
    options = PPOOptions(total_updates=2, per_device_train_batch_size=16, checkpoint_every=1, seed=7)
    args = (toy.sft_dir, toy.rm_dir, toy.train_prompts_path)
    first = train_ppo(*args, tmp_path / "a", options, tmp_path / "ckpt", log=lambda _: None)
    again = train_ppo(*args, tmp_path / "b", options, tmp_path / "ckpt", log=lambda _: None)
    assert first["resumed_from_step"] is None and again["resumed_from_step"] == 2
    assert again["updates"] == first["updates"]  # nothing left to do: the history comes from the checkpoint
    assert _weights(tmp_path / "a").keys() == _weights(tmp_path / "b").keys()
    assert all(
        (_weights(tmp_path / "a")[k] == _weights(tmp_path / "b")[k]).all() for k in _weights(tmp_path / "a")
    )
    with pytest.raises(PPOError, match="other settings or prompts.*seed"):
        train_ppo(*args, tmp_path / "c", options.model_copy(update={"seed": 8}), tmp_path / "ckpt", log=lambda _: None)


@pytest.mark.slow
def test_lora_policy_trains_and_saves_a_plain_model(toy, tmp_path):
    from transformers import AutoModelForCausalLM

    from tasks.align.config import LoraOptions

    options = PPOOptions(
        total_updates=2, per_device_train_batch_size=16, learning_rate=1e-3, seed=0, lora=LoraOptions(enabled=True)
    )
    metrics = train_ppo(
        toy.sft_dir, toy.rm_dir, toy.train_prompts_path, tmp_path / "ppo", options, tmp_path / "ckpt", log=lambda _: None
    )
    assert len(metrics["updates"]) == 2
    assert not (tmp_path / "ppo" / "adapter_config.json").exists()  # merged, loadable without peft
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(toy.sft_dir).state_dict()
    assert trained.keys() == sft.keys()
    changed = [k for k in sft if not (trained[k] == sft[k]).all()]
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
