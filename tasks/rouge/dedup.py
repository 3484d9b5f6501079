"""Deduplicate an instruction file with the ROUGE-L novelty filter (the logic of `alignflow dedup`).

Reads JSON (a list of objects, or JSON Lines in a .json file), JSONL or Parquet; keeps each row
whose instruction scores at most the threshold against the references (``--against``) and every
row kept before it, greedily in file order; writes the kept rows, with all their columns plus
``max_rouge_l`` and ``most_similar``, to a Parquet file, atomically.

The counts (kept, rejected, empty, missing, no tokens) are printed and also stored, as JSON, in
the output's Parquet schema metadata under ``alignflow.dedup``.

Rows whose instruction is missing (no such key, or null), empty (blank), or without a single token
under the chosen tokenizer (for example Korean text under ``rouge``) are not scored and not
written: they are counted and reported.

Run: ``python -m tasks.rouge.cli dedup --input FILE --column instruction --output OUT.parquet``
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from storage import atomic
from storage.errors import InputError
from storage.reader import PARQUET_SUFFIXES, json_type, read_parquet_table, read_records
from tasks.rouge.engine import RougeLFilter
from tasks.rouge.tokenize import TOKENIZERS

# Candidates per engine call: large enough to amortise, small enough for a smooth progress bar.
_BATCH = 1024
_ADDED_COLUMNS = ("max_rouge_l", "most_similar")
# Parquet schema metadata key holding the run's counts and options (JSON).
DEDUP_METADATA_KEY = b"alignflow.dedup"


class DedupError(InputError):
    """Bad input for dedup: the message names the file, and the line/row and column where known."""


@dataclass
class DedupResult:
    """What a dedup run did."""

    rows: int  # rows read from the input
    kept: int
    rejected: int
    missing: int  # no such key in the row, or null
    empty: int  # blank instruction
    no_tokens: int  # nothing left after tokenization (e.g. non-English text under "rouge")
    references: int  # reference rows used (from --against)
    output: Path | None
    seconds: float
    skipped_references: int = 0  # --against rows left out: missing, empty or without tokens
    notes: list[str] = field(default_factory=list)
    pairs: int = 0  # (candidate, pool item) pairs the greedy filter meets
    pairs_scored: int = 0  # of those, the pairs given an exact LCS (the others: settled by bounds)

    def summary(self) -> str:
        parts = [
            f"kept {self.kept}",
            f"rejected {self.rejected}",
            f"empty {self.empty}",
            f"missing {self.missing}",
            f"no tokens {self.no_tokens}",
        ]
        text = f"{self.rows} rows: " + ", ".join(parts)
        if self.references:
            text += f"; compared against {self.references} references"
        if self.skipped_references:
            text += f" ({self.skipped_references} reference rows without text skipped)"
        if self.output is not None:
            text += f"; wrote {self.output} in {self.seconds:.2f} s"
        lines = [text]
        if self.pairs:
            lines.append(f"pairs: {self.pairs} met, {self.pairs - self.pairs_scored} pruned by bounds, "
                         f"{self.pairs_scored} scored exactly")
        return "\n".join([*lines, *self.notes])


# ----------------------------------------------------------------------------- reading
def read_table(path: str | Path) -> pa.Table:
    """Read a JSON list of objects, JSON Lines, or Parquet file into a pyarrow table (storage.reader)."""
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return read_parquet_table(path, error=DedupError)
    records = list(read_records(path, format="json", error=DedupError))
    return _rows_to_table(path, [record for _, record in records], [where for where, _ in records])


def _rows_to_table(path: Path, rows: list[dict[str, Any]], locations: list) -> pa.Table:
    columns: dict[str, None] = {}  # every key of every row, in first-seen order
    for row in rows:
        for key in row:
            columns.setdefault(key, None)
    arrays = {}
    for name in columns:
        try:
            arrays[name] = pa.array([row.get(name) for row in rows])
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as error:
            raise _mixed_types_error(path, rows, locations, name, error) from error
    return pa.table(arrays) if arrays else pa.table({})


def _mixed_types_error(path: Path, rows: list[dict[str, Any]], locations: list, name: str, error: Exception) -> DedupError:
    first_type = None
    for where, row in zip(locations, rows):
        value = row.get(name)
        if value is None:
            continue
        if first_type is None:
            first_type = json_type(value)
        elif json_type(value) != first_type:
            return DedupError(path, f"expected a {first_type} as in earlier rows, got {json_type(value)} ({value!r:.60})",
                              where=where, field=name)
    return DedupError(path, f"cannot be stored in a table ({error})", field=name)


def instruction_values(path: Path, table: pa.Table, column: str) -> list[str | None]:
    """The column's values; None where missing. Errors name the file, row and column."""
    if column not in table.column_names:
        shown = ", ".join(table.column_names) or "none"
        raise DedupError(path, f"missing column (columns present: {shown})", field=column)
    values = table.column(column).to_pylist()
    for row, value in enumerate(values, start=1):
        if value is not None and not isinstance(value, str):
            raise DedupError(path, f"expected a string, got {json_type(value)} ({value!r:.60})", where=f"row {row}", field=column)
    return values


