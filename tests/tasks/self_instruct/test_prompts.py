"""Tests for tasks.self_instruct.prompts: the exact rendered prompts and the prompt sampling."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.self_instruct.parsing import parse_classification, parse_instances, parse_instructions
from tasks.self_instruct.prompts import (
    load_template,
    render_bootstrap_prompt,
    render_classification_prompt,
    render_instance_prompt,
    sample_prompt_instructions,
    stop_sequences,
)
from tasks.self_instruct.seeds import Instance

EIGHT = [
    "Suggest a name for a new coffee shop.",
    "Explain why leaves change color in autumn.",
    "Convert 5 kilometers to miles.",
    "Rewrite the sentence in the past tense.",
    "List three ways to save water at home.",
    "Classify the review as positive or negative.",
    "Summarize the paragraph in one sentence.",
    "Write a thank-you note to a colleague.",
]

EXPECTED_BOOTSTRAP_EN = """\
Here is a numbered list of varied tasks for a text-based assistant. Keep the list going with new tasks that differ from the earlier ones:
1. Suggest a name for a new coffee shop.
2. Explain why leaves change color in autumn.
3. Convert 5 kilometers to miles.
4. Rewrite the sentence in the past tense.
5. List three ways to save water at home.
6. Classify the review as positive or negative.
7. Summarize the paragraph in one sentence.
8. Write a thank-you note to a colleague.
9."""


def test_bootstrap_prompt_en_exact():
    assert render_bootstrap_prompt(EIGHT) == EXPECTED_BOOTSTRAP_EN
    assert render_bootstrap_prompt(EIGHT, language="en") == EXPECTED_BOOTSTRAP_EN


def test_bootstrap_prompt_ko_exact():
    instructions = ["다음 문장을 영어로 번역하세요.", "비 오는 날에 어울리는 노래를 추천하세요.", "주어진 숫자가 짝수인지 홀수인지 판별하세요."]
    assert render_bootstrap_prompt(instructions, language="ko") == (
        "다음은 텍스트 기반 어시스턴트에게 맡길 수 있는 다양한 작업의 번호 목록입니다. "
        "앞의 작업과 다른 새로운 작업으로 목록을 이어 가세요:\n"
        "1. 다음 문장을 영어로 번역하세요.\n"
        "2. 비 오는 날에 어울리는 노래를 추천하세요.\n"
        "3. 주어진 숫자가 짝수인지 홀수인지 판별하세요.\n"
        "4."
    )


def test_bootstrap_prompt_puts_each_instruction_on_one_line_and_keeps_braces():
    prompt = render_bootstrap_prompt(["  Translate the text\ninto French:\n\n  {text}  ", "Format {name} as JSON."])
    assert prompt.endswith("\n1. Translate the text into French: {text}\n2. Format {name} as JSON.\n3.")


@pytest.mark.parametrize("bad", [[], ["Fine instruction here.", " \n "]])
def test_bootstrap_prompt_rejects_empty_input(bad):
    with pytest.raises(ValueError):
        render_bootstrap_prompt(bad)


def test_unknown_language_is_an_error():
    with pytest.raises(ValueError, match="no prompt templates for language 'fr'; available: en, ko"):
        render_bootstrap_prompt(EIGHT, language="fr")
    with pytest.raises(ValueError, match="'de'"):
        render_classification_prompt("Sort the list.", language="de")


EXPECTED_CLASSIFICATION_EN = """\
For each task, say whether it is a classification task: a task whose answer is one label picked from a small, fixed set of options.

Task: Decide whether the customer review below is positive, negative or mixed.
Is it classification? Yes

Task: Suggest three names for a bakery that sells only gluten-free bread.
Is it classification? No

Task: Tell whether the given email is spam or a normal message.
Is it classification? Yes

Task: Explain in simple words why the sky looks blue during the day.
Is it classification? No

Task: Label the sentence as grammatically correct or incorrect.
Is it classification? Yes

Task: Solve the math word problem and give the final number.
Is it classification? No

Task: Route the customer question to the right team: sales, support or billing.
Is it classification? Yes

Task: Rewrite the paragraph so that it sounds more formal.
Is it classification? No

Task: Decide whether the tweet is about sports or politics.
Is it classification?"""


def test_classification_prompt_en_exact():
    assert render_classification_prompt("Decide whether the tweet is about sports or politics.") == EXPECTED_CLASSIFICATION_EN
    # Whitespace inside the instruction is folded so that the "Task:" line stays one line.
    assert render_classification_prompt(" Decide whether the tweet\nis about  sports or politics. ") == EXPECTED_CLASSIFICATION_EN


EXPECTED_CLASSIFICATION_KO = """\
각 작업이 분류 작업인지 판단하세요. 분류 작업이란 정해진 몇 가지 선택지 가운데 하나의 레이블로 답하는 작업입니다.

