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

A run may extend a registered version (`extend`): its tables are copied into the work folder
(`base/`), its machine instructions join the prompt and ROUGE-L pools, request indices and machine
instruction ids continue where it stopped, and the new dataset is the old tables with the new rows
appended. `num_instructions` and `max_requests` then count the new work only.

Each batch is planned here, generated in shards that may run in parallel anywhere (threads, Dask or
Ray workers; see `plan_batch`), and committed here in request order: the dataset depends on the
config, never on the runner or on which worker ran what.
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
from storage.errors import AlignflowError
from storage.manifest import serialize_config
from tasks.generation.config import GeneratorConfig
from tasks.generation.params import DecodingParams, Generator
from tasks.runners import TaskRunnerConfig
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
    num_instructions: int = Field(250, ge=1, le=1_000_000, description="Stop once this many machine instructions are kept.")
    max_requests: int = Field(0, ge=0, description="Stop after this many bootstrap requests even when fewer instructions were kept; 0 means 10 x num_instructions (a weak generator repeats itself, and most of its candidates fail the novelty filter).")
    requests_per_batch: int = Field(16, ge=1, le=4096, description="Requests per batch (bootstrap prompts, or instructions to classify or give instances): one checkpoint per batch.")
    shard_size: int = Field(16, ge=1, le=4096, description="Requests per generation task: a batch's shards run in parallel on the task runner. Part of the run's identity (it fixes how prompts are batched), unlike the runner.")
    task_runner: TaskRunnerConfig = Field(default_factory=TaskRunnerConfig, description="Where the shards run: threads here (default), a Dask cluster or a Ray cluster. Any runner gives the same dataset.")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="Which model generates: the pretrained model (local) or an OpenAI-compatible endpoint.")
    bootstrap_decoding: DecodingParams = Field(
        default_factory=lambda: DecodingParams(strategy="sample", temperature=1.0, top_p=0.95, max_new_tokens=256),
        description="Decoding of the instruction continuations. The paper used temperature 0.7 and top_p 0.5 with GPT-3; a "
        "small model at those settings repeats a handful of instructions that the novelty filter then rejects, so the "
        "default samples more widely.")
    instance_decoding: DecodingParams = Field(
        default_factory=lambda: DecodingParams(strategy="sample", temperature=0.5, top_p=0.9, max_new_tokens=256),
        description="Decoding of instances. The paper decodes greedily with GPT-3; small models loop under greedy decoding, so the default samples, at a low temperature (the answers must be right more than varied). Classification answers are always greedy.")
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="Reject an instruction whose ROUGE-L F with any seed or kept instruction is above this.")
    max_instances: int = Field(5, ge=1, le=100, description="Most instances kept per task.")
    instance_attempts: int = Field(4, ge=1, le=32, description="Tries per instruction at generating usable instances: an instruction whose instances all fail to parse or pass the filters is asked again with fresh samples, up to this many times in all. Instructions still without instances are counted in the funnel and left out.")
    min_machine_instructions: int = Field(1, ge=0, description="Refuse to register a dataset with fewer machine instructions (with instances) than this; the error says what was kept and why candidates were rejected. 0 allows a seeds-only dataset.")
    seed: int = Field(0, ge=0, description="Seed of prompt sampling and generation.")
    dataset_name: str = Field("self-instruct", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Registry name of the resulting dataset.")
    extend: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(@[0-9]+)?$", description=(
        "Grow a registered dataset: `self-instruct` (its latest version) or `self-instruct@3`. The run starts from that version's "
        "machine instructions (kept as they are, and in the ROUGE-L pool), generates up to num_instructions new ones and "
        "registers a new version holding the old rows plus the new, with the old version as a parent. A name with no "
        "registered version yet starts from scratch; a missing version is an error. Empty: a fresh dataset."))

    @property
    def request_limit(self) -> int:
        return self.max_requests or 10 * self.num_instructions

    def identity(self) -> dict[str, Any]:
        """The settings that decide the dataset: everything but where the work runs."""
        return serialize_config(self.model_copy(update={"task_runner": TaskRunnerConfig()}))

    @property
    def rouge_tokenizer(self) -> str:
        return "rouge" if self.language == "en" else "unicode"


