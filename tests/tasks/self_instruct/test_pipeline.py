"""The batch commit: shards scored in parallel against the planned pool, decided in request order."""

from __future__ import annotations

from tasks.rouge.engine import RougeLFilter
from tasks.rouge.engine import nearest
from tasks.self_instruct.pipeline import SelfInstructConfig, _decide_in_order


def _row(text: str) -> dict:
    return {"candidate": text, "reason": None, "kept": False, "max_rouge_l": None, "most_similar": None}


def test_sharded_batches_decide_exactly_as_one_sequential_filter(instruction_stream) -> None:
    """Three batches of 120 candidates in shards of 7: every decision, score and neighbour equals the greedy filter's."""
    config = SelfInstructConfig()
    stream = instruction_stream(400, seed=5)
    seeds, candidates = stream[:40], stream[40:400]
    sequential = RougeLFilter(threshold=config.rouge_threshold)
    sequential.add_references(seeds)
    expected = sequential.offer(candidates)

    pool, rows = list(seeds), []
    for start in range(0, len(candidates), 120):
        batch = [_row(text) for text in candidates[start : start + 120]]
        for shard_start in range(0, len(batch), 7):  # what each worker does, against the planned pool
            shard = batch[shard_start : shard_start + 7]
            for row, (score, column) in zip(shard, nearest([r["candidate"] for r in shard], pool)):
                row.update(max_rouge_l=score, most_similar=None if column is None else pool[column])
        _decide_in_order(config, batch)
        pool += [r["candidate"] for r in batch if r["kept"]]
        rows += batch

    assert sum(r["kept"] for r in rows) == sum(d.kept for d in expected) > 0
    assert any(not d.kept for d in expected)
    for row, decision in zip(rows, expected):
        assert (row["kept"], row["max_rouge_l"], row["most_similar"]) == (decision.kept, decision.max_rouge_l, decision.most_similar)
        assert row["reason"] == (None if decision.kept else "rouge_l")


def test_rows_rejected_by_earlier_filters_are_left_alone() -> None:
    config = SelfInstructConfig()
    rows = [{**_row("write a poem about the sea"), "max_rouge_l": 0.1},
            {**_row("write a poem about the sea"), "reason": "too_short"},
            {**_row("write a poem about the sea"), "max_rouge_l": 0.1}]
    _decide_in_order(config, rows)
    assert [r["kept"] for r in rows] == [True, False, False]
    assert [r["reason"] for r in rows] == [None, "too_short", "rouge_l"]
    assert rows[2]["max_rouge_l"] == 1.0 and rows[2]["most_similar"] == "write a poem about the sea"


def test_part_rows_are_read_once_and_reread_when_the_file_changes(tmp_path) -> None:
    import os

    import pyarrow as pa

    from storage import atomic
    from tasks.self_instruct.pipeline import part_path, part_rows

    for index, name in enumerate(["a", "b"], start=1):
        atomic.write_parquet(part_path(tmp_path, "classify", index), pa.Table.from_pylist([{"instruction_id": name}]))
    assert [r["instruction_id"] for r in part_rows(tmp_path, "classify", 2)] == ["a", "b"]
    assert [r["instruction_id"] for r in part_rows(tmp_path, "classify", 1)] == ["a"]
    # A folder reused for another run (a part written again) is read again, not served stale.
    path = part_path(tmp_path, "classify", 2)
    atomic.write_parquet(path, pa.Table.from_pylist([{"instruction_id": "c"}, {"instruction_id": "d"}]))
    os.utime(path, ns=(1, 1))
    assert [r["instruction_id"] for r in part_rows(tmp_path, "classify", 2)] == ["a", "c", "d"]
