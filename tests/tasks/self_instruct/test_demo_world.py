"""The demo task world: the shipped seed files are its output, and every family answers by its rule."""

from __future__ import annotations

import pytest

from tasks.self_instruct.demo_world import FAMILIES, demo_seed_tasks, families, seed_jsonl, world_tasks
from tasks.self_instruct.filters import filter_instances, filter_instruction
from tasks.self_instruct.seeds import demo_seed_path


@pytest.mark.parametrize("language", ["en", "ko"])
def test_the_shipped_seed_files_are_the_worlds_seeds(language):
    # Regenerate with: python -m tasks.self_instruct.demo_world LANG > tasks/self_instruct/demo/seeds_LANG.jsonl
    assert demo_seed_path(language).read_text(encoding="utf-8") == seed_jsonl(demo_seed_tasks(language))


@pytest.mark.parametrize("language", ["en", "ko"])
def test_world_tasks_pass_the_self_instruct_filters(language):
    tasks = world_tasks(language, 400, seed=3)
    assert len({t.name for t in tasks}) == len(families(language))
    for task in tasks:
        assert filter_instruction(task.instruction, language=language) is None, task.instruction
        kept, counts, dropped = filter_instances(list(task.instances))
        assert not dropped and len(kept) == len(task.instances) >= 3, (task.instruction, counts)


def test_instances_follow_each_familys_rule():
    by_name = {t.name: t for t in world_tasks("en", 200, seed=1)}
    pairs = {name: [(i.input, i.output) for i in task.instances] for name, task in by_name.items()}
    assert all(str(sum(map(int, x.split(" and ")))) == y for x, y in pairs["sum"])
    assert all(y == ("Even" if int(x) % 2 == 0 else "Odd") for x, y in pairs["parity"])
    assert all(y == ", ".join(map(str, sorted(map(int, x.split(", "))))) for x, y in pairs["sort"])
    assert all(y == x.rstrip(".").split()[-1] for x, y in pairs["last_word"])
    assert all(y == x.replace(" ", "-") for x, y in pairs["dash"])


def test_world_is_deterministic_and_seed_dependent():
    assert world_tasks("en", 30, seed=0) == world_tasks("en", 30, seed=0)
    assert world_tasks("en", 30, seed=0) != world_tasks("en", 30, seed=1)
    assert len(FAMILIES) >= 20
    with pytest.raises(ValueError, match="no language 'fr'"):
        families("fr")
