"""Tests for tasks.self_instruct.filters: every instruction and instance rule, with its boundaries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.self_instruct.filters import (
    BLOCKLIST,
    INSTANCE_REASONS,
    check_blocklist,
    check_first_char,
    check_too_long,
    check_too_short,
    check_write_a_program,
    filter_instances,
    filter_instruction,
    instance_reason,
    word_count,
)
from tasks.self_instruct.seeds import Instance

GOOD = "Explain why the sky is blue."


def words(n: int) -> str:
    return " ".join(["Describe"] + ["thing"] * (n - 1))


def test_a_good_instruction_passes():
    assert filter_instruction(GOOD) is None
    assert filter_instruction("다음 문장을 영어로 번역하세요.", language="ko") is None


# --- length ---------------------------------------------------------------------------------------


def test_length_boundaries():
    assert word_count(words(150)) == 150
    assert filter_instruction(words(150)) is None
    assert filter_instruction(words(151)) == "too_long"
    assert filter_instruction(words(4)) is None
    assert filter_instruction(words(3)) == "too_short"
    assert filter_instruction("Summarize.") == "too_short"
    assert check_too_long(words(151)) == "too_long" and check_too_long(words(150)) is None
    assert check_too_short(words(3)) == "too_short" and check_too_short(words(4)) is None


def test_words_are_whitespace_separated():
    # Newlines, tabs and repeated spaces separate words; punctuation does not.
    assert word_count("Translate\tthe   text\ninto  French") == 5
    assert filter_instruction("Sort: these, numbers, now") is None
    assert filter_instruction("  Sort   these    numbers  ") == "too_short"


def test_korean_counts_eojeol():
    assert word_count("다음 문장을 번역하세요.") == 3
    assert filter_instruction("다음 문장을 번역하세요.", language="ko") == "too_short"
    assert filter_instruction("다음 문장을 영어로 번역하세요.", language="ko") is None


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty(text):
    assert filter_instruction(text) == "empty"
    assert filter_instruction(text, language="ko") == "empty"


# --- blocklist ------------------------------------------------------------------------------------


@pytest.mark.parametrize("word", BLOCKLIST)
def test_every_blocked_word(word):
    assert filter_instruction(f"Please describe the {word} in detail.") == "blocklist"
    assert filter_instruction(f"Please describe the {word.upper()} in detail.") == "blocklist"
    assert filter_instruction(f"Please describe the {word.title()} in detail.") == "blocklist"


def test_blocklist_is_exactly_the_papers_list():
    assert set(BLOCKLIST) == {"image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                              "map", "maps", "draw", "plot", "go to"}


@pytest.mark.parametrize(
    "text",
    [
        "Update the user profile with the new address.",
        "Explain the mapping between keys and values.",
        "Summarize the paragraph in two sentences.",
        "Describe what is inside the drawer.",
        "Explain how plotting a story arc works.",
        "Describe the pictured scene in words.",
        "Explain when a goto statement is harmful.",
        "Tell me where to go tomorrow evening.",
        "Describe the filed complaint in plain words.",
        "Give a graphic description of the storm.",
    ],
)
def test_blocklist_matches_whole_words_only(text):
    assert filter_instruction(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "Go to the store and list what you buy.",
        "Explain how to go  to the station quickly.",
        "Tell me how to GO TO bed earlier.",
        "Describe the map, please.",
        "Summarize the (files) in one line.",
        "Explain what a file-based database is.",
        "Draw, then explain, a simple house.",
        "Explain the plot of the film Casablanca.",
    ],
)
def test_blocklist_hits(text):
    assert filter_instruction(text) == "blocklist"


def test_blocklist_with_korean_particles_and_korean_nouns():
    # English nouns followed by a Korean particle are still whole words.
    assert filter_instruction("이 file을 열어서 내용을 요약하세요.", language="ko") == "blocklist"
    assert filter_instruction("주어진 이미지를 자세히 설명하세요.", language="ko") == "blocklist"
    assert filter_instruction("아래 사진에 나온 사람을 묘사하세요.", language="ko") == "blocklist"
    assert check_blocklist("판매량 그래프를 분석하세요.", language="ko") == "blocklist"
    # Korean words that only share their start with a blocked noun's meaning are not blocked.
    assert filter_instruction("그림자의 길이가 달라지는 이유를 설명하세요.", language="ko") is None
    assert filter_instruction("좋은 지도자의 조건을 세 가지 쓰세요.", language="ko") is None
    # Korean nouns are checked only for Korean.
    assert check_blocklist("주어진 이미지를 자세히 설명하세요.", language="en") is None


# --- write a program ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["Write a program that prints the first ten primes.", "write a program to sort a list.",
     "WRITE A PROGRAM computing factorials.", "  Write   a program that reverses a string."],
)
def test_write_a_program(text):
    assert filter_instruction(text) == "write_a_program"


@pytest.mark.parametrize(
    "text",
    ["Write a short program that prints the first ten primes.", "Please write a program to sort a list.",
     "Write a poem about the program of the day."],
)
def test_write_a_program_only_at_the_start(text):
    assert check_write_a_program(text) is None
    assert filter_instruction(text) is None


# --- first character ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ['"Quote" the sentence back to me please.', "- List three kinds of clouds.", "(Optional) Explain the rule briefly.",
     "...and then explain what happens next.", "¿Cómo se dice hello en español?", "* Name three rivers in Asia."],
)
def test_first_char_punctuation(text):
    assert filter_instruction(text) == "bad_first_char"
    assert filter_instruction(text, language="ko") == "bad_first_char"


def test_first_char_non_ascii_only_matters_for_english():
    assert filter_instruction("Émile asks how to bake bread.") == "bad_first_char"
    assert filter_instruction("Émile asks how to bake bread.", language="fr") is None
    assert filter_instruction("다음 문장을 영어로 번역하세요.") == "bad_first_char"
    assert filter_instruction("다음 문장을 영어로 번역하세요.", language="ko") is None


def test_first_char_unicode_punctuation_for_korean():
    assert filter_instruction("「춘향전」의 줄거리를 요약해 주세요.", language="ko") == "bad_first_char"
    assert filter_instruction("？ 다음 질문에 답하세요 지금 바로.", language="ko") == "bad_first_char"
    assert check_first_char("- 다음 글을 요약하세요.", language="ko") == "bad_first_char"


def test_first_char_letters_and_digits_pass():
    assert filter_instruction("3 friends share 12 apples; how many does each get?") is None
    assert check_first_char("  Explain gravity simply.") is None
    assert check_first_char("") is None


# --- order of the rules ---------------------------------------------------------------------------


def test_the_first_failing_reason_is_returned():
    assert filter_instruction("- image") == "too_short"
    assert filter_instruction(words(151) + " image") == "too_long"
    assert filter_instruction("Write a program to draw a square.") == "blocklist"
    assert filter_instruction('"Write a program that adds two numbers."') == "bad_first_char"
    assert filter_instruction("Write a program that adds two numbers and prints them") == "write_a_program"
    assert filter_instruction("- Explain the map of Europe.") == "blocklist"


# --- instance filters -----------------------------------------------------------------------------


def I(input_: str, output: str) -> Instance:  # noqa: E743 - short name for tables of instances
    return Instance(input=input_, output=output)


def test_instance_reasons_one_by_one():
    assert instance_reason(I("2 + 2", "4")) is None
    assert instance_reason(I("", "A poem.")) is None
    assert instance_reason(I("hello", "")) == "empty_output"
    assert instance_reason(I("hello", "  \n")) == "empty_output"
    assert instance_reason(I("", "")) == "empty_output"
    assert instance_reason(I("same text", "same text")) == "input_equals_output"
    assert instance_reason(I(" same text\n", "same text ")) == "input_equals_output"
    assert instance_reason(I("Translate this:", "Traduce esto")) == "ends_with_colon"
    assert instance_reason(I("A list", "Here are the items: ")) == "ends_with_colon"
    assert instance_reason(I("목록", "다음과 같습니다：")) == "ends_with_colon"
    assert instance_reason(I("Time: 10:30", "Half past ten")) is None


def test_filter_instances_keeps_valid_ones_in_order():
    instances = [I("1", "one"), I("2", "two"), I("", "a haiku")]
    kept, counts, dropped = filter_instances(instances)
    assert kept == instances and not dropped
    assert counts == {reason: 0 for reason in INSTANCE_REASONS}


def test_filter_instances_counts_each_reason():
    instances = [
        I("1", "one"),
        I("2", ""),            # empty_output
        I("3", "3"),           # input_equals_output
        I("4:", "four"),       # ends_with_colon
        I("1", "one"),         # duplicate
        I("5", "five"),
        I("6", "six"),
        I("7", "seven"),
        I("8", "eight"),       # the fifth unique valid instance
        I("9", "nine"),        # over_limit
    ]
    kept, counts, dropped = filter_instances(instances)
    assert kept == [I("1", "one"), I("5", "five"), I("6", "six"), I("7", "seven"), I("8", "eight")]
    assert counts == {"empty_output": 1, "input_equals_output": 1, "ends_with_colon": 1,
                      "conflicting_outputs": 0, "duplicate": 1, "over_limit": 1}
    assert len(kept) + sum(counts.values()) == len(instances)  # every instance accounted for
    assert not dropped


def test_over_limit_boundary_and_custom_limit():
    five = [I(str(i), f"n{i}") for i in range(5)]
    assert filter_instances(five) == (five, {r: 0 for r in INSTANCE_REASONS}, False)
    kept, counts, _ = filter_instances(five + [I("5", "n5")])
    assert kept == five and counts["over_limit"] == 1
    kept, counts, _ = filter_instances(five, max_instances=2)
    assert kept == five[:2] and counts["over_limit"] == 3
    with pytest.raises(ValueError):
        filter_instances(five, max_instances=0)


def test_duplicates_compare_stripped_text():
    kept, counts, _ = filter_instances([I("a", "b"), I(" a ", "b\n")])
    assert kept == [I("a", "b")] and counts["duplicate"] == 1


def test_conflicting_outputs_drop_the_task():
    instances = [I("Is 7 prime?", "Yes"), I("Is 9 prime?", "No"), I("Is 7 prime?", "No"), I("x", "")]
    kept, counts, dropped = filter_instances(instances)
    assert kept == [] and dropped
    assert counts["conflicting_outputs"] == 3 and counts["empty_output"] == 1
    assert sum(counts.values()) == len(instances)


def test_no_input_with_different_outputs_is_not_a_conflict():
    instances = [I("", "A poem about rain."), I("", "A poem about snow."), I("  ", "A poem about wind.")]
    kept, counts, dropped = filter_instances(instances)
    assert kept == instances and not dropped and counts["conflicting_outputs"] == 0


def test_conflicts_are_judged_after_invalid_instances_are_removed():
    # The second "Is 7 prime?" has an empty output, so it is not a competing answer.
    kept, counts, dropped = filter_instances([I("Is 7 prime?", "Yes"), I("Is 7 prime?", " ")])
    assert kept == [I("Is 7 prime?", "Yes")] and not dropped and counts["empty_output"] == 1


def test_empty_instance_list():
    assert filter_instances([]) == ([], {reason: 0 for reason in INSTANCE_REASONS}, False)


# --- every instance is accounted for ---------------------------------------------------------------

_field = st.sampled_from(["", " ", "a", "a ", "b", "b:", "c", "Yes", "No"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.builds(Instance, input=_field, output=_field), max_size=12), st.integers(1, 6))
def test_filter_instances_accounts_for_every_instance(instances, max_instances):
    kept, counts, dropped = filter_instances(instances, max_instances=max_instances)
    assert len(kept) + sum(counts.values()) == len(instances)
    assert set(counts) == set(INSTANCE_REASONS)
    assert len(kept) <= max_instances
    assert all(instance_reason(instance) is None for instance in kept)
    assert len({(i.input.strip(), i.output.strip()) for i in kept}) == len(kept)
    assert dropped == (counts["conflicting_outputs"] > 0)
    assert not (dropped and kept)
