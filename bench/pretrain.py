"""Pretraining throughput: alignflow's loop against a bare Hugging Face Trainer on the same model and data.

    python bench/pretrain.py [--preset tiny] [--steps 60] [--seq-len 128] [--batch-size 16]

Prints training tokens/s of both, measured in this run, and their ratio. On a GPU it also prints
MFU: achieved FLOP/s (6 x parameters x tokens/s, plus attention) over the GPU's peak bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def corpus_texts(limit: int) -> list[str]:
    from tasks.pretrain.demo_corpus import iter_docstrings

    texts = []
    for text in iter_docstrings():
        texts.append(text)
        if len(texts) >= limit:
            break
    return texts


def bench_alignflow(model, stream, options, steps: int) -> float:
    from tasks.pretrain.training import pretrain

    with tempfile.TemporaryDirectory() as work:
        history = pretrain(model, stream, stream[:4096], options.model_copy(update={"max_steps": steps, "eval_every": 10**9, "checkpoint_every": 10**9}), Path(work), log=lambda _: None)
    return history["tokens_per_second"]


def bench_hf_trainer(model, stream, options, steps: int) -> float:
    import numpy as np
    import torch
    from transformers import Trainer, TrainingArguments

    from tasks.pretrain.training import batch_windows

    windows = np.concatenate([batch_windows(stream, options.seq_len, options.batch_size, options.seed, s) for s in range(steps)])
    data = [{"input_ids": torch.as_tensor(w[:-1], dtype=torch.long), "labels": torch.as_tensor(w[:-1], dtype=torch.long)} for w in windows]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=options.batch_size, max_steps=steps, learning_rate=options.learning_rate,
                                 report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                                 bf16=torch.cuda.is_available(), dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        began = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - began
    return steps * options.batch_size * options.seq_len / elapsed


def main() -> None:
    import torch

    from tasks.pretrain.model import build_model, count_parameters
    from tasks.pretrain.tokenizer import train_tokenizer
    from tasks.pretrain.training import TrainingOptions, tokenize_documents

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "mini", "small", "base"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    texts = corpus_texts(1500)
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    stream = tokenize_documents(texts, tokenizer)
    options = TrainingOptions(preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps, warmup_steps=1)
    on_gpu = torch.cuda.is_available()
    print(f"device: {'cuda ' + torch.cuda.get_device_name() if on_gpu else 'cpu'}, torch threads {torch.get_num_threads()}, "
          f"preset {args.preset}, seq_len {args.seq_len}, batch {args.batch_size}{' (x2 on GPU)' if on_gpu else ''}, {args.steps} steps")

    ours = bench_alignflow(build_model(args.preset, tokenizer, args.seq_len, seed=0), stream, options, args.steps)
    baseline = bench_hf_trainer(build_model(args.preset, tokenizer, args.seq_len, seed=0), stream, options, args.steps)
    params = count_parameters(build_model(args.preset, tokenizer, args.seq_len, seed=0))
    print(f"parameters: {params:,}")
    print(f"alignflow loop:        {ours:12,.0f} tokens/s")
    print(f"HF Trainer (baseline): {baseline:12,.0f} tokens/s")
    print(f"ratio alignflow/baseline: {ours / baseline:.2f}x")
    if on_gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        model = build_model(args.preset, tokenizer, args.seq_len, seed=0)
        cfg = model.config
        flops_per_token = 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq_len
        achieved = flops_per_token * ours
        print(f"achieved: {achieved / 1e12:.2f} TFLOP/s" + (f", MFU {achieved / peak:.1%} of {name} bf16 peak" if peak else " (unknown GPU peak)"))


if __name__ == "__main__":
    main()
