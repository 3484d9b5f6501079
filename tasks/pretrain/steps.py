"""The pretrain flow's steps as Prefect tasks, and the config the flow takes.

Each step registers what it makes and returns refs and small dicts; the next step reads from the
registry. A step whose exact inputs were already registered reuses that version (matched by a
fingerprint in the manifest), so a re-run with the same parameters redoes no finished work, and
the training step resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel, Field, field_validator

from storage import atomic
from storage.registry import Registry, fingerprint
from tasks.generation.config import resolve_local_model
from tasks.pretrain.cleaning import CleaningConfig, clean_corpus, require_nonempty
from tasks.pretrain.corpus import read_corpus
from tasks.pretrain.training import TrainingOptions
from tasks.publish import markdown_image, plot_curves, publish_markdown, publish_table, run_logger

MIN_CONTEXT = 1024


class PretrainConfig(BaseModel):
    """Everything the pretrain flow needs: where the text is, how to clean it, what to train."""

    corpus: list[str] = Field(default_factory=list, description="Corpus files or globs: .txt/.md (blank-line separated), .jsonl/.json (a text field), .parquet (a text column). Empty: the built-in demo corpus.")
    text_field: str = Field("text", min_length=1, description="The JSONL/JSON field or Parquet column holding the text.")
    demo_documents: int = Field(200, ge=10, description="With the demo corpus: how many standard-library docstrings to take.")
    demo_world_tasks: int = Field(3000, ge=0, description="With the demo corpus: how many tasks of the demo task world (tasks.self_instruct.demo_world) to show in the self-instruct formats.")
    language: Literal["en", "ko"] = Field("en", description="With the demo corpus: the language of its task world and seed documents.")
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig, description="Cleaning rules and thresholds.")
    training: TrainingOptions = Field(default_factory=TrainingOptions, description="Tokenizer, model and training settings.")
    dataset_name: str = Field("corpus-clean", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Registry name of the cleaned corpus.")
    model_name: str = Field("base", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Registry name of the pretrained model.")

    @field_validator("corpus")
    @classmethod
    def _no_blank_sources(cls, value: list[str]) -> list[str]:
        for i, source in enumerate(value):
            if not source.strip():
                raise ValueError(f"corpus[{i}] is blank")
        return value


def demo_corpus_file(registry: Registry, documents: int, world_tasks: int = 0, language: str = "en") -> Path:
    """The demo corpus (stdlib docstrings + the demo task world in the self-instruct formats), built once per registry root."""
    from tasks.pretrain.demo_corpus import build_demo_corpus
    from tasks.self_instruct.demo_documents import seed_documents
    from tasks.self_instruct.demo_world import world_tasks as world
    from tasks.self_instruct.seeds import demo_seed_path, load_seed_tasks

    path = registry.local_dir("demo") / f"corpus-{language}-{documents}-{world_tasks}.jsonl"
    if not path.exists():
        extra = seed_documents(load_seed_tasks(demo_seed_path(language)), language, copies=5)
        if world_tasks:
            extra += seed_documents(world(language, world_tasks), language, copies=1)
        build_demo_corpus(path, max_documents=documents, extra_documents=extra)
    return path


@task(name="clean-corpus")
def prepare_corpus(config: PretrainConfig) -> dict:
    """Read, clean and register the corpus; returns its ref and the cleaning funnel."""
    logger = run_logger()
    registry = Registry()
    sources = config.corpus or [str(demo_corpus_file(registry, config.demo_documents, config.demo_world_tasks, config.language))]
    documents = read_corpus(sources, text_field=config.text_field)
    result = require_nonempty(clean_corpus(documents, config.cleaning), sources)
    funnel = result.funnel_dict()
    publish_table("pretrain-cleaning-funnel", [{"step": k, "count": v} for k, v in funnel.items()],
                  "Documents in, removed by each cleaning rule, PII replacements, and documents out.")
    table = pa.table({"text": result.texts})
    key = fingerprint(config.cleaning.model_dump(mode="json"), result.texts)
    existing = registry.find("dataset", config.dataset_name, key)
    if existing:
        logger.info(f"cleaned corpus unchanged: reusing {existing.ref}")
        return {"ref": existing.ref, "funnel": funnel}
    with registry.new_version("dataset", config.dataset_name, config=config) as draft:
        atomic.write_parquet(draft.path / "corpus.parquet", table)
        draft.extra.update(fingerprint=key, funnel=funnel, sources=sources)
        draft.metrics["documents"] = table.num_rows
    logger.info(f"registered cleaned corpus {draft.ref}: {funnel}")
    return {"ref": draft.ref, "funnel": funnel}


def _split_corpus(registry: Registry, corpus_ref: str, options: TrainingOptions) -> tuple[list[str], list[str]]:
    from tasks.pretrain.training import split_holdout

    texts = pq.read_table(registry.resolve("dataset", corpus_ref).file("corpus.parquet"))["text"].to_pylist()
    return split_holdout(texts, options.holdout_fraction, options.seed)


@task(name="train-tokenizer")
def train_tokenizer_step(corpus_ref: str, options: TrainingOptions, model_name: str) -> str:
    """Train (or reuse) the BPE tokenizer on the training split; registered as `<model>-tokenizer`."""
    from transformers import AutoTokenizer

    from tasks.pretrain.tokenizer import train_tokenizer

    registry = Registry()
    name = f"{model_name}-tokenizer"
    if options.init_from:
        source = resolve_local_model(options.init_from, registry)[0]
        tokenizer = AutoTokenizer.from_pretrained(source)
        key = fingerprint("from", str(source))
    else:
        key = fingerprint(corpus_ref, options.vocab_size, options.holdout_fraction, options.seed)
        tokenizer = None
    existing = registry.find("model", name, key)
    if existing:
        return existing.ref
    if tokenizer is None:
        train_texts, _ = _split_corpus(registry, corpus_ref, options)
        tokenizer = train_tokenizer(train_texts, vocab_size=options.vocab_size)
    with registry.new_version("model", name, config=options, parents=[f"dataset:{corpus_ref}"]) as draft:
        tokenizer.save_pretrained(draft.path)
        draft.extra["fingerprint"] = key
        draft.metrics["vocab_size"] = len(tokenizer)
    run_logger().info(f"registered tokenizer {draft.ref} ({len(tokenizer)} tokens)")
    return draft.ref


@task(name="pretrain-model")
def pretrain_step(corpus_ref: str, tokenizer_ref: str, options: TrainingOptions) -> dict:
    """Train the base model; checkpoints live in a work folder keyed by the exact inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.pretrain.model import build_model, count_parameters
    from tasks.pretrain.training import pretrain, tokenize_documents

    logger = run_logger()
    registry = Registry()
    tokenizer = AutoTokenizer.from_pretrained(registry.resolve("model", tokenizer_ref).path)
    work = registry.work_dir("pretrain", fingerprint(corpus_ref, tokenizer_ref, options.model_dump(mode="json")))
    train_texts, heldout_texts = _split_corpus(registry, corpus_ref, options)
    if options.init_from:
        model = AutoModelForCausalLM.from_pretrained(resolve_local_model(options.init_from, registry)[0])
    else:
        # RoPE has no position table, so the context can exceed the training window; the
        # self-instruct prompts (8 listed tasks, few-shot instance examples) need ~1k tokens.
        model = build_model(options.preset, tokenizer, max_positions=max(options.seq_len, MIN_CONTEXT), seed=options.seed)
    logger.info(f"model: {options.preset if not options.init_from else options.init_from}, {count_parameters(model):,} parameters; work folder {work}")
    history = pretrain(
        model,
        tokenize_documents(train_texts, tokenizer),
        tokenize_documents(heldout_texts, tokenizer),
        options,
        checkpoint_dir=work,
        log=logger.info,
    )
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    atomic.write_json(work / "history.json", history)
    return {"model_dir": str(final), "history_path": str(work / "history.json"), "parameters": count_parameters(model)}