작업: 아래 상품 후기가 긍정적인지, 부정적인지, 둘 다인지 판단하세요.
분류 작업인가요? 예

작업: 글루텐 없는 빵만 파는 빵집의 이름을 세 가지 지어 주세요.
분류 작업인가요? 아니요

작업: 주어진 문장이 존댓말인지 반말인지 구분하세요.
분류 작업인가요? 예

작업: 낮에 하늘이 파랗게 보이는 이유를 쉬운 말로 설명하세요.
분류 작업인가요? 아니요

작업: 주어진 문자 메시지가 스팸인지 아닌지 판별하세요.
분류 작업인가요? 예

작업: 김치찌개를 끓이는 방법을 단계별로 알려 주세요.
분류 작업인가요? 아니요

작업: 뉴스 제목을 정치, 경제, 스포츠, 문화 중 하나로 분류하세요.
분류 작업인가요? 예

작업: 다음 문단을 더 격식 있는 문체로 바꿔 쓰세요.
분류 작업인가요? 아니요

작업: 이 문장의 감정을 기쁨, 슬픔, 분노 중 하나로 고르세요.
분류 작업인가요?"""


def test_classification_prompt_ko_exact():
    rendered = render_classification_prompt("이 문장의 감정을 기쁨, 슬픔, 분노 중 하나로 고르세요.", language="ko")
    assert rendered == EXPECTED_CLASSIFICATION_KO


EXPECTED_INPUT_FIRST_EN = """\
Write example inputs and outputs for each task below. Give several examples when the task allows it. When a task needs no input, write <noinput> after "Input:" and give the output.

Task: Convert the temperature from Celsius to Fahrenheit.
Example 1
Input: 25 degrees Celsius
Output: 77 degrees Fahrenheit
Example 2
Input: -10 degrees Celsius
Output: 14 degrees Fahrenheit

Task: Give three tips for staying focused while studying at home.
Example 1
Input: <noinput>
Output: 1. Keep your phone in another room.
2. Work in short blocks with breaks in between.
3. Set one clear goal for each session.

Task: Correct the spelling mistakes in the sentence.
Example 1
Input: I recieved the pakage yesterday.
Output: I received the package yesterday.
Example 2
Input: Their going to the libary after lunch.
Output: They're going to the library after lunch.

Task: Solve the word problem and show the arithmetic.
Example 1
Input: A box holds 12 eggs. How many eggs are in 7 boxes?
Output: 12 * 7 = 84, so there are 84 eggs.

Task: Reply politely to the invitation, declining it.
Example 1
Input: Would you like to join our hiking trip on Saturday?
Output: Thank you so much for inviting me! I already have plans this Saturday, but I hope you all have a wonderful hike.

Task: Suggest a title for the blog post."""


def test_instance_prompt_input_first_en_exact():
    assert render_instance_prompt("Suggest a title for the blog post.", is_classification=False) == EXPECTED_INPUT_FIRST_EN


EXPECTED_OUTPUT_FIRST_EN = """\
For each classification task below, give the possible class labels and, for each label, an input that belongs to it. Write the label first and the input after it.

Task: Decide whether the movie review is positive or negative.
Class label: Positive
Input: The story kept me hooked from start to finish and the actors were wonderful.
Class label: Negative
Input: Two hours of my life that I will never get back.

Task: Tell whether the number is even or odd.
Class label: Even
Input: 48
Class label: Odd
Input: 17

Task: Send the customer message to the right department: billing, shipping or technical support.
Class label: Billing
Input: I was charged twice for the same order last week.
Class label: Shipping
Input: My parcel has been "in transit" for ten days now.
Class label: Technical support
Input: The app closes every time I open my account page.

Task: Is the sentence grammatically correct? Answer yes or no.
Class label: Yes
Input: She has lived in this town for five years.
Class label: No
Input: He don't like waiting in long lines.

Task: Classify the email as urgent or not urgent."""


def test_instance_prompt_output_first_en_exact():
    assert render_instance_prompt("Classify the email as urgent or not urgent.", is_classification=True) == EXPECTED_OUTPUT_FIRST_EN


EXPECTED_INPUT_FIRST_KO = """\
아래 각 작업에 대해 입력과 출력의 예시를 작성하세요. 가능하면 예시를 여러 개 만드세요. 입력이 필요 없는 작업이면 "입력:" 뒤에 <입력 없음>이라고 쓰고 출력을 작성하세요.

작업: 섭씨 온도를 화씨 온도로 바꾸세요.
예시 1
입력: 섭씨 25도
출력: 화씨 77도
예시 2
입력: 섭씨 영하 10도
출력: 화씨 14도

