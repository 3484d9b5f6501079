"""The demo's task world: small tasks with checkable answers, in English and Korean.

The CPU demo pretrains a ~1M-parameter model for a couple of minutes. Trained on free prose, such
a model writes word salad, and every later stage learns from that salad. This module gives it a
world it can learn in that budget: two dozen task families (antonyms, plurals, capitals, parity,
sums, first and last words, ...), each with many phrasings of its instruction and a rule that
answers any input. The pretraining corpus shows the families in the self-instruct prompt formats
(`demo_documents.seed_documents`), the demo seed set holds one or two tasks per family, and
self-instruct then has to rediscover the other phrasings and write new instances, as it does
with a large model whose pretraining saw the world.

    python -m tasks.self_instruct.demo_world en > tasks/self_instruct/demo/seeds_en.jsonl

`demo_seed_tasks(language)` builds the shipped seed file's content; a test keeps the two equal.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from tasks.self_instruct.seeds import Instance, SeedTask

Rng = random.Random
MakeInstance = Callable[[Rng, str], tuple[str, str]]

# ---- lexicons (English, Korean) ------------------------------------------------------------------

OPPOSITES = [("hot", "cold", "뜨겁다", "차갑다"), ("big", "small", "크다", "작다"), ("fast", "slow", "빠르다", "느리다"),
             ("happy", "sad", "기쁘다", "슬프다"), ("light", "dark", "밝다", "어둡다"), ("open", "closed", "열다", "닫다"),
             ("up", "down", "위", "아래"), ("early", "late", "이르다", "늦다"), ("full", "empty", "가득하다", "비다"),
             ("new", "old", "새롭다", "낡다"), ("hard", "soft", "딱딱하다", "부드럽다"), ("wet", "dry", "젖다", "마르다"),
             ("high", "low", "높다", "낮다"), ("long", "short", "길다", "짧다"), ("rich", "poor", "부유하다", "가난하다"),
             ("strong", "weak", "강하다", "약하다"), ("near", "far", "가깝다", "멀다"), ("clean", "dirty", "깨끗하다", "더럽다"),
             ("loud", "quiet", "시끄럽다", "조용하다"), ("thick", "thin", "두껍다", "얇다"), ("win", "lose", "이기다", "지다"),
             ("push", "pull", "밀다", "당기다"), ("day", "night", "낮", "밤"), ("in", "out", "안", "밖"),
             ("left", "right", "왼쪽", "오른쪽"), ("buy", "sell", "사다", "팔다"), ("true", "false", "참", "거짓")]
NOUNS = [("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("city", "cities"), ("child", "children"), ("mouse", "mice"),
         ("tree", "trees"), ("bus", "buses"), ("baby", "babies"), ("man", "men"), ("woman", "women"), ("foot", "feet"),
         ("tooth", "teeth"), ("book", "books"), ("glass", "glasses"), ("story", "stories"), ("horse", "horses"),
         ("leaf", "leaves"), ("knife", "knives"), ("apple", "apples"), ("river", "rivers"), ("fox", "foxes"),
         ("party", "parties"), ("car", "cars"), ("goose", "geese"), ("dish", "dishes"), ("bird", "birds")]
CAPITALS = [("France", "Paris", "프랑스", "파리"), ("Japan", "Tokyo", "일본", "도쿄"), ("Italy", "Rome", "이탈리아", "로마"),
            ("Spain", "Madrid", "스페인", "마드리드"), ("Egypt", "Cairo", "이집트", "카이로"), ("Kenya", "Nairobi", "케냐", "나이로비"),
            ("Canada", "Ottawa", "캐나다", "오타와"), ("Peru", "Lima", "페루", "리마"), ("China", "Beijing", "중국", "베이징"),
            ("Korea", "Seoul", "한국", "서울"), ("Greece", "Athens", "그리스", "아테네"), ("Norway", "Oslo", "노르웨이", "오슬로"),
            ("Russia", "Moscow", "러시아", "모스크바"), ("Germany", "Berlin", "독일", "베를린"), ("Cuba", "Havana", "쿠바", "아바나"),
            ("Chile", "Santiago", "칠레", "산티아고"), ("Poland", "Warsaw", "폴란드", "바르샤바"), ("Ireland", "Dublin", "아일랜드", "더블린"),
            ("Thailand", "Bangkok", "태국", "방콕"), ("Austria", "Vienna", "오스트리아", "빈")]
COLORS = [("banana", "yellow", "바나나", "노란색"), ("grass", "green", "잔디", "초록색"), ("sky", "blue", "하늘", "파란색"),
          ("snow", "white", "눈", "하얀색"), ("coal", "black", "석탄", "검은색"), ("tomato", "red", "토마토", "빨간색"),
          ("carrot", "orange", "당근", "주황색"), ("lemon", "yellow", "레몬", "노란색"), ("milk", "white", "우유", "하얀색"),
          ("leaf", "green", "나뭇잎", "초록색"), ("strawberry", "red", "딸기", "빨간색"), ("crow", "black", "까마귀", "검은색"),
          ("ocean", "blue", "바다", "파란색"), ("pumpkin", "orange", "호박", "주황색"), ("cloud", "white", "구름", "하얀색"),
          ("cherry", "red", "체리", "빨간색"), ("frog", "green", "개구리", "초록색")]
ANIMALS = [("dog", "mammal", "개", "포유류"), ("cat", "mammal", "고양이", "포유류"), ("whale", "mammal", "고래", "포유류"),
           ("horse", "mammal", "말", "포유류"), ("bat", "mammal", "박쥐", "포유류"), ("eagle", "bird", "독수리", "조류"),
           ("owl", "bird", "부엉이", "조류"), ("penguin", "bird", "펭귄", "조류"), ("duck", "bird", "오리", "조류"),
           ("sparrow", "bird", "참새", "조류"), ("shark", "fish", "상어", "어류"), ("salmon", "fish", "연어", "어류"),
           ("tuna", "fish", "참치", "어류"), ("trout", "fish", "송어", "어류"), ("snake", "reptile", "뱀", "파충류"),
           ("lizard", "reptile", "도마뱀", "파충류"), ("turtle", "reptile", "거북", "파충류"), ("crocodile", "reptile", "악어", "파충류"),
           ("ant", "insect", "개미", "곤충"), ("bee", "insect", "벌", "곤충"), ("beetle", "insect", "딱정벌레", "곤충"),
           ("butterfly", "insect", "나비", "곤충")]
SOUNDS = [("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"), ("pig", "oink"),
          ("owl", "hoot"), ("lion", "roar"), ("snake", "hiss"), ("bee", "buzz"), ("horse", "neigh"), ("frog", "croak")]
PAST = [("walk", "walked"), ("go", "went"), ("eat", "ate"), ("see", "saw"), ("play", "played"), ("run", "ran"),
        ("write", "wrote"), ("jump", "jumped"), ("sing", "sang"), ("take", "took"), ("make", "made"), ("read", "read"),
        ("swim", "swam"), ("cook", "cooked"), ("drink", "drank"), ("sleep", "slept"), ("buy", "bought"), ("talk", "talked"),
        ("give", "gave"), ("fly", "flew")]
FRENCH = [("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("water", "eau"), ("bread", "pain"), ("sun", "soleil"),
          ("moon", "lune"), ("book", "livre"), ("tree", "arbre"), ("car", "voiture"), ("apple", "pomme"), ("friend", "ami"),
          ("school", "école"), ("milk", "lait"), ("red", "rouge"), ("green", "vert"), ("day", "jour"), ("night", "nuit"),
          ("fish", "poisson"), ("flower", "fleur")]
NUMBER_WORDS = {"en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"],
                "ko": ["영", "일", "이", "삼", "사", "오", "육", "칠", "팔", "구", "십", "십일", "십이"]}
POSITIVE = {"en": ["great", "lovely", "wonderful", "excellent", "fun", "friendly", "delicious", "amazing"],
            "ko": ["훌륭했다", "좋았다", "멋졌다", "맛있었다", "즐거웠다", "친절했다"]}
NEGATIVE = {"en": ["awful", "boring", "terrible", "rude", "cold", "dirty", "slow", "disappointing"],
            "ko": ["별로였다", "지루했다", "끔찍했다", "불친절했다", "더러웠다", "실망스러웠다"]}
REVIEW_NOUNS = {"en": ["food", "movie", "hotel", "service", "trip", "show", "book", "game", "room", "concert"],
                "ko": ["음식은", "영화는", "호텔은", "서비스는", "여행은", "공연은", "책은", "방은"]}
SENTENCE_WORDS = {
    "en": (["The", "A", "My", "Our", "That", "This"], ["cat", "boy", "girl", "dog", "teacher", "bird", "farmer", "child"],
           ["sees", "likes", "finds", "paints", "reads", "moves", "wants", "cleans"],
           ["the", "a", "my", "one", "every"], ["ball", "house", "river", "book", "tree", "car", "window", "garden"]),
    "ko": (["오늘", "어제", "아침에", "저녁에", "주말에"], ["철수는", "영희는", "고양이가", "선생님이", "아이가", "친구가"],
           ["사과를", "책을", "노래를", "그림을", "편지를", "공을"], ["먹었다", "읽었다", "불렀다", "그렸다", "썼다", "찼다"], []),
}
LABELS = {"en": {"even": "Even", "odd": "Odd", "positive": "Positive", "negative": "Negative", "yes": "Yes", "no": "No"},
          "ko": {"even": "짝수", "odd": "홀수", "positive": "긍정", "negative": "부정", "yes": "예", "no": "아니요"}}


def _pick(rng: Rng, rows: Sequence, language: str, source: int, target: int, ko_source: int | None = None, ko_target: int | None = None):
    row = rng.choice(rows)
    if language == "ko" and ko_source is not None:
        return row[ko_source], row[ko_target]
    return row[source], row[target]


def _sentence(rng: Rng, language: str) -> str:
    parts = SENTENCE_WORDS[language]
    if language == "en":
        return " ".join(rng.choice(p) for p in parts) + "."
    return " ".join(rng.choice(p) for p in parts[:4]) + "."


# ---- families --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One kind of task: several phrasings of its instruction per language, and a rule for instances."""

    name: str
    phrasings: dict[str, tuple[str, ...]]
    make: MakeInstance
    is_classification: bool = False


