"""Preference pairs: sample K responses per prompt from the SFT model, then let a judge rank them.

Judges (`PreferenceOptions.judge`):
- reference (default, needs no extra model): each sample is scored by ROUGE-L F against the
  instance's reference answer. The reference is the chosen answer and the lowest-scored samples are
  the rejected ones, `pairs_per_prompt` pairs per prompt (a reward model needs at least 2 per
  prompt to learn topic-level signals); when too few distinct samples exist, best sample vs worst
  sample fills in. Samples identical to the reference are never rejected.
- llm: a generator answers "which response is better, A or B?" twice, with the positions swapped;
  a pair is kept only when both orders pick the same response. Lengths are recorded.
  Length-bias control (our choice): drop a kept pair when the chosen response is longer than the
  rejected one by more than `max_length_ratio` (in characters), unless the rejected response is
  empty (an empty answer loses on merit, not length). It removes exactly the pairs where "longer
  won" could be the whole reason, and `preference_stats` reports how often the longer one wins.
- human: a person picks A, B or skip through `ask(prompt, a, b)`; the flow wires `ask` to a Prefect
  pause form. A and B are shown in a seeded random order, against position bias.
- file: labels imported from a Parquet file with `prompt, chosen, rejected` columns.

The result has the columns `prompt, chosen, rejected, judge, chosen_score, rejected_score,
chosen_len, rejected_len` (lengths in characters). The align flow adds a `split` column: each pair
keeps the train / validation / test side of its prompt (`tasks.align.data.side_of`), so no prompt
is on two sides.

    table = build_preferences(train_table, PreferenceOptions(), generator=LocalGenerator(sft_dir, "sft@1"))
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import pyarrow as pa

from storage.errors import InputError
from storage.reader import json_type, read_records
from storage.schemas import PREFERENCES
from tasks.align.config import PreferenceOptions
from tasks.align.data import normalize_sft_table
from tasks.generation.params import DecodingParams, Generator

Log = Callable[[str], None]
Ask = Callable[[str, str, str], Literal["A", "B", "skip"]]

PREFERENCE_SCHEMA = PREFERENCES

JUDGE_TEMPLATE = (
    "Which response follows the instruction better?\n\n"
    "Instruction:\n{prompt}\n\n"
    "Response A:\n{a}\n\n"
    "Response B:\n{b}\n\n"
    "Answer with one letter: A or B."
)


class PreferenceError(InputError):
    """Preference data that cannot be built or read; names the file, row and field where there is one."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    judge: str
    chosen_score: float | None
    rejected_score: float | None


def pairs_to_table(pairs: Sequence[Pair]) -> pa.Table:
    return pa.table(
        {
            "prompt": [p.prompt for p in pairs],
            "chosen": [p.chosen for p in pairs],
            "rejected": [p.rejected for p in pairs],
            "judge": [p.judge for p in pairs],
            "chosen_score": [p.chosen_score for p in pairs],
            "rejected_score": [p.rejected_score for p in pairs],
            "chosen_len": [len(p.chosen) for p in pairs],
            "rejected_len": [len(p.rejected) for p in pairs],
        },
        schema=PREFERENCE_SCHEMA,
    )


# ---------------------------------------------------------------- sampling


