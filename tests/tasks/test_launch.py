"""The stage launcher: output streamed line by line, exit codes become errors, children never outlive
the caller, and SFT trained by 2 CPU processes (gloo) under `accelerate launch` is registered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.launch import LaunchError, LaunchOptions, build_command, launch_module

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def write_module(folder: Path, name: str, source: str) -> dict[str, str]:
    """A module `name` in `folder`; returns the env that makes it importable by the child."""
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return {"PYTHONPATH": str(folder)}


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# ---------------------------------------------------------------- streaming and exit codes


def test_lines_reach_the_log_while_the_process_still_runs(tmp_path):
    """The child blocks until the parent's log has seen its first line: buffering to the end would hang it."""
    go = tmp_path / "go"
    env = write_module(tmp_path, "handshake", f"""
        import sys, time
        from pathlib import Path
        print("waiting for the go-ahead")
        print("a line on stderr", file=sys.stderr)
        deadline = time.monotonic() + 60
        while not Path({str(go)!r}).exists():
            if time.monotonic() > deadline:
                print("no go-ahead: the parent never saw my first line")
                sys.exit(3)
            time.sleep(0.05)
        print("got the go-ahead")
    """)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line == "waiting for the go-ahead":
            go.touch()

    launch_module("handshake", [], LaunchOptions(), log, env=env)
    assert lines[0].startswith("launch: ") and "-m handshake" in lines[0]
    # stderr is merged into the same stream, in the order the child wrote (its output is unbuffered).
    assert lines[1:] == ["waiting for the go-ahead", "a line on stderr", "got the go-ahead"]


def test_a_failing_module_raises_with_its_exit_code_and_the_tail_of_its_output(tmp_path):
    env = write_module(tmp_path, "failing", """
        import sys
        for i in range(1, 31):
            print(f"line {i}")
        print("boom: something broke", file=sys.stderr)
        sys.exit(7)
    """)
    lines: list[str] = []
    with pytest.raises(LaunchError) as caught:
        launch_module("failing", ["--some", "arg"], LaunchOptions(), lines.append, env=env)
    error = caught.value
    assert error.returncode == 7 and error.module == "failing"
    assert error.tail[-1] == "boom: something broke" and len(error.tail) == 20
    assert error.tail[:-1] == [f"line {i}" for i in range(12, 31)]
    assert "failing exited with code 7" in str(error) and "boom: something broke" in str(error)
    # Every line was streamed too, not only the tail.
    assert [f"line {i}" for i in range(1, 31)] == [line for line in lines if line.startswith("line ")]


def test_processes_left_behind_holding_the_output_are_stopped(tmp_path, monkeypatch):
    import tasks.launch

    monkeypatch.setattr(tasks.launch, "TERMINATE_GRACE_S", 1.0)
    pid_file = tmp_path / "stray.pid"
    env = write_module(tmp_path, "leaves_a_stray", f"""
        import subprocess, sys, time
        from pathlib import Path
        # A grandchild that inherits the output pipe and outlives its parent.
        stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        Path({str(pid_file)!r}).write_text(str(stray.pid))
        print("parent done")
    """)
    lines: list[str] = []
    try:
        launch_module("leaves_a_stray", [], LaunchOptions(), lines.append, env=env)
        assert "parent done" in lines
        assert any("stopping processes it left behind" in line for line in lines)
        assert wait_until(lambda: not alive(int(pid_file.read_text())), timeout=15)
    finally:
        if pid_file.exists() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_module_arguments_reach_the_module_unchanged(tmp_path):
    env = write_module(tmp_path, "echo_args", """
        import json, sys
        print(json.dumps(sys.argv[1:]))
    """)
    lines: list[str] = []
    args = ["--options-json", '{"a": [1, 2], "b": "x y"}', "--path", "/a b/c"]
    launch_module("echo_args", args, LaunchOptions(), lines.append, env=env)
    assert json.loads(lines[-1]) == args


def test_bad_launch_options_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="launcher 'none' runs one process"):
        build_command("m", [], LaunchOptions(num_processes=2), cpu=True)
    with pytest.raises(ValueError, match="needs launcher 'accelerate'"):
        build_command("m", [], LaunchOptions(launcher="torchrun", config_file="ds.yaml"), cpu=True)
    with pytest.raises(ValueError, match="does not exist"):
        build_command("m", [], LaunchOptions(launcher="accelerate", config_file=str(tmp_path / "nope.yaml")), cpu=True)


def test_an_accelerate_config_file_is_passed_through(tmp_path):
    config = tmp_path / "deepspeed.yaml"
    config.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n")
    options = LaunchOptions(launcher="accelerate", num_processes=4, config_file=str(config), extra_args=["--main_process_port", "29555"])
    command = build_command("tasks.align.sft_main", ["--x", "1"], options, cpu=False)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--config_file") + 1] == str(config)
    assert command[command.index("--num_processes") + 1] == "4"
    # The config file decides the distributed type; the launcher arguments come before the module.
    assert "--multi_gpu" not in command and "--cpu" not in command
    assert command[-4:] == ["-m", "tasks.align.sft_main", "--x", "1"]
    assert command.index("--main_process_port") < command.index("tasks.align.sft_main")


