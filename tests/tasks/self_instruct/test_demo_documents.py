"""The demo corpus shows the seeds in exactly the shapes the parsers read back."""

import pytest

from tasks.pretrain.cleaning import CleaningConfig, clean_corpus
from tasks.self_instruct.demo_documents import bootstrap_document, classification_block, instance_block, seed_documents
from tasks.self_instruct.parsing import parse_classification, parse_instances, parse_instructions
from tasks.self_instruct.prompts import render_bootstrap_prompt
from tasks.self_instruct.seeds import demo_seed_path, load_seed_tasks


@pytest.mark.parametrize("language", ["en", "ko"])
def test_documents_parse_back_to_the_seeds(language):
    seeds = load_seed_tasks(demo_seed_path(language))
    listed, continued = [s.instruction for s in seeds[:8]], [s.instruction for s in seeds[8:12]]
    document = bootstrap_document(listed, continued, language)
    assert parse_instructions(document[len(render_bootstrap_prompt(listed, language)):]) == continued
    for task in seeds:
        body = instance_block(task, language).split("\n", 1)[1]
        parsed = parse_instances(body, task.is_classification)
        assert [(i.input, i.output) for i in parsed] == [(i.input, i.output) for i in task.instances]
        answer = classification_block(task, language).rsplit(" ", 1)[1]
        assert parse_classification(answer) is task.is_classification


def test_most_documents_survive_the_corpus_cleaning():
    documents = seed_documents(load_seed_tasks(demo_seed_path("en")), copies=5)
    kept = clean_corpus(documents, CleaningConfig()).texts
    assert len(kept) >= 0.8 * len(documents)
