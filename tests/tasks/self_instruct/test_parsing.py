"""Tests for tasks.self_instruct.parsing on realistic, messy completions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.self_instruct.parsing import parse_classification, parse_instances, parse_instructions
from tasks.self_instruct.seeds import Instance

# --- parse_instructions -------------------------------------------------------------------------


def test_clean_continuation():
    completion = " Name a famous painter from Spain.\n10. Give a recipe for lentil soup.\n11. Describe the water cycle.\n"
    assert parse_instructions(completion) == [
        "Name a famous painter from Spain.", "Give a recipe for lentil soup.", "Describe the water cycle.",
    ]


@pytest.mark.parametrize(
    "marker",
    ["10.", "10)", "10 -", "10 –", "10:", "10 .", "Task 10:", "task 10.", "Instruction 10:", "#10.", "**10.**", "  10.", "10.\t", "작업 10:"],
)
def test_numbering_variants(marker):
    completion = f" Plan a picnic menu for six people.\n{marker} Explain what a leap year is.\n"
    assert parse_instructions(completion) == ["Plan a picnic menu for six people.", "Explain what a leap year is."]


def test_mixed_numbering_in_one_completion():
    completion = (
        " Suggest a name for a pet turtle.\n"
        "10) Explain the rules of chess briefly.\n"
        "11 - Give two synonyms for brave.\n"
        "Task 12: Translate the greeting into Italian.\n"
        "13: List the planets in order from the sun.\n"
    )
    assert parse_instructions(completion) == [
        "Suggest a name for a pet turtle.",
        "Explain the rules of chess briefly.",
        "Give two synonyms for brave.",
        "Translate the greeting into Italian.",
        "List the planets in order from the sun.",
    ]


def test_first_item_repeats_the_open_number():
    completion = "9. Describe your ideal weekend.\n10. Write a slogan for a bike shop."
    assert parse_instructions(completion) == ["Describe your ideal weekend.", "Write a slogan for a bike shop."]


def test_first_item_on_the_next_line_or_skipped():
    assert parse_instructions("\nDescribe your ideal weekend.\n10. Rate the movie.") == [
        "Describe your ideal weekend.", "Rate the movie."]
    assert parse_instructions("\n10. Rate the movie from one to ten.\n11. Name a jazz musician.") == [
        "Rate the movie from one to ten.", "Name a jazz musician."]


def test_blank_lines_and_stray_whitespace():
    completion = "   Give   three facts about   owls.  \n\n\n10.    Summarize the plot\tof a fairy tale.   \n\n  \n11.  Invent a new holiday. \n\n"
    assert parse_instructions(completion) == [
        "Give three facts about owls.", "Summarize the plot of a fairy tale.", "Invent a new holiday.",
    ]


def test_windows_line_endings():
    assert parse_instructions(" Tell a joke.\r\n10. Sing a song.\r\n") == ["Tell a joke.", "Sing a song."]


def test_truncated_last_item_is_dropped_on_length():
    completion = " Explain photosynthesis simply.\n10. Compare cats and dogs as pets.\n11. Write a story about a dragon who"
    assert parse_instructions(completion, finish_reason="length") == [
        "Explain photosynthesis simply.", "Compare cats and dogs as pets."]
    # The same text that ended on a stop string is complete.
    assert parse_instructions(completion, finish_reason="stop")[-1] == "Write a story about a dragon who"
    assert len(parse_instructions(completion)) == 3


def test_length_cut_after_a_newline_keeps_the_finished_item():
    completion = " Explain photosynthesis simply.\n10. Compare cats and dogs as pets.\n"
    assert parse_instructions(completion, finish_reason="length") == [
        "Explain photosynthesis simply.", "Compare cats and dogs as pets."]


def test_length_cut_inside_trailing_garbage_keeps_the_list():
    completion = " Explain photosynthesis simply.\n10. Compare cats and dogs as pets.\nThese tasks are all useful because they"
    assert parse_instructions(completion, finish_reason="length") == [
        "Explain photosynthesis simply.", "Compare cats and dogs as pets."]


def test_length_cut_with_a_single_item_gives_nothing():
    assert parse_instructions(" Explain why the ocean is salty and", finish_reason="length") == []


def test_stops_at_a_repeated_header():
    completion = (
        " Describe a sunset in two sentences.\n10. Name three herbs used in Italian food.\n"
        "Here is a numbered list of varied tasks for a text-based assistant. Keep the list going\n"
        "1. Suggest a name for a new coffee shop.\n"
    )
    assert parse_instructions(completion) == ["Describe a sunset in two sentences.", "Name three herbs used in Italian food."]


def test_a_header_right_away_gives_nothing():
    completion = "\nHere is a numbered list of varied tasks for a text-based assistant.\n1. Say hi to the user."
    assert parse_instructions(completion) == []


def test_stops_at_a_restarted_list():
    completion = " Describe a sunset.\n10. Name three herbs.\n1. Suggest a name for a new coffee shop.\n2. Explain tides."
    assert parse_instructions(completion) == ["Describe a sunset.", "Name three herbs."]


def test_stops_at_a_repeated_number():
    completion = " Describe a sunset.\n10. Name three herbs.\n10. Name three herbs.\n11. Explain tides."
    assert parse_instructions(completion) == ["Describe a sunset.", "Name three herbs."]


def test_stops_at_unnumbered_text_after_the_list():
    completion = (
        " Describe a sunset.\n10. Name three herbs.\n\nI hope these tasks help you build your dataset!\n"
        "11. This one should not be read."
    )
    assert parse_instructions(completion) == ["Describe a sunset.", "Name three herbs."]


@pytest.mark.parametrize("line", ["10.5 grams is the answer for salt.", "10:30 is when the bakery opens.", "10-12 people can join."])
def test_a_number_starting_a_line_is_not_always_an_item_marker(line):
    completion = f" Convert 3 cups of flour to grams.\n{line}"
    assert parse_instructions(completion) == ["Convert 3 cups of flour to grams."]
    assert parse_instructions(f" {line}") == [line]


def test_skipped_numbers_are_tolerated():
    assert parse_instructions(" Tell a joke.\n11. Explain rain.\n14. Plan a trip.") == ["Tell a joke.", "Explain rain.", "Plan a trip."]


def test_empty_items_are_left_out():
    assert parse_instructions(" \n10.\n11. Explain rain clouds.") == ["Explain rain clouds."]


@pytest.mark.parametrize("garbage", ["", "   ", "\n\n", "1. 2. 3.", "\n\n3. Something old."])
def test_garbage_gives_nothing(garbage):
    assert parse_instructions(garbage) == []


def test_other_start_index():
    assert parse_instructions(" Add two numbers.\n6) Subtract them.\n7) Multiply them.", start_index=5) == [
        "Add two numbers.", "Subtract them.", "Multiply them."]
    assert parse_instructions("5. Add two numbers.\n6. Subtract them.", start_index=5) == ["Add two numbers.", "Subtract them."]


def test_korean_continuation():
    completion = (
        " 다음 문장을 영어로 번역하세요.\n"
        "10. 좋아하는 계절을 두 문장으로 설명하세요.\n"
        "작업 11: 주어진 단어의 반대말을 쓰세요.\n"
        "12) 점심 메뉴를 추천해 주세요.\n"
        "다음은 텍스트 기반 어시스턴트에게 맡길 수 있는 다양한 작업의 번호 목록입니다.\n"
        "1. 처음부터 다시 시작합니다.\n"
    )
    assert parse_instructions(completion) == [
        "다음 문장을 영어로 번역하세요.",
        "좋아하는 계절을 두 문장으로 설명하세요.",
        "주어진 단어의 반대말을 쓰세요.",
        "점심 메뉴를 추천해 주세요.",
    ]


def test_realistic_long_completion_cut_by_length():
    completion = (
        " Create a grocery list for a vegetarian week.\n"
        "10. Explain the difference between weather and climate.\n"
        "\n"
        "11) Rewrite the sentence using simpler words.\n"
        "12 - Give an example of a metaphor and explain it.\n"
        "Task 13: Suggest a fun team-building activity for remote workers.\n"
        "14. Describe how a rainbow forms in three sentences\n"
        "15. Classify the following animals into mammals and rep"
    )
    assert parse_instructions(completion, finish_reason="length") == [
        "Create a grocery list for a vegetarian week.",
        "Explain the difference between weather and climate.",
        "Rewrite the sentence using simpler words.",
        "Give an example of a metaphor and explain it.",
        "Suggest a fun team-building activity for remote workers.",
        "Describe how a rainbow forms in three sentences",
    ]


# --- parse_classification -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" Yes", True),
        (" No", False),
        ("Yes\n\nTask: Something else\nIs it classification? No", True),
        (" no.", False),
        ("YES!", True),
        ("  \n No, it asks for free text.", False),
        ("Is it classification? Yes", True),
        ("Answer: no", False),
        ('"Yes"', True),
        ("**No**", False),
        (" 예", True),
        (" 네, 분류 작업입니다.", True),
        (" 아니요", False),
        (" 아니오.", False),
        ("아뇨", False),
        ("분류 작업인가요? 예", True),
        ("Yesterday I went out.", None),
        ("Nothing to say", None),
        ("Not sure", None),
        ("Maybe", None),
        ("예를 들어 이 작업은", None),
        ("", None),
        ("   \n  ", None),
        ("\nThe task is a classification task. Yes", None),
    ],
)
def test_parse_classification(completion, expected):
    assert parse_classification(completion) is expected


# --- parse_instances: input first ----------------------------------------------------------------


def test_input_first_with_example_headers():
    completion = (
        "\nExample 1\nInput: 25 degrees Celsius\nOutput: 77 degrees Fahrenheit\n"
        "Example 2\nInput: 0 degrees Celsius\nOutput: 32 degrees Fahrenheit\n\n"
        "Task: Name the capital of the country.\nExample 1\nInput: Peru\nOutput: Lima\n"
    )
    assert parse_instances(completion, is_classification=False) == [
        Instance(input="25 degrees Celsius", output="77 degrees Fahrenheit"),
        Instance(input="0 degrees Celsius", output="32 degrees Fahrenheit"),
    ]


def test_input_first_without_headers_and_multiline_values():
    completion = (
        "Input: Write the steps\nfor boiling an egg\nOutput: 1. Boil water.\n2. Add the egg.\n\n3. Wait 8 minutes.\n\n"
        "Input: Another one\nOutput: Done.\n"
    )
    assert parse_instances(completion, is_classification=False) == [
        Instance(input="Write the steps\nfor boiling an egg", output="1. Boil water.\n2. Add the egg.\n\n3. Wait 8 minutes."),
        Instance(input="Another one", output="Done."),
    ]


@pytest.mark.parametrize("no_input", ["<noinput>", "", "   ", "<No Input>", "<입력 없음>"])
def test_input_first_no_input_markers(no_input):
    completion = f"Example 1\nInput: {no_input}\nOutput: Keep your phone in another room.\n"
    assert parse_instances(completion, is_classification=False) == [Instance(input="", output="Keep your phone in another room.")]


def test_input_first_output_without_input():
    completion = "Example 1\nOutput: A haiku about rain.\nExample 2\nOutput: A haiku about snow.\nOutput: A third one."
    assert parse_instances(completion, is_classification=False) == [
        Instance(input="", output="A haiku about rain."),
        Instance(input="", output="A haiku about snow."),
        Instance(input="", output="A third one."),
    ]


def test_input_first_skips_inputs_without_output_and_preamble():
    completion = (
        "Sure! Here are some examples for this task.\n\n"
        "Example 1\nInput: 3, 1, 2\n"
        "Example 2\nInput: 9, 7\nOutput: 7, 9\n"
        "Input: 5, 4\n"
    )
    assert parse_instances(completion, is_classification=False) == [Instance(input="9, 7", output="7, 9")]


def test_input_first_label_variants():
    completion = "**Example 1:**\n**Input:** hello\n**Output:** HELLO\nexample 2.\nINPUT : bye\noutput： BYE\n"
    assert parse_instances(completion, is_classification=False) == [
        Instance(input="hello", output="HELLO"), Instance(input="bye", output="BYE")]


def test_input_first_korean_labels():
    completion = "\n예시 1\n입력: 섭씨 100도\n출력: 화씨 212도\n예시 2\n입력： <입력 없음>\n출력: 물이 끓는 온도입니다.\n\n작업: 다음 작업"
    assert parse_instances(completion, is_classification=False) == [
        Instance(input="섭씨 100도", output="화씨 212도"), Instance(input="", output="물이 끓는 온도입니다.")]


def test_input_first_truncated_by_length_drops_the_last_instance():
    completion = "Example 1\nInput: 2 + 2\nOutput: 4\nExample 2\nInput: 3 + 5\nOutput: 8, because three plus"
    assert parse_instances(completion, is_classification=False, finish_reason="length") == [Instance(input="2 + 2", output="4")]
    assert len(parse_instances(completion, is_classification=False)) == 2


@pytest.mark.parametrize("garbage", ["", "lorem ipsum dolor", "Example 1\nExample 2", "Task: nothing\nInput: x\nOutput: y"])
def test_input_first_garbage(garbage):
    assert parse_instances(garbage, is_classification=False) == []


# --- parse_instances: output first ---------------------------------------------------------------


def test_output_first_pairs():
    completion = (
        "\nClass label: Positive\nInput: I loved every minute of it.\n"
        "Class label: Negative\nInput: The plot made no sense\nand the ending was worse.\n\n"
        "Task: Tell whether the number is even or odd.\nClass label: Even\nInput: 4\n"
    )
    assert parse_instances(completion, is_classification=True) == [
        Instance(input="I loved every minute of it.", output="Positive"),
        Instance(input="The plot made no sense\nand the ending was worse.", output="Negative"),
    ]


def test_output_first_several_inputs_under_one_label_and_label_without_input():
    completion = "Class label: Spam\nInput: Win a free phone now!\nInput: Cheap loans, click here.\nClass label: Not spam\nClass label: Ham\nInput: See you at lunch."
    assert parse_instances(completion, is_classification=True) == [
        Instance(input="Win a free phone now!", output="Spam"),
        Instance(input="Cheap loans, click here.", output="Spam"),
        Instance(input="See you at lunch.", output="Ham"),
    ]


def test_output_first_label_variants_and_korean():
    completion = "Label: Formal\nInput: Dear Sir or Madam\n클래스 레이블: 긍정\n입력: 정말 좋아요.\n레이블: 부정\n입력: 별로예요.\n**Class Label:** Yes\n**Input:** It is fine."
    assert parse_instances(completion, is_classification=True) == [
        Instance(input="Dear Sir or Madam", output="Formal"),
        Instance(input="정말 좋아요.", output="긍정"),
        Instance(input="별로예요.", output="부정"),
        Instance(input="It is fine.", output="Yes"),
    ]


def test_output_first_stops_at_korean_next_task_and_truncation():
    completion = "클래스 레이블: 짝수\n입력: 10\n클래스 레이블: 홀수\n입력: 7\n작업: 다른 작업\n클래스 레이블: 예\n입력: 네"
    assert parse_instances(completion, is_classification=True) == [Instance(input="10", output="짝수"), Instance(input="7", output="홀수")]
    assert parse_instances("Class label: A\nInput: one\nClass label: B\nInput: tw", True, finish_reason="length") == [
        Instance(input="one", output="A")]


@pytest.mark.parametrize("garbage", ["", "Positive, Negative", "Input: text without a label", "Class label: Positive"])
def test_output_first_garbage(garbage):
    assert parse_instances(garbage, is_classification=True) == []


def test_empty_outputs_are_kept_for_the_filters_to_count():
    assert parse_instances("Class label:\nInput: nothing", is_classification=True) == [Instance(input="nothing", output="")]
    assert parse_instances("Input: something\nOutput:\n\nInput: more\nOutput: done", is_classification=False) == [
        Instance(input="something", output=""), Instance(input="more", output="done")]


# --- never raise, whatever the model writes -------------------------------------------------------

_messy_text = st.lists(
    st.one_of(
        st.sampled_from(["\n", "\r\n", " ", "10.", "11)", "Task 12:", "1.", "Input:", "Output:", "Class label:",
                         "Example 1", "<noinput>", "입력:", "출력:", "Yes", "아니요", "Task:", "작업:"]),
        st.text(max_size=12),
    ),
    max_size=30,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(_messy_text, st.sampled_from([None, "stop", "length"]))
def test_parsers_never_raise_and_return_clean_values(text, finish_reason):
    instructions = parse_instructions(text, finish_reason=finish_reason)
    assert all(item == item.strip() and item and "\n" not in item for item in instructions)
    assert parse_classification(text) in (True, False, None)
    for is_classification in (False, True):
        for instance in parse_instances(text, is_classification, finish_reason=finish_reason):
            assert instance.output == instance.output.strip()
            assert instance.input == instance.input.strip()


def test_item_labels_are_not_part_of_the_instruction():
    completion = " Task: Write a haiku about rain.\n10. Instruction: Name three prime numbers.\n11. 작업: 문장을 요약하세요."
    assert parse_instructions(completion) == ["Write a haiku about rain.", "Name three prime numbers.", "문장을 요약하세요."]