def test_torchrun_starts_the_requested_number_of_ranks(tmp_path):
    # One write per line: both ranks share one pipe, and print() writes the newline separately.
    env = write_module(tmp_path, "show_rank", """
        import os, sys
        sys.stdout.write(f"rank={os.environ['RANK']} world={os.environ['WORLD_SIZE']} device={os.environ.get('ALIGNFLOW_DEVICE')}\\n")
        sys.stdout.flush()
    """)
    lines: list[str] = []
    launch_module("show_rank", [], LaunchOptions(launcher="torchrun", num_processes=2, cpu=True), lines.append, env=env)
    ranks = sorted(line for line in lines if line.startswith("rank="))
    assert ranks == ["rank=0 world=2 device=cpu", "rank=1 world=2 device=cpu"]


def test_in_a_prefect_task_output_goes_to_the_run_logs_and_the_exit_code_sets_the_state(tmp_path):
    from prefect import flow, get_run_logger, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    env = write_module(tmp_path, "stage", """
        import sys
        print(f"stage says {sys.argv[1]}")
        sys.exit(int(sys.argv[2]))
    """)

    @task
    def run_stage(word: str, code: int) -> None:
        launch_module("stage", [word, str(code)], LaunchOptions(), get_run_logger().info, env=env)

    @flow
    def two_stages() -> None:
        run_stage("hello-from-the-child", 0)
        run_stage("goodbye-from-the-child", 5)

    state = two_stages(return_state=True)
    assert state.is_failed()
    APILogWorker.drain_all(timeout=10)  # logs are shipped in the background
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = [run for run in client.read_task_runs() if run.flow_run_id == run_id]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    by_task: dict = {}
    for entry in logs:
        by_task.setdefault(entry.task_run_id, []).append(entry.message)
    [ok] = [run for run in task_runs if run.state.is_completed()]
    [failed] = [run for run in task_runs if run.state.is_failed()]
    # Each child's line is in its own task run's log; the exit code 5 is the failed run's message.
    assert "stage says hello-from-the-child" in by_task[ok.id]
    assert "stage says goodbye-from-the-child" in by_task[failed.id]
    assert "stage says goodbye-from-the-child" not in by_task[ok.id]
    assert "LaunchError: stage exited with code 5" in failed.state.message


# ---------------------------------------------------------------- the child never outlives the caller


SLEEPER = """
    import os, sys, time
    from pathlib import Path
    Path(sys.argv[1]).write_text(str(os.getpid()))
    print("sleeping", flush=True)
    time.sleep(120)
"""

CALLER = """
    import sys
    from pathlib import Path
    from tasks.launch import LaunchOptions, launch_module

    try:
        launch_module("sleeper", [sys.argv[1]], LaunchOptions(), lambda line: None, env={{"PYTHONPATH": {folder!r}}})
    except KeyboardInterrupt:
        # Still alive here, so only launch_module's own cleanup can have stopped the sleeper.
        pid = int(Path(sys.argv[1]).read_text())
        gone = not Path(f"/proc/{{pid}}").exists()
        print("sleeper gone" if gone else "sleeper still running", flush=True)
        raise
"""


@pytest.fixture
def caller(tmp_path):
    """Start a Python process that launches the sleeper module; yields (caller, sleeper pid).

    Whatever the test's outcome, neither process is left running.
    """
    write_module(tmp_path, "sleeper", SLEEPER)
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(CALLER.format(folder=str(tmp_path))))
    pid_file = tmp_path / "sleeper.pid"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen([sys.executable, str(script), str(pid_file)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sleeper = None
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != ""), "the sleeper never started"
        sleeper = int(pid_file.read_text())
        yield process, sleeper
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if sleeper is not None and alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def test_interrupting_the_caller_stops_the_launched_process(caller):
    caller, sleeper = caller
    assert alive(sleeper)
    caller.send_signal(signal.SIGINT)  # KeyboardInterrupt inside launch_module
    stdout, stderr = caller.communicate(timeout=30)
    assert caller.returncode != 0 and b"KeyboardInterrupt" in stderr
    # launch_module stopped and reaped the child before the KeyboardInterrupt left it.
    assert stdout.decode().strip() == "sleeper gone"
    assert wait_until(lambda: not alive(sleeper), timeout=15), "the launched process outlived an interrupted caller"


def test_killing_the_caller_stops_the_launched_process(caller):
    caller, sleeper = caller
    caller.kill()  # SIGKILL: no Python cleanup runs; the child's parent-death signal must do it
    caller.wait(timeout=30)
    assert wait_until(lambda: not alive(sleeper), timeout=15), "the launched process outlived a killed caller"


# ---------------------------------------------------------------- SFT with 2 CPU processes


WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "candle", "forest",
         "bridge", "pencil", "mirror", "basket", "rocket", "island", "ladder", "button"]


