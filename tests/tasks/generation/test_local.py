"""LocalGenerator on the tiny random model: strategies, determinism, stops, lengths, padding, penalties."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tasks.generation.local import LocalGenerator
from tasks.generation.params import DecodingParams, GenerationError

PROMPTS = [
    "The quick brown fox",
    "Write",
    "Summarize the paragraph in one sentence. Then translate it into French, please.",
    "A function computes the sum",
    "Classify the sentiment",
]


def greedy(n: int, **kw) -> DecodingParams:
    return DecodingParams(strategy="greedy", max_new_tokens=n, **kw)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_every_strategy_returns_one_completion_per_prompt(tiny_generator, strategy):
    params = DecodingParams(strategy=strategy, max_new_tokens=6, num_beams=3, top_k=50, top_p=0.9)
    out = tiny_generator.complete(PROMPTS, params)
    assert len(out) == len(PROMPTS)
    for completion in out:
        assert completion.finish_reason in ("stop", "length")
        assert 1 <= completion.completion_tokens <= 6
        assert completion.prompt_tokens > 0
        # neither the prompt nor special tokens come back
        assert "<|" not in completion.text
    assert not any(c.text.startswith(p) for c, p in zip(out, PROMPTS))


def test_greedy_is_deterministic_and_differs_from_sampling(tiny_generator):
    first = tiny_generator.complete(PROMPTS, greedy(8))
    assert tiny_generator.complete(PROMPTS, greedy(8)) == first
    # temperature 0 sampling is greedy
    assert tiny_generator.complete(PROMPTS, DecodingParams(strategy="sample", temperature=0, max_new_tokens=8)) == first
    sampled = tiny_generator.complete(PROMPTS, DecodingParams(strategy="sample", temperature=1.0, max_new_tokens=8))
    assert [c.text for c in sampled] != [c.text for c in first]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny_generator):
    params = DecodingParams(strategy="sample", temperature=1.0, max_new_tokens=8, seed=7)
    first = tiny_generator.complete(PROMPTS, params)
    assert tiny_generator.complete(PROMPTS, params) == first
    # reversed order and one prompt at a time give each prompt the same sample
    assert tiny_generator.complete(PROMPTS[::-1], params)[::-1] == first
    assert [tiny_generator.complete([p], params)[0] for p in PROMPTS] == first
    other_seed = tiny_generator.complete(PROMPTS, params.model_copy(update={"seed": 8}))
    assert [c.text for c in other_seed] != [c.text for c in first]


def test_a_repeated_prompt_draws_different_samples(tiny_generator):
    params = DecodingParams(strategy="sample", temperature=1.0, max_new_tokens=8, seed=1)
    a, b = tiny_generator.complete(["Write", "Write"], params)
    assert a.text != b.text


def _ascii_stop(text: str) -> str | None:
    for ch in text[1:]:
        if ch.isascii() and ch.isprintable() and not ch.isspace():
            return ch
    return None


def test_a_stop_sequence_cuts_the_text_and_ends_with_stop(tiny_generator):
    # repetition_penalty keeps the random model from repeating one token, so texts are varied
    params = greedy(20, repetition_penalty=3.0)
    full = tiny_generator.complete(PROMPTS, params)
    cases = [(p, _ascii_stop(c.text), c) for p, c in zip(PROMPTS, full) if _ascii_stop(c.text)]
    assert len(cases) >= 2, f"the tiny model gave too few usable texts: {full}"
    for prompt, stop, whole in cases:
        (cut,) = tiny_generator.complete([prompt], params.model_copy(update={"stop": [stop, "never-there"]}))
        assert cut.text == whole.text[: whole.text.index(stop)]
        assert cut.finish_reason == "stop"
        assert cut.completion_tokens < 20


def test_a_stop_sequence_spanning_the_prompt_boundary_does_not_stop(tiny_generator):
    # transformers' stop_strings would stop here: the prompt's end plus the first generated text match.
    params = greedy(12, repetition_penalty=3.0)
    full = tiny_generator.complete(PROMPTS, params)
    cases = [(p, p[-1] + c.text[0], c) for p, c in zip(PROMPTS, full) if c.text and p[-1] + c.text[0] not in c.text]
    assert cases
    for prompt, stop, whole in cases:
        assert tiny_generator.complete([prompt], params.model_copy(update={"stop": [stop]})) == [whole]


def test_beam_search_hypotheses_end_at_stop_sequences(tiny_generator):
    # A stop ends a beam like EOS does, so the best beam may change; no text may hold a stop.
    params = DecodingParams(strategy="beam", num_beams=2, max_new_tokens=20, repetition_penalty=3.0)
    full = tiny_generator.complete(PROMPTS, params)
    stops = sorted({s for s in (_ascii_stop(c.text) for c in full) if s})
    assert stops
    cut = tiny_generator.complete(PROMPTS, params.model_copy(update={"stop": stops}))
    for completion in cut:
        assert not any(s in completion.text for s in stops)
        assert completion.finish_reason == "stop" or completion.completion_tokens == 20
    assert cut != full


def test_sampled_text_never_holds_a_stop_sequence(tiny_generator):
    params = DecodingParams(strategy="sample", temperature=1.0, max_new_tokens=24, stop=["e", "a"], seed=3)
    out = tiny_generator.complete(PROMPTS * 2, params)
    assert all("e" not in c.text and "a" not in c.text for c in out)
    assert any(c.finish_reason == "stop" for c in out)


def test_max_new_tokens_reached_is_length(tiny_generator):
    out = tiny_generator.complete(PROMPTS, greedy(5))
    assert [c.finish_reason for c in out] == ["length"] * len(PROMPTS)
    assert [c.completion_tokens for c in out] == [5] * len(PROMPTS)


def test_an_end_of_sequence_token_ends_the_text_with_stop(tiny_generator, tiny_model_dir, tmp_path):
    # Declare a token that greedy emits mid-text an extra end-of-sequence id (Llama 3 has several).
    tokenizer = tiny_generator.tokenizer
    for prompt in PROMPTS:
        ids = tiny_generator.model.generate(
            input_ids=torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt)["input_ids"]]]),
            max_new_tokens=6,
            do_sample=False,
            repetition_penalty=5.0,  # varied tokens from a random model
            pad_token_id=tokenizer.pad_token_id,
        )[0, -6:].tolist()
        position = next((k for k in range(1, 6) if ids[k] not in ids[:k]), None)
        if position is not None:
            break
    else:
        pytest.fail("greedy output of every prompt repeats its first token")
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, ids[position]]
    config_path.write_text(json.dumps(config))
    generator = LocalGenerator(folder, "eos-variant", device="cpu")
    (plain,) = tiny_generator.complete([prompt], greedy(6, repetition_penalty=5.0))
    (ended,) = generator.complete([prompt], greedy(6, repetition_penalty=5.0))
    assert plain.finish_reason == "length"
    assert ended.finish_reason == "stop"
    assert ended.completion_tokens == position + 1
    assert ended.text == tokenizer.decode(ids[:position])
    assert plain.text.startswith(ended.text)


def test_left_padding_gives_a_short_prompt_the_same_greedy_text_alone_and_in_a_batch(tiny_generator):
    short = "Write"
    batch = [PROMPTS[2], short, PROMPTS[2] + " And a little more text to pad.", PROMPTS[3]]
    (alone,) = tiny_generator.complete([short], greedy(10))
    together = tiny_generator.complete(batch, greedy(10))
    assert together[1] == alone
    assert [tiny_generator.complete([p], greedy(10))[0] for p in batch] == together


def test_presence_and_repetition_penalties_change_the_output(tiny_generator):
    plain = tiny_generator.complete(PROMPTS, greedy(12))
    presence = tiny_generator.complete(PROMPTS, greedy(12, presence_penalty=2.0))
    repetition = tiny_generator.complete(PROMPTS, greedy(12, repetition_penalty=3.0))
    assert [c.text for c in presence] != [c.text for c in plain]
    assert [c.text for c in repetition] != [c.text for c in plain]


def test_presence_penalty_reduces_repeats(tiny_generator):
    def distinct_ratio(completions) -> float:
        ids = [tiny_generator.tokenizer(c.text)["input_ids"] for c in completions]
        return sum(len(set(x)) for x in ids) / sum(len(x) for x in ids)

    plain = tiny_generator.complete(PROMPTS, greedy(16))
    penalised = tiny_generator.complete(PROMPTS, greedy(16, presence_penalty=2.0))
    assert distinct_ratio(penalised) > distinct_ratio(plain)


def test_chat_renders_the_chat_template_with_the_generation_prompt(tiny_generator):
    conversation = [{"role": "user", "content": "Give three tips for staying healthy."}]
    (chat,) = tiny_generator.chat([conversation], greedy(8))
    # the same text through complete(): BOS is added there, the template adds it in chat()
    rendered = "<|user|>\nGive three tips for staying healthy.<|eos|><|assistant|>\n"
    (plain,) = tiny_generator.complete([rendered], greedy(8))
    assert chat == plain


def test_a_prompt_longer_than_the_context_is_cut_not_fatal(tiny_generator):
    before = tiny_generator.stats["truncated_prompts"]
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40  # > 256 positions
    (out,) = tiny_generator.complete([long_prompt], greedy(4))
    assert out.completion_tokens == 4
    assert out.prompt_tokens == tiny_generator.max_context - 4
    assert tiny_generator.stats["truncated_prompts"] == before + 1
    with pytest.raises(GenerationError, match="max_new_tokens"):
        tiny_generator.complete(["hi"], greedy(tiny_generator.max_context))


def test_empty_input_and_bad_input(tiny_generator):
    assert tiny_generator.complete([], greedy(4)) == []
    assert tiny_generator.complete([""], greedy(3))[0].completion_tokens == 3
    with pytest.raises(GenerationError, match=r"prompts\[1\]"):
        tiny_generator.complete(["ok", 3], greedy(4))  # type: ignore[list-item]
    with pytest.raises(GenerationError, match=r"conversations\[0\]"):
        tiny_generator.chat(["not a conversation"], greedy(4))  # type: ignore[list-item]


def test_identity_names_the_model_and_a_closed_generator_refuses_work(tiny_model_dir):
    generator = LocalGenerator(tiny_model_dir, identity_name="base@3", device="cpu")
    assert generator.identity() == {"backend": "local", "model": "base@3"}
    generator.close()
    with pytest.raises(GenerationError, match="closed"):
        generator.complete(["x"], greedy(2))
