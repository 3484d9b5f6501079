"""The command line is generated from the flows' configs: flat options, stage prefixes, help texts."""

import argparse

import pytest

from flows.cli import add_model_arguments, build_parser, config_from_args, main
from flows.pipeline import PipelineConfig
from tasks.align.steps import AlignConfig
from tasks.self_instruct.pipeline import SelfInstructConfig


def parse(model, argv):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, model)
    return config_from_args(model, parser.parse_args(argv))


def test_nested_options_are_flat_and_shared_names_get_their_stage():
    config = parse(AlignConfig, ["--dataset", "d@2", "--sft-max-steps", "7", "--reward-max-steps", "9", "--judge", "llm",
                                 "--sft-lora-enabled", "--preferences-decoding-stop", "###", "END"])
    assert (config.dataset, config.sft.max_steps, config.reward.max_steps) == ("d@2", 7, 9)
    assert config.preferences.judge == "llm" and config.sft.lora.enabled is True
    assert config.preferences.decoding.stop == ["###", "END"]
    assert config.ppo == AlignConfig().ppo  # untouched options keep their defaults


def test_generator_options_follow_the_design():
    config = parse(SelfInstructConfig, ["--generator", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                        "--api-key-secret", "my-block"])
    assert config.generator.backend == "openai" and config.generator.model == "m"
    assert config.generator.api_key_secret == "my-block"


@pytest.mark.parametrize("command", ["pretrain", "self-instruct", "align", "pipeline", "dedup"])
def test_every_option_has_a_help_text(command):
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in subparsers.choices[command]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip(), f"{command} {action.option_strings} has no help"


def test_pipeline_options_build_without_ambiguity():
    config = parse(PipelineConfig, ["--pretrain-training-max-steps", "50", "--num-instructions", "3"])
    assert config.pretrain.training.max_steps == 50 and config.self_instruct.num_instructions == 3


def test_invalid_value_is_refused_with_the_field_name(capsys):
    assert main(["self-instruct", "--rouge-threshold", "1.5"]) == 2
    assert capsys.readouterr().err == "alignflow self-instruct: --rouge-threshold: must be <= 1.0, got 1.5\n"


def test_every_invalid_option_gets_one_line_naming_it_and_no_traceback(capsys):
    assert main(["align", "--sft-max-steps", "-5", "--reward-max-steps", "0", "--preferences-decoding-temperature", "-1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "alignflow align: --sft-max-steps: must be >= 1, got -5",
        "alignflow align: --preferences-decoding-temperature: must be >= 0.0, got -1.0",
        "alignflow align: --reward-max-steps: must be >= 1, got 0",
    ]


def test_dedup_runs_without_importing_the_flows(tmp_path):
    """`alignflow dedup` goes straight to the ROUGE-L filter: no torch, transformers or Prefect at start-up."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq

    source = tmp_path / "instructions.jsonl"
    source.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in
                              ["Write a poem about the sea.", "Write a poem about the sea!", "List three prime numbers."]))
    output = tmp_path / "kept.parquet"
    script = ("import sys; from flows.cli import main; "
              f"rc = main(['dedup', '--input', {str(source)!r}, '--column', 'instruction', '--output', {str(output)!r}, '--no-progress']); "
              "print(rc, sorted(m for m in ('torch', 'transformers', 'prefect') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"
    assert pq.read_table(output).column("instruction").to_pylist() == ["Write a poem about the sea.", "List three prime numbers."]
