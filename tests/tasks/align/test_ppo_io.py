"""PPO's inputs and state on disk (tasks.align.ppo_io): prompts, batches, checkpoints, RNGs, length monitor.

    OMP_NUM_THREADS=1 pytest tests/tasks/align/test_ppo_io.py
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.align.ppo_io import (
    CheckpointStore,
    PPOError,
    PromptBatches,
    length_warning,
    load_prompts,
    rng_state,
    set_rng_state,
)


def test_prompt_batches_depend_only_on_seed_and_update():
    batches = PromptBatches(num_prompts=10, batch_size=4, seed=3)
    assert batches.batches_per_epoch == 2
    first_epoch = batches.batch(0) + batches.batch(1)
    assert len(set(first_epoch)) == 8  # no repeats inside an epoch
    assert batches.batch(2) != batches.batch(0) or batches.batch(3) != batches.batch(1)  # a new permutation
    resumed = PromptBatches(num_prompts=10, batch_size=4, seed=3)
    resumed.start_update = 5
    iterator = iter(resumed)
    assert [next(iterator) for _ in range(3)] == [batches.batch(5), batches.batch(6), batches.batch(7)]
    other_seed = PromptBatches(num_prompts=10, batch_size=4, seed=4)
    assert [other_seed.batch(i) for i in range(4)] != [batches.batch(i) for i in range(4)]
    with pytest.raises(PPOError, match="fewer than per_device_train_batch_size"):
        PromptBatches(num_prompts=3, batch_size=4, seed=0)


def test_length_monitor_warns_only_when_length_and_kl_grow():
    flat = [{"response_length": 8.0, "kl": 0.1 * i} for i in range(10)]
    assert length_warning(flat, window=3, growth=0.5) is None
    longer = [{"response_length": 8.0 + 3 * i, "kl": 0.5 * i} for i in range(10)]
    message = length_warning(longer, window=3, growth=0.5)
    assert message and "reward hacking" in message
    longer_same_kl = [{"response_length": 8.0 + 3 * i, "kl": 1.0} for i in range(10)]
    assert length_warning(longer_same_kl, window=3, growth=0.5) is None
    assert length_warning(longer[:5], window=3, growth=0.5) is None  # too short a history to judge


def test_load_prompts_names_file_row_and_field(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), good)
    assert load_prompts(good) == ["a", "b"]
    no_column = tmp_path / "no_column.parquet"
    pq.write_table(pa.table({"text": ["a"]}), no_column)
    with pytest.raises(PPOError, match=r"no_column.parquet: no `prompt` column"):
        load_prompts(no_column)
    blank = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"prompt": ["a", "  "]}), blank)
    with pytest.raises(PPOError, match=r"blank.parquet: row 1: field `prompt`"):
        load_prompts(blank)
    with pytest.raises(PPOError, match="not found"):
        load_prompts(tmp_path / "missing.parquet")


def test_checkpoint_store_keeps_the_last_ones_and_ignores_partial_writes(tmp_path):
    import torch

    store = CheckpointStore(tmp_path, keep=2)
    for step in (2, 4, 6, 12):
        store.save(step, {"step": step, "weights": torch.arange(3)}, {"step": step})
    assert [p.name for p in store.list()] == ["ppo-step-000006.pt", "ppo-step-000012.pt"]  # sorted by number
    # What a writer killed mid-write leaves behind is no checkpoint, and the next save removes it.
    (tmp_path / ".ppo-step-000014.pt.abc123.tmp").write_bytes(b"half")
    assert store.latest().name == "ppo-step-000012.pt"
    state, meta = store.load(store.latest())
    assert state["step"] == 12 and torch.equal(state["weights"], torch.arange(3)) and meta == {"step": 12}
    store.save(14, {"step": 14}, {"step": 14})
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "ppo-step-000016.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PPOError, match="not a readable PPO checkpoint"):
        store.load(store.latest())


def test_rng_state_restores_every_generator():
    import torch

    saved = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_background_save_writes_a_copy_taken_when_it_was_called(tmp_path):
    import torch

    store = CheckpointStore(tmp_path, keep=2)
    weights = torch.zeros(4)
    history = [{"update": 1}]
    store.save_in_background(1, {"weights": weights, "history": history}, {"step": 1})
    weights += 1  # training goes on changing the tensors in place
    history.append({"update": 2})
    store.wait()
    state, _ = store.load(store.latest())
    assert torch.equal(state["weights"], torch.zeros(4)) and state["history"] == [{"update": 1}]
    assert store.write_seconds > 0

    # A failed background write is raised by the next wait(), in the training thread.
    (tmp_path / "ppo-step-000002.pt").mkdir()  # a folder where the file must go
    store.save_in_background(2, {"x": 1}, {})
    with pytest.raises(PPOError, match="writing a checkpoint failed"):
        store.wait()