def _numbers(rng: Rng, language: str) -> tuple[str, str]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"{a} and {b}" if language == "en" else f"{a}, {b}", str(a + b)


def _larger(rng: Rng, language: str) -> tuple[str, str]:
    a, b = rng.sample(range(1, 100), 2)
    return f"{a} or {b}" if language == "en" else f"{a}, {b}", str(max(a, b))


def _sort(rng: Rng, language: str) -> tuple[str, str]:
    values = rng.sample(range(1, 50), 3)
    return ", ".join(map(str, values)), ", ".join(map(str, sorted(values)))


def _parity(rng: Rng, language: str) -> tuple[str, str]:
    n = rng.randint(1, 99)
    return str(n), LABELS[language]["even" if n % 2 == 0 else "odd"]


def _review(rng: Rng, language: str) -> tuple[str, str]:
    good = rng.random() < 0.5
    adjective = rng.choice(POSITIVE[language] if good else NEGATIVE[language])
    noun = rng.choice(REVIEW_NOUNS[language])
    text = f"The {noun} was {adjective}." if language == "en" else f"{noun} {adjective}."
    return text, LABELS[language]["positive" if good else "negative"]


def _is_animal_class(rng: Rng, language: str) -> tuple[str, str]:
    row = rng.choice(ANIMALS)
    claimed = row if rng.random() < 0.5 else rng.choice(ANIMALS)
    name, kind = (row[0], claimed[1]) if language == "en" else (row[2], claimed[3])
    text = f"A {name} is a {kind}." if language == "en" else f"{name}는 {kind}이다."
    return text, LABELS[language]["yes" if row[1] == claimed[1] else "no"]