작업: 집에서 공부할 때 집중력을 유지하는 방법을 세 가지 알려 주세요.
예시 1
입력: <입력 없음>
출력: 1. 휴대폰을 다른 방에 두세요.
2. 짧게 공부하고 중간에 쉬는 시간을 가지세요.
3. 공부를 시작할 때마다 목표를 하나 정하세요.

작업: 문장의 맞춤법 오류를 고치세요.
예시 1
입력: 어제 택배를 받았는대 상자가 찌그러져 있었다.
출력: 어제 택배를 받았는데 상자가 찌그러져 있었다.
예시 2
입력: 오늘은 왠지 일찍 일어나야 될것 같다.
출력: 오늘은 왠지 일찍 일어나야 될 것 같다.

작업: 문장제 문제를 풀고 계산 과정을 보여 주세요.
예시 1
입력: 한 상자에 사과가 12개 들어 있습니다. 7상자에는 사과가 몇 개 있나요?
출력: 12 * 7 = 84이므로 사과는 84개입니다.

작업: 주어진 단어로 짧은 시를 지으세요."""


def test_instance_prompt_input_first_ko_exact():
    rendered = render_instance_prompt("주어진 단어로 짧은 시를 지으세요.", is_classification=False, language="ko")
    assert rendered == EXPECTED_INPUT_FIRST_KO


EXPECTED_OUTPUT_FIRST_KO = """\
아래 각 분류 작업에 대해 가능한 클래스 레이블을 쓰고, 레이블마다 그 레이블에 해당하는 입력을 작성하세요. 레이블을 먼저 쓰고 입력을 그 뒤에 쓰세요.

작업: 영화 후기가 긍정적인지 부정적인지 판단하세요.
클래스 레이블: 긍정
입력: 처음부터 끝까지 눈을 뗄 수 없었고 배우들의 연기도 훌륭했어요.
클래스 레이블: 부정
입력: 두 시간이 너무 아깝네요. 다시는 보고 싶지 않아요.

작업: 주어진 수가 짝수인지 홀수인지 말하세요.
클래스 레이블: 짝수
입력: 48
클래스 레이블: 홀수
입력: 17

작업: 주어진 문장이 존댓말인지 반말인지 구분하세요.
클래스 레이블: 존댓말
입력: 내일 회의는 몇 시에 시작하나요?
클래스 레이블: 반말
입력: 내일 회의 몇 시에 시작해?

작업: 문장이 문법적으로 올바른지 예 또는 아니요로 답하세요.
클래스 레이블: 예
입력: 그는 매일 아침 공원에서 산책을 한다.
클래스 레이블: 아니요
입력: 나는 어제 친구를 만날 것이다.

