"""SFT as a process entry point, so it can run under `accelerate launch` or `torchrun` with N processes.

    python -m tasks.align.sft_main --model-dir BASE --train train.parquet --eval eval.parquet \\
        --output OUT --checkpoint-dir CKPT --options-json '{"max_steps": 20}' --metrics-out metrics.json

From Python (a Prefect task), `train_sft_launched` builds that command, runs it through
`tasks.launch.launch_module` (output streamed to `log`) and returns the metrics.

Every rank runs `train_sft`; the Trainer reads the distributed environment the launcher set
(RANK, WORLD_SIZE, ...) and trains with DDP, or DeepSpeed/FSDP from the accelerate config. Only
rank 0 writes the model to `--output` and the metrics file; the other ranks save theirs to a
scratch folder that is deleted, so no two processes write the same file.

Limits: the model is saved with `save_pretrained` on the unwrapped model, which is right when every
rank holds the full weights (DDP, DeepSpeed ZeRO-1/2) but not with sharded weights (FSDP full
sharding, ZeRO-3), where `train_sft` would need `trainer.save_model`. The held-out loss before and
after training is measured by every rank on the whole held-out set (the same number on each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tasks.align.config import SFTOptions
from tasks.launch import LaunchOptions, Log, launch_module

MODULE = "tasks.align.sft_main"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="Supervised fine-tuning (one rank of it).")
    parser.add_argument("--model-dir", required=True, help="HF folder of the base model and its tokenizer.")
    parser.add_argument("--train", required=True, help="Parquet file (or folder) of training prompt/completion data.")
    parser.add_argument("--eval", required=True, help="Parquet file (or folder) of validation data (early stopping).")
    parser.add_argument("--test", default=None, help="Parquet file (or folder) of test data, only reported.")
    parser.add_argument("--output", required=True, help="Folder the fine-tuned model is saved to (by rank 0).")
    parser.add_argument("--checkpoint-dir", required=True, help="Folder for resumable checkpoints (shared by all ranks).")
    parser.add_argument("--options-json", default="{}", help="SFTOptions as JSON; missing fields take their defaults.")
    parser.add_argument("--metrics-out", required=True, help="JSON file the metrics are written to (by rank 0).")
    return parser.parse_args(argv)


def rank_info() -> tuple[int, int, int]:
    """(global rank, world size, local rank) from the launcher's environment; (0, 1, 0) without one."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = SFTOptions.model_validate_json(args.options_json)
    except ValueError as exc:
        raise SystemExit(f"sft_main: --options-json is not valid SFTOptions: {exc}") from exc
    rank, world, local_rank = rank_info()

    def log(message: str) -> None:
        # One write per line: the ranks share one pipe, and print() would write the newline separately.
        sys.stdout.write(f"[rank {rank}/{world}] {message}\n")
        sys.stdout.flush()

    from tasks.align.devices import gpu_available

    gpu = gpu_available()
    if gpu and world > 1:
        import torch

        # train_sft puts the model on "cuda" before the Trainer takes it; make that this rank's GPU.
        torch.cuda.set_device(local_rank)
    log(f"sft_main: rank {rank} of {world} processes (local rank {local_rank}, {'GPU' if gpu else 'CPU'})")

    checkpoint_dir = Path(args.checkpoint_dir)
    if world > 1:
        from accelerate import PartialState

        from tasks.align.sft import guard_checkpoint_dir

        # The same device choice the Trainer makes (use_cpu from training_device_kwargs), so its
        # later state setup agrees with this one. Rank 0 writes the checkpoint folder's options
        # record before the others read it.
        state = PartialState(cpu=not gpu)
        with state.main_process_first():
            guard_checkpoint_dir(checkpoint_dir, "sft", options)
        log(f"sft_main: distributed {state.distributed_type.value} backend={state.backend}")

    from tasks.align.sft import train_sft

    scratch = None
    output_dir = Path(args.output)
    if rank != 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f".sft-output-rank{rank}-", dir=checkpoint_dir)
        output_dir = Path(scratch)
    try:
        metrics = train_sft(
            Path(args.model_dir), Path(args.train), Path(args.eval), output_dir, options, checkpoint_dir, log=log,
            test_path=Path(args.test) if args.test else None,
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if rank == 0:
        from storage.atomic import write_json

        write_json(Path(args.metrics_out), {**metrics, "world_size": world})
        log(f"sft_main: wrote {args.output} and {args.metrics_out}")
    return 0


def command_args(
    model_dir: Path,
    train_path: Path,
    eval_path: Path,
    output_dir: Path,
    options: SFTOptions,
    checkpoint_dir: Path,
    metrics_out: Path,
) -> list[str]:
    """The arguments of `python -m tasks.align.sft_main` for these inputs."""
    return [
        "--model-dir", str(model_dir),
        "--train", str(train_path),
        "--eval", str(eval_path),
        "--output", str(output_dir),
        "--checkpoint-dir", str(checkpoint_dir),
        "--options-json", options.model_dump_json(),
        "--metrics-out", str(metrics_out),
    ]


def train_sft_launched(
    model_dir: Path,
    train_path: Path,
    eval_path: Path,
    output_dir: Path,
    options: SFTOptions,
    checkpoint_dir: Path,
    launch: LaunchOptions,
    log: Log,
    env: dict[str, str] | None = None,
    test_path: Path | None = None,
) -> dict[str, Any]:
    """`train_sft` in processes started by `launch`; returns its metrics (plus world_size).

    Raises `tasks.launch.LaunchError` when any rank fails.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    metrics_out = checkpoint_dir / "sft-metrics.json"
    metrics_out.unlink(missing_ok=True)  # never return an earlier run's numbers
    args = command_args(model_dir, train_path, eval_path, output_dir, options, checkpoint_dir, metrics_out)
    if test_path is not None:
        args += ["--test", str(test_path)]
    launch_module(MODULE, args, launch, log, env=env)
    return json.loads(metrics_out.read_text())


if __name__ == "__main__":
    sys.exit(main())
