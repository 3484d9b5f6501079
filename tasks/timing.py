"""Where the time goes: wall time per stage, recorded by the flows and printed when a command ends.

    with stage_timer("sft"):
        sft = sft_step(config, data)
    print(time_report())          # one line per stage, in the order they ran

The records live in this process (the flows run their stages here, even when a stage's work is
farmed out to workers), so `alignflow pipeline` prints pretrain, self-instruct and every align stage.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

_RECORDS: list[tuple[str, float]] = []


@contextmanager
def stage_timer(stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        _RECORDS.append((stage, time.perf_counter() - start))


def time_records() -> list[tuple[str, float]]:
    return list(_RECORDS)


def reset_times() -> None:
    _RECORDS.clear()


def time_report(records: list[tuple[str, float]] | None = None) -> str:
    """`stage  seconds  share` lines and a total; empty when nothing was timed."""
    records = time_records() if records is None else records
    if not records:
        return ""
    total = sum(seconds for _, seconds in records)
    width = max(len(stage) for stage, _ in records)
    lines = ["where the time went:"]
    lines += [f"  {stage:<{width}}  {seconds:7.1f} s  {seconds / total:6.1%}" for stage, seconds in records]
    lines.append(f"  {'total':<{width}}  {total:7.1f} s")
    return "\n".join(lines)
