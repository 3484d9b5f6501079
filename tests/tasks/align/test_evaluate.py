"""Evaluation of base / SFT / PPO models (tasks.align.evaluate) on tiny models built from scratch.

    OMP_NUM_THREADS=1 pytest tests/tasks/align/test_evaluate.py
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.align.evaluate import EvaluationError, evaluate_models, judge_win_rate, write_eval_tables
from tasks.generation.params import DecodingParams


def _load_fixtures_module():
    name = "align_ppo_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("ppo_fixtures.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fx = _load_fixtures_module()

MODEL_KEYS = {
    "reward_mean", "reward_se", "response_length_mean", "response_length_se", "missing_eos_rate", "perplexity",
    "kl_from_reference", "kl_se", "win_rate_rm", "win_rate_llm", "rm_comparison", "llm_comparison",
    "rouge_l_mean", "rouge_l_se", "reward_gain", "reward_gain_se", "rouge_l_gain", "rouge_l_gain_se",
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Base, SFT and RM folders (built once per session, shared with test_ppo)."""
    return fx.build_align_fixtures(tmp_path_factory.getbasetemp() / "align-ppo-fixtures")


@pytest.fixture(scope="module")
def sft_copy(toy, tmp_path_factory) -> Path:
    """The SFT model under another name: a model whose KL from SFT must be zero."""
    folder = tmp_path_factory.mktemp("sft-copy")
    shutil.copytree(toy.sft_dir, folder, dirs_exist_ok=True)
    return folder


def _filler_judge(prompt: str, a: str, b: str) -> str:
    """A stand-in LLM judge: prefers the answer without the filler."""
    a_bad, b_bad = fx.has_filler(a), fx.has_filler(b)
    return "tie" if a_bad == b_bad else ("B" if a_bad else "A")


# --------------------------------------------------------------------------------------------- fast


def test_judge_win_rate_swaps_positions():
    prompts = ["p1", "p2", "p3", "p4"]
    ours = ["good", "good", "um bad", "same"]
    theirs = ["um bad", "um bad", "good", "same"]
    counts = judge_win_rate(_filler_judge, prompts, ours, theirs)
    assert counts == {"wins": 2, "losses": 1, "ties": 1, "inconsistent": 0, "win_rate": 2.5 / 4}

    def first_position(prompt, a, b):  # pure position bias: always "A"
        return "A"

    biased = judge_win_rate(first_position, prompts, ours, theirs)
    assert biased["wins"] == biased["losses"] == 0 and biased["inconsistent"] == 4 and biased["win_rate"] == 0.5

    with pytest.raises(EvaluationError, match="prompt 0: the judge answered 'maybe'"):
        judge_win_rate(lambda p, a, b: "maybe", prompts, ours, theirs)


