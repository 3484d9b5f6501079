"""DPO through our interface (tasks.align.dpo): options, held-out measurement, learning, resume.

The slow tests reuse the PPO tests' tiny SFT policy and reward model (tests/tasks/align/ppo_fixtures.py):
the SFT policy adds an unwanted filler ("um um") about half the time. The preference pairs are
(clean answer, filler answer), on the fixtures' train prompts for training and on their held-out
prompts for measuring; the RM (trained on the same signal) and the filler rate judge the samples.

    OMP_NUM_THREADS=1 pytest tests/tasks/align/test_dpo.py -s     # -s shows the measured numbers
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from transformers import TrainerCallback

from tasks.align.dpo import DPOOptions, implicit_reward_stats, train_dpo
from tasks.align.sft import AlignError


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
    """Base, SFT and RM folders (built once per session, shared with test_ppo, test_rloo and test_evaluate)."""
    built = fx.build_align_fixtures(tmp_path_factory.getbasetemp() / "align-ppo-fixtures")
    assert built.rm_held_out_accuracy >= 0.9, "the toy RM must have learned its signal for these tests to mean anything"
    return built


@pytest.fixture(scope="module")
def filler_pairs(toy, tmp_path_factory) -> dict[str, Path]:
    """(clean, filler) preference files on the fixtures' train and held-out prompts."""
    folder = tmp_path_factory.mktemp("dpo-prefs")
    task = fx.toy_task()
    paths = {}
    for split, rows in (("train", task.train), ("heldout", task.held_out)):
        paths[split] = folder / f"{split}.parquet"
        pq.write_table(
            pa.table(
                {
                    "prompt": [prompt for prompt, _ in rows],
                    "chosen": [fx.clean_answer(topic) for _, topic in rows],
                    "rejected": [fx.filler_answer(topic) for _, topic in rows],
                }
            ),
            paths[split],
        )
    return paths


