"""The generator interface shared by every backend: decoding parameters, completions, `Generator`.

A flow builds `DecodingParams` once (it is a pydantic model, so it shows up as a form in the Prefect
UI and is saved in manifests) and hands lists of prompts to `Generator.complete` or lists of chat
conversations to `Generator.chat`. Results come back in input order, one `Completion` per input.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.errors import AlignflowError


class GenerationError(AlignflowError, RuntimeError):
    """A generation call that produced nothing usable (every request failed), or an unsupported option."""


class DecodingParams(BaseModel):
    """How to decode: the strategy, its knobs, the length limit, stop sequences and the seed."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["greedy", "sample", "beam"] = Field(
        "sample",
        description="greedy: always the most likely token; sample: draw from the (temperature, top-k, "
        "top-p filtered) distribution; beam: beam search with num_beams beams (local backend only).",
    )
    max_new_tokens: int = Field(128, ge=1, le=32768, description="Most tokens generated per completion.")
    temperature: float = Field(
        0.7, ge=0.0, le=10.0, description="Sampling temperature; 0 makes sampling greedy. Ignored by greedy and beam."
    )
    top_k: int = Field(0, ge=0, description="Sample only among the k most likely tokens; 0 turns it off.")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling: sample among the most likely tokens whose probability adds up to p."
    )
    num_beams: int = Field(4, ge=1, le=64, description="Beams kept by beam search (strategy 'beam' only).")
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        le=10.0,
        description="CTRL-style penalty (>1 discourages) on every token already in the prompt or the output; 1 is off.",
    )
    presence_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        description="Subtracted from the logit of every token already generated (OpenAI semantics); 0 is off.",
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Stop sequences: the text ends before the first one found, which is not included.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for sampling; the same seed and inputs give the same outputs.")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        for i, item in enumerate(value):
            if item == "":
                raise ValueError(f"stop[{i}] is an empty string; a stop sequence needs at least one character")
        return value

    @model_validator(mode="after")
    def _beam_needs_beams(self) -> "DecodingParams":
        if self.strategy == "beam" and self.num_beams < 2:
            raise ValueError("strategy 'beam' needs num_beams >= 2 (num_beams=1 is greedy)")
        return self

    @property
    def is_greedy(self) -> bool:
        """Greedy decoding, either asked for or implied by sampling at temperature 0."""
        return self.strategy == "greedy" or (self.strategy == "sample" and self.temperature == 0.0)


FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class Completion:
    """One generated text, without the prompt and without special tokens.

    finish_reason: "stop" (end of sequence or a stop sequence), "length" (max_new_tokens reached) or
    "error" (an endpoint request that failed after its retries; text is then "" and `error` says why).
    """

    text: str
    finish_reason: FinishReason
    completion_tokens: int
    prompt_tokens: int = 0
    error: str | None = None


class Generator(ABC):
    """A text generator. Implementations keep their order: output i answers input i."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What generated the text, for manifests and Parquet columns, e.g. {"backend": "local", "model": "base@3"}.

        Never holds a secret.
        """

    @abstractmethod
    def complete(self, prompts: Sequence[str], params: DecodingParams) -> list[Completion]:
        """Continue each prompt as plain text."""

    @abstractmethod
    def chat(self, conversations: Sequence[list[dict]], params: DecodingParams) -> list[Completion]:
        """Answer each conversation (a list of {"role", "content"} messages) as the assistant."""

    def close(self) -> None:
        """Release what the generator holds (model memory, connections)."""

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for logs and manifests (requests, retries, tokens...); empty when a backend keeps none."""
        return {}

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def row_seeds(seed: int, keys: Sequence[str]) -> list[int]:
    """A seed per input, from the call's seed, the input's text and how often that text came before.

    Seeding per input (not per batch) makes an input's sample independent of which other inputs share
    its batch and of their order, so a resumed run that batches differently still draws the same
    text; the occurrence count makes repeated inputs in one call draw different samples.
    """
    seen: Counter[str] = Counter()
    out = []
    for key in keys:
        occurrence = seen[key]
        seen[key] += 1
        digest = hashlib.sha256(f"{seed}\x00{occurrence}\x00{key}".encode("utf-8", "surrogatepass")).digest()
        out.append(int.from_bytes(digest[:4], "little") & 0x7FFFFFFF)
    return out


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop sequence; returns (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut < 0:
        return text, False
    return text[:cut], True


def conversation_key(conversation: list[dict]) -> str:
    """A stable text key of a conversation, for `row_seeds`."""
    return "\x01".join(f"{m.get('role', '')}\x02{m.get('content', '')}" for m in conversation)