def _words(index: int) -> MakeInstance:
    def make(rng: Rng, language: str) -> tuple[str, str]:
        sentence = _sentence(rng, language)
        words = sentence.rstrip(".").split()
        return sentence, words[index]
    return make


def _count_words(rng: Rng, language: str) -> tuple[str, str]:
    sentence = _sentence(rng, language)
    return sentence, str(len(sentence.split()))


def _repeat(rng: Rng, language: str) -> tuple[str, str]:
    word = rng.choice(NOUNS)[0] if language == "en" else rng.choice(OPPOSITES)[2]
    return word, f"{word} {word}"


def _dash(rng: Rng, language: str) -> tuple[str, str]:
    pool = [n[0] for n in NOUNS] if language == "en" else [a[2] for a in ANIMALS]
    words = rng.sample(pool, 3)
    return " ".join(words), "-".join(words)


def _next(rng: Rng, language: str) -> tuple[str, str]:
    n = rng.randint(1, 98)
    return str(n), str(n + 1)


def _number_word(rng: Rng, language: str) -> tuple[str, str]:
    n = rng.randint(0, 12)
    return str(n), NUMBER_WORDS[language][n]


def _lexicon(rows: Sequence, source: int, target: int, ko_source: int | None = None, ko_target: int | None = None) -> MakeInstance:
    return lambda rng, language: _pick(rng, rows, language, source, target, ko_source, ko_target)


