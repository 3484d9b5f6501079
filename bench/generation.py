"""Generation throughput: local batching, and requests in flight against a latency-bound endpoint.

    OMP_NUM_THREADS=1 python bench/generation.py [--model PATH] [--prompts 32] [--new-tokens 32]

(1) LocalGenerator tokens/s with batch_size 16 vs one prompt at a time, on a tiny model built here
    (the project tokenizer trained on a few sentences + the "tiny" preset) or on --model.
(2) OpenAIGenerator throughput with 1 vs 16 requests in flight against server.py serving that model
    with --latency-ms added to every request (as a remote endpoint's network and queueing would).
(3) The self-instruct flow's fan-out: its `generate-shard` task on a local Dask cluster of 1 vs 2
    worker processes (prefect-dask), each worker holding --worker-in-flight requests in flight
    against the same latency-bound endpoint (a per-client rate limit, say). Requests/s as a ratio.
All three are printed as ratios. Greedy decoding with no stop, so every run generates the same tokens.
Takes about two minutes on two cores (part 3 starts two Dask clusters and the embedded Prefect).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.generation.local import LocalGenerator  # noqa: E402
from tasks.generation.openai_backend import OpenAIGenerator  # noqa: E402
from tasks.generation.params import DecodingParams  # noqa: E402
from tasks.generation.server import OpenAICompatServer  # noqa: E402

TEXTS = [
    "Write a short poem about the sea and the wind.",
    "Return the list of numbers sorted in ascending order.",
    "Classify the sentiment of the sentence as positive or negative.",
    "Summarize the paragraph in one sentence.",
    "Give three tips for staying healthy: eat well, sleep enough, and move every day.",
    "Translate the following sentence into French.",
]


def build_tiny_model(folder: Path) -> Path:
    from tasks.pretrain.model import build_model
    from tasks.pretrain.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=400, min_frequency=1)
    model = build_model("tiny", tokenizer, max_positions=256, seed=0)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def prompts(n: int) -> list[str]:
    return [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(n)]


def local_tokens_per_s(generator: LocalGenerator, batch: list[str], params: DecodingParams, batch_size: int) -> float:
    generator.batch_size = batch_size
    generator.complete(batch[:2], params)  # warm-up
    start = time.perf_counter()
    out = generator.complete(batch, params)
    elapsed = time.perf_counter() - start
    return sum(c.completion_tokens for c in out) / elapsed


def endpoint_requests_per_s(url: str, batch: list[str], params: DecodingParams, in_flight: int) -> float:
    client = OpenAIGenerator(url, model="bench", max_concurrency=in_flight, timeout_s=60)
    client.complete(batch[:2], params)  # warm-up
    start = time.perf_counter()
    out = client.complete(batch, params)
    elapsed = time.perf_counter() - start
    failed = sum(c.finish_reason == "error" for c in out)
    if failed:
        raise SystemExit(f"{failed} requests failed: {client.stats}")
    return len(out) / elapsed


def dask_requests_per_s(url: str, workers: int, shards: int, per_shard: int, tokens: int, in_flight: int) -> float:
    """Requests/s of self-instruct bootstrap shards on a local Dask cluster of `workers` processes."""
    from prefect import flow

    from tasks.generation.config import GeneratorConfig
    from tasks.runners import TaskRunnerConfig, task_runner
    from tasks.self_instruct.pipeline import SelfInstructConfig
    from tasks.self_instruct.steps import shard_step

    config = SelfInstructConfig(generator=GeneratorConfig(backend="openai", base_url=url, model="bench", max_concurrency=in_flight))
    decoding = DecodingParams(strategy="greedy", max_new_tokens=tokens).model_dump(mode="json")
    pool = TEXTS  # the ROUGE-L pool each shard scores its candidates against

    def submit(runner, number: int):
        requests = [{"request_idx": i, "prompt": text, "prompt_seed_ids": []} for i, text in enumerate(prompts(per_shard))]
        return runner.submit(shard_step, parameters={"config": config, "stage": "bootstrap", "index": 1, "shard": number,
                                                     "requests": requests, "decoding": decoding, "pool": pool})

    @flow(name="bench-dask-shards", log_prints=False)
    def measure() -> float:
        with task_runner(TaskRunnerConfig(runner="dask", workers=workers)) as runner:
            for future in [submit(runner, -n) for n in range(2 * workers)]:  # warm-up: imports, clients
                future.result()
            start = time.perf_counter()
            for future in [submit(runner, n) for n in range(shards)]:
                future.result()
            return time.perf_counter() - start

    return shards * per_shard / measure()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="an HF model folder (default: build a tiny one)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per measurement")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (local part)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="latency the server adds to every request")
    parser.add_argument("--endpoint-tokens", type=int, default=4, help="tokens per request (endpoint part)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    parser.add_argument("--shards", type=int, default=8, help="shards per Dask measurement (part 3)")
    parser.add_argument("--worker-in-flight", type=int, default=2, help="requests in flight per Dask worker (part 3)")
    parser.add_argument("--shard-latency-ms", type=float, default=250.0, help="latency the server adds per request (part 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        folder = args.model or build_tiny_model(Path(tmp) / "tiny")
        generator = LocalGenerator(folder, identity_name=str(folder), device=args.device)
        print(f"model: {folder} on {generator.device}")
        batch = prompts(args.prompts)

        params = DecodingParams(strategy="greedy", max_new_tokens=args.new_tokens)
        single = local_tokens_per_s(generator, batch, params, batch_size=1)
        batched = local_tokens_per_s(generator, batch, params, batch_size=16)
        print(f"(1) local, {args.prompts} prompts x {args.new_tokens} new tokens")
        print(f"    one prompt at a time: {single:8.1f} tokens/s")
        print(f"    batches of 16:        {batched:8.1f} tokens/s")
        print(f"    batched / one-at-a-time = {batched / single:.2f}x")

        generator.batch_size = 16
        server = OpenAICompatServer(generator, latency_s=args.latency_ms / 1000, model_name="bench")
        url = server.start()
        try:
            params = DecodingParams(strategy="greedy", max_new_tokens=args.endpoint_tokens)
            one = endpoint_requests_per_s(url, batch, params, in_flight=1)
            many = endpoint_requests_per_s(url, batch, params, in_flight=16)
        finally:
            server.stop()
        print(f"(2) endpoint at {url}, +{args.latency_ms:.0f} ms/request, {args.prompts} requests x {args.endpoint_tokens} tokens")
        print(f"    1 request in flight:   {one:8.1f} requests/s")
        print(f"    16 requests in flight: {many:8.1f} requests/s (server saw at most {server.stats['max_concurrent']})")
        print(f"    16 / 1 in flight = {many / one:.2f}x")

        server = OpenAICompatServer(generator, latency_s=args.shard_latency_ms / 1000, model_name="bench")
        url = server.start()
        try:
            rates = {n: dask_requests_per_s(url, n, args.shards, 8, args.endpoint_tokens, args.worker_in_flight) for n in (1, 2)}
        finally:
            server.stop()
        print(f"(3) self-instruct shards on Dask, {args.shards} shards x 8 requests, {args.worker_in_flight} in flight per worker, "
              f"+{args.shard_latency_ms:.0f} ms/request")
        print(f"    1 worker:  {rates[1]:8.1f} requests/s")
        print(f"    2 workers: {rates[2]:8.1f} requests/s")
        print(f"    2 / 1 workers = {rates[2] / rates[1]:.2f}x")
        generator.close()


if __name__ == "__main__":
    main()
