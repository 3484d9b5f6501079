"""Our PPO (tasks.align.ppo): options, the algorithm's pieces, reward reading, learning, exact resume, DDP.

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

import pytest
from pydantic import ValidationError

from tasks.align.ppo import (
    KLController,
    PPOError,
    PPOOptions,
    check_reward_reading,
    end_responses,
    gae,
    kl_penalty,
    masked_whiten,
    ppo_losses,
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


def test_options_count_updates_from_episodes_and_check_batches():
    assert PPOOptions().num_updates == 30
    assert PPOOptions(total_episodes=100, per_device_train_batch_size=32).num_updates == 4
    with pytest.raises(ValidationError, match="not both"):
        PPOOptions(total_updates=3, total_episodes=96)
    with pytest.raises(ValidationError, match="multiple of num_mini_batches"):
        PPOOptions(per_device_train_batch_size=30, num_mini_batches=4)
    with pytest.raises(ValidationError, match="multiple of gradient_accumulation_steps"):
        PPOOptions(per_device_train_batch_size=32, num_mini_batches=2, gradient_accumulation_steps=3)
    PPOOptions(per_device_train_batch_size=32, num_mini_batches=2, gradient_accumulation_steps=4)


def test_options_have_help_texts():
    for name, field in PPOOptions.model_fields.items():
        assert field.description, f"PPOOptions.{name} has no description"


def test_responses_end_after_their_first_eos():
    import torch

    eos, pad = 2, 0
    responses = torch.tensor([[5, eos, 7, 8], [5, 6, 7, 8], [5, pad, 7, eos], [eos, 6, eos, 8]])
    cut, valid, has_eos = end_responses(responses, eos, pad)
    assert cut.tolist() == [[5, eos, pad, pad], [5, 6, 7, 8], [5, pad, pad, pad], [eos, pad, pad, pad]]
    assert valid.sum(1).tolist() == [2, 4, 1, 1]  # the EOS is part of the answer, a pad is not
    assert has_eos.tolist() == [True, False, False, True]


def test_gae_matches_a_hand_computation_and_ignores_padding():
    import torch

    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.3, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0: deltas (0, 0, 0.5) from the end backwards; row 1 ends at t=1 (nothing to bootstrap from).
    expected = torch.tensor([[0.95 * 0.95 * 0.5, 0.95 * 0.5, 0.5], [0.1 + 0.95 * 0.7, 0.7, 0.0]])
    assert torch.allclose(advantages, expected)
    assert torch.allclose(returns, expected + values * mask)


def test_masked_whiten_uses_the_real_tokens_only():
    import torch

    x = torch.tensor([[1.0, 2.0, 50.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = masked_whiten(x, mask)
    real = out[mask.bool()]
    assert real.mean().abs() < 1e-6 and (real.var(unbiased=False) - 1).abs() < 1e-4
    assert (out[~mask.bool()] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert torch.allclose(kept.mean(), torch.tensor(2.5))


def test_policy_loss_is_clipped_only_where_it_would_gain():
    import torch

    options = PPOOptions(cliprange=0.2)
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), math.log(1.5), requires_grad=True)  # ratio 1.5, beyond 1 + 0.2
    mask = torch.ones(1, 2)
    values = torch.zeros(1, 2)
    for advantage, clipped in ((1.0, True), (-1.0, False)):
        adv = torch.full((1, 2), advantage)
        policy_loss, _, stats = ppo_losses(new, old, adv, values, values, values, mask, options)
        (grad,) = torch.autograd.grad(policy_loss, new)
        # A good action already 1.5x as likely earns nothing more; a bad one is still pushed down.
        assert (grad.abs().sum() == 0) == clipped
        assert policy_loss.item() == pytest.approx(-1.2 if clipped else 1.5)
        assert stats["clip_fraction"].item() == 1.0


def test_value_loss_is_clipped_around_the_rollout_values():
    import torch

    options = PPOOptions(cliprange_value=0.2)
    old_values = torch.zeros(1, 1)
    returns = torch.ones(1, 1)
    new_values = torch.full((1, 1), 0.5, requires_grad=True)
    zeros = torch.zeros(1, 1)
    _, value_loss, stats = ppo_losses(zeros, zeros, zeros, new_values, old_values, returns, torch.ones(1, 1), options)
    # max((0.5 - 1)^2, (0.2 - 1)^2) / 2: the clipped prediction is the pessimistic one here.
    assert value_loss.item() == pytest.approx(0.5 * 0.8**2)
    assert stats["value_clip_fraction"].item() == 1.0


def test_kl_estimators_and_the_adaptive_coefficient():
    import torch

    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    assert (kl_penalty(logp, ref, "k3") >= 0).all()

    fixed = KLController(PPOOptions(kl_coef=0.1))
    fixed.update(kl=100.0, responses=32)
    assert fixed.value == 0.1
    adaptive = KLController(PPOOptions(kl_coef=0.1, kl_control="adaptive", kl_target=1.0, kl_horizon=320))
    adaptive.update(kl=100.0, responses=32)  # far above target: +20% * 32/320 at most
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(kl=0.0, responses=32)
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)


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

    options = PPOOptions(total_updates=30, seed=seed, checkpoint_every=10)
    started = time.time()
    metrics = train_ppo(
        toy.sft_dir, toy.rm_dir, toy.train_prompts_path, tmp_path / "ppo", options, tmp_path / "ckpt", log=lambda _: None
    )
    ppo_seconds = time.time() - started

    assert len(metrics["updates"]) == 30 and metrics["resumed_from_step"] is None
    for row in metrics["updates"]:
        assert {"update", "score", "rm_score", "kl", "kl_coef", "response_length", "missing_eos_rate", "policy_loss",
                "value_loss", "clip_fraction", "entropy"} <= set(row)
        assert 0 < row["response_length"] <= options.response_length
    assert [row["update"] for row in metrics["updates"]] == list(range(1, 31))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["ppo-step-000020.pt", "ppo-step-000030.pt"]

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
        f"length {sft['response_length_mean']:.2f} -> {ppo['response_length_mean']:.2f}; PPO {ppo_seconds:.0f}s"
    )
    assert gain > 3 * se
    assert 0 < kl < 10
    # The independent metric, counted on the text: the filler the RM was taught to penalise.
    assert filler["ppo"] <= filler["sft"] - 0.2
    # Dropping the two filler tokens shortens the answers: length moves the same way, EOS stays.
    assert ppo["response_length_mean"] < sft["response_length_mean"] - 0.3
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

    options = {"total_updates": 10, "per_device_train_batch_size": 16, "checkpoint_every": 2, "seed": 5}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()

    # The interrupted run: SIGKILL as soon as its first checkpoint is complete.
    process = _start(toy, killed, options)
    deadline = time.time() + 300
    while not list((killed / "ckpt").glob("ppo-step-*.pt")):
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
    assert resumed_metrics["resumed_from_step"] in (2, 4, 6, 8)
    assert straight_metrics["resumed_from_step"] is None
    # The log history survives the kill, and the resumed updates are the same updates.
    assert resumed_metrics["updates"] == straight_metrics["updates"]

    a, b = _weights(straight / "policy"), _weights(killed / "policy")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), "policy weights differ after resume"
    # The value model, the optimizer and the RNGs are resumed too: the final checkpoints are identical.
    state_a = torch.load(straight / "ckpt" / "ppo-step-000010.pt", weights_only=False)["state"]
    state_b = torch.load(killed / "ckpt" / "ppo-step-000010.pt", weights_only=False)["state"]
    assert all(torch.equal(state_a["value"][k], state_b["value"][k]) for k in state_a["value"])
    assert torch.equal(state_a["rng"][0]["torch"], state_b["rng"][0]["torch"])
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


_DDP_RUNNER = """
import hashlib, json, sys
from pathlib import Path
from tasks.align.ppo import PPOOptions, PPORun, load_prompts
args = json.loads(sys.argv[1])
run = PPORun(Path(args["sft"]), Path(args["rm"]), load_prompts(Path(args["prompts"])), PPOOptions(**args["options"]),
             Path(args["ckpt"]), log=lambda line: print(line, flush=True))