def _opposite(rng: Rng, language: str) -> tuple[str, str]:
    row = rng.choice(OPPOSITES)
    flip = rng.random() < 0.5  # both directions: cold -> hot as well as hot -> cold
    if language == "ko":
        return (row[3], row[2]) if flip else (row[2], row[3])
    return (row[1], row[0]) if flip else (row[0], row[1])


FAMILIES: tuple[Family, ...] = (
    Family("opposite", {"en": ("Give the opposite of the word.", "What is the antonym of this word?",
                               "Write a word that means the opposite.", "Name the opposite of the given word.",
                               "Turn the word into its opposite.", "Find the antonym."),
                        "ko": ("주어진 단어의 반대말을 쓰세요.", "이 단어의 반의어는 무엇인가요?", "반대 뜻을 가진 낱말을 적어 주세요.",
                               "다음 낱말과 뜻이 반대인 말을 고르세요.")}, _opposite),
    Family("plural", {"en": ("Give the plural form of the noun.", "Write the noun in the plural.",
                             "What is the plural of this word?", "Change the word so it means more than one.",
                             "Make the noun plural.")}, _lexicon(NOUNS, 0, 1)),
    Family("capital", {"en": ("Name the capital city of the country.", "What is the capital of this country?",
                              "Write the capital of the given country.", "Which city is the capital?",
                              "Tell me the main city where the government of the country sits."),
                       "ko": ("이 나라의 수도를 쓰세요.", "다음 나라의 수도는 어디인가요?", "주어진 국가의 수도 이름을 알려 주세요.",
                              "나라 이름을 보고 수도를 적으세요.")}, _lexicon(CAPITALS, 0, 1, 2, 3)),
    Family("color", {"en": ("What color is this thing?", "Name the usual color of the object.",
                            "Tell the color that the thing usually has.", "Write the color of the given item."),
                     "ko": ("이 물건은 무슨 색인가요?", "주어진 사물의 색깔을 쓰세요.", "다음 것의 보통 색을 알려 주세요.")},
           _lexicon(COLORS, 0, 1, 2, 3)),
    Family("animal_class", {"en": ("Classify the animal as a mammal, bird, fish, reptile or insect.",
                                   "Which group does the animal belong to: mammal, bird, fish, reptile or insect?",
                                   "Tell what kind of animal this is.", "Sort the animal into its class."),
                            "ko": ("이 동물은 포유류, 조류, 어류, 파충류, 곤충 중 무엇인가요?", "동물을 알맞은 무리로 분류하세요.",
                                   "다음 동물의 종류를 쓰세요.")}, _lexicon(ANIMALS, 0, 1, 2, 3), True),
    Family("sentiment", {"en": ("Is the review positive or negative?", "Classify the sentiment of the sentence.",
                                "Decide whether the opinion is positive or negative.", "Label the review as positive or negative.",
                                "Tell if the writer liked it or not."),
                         "ko": ("이 후기는 긍정인가요, 부정인가요?", "문장의 감정을 긍정 또는 부정으로 분류하세요.",
                                "글쓴이의 의견이 긍정적인지 부정적인지 판단하세요.")}, _review, True),
    Family("parity", {"en": ("Tell whether the number is even or odd.", "Is this number even or odd?",
                             "Classify the number as even or odd.", "Decide if the given number is even."),
                      "ko": ("이 수가 짝수인지 홀수인지 말하세요.", "주어진 숫자는 짝수인가요, 홀수인가요?", "숫자를 짝수나 홀수로 분류하세요.")},
           _parity, True),
    Family("sum", {"en": ("Add the two numbers.", "What is the sum of the numbers?", "Compute the total of the two numbers.",
                          "Find the result when you add them together."),
                   "ko": ("주어진 두 수를 더하세요.", "두 숫자의 합은 얼마인가요?", "주어진 수들을 모두 더한 값을 쓰세요.")}, _numbers),
    Family("larger", {"en": ("Which number is larger?", "Pick the bigger of the two numbers.", "Write the greater number.",
                             "Choose the number with the higher value."),
                      "ko": ("두 수 중 더 큰 수는 무엇인가요?", "더 큰 숫자를 고르세요.", "주어진 두 수에서 큰 값을 쓰세요.")}, _larger),
    Family("sort", {"en": ("Sort the numbers from smallest to largest.", "Put the numbers in increasing order.",
                           "Arrange the list in ascending order.", "Order these numbers from low to high."),
                    "ko": ("숫자를 작은 것부터 큰 순서로 정렬하세요.", "다음 수들을 오름차순으로 나열하세요.")}, _sort),
    Family("first_word", {"en": ("What is the first word of the sentence?", "Write the word the sentence starts with.",
                                 "Copy the first word.", "Tell me which word comes first."),
                          "ko": ("문장의 첫 낱말을 쓰세요.", "이 문장은 어떤 말로 시작하나요?", "맨 앞에 있는 낱말을 적으세요.")}, _words(0)),
    Family("last_word", {"en": ("What is the last word of the sentence?", "Write the final word, without the period.",
                                "Copy the word that ends the sentence.", "Which word comes at the end?"),
                         "ko": ("문장의 마지막 낱말을 쓰세요.", "이 문장은 어떤 말로 끝나나요?", "맨 끝에 있는 낱말을 적으세요.")}, _words(-1)),
    Family("count_words", {"en": ("Count the words in the sentence.", "How many words does the sentence have?",
                                  "Tell the number of words.", "Give the word count of the text."),
                           "ko": ("문장에 낱말이 몇 개 있는지 세어 보세요.", "이 문장의 낱말 수는 몇 개인가요?")}, _count_words),
    Family("repeat", {"en": ("Repeat the word twice.", "Say the word two times.", "Write the given word two times in a row.",
                             "Double the word by writing it again."),
                      "ko": ("낱말을 두 번 반복해서 쓰세요.", "주어진 말을 두 번 적으세요.")}, _repeat),
    Family("dash", {"en": ("Join the words with dashes.", "Connect the three words using a hyphen between them.",
                           "Put a dash between each pair of words.", "Link the words together with a dash."),
                    "ko": ("낱말들을 하이픈으로 이어 쓰세요.", "세 낱말 사이에 줄표를 넣어 연결하세요.")}, _dash),
    Family("next_number", {"en": ("What number comes after this one?", "Write the next number.", "Add one to the number.",
                                  "Give the number that follows."),
                           "ko": ("이 수 다음에 오는 수는 무엇인가요?", "주어진 수보다 하나 큰 수를 쓰세요.")}, _next),
    Family("number_word", {"en": ("Write the number as a word.", "Spell out the number in letters.",
                                  "How do you write this number in words?"),
                           "ko": ("숫자를 한글로 읽는 말로 쓰세요.", "이 숫자를 글자로 적으세요.")}, _number_word),
    Family("animal_sound", {"en": ("What sound does the animal make?", "Write the noise this animal makes.",
                                   "Name the sound of the animal.", "How does the animal sound?")}, _lexicon(SOUNDS, 0, 1)),
    Family("past_tense", {"en": ("Give the past tense of the verb.", "Write the verb in the past tense.",
                                 "What is the past form of this verb?", "Change the verb so it talks about yesterday.")},
           _lexicon(PAST, 0, 1)),
    Family("french", {"en": ("Translate the word into French.", "What is the French word for this?",
                             "Write this English word in French.", "Give the French translation.")}, _lexicon(FRENCH, 0, 1)),
    Family("animal_fact", {"en": ("Is the statement about the animal true? Answer yes or no.",
                                  "Check the sentence about the animal and say yes or no.",
                                  "Decide if the animal fact is correct.", "Answer yes if the statement is right."),
                           "ko": ("동물에 대한 문장이 맞나요? 예 또는 아니요로 답하세요.", "다음 문장이 사실인지 판단하세요.")},
           _is_animal_class, True),
)
# Said before or after an instruction; they make requests of one task differ, as people's do, so
# that the ROUGE-L novelty filter keeps more than one phrasing per task. Questions and commands take
# different lead-ins ("Please what is ..." is not English).
COMMAND_LEADS = {"en": ("", "", "", "Please ", "Now ", "For this task, ", "Read the input and then ", "Your job is simple: ",
                        "Carefully ", "In one short step, ", "As a quick exercise, ", "Using the input below, "),
                 "ko": ("", "", "", "지금 ", "다음 과제로 ", "입력을 읽고 ", "간단히 ", "아래 입력을 보고 ")}