@task(name="register-model")
def register_model_step(trained: dict, corpus_ref: str, tokenizer_ref: str, config: PretrainConfig) -> str:
    """Register the trained model with its lineage, metrics and loss curve, and publish artifacts."""
    import math

    registry = Registry()
    history = json.loads(Path(trained["history_path"]).read_text())
    initial, final = history["heldout"][0][1], history["heldout"][-1][1]
    metrics = {
        "heldout_loss_before": initial,
        "heldout_loss": final,
        "perplexity": math.exp(final),
        "perplexity_before": math.exp(initial),
        "parameters": trained["parameters"],
        "tokens_per_second": history.get("tokens_per_second"),
        "steps": config.training.max_steps,
        "device": history.get("device"),
    }
    curve = plot_curves(
        {"train": history["train"], "held-out": history["heldout"]},
        title=f"{config.model_name}: next-token loss", xlabel="step", ylabel="loss (nats/token)",
    )
    parents = [f"model:{tokenizer_ref}", f"dataset:{corpus_ref}"]
    with registry.new_version("model", config.model_name, config=config, parents=parents) as draft:
        for item in Path(trained["model_dir"]).iterdir():
            shutil.copy2(item, draft.path / item.name)
        atomic.write_bytes(draft.path / "loss_curve.png", curve)
        atomic.write_json(draft.path / "training_history.json", history)
        draft.metrics.update(metrics)
    publish_markdown(
        "pretrain-loss-curve",
        f"# {draft.ref}\n\nHeld-out perplexity **{metrics['perplexity']:.2f}** "
        f"(before training {metrics['perplexity_before']:.1f}).\n\n{markdown_image(curve, 'loss curve')}\n",
        "Training and held-out loss of the pretrained model.",
    )
    publish_table("pretrain-metrics", [{"metric": k, "value": v} for k, v in metrics.items()], f"Metrics of {draft.ref}.")
    return draft.ref