class StopAt(TrainerCallback):
    """Ends training after `step` (the checkpoint of that step is written first): an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


# --------------------------------------------------------------------------------------------- fast


def test_options_have_help_texts_and_check_values():
    for name, field in DPOOptions.model_fields.items():
        assert field.description, f"DPOOptions.{name} has no description"
    with pytest.raises(ValidationError):
        DPOOptions(loss_type=["no-such-loss"])
    with pytest.raises(ValidationError):
        DPOOptions(beta=0)


def test_implicit_reward_stats_count_ties_as_half():
    reference = {"chosen": [-5.0, -5.0, -5.0], "rejected": [-6.0, -6.0, -6.0]}
    assert implicit_reward_stats(reference, reference, beta=0.1) == {"accuracy": 0.5, "margin": 0.0}
    policy = {"chosen": [-4.0, -6.0, -5.0], "rejected": [-7.0, -5.0, -6.0]}
    stats = implicit_reward_stats(policy, reference, beta=0.5)
    # margins: 0.5 * (1 - (-1)) = 1, 0.5 * (-1 - 1) = -1, 0
    assert stats["accuracy"] == pytest.approx(0.5) and stats["margin"] == pytest.approx(0.0)
    policy = {"chosen": [-4.0, -5.0, -5.0], "rejected": [-6.0, -6.0, -7.0]}  # margins 1, 0 (a tie), 1
    stats = implicit_reward_stats(policy, reference, beta=1.0)
    assert stats["accuracy"] == pytest.approx(2.5 / 3) and stats["margin"] == pytest.approx(2 / 3)
    with pytest.raises(AlignError, match="no held-out pairs"):
        implicit_reward_stats({"chosen": [], "rejected": []}, {"chosen": [], "rejected": []}, 0.1)


# --------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_held_out_measurement_scores_the_tokens_dpo_trains_on(toy, filler_pairs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.align.dpo import build_dpo_trainer
    from tasks.align.reward import read_preferences
    from tasks.align.sft import encode_prompt_completion

    tokenizer = AutoTokenizer.from_pretrained(toy.sft_dir)
    model = AutoModelForCausalLM.from_pretrained(toy.sft_dir)
    table = read_preferences(filler_pairs["train"]).slice(0, 4)
    trainer = build_dpo_trainer(model, tokenizer, table, DPOOptions(max_steps=1), tmp_path / "ckpt")
    for i, row in enumerate(table.to_pylist()):
        example = trainer.train_dataset[i]
        for side in ("chosen", "rejected"):
            ids, n_prompt = encode_prompt_completion(tokenizer, [{"role": "user", "content": row["prompt"]}], row[side])
            assert example["prompt_ids"] == ids[:n_prompt]
            assert example[f"{side}_ids"] == ids[n_prompt:]
            assert ids[-1] == tokenizer.eos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_prefers_chosen_on_held_out_pairs_and_raises_the_reward(toy, filler_pairs, tmp_path, seed):
    from transformers import AutoModelForCausalLM

    from tasks.align.evaluate import evaluate_models
    from tasks.generation.params import DecodingParams

    lines: list[str] = []
    options = DPOOptions(max_steps=40, learning_rate=2e-4, logging_steps=10, save_steps=20, seed=seed)
    metrics = train_dpo(
        toy.sft_dir, filler_pairs["train"], filler_pairs["heldout"], tmp_path / "dpo", options, tmp_path / "ckpt",
        log=lines.append,
    )
    assert metrics["steps"] == 40 and metrics["resumed_from"] is None
    assert [step for step, _ in metrics["train_loss"]] == [10, 20, 30, 40]
    assert metrics["train_loss"][-1][1] < metrics["train_loss"][0][1]
    assert any(line.startswith("dpo step 10/40: loss=") for line in lines)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")  # loadable by plain transformers

    before, after = metrics["heldout_before"], metrics["heldout_after"]
    assert before["accuracy"] == 0.5 and before["margin"] == 0.0  # policy = reference before training
    assert after["accuracy"] >= 0.9 and after["margin"] > 0
    assert after["chosen_nll"] < before["chosen_nll"]  # the chosen answers became likelier
    assert after["rejected_nll"] > before["rejected_nll"]

    # The policy's own answers on the held-out prompts, judged by the RM and by the filler count.
    prompts = toy.held_out_prompts * 3
    result = evaluate_models(
        {"sft": toy.sft_dir, "dpo": tmp_path / "dpo"},
        toy.rm_dir,
        prompts,
        decoding=DecodingParams(strategy="sample", temperature=0.7, max_new_tokens=40, seed=100 + seed),
        log=lambda _: None,
    )
    sft, dpo = result["models"]["sft"], result["models"]["dpo"]
    gain = dpo["reward_mean"] - sft["reward_mean"]
    se = math.hypot(dpo["reward_se"], sft["reward_se"])
    filler = {name: sum(fx.has_filler(s[name]) for s in result["samples"]) / len(prompts) for name in ("sft", "dpo")}
    print(
        f"\nseed {seed}: held-out implicit-reward accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f} "
        f"(margin {after['margin']:.3f}); chosen NLL {before['chosen_nll']:.3f} -> {after['chosen_nll']:.3f}; "
        f"RM reward sft {sft['reward_mean']:.2f}±{sft['reward_se']:.2f} -> dpo {dpo['reward_mean']:.2f}"
        f"±{dpo['reward_se']:.2f} (gain {gain:.2f}, se {se:.2f}); KL {dpo['kl_from_reference']:.2f} nats; "
        f"filler {filler['sft']:.2f} -> {filler['dpo']:.2f}"
    )
    assert gain > 2 * se
    assert 0 < dpo["kl_from_reference"] < 5
    assert filler["dpo"] <= filler["sft"] - 0.2
    assert dpo["missing_eos_rate"] <= 0.05


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_interrupted_dpo_resumes_from_its_checkpoint_to_the_same_model(toy, filler_pairs, tmp_path):
    import torch

    options = DPOOptions(max_steps=6, learning_rate=2e-4, logging_steps=1, save_steps=2, save_total_limit=5, seed=3)
    args = (toy.sft_dir, filler_pairs["train"], None)

    first = train_dpo(*args, tmp_path / "a", options, tmp_path / "ckpt", log=lambda _: None, callbacks=[StopAt(2)])
    assert first["steps"] == 2 and first["resumed_from"] is None
    assert [p.name for p in (tmp_path / "ckpt").glob("checkpoint-*")] == ["checkpoint-2"]
    assert first["heldout_before"] is None and first["heldout_after"] is None

    lines: list[str] = []
    resumed = train_dpo(*args, tmp_path / "b", options, tmp_path / "ckpt", log=lines.append)
    assert resumed["steps"] == 6 and resumed["resumed_from"] == "checkpoint-2"
    assert any("resuming from" in line and "checkpoint-2" in line for line in lines)
    assert not any(line.startswith("dpo step 1/") or line.startswith("dpo step 2/") for line in lines)

    straight = train_dpo(*args, tmp_path / "c", options, tmp_path / "ckpt-straight", log=lambda _: None)
    assert straight["resumed_from"] is None
    for (step_a, loss_a), (step_b, loss_b) in zip(resumed["train_loss"], straight["train_loss"]):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-4, abs=1e-6)
    a, b = _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "resumed weights differ from an uninterrupted run"

    # A checkpoint folder of a run with other options is refused, not resumed.
    with pytest.raises(AlignError, match="other options"):
        train_dpo(*args, tmp_path / "d", options.model_copy(update={"beta": 0.5}), tmp_path / "ckpt", log=lambda _: None)


@pytest.mark.slow
def test_lora_dpo_trains_adapters_and_saves_a_plain_model(toy, filler_pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    from tasks.align.config import LoraOptions

    options = DPOOptions(max_steps=3, learning_rate=1e-3, logging_steps=1, lora=LoraOptions(enabled=True))
    metrics = train_dpo(toy.sft_dir, filler_pairs["train"], filler_pairs["heldout"], tmp_path / "dpo", options,
                        tmp_path / "ckpt", log=lambda _: None)
    assert metrics["steps"] == 3 and metrics["heldout_after"]["accuracy"] > 0.5  # reference = adapters off
    assert not (tmp_path / "dpo" / "adapter_config.json").exists()  # merged, loadable without peft
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(toy.sft_dir).state_dict()
    assert trained.keys() == sft.keys()
    changed = [k for k in sft if not (trained[k] == sft[k]).all()]
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
