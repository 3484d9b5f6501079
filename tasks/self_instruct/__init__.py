"""Self-Instruct: bootstrap an instruction dataset from a few human-written seed tasks.

The modules in this package that need no model are:

- `seeds`: load seed tasks (Self-Instruct JSONL, Alpaca JSON, Parquet or JSONL with Alpaca columns);
- `prompts`: render the prompt templates under `templates/<language>/` and sample prompt instructions;
- `parsing`: turn raw model completions into instructions, yes/no answers and instances;
- `filters`: the paper's instruction and instance filters, each returning a named reason.

The demo seed sets live in `demo/seeds_en.jsonl` and `demo/seeds_ko.jsonl`.
"""
