"""`alignflow dedup`: drop near-duplicate instructions from a JSON, JSONL or Parquet file.

`register(subparsers)` adds the `dedup` command to the `alignflow` parser; this module also runs
alone:

    python -m tasks.rouge.cli dedup --input data.jsonl --column instruction \
        [--against seeds.jsonl] [--threshold 0.7] [--tokenizer rouge|unicode] [--stemming] \
        --output kept.parquet
"""

from __future__ import annotations

import argparse
import sys

from tasks.rouge.dedup import DedupError, dedup_file
from tasks.rouge.tokenize import TOKENIZERS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `dedup` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "dedup",
        help="drop instructions too similar (ROUGE-L) to earlier ones or to a reference file",
        description=(
            "Greedy ROUGE-L novelty filter, exactly as Self-Instruct/Alpaca decide (rouge-score's "
            "F-measure): a row is dropped when its ROUGE-L with any reference or any row kept "
            "before it is above the threshold. Writes the kept rows with max_rouge_l and "
            "most_similar to a Parquet file."
        ),
    )
    parser.add_argument("--input", required=True, metavar="FILE",
                        help="instructions to filter: a JSON list of objects, JSON Lines (.jsonl), or Parquet")
    parser.add_argument("--column", default="instruction",
                        help="the column holding the text to compare (default: instruction)")
    parser.add_argument("--against", metavar="FILE", default=None,
                        help="reference rows (e.g. seed tasks) every row is compared against; never filtered")
    parser.add_argument("--against-column", default=None,
                        help="text column of --against (default: the same as --column)")
    parser.add_argument("--threshold", type=float, default=0.7,
                        help="drop a row when its highest ROUGE-L F-measure is above this, in (0, 1] (default: 0.7)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="rouge",
                        help="rouge: rouge-score's tokenizer (a-z and 0-9 only, exact); unicode: any "
                             "script, Chinese/Japanese per character, Korean by word (default: rouge)")
    parser.add_argument("--stemming", action="store_true",
                        help="Porter-stem tokens longer than 3 letters, as rouge-score's use_stemmer")
    parser.add_argument("--workers", type=int, default=-1,
                        help="processes scoring candidates in parallel, this one included (-1: every "
                             "core, the default; decisions are the same for any count)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it shows only when stderr is a terminal anyway)")
    parser.add_argument("--output", required=True, metavar="OUT.parquet",
                        help="where to write the kept rows (Parquet; written atomically)")
    parser.set_defaults(func=run_dedup_command)


def run_dedup_command(args: argparse.Namespace) -> int:
    """Run `dedup` from parsed arguments; print the counts; return the exit status."""
    try:
        result = dedup_file(
            args.input, args.column, args.output,
            against=args.against, against_column=args.against_column,
            threshold=args.threshold, tokenizer=args.tokenizer, stemming=args.stemming,
            workers=args.workers, show_progress=False if args.no_progress else None,
        )
    except DedupError as error:
        print(f"alignflow dedup: error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.rouge.cli", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
