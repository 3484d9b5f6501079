"""PPO speed: our PPO (tasks/align/ppo.py) against TRL 1.12's PPOTrainer, same models, data and settings.

    OMP_NUM_THREADS=1 python bench/ppo.py [--updates 20] [--batch-size 32] [--checkpoint-every 5]

Both sides train the same tiny SFT policy against the same tiny reward model (built here with
tests/tasks/align/ppo_fixtures.py, ~10 s) on the same prompts with the same PPOOptions, one after
the other on one torch thread:

- ours: `train_ppo` in this process;
- TRL 1.12: the project's former wrapper around TRL 1.12's experimental PPOTrainer (tasks/align/ppo.py
  as it was before our PPO replaced it, read from git history), run as a subprocess in a side
  virtual environment with trl==1.12.0 that this script creates once in bench/out/trl112-venv
  (`python3.11 -m venv` + pip; the same torch, transformers and accelerate versions as ours).

Prints for ours: rollout tokens/s (sampled response tokens per second of generation), training
tokens/s (tokens through forward + backward per second of PPO epochs), the share of time spent
in generation, and the time of one checkpoint; then seconds per update (checkpoints excluded) and
per checkpoint of both, as ratios TRL 1.12 / ours (> 1: ours is faster). Never asserts times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"
TRL_VENV = OUT / "trl112-venv"

# What the side environment runs: the former wrapper, with its checkpoint writes timed.
TRL_SIDE = r"""
import importlib.util, json, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("trl112_ppo", sys.argv[1])
old = importlib.util.module_from_spec(spec)
sys.modules["trl112_ppo"] = old
spec.loader.exec_module(old)
args = json.loads(sys.argv[2])
saves = []
original_save = old.CheckpointStore.save
def timed_save(self, *a, **k):
    began = time.perf_counter()
    try:
        return original_save(self, *a, **k)
    finally:
        saves.append(time.perf_counter() - began)
old.CheckpointStore.save = timed_save
import trl
metrics = old.train_ppo(Path(args["sft"]), Path(args["rm"]), Path(args["prompts"]), Path(args["out"]),
                        old.PPOOptions(**args["options"]), Path(args["ckpt"]), log=lambda _: None)
print(json.dumps({"runtime_s": metrics["runtime_s"], "checkpoint_s": saves, "trl": trl.__version__,
                  "final_score": metrics["final"]["score"]}))
