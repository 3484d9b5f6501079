"""The Self-Instruct filters: rules that reject a generated instruction or instance, each by name.

Instruction rules (each returns its reason string, or None when the text passes):

| reason            | rule                                                                      |
|-------------------|---------------------------------------------------------------------------|
| `empty`           | nothing but whitespace                                                    |
| `too_long`        | more than 150 words                                                       |
| `too_short`       | 3 words or fewer                                                          |
| `blocklist`       | a blocked word, whole word, any case (image(s), graph(s), picture(s),     |
|                   | file(s), map(s), draw, plot, "go to"); with `language="ko"` also a few    |
|                   | Korean nouns with the same meaning at the start of a word                 |
| `write_a_program` | starts with "Write a program", any case                                   |
| `bad_first_char`  | the first character is punctuation, or, for English only, not ASCII      |

`filter_instruction` applies them in that order and returns the first reason. Words are counted
by splitting on whitespace in every language. For Korean that counts eojeol (a word with its
particles, "사과를"), which is what a Korean reader calls a word; there is no word segmenter here
and the paper's limits are rough on purpose, so whitespace words are good enough.

Instance rules: `filter_instances` (see there).

Run its tests with `pytest tests/tasks/self_instruct/test_filters.py`.
"""

from __future__ import annotations

import re
import string
import unicodedata

from tasks.self_instruct.seeds import Instance

MAX_WORDS = 150
MIN_WORDS = 3  # an instruction of this many words or fewer is too short

INSTRUCTION_REASONS = ("empty", "too_long", "too_short", "blocklist", "write_a_program", "bad_first_char")
INSTANCE_REASONS = (
    "empty_output", "input_equals_output", "ends_with_colon", "conflicting_outputs", "duplicate", "over_limit",
)

BLOCKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
    "map", "maps", "draw", "plot", "go to",
)
# Korean nouns for the same things a text model cannot see or make. They are matched only at the
# start of a word (particles follow nouns in Korean: "이미지를"); words such as 지도 (map, but
# also "guidance") and 그림 (picture, but also the start of 그림자, "shadow") are left out on purpose.
BLOCKLIST_KO = ("이미지", "사진", "그래프", "파일", "도표")

# ASCII word boundaries, not \b: Korean letters count as word characters for \b, so "file을"
# (English noun + Korean particle) would otherwise escape the list.
_BLOCKED_EN = re.compile(
    r"(?<![A-Za-z0-9_])(?:"
    + "|".join(r"\s+".join(map(re.escape, word.split())) for word in BLOCKLIST)
    + r")(?![A-Za-z0-9_])",
    re.IGNORECASE,
)
_BLOCKED_KO = re.compile(r"(?<!\w)(?:" + "|".join(BLOCKLIST_KO) + ")")
_WRITE_A_PROGRAM = re.compile(r"^write\s+a\s+program", re.IGNORECASE)


def word_count(text: str) -> int:
    """The number of whitespace-separated words in `text` (eojeol for Korean)."""
    return len(text.split())


def check_empty(text: str) -> str | None:
    """Return "empty" when `text` holds nothing but whitespace, else None."""
    return "empty" if not text.strip() else None


def check_too_long(text: str) -> str | None:
    """Return "too_long" when `text` has more than 150 words, else None."""
    return "too_long" if word_count(text) > MAX_WORDS else None


def check_too_short(text: str) -> str | None:
    """Return "too_short" when `text` has 3 words or fewer, else None."""
    return "too_short" if word_count(text) <= MIN_WORDS else None


def check_blocklist(text: str, language: str = "en") -> str | None:
    """Return "blocklist" when `text` contains a blocked word (whole word, any case); with
    `language="ko"` the Korean nouns of `BLOCKLIST_KO` count too; else None."""
    if _BLOCKED_EN.search(text):
        return "blocklist"
    if language == "ko" and _BLOCKED_KO.search(text):
        return "blocklist"
    return None


def check_write_a_program(text: str) -> str | None:
    """Return "write_a_program" when `text` starts with "Write a program" (any case), else None."""
    return "write_a_program" if _WRITE_A_PROGRAM.match(text.strip()) else None


def is_punctuation(char: str) -> bool:
    """Whether `char` is ASCII punctuation (`string.punctuation`) or Unicode punctuation."""
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def check_first_char(text: str, language: str = "en") -> str | None:
    """Return "bad_first_char" when the first non-space character of `text` is punctuation, or, for
    English, not ASCII. Other languages only get the punctuation check (the paper's ASCII rule
    would drop every Korean instruction)."""
    stripped = text.strip()
    if not stripped:
        return None
    first = stripped[0]
    if is_punctuation(first):
        return "bad_first_char"
    if language == "en" and not first.isascii():
        return "bad_first_char"
    return None


def filter_instruction(text: str, language: str = "en") -> str | None:
    """The first reason `text` fails the instruction filters, in the order empty, too_long,
    too_short, blocklist, write_a_program, bad_first_char; None when it passes them all."""
    checks = (
        check_empty(text),
        check_too_long(text),
        check_too_short(text),
        check_blocklist(text, language),
        check_write_a_program(text),
        check_first_char(text, language),
    )
    return next((reason for reason in checks if reason is not None), None)


def _ends_with_colon(text: str) -> bool:
    return text.rstrip().endswith((":", "："))


def instance_reason(instance: Instance) -> str | None:
    """Why one instance is invalid on its own: "empty_output", "input_equals_output" or
    "ends_with_colon" (input or output ends with ":"), checked in that order; None when valid."""
    output = instance.output.strip()
    if not output:
        return "empty_output"
    if instance.input.strip() == output:
        return "input_equals_output"
    if _ends_with_colon(instance.input) or _ends_with_colon(instance.output):
        return "ends_with_colon"
    return None


def filter_instances(
    instances: list[Instance], max_instances: int = 5
) -> tuple[list[Instance], dict[str, int], bool]:
    """Filter the instances of one generated task.

    Steps, in order:
    1. drop each instance that is invalid on its own (`instance_reason`);
    2. if two remaining instances share a non-empty input but differ in output, the task is
       ambiguous: every remaining instance is counted as "conflicting_outputs" and the task is
       dropped. Tasks without input may have many different outputs (say, several poems);
    3. drop exact repeats of an (input, output) pair ("duplicate"), keeping the first;
    4. keep the first `max_instances`; the rest are "over_limit".

    Returns the kept instances, the number of instances removed for each reason (every reason of
    `INSTANCE_REASONS` is a key, so `len(kept) + sum(counts.values()) == len(instances)`), and
    whether the whole task was dropped. Inputs and outputs are compared with their ends stripped.
    """
    if max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")
    counts = {reason: 0 for reason in INSTANCE_REASONS}
    valid = []
    for instance in instances:
        reason = instance_reason(instance)
        if reason is None:
            valid.append(instance)
        else:
            counts[reason] += 1

    outputs_by_input: dict[str, set[str]] = {}
    for instance in valid:
        key = instance.input.strip()
        if key:
            outputs_by_input.setdefault(key, set()).add(instance.output.strip())
    if any(len(outputs) > 1 for outputs in outputs_by_input.values()):
        counts["conflicting_outputs"] += len(valid)
        return [], counts, True

    unique: list[Instance] = []
    seen: set[tuple[str, str]] = set()
    for instance in valid:
        key = (instance.input.strip(), instance.output.strip())
        if key in seen:
            counts["duplicate"] += 1
        else:
            seen.add(key)
            unique.append(instance)
    counts["over_limit"] += max(0, len(unique) - max_instances)
    return unique[:max_instances], counts, False
