"""Parquet layouts shared by the flows (see DESIGN.md, "Table layouts")."""

from __future__ import annotations

import pyarrow as pa

INSTRUCTIONS = pa.schema([
    ("id", pa.string()),
    ("instruction", pa.string()),
    ("is_classification", pa.bool_()),
    ("origin", pa.string()),  # seed | machine
    ("request_idx", pa.int64()),  # the bootstrap request that produced it (null for seeds)
    ("max_rouge_l", pa.float64()),  # highest ROUGE-L F with any seed or earlier kept instruction
    ("most_similar", pa.string()),
    ("prompt_seed_ids", pa.list_(pa.string())),  # ids of the instructions shown in its prompt
    ("generator", pa.string()),  # JSON identity of the generator, never a secret
    ("decoding", pa.string()),  # JSON decoding parameters
])

INSTANCES = pa.schema([("instruction_id", pa.string()), ("input", pa.string()), ("output", pa.string())])

REJECTED = pa.schema([
    ("candidate", pa.string()),
    ("reason", pa.string()),
    ("max_rouge_l", pa.float64()),
    ("most_similar", pa.string()),
    ("request_idx", pa.int64()),
])

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SFT = pa.schema([
    ("instruction_id", pa.string()),
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("messages", pa.list_(MESSAGE)),
])

PREFERENCES = pa.schema([
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("judge", pa.string()),
    ("chosen_score", pa.float64()),
    ("rejected_score", pa.float64()),
    ("chosen_len", pa.int64()),  # characters
    ("rejected_len", pa.int64()),
])


def instance_prompt(instruction: str, input_text: str) -> str:
    """The user turn of an instance: the instruction, then its input when it has one."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def sft_table(instructions: pa.Table, instances: pa.Table) -> pa.Table:
    """The SFT view: one row per instance, as prompt/completion and as chat messages."""
    text_of = dict(zip(instructions["id"].to_pylist(), instructions["instruction"].to_pylist()))
    rows = []
    for row in instances.to_pylist():
        prompt = instance_prompt(text_of[row["instruction_id"]], row["input"])
        rows.append({
            "instruction_id": row["instruction_id"], "prompt": prompt, "completion": row["output"],
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}],
        })
    return pa.Table.from_pylist(rows, schema=SFT)
