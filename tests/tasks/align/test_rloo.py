"""RLOO through our interface (tasks.align.rloo): options, reward reading, learning, resume.

The slow tests reuse the PPO tests' tiny SFT policy and reward model (tests/tasks/align/ppo_fixtures.py):
the RM penalises an unwanted filler ("um um") that the SFT policy says about half the time.

    OMP_NUM_THREADS=1 pytest tests/tasks/align/test_rloo.py -s     # -s shows the measured numbers
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

from tasks.align.rloo import RLOOOptions, train_rloo
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
    """Base, SFT and RM folders (built once per session, shared with test_ppo, test_dpo and test_evaluate)."""
    built = fx.build_align_fixtures(tmp_path_factory.getbasetemp() / "align-ppo-fixtures")
    assert built.rm_held_out_accuracy >= 0.9, "the toy RM must have learned its signal for these tests to mean anything"
    return built


class StopAt(TrainerCallback):
    """Ends training after `step` (the checkpoint of that step is written first): an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


# --------------------------------------------------------------------------------------------- fast


def test_options_have_help_texts_and_whole_prompt_groups():
    for name, field in RLOOOptions.model_fields.items():
        assert field.description, f"RLOOOptions.{name} has no description"
    RLOOOptions(per_device_train_batch_size=6, gradient_accumulation_steps=2, num_generations=4)
    with pytest.raises(ValidationError, match="multiple of num_generations"):
        RLOOOptions(per_device_train_batch_size=30, num_generations=4)
    with pytest.raises(ValidationError):
        RLOOOptions(num_generations=1)  # no leave-one-out baseline with one answer


# --------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_reward_function_scores_what_the_rm_was_trained_on(toy):
    """TRL hands the reward function decoded answers; it must score the chat-templated exchange at its EOS."""
    import torch
    from transformers import AutoTokenizer

    from tasks.align.ppo import chat_full_ids, chat_query_ids
    from tasks.align.reward import load_reward_model
    from tasks.align.rloo import RewardModelReward

    tokenizer = AutoTokenizer.from_pretrained(toy.sft_dir)
    rm, _ = load_reward_model(toy.rm_dir)
    reward = RewardModelReward(rm, tokenizer, missing_eos_penalty=1.5)
    prompts = ["Describe the cat.", "Tell me about the dog."]
    answers = ["The cat is red.", "The dog is um um big."]
    # What TRL passes: conversational prompts, the sampled ids (cut after EOS) and their decoded text.
    completion_ids = [chat_full_ids(tokenizer, p, a)[len(chat_query_ids(tokenizer, p)) :] for p, a in zip(prompts, answers)]
    decoded = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    assert decoded == answers and all(ids[-1] == tokenizer.eos_token_id for ids in completion_ids)
    logged: dict[str, float] = {}
    scores = reward(
        prompts=[[{"role": "user", "content": p}] for p in prompts],
        completions=[[{"role": "assistant", "content": text}] for text in decoded],
        completion_ids=completion_ids,
        log_metric=logged.__setitem__,
    )
    with torch.no_grad():
        trained = [rm(input_ids=torch.tensor([chat_full_ids(tokenizer, p, a)])).logits[0, 0].item()
                   for p, a in zip(prompts, answers)]
    assert scores == pytest.approx(trained, abs=1e-4)
    assert scores[0] > scores[1]  # the filler is penalised by the RM
    assert logged == {"rm_score": pytest.approx(sum(trained) / 2, abs=1e-4), "missing_eos_rate": 0.0}

    # An answer cut off by max_completion_length (no EOS) is penalised.
    cut = reward(prompts=[[{"role": "user", "content": prompts[0]}]], completions=[[{"role": "assistant", "content": "The cat"}]],
                 completion_ids=[completion_ids[0][:2]])
    full_score = reward(prompts=[[{"role": "user", "content": prompts[0]}]],
                        completions=[[{"role": "assistant", "content": "The cat"}]],
                        completion_ids=[completion_ids[0][:2] + [tokenizer.eos_token_id]])
    assert cut[0] == pytest.approx(full_score[0] - 1.5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_raises_held_out_reward_with_bounded_kl_and_less_filler(toy, tmp_path, seed):
    from transformers import AutoModelForCausalLM

    from tasks.align.evaluate import evaluate_models
    from tasks.generation.params import DecodingParams

    lines: list[str] = []
    options = RLOOOptions(max_steps=30, learning_rate=5e-4, logging_steps=5, save_steps=15, seed=seed)
    metrics = train_rloo(
        toy.sft_dir, toy.rm_dir, toy.train_prompts_path, tmp_path / "rloo", options, tmp_path / "ckpt", log=lines.append
    )
    assert metrics["steps"] == 30 and metrics["resumed_from"] is None
    assert [step for step, _ in metrics["reward_curve"]] == [5, 10, 15, 20, 25, 30]
    assert metrics["reward_curve"][-1][1] > metrics["reward_curve"][0][1]
    for name in ("reward", "rm_score", "kl", "response_length", "missing_eos_rate", "loss"):
        assert metrics["final"][name] is not None and len(metrics[f"{name}_curve"]) == 6
    assert 0 < metrics["final"]["response_length"] <= options.max_completion_length
    assert any(line.startswith("rloo step 5/30: loss=") for line in lines)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "rloo")  # loadable by plain transformers

    # Held-out prompts (never trained on by SFT, RM or RLOO), three samples each, decoded as in training.
    prompts = toy.held_out_prompts * 3
    result = evaluate_models(
        {"sft": toy.sft_dir, "rloo": tmp_path / "rloo"},
        toy.rm_dir,
        prompts,
        decoding=DecodingParams(strategy="sample", temperature=0.7, max_new_tokens=40, seed=100 + seed),
        log=lambda _: None,
    )
    sft, rloo = result["models"]["sft"], result["models"]["rloo"]
    gain = rloo["reward_mean"] - sft["reward_mean"]
    se = math.hypot(rloo["reward_se"], sft["reward_se"])
    kl = rloo["kl_from_reference"]
    filler = {name: sum(fx.has_filler(s[name]) for s in result["samples"]) / len(prompts) for name in ("sft", "rloo")}
    print(
        f"\nseed {seed}: reward sft {sft['reward_mean']:.2f}±{sft['reward_se']:.2f} -> rloo "
        f"{rloo['reward_mean']:.2f}±{rloo['reward_se']:.2f} (gain {gain:.2f}, se {se:.2f}); KL {kl:.2f} nats "
        f"(training log, per token {metrics['final']['kl']:.3f}); filler {filler['sft']:.2f} -> {filler['rloo']:.2f}"
    )
    assert gain > 2 * se
    assert 0 < kl < 5
    assert filler["rloo"] <= filler["sft"] - 0.2
    assert rloo["missing_eos_rate"] <= 0.05


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_interrupted_rloo_resumes_from_its_checkpoint_to_the_same_model(toy, tmp_path):
    import torch

    options = RLOOOptions(max_steps=6, per_device_train_batch_size=16, learning_rate=5e-4, logging_steps=1,
                          save_steps=2, save_total_limit=5, seed=4)
    args = (toy.sft_dir, toy.rm_dir, toy.train_prompts_path)

    first = train_rloo(*args, tmp_path / "a", options, tmp_path / "ckpt", log=lambda _: None, callbacks=[StopAt(2)])
    assert first["steps"] == 2 and first["resumed_from"] is None
    assert [p.name for p in (tmp_path / "ckpt").glob("checkpoint-*")] == ["checkpoint-2"]

    lines: list[str] = []
    resumed = train_rloo(*args, tmp_path / "b", options, tmp_path / "ckpt", log=lines.append)
    assert resumed["steps"] == 6 and resumed["resumed_from"] == "checkpoint-2"
    assert any("resuming from" in line and "checkpoint-2" in line for line in lines)
    assert [step for step, _ in resumed["reward_curve"]] == [1, 2, 3, 4, 5, 6]  # the history comes back too

    straight = train_rloo(*args, tmp_path / "c", options, tmp_path / "ckpt-straight", log=lambda _: None)
    assert straight["resumed_from"] is None
    # Same sampled answers after the resume (RNG states restored): the same rewards and the same weights.
    assert [v for _, v in resumed["reward_curve"]] == pytest.approx([v for _, v in straight["reward_curve"]], abs=1e-4)
    a, b = _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "resumed weights differ from an uninterrupted run"

    with pytest.raises(AlignError, match="other options"):
        train_rloo(*args, tmp_path / "d", options.model_copy(update={"beta": 0.5}), tmp_path / "ckpt", log=lambda _: None)