QUESTION_LEADS = {"en": ("", "", "", "Quick question: ", "Tell me, ", "Here is a question for you. ", "Think about the input. ",
                         "Look at the input below. ", "One more puzzle: "),
                  "ko": ("", "", "", "질문입니다. ", "생각해 보세요. ", "아래 입력을 보세요. ")}
CLOSERS = {"en": ("", "", "", " Answer with one word.", " Write only the answer.", " Keep it short.", " Do not explain.",
                  " No explanation is needed.", " Give just the result.", " Reply on one line.", " The input comes next.",
                  " Be brief and exact.", " Skip any extra words."),
           "ko": ("", "", "", " 한 낱말로 답하세요.", " 답만 쓰세요.", " 짧게 답하세요.", " 설명은 필요 없습니다.", " 결과만 적으세요.")}


def families(language: str) -> list[Family]:
    if language not in CLOSERS:
        raise ValueError(f"the demo world has no language {language!r} (en, ko)")
    return [f for f in FAMILIES if language in f.phrasings]


def _instruction(rng: Rng, family: Family, phrasing: str, language: str) -> str:
    leads = QUESTION_LEADS if phrasing.endswith("?") else COMMAND_LEADS
    lead = rng.choice(leads[language])
    if lead and language == "en" and not lead.endswith((". ", ": ")):
        phrasing = phrasing[0].lower() + phrasing[1:]
    return lead + phrasing + rng.choice(CLOSERS[language])