def tiny_instruction_rows() -> list[dict[str, str]]:
    rows = [{"prompt": f"Repeat the word twice: {w}", "completion": f"{w} {w}"} for w in WORDS]
    rows += [{"prompt": f"Say hello to {w}.", "completion": f"Hello, {w}!"} for w in WORDS]
    return rows


@pytest.fixture
def registered_inputs(registry_root) -> dict[str, object]:
    """A tiny instruction dataset and a random-init tiny base model, both registered."""
    from storage.registry import Registry
    from tasks.pretrain.model import build_model
    from tasks.pretrain.tokenizer import train_tokenizer

    registry = Registry()
    rows = tiny_instruction_rows()
    with registry.new_version("dataset", "tiny-instructions") as draft:
        # Every 4th row held out: the same templates, other words.
        pq.write_table(pa.Table.from_pylist([r for i, r in enumerate(rows) if i % 4]), draft.path / "train.parquet")
        pq.write_table(pa.Table.from_pylist([r for i, r in enumerate(rows) if not i % 4]), draft.path / "eval.parquet")
    with registry.new_version("model", "base") as base_draft:
        tokenizer = train_tokenizer([f"{r['prompt']}\n{r['completion']}" for r in rows], vocab_size=300, min_frequency=1)
        model = build_model("tiny", tokenizer, max_positions=128, seed=0)
        tokenizer.save_pretrained(base_draft.path)
        model.save_pretrained(base_draft.path)
    return {"registry": registry, "data": registry.resolve("dataset", draft.ref), "base": registry.resolve("model", base_draft.ref)}


@pytest.mark.slow
def test_sft_through_accelerate_with_two_cpu_processes_is_registered(registered_inputs):
    from transformers import AutoModelForCausalLM

    from tasks.align.config import SFTOptions
    from tasks.align.sft_main import train_sft_launched

    registry, data, base = registered_inputs["registry"], registered_inputs["data"], registered_inputs["base"]
    options = SFTOptions(max_steps=20, learning_rate=3e-3, per_device_train_batch_size=4, logging_steps=5, eval_steps=10)
    launch = LaunchOptions(launcher="accelerate", num_processes=2, cpu=True)
    checkpoints = registry.work_dir("align-test", "sft-2proc")
    lines: list[str] = []
    with registry.new_version("model", "sft", config=options, parents=[f"model:{base.ref}", f"dataset:{data.ref}"]) as draft:
        metrics = train_sft_launched(
            base.path, data.path / "train.parquet", data.path / "eval.parquet", draft.path, options, checkpoints,
            launch, log=lines.append,
        )
        draft.metrics.update(eval_loss_before=metrics["eval_loss_before"], eval_loss_after=metrics["eval_loss_after"])

    log = "\n".join(lines)
    # Two ranks ran, trained together over gloo, and each streamed its lines into our log.
    assert "--multi_gpu" in lines[0] and "--num_processes 2" in lines[0]
    for rank in (0, 1):
        assert f"[rank {rank}/2] sft_main: rank {rank} of 2 processes" in log
        assert f"[rank {rank}/2] sft_main: distributed MULTI_CPU backend=gloo" in log
        assert f"[rank {rank}/2] sft step 20/20" in log
    assert metrics["world_size"] == 2 and metrics["steps"] == 20
    # 20 steps x 4 examples x 2 ranks: each rank took its own share of every batch.
    epochs = [float(part.split("=")[1]) for line in lines if "[rank 0/2] sft step 20/20: loss=" in line
              for part in line.split() if part.startswith("epoch=")]
    assert epochs == [pytest.approx(20 * 4 * 2 / 24, rel=1e-3)]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5

    version = registry.resolve("model", "sft")
    assert version.ref == draft.ref == "sft@1"
    assert version.manifest.parents == [f"model:{base.ref}", f"dataset:{data.ref}"]
    assert version.manifest.metrics["eval_loss_after"] == metrics["eval_loss_after"]
    assert "model.safetensors" in version.manifest.files and "tokenizer.json" in version.manifest.files
    model = AutoModelForCausalLM.from_pretrained(str(version.path))
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(str(base.path)).config.vocab_size
    # Only rank 0 wrote the model: the other rank's scratch output is gone.
    assert not list(checkpoints.glob(".sft-output-rank*"))


@pytest.mark.slow
def test_a_failing_rank_fails_the_launch(registered_inputs, tmp_path):
    from tasks.align.config import SFTOptions
    from tasks.align.sft_main import train_sft_launched

    base = registered_inputs["base"]
    lines: list[str] = []
    with pytest.raises(LaunchError) as caught:
        train_sft_launched(
            base.path, tmp_path / "missing.parquet", tmp_path / "missing.parquet", tmp_path / "out",
            SFTOptions(max_steps=2), tmp_path / "ckpt", LaunchOptions(launcher="accelerate", num_processes=2, cpu=True),
            log=lines.append,
        )
    assert caught.value.returncode != 0
    assert "missing.parquet: no such file or folder" in "\n".join(lines)
    assert not (tmp_path / "out").exists()