@pytest.mark.slow
def test_bad_inputs_are_refused_before_training(toy, tmp_path):
    from tasks.align.ppo import PPOError

    options = RLOOOptions(max_steps=1)
    with pytest.raises(AlignError, match="reward model folder"):
        train_rloo(toy.sft_dir, tmp_path / "no-rm", toy.train_prompts_path, tmp_path / "o", options, tmp_path / "c")
    blank = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"prompt": ["Describe the cat.", " "]}), blank)
    with pytest.raises(PPOError, match="row 1: field `prompt`"):
        train_rloo(toy.sft_dir, toy.rm_dir, blank, tmp_path / "o", options, tmp_path / "c")
    few = tmp_path / "few.parquet"
    pq.write_table(pa.table({"prompt": ["Describe the cat."]}), few)
    with pytest.raises(AlignError, match="fewer than"):
        train_rloo(toy.sft_dir, toy.rm_dir, few, tmp_path / "o", options, tmp_path / "c")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_lora_rloo_trains_adapters_and_saves_a_plain_model(toy, tmp_path):
    from transformers import AutoModelForCausalLM

    from tasks.align.config import LoraOptions

    options = RLOOOptions(max_steps=2, per_device_train_batch_size=16, learning_rate=1e-3, logging_steps=1,
                          lora=LoraOptions(enabled=True))
    metrics = train_rloo(toy.sft_dir, toy.rm_dir, toy.train_prompts_path, tmp_path / "rloo", options,
                         tmp_path / "ckpt", log=lambda _: None)
    assert metrics["steps"] == 2 and metrics["final"]["kl"] is not None  # reference = adapters off
    assert not (tmp_path / "rloo" / "adapter_config.json").exists()  # merged, loadable without peft
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "rloo").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(toy.sft_dir).state_dict()
    assert trained.keys() == sft.keys()
    changed = [k for k in sft if not (trained[k] == sft[k]).all()]
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
