"""Run a training stage as a Python module under a launcher: plain, `accelerate launch`, or `torchrun`.

A Prefect task calls `launch_module` with the run logger: every line the processes print (from all
ranks, stdout and stderr) goes to the run log as it comes, and a non-zero exit code raises
`LaunchError`, so the task run fails with the tail of the output in its message.

    options = LaunchOptions(launcher="accelerate", num_processes=2)
    launch_module("tasks.align.sft_main", ["--model-dir", ...], options, log=run_logger().info)

DeepSpeed and FSDP settings pass through an accelerate config YAML (`config_file`, as written by
`accelerate config`), given to `accelerate launch --config_file`. Anything else the launcher takes
(`--main_process_ip`, `--nnodes`, `--rdzv-endpoint`, ...) goes in `extra_args`.

On a machine without a GPU the processes train on the CPU and talk through gloo. Note that
`accelerate launch --cpu --num_processes N` starts a single process unless MPI is set up, so for
N > 1 local processes this module uses accelerate's `--multi_gpu` launcher (torch.distributed.run
underneath) and tells the processes to stay on the CPU through the environment.
"""

from __future__ import annotations

import collections
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, Field

from storage.errors import AlignflowError

Log = Callable[[str], None]
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 20
# Seconds a process group gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 10.0


