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


# ---- extending a registered version --------------------------------------------------------------

import hashlib  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from tasks.generation.params import Completion, DecodingParams, Generator  # noqa: E402


class WorldWriter(Generator):
    """A rule-based generator: continues a bootstrap prompt with two demo-world instructions picked by a
    hash of the prompt and seed (after `echo`, when given: a fixed first candidate), answers "No" to
    the classification question, and writes one input-first instance per task."""

    def __init__(self, echo: str | None = None):
        from tasks.self_instruct.demo_world import world_tasks

        self.texts = [task.instruction for task in world_tasks("en", 400, seed=7)]
        self.echo = echo

    def identity(self) -> dict[str, Any]:
        return {"backend": "world-writer"}

    def complete(self, prompts: Sequence[str], params: DecodingParams) -> list[Completion]:
        out = []
        for prompt in prompts:
            digest = int(hashlib.sha256(f"{params.seed}|{prompt}".encode()).hexdigest(), 16)
            if prompt.rstrip().endswith("Is it classification?"):
                text = " No"
            elif prompt.endswith("Input:"):
                text = f" the word number {digest % 97}\nOutput: {digest % 89} is the answer\n"
            else:
                picked = [self.texts[digest % len(self.texts)], self.texts[(digest // 7) % len(self.texts)]]
                items = ([self.echo] if self.echo else []) + picked
                text = " " + "\n".join(f"{9 + i}. {item}" if i else item for i, item in enumerate(items)) + "\n"
            out.append(Completion(text=text, finish_reason="stop", completion_tokens=len(text.split())))
        return out

    def chat(self, conversations, params):
        raise NotImplementedError


def _seeds():
    from tasks.self_instruct.seeds import demo_seed_path, load_seed_tasks

    return load_seed_tasks(demo_seed_path("en"))


def _drive(config, work, generator, batches: int | None = None) -> None:
    """What the flow does, batch by batch, without Prefect: plan, generate the shards, commit."""
    from tasks.self_instruct.pipeline import commit_batch, load_state, plan_batch, run_shard

    seeds = _seeds()
    while load_state(work)["stage"] != "done" and batches != 0:
        plan = plan_batch(config, seeds, work)
        commit_batch(config, work, plan, [run_shard(config, generator, plan["stage"], shard, plan["decoding"], plan["pool"])
                                          for shard in plan["shards"]])
        batches = None if batches is None else batches - 1


def _first_version(tmp_path):
    from tasks.self_instruct.pipeline import assemble_tables, load_state, totals

    config = SelfInstructConfig(num_instructions=6, requests_per_batch=4, shard_size=2)
    work = tmp_path / "v1"
    _drive(config, work, WorldWriter())
    tables, funnel = assemble_tables(config, _seeds(), work)
    return config, tables, totals(load_state(work))


def test_extend_keeps_the_old_rows_and_numbering_and_scores_against_the_old_instructions(tmp_path) -> None:
    from tasks.self_instruct.pipeline import assemble_tables, base_info, load_state, plan_batch, start_extending

    config, old, old_totals = _first_version(tmp_path)
    old_machine = [r for r in old["instructions"].to_pylist() if r["origin"] == "machine"]
    assert old_machine and old_totals["machine_numbers"] >= 6
    echo = old_machine[0]["instruction"] + " now"  # a near-copy of an old machine instruction
    work = tmp_path / "v2"
    extend = config.model_copy(update={"extend": "self-instruct@1"})
    start_extending(work, "self-instruct@1", old, old_totals)
    assert base_info(load_state(work))["machine_instructions"] == len(old_machine)

    plan = plan_batch(extend, _seeds(), work)  # the ROUGE-L pool: seeds, then the old machine instructions
    assert plan["pool"][-len(old_machine):] == [r["instruction"] for r in old_machine]
    assert plan["shards"][0][0]["request_idx"] == old_totals["requests"]
    _drive(extend, work, WorldWriter(echo=echo))
    new, funnel = assemble_tables(extend, _seeds(), work)

    for name in ("instructions", "instances", "rejected", "sft"):  # old rows unchanged, new rows appended
        rows, old_rows = new[name].to_pylist(), old[name].to_pylist()
        assert rows[: len(old_rows)] == old_rows, name
        assert len(rows) > len(old_rows), name
    added = new["instructions"].to_pylist()[old["instructions"].num_rows:]
    assert all(r["origin"] == "machine" for r in added)
    assert [int(r["id"].rpartition("_")[2]) for r in added] == list(range(old_totals["machine_numbers"], old_totals["machine_numbers"] + len(added)))
    assert all(r["request_idx"] >= old_totals["requests"] for r in added)
    # The near-copy is rejected against the old instruction, in every request.
    echoes = [r for r in new["rejected"].to_pylist()[old["rejected"].num_rows:] if r["candidate"] == echo]
    assert echoes and all(r["reason"] == "rouge_l" and r["most_similar"] == old_machine[0]["instruction"] for r in echoes)
    # The funnel counts the new work; `extends` says what it started from.
    assert funnel["kept"] == len(added) and funnel["requests"] == load_state(work)["requests"]
    assert funnel["extends"]["ref"] == "self-instruct@1" and funnel["candidates"] == sum(funnel["rejected"].values()) + funnel["kept"]


def test_extend_resumed_from_its_state_file_gives_the_uninterrupted_dataset(tmp_path) -> None:
    from tasks.self_instruct import pipeline

    config, old, old_totals = _first_version(tmp_path)
    extend = config.model_copy(update={"extend": "self-instruct@1"})
    tables = {}
    for name, stop_after in (("clean", None), ("resumed", 1)):
        work = tmp_path / name
        pipeline.start_extending(work, "self-instruct@1", old, old_totals)
        _drive(extend, work, WorldWriter(), batches=stop_after)
        if stop_after:  # a new process: nothing cached, and a second start leaves the folder as it is
            pipeline._PART_ROWS.clear()
            state = pipeline.load_state(work)
            assert state["batches"]["bootstrap"] == 1 and state["stage"] == "bootstrap"
            assert pipeline.start_extending(work, "self-instruct@1", old, old_totals) == state
            _drive(extend, work, WorldWriter())
        tables[name] = pipeline.assemble_tables(extend, _seeds(), work)
    assert tables["clean"][1] == tables["resumed"][1]
    for name in ("instructions", "instances", "rejected", "sft"):
        assert tables["clean"][0][name].to_pylist() == tables["resumed"][0][name].to_pylist(), name
