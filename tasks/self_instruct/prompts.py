"""Render the Self-Instruct prompts from the text templates in `templates/<language>/`.

Each template is a plain text file filled with `str.format`; the final newline of the file is not
part of the prompt. The values (instructions written by people or models) are inserted as data, so
braces inside them need no escaping. Templates:

- `bootstrap.txt`: a header, the prompt instructions numbered "1." to "8." and an open "9." that the
  model continues (`render_bootstrap_prompt`);
- `classification.txt`: few-shot "Is it classification? Yes/No" (`render_classification_prompt`);
- `instances_input_first.txt` / `instances_output_first.txt`: few-shot instance generation, input
  first for ordinary tasks and class label first for classification tasks (`render_instance_prompt`).

`stop_sequences(kind, language)` gives the stop strings that go with each prompt.

    import random
    from tasks.self_instruct.prompts import render_bootstrap_prompt, sample_prompt_instructions
    chosen = sample_prompt_instructions(seed_texts, machine_texts, random.Random(0))
    prompt = render_bootstrap_prompt(chosen, language="en")

Run its tests with `pytest tests/tasks/self_instruct/test_prompts.py`.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

TEMPLATE_DIR = Path(__file__).parent / "templates"
LANGUAGES = ("en", "ko")

# What each prompt's few-shot examples call a task, so that a completion that starts a new task
# can be cut off (by the generator's stop strings, and again by the parsers).
TASK_LABELS = {"en": "Task:", "ko": "작업:"}


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"no prompt templates for language {language!r}; available: {', '.join(LANGUAGES)}")


@lru_cache(maxsize=None)
def load_template(name: str, language: str = "en") -> str:
    """The text of template `name` ("bootstrap", "classification", "instances_input_first",
    "instances_output_first") for `language`, without the file's final newline."""
    _check_language(language)
    path = TEMPLATE_DIR / language / f"{name}.txt"
    if not path.is_file():
        raise ValueError(f"no template {name!r} for language {language!r} (looked for {path})")
    text = path.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def bootstrap_header(language: str = "en") -> str:
    """The first line of the bootstrap template (the request for more tasks), used by the parser
    to notice a model that starts the list over."""
    return load_template("bootstrap", language).split("\n", 1)[0]


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) turned into one space and the ends
    stripped, so that an instruction always fills exactly one numbered line of a prompt."""
    return re.sub(r"\s+", " ", text).strip()


def render_bootstrap_prompt(instructions: Sequence[str], language: str = "en") -> str:
    """The instruction-bootstrap prompt: the header, `instructions` numbered from 1, and the next
    number left open ("9." for 8 instructions) for the model to continue.

    Each instruction is put on one line (`one_line`). Raises ValueError for an empty list or an
    instruction that is blank.
    """
    if not instructions:
        raise ValueError("render_bootstrap_prompt needs at least one instruction")
    lines = []
    for number, instruction in enumerate(instructions, start=1):
        text = one_line(instruction)
        if not text:
            raise ValueError(f"prompt instruction {number} is blank")
        lines.append(f"{number}. {text}")
    return load_template("bootstrap", language).format(
        numbered_instructions="\n".join(lines), next_index=len(lines) + 1
    )


def render_classification_prompt(instruction: str, language: str = "en") -> str:
    """The few-shot prompt asking whether `instruction` is a classification task; the model's
    continuation is read with `parsing.parse_classification`."""
    return load_template("classification", language).format(instruction=_task_text(instruction))


def render_instance_prompt(instruction: str, is_classification: bool, language: str = "en") -> str:
    """The few-shot instance-generation prompt for `instruction`: output first (class label, then
    input) for a classification task, input first otherwise. Read the continuation with
    `parsing.parse_instances(completion, is_classification)`."""
    name = "instances_output_first" if is_classification else "instances_input_first"
    return load_template(name, language).format(instruction=_task_text(instruction))


def stop_sequences(kind: str, language: str = "en", *, last_index: int = 20) -> list[str]:
    """Stop strings for a prompt `kind` ("bootstrap", "classification" or "instances").

    bootstrap: stop when the model reaches item `last_index` (the paper lets it write up to 20);
    classification: stop after the answer line; instances: stop when the model starts a new task or
    leaves a blank line.
    """
    _check_language(language)
    task = TASK_LABELS[language]
    if kind == "bootstrap":
        return [f"\n{last_index}.", f"\n{last_index})"]
    if kind == "classification":
        return ["\n\n", f"\n{task}"]
    if kind == "instances":
        # A blank line closes a task's examples in every template: what follows is another task or noise.
        return [f"\n{task}", "\n\n"]
    raise ValueError(f"unknown prompt kind {kind!r}; expected bootstrap, classification or instances")


def sample_prompt_instructions(
    seed_instructions: Sequence[str],
    machine_instructions: Sequence[str],
    rng: random.Random,
    num_seed: int = 6,
    num_machine: int = 2,
) -> list[str]:
    """Pick the instructions of one bootstrap prompt, as the paper does, and shuffle them.

    Takes `num_machine` machine-generated instructions (fewer while the machine pool is smaller)
    and fills the rest of the `num_seed + num_machine` places with seed instructions, so the total
    stays 8 by default. When there are not enough seeds either, all of them are used. Only `rng`
    is used for randomness: the same rng state gives the same prompt.
    """
    if num_seed < 0 or num_machine < 0 or num_seed + num_machine == 0:
        raise ValueError(f"num_seed={num_seed} and num_machine={num_machine} must be >= 0, not both 0")
    if not seed_instructions and not machine_instructions:
        raise ValueError("sample_prompt_instructions needs seed or machine instructions")
    total = num_seed + num_machine
    machine = rng.sample(list(machine_instructions), min(num_machine, len(machine_instructions)))
    seeds = rng.sample(list(seed_instructions), min(total - len(machine), len(seed_instructions)))
    chosen = seeds + machine
    rng.shuffle(chosen)
    return chosen


def _task_text(instruction: str) -> str:
    text = one_line(instruction)
    if not text:
        raise ValueError("the instruction is blank")
    return text