class LaunchOptions(BaseModel):
    """How a training stage is started: in one process, or in N processes by a distributed launcher."""

    launcher: Literal["none", "accelerate", "torchrun"] = Field(
        "none",
        description="none: one plain Python process; accelerate: `accelerate launch`; torchrun: "
        "`torch.distributed.run`. The last two start num_processes processes that train together (DDP, "
        "or DeepSpeed/FSDP from the accelerate config file).",
    )
    num_processes: int = Field(
        1, ge=1, description="Processes to start on this machine, usually one per GPU (with launcher 'none': 1)."
    )
    config_file: str | None = Field(
        None,
        description="An accelerate config YAML (from `accelerate config`), passed as `--config_file`: this is "
        "how DeepSpeed and FSDP settings pass through. accelerate only.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="More launcher arguments, put before the module, e.g. ['--main_process_ip', '10.0.0.1', "
        "'--num_machines', '2', '--machine_rank', '0'] or torchrun's ['--nnodes', '2', '--rdzv-endpoint', 'host:29400'].",
    )
    cpu: bool | None = Field(
        None,
        description="Train on the CPU (gloo between processes) even when a GPU is visible; empty: the CPU when "
        "no GPU is visible.",
    )


class LaunchError(AlignflowError, RuntimeError):
    """The launched module exited with a non-zero code; the message carries the end of its output."""

    def __init__(self, module: str, returncode: int, tail: list[str]):
        self.module, self.returncode, self.tail = module, returncode, tail
        shown = "\n".join(tail) if tail else "(no output)"
        super().__init__(f"{module} exited with code {returncode}; last {len(tail)} lines of output:\n{shown}")


def use_cpu(options: LaunchOptions) -> bool:
    if options.cpu is not None:
        return options.cpu
    from tasks.align.devices import gpu_available

    return not gpu_available()


def _port_given(args: list[str]) -> bool:
    keys = ("--main_process_port", "--main-process-port", "--master_port", "--master-port", "--rdzv_endpoint",
            "--rdzv-endpoint", "--nnodes", "--num_machines", "--num-machines")
    return any(arg.split("=", 1)[0] in keys for arg in args)


def build_command(module: str, args: list[str], options: LaunchOptions, cpu: bool) -> list[str]:
    """The argv that starts `python -m module args` under the chosen launcher."""
    python = sys.executable
    if options.config_file is not None and options.launcher != "accelerate":
        raise ValueError(f"launch: config_file is an accelerate config; it needs launcher 'accelerate', not {options.launcher!r}")
    if options.launcher == "none":
        if options.num_processes != 1:
            raise ValueError(f"launch: launcher 'none' runs one process; num_processes={options.num_processes} "
                             "needs launcher 'accelerate' or 'torchrun'")
        return [python, "-m", module, *options.extra_args, *args]

    n = str(options.num_processes)
    if options.launcher == "torchrun":
        command = [python, "-m", "torch.distributed.run", "--nproc_per_node", n]
        if not _port_given(options.extra_args):
            # A free rendezvous port on this machine: two launches side by side must not collide on 29500.
            command.append("--standalone")
        return [*command, *options.extra_args, "-m", module, *args]

    command = [python, "-m", "accelerate.commands.launch", "--num_processes", n]
    if options.config_file is not None:
        config = Path(options.config_file)
        if not config.is_file():
            raise ValueError(f"launch: accelerate config file {config} does not exist")
        # The config file decides the distributed type (DDP, DeepSpeed, FSDP) and the machine layout.
        command += ["--config_file", str(config)]
    else:
        if options.num_processes > 1:
            # `--cpu` with N > 1 would start one process (accelerate wants MPI for multi-CPU); the
            # `--multi_gpu` launcher starts N local processes and they pick gloo on the CPU.
            command.append("--multi_gpu")
        elif cpu:
            command.append("--cpu")
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if not _port_given(options.extra_args):
            command += ["--main_process_port", "0"]  # 0: accelerate picks a free port
    return [*command, *options.extra_args, "-m", module, *args]


def child_env(options: LaunchOptions, cpu: bool, env: dict[str, str] | None) -> dict[str, str]:
    """The current environment plus `env`, with unbuffered output and the project importable."""
    merged = dict(os.environ)
    merged.update(env or {})
    merged["PYTHONUNBUFFERED"] = "1"  # lines must reach the run log as they are printed
    merged.setdefault("PYTHONIOENCODING", "utf-8")
    path = merged.get("PYTHONPATH")
    merged["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + path if path else "")
    if cpu:
        merged["ALIGNFLOW_DEVICE"] = "cpu"
        merged["ACCELERATE_USE_CPU"] = "true"
    return merged


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def _stop_group(process: subprocess.Popen) -> None:
    """Terminate the child's whole process group (the launcher and its workers), then kill it."""
    for sig, wait in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch_module(
    module: str,
    args: list[str],
    options: LaunchOptions,
    log: Log,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> None:
    """Run `python -m module args` under `options.launcher`; stream its output into `log` line by line.

    `env` adds to (or overrides) the current environment. Raises `LaunchError` when the exit code is
    not 0. If this call is interrupted (KeyboardInterrupt, a task timeout, ...), the launched
    process group is terminated; if this process dies, the launcher gets SIGTERM.
    """
    cpu = use_cpu(options)
    command = build_command(module, args, options, cpu)
    log(f"launch: {shlex.join(command)}")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env(options, cpu, env),
        cwd=cwd,
        text=True,  # universal newlines: a progress bar's \r updates arrive as separate lines
        encoding="utf-8",
        errors="replace",
        bufsize=1,
        start_new_session=True,  # its own process group, so the launcher and every worker can be stopped at once
        preexec_fn=_die_with_parent,
    )
    # The reader runs in a thread so that this thread stays interruptible while the child is quiet.
    failure: list[BaseException] = []

    def pump() -> None:
        try:
            assert process.stdout is not None
            for raw in iter(process.stdout.readline, ""):
                line = raw.rstrip("\n")
                if line.strip():
                    tail.append(line)
                    log(line)
        except BaseException as exc:  # a failing log handler must not leave the pipe full and the child blocked
            failure.append(exc)
            for _ in iter(process.stdout.readline, ""):
                pass

    reader = threading.Thread(target=pump, name=f"launch-{module}", daemon=True)
    try:
        reader.start()
        while True:
            try:
                # Short waits keep this thread responsive to KeyboardInterrupt and task timeouts.
                returncode = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
        reader.join(timeout=TERMINATE_GRACE_S)
        if reader.is_alive():
            # A stray process of the group still holds the pipe open after the launcher exited.
            log(f"launch: {module} exited with code {returncode}; stopping processes it left behind")
            _kill_group(process)
            reader.join(timeout=TERMINATE_GRACE_S)
    except BaseException:
        _stop_group(process)
        raise
    finally:
        if process.stdout is not None and not reader.is_alive():
            process.stdout.close()
    if failure:
        raise failure[0]
    if returncode != 0:
        raise LaunchError(module, returncode, list(tail))