"""


def build_fixtures(folder: Path, preset: str):
    import importlib.util

    name = "align_ppo_fixtures"
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "tasks" / "align" / "ppo_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.build_align_fixtures(folder, preset=preset)


def legacy_wrapper(folder: Path) -> Path:
    """The last version of tasks/align/ppo.py that wrapped TRL's PPOTrainer, from git history."""
    path = folder / "trl112_ppo.py"
    commits = subprocess.run(["git", "log", "--format=%H", "--", "tasks/align/ppo.py"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    for commit in commits:
        text = subprocess.run(["git", "show", f"{commit}:tasks/align/ppo.py"], cwd=REPO,
                              capture_output=True, text=True).stdout
        if "PPOTrainer(" in text:
            path.write_text(text)
            return path
    raise SystemExit("no TRL-based tasks/align/ppo.py in this repository's history")


def trl_python() -> Path:
    """The side environment's python, created once (a few minutes, mostly downloads)."""
    python = TRL_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import trl; assert trl.__version__ == '1.12.0'"]).returncode == 0:
        return python
    import accelerate
    import torch
    import transformers

    print(f"creating {TRL_VENV} (trl==1.12.0) ...", flush=True)
    subprocess.run(["python3.11", "-m", "venv", str(TRL_VENV)], check=True)
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"accelerate=={accelerate.__version__}"]
    subprocess.run([str(python), "-m", "pip", "install", "-q", "trl==1.12.0", *pins, "datasets", "pyarrow", "pydantic",
                    "numpy"], check=True)
    return python


def run_ours(fixtures, options: dict, folder: Path) -> dict:
    from tasks.align.ppo import PPOOptions, train_ppo

    metrics = train_ppo(fixtures.sft_dir, fixtures.rm_dir, fixtures.train_prompts_path, folder / "policy",
                        PPOOptions(**options), folder / "ckpt", log=lambda _: None)
    return metrics


def run_trl112(fixtures, options: dict, folder: Path) -> dict:
    args = {"sft": str(fixtures.sft_dir), "rm": str(fixtures.rm_dir), "prompts": str(fixtures.train_prompts_path),
            "out": str(folder / "policy"), "ckpt": str(folder / "ckpt"), "options": options}
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run([str(trl_python()), "-c", TRL_SIDE, str(legacy_wrapper(folder)), json.dumps(args)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the TRL 1.12 run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--preset", default="tiny", help="model size (tasks.pretrain.model presets; the demo's is mini)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    options = {"total_updates": args.updates, "per_device_train_batch_size": args.batch_size,
               "checkpoint_every": args.checkpoint_every, "seed": 0}
    trl_python()  # before any timing: the first call may create the side environment
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fixtures = build_fixtures(tmp / "fixtures", args.preset)
        (tmp / "ours").mkdir()
        (tmp / "trl").mkdir()
        began = time.perf_counter()
        ours = run_ours(fixtures, options, tmp / "ours")
        ours_wall = time.perf_counter() - began
        theirs = run_trl112(fixtures, options, tmp / "trl")

    timing, n = ours["timing"], args.updates
    ours_ckpt = timing["checkpoint_s"] / max(timing["checkpoints"], 1)
    ours_update = (ours["runtime_s"] - timing["checkpoint_s"]) / n
    theirs_ckpt = sum(theirs["checkpoint_s"]) / max(len(theirs["checkpoint_s"]), 1)
    theirs_update = (theirs["runtime_s"] - sum(theirs["checkpoint_s"])) / n
    print(f"{n} PPO updates of {args.batch_size} prompts, response_length 40, 2 minibatches x 4 epochs, "
          f"{args.preset} Llama (ppo_fixtures), CPU, {os.environ['OMP_NUM_THREADS']} thread(s)")
    print(f"ours: rollout {timing['rollout_tokens'] / timing['generation_s']:8,.0f} tokens/s "
          f"({timing['rollout_tokens']:,} sampled tokens in {timing['generation_s']:.2f} s of generation)")
    print(f"ours: training {timing['training_tokens'] / timing['training_s']:7,.0f} tokens/s "
          f"({timing['training_tokens']:,} tokens through forward + backward in {timing['training_s']:.2f} s)")
    print(f"ours: time in generation {timing['generation_s'] / ours['runtime_s']:.0%}, scoring "
          f"{timing['scoring_s'] / ours['runtime_s']:.0%}, PPO epochs {timing['training_s'] / ours['runtime_s']:.0%}, "
          f"checkpoints {timing['checkpoint_s'] / ours['runtime_s']:.0%} (of {ours['runtime_s']:.1f} s; "
          f"{ours_wall:.1f} s with model loading)")
    print(f"per update:     ours {ours_update:.3f} s, TRL {theirs['trl']} {theirs_update:.3f} s "
          f"-> ratio TRL/ours {theirs_update / ours_update:.2f}x")
    ours_write = timing["checkpoint_write_s"] / max(timing["checkpoints"], 1)
    print(f"per checkpoint: ours {ours_ckpt * 1000:.1f} ms of training time (the write, {ours_write * 1000:.1f} ms, "
          f"runs in the background), TRL-based {theirs_ckpt * 1000:.1f} ms -> ratio {theirs_ckpt / ours_ckpt:.1f}x; "
          f"write alone {theirs_ckpt / ours_write:.1f}x")
    print(f"final training score: ours {ours['final']['score']:.2f}, TRL {theirs['final_score']:.2f}")


if __name__ == "__main__":
    main()
