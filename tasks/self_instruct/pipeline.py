"""The Self-Instruct pipeline as plain, resumable functions over a work folder.

Stages, each checkpointed after every batch of requests as an append-only Parquet part:

1. bootstrap: prompts of 8 instructions (6 seed + 2 machine, shuffled) -> numbered continuations ->
   the paper's filters -> ROUGE-L novelty against seeds and every kept instruction;
2. classify: a few-shot yes/no prompt per kept machine instruction;
3. instances: output-first prompts for classification tasks, input-first otherwise -> parsed
   input/output pairs -> the instance filters.

A batch's randomness is a function of (seed, batch index) alone: the prompt sampling RNG and the
generator's sampling seed. A part is written first and the state (`state.json`) second, both
atomically; on resume, parts beyond the state's batch are ignored. A run killed at any point and
started again therefore produces exactly the dataset an uninterrupted run produces.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from storage import atomic
from tasks.generation.config import GeneratorConfig
from tasks.generation.params import DecodingParams, Generator
from tasks.self_instruct.filters import INSTANCE_REASONS, INSTRUCTION_REASONS, filter_instances, filter_instruction
from tasks.self_instruct.parsing import parse_classification, parse_instances, parse_instructions
from tasks.self_instruct.prompts import (
    render_bootstrap_prompt,
    render_classification_prompt,
    render_instance_prompt,
    sample_prompt_instructions,
    stop_sequences,
)
from tasks.self_instruct.seeds import SeedTask

STATE = "state.json"
# The first line(s) of the expected continuation, appended to instance prompts and put back in
# front of the completion before parsing. A prefill like this costs a strong model nothing and
# keeps a small one from wandering off the format after "Task: ...".
INSTANCE_PRIMERS = {
    ("en", False): "\nExample 1\nInput:", ("en", True): "\nClass label:",
    ("ko", False): "\n예시 1\n입력:", ("ko", True): "\n클래스 레이블:",
}
PROMPT_INSTRUCTIONS = 8  # the paper's prompts hold 8 numbered instructions; the model continues at 9


class SelfInstructConfig(BaseModel):
    """Seed tasks in, a filtered instruction dataset out."""

    seeds: str | None = Field(None, description="Seed tasks: Self-Instruct JSONL, Alpaca JSON, or Parquet/JSONL with instruction,input,output. Empty: the built-in demo seeds of the language.")
    language: Literal["en", "ko"] = Field("en", description="Prompt templates and filter rules: en follows the paper; ko uses Korean templates, a punctuation-only first-character rule and the unicode ROUGE tokenizer.")
    num_instructions: int = Field(200, ge=1, le=1_000_000, description="Stop once this many machine instructions are kept.")
    max_requests: int = Field(0, ge=0, description="Stop after this many bootstrap requests even when fewer instructions were kept; 0 means 2 x num_instructions.")
    requests_per_batch: int = Field(16, ge=1, le=4096, description="Bootstrap prompts per batch: one checkpoint and one Prefect task run per batch.")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="Which model generates: the pretrained model (local) or an OpenAI-compatible endpoint.")
    bootstrap_decoding: DecodingParams = Field(
        default_factory=lambda: DecodingParams(strategy="sample", temperature=0.7, top_p=0.5, max_new_tokens=256),
        description="Decoding of the instruction continuations (the paper: temperature 0.7, top_p 0.5).")
    instance_decoding: DecodingParams = Field(
        default_factory=lambda: DecodingParams(strategy="sample", temperature=0.7, top_p=0.9, max_new_tokens=256),
        description="Decoding of instances. The paper decodes greedily with GPT-3; small models loop under greedy decoding, so the default samples. Classification answers are always greedy.")
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="Reject an instruction whose ROUGE-L F with any seed or kept instruction is above this.")
    max_instances: int = Field(5, ge=1, le=100, description="Most instances kept per task.")
    seed: int = Field(0, ge=0, description="Seed of prompt sampling and generation.")
    dataset_name: str = Field("self-instruct", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Registry name of the resulting dataset.")

    @property
    def request_limit(self) -> int:
        return self.max_requests or 2 * self.num_instructions

    @property
    def rouge_tokenizer(self) -> str:
        return "rouge" if self.language == "en" else "unicode"


# ---- state -------------------------------------------------------------------------------------


def load_state(work: Path) -> dict[str, Any]:
    path = work / STATE
    if path.exists():
        return json.loads(path.read_text())
    return {"stage": "bootstrap", "batches": {"bootstrap": 0, "classify": 0, "instances": 0}, "requests": 0, "kept": 0}


def save_state(work: Path, state: dict[str, Any]) -> None:
    atomic.write_json(work / STATE, state)


def part_path(work: Path, stage: str, index: int) -> Path:
    return work / "parts" / f"{stage}-{index:05d}.parquet"


def read_parts(work: Path, stage: str, upto: int) -> pa.Table | None:
    """The parts of a stage that the state acknowledges (1..upto), concatenated in order."""
    tables = [pq.read_table(part_path(work, stage, i)) for i in range(1, upto + 1)]
    return pa.concat_tables(tables) if tables else None


def kept_machine_instructions(work: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    table = read_parts(work, "bootstrap", state["batches"]["bootstrap"])
    if table is None:
        return []
    return [row for row in table.to_pylist() if row["kept"]]


# ---- stage 1: bootstrap ------------------------------------------------------------------------


def make_filter(config: SelfInstructConfig, seeds: list[SeedTask], work: Path, state: dict[str, Any]):
    """The ROUGE-L engine with the seeds as references and every kept instruction so far."""
    from tasks.rouge.engine import RougeLFilter

    engine = RougeLFilter(threshold=config.rouge_threshold, tokenizer=config.rouge_tokenizer)
    engine.add_references([s.instruction for s in seeds])
    kept = [row["candidate"] for row in kept_machine_instructions(work, state)]
    if kept:
        # Re-offering the kept instructions in order rebuilds the pool exactly (each was novel then).
        engine.offer(kept)
    return engine


# work folder -> (acknowledged bootstrap batch, engine): rebuilding the pool every batch would cost
# as much as the whole filter. An entry is taken out while a batch runs, so a failed batch never
# leaves a half-updated engine behind.
_ENGINES: dict[str, tuple[int, Any]] = {}


def bootstrap_batch(config: SelfInstructConfig, seeds: list[SeedTask], generator: Generator, work: Path) -> dict[str, Any]:
    """Run the next bootstrap batch, write its part and advance the state. Returns the new state."""
    state = load_state(work)
    index = state["batches"]["bootstrap"] + 1
    cached = _ENGINES.pop(str(work), None)
    engine = cached[1] if cached and cached[0] == index - 1 else make_filter(config, seeds, work, state)
    kept_pool = [row["candidate"] for row in kept_machine_instructions(work, state)]
    rng = random.Random(f"{config.seed}-bootstrap-{index}")
    seed_by_text = {s.instruction: s.id for s in seeds}
    n_requests = min(config.requests_per_batch, config.request_limit - state["requests"])
    prompts, prompt_ids = [], []
    for _ in range(n_requests):
        chosen = sample_prompt_instructions([s.instruction for s in seeds], kept_pool, rng, num_seed=6, num_machine=2)
        prompts.append(render_bootstrap_prompt(chosen, config.language))
        prompt_ids.append([seed_by_text.get(text, "machine") for text in chosen])
    decoding = config.bootstrap_decoding.model_copy(update={
        "seed": (config.seed * 1_000_003 + index) % (2**31 - 1),
        "stop": config.bootstrap_decoding.stop or stop_sequences("bootstrap", config.language),
    })
    completions = generator.complete(prompts, decoding)
    identity = json.dumps(generator.identity(), sort_keys=True)
    rows: list[dict[str, Any]] = []
    request_base = state["requests"]
    for offset, (completion, ids) in enumerate(zip(completions, prompt_ids)):
        request_idx = request_base + offset
        if completion.finish_reason == "error":
            rows.append(_candidate_row("", request_idx, ids, identity, decoding, reason="request_failed"))
            continue
        candidates = parse_instructions(completion.text, start_index=PROMPT_INSTRUCTIONS + 1, finish_reason=completion.finish_reason)
        if not candidates:
            rows.append(_candidate_row(completion.text[:500], request_idx, ids, identity, decoding, reason="unparseable"))
        for candidate in candidates:
            reason = filter_instruction(candidate, config.language)
            row = _candidate_row(candidate, request_idx, ids, identity, decoding, reason=reason)
            if reason is None:
                decision = engine.offer([candidate])[0]
                row.update(max_rouge_l=decision.max_rouge_l, most_similar=decision.most_similar, kept=decision.kept,
                           reason=None if decision.kept else "rouge_l")
            rows.append(row)
    atomic.write_parquet(part_path(work, "bootstrap", index), pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA))
    state["batches"]["bootstrap"] = index
    state["requests"] = request_base + n_requests
    state["kept"] += sum(1 for r in rows if r["kept"])
    if state["kept"] >= config.num_instructions or state["requests"] >= config.request_limit:
        state["stage"] = "classify"
    save_state(work, state)
    _ENGINES[str(work)] = (index, engine)
    return state


CANDIDATE_SCHEMA = pa.schema([
    ("candidate", pa.string()), ("request_idx", pa.int64()), ("kept", pa.bool_()), ("reason", pa.string()),
    ("max_rouge_l", pa.float64()), ("most_similar", pa.string()), ("prompt_seed_ids", pa.list_(pa.string())),
    ("generator", pa.string()), ("decoding", pa.string()),
])


def _candidate_row(text: str, request_idx: int, ids: list[str], identity: str, decoding: DecodingParams, reason: str | None) -> dict[str, Any]:
    return {"candidate": text, "request_idx": request_idx, "kept": False, "reason": reason, "max_rouge_l": None,
            "most_similar": None, "prompt_seed_ids": ids, "generator": identity, "decoding": decoding.model_dump_json()}


def machine_instruction_id(row_number: int) -> str:
    return f"machine_{row_number:06d}"


# ---- stage 2: classification -------------------------------------------------------------------


def classify_batch(config: SelfInstructConfig, generator: Generator, work: Path) -> dict[str, Any]:
    """Ask the yes/no classification question for the next batch of kept machine instructions."""
    state = load_state(work)
    kept = kept_machine_instructions(work, state)
    index = state["batches"]["classify"] + 1
    start = (index - 1) * config.requests_per_batch
    batch = kept[start : start + config.requests_per_batch]
    decoding = config.instance_decoding.model_copy(update={"strategy": "greedy", "max_new_tokens": 8, "stop": stop_sequences("classification", config.language),
                                                           "seed": (config.seed * 1_000_003 + index) % (2**31 - 1)})
    completions = generator.complete([render_classification_prompt(r["candidate"], config.language) for r in batch], decoding) if batch else []
    rows = [{"instruction_id": machine_instruction_id(start + i), "is_classification": parse_classification(c.text) is True, "answer": c.text[:200]}
            for i, c in enumerate(completions)]
    atomic.write_parquet(part_path(work, "classify", index), pa.Table.from_pylist(rows, schema=CLASSIFY_SCHEMA))
    state["batches"]["classify"] = index
    if start + config.requests_per_batch >= len(kept):
        state["stage"] = "instances"
    save_state(work, state)
    return state


CLASSIFY_SCHEMA = pa.schema([("instruction_id", pa.string()), ("is_classification", pa.bool_()), ("answer", pa.string())])


# ---- stage 3: instances ------------------------------------------------------------------------


def instances_batch(config: SelfInstructConfig, generator: Generator, work: Path) -> dict[str, Any]:
    """Generate and filter the instances of the next batch of machine instructions."""
    state = load_state(work)
    kept = kept_machine_instructions(work, state)
    labels = read_parts(work, "classify", state["batches"]["classify"])
    is_cls = dict(zip(labels["instruction_id"].to_pylist(), labels["is_classification"].to_pylist())) if labels is not None else {}
    index = state["batches"]["instances"] + 1
    start = (index - 1) * config.requests_per_batch
    batch = [(machine_instruction_id(start + i), row["candidate"]) for i, row in enumerate(kept[start : start + config.requests_per_batch])]
    decoding = config.instance_decoding.model_copy(update={"stop": config.instance_decoding.stop or stop_sequences("instances", config.language),
                                                           "seed": (config.seed * 1_000_003 + index) % (2**31 - 1)})
    primers = [INSTANCE_PRIMERS[(config.language, is_cls.get(iid, False))] for iid, _ in batch]
    prompts = [render_instance_prompt(text, is_cls.get(iid, False), config.language) + primer for (iid, text), primer in zip(batch, primers)]
    completions = generator.complete(prompts, decoding) if batch else []
    rows = []
    for (iid, _), primer, completion in zip(batch, primers, completions):
        parsed = parse_instances(primer.lstrip("\n") + completion.text, is_cls.get(iid, False), finish_reason=completion.finish_reason)
        kept_instances, counts, dropped = filter_instances(parsed, config.max_instances)
        rows.append({
            "instruction_id": iid, "parsed": len(parsed), "task_dropped": dropped, "counts": json.dumps(counts),
            "inputs": [i.input for i in kept_instances], "outputs": [i.output for i in kept_instances],
        })
    atomic.write_parquet(part_path(work, "instances", index), pa.Table.from_pylist(rows, schema=INSTANCES_PART_SCHEMA))
    state["batches"]["instances"] = index
    if start + config.requests_per_batch >= len(kept):
        state["stage"] = "done"
    save_state(work, state)
    return state


INSTANCES_PART_SCHEMA = pa.schema([
    ("instruction_id", pa.string()), ("parsed", pa.int64()), ("task_dropped", pa.bool_()), ("counts", pa.string()),
    ("inputs", pa.list_(pa.string())), ("outputs", pa.list_(pa.string())),
])


# ---- the dataset -------------------------------------------------------------------------------


def assemble_tables(config: SelfInstructConfig, seeds: list[SeedTask], work: Path) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Final tables (instructions, instances, rejected, sft) and the funnel, from the acknowledged parts."""
    from storage.schemas import INSTANCES, INSTRUCTIONS, REJECTED, sft_table

    state = load_state(work)
    candidates = read_parts(work, "bootstrap", state["batches"]["bootstrap"])
    candidate_rows = candidates.to_pylist() if candidates is not None else []
    labels = read_parts(work, "classify", state["batches"]["classify"])
    is_cls = dict(zip(labels["instruction_id"].to_pylist(), labels["is_classification"].to_pylist())) if labels is not None else {}
    parts = read_parts(work, "instances", state["batches"]["instances"])
    instance_rows = parts.to_pylist() if parts is not None else []

    instructions, instances = [], []
    for seed in seeds:
        instructions.append({"id": seed.id, "instruction": seed.instruction, "is_classification": seed.is_classification,
                             "origin": "seed", "request_idx": None, "max_rouge_l": None, "most_similar": None,
                             "prompt_seed_ids": [], "generator": None, "decoding": None})
        instances.extend({"instruction_id": seed.id, "input": i.input, "output": i.output} for i in seed.instances)
    dropped_tasks = {r["instruction_id"] for r in instance_rows if r["task_dropped"] or not r["inputs"] and not r["outputs"]}
    kept_rows = [r for r in candidate_rows if r["kept"]]
    for number, row in enumerate(kept_rows):
        iid = machine_instruction_id(number)
        if iid in dropped_tasks:
            continue
        instructions.append({"id": iid, "instruction": row["candidate"], "is_classification": is_cls.get(iid, False),
                             "origin": "machine", "request_idx": row["request_idx"], "max_rouge_l": row["max_rouge_l"],
                             "most_similar": row["most_similar"], "prompt_seed_ids": row["prompt_seed_ids"],
                             "generator": row["generator"], "decoding": row["decoding"]})
    for row in instance_rows:
        if row["instruction_id"] not in dropped_tasks:
            instances.extend({"instruction_id": row["instruction_id"], "input": i, "output": o} for i, o in zip(row["inputs"], row["outputs"]))
    rejected = [{"candidate": r["candidate"], "reason": r["reason"], "max_rouge_l": r["max_rouge_l"],
                 "most_similar": r["most_similar"], "request_idx": r["request_idx"]} for r in candidate_rows if not r["kept"]]

    funnel = instruction_funnel(candidate_rows, state)
    instance_counts = {reason: 0 for reason in INSTANCE_REASONS}
    for row in instance_rows:
        for reason, count in json.loads(row["counts"]).items():
            instance_counts[reason] = instance_counts.get(reason, 0) + count
    funnel["instances"] = {"parsed": sum(r["parsed"] for r in instance_rows), **instance_counts,
                           "kept": sum(len(r["inputs"]) for r in instance_rows if r["instruction_id"] not in dropped_tasks),
                           "tasks_dropped": len(dropped_tasks & {machine_instruction_id(i) for i in range(len(kept_rows))})}
    instruction_table = pa.Table.from_pylist(instructions, schema=INSTRUCTIONS)
    instance_table = pa.Table.from_pylist(instances, schema=INSTANCES)
    tables = {
        "instructions": instruction_table,
        "instances": instance_table,
        "rejected": pa.Table.from_pylist(rejected, schema=REJECTED),
        "sft": sft_table(instruction_table, instance_table),
    }
    return tables, funnel


def instruction_funnel(candidate_rows: list[dict[str, Any]], state: dict[str, Any]) -> dict[str, Any]:
    """Requests -> candidates -> each filter's rejections -> kept. candidates = sum(rejections) + kept."""
    real = [r for r in candidate_rows if r["reason"] not in ("request_failed", "unparseable")]
    by_reason = {reason: 0 for reason in (*INSTRUCTION_REASONS, "rouge_l")}
    for row in real:
        if not row["kept"]:
            by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
    return {
        "requests": state["requests"],
        "failed_requests": sum(1 for r in candidate_rows if r["reason"] == "request_failed"),
        "unparseable_responses": sum(1 for r in candidate_rows if r["reason"] == "unparseable"),
        "candidates": len(real),
        "rejected": by_reason,
        "kept": sum(1 for r in real if r["kept"]),
    }