# --------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_evaluation_metrics_samples_and_tables(toy, sft_copy, tmp_path):
    prompts = toy.held_out_prompts
    result = evaluate_models(
        {"base": toy.base_dir, "sft": toy.sft_dir, "ppo": sft_copy},
        toy.rm_dir,
        prompts,
        references=toy.held_out_references,
        decoding=DecodingParams(strategy="sample", temperature=0.7, max_new_tokens=40, seed=3),
        reference_model="sft",
        judge=_filler_judge,
        log=lambda _: None,
    )
    models = result["models"]
    assert set(models) == {"base", "sft", "ppo"}
    for name, row in models.items():
        assert set(row) == MODEL_KEYS, name
        assert row["reward_se"] > 0 and row["response_length_mean"] > 0
    assert models["sft"]["kl_from_reference"] is None and models["sft"]["win_rate_rm"] is None

    # The same weights under another name: KL 0, and with the same seed the very same answers (all ties).
    assert models["ppo"]["kl_from_reference"] == pytest.approx(0.0, abs=1e-6)
    assert models["ppo"]["rm_comparison"] == {"wins": 0, "losses": 0, "ties": len(prompts), "win_rate": 0.5}
    assert models["ppo"]["llm_comparison"]["win_rate"] == 0.5
    assert models["ppo"]["reward_mean"] == pytest.approx(models["sft"]["reward_mean"])
    # Paired differences of identical answers: zero, with zero standard error.
    assert models["ppo"]["reward_gain"] == pytest.approx(0.0, abs=1e-6) and models["ppo"]["reward_gain_se"] == pytest.approx(0.0, abs=1e-6)
    assert models["ppo"]["rouge_l_gain"] == 0.0 and models["sft"]["reward_gain"] is None
    assert models["sft"]["rouge_l_mean"] > models["base"]["rouge_l_mean"]
    # A random-init base is far from SFT and cannot predict the held-out references.
    assert models["base"]["kl_from_reference"] > 10
    assert models["sft"]["perplexity"] < 2 < 50 < models["base"]["perplexity"]
    assert models["base"]["missing_eos_rate"] > models["sft"]["missing_eos_rate"]

    samples = result["samples"]
    assert len(samples) == len(prompts)
    assert [s["prompt"] for s in samples] == prompts
    assert all(s["sft"] == s["ppo"] for s in samples)
    assert all(isinstance(s[name], str) and isinstance(s[f"{name}_reward"], float) for s in samples for name in models)

    paths = write_eval_tables(result, tmp_path / "tables")
    metrics = pq.read_table(paths["metrics"]).to_pylist()
    assert [row["model"] for row in metrics] == ["base", "sft", "ppo"]
    assert {"reward_mean", "reward_se", "kl_from_reference", "win_rate_rm", "win_rate_llm", "perplexity", "rm_wins"} <= set(
        metrics[0]
    )
    table = pq.read_table(paths["samples"])
    assert table.num_rows == len(prompts)
    assert {"prompt", "reference", "base", "sft", "ppo", "base_reward", "sft_reward", "ppo_reward"} <= set(
        table.column_names
    )
    assert not list((tmp_path / "tables").glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.slow
def test_greedy_decoding_is_deterministic_and_kl_of_a_model_from_itself_is_zero(toy, sft_copy):
    kwargs = dict(
        models={"sft": toy.sft_dir, "copy": sft_copy},
        reward_dir=toy.rm_dir,
        prompts=toy.held_out_prompts[:8],
        decoding=DecodingParams(strategy="greedy", max_new_tokens=20, seed=0),
        log=lambda _: None,
    )
    first = evaluate_models(**kwargs)
    second = evaluate_models(**{**kwargs, "decoding": DecodingParams(strategy="greedy", max_new_tokens=20, seed=9)})
    assert first["kl_temperature"] == 1.0
    assert first["models"]["copy"]["kl_from_reference"] == pytest.approx(0.0, abs=1e-6)
    assert [s["sft"] for s in first["samples"]] == [s["sft"] for s in second["samples"]]


@pytest.mark.slow
def test_bad_input_is_refused_before_any_work(toy, tmp_path):
    with pytest.raises(EvaluationError, match="reference_model 'sft' is not among the models"):
        evaluate_models({"ppo": toy.sft_dir}, toy.rm_dir, ["p"], log=lambda _: None)
    with pytest.raises(EvaluationError, match="2 references for 1 prompts"):
        evaluate_models({"sft": toy.sft_dir}, toy.rm_dir, ["p"], references=["a", "b"], log=lambda _: None)
    with pytest.raises(EvaluationError, match="no model folder for 'ppo'"):
        evaluate_models({"sft": toy.sft_dir, "ppo": tmp_path / "nothing"}, toy.rm_dir, ["p"], log=lambda _: None)
    with pytest.raises(EvaluationError, match=r"prompts\[1\]"):
        evaluate_models({"sft": toy.sft_dir}, toy.rm_dir, ["p", ""], log=lambda _: None)
