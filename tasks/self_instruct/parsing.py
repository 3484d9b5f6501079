"""Turn raw model completions of the Self-Instruct prompts into instructions, answers and instances.

Completions from small or base models are messy; the parsers accept what a reasonable reader
would and never raise on garbage (they return an empty list or None instead):

- `parse_instructions`: the continuation of a bootstrap prompt that ends in "9.";
- `parse_classification`: the yes/no answer (English and Korean);
- `parse_instances`: "Input:/Output:" examples (input first) or "Class label:/Input:" pairs
  (output first), with the Korean labels too.

Run its tests with `pytest tests/tasks/self_instruct/test_parsing.py`.
"""

from __future__ import annotations

import re

from tasks.self_instruct.prompts import LANGUAGES, bootstrap_header, one_line
from tasks.self_instruct.seeds import Instance

# A numbered list item: "10.", "10)", "10:", "10 -", "#10.", "Task 10:", "작업 10:", optionally in
# markdown bold. "10.5 liters" and "10:30" are not item markers (a number starting a line).
_ITEM = re.compile(
    r"""^\s*(?:\*\*)?\s*
        (?:(?:task|instruction|작업|지시문?)\s*)?\#?\s*
        (?P<number>\d{1,4})
        \s*(?:\.(?!\d)|\)|:(?!\d)|[-–—](?!\d))
        \s*(?:\*\*)?\s*(?P<text>.*)$""",
    re.IGNORECASE | re.VERBOSE,
)


# A label some models put in front of an item ("9. Task: Write ..."): not part of the instruction.
_ITEM_LABEL = re.compile(r"^(?:task|instruction|작업|지시문?)\s*[:：]\s*", re.IGNORECASE)


def _headers() -> list[str]:
    return [bootstrap_header(language).casefold() for language in LANGUAGES]


def _is_header(line: str) -> bool:
    """Whether `line` repeats (the start of) a bootstrap header, in any language."""
    text = line.strip().casefold()
    if len(text) < 12:
        return False
    return any(header.startswith(text) or text.startswith(header[:40]) for header in _headers())


def parse_instructions(completion: str, start_index: int = 9, finish_reason: str | None = None) -> list[str]:
    """The new instructions in the continuation of a bootstrap prompt that ends in "{start_index}.".

    The first item may come without its number (the prompt already wrote "9."), or with it. Later
    items are numbered lines ("10.", "10)", "10:", "10 -", "Task 10:"); blank lines are skipped.
    The list ends at the first line that is not a numbered item, at a number that does not go
    forward (the model restarting its list) and at a repeated header. Items are returned on one
    line each, stripped; empty items are left out.

    With `finish_reason == "length"` the item the text was cut in is dropped; an item followed by
    a newline, or by a line that ended the list, was finished and is kept.
    """
    text = completion.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    items: list[str] = []
    current = start_index - 1  # the number of the last item seen
    ended_early = False
    last_line_index = -1  # which line the last item came from
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        if _is_header(line):
            ended_early = True
            break
        match = _ITEM.match(line)
        if match:
            number = int(match.group("number"))
            if number <= current:
                ended_early = True
                break
            current = number
            items.append(match.group("text"))
            last_line_index = index
        elif not items and current == start_index - 1:
            # The unnumbered start of the completion continues the prompt's open "9.".
            current = start_index
            items.append(line)
            last_line_index = index
        else:
            ended_early = True
            break

    truncated = finish_reason == "length"
    if truncated and items and not ended_early and last_line_index == len(lines) - 1:
        # The last item runs to the very end of the text without a newline: it was cut off.
        items.pop()
    return [cleaned for cleaned in (_ITEM_LABEL.sub("", one_line(item)) for item in items) if cleaned]


_ANSWER_PREFIX = re.compile(
    r"^\s*(?:is it (?:a )?classification(?: task)?\s*\??|분류 작업인가요\s*\??|answer\s*:|답\s*:)\s*",
    re.IGNORECASE,
)
_YES_NO = re.compile(r"^[\s\"'*(\[]*(?P<word>yes|no|아니요|아니오|아뇨|아니|예|네)(?!\w)", re.IGNORECASE)


def parse_classification(completion: str) -> bool | None:
    """The answer of a classification-identification completion: True for yes ("Yes", "예",
    "네"), False for no ("No", "아니요", "아니오"), None when the first non-blank line gives no
    clear answer. A repeated "Is it classification?" before the answer is skipped."""
    for line in completion.replace("\r", "\n").split("\n"):
        if line.strip():
            break
    else:
        return None
    line = _ANSWER_PREFIX.sub("", line, count=1)
    match = _YES_NO.match(line)
    if not match:
        return None
    return match.group("word").casefold() in ("yes", "예", "네")