class ExtendError(AlignflowError, ValueError):
    """`extend` names a version that does not exist or that this run cannot continue."""


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


# Every batch needs the rows of all earlier parts (the kept pool, the labels), and an acknowledged
# part never changes: each is read once per process. An entry is checked against the file's size
# and modification time, and only the work folder in use is kept.
_PART_ROWS: dict[Path, tuple[tuple[int, int], list[dict[str, Any]]]] = {}


def part_rows(work: Path, stage: str, upto: int) -> list[dict[str, Any]]:
    """The rows of the acknowledged parts of a stage (1..upto), in order."""
    rows: list[dict[str, Any]] = []
    for index in range(1, upto + 1):
        path = part_path(work, stage, index)
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        cached = _PART_ROWS.get(path)
        if cached is None or cached[0] != key:
            if any(other.parent != path.parent for other in _PART_ROWS):
                _PART_ROWS.clear()
            cached = _PART_ROWS[path] = (key, pq.read_table(path).to_pylist())
        rows.extend(cached[1])
    return rows


def kept_machine_instructions(work: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidate rows this run kept (an extended version's instructions are `base_rows`)."""
    return [row for row in part_rows(work, "bootstrap", state["batches"]["bootstrap"]) if row["kept"]]


# ---- extending a registered version ------------------------------------------------------------

BASE = "base"  # the extended version's tables, copied into the work folder
BASE_TABLES = ("instructions", "instances", "rejected")


def start_extending(work: Path, ref: str, tables: dict[str, pa.Table], totals: dict[str, int]) -> dict[str, Any]:
    """Start a work folder from a registered version; a folder that has a state already is left alone.

    The version's tables are copied into `base/` (each atomically), then the state is written with
    where the version's numbering ends: `totals` = {"requests": bootstrap requests so far,
    "machine_numbers": machine instruction ids used so far}. A crash before the state exists
    leaves copies that the next start writes again.
    """
    if (work / STATE).exists():
        return load_state(work)
    for name in BASE_TABLES:
        atomic.write_parquet(work / BASE / f"{name}.parquet", tables[name])
    machine = sum(1 for origin in tables["instructions"].column("origin").to_pylist() if origin == "machine")
    state = load_state(work)
    state["base"] = {"ref": ref, "requests": int(totals["requests"]), "machine_numbers": int(totals["machine_numbers"]),
                     "machine_instructions": machine}
    save_state(work, state)
    return state


def base_info(state: dict[str, Any]) -> dict[str, Any]:
    """The extended version's numbering (zeros for a run from scratch)."""
    return state.get("base") or {"ref": None, "requests": 0, "machine_numbers": 0, "machine_instructions": 0}


def base_rows(work: Path, state: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The rows of one of the extended version's tables; none for a run from scratch."""
    return pq.read_table(work / BASE / f"{name}.parquet").to_pylist() if state.get("base") else []


def base_machine_instructions(work: Path, state: dict[str, Any]) -> list[str]:
    if not state.get("base"):
        return []
    table = pq.read_table(work / BASE / "instructions.parquet", columns=["instruction", "origin"]).to_pylist()
    return [row["instruction"] for row in table if row["origin"] == "machine"]


def totals(state: dict[str, Any]) -> dict[str, int]:
    """Where this dataset's numbering ends, counting the extended versions: the next extend starts here."""
    base = base_info(state)
    return {"requests": base["requests"] + state["requests"], "machine_numbers": base["machine_numbers"] + state["kept"]}


def _batch_seed(config: SelfInstructConfig, state: dict[str, Any], index: int) -> int:
    # An extend run's batches start at 1 again: its seeds also depend on where the old version stopped.
    return (config.seed * 1_000_003 + index + 7_919 * base_info(state)["requests"]) % (2**31 - 1)


# ---- batches: plan -> shards -> commit ---------------------------------------------------------
#
# A batch is planned in the flow's process (prompts need the kept pool so far), its requests are
# split into shards of `shard_size` that generate in parallel on the task runner (threads, Dask or
# Ray workers), and the shards' rows are committed in request order. A shard's output is a function
# of its parameters alone, and the split a function of the config alone, so every runner and every
# worker count gives the same dataset. Shards see the pool as it was when the batch was planned;
# the commit then applies the greedy ROUGE-L decision in request order against the batch's own
# earlier keeps, which gives exactly the decisions of one sequential filter.


def plan_batch(config: SelfInstructConfig, seeds: list[SeedTask], work: Path) -> dict[str, Any]:
    """The next batch of the current stage: its index, decoding, shards of requests, and the pool."""
    state = load_state(work)
    stage = state["stage"]
    if stage not in ("bootstrap", "classify", "instances"):
        raise ValueError(f"{work / STATE}: stage {stage!r} has no batches left")
    index = state["batches"][stage] + 1
    plan: dict[str, Any] = {"stage": stage, "index": index, "pool": []}
    seed = _batch_seed(config, state, index)
    if stage == "bootstrap":
        requests, pool = _bootstrap_requests(config, seeds, work, state, index)
        decoding = config.bootstrap_decoding.model_copy(update={
            "seed": seed, "stop": config.bootstrap_decoding.stop or stop_sequences("bootstrap", config.language)})
        plan.update(requests=len(requests), pool=pool)
    else:
        kept = kept_machine_instructions(work, state)
        start = (index - 1) * config.requests_per_batch
        first = base_info(state)["machine_numbers"] + start
        is_cls = _classification_labels(work, state) if stage == "instances" else {}
        requests = [{"instruction_id": machine_instruction_id(first + i), "instruction": row["candidate"],
                     "is_classification": is_cls.get(machine_instruction_id(first + i), False)}
                    for i, row in enumerate(kept[start : start + config.requests_per_batch])]
        plan["last"] = start + config.requests_per_batch >= len(kept)
        if stage == "classify":
            decoding = config.instance_decoding.model_copy(update={
                "strategy": "greedy", "max_new_tokens": 8, "stop": stop_sequences("classification", config.language), "seed": seed})
        else:
            decoding = config.instance_decoding.model_copy(update={
                "stop": config.instance_decoding.stop or stop_sequences("instances", config.language), "seed": seed})
    plan["decoding"] = decoding.model_dump(mode="json")
    plan["shards"] = [requests[i : i + config.shard_size] for i in range(0, len(requests), config.shard_size)]
    return plan


def run_shard(config: SelfInstructConfig, generator: Generator, stage: str, requests: list[dict[str, Any]],
              decoding: dict[str, Any], pool: list[str]) -> list[dict[str, Any]]:
    """Generate one shard of a batch and turn the completions into part rows (no state is touched)."""
    params = DecodingParams.model_validate(decoding)
    if stage == "bootstrap":
        return _bootstrap_shard(config, generator, requests, params, pool)
    if stage == "classify":
        return _classify_shard(config, generator, requests, params)
    return _instances_shard(config, generator, requests, params)


def commit_batch(config: SelfInstructConfig, work: Path, plan: dict[str, Any], shard_rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Write the batch's part and advance the state (part first, state second). Returns the new state."""
    state = load_state(work)
    stage, index = plan["stage"], plan["index"]
    if state["stage"] != stage or state["batches"][stage] != index - 1:
        raise RuntimeError(f"{work / STATE}: batch {stage} {index} was planned on another state (now {state['stage']} "
                           f"{state['batches'][stage]}); is another run using this work folder?")
    rows = [row for shard in shard_rows for row in shard]
    if stage == "bootstrap":
        _decide_in_order(config, rows)
        schema = CANDIDATE_SCHEMA
        state["requests"] += plan["requests"]
        state["kept"] += sum(1 for r in rows if r["kept"])
        if state["kept"] >= config.num_instructions or state["requests"] >= config.request_limit:
            state["stage"] = "classify"
    else:
        schema = CLASSIFY_SCHEMA if stage == "classify" else INSTANCES_PART_SCHEMA
        if plan["last"]:
            state["stage"] = "instances" if stage == "classify" else "done"
    atomic.write_parquet(part_path(work, stage, index), pa.Table.from_pylist(rows, schema=schema))
    state["batches"][stage] = index
    save_state(work, state)
    return state


# ---- stage 1: bootstrap ------------------------------------------------------------------------


def _bootstrap_requests(config: SelfInstructConfig, seeds: list[SeedTask], work: Path, state: dict[str, Any],
                        index: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The batch's prompts (6 seeds + 2 kept machine instructions each) and the ROUGE-L pool so far.

    The kept pool holds the extended version's machine instructions first, then this run's.
    """
    base = base_info(state)
    kept_pool = base_machine_instructions(work, state) + [row["candidate"] for row in kept_machine_instructions(work, state)]
    rng = random.Random(f"{config.seed}-bootstrap-{index}" + (f"-after-{base['requests']}" if base["requests"] else ""))
    seed_texts = [s.instruction for s in seeds]
    seed_by_text = {s.instruction: s.id for s in seeds}
    n_requests = min(config.requests_per_batch, config.request_limit - state["requests"])
    requests = []
    for offset in range(n_requests):
        chosen = sample_prompt_instructions(seed_texts, kept_pool, rng, num_seed=6, num_machine=2)
        requests.append({"request_idx": base["requests"] + state["requests"] + offset, "prompt": render_bootstrap_prompt(chosen, config.language),
                         "prompt_seed_ids": [seed_by_text.get(text, "machine") for text in chosen]})
    return requests, seed_texts + kept_pool


def _bootstrap_shard(config: SelfInstructConfig, generator: Generator, requests: list[dict[str, Any]],
                     decoding: DecodingParams, pool: list[str]) -> list[dict[str, Any]]:
    """Continue the prompts, parse and filter the candidates, and score them against the pool."""
    from tasks.rouge.engine import nearest

    completions = generator.complete([r["prompt"] for r in requests], decoding)
    identity = json.dumps(generator.identity(), sort_keys=True)
    rows: list[dict[str, Any]] = []
    for request, completion in zip(requests, completions):
        idx, ids = request["request_idx"], request["prompt_seed_ids"]
        if completion.finish_reason == "error":
            rows.append(_candidate_row("", idx, ids, identity, decoding, reason="request_failed"))
            continue
        candidates = parse_instructions(completion.text, start_index=PROMPT_INSTRUCTIONS + 1, finish_reason=completion.finish_reason)
        if not candidates:
            rows.append(_candidate_row(completion.text[:500], idx, ids, identity, decoding, reason="unparseable"))
        for candidate in candidates:
            rows.append(_candidate_row(candidate, idx, ids, identity, decoding, reason=filter_instruction(candidate, config.language)))
    scored = [row for row in rows if row["reason"] is None]
    for row, (score, column) in zip(scored, nearest([r["candidate"] for r in scored], pool, config.rouge_tokenizer)):
        row.update(max_rouge_l=score, most_similar=None if column is None else pool[column])
    return rows


def _decide_in_order(config: SelfInstructConfig, rows: list[dict[str, Any]]) -> None:
    """The greedy novelty decision, in request order, for rows scored against the batch's pool.

    A candidate's highest score is the larger of its score against the planned pool (from its shard)
    and against the candidates this batch kept before it; ties go to the pool, which comes first
    in pool order, as in one sequential filter.
    """
    from tasks.rouge.engine import nearest

    kept_in_batch: list[str] = []
    for row in rows:
        if row["reason"] is not None:
            continue
        if row["max_rouge_l"] <= config.rouge_threshold and kept_in_batch:
            score, column = nearest([row["candidate"]], kept_in_batch, config.rouge_tokenizer)[0]
            if score > row["max_rouge_l"]:
                row.update(max_rouge_l=score, most_similar=kept_in_batch[column])
        if row["max_rouge_l"] > config.rouge_threshold:
            row["reason"] = "rouge_l"
        else:
            row["kept"] = True
            kept_in_batch.append(row["candidate"])


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


def _classify_shard(config: SelfInstructConfig, generator: Generator, requests: list[dict[str, Any]],
                    decoding: DecodingParams) -> list[dict[str, Any]]:
    """Ask the few-shot yes/no classification question for each instruction."""
    completions = generator.complete([render_classification_prompt(r["instruction"], config.language) for r in requests], decoding)
    return [{"instruction_id": r["instruction_id"], "is_classification": parse_classification(c.text) is True, "answer": c.text[:200]}
            for r, c in zip(requests, completions)]


CLASSIFY_SCHEMA = pa.schema([("instruction_id", pa.string()), ("is_classification", pa.bool_()), ("answer", pa.string())])


def _classification_labels(work: Path, state: dict[str, Any]) -> dict[str, bool]:
    return {row["instruction_id"]: row["is_classification"] for row in part_rows(work, "classify", state["batches"]["classify"])}


# ---- stage 3: instances ------------------------------------------------------------------------


def _instances_shard(config: SelfInstructConfig, generator: Generator, requests: list[dict[str, Any]],
                     decoding: DecodingParams) -> list[dict[str, Any]]:
    """Generate, parse and filter the instances of each instruction (output-first for classification).

    A small generator often writes nothing parseable on the first try, so an instruction left
    without instances is asked again with a fresh seed, up to `instance_attempts` tries in all.
    The seeds depend on the attempt number only: the result stays a function of the shard.
    """
    primers = [INSTANCE_PRIMERS[(config.language, r["is_classification"])] for r in requests]
    prompts = [render_instance_prompt(r["instruction"], r["is_classification"], config.language) + primer
               for r, primer in zip(requests, primers)]
    rows: list[dict[str, Any] | None] = [None] * len(requests)
    pending = list(range(len(requests)))
    for attempt in range(config.instance_attempts):
        params = decoding if attempt == 0 else decoding.model_copy(update={"seed": (decoding.seed or 0) + 7919 * attempt})
        completions = generator.complete([prompts[i] for i in pending], params)
        still_pending = []
        for i, completion in zip(pending, completions):
            parsed = parse_instances(primers[i].lstrip("\n") + completion.text, requests[i]["is_classification"],
                                     finish_reason=completion.finish_reason)
            kept_instances, counts, dropped = filter_instances(parsed, config.max_instances)
            previous = rows[i]
            if previous is not None:  # the funnel counts what every try rejected
                earlier = json.loads(previous["counts"])
                counts = {k: counts.get(k, 0) + earlier.get(k, 0) for k in counts.keys() | earlier.keys()}
            rows[i] = {
                "instruction_id": requests[i]["instruction_id"], "parsed": len(parsed) + (previous["parsed"] if previous else 0),
                "task_dropped": dropped, "counts": json.dumps(counts), "attempts": attempt + 1,
                "inputs": [x.input for x in kept_instances], "outputs": [x.output for x in kept_instances],
            }
            if not kept_instances:
                still_pending.append(i)
        pending = still_pending
        if not pending:
            break
    return rows  # type: ignore[return-value]


INSTANCES_PART_SCHEMA = pa.schema([
    ("instruction_id", pa.string()), ("parsed", pa.int64()), ("task_dropped", pa.bool_()), ("counts", pa.string()),
    ("attempts", pa.int64()), ("inputs", pa.list_(pa.string())), ("outputs", pa.list_(pa.string())),
])


# ---- the dataset -------------------------------------------------------------------------------


def assemble_tables(config: SelfInstructConfig, seeds: list[SeedTask], work: Path) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Final tables (instructions, instances, rejected, sft) and the funnel, from the acknowledged parts.

    Extending a version, the tables are its tables with this run's rows appended (its seeds included
    as they were), and the funnel counts this run's work, with `extends` saying what it started from.
    """
    from storage.schemas import INSTANCES, INSTRUCTIONS, REJECTED, sft_table

    state = load_state(work)
    candidates = read_parts(work, "bootstrap", state["batches"]["bootstrap"])
    candidate_rows = candidates.to_pylist() if candidates is not None else []
    is_cls = _classification_labels(work, state)
    parts = read_parts(work, "instances", state["batches"]["instances"])
    instance_rows = parts.to_pylist() if parts is not None else []

    base = base_info(state)
    instructions, instances = base_rows(work, state, "instructions"), base_rows(work, state, "instances")
    for seed in (seeds if not state.get("base") else []):  # an extended version has its seed rows already
        instructions.append({"id": seed.id, "instruction": seed.instruction, "is_classification": seed.is_classification,
                             "origin": "seed", "request_idx": None, "max_rouge_l": None, "most_similar": None,
                             "prompt_seed_ids": [], "generator": None, "decoding": None})
        instances.extend({"instruction_id": seed.id, "input": i.input, "output": i.output} for i in seed.instances)
    dropped_tasks = {r["instruction_id"] for r in instance_rows if r["task_dropped"] or not r["inputs"] and not r["outputs"]}
    kept_rows = [r for r in candidate_rows if r["kept"]]
    for number, row in enumerate(kept_rows, start=base["machine_numbers"]):
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
    rejected = base_rows(work, state, "rejected") + [{"candidate": r["candidate"], "reason": r["reason"], "max_rouge_l": r["max_rouge_l"],
                 "most_similar": r["most_similar"], "request_idx": r["request_idx"]} for r in candidate_rows if not r["kept"]]

    funnel = instruction_funnel(candidate_rows, state)
    instance_counts = {reason: 0 for reason in INSTANCE_REASONS}
    for row in instance_rows:
        for reason, count in json.loads(row["counts"]).items():
            instance_counts[reason] = instance_counts.get(reason, 0) + count
    funnel["instances"] = {"parsed": sum(r["parsed"] for r in instance_rows), **instance_counts,
                           "kept": sum(len(r["inputs"]) for r in instance_rows if r["instruction_id"] not in dropped_tasks),
                           "tasks_dropped": len(dropped_tasks & {machine_instruction_id(base["machine_numbers"] + i) for i in range(len(kept_rows))})}
    funnel["instance_tries"] = {"instructions_retried": sum(1 for r in instance_rows if (r.get("attempts") or 1) > 1),
                                "tries": sum(r.get("attempts") or 1 for r in instance_rows),
                                "without_instances_after_retries": len(dropped_tasks)}
    if state.get("base"):
        funnel["extends"] = dict(base)
    instruction_table = pa.Table.from_pylist(instructions, schema=INSTRUCTIONS)
    instance_table = pa.Table.from_pylist(instances, schema=INSTANCES)
    tables = {
        "instructions": instruction_table,
        "instances": instance_table,
        "rejected": pa.Table.from_pylist(rejected, schema=REJECTED),
        "sft": sft_table(instruction_table, instance_table),
    }
    return tables, funnel


class DatasetTooSmallError(AlignflowError, ValueError):
    """Self-instruct kept fewer usable machine instructions than the configured minimum; nothing is registered."""


def check_dataset_size(config: SelfInstructConfig, tables: dict[str, pa.Table], funnel: dict[str, Any]) -> None:
    """Refuse a dataset below `min_machine_instructions`, saying what was kept and why the rest was rejected."""
    usable = sum(1 for origin in tables["instructions"].column("origin").to_pylist() if origin == "machine")
    extends = funnel.get("extends")
    if extends:  # an extend run must add them
        usable -= extends["machine_instructions"]
    if usable >= config.min_machine_instructions:
        return
    rejected = ", ".join(f"{reason} {count}" for reason, count in funnel["rejected"].items() if count) or "none"
    instances = funnel["instances"]
    raise DatasetTooSmallError(
        f"self-instruct: {usable} {'new ' if extends else ''}machine instructions with instances"
        f"{' (extending ' + extends['ref'] + ')' if extends else ''}, fewer than min_machine_instructions="
        f"{config.min_machine_instructions}; nothing was registered. {funnel['requests']} requests gave "
        f"{funnel['candidates']} candidate instructions ({funnel['unparseable_responses']} responses unparseable, "
        f"{funnel['failed_requests']} requests failed); rejected: {rejected}; kept {funnel['kept']}, of which "
        f"{instances['tasks_dropped']} got no usable instances in {config.instance_attempts} tries. "
        f"Is the generator ({config.generator.backend} {config.generator.model or 'latest base'}) trained for "
        f"language {config.language!r}?"
    )


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
