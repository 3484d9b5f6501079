"""SFT throughput: alignflow's `train_sft` against a bare TRL script on the same model and data.

    python bench/train.py [--steps 60] [--batch-size 8]

Both runs train the same freshly built model for the same number of steps on the same
prompt/completion rows, in this process, one after the other. alignflow's run includes what it
adds around TRL (held-out loss before and after, checkpoints, log streaming, NaN guard); the
ratio shows what that costs. Prints tokens/s of both and the ratio alignflow / bare.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def make_data(folder: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = "apple river stone cloud garden window candle forest bridge pencil mirror basket rocket island".split()
    rows = [{"prompt": f"Repeat the word {n} times: {w}", "completion": " ".join([w] * n)} for w in words for n in range(1, 9)]
    train, held_out = rows[: len(rows) - 16], rows[len(rows) - 16 :]
    pq.write_table(pa.Table.from_pylist(train), folder / "train.parquet")
    pq.write_table(pa.Table.from_pylist(held_out), folder / "eval.parquet")
    return folder / "train.parquet", folder / "eval.parquet"


def make_model(folder: Path, texts: list[str]) -> Path:
    from tasks.pretrain.model import build_model
    from tasks.pretrain.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=600, min_frequency=1)
    build_model("mini", tokenizer, max_positions=512, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bare_trl(model_dir: Path, train_path: Path, steps: int, batch_size: int, out: Path) -> float:
    """The script a user would write with TRL alone; returns seconds of trainer.train()."""
    import pyarrow.parquet as pq
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = pq.read_table(train_path).to_pylist()
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=2e-3, report_to="none",
                     save_strategy="no", logging_steps=10**6, disable_tqdm=True, use_cpu=True, bf16=False, seed=0, max_length=512)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    began = time.perf_counter()
    trainer.train()
    return time.perf_counter() - began


def main() -> None:
    import pyarrow.parquet as pq

    from tasks.align.config import SFTOptions
    from tasks.align.sft import train_sft

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_path, eval_path = make_data(tmp)
        texts = [r["prompt"] + " " + r["completion"] for r in pq.read_table(train_path).to_pylist()] * 4
        model_dir = make_model(tmp / "model", texts)

        options = SFTOptions(max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=2e-3,
                             save_steps=max(1, args.steps // 2), logging_steps=10)
        began = time.perf_counter()
        metrics = train_sft(model_dir, train_path, eval_path, tmp / "ours", options, tmp / "ours-checkpoints", log=lambda _: None)
        ours_total = time.perf_counter() - began
        ours_train = metrics["train_runtime_s"]
        tokens = metrics["train_tokens"]
        bare = bare_trl(model_dir, train_path, args.steps, args.batch_size, tmp / "bare")

    print(f"{args.steps} steps, batch {args.batch_size}, {tokens:,} training tokens (mini preset, CPU)")
    print(f"bare TRL script:            {tokens / bare:10,.0f} tokens/s ({bare:.1f} s)")
    print(f"alignflow train_sft (train):{tokens / ours_train:10,.0f} tokens/s ({ours_train:.1f} s)")
    print(f"alignflow train_sft (all):  {tokens / ours_total:10,.0f} tokens/s ({ours_total:.1f} s, with held-out loss x2 and checkpoints)")
    print(f"ratio alignflow/bare, training loop: {bare / ours_train:.2f}x; whole stage: {bare / ours_total:.2f}x")


if __name__ == "__main__":
    main()