def _instances(rng: Rng, family: Family, language: str, count: int) -> list[Instance]:
    seen: dict[str, str] = {}
    for _ in range(count * 4):
        source, target = family.make(rng, language)
        if source not in seen and source != target:  # an already sorted list teaches nothing (and is filtered out)
            seen[source] = target
        if len(seen) == count:
            break
    return [Instance(input=source, output=target) for source, target in seen.items()]


def world_tasks(language: str, count: int, seed: int = 0, instances: int = 4) -> list[SeedTask]:
    """`count` tasks drawn from the families: a phrasing with an opener and a closer, and its instances."""
    rng = random.Random(f"demo-world-{language}-{seed}")
    pool = families(language)
    tasks = []
    for number in range(count):
        family = pool[number % len(pool)]
        phrasing = rng.choice(family.phrasings[language])
        tasks.append(SeedTask(id=f"world_{language}_{number:05d}", name=family.name, instruction=_instruction(rng, family, phrasing, language),
                              instances=_instances(rng, family, language, instances), is_classification=family.is_classification))
    return tasks


def demo_seed_tasks(language: str) -> list[SeedTask]:
    """The shipped demo seeds: each family's first two phrasings, with three instances each."""
    rng = random.Random(f"demo-seeds-{language}")
    tasks = []
    for family in families(language):
        for phrasing in family.phrasings[language][:2]:
            tasks.append(SeedTask(id=f"demo_{language}_{len(tasks) + 1:03d}", name=family.name, instruction=phrasing,
                                  instances=_instances(rng, family, language, 3), is_classification=family.is_classification))
    return tasks


def seed_jsonl(tasks: Sequence[SeedTask]) -> str:
    return "".join(json.dumps(t.model_dump(mode="json"), ensure_ascii=False) + "\n" for t in tasks)


if __name__ == "__main__":
    sys.stdout.write(seed_jsonl(demo_seed_tasks(sys.argv[1] if len(sys.argv) > 1 else "en")))