def _as_conversation(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def sample_responses(
    generator: Generator, prompts: Sequence[str | list[dict]], k: int, decoding: DecodingParams
) -> list[list[str]]:
    """K responses per prompt (a prompt is a text or a chat context), in prompt order.

    All K * len(prompts) conversations go to the generator in one call so it can batch them; it
    seeds each repeated input differently, so the K samples differ under sampling. Failed
    requests (finish_reason "error") are dropped: they are not the model's answers.
    """
    if k < 1:
        raise PreferenceError(f"num_samples must be >= 1, got {k}")
    conversations = [_as_conversation(prompt) for prompt in prompts for _ in range(k)]
    completions = generator.chat(conversations, decoding) if conversations else []
    out: list[list[str]] = []
    for i in range(len(prompts)):
        group = completions[i * k : (i + 1) * k]
        # Texts are kept as generated (no strip): the reward model must see what PPO will show it.
        out.append([c.text for c in group if c.finish_reason != "error"])
    return out


# ---------------------------------------------------------------- judges


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F-measure of `candidate` against `reference` (rouge-score's value; unicode-aware tokens)."""
    from rapidfuzz.distance import LCSseq

    from tasks.rouge.engine import rouge_l_fmeasure
    from tasks.rouge.tokenize import tokenize

    ref, cand = tokenize(reference, "unicode"), tokenize(candidate, "unicode")
    return rouge_l_fmeasure(LCSseq.similarity(ref, cand), len(ref), len(cand))


def _distinct(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts))


def judge_by_reference(prompt: str, reference: str, samples: Sequence[str], pairs_per_prompt: int) -> list[Pair]:
    """Reference vs the lowest-ROUGE-L samples; best vs worst sample fills in when samples run out."""
    candidates = [s for s in _distinct(samples) if s.strip() != reference.strip()]
    scored = sorted(((rouge_l(reference, s), s) for s in candidates), key=lambda item: item[0])
    pairs = [Pair(prompt, reference, s, "reference", 1.0, score) for score, s in scored[:pairs_per_prompt]]
    if len(pairs) < pairs_per_prompt and len(scored) >= 2 and scored[-1][0] > scored[0][0]:
        (worst_score, worst), (best_score, best) = scored[0], scored[-1]
        pairs.append(Pair(prompt, best, worst, "reference", best_score, worst_score))
    return pairs


def parse_verdict(text: str) -> Literal["A", "B"] | None:
    """The judge's pick: the first standalone A or B in its answer; None when it names neither."""
    match = re.search(r"\b([AB])\b", text.strip())
    return match.group(1) if match else None  # type: ignore[return-value]


def judge_by_llm(
    judge: Generator,
    prompts: Sequence[str],
    samples: Sequence[Sequence[str]],
    options: PreferenceOptions,
    log: Log = print,
    counts: dict | None = None,
) -> list[Pair]:
    """Pairwise A/B verdicts from `judge`, asked in both orders; keeps only pairs where both agree.

    `counts`, when given, receives the comparisons made, agreed, disagreed and dropped, and the
    agreement rate of the two orders.

    Comparisons run in rounds so each round is one batched call: round r compares the r-th pair of
    distinct samples of every prompt that still needs pairs (at most 2 * pairs_per_prompt tries).
    """
    params = DecodingParams(strategy="greedy", max_new_tokens=options.judge_max_new_tokens, seed=options.seed)
    combos = [list(itertools.combinations(_distinct(group), 2)) for group in samples]
    kept: list[list[Pair]] = [[] for _ in prompts]
    counts = counts if counts is not None else {}
    counts.update(compared=0, agreed=0, disagreed_or_invalid=0, dropped_for_length=0)
    for round_index in range(2 * options.pairs_per_prompt):
        jobs = [
            (i, *combos[i][round_index])
            for i in range(len(prompts))
            if round_index < len(combos[i]) and len(kept[i]) < options.pairs_per_prompt
        ]
        if not jobs:
            break
        conversations = []
        for i, x, y in jobs:
            for a, b in ((x, y), (y, x)):
                text = JUDGE_TEMPLATE.format(prompt=prompts[i], a=a, b=b)
                conversations.append([{"role": "user", "content": text}])
        verdicts = [parse_verdict(c.text) for c in judge.chat(conversations, params)]
        for j, (i, x, y) in enumerate(jobs):
            first, second = verdicts[2 * j], verdicts[2 * j + 1]
            counts["compared"] += 1
            # First order shows (x, y), the second (y, x): "A" then "B" both mean x.
            if (first, second) == ("A", "B"):
                chosen, rejected = x, y
            elif (first, second) == ("B", "A"):
                chosen, rejected = y, x
            else:
                counts["disagreed_or_invalid"] += 1
                continue
            counts["agreed"] += 1
            if options.length_bias_control and rejected and len(chosen) > options.max_length_ratio * len(rejected):
                counts["dropped_for_length"] += 1
                continue
            kept[i].append(Pair(prompts[i], chosen, rejected, "llm", 1.0, 0.0))
    counts["order_agreement"] = counts["agreed"] / counts["compared"] if counts["compared"] else 0.0
    log(
        f"llm judge: {counts['compared']} comparisons, {counts['agreed']} agreed in both orders, "
        f"{counts['disagreed_or_invalid']} disagreed or gave no verdict, "
        f"{counts['dropped_for_length']} dropped by the length-bias control"
    )
    return [pair for group in kept for pair in group]


def judge_by_human(
    ask: Ask,
    prompts: Sequence[str],
    samples: Sequence[Sequence[str]],
    options: PreferenceOptions,
    log: Log = print,
) -> list[Pair]:
    """Ask a person A, B or skip for up to `pairs_per_prompt` sample pairs per prompt."""
    rng = random.Random(options.seed)
    pairs: list[Pair] = []
    skipped = 0
    for prompt, group in zip(prompts, samples):
        for x, y in list(itertools.combinations(_distinct(group), 2))[: options.pairs_per_prompt]:
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            answer = ask(prompt, a, b)
            if answer == "A":
                pairs.append(Pair(prompt, a, b, "human", 1.0, 0.0))
            elif answer == "B":
                pairs.append(Pair(prompt, b, a, "human", 1.0, 0.0))
            elif answer == "skip":
                skipped += 1
            else:
                raise PreferenceError(f"human judge: answer must be 'A', 'B' or 'skip', got {answer!r}")
    log(f"human judge: {len(pairs)} pairs labelled, {skipped} skipped")
    return pairs


def load_preference_file(path: str | Path, judge: str | None = "file") -> pa.Table:
    """Read preference pairs (`prompt, chosen, rejected`; optional scores and `judge`) from Parquet,
    JSON Lines or a JSON list, through storage.reader; errors name the file, the row and the field.

    judge: the value of the output's `judge` column; None keeps the file's own `judge` column
    (or "file" when it has none), which is how the reward stage reads tables this module wrote.
    """
    path = Path(path)
    wanted = ["prompt", "chosen", "rejected", "chosen_score", "rejected_score", "judge"]
    pairs = []
    for where, record in read_records(path, columns=wanted, required=wanted[:3], error=PreferenceError):
        for field in ("prompt", "chosen", "rejected"):
            value = record.get(field)
            if not isinstance(value, str):
                problem = "missing" if field not in record else f"expected a string, got {json_type(value)}"
                raise PreferenceError(path, problem, where=where, field=field)
        if not record["prompt"].strip():
            raise PreferenceError(path, "is empty", where=where, field="prompt")
        # An empty response is a legitimate (bad) answer: a model can stop at once.
        if record["chosen"].strip() == record["rejected"].strip():
            raise PreferenceError(path, "the same text as 'chosen'", where=where, field="rejected")
        own = record.get("judge")
        pairs.append(
            Pair(
                record["prompt"], record["chosen"], record["rejected"],
                (own if isinstance(own, str) and own else "file") if judge is None else (judge or "file"),
                _float_or_none(record.get("chosen_score"), path, where, "chosen_score"),
                _float_or_none(record.get("rejected_score"), path, where, "rejected_score"),
            )
        )
    if not pairs:
        raise PreferenceError(path, "the preference file has no rows")
    return pairs_to_table(pairs)


def _float_or_none(value, path: Path, where, field: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PreferenceError(path, f"expected a number, got {json_type(value)} ({value!r:.60})", where=where, field=field) from None


# ---------------------------------------------------------------- the stage


def build_preferences(
    table: pa.Table | None,
    options: PreferenceOptions,
    generator: Generator | None = None,
    judge_generator: Generator | None = None,
    ask: Ask | None = None,
    log: Log = print,
    report: dict | None = None,
) -> pa.Table:
    """Build the preference table for the chosen judge.

    `report`, when given, receives the judge's own statistics: prompts without a pair (every sample
    tied: identical to each other or to the reference), and for the LLM judge the comparisons made
    and how often the two swapped orders agreed.

    table: prompts with their reference answers (the normalized SFT table, or any table with
    prompt/completion or messages); unused by the file judge. generator: samples the K responses
    (the SFT model). judge_generator: the llm judge's backend. ask: the human judge's callback.
    """
    if options.judge == "file":
        if not options.labels_path:
            raise PreferenceError("judge 'file' needs labels_path: a Parquet file with prompt, chosen, rejected")
        result = load_preference_file(options.labels_path)
        log(f"file judge: {result.num_rows} pairs imported from {options.labels_path}")
        return result

    if table is None:
        raise PreferenceError(f"judge {options.judge!r} needs a table of prompts")
    if generator is None:
        raise PreferenceError(f"judge {options.judge!r} needs a generator to sample responses")
    if options.judge == "llm" and judge_generator is None:
        raise PreferenceError("judge 'llm' needs judge_generator")
    if options.judge == "human" and ask is None:
        raise PreferenceError("judge 'human' needs an ask(prompt, a, b) callback")
    if options.judge in ("llm", "human") and options.num_samples < 2:
        raise PreferenceError(f"judge {options.judge!r} compares samples: num_samples must be >= 2")

    if "prompt_messages" not in table.column_names:
        table = normalize_sft_table(table)
    prompts, contexts, references = _first_per_prompt(table, options.max_prompts)
    samples = sample_responses(generator, contexts, options.num_samples, options.decoding)
    log(f"sampled {options.num_samples} responses for each of {len(prompts)} prompts")

    if options.judge == "reference":
        pairs = [
            pair
            for prompt, reference, group in zip(prompts, references, samples)
            for pair in judge_by_reference(prompt, reference, group, options.pairs_per_prompt)
        ]
    elif options.judge == "llm":
        pairs = judge_by_llm(judge_generator, prompts, samples, options, log, counts=report)  # type: ignore[arg-type]
    else:
        pairs = judge_by_human(ask, prompts, samples, options, log)  # type: ignore[arg-type]
    if report is not None:
        paired = {p.prompt for p in pairs}
        report.update(prompts_sampled=len(prompts), prompts_without_pair=sum(1 for p in prompts if p not in paired),
                      samples_equal_to_reference=sum(s.strip() == r.strip() for r, group in zip(references, samples) for s in group),
                      tied_pairs=sum(1 for p in pairs if p.chosen_score is not None and p.chosen_score == p.rejected_score))
    if not pairs:
        raise PreferenceError(
            f"judge {options.judge!r} produced no preference pairs from {len(prompts)} prompts "
            "(all samples identical to each other or to the reference? sample with a higher temperature)"
        )
    result = pairs_to_table(pairs)
    stats = preference_stats(result)
    log(f"{options.judge} judge: {stats['pairs']} pairs over {stats['prompts']} prompts; "
        f"chosen is the longer one in {stats['chosen_longer_fraction']:.0%} of pairs")
    return result


def _first_per_prompt(table: pa.Table, limit: int | None) -> tuple[list[str], list[list[dict]], list[str]]:
    prompts, contexts, references, seen = [], [], [], set()
    for prompt, context, reference in zip(
        table.column("prompt").to_pylist(),
        table.column("prompt_messages").to_pylist(),
        table.column("completion").to_pylist(),
    ):
        if prompt in seen:
            continue
        seen.add(prompt)
        prompts.append(prompt)
        contexts.append(context)
        references.append(reference)
        if limit is not None and len(prompts) >= limit:
            break
    return prompts, contexts, references


def preference_stats(table: pa.Table) -> dict[str, float]:
    """Counts and length-bias indicators of a preference table (for logs and manifests)."""
    rows = table.num_rows
    chosen = table.column("chosen").to_pylist()
    rejected = table.column("rejected").to_pylist()
    longer = sum(len(c) > len(r) for c, r in zip(chosen, rejected))
    prompts = len(set(table.column("prompt").to_pylist()))
    return {
        "pairs": rows,
        "prompts": prompts,
        "pairs_per_prompt": rows / prompts if prompts else 0.0,
        "chosen_longer_fraction": longer / rows if rows else 0.0,
        "mean_chosen_len": sum(map(len, chosen)) / rows if rows else 0.0,
        "mean_rejected_len": sum(map(len, rejected)) / rows if rows else 0.0,
    }


def single_verdict_judge(judge: Generator, max_new_tokens: int = 8) -> Callable[[str, str, str], str]:
    """`judge(prompt, a, b) -> "A" | "B" | "tie"` over a generator, for the evaluation's win rate
    (which asks twice itself, with the positions swapped). No verdict counts as a tie."""
    params = DecodingParams(strategy="greedy", max_new_tokens=max_new_tokens)

    def verdict(prompt: str, a: str, b: str) -> str:
        answer = judge.chat([[{"role": "user", "content": JUDGE_TEMPLATE.format(prompt=prompt, a=a, b=b)}]], params)[0]
        return parse_verdict(answer.text) or "tie"

    return verdict
