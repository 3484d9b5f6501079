"""Device settings shared by every training stage, so the same code path runs on a GPU and on a CPU.

TRL's configs default to `bf16=True`, which fails on a machine without a GPU; `training_device_kwargs()`
returns the TrainingArguments fields that fit the machine it runs on:

    SFTConfig(output_dir=..., **training_device_kwargs())

`ALIGNFLOW_DEVICE=cpu` forces the CPU path on a GPU machine (useful to reproduce CPU results).
"""

from __future__ import annotations

import os
from typing import Any


def gpu_available() -> bool:
    """True when training should use CUDA: a GPU is visible and `ALIGNFLOW_DEVICE` does not say cpu."""
    import torch

    if os.environ.get("ALIGNFLOW_DEVICE", "").lower() == "cpu":
        return False
    return torch.cuda.is_available()


def torch_device() -> str:
    """The device to put models on outside a Trainer (evaluation, scoring, sampling)."""
    return "cuda" if gpu_available() else "cpu"


def training_device_kwargs() -> dict[str, Any]:
    """TrainingArguments fields for this machine: bf16 on a GPU that supports it, plain fp32 on a CPU."""
    import torch

    common: dict[str, Any] = {
        # No wandb/tensorboard: the flow streams logs itself through a callback.
        "report_to": "none",
        # Worker processes buy nothing for tiny in-memory datasets and break on 2-core machines.
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        # TRL turns activation (gradient) checkpointing on by default: it trades ~20% compute for memory,
        # a bad trade for the models this project trains, and on a CPU a pure loss. transformers 5
        # renamed the field; `gradient_checkpointing` is its deprecated alias.
        "activation_checkpointing": False,
    }
    if gpu_available():
        # Pre-Ampere GPUs have no bf16; fp32 is slower but always numerically safe, fp16 is not.
        return {**common, "bf16": torch.cuda.is_bf16_supported(), "fp16": False, "use_cpu": False}
    return {**common, "bf16": False, "fp16": False, "use_cpu": True}