# ----------------------------------------------------------------------------- dedup
def dedup_table(
    table: pa.Table,
    column: str,
    *,
    path: Path = Path("<table>"),
    references: Sequence[str | None] = (),
    threshold: float = 0.7,
    tokenizer: str = "rouge",
    stemming: bool = False,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[pa.Table, DedupResult]:
    """Filter `table` on `column`; return the kept rows (+ max_rouge_l, most_similar) and counts."""
    check_options(threshold, tokenizer)
    started = time.perf_counter()
    values = instruction_values(path, table, column)
    engine = RougeLFilter(threshold=threshold, tokenizer=tokenizer, stemming=stemming, workers=workers)
    try:
        return _dedup_with(engine, table, values, path, references, tokenizer, started, progress)
    finally:
        engine.close()  # the worker processes


def _dedup_with(engine: RougeLFilter, table: pa.Table, values: list[str | None], path: Path,
                references: Sequence[str | None], tokenizer: str, started: float,
                progress: Callable[[int], None] | None) -> tuple[pa.Table, DedupResult]:
    tokenize = engine._tokenize  # the engine's own tokenizer, so "no tokens" means the same thing

    usable_refs = [text for text in references if text and text.strip() and tokenize(text)]
    engine.add_references(usable_refs)

    missing = empty = no_tokens = 0
    rows: list[int] = []  # rows offered to the filter
    texts: list[str] = []
    for row, value in enumerate(values):
        if value is None:
            missing += 1
        elif not value.strip():
            empty += 1
        else:
            rows.append(row)
            texts.append(value)

    kept_rows: list[int] = []
    scores: list[float] = []
    similar: list[str | None] = []
    rejected = 0
    if progress is not None:
        progress(len(values) - len(rows))
    for start in range(0, len(texts), _BATCH):
        decisions = engine.offer(texts[start : start + _BATCH])
        for row, decision in zip(rows[start : start + _BATCH], decisions):
            if decision.empty:
                # No token under this tokenizer: it would score 0 against everything and always
                # be kept; it is counted instead. (In the pool it changes no decision.)
                no_tokens += 1
            elif decision.kept:
                kept_rows.append(row)
                scores.append(decision.max_rouge_l)
                similar.append(decision.most_similar)
            else:
                rejected += 1
        if progress is not None:
            progress(len(decisions))

    kept_table = table.take(pa.array(kept_rows, type=pa.int64()))
    for name in _ADDED_COLUMNS:  # recomputed, so an input that already has them gets fresh ones
        if name in kept_table.column_names:
            kept_table = kept_table.drop_columns([name])
    kept_table = kept_table.append_column("max_rouge_l", pa.array(scores, type=pa.float64()))
    kept_table = kept_table.append_column("most_similar", pa.array(similar, type=pa.string()))

    notes = []
    if no_tokens and tokenizer == "rouge":
        notes.append(
            f"note: {no_tokens} rows have no a-z/0-9 token under the 'rouge' tokenizer "
            "(non-English text?); --tokenizer unicode scores them"
        )
    result = DedupResult(
        rows=len(values), kept=len(kept_rows), rejected=rejected, missing=missing, empty=empty,
        no_tokens=no_tokens, references=len(usable_refs), output=None,
        seconds=time.perf_counter() - started,
        skipped_references=len(references) - len(usable_refs), notes=notes,
        pairs=engine.pair_counts[0], pairs_scored=engine.pair_counts[1],
    )
    return kept_table, result


def check_options(threshold: float, tokenizer: str) -> None:
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or not 0.0 < threshold <= 1.0:
        raise DedupError(f"--threshold must be in (0, 1], got {threshold}")
    if tokenizer not in TOKENIZERS:
        raise DedupError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")


def dedup_file(
    input_path: str | Path,
    column: str,
    output: str | Path,
    *,
    against: str | Path | None = None,
    against_column: str | None = None,
    threshold: float = 0.7,
    tokenizer: str = "rouge",
    stemming: bool = False,
    workers: int = 1,
    show_progress: bool | None = None,
) -> DedupResult:
    """Read `input_path`, filter it, write the kept rows to `output` (Parquet) atomically.

    `show_progress` None: a progress bar on stderr when stderr is a terminal.
    """
    started = time.perf_counter()
    check_options(threshold, tokenizer)
    input_path, output = Path(input_path), Path(output)
    if output.exists() and output.is_dir():
        raise DedupError(f"cannot write {output}: it is a folder")
    table = read_table(input_path)
    references: list[str | None] = []
    if against is not None:
        against = Path(against)
        ref_table = read_table(against)
        references = instruction_values(against, ref_table, against_column or column)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=table.num_rows, unit="rows", desc="dedup", file=sys.stderr)
    try:
        kept, result = dedup_table(
            table, column, path=input_path, references=references, threshold=threshold,
            tokenizer=tokenizer, stemming=stemming, workers=workers,
            progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    # The counts travel with the file, so the rejected rows' count is not only on the terminal.
    summary = {
        "input": str(input_path), "column": column, "against": str(against) if against else None,
        "threshold": threshold, "tokenizer": tokenizer, "stemming": stemming,
        "rows": result.rows, "kept": result.kept, "rejected": result.rejected, "empty": result.empty,
        "missing": result.missing, "no_tokens": result.no_tokens, "references": result.references,
    }
    metadata = dict(kept.schema.metadata or {})
    metadata[DEDUP_METADATA_KEY] = json.dumps(summary).encode("utf-8")
    kept = kept.replace_schema_metadata(metadata)
    try:
        atomic.write_parquet(output, kept)
    except OSError as error:
        raise DedupError(f"cannot write {output}: {error}") from error
    result.output = output
    result.seconds = time.perf_counter() - started
    return result