작업: 이메일이 긴급한지 아닌지 분류하세요."""


def test_instance_prompt_output_first_ko_exact():
    rendered = render_instance_prompt("이메일이 긴급한지 아닌지 분류하세요.", is_classification=True, language="ko")
    assert rendered == EXPECTED_OUTPUT_FIRST_KO


# --- the templates teach exactly the format the parsers read ------------------------------------


def _examples(template: str, language: str) -> list[tuple[str, str]]:
    """(task line, example text) for each few-shot task in a template (the open last one excluded)."""
    label = {"en": "Task:", "ko": "작업:"}[language]
    blocks = template.split("\n\n")[1:-1]
    pairs = []
    for block in blocks:
        first, rest = block.split("\n", 1)
        assert first.startswith(label)
        pairs.append((first, rest))
    return pairs


@pytest.mark.parametrize("language", ["en", "ko"])
def test_few_shot_instances_parse_back(language):
    input_first = _examples(load_template("instances_input_first", language), language)
    output_first = _examples(load_template("instances_output_first", language), language)
    parsed_input_first = [parse_instances(text, is_classification=False) for _, text in input_first]
    parsed_output_first = [parse_instances(text, is_classification=True) for _, text in output_first]
    output_label, class_label = {"en": ("Output:", "Class label:"), "ko": ("출력:", "클래스 레이블:")}[language]
    assert [len(p) for p in parsed_input_first] == [text.count("\n" + output_label) for _, text in input_first]
    assert [len(p) for p in parsed_output_first] == [text.count(class_label) for _, text in output_first]
    assert all(parsed_input_first) and all(parsed_output_first)
    # The second task needs no input: its <noinput> marker parses to an empty input, and its
    # output keeps its three lines.
    tips = parsed_input_first[1]
    assert len(tips) == 1 and tips[0].input == "" and tips[0].output.count("\n") == 2
    if language == "en":
        assert parsed_input_first[0] == [Instance(input="25 degrees Celsius", output="77 degrees Fahrenheit"),
                                         Instance(input="-10 degrees Celsius", output="14 degrees Fahrenheit")]
        assert parsed_output_first[1] == [Instance(input="48", output="Even"), Instance(input="17", output="Odd")]


@pytest.mark.parametrize("language", ["en", "ko"])
def test_few_shot_answers_parse_back(language):
    template = load_template("classification", language)
    question = {"en": "Is it classification?", "ko": "분류 작업인가요?"}[language]
    answers = [line.split(question, 1)[1] for line in template.split("\n") if line.startswith(question) and line != question]
    assert [parse_classification(answer) for answer in answers] == [True, False] * 4


def test_bootstrap_continuation_parses_back():
    prompt = render_bootstrap_prompt(EIGHT)
    completion = " Name a famous painter from Spain.\n10. Give a recipe for lentil soup.\n11. Describe the water cycle."
    assert parse_instructions(completion, start_index=9) == [
        "Name a famous painter from Spain.", "Give a recipe for lentil soup.", "Describe the water cycle.",
    ]
    # The whole prompt plus its continuation reads as a list whose first 8 items are the prompt's.
    header, body = (prompt + completion).split("\n", 1)
    assert parse_instructions(body, start_index=1) == EIGHT + parse_instructions(completion)


def test_stop_sequences():
    assert stop_sequences("bootstrap") == ["\n20.", "\n20)"]
    assert stop_sequences("bootstrap", last_index=12) == ["\n12.", "\n12)"]
    assert stop_sequences("classification", "ko") == ["\n\n", "\n작업:"]
    assert stop_sequences("instances") == ["\nTask:", "\n\n"]
    assert stop_sequences("instances", "ko") == ["\n작업:", "\n\n"]
    with pytest.raises(ValueError, match="unknown prompt kind"):
        stop_sequences("rewrite")


# --- sampling the instructions of one prompt -----------------------------------------------------

SEEDS = [f"seed instruction {i}" for i in range(20)]
MACHINE = [f"machine instruction {i}" for i in range(10)]


@pytest.mark.parametrize(("machine_pool", "expected_machine"), [(0, 0), (1, 1), (2, 2), (10, 2)])
def test_sample_uses_two_machine_instructions_once_there_are_two(machine_pool, expected_machine):
    chosen = sample_prompt_instructions(SEEDS, MACHINE[:machine_pool], random.Random(0))
    assert len(chosen) == 8
    assert len(set(chosen)) == 8
    assert sum(c.startswith("machine") for c in chosen) == expected_machine
    assert set(chosen) <= set(SEEDS) | set(MACHINE[:machine_pool])


def test_sample_is_deterministic_given_the_rng_and_shuffled():
    first = sample_prompt_instructions(SEEDS, MACHINE, random.Random(7))
    assert first == sample_prompt_instructions(SEEDS, MACHINE, random.Random(7))
    assert first != sample_prompt_instructions(SEEDS, MACHINE, random.Random(8))
    # Shuffled: the machine instructions do not always sit at the same places.
    positions = {
        tuple(i for i, c in enumerate(sample_prompt_instructions(SEEDS, MACHINE, random.Random(seed))) if c.startswith("machine"))
        for seed in range(30)
    }
    assert len(positions) > 5


def test_sample_continues_from_the_rng_state():
    rng = random.Random(3)
    a = sample_prompt_instructions(SEEDS, MACHINE, rng)
    state = rng.getstate()
    b = sample_prompt_instructions(SEEDS, MACHINE, rng)
    rng.setstate(state)
    assert sample_prompt_instructions(SEEDS, MACHINE, rng) == b
    assert a != b


def test_sample_with_few_seeds_uses_them_all():
    chosen = sample_prompt_instructions(SEEDS[:3], MACHINE, random.Random(0))
    assert sorted(chosen) == sorted(SEEDS[:3] + [c for c in chosen if c.startswith("machine")])
    assert len(chosen) == 5
    assert sorted(sample_prompt_instructions(SEEDS[:3], [], random.Random(0))) == SEEDS[:3]


def test_sample_custom_counts():
    chosen = sample_prompt_instructions(SEEDS, MACHINE, random.Random(0), num_seed=3, num_machine=1)
    assert len(chosen) == 4 and sum(c.startswith("machine") for c in chosen) == 1


@pytest.mark.parametrize(
    ("seeds", "machine", "num_seed", "num_machine"),
    [([], [], 6, 2), (SEEDS, MACHINE, 0, 0), (SEEDS, MACHINE, -1, 2)],
)
def test_sample_rejects_bad_arguments(seeds, machine, num_seed, num_machine):
    with pytest.raises(ValueError):
        sample_prompt_instructions(seeds, machine, random.Random(0), num_seed=num_seed, num_machine=num_machine)


def test_the_text_modules_import_neither_torch_nor_prefect():
    code = (
        "import sys\n"
        "import tasks.self_instruct.seeds, tasks.self_instruct.prompts\n"
        "import tasks.self_instruct.parsing, tasks.self_instruct.filters\n"
        "heavy = sorted(m for m in ('torch', 'prefect', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