metrics = run.train()
run.save_policy(Path(args["out"]))
# This process's own copy of the policy: DDP must have kept the copies identical.
weights = run.unwrapped.policy.state_dict()
digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
Path(args["folder"], f"rank{run.rank}.json").write_text(json.dumps({"metrics": metrics, "weights": digest}))
"""

@pytest.mark.slow
def test_two_processes_train_one_policy_through_accelerate(toy, tmp_path):
    """Two CPU processes (gloo): each samples its own prompts, the gradients are averaged (DDP)."""
    import torch

    options = {"total_updates": 2, "per_device_train_batch_size": 8, "checkpoint_every": 1, "seed": 3}
    args = {"sft": str(toy.sft_dir), "rm": str(toy.rm_dir), "prompts": str(toy.train_prompts_path),
            "out": str(tmp_path / "policy"), "ckpt": str(tmp_path / "ckpt"), "folder": str(tmp_path), "options": options}
    script = tmp_path / "runner.py"
    script.write_text(_DDP_RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), json.dumps(args)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["metrics"]["num_processes"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # Both processes log the same (all-reduced) metrics, one log line per update (from the main process).
    assert ranks[0]["metrics"]["updates"] == ranks[1]["metrics"]["updates"]
    assert ranks[0]["metrics"]["updates"][-1]["episode"] == 2 * 2 * 8
    assert done.stdout.count("PPO update 2/2") == 1
    state = torch.load(tmp_path / "ckpt" / "ppo-step-000002.pt", weights_only=False)["state"]
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    trained = _weights(tmp_path / "policy")
    sft = _weights(toy.sft_dir)
    assert any(not torch.equal(trained[k], sft[k]) for k in sft)