# Label lines of the instance prompts. The label must start the line; the value may follow it.
_COLON = r"\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*"
_EXAMPLE = re.compile(r"^\s*(?:\*\*)?\s*(?:example|예시|예제)\s*#?\s*\d*\s*[:.：]?\s*(?:\*\*)?\s*$", re.IGNORECASE)
_INPUT = re.compile(r"^\s*(?:\*\*)?\s*(?:input|입력)" + _COLON + r"(?P<value>.*)$", re.IGNORECASE)
_OUTPUT = re.compile(r"^\s*(?:\*\*)?\s*(?:output|출력)" + _COLON + r"(?P<value>.*)$", re.IGNORECASE)
_LABEL = re.compile(
    r"^\s*(?:\*\*)?\s*(?:class\s+label|label|클래스\s*레이블|레이블|클래스)" + _COLON + r"(?P<value>.*)$",
    re.IGNORECASE,
)
_NEXT_TASK = re.compile(r"^\s*(?:task|작업)\s*[:：]", re.IGNORECASE)
_NO_INPUT = {"", "<noinput>", "<no input>", "<입력 없음>", "<입력없음>", "<없음>"}


def _clean_input(lines: list[str]) -> str:
    text = "\n".join(lines).strip()
    return "" if text.casefold() in _NO_INPUT else text


def parse_instances(completion: str, is_classification: bool, finish_reason: str | None = None) -> list[Instance]:
    """The instances in an instance-generation completion, in order; none for garbage.

    Input first (`is_classification=False`): "Example N" headers are optional; each "Input:" starts
    an instance and "Output:" gives its output. An empty or "<noinput>" input, or an "Output:" with
    no "Input:" before it, means the task needs no input.
    Output first (`is_classification=True`): each "Class label:" (or "Label:") gives the output of
    the instances whose "Input:" lines follow it.
    Korean labels ("입력:", "출력:", "예시 1", "클래스 레이블:", "레이블:") work the same. Values may
    span several lines and are stripped. Parsing stops where the model starts a new "Task:".
    Inputs without an "Output:" line (input first) and labels without an "Input:" line (output
    first) are left out, and with `finish_reason == "length"` the last instance, possibly cut off,
    is left out too. An empty output is kept: judging it is `filters.filter_instances`' job, so
    that it is counted in the funnel.
    """
    lines = completion.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    instances: list[Instance] = []
    if is_classification:
        _parse_output_first(lines, instances)
    else:
        _parse_input_first(lines, instances)
    if finish_reason == "length" and instances:
        instances.pop()
    return instances


def _parse_input_first(lines: list[str], instances: list[Instance]) -> None:
    input_lines: list[str] | None = None
    output_lines: list[str] | None = None
    field: list[str] | None = None  # the field that continuation lines extend

    def flush() -> None:
        if output_lines is not None:
            output = "\n".join(output_lines).strip()
            instances.append(Instance(input=_clean_input(input_lines or []), output=output))

    for line in lines:
        if _NEXT_TASK.match(line):
            break
        if _EXAMPLE.match(line):
            flush()
            input_lines = output_lines = field = None
            continue
        match = _INPUT.match(line)
        if match:
            flush()
            input_lines, output_lines = [match.group("value")], None
            field = input_lines
            continue
        match = _OUTPUT.match(line)
        if match:
            if output_lines is not None:  # a second output without a new input: a new instance
                flush()
                input_lines = None
            output_lines = [match.group("value")]
            field = output_lines
            continue
        if field is not None:
            field.append(line)
    flush()


def _parse_output_first(lines: list[str], instances: list[Instance]) -> None:
    label: str | None = None
    input_lines: list[str] | None = None
    field: list[str] | None = None

    def flush() -> None:
        if label is not None and input_lines is not None:
            instances.append(Instance(input=_clean_input(input_lines), output=label))

    for line in lines:
        if _NEXT_TASK.match(line):
            break
        if _EXAMPLE.match(line):  # harmless here: the labels delimit the instances
            continue
        match = _LABEL.match(line)
        if match:
            flush()
            label, input_lines, field = match.group("value").strip(), None, None
            continue
        match = _INPUT.match(line)
        if match:
            flush()
            input_lines = [match.group("value")]
            field = input_lines
            continue
        if field is not None:
            field.append(line)
    flush()
