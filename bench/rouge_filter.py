"""Benchmark: the ROUGE-L novelty filter against the Alpaca-style baseline.

The stream is a seeded, realistic mix of instructions: fresh ones from templates over a few
hundred words with Zipf-like choices, near-duplicates of earlier ones (a word replaced, dropped or
added, a number changed, different case and punctuation) and recombinations of two earlier ones.

Both sides start from 175 seed instructions (as Alpaca's pool does) generated with another seed.
For N = 1,000, 2,500 and 5,000 it runs, on the same stream prefix:
- the baseline, as Alpaca's generate_instruction.py does it: rouge-score's tokenizer once per
  instruction, then, for each new instruction, a fresh ``multiprocessing.Pool`` (2 processes, the
  machine's cores) mapping rouge-score's ``_score_lcs`` over every pool instruction, an argsort for
  the 10 most similar, and "keep when the highest score is <= 0.7";
- the engine (``tasks.rouge.engine.RougeLFilter``, one thread), tokenization included, offered
  batches of 64; it runs ``--repeat`` times before the baseline and ``--repeat`` times after it
  (best and median of all printed; the ratio uses the best);
and checks that the decisions, highest scores and most-similar indices are identical.

The baseline is quadratic and slow (minutes at N = 2,500). By default it therefore runs on an
evenly spaced sample of each prefix's candidates (``--sample``): each sampled candidate is scored
against the exact pool it meets in the stream (the engine's pool; every sampled decision checks
it), and the baseline's candidates/s for the prefix is the sample size divided by the sample's
time, i.e. its per-candidate cost averaged over the prefix. ``--full`` (or ``--full-up-to N``)
runs the real greedy baseline on every candidate and checks every decision (slow).
Then the engine alone filters 50,000 candidates and the time is printed.

Last, the high-keep stream (``make_high_keep_stream``: 52,000 candidates, ~75% kept at 0.7, like
Alpaca's 40,652 of 52,002) goes through ``alignflow dedup`` as a subprocess, start-up, reading and
writing included (``--cli-repeat`` runs, best and median), with the pairs the greedy filter meets,
the pairs the bounds settled and the pairs scored with an exact LCS. The baseline would take hours
there, so it runs on an evenly spaced sample of the stream (``--high-keep-sample``), each candidate
against the very pool it meets (the CLI's kept rows), and its time is extrapolated to the whole
stream (mean per candidate x stream length); the ratio is that over the CLI's best time, and the
sampled decisions, scores and most similar texts are checked against the CLI's output. The default
run takes a few minutes on 2 cores; ``--only-high-keep`` runs that part alone.

Run: ``python bench/rouge_filter.py [--sizes 1000 2500 5000] [--sample 150] [--full] [--big 50000]
[--high-keep 52000] [--high-keep-sample 40] [--cli-repeat 3] [--workers -1] [--only-high-keep]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.rouge.engine import RougeLFilter  # noqa: E402  (imported before any timing)

_VERBS = """write generate explain summarize classify translate list describe create give
compose suggest rewrite identify compare outline design draft find convert propose evaluate
analyze brainstorm recommend predict calculate edit paraphrase name detect extract""".split()
_FORMS = """poem, story, essay, email, letter, tweet, slogan, haiku, recipe, speech, review, report,
dialogue, riddle, joke, limerick, headline, summary, product description, cover letter, blog post,
advertisement, lesson plan, song, job posting, press release""".replace("\n", " ").split(", ")
_ADJS = """short funny formal persuasive creative detailed concise polite friendly simple
professional catchy informative humorous brief emotional technical inspiring sarcastic
dramatic optimistic neutral academic casual heartfelt mysterious elegant vivid""".split()
_TOPIC_LIST = [t.strip() for t in """climate change, artificial intelligence, the ocean,
renewable energy, a rainy day, the french revolution, quantum computing, healthy eating, remote
work, space exploration, social media, a lost dog, the stock market, friendship, coffee, machine
learning, democracy, honeybees, volcanoes, the internet, electric cars, meditation, chess, ancient
rome, photosynthesis, black holes, a first date, public transport, recycling, the moon landing,
video games, gardening, cryptocurrency, time management, a haunted house, mountain climbing, jazz
music, the human brain, vaccines, deserts, a small bakery, online privacy, the olympics,
rainforests, a job interview, programming languages, a summer vacation, earthquakes, the printing
press, nuclear power, a childhood memory, sleep, city planning, the water cycle, dinosaurs, a busy
airport, chocolate, volunteering, the history of tea, wind turbines, a library at night, robots,
kindness, medieval castles, urban gardening, the silk road, coral reefs, penguins, tax returns,
a marathon, origami, the periodic table, street food, a power outage, lighthouses, sourdough
bread, the immune system, glaciers, fake news, a rocket launch, beekeeping, the roman empire,
wildfires, a chess tournament, smartphones, bicycles, a wedding toast, fermentation, submarines,
the great wall, a thunderstorm, solar panels, a museum visit, board games, migration of birds,
a startup pitch, knitting, the water crisis, ancient egypt, a spelling bee, a camping trip""".replace("\n", " ").split(",")]
_TOPIC_WORDS = sorted({w for t in _TOPIC_LIST for w in t.split() if len(w) > 3})
_THINGS = """ideas names questions examples reasons tips strategies facts ways steps benefits
risks arguments titles keywords activities exercises habits""".split()
_LANGS = "French Spanish German Italian Japanese Korean Portuguese Dutch Swedish Polish".split()
_LABELS = [("positive", "negative"), ("spam", "not spam"), ("fact", "opinion"),
           ("formal", "informal"), ("true", "false"), ("animal", "plant"), ("urgent", "routine")]
_ITEMS = "sentence tweet review headline email statement sentences reviews".split()
_DOCS = "paragraph article text passage story email essay report abstract speech".split()
_AUDIENCES = """children students beginners experts teenagers managers parents tourists
engineers nurses teachers investors""".split()
_TEMPLATES = [
    "{Verb} a {adj} {form} about {topic}.",
    "{Verb} a {form} about {topic} for {audience}.",
    "Explain how {topic} affects {topic2} in {n} sentences.",
    "Give {n} {things} for learning about {topic}.",
    "Classify the following {item} as {label1} or {label2}.",
    "Translate the following {item} into {lang}.",
    "Summarize the {doc} about {topic} in {n} words.",
    "Generate a list of {n} {adj} {things} related to {topic}.",
    "What is the difference between {topic} and {topic2}?",
    "Rewrite the following {doc} to make it more {adj}.",
    "{Verb} {n} {things} why {topic} matters to {audience}.",
    "Describe {topic} to {audience} using a {adj} tone.",
    "Write a {adj} {form} that compares {topic} with {topic2}.",
    "Find the main idea of the {doc} and explain it to {audience}.",
    "Create a quiz with {n} questions about {topic}.",
    "How would you explain {topic} to {audience}?",
    "Suggest {n} {adj} titles for a {form} about {topic}.",
    "Identify the {things} mentioned in the {doc} about {topic}.",
    "Is the following {item} about {topic} {label1} or {label2}? Answer with one word.",
    "Draft a {adj} {form} inviting {audience} to an event about {topic}.",
]
_SYLLABLES = "ka lo ri ven ta mir sol de na bru ex tor li quan pe zu gra mo hel vi dan or sen fa".split()
_ENTITY_KINDS = """festival, startup, river, bakery, museum, novel, village, app, football club, band,
restaurant, university, hiking trail, podcast, board game, island, company, bridge""".replace("\n", " ").split(", ")
_UNITS = "kilometers miles degrees dollars euros grams liters hours minutes percent".split()
_ENTITY_TEMPLATES = [
    "Write a {adj} {form} about the {name} {kind}.",
    "Describe the history of the {name} {kind} in {n} sentences.",
    "Convert {number} {unit} into {unit2}.",
    "What is {number} {unit} plus {number2} {unit}?",
    "Give {n} {things} for visiting the {name} {kind}.",
    "Summarize the following review of the {name} {kind}.",
    "Compare the {name} {kind} with the {name2} {kind}.",
    "Explain why the {name} {kind} is popular among {audience}.",
    "Write an email to {person} about the {name} {kind}.",
    "Create a {form} for {person}'s {kind}.",
]
_FILLER = ["please", "briefly", "now", "carefully", "also", "really", "in detail", "step by step"]


def _zipf_choice(rng: random.Random, items: list, s: float = 1.1):
    # Realistic word use: a few words very often, most rarely.
    weights = getattr(_zipf_choice, "_cache", {}).get((id(items), s))
    if weights is None:
        weights = [1.0 / (i + 1) ** s for i in range(len(items))]
        _zipf_choice.__dict__.setdefault("_cache", {})[(id(items), s)] = weights
    return rng.choices(items, weights=weights, k=1)[0]


def _name(rng: random.Random) -> str:
    # The long tail of real instructions: names, places, products, numbers.
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _fresh(rng: random.Random) -> str:
    if rng.random() < 0.4:
        unit, unit2 = rng.sample(_UNITS, 2)
        return rng.choice(_ENTITY_TEMPLATES).format(
            adj=_zipf_choice(rng, _ADJS), form=_zipf_choice(rng, _FORMS), name=_name(rng),
            name2=_name(rng), kind=rng.choice(_ENTITY_KINDS), n=rng.randint(2, 12),
            number=rng.randint(2, 2000), number2=rng.randint(2, 2000), unit=unit, unit2=unit2,
            things=rng.choice(_THINGS), audience=rng.choice(_AUDIENCES), person=_name(rng),
        )
    label1, label2 = rng.choice(_LABELS)
    verb = _zipf_choice(rng, _VERBS)
    text = rng.choice(_TEMPLATES).format(
        Verb=verb.capitalize(), adj=_zipf_choice(rng, _ADJS), form=_zipf_choice(rng, _FORMS),
        topic=_zipf_choice(rng, _TOPIC_LIST, 0.8), topic2=_zipf_choice(rng, _TOPIC_LIST, 0.8),
        audience=rng.choice(_AUDIENCES), n=rng.randint(2, 12), things=rng.choice(_THINGS),
        item=rng.choice(_ITEMS), label1=label1, label2=label2, lang=rng.choice(_LANGS),
        doc=rng.choice(_DOCS),
    )
    if rng.random() < 0.5:  # a qualifier with rarer words makes the vocabulary long-tailed
        text = text[:-1] + f" with a focus on {' '.join(rng.sample(_TOPIC_WORDS, rng.randint(1, 3)))}" + text[-1]
    return text


def _near_duplicate(rng: random.Random, text: str) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        position = rng.randrange(len(words))
        if op < 0.35:
            words[position] = rng.choice(_ADJS + _THINGS + _FILLER)
        elif op < 0.6 and len(words) > 3:
            del words[position]
        elif op < 0.85:
            words.insert(position, rng.choice(_FILLER))
        else:
            words[position] = str(rng.randint(2, 20)) if words[position].isdigit() else words[position].upper()
    text = " ".join(words)
    return text.rstrip(".?!") + rng.choice([".", "!", "?", "", " ..."])


def _recombination(rng: random.Random, first: str, second: str) -> str:
    a, b = first.split(), second.split()
    return " ".join(a[: max(1, len(a) // 2)] + b[len(b) // 2 :])


def make_stream(n: int, seed: int = 0) -> list[str]:
    """`n` realistic instructions: ~60% fresh (40% of those naming entities or numbers), ~28% near-duplicates, ~12% recombinations."""
    rng = random.Random(seed)
    stream: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.28 and stream:
            stream.append(_near_duplicate(rng, rng.choice(stream[-2000:])))
        elif roll < 0.40 and len(stream) > 1:
            stream.append(_recombination(rng, rng.choice(stream), rng.choice(stream)))
        else:
            stream.append(_fresh(rng))
    return stream


# ----------------------------------------------------------------------------- high-keep stream
# Most Alpaca-like candidates are kept (40,652 of 52,002 at 0.7): few near-duplicates, many texts
# that share template words but little else. This stream is built the same way, offline and
# deterministically: standard-library docstring sentences (their halves recombined, often behind
# an instruction prefix), the demo seed instructions' openings, the templates above, and a few
# near-duplicates and recombinations of earlier items; about 75% are kept at 0.7.
_DOC_MODULES = """abc argparse ast base64 bisect calendar codecs collections contextlib copy csv dataclasses
datetime decimal difflib doctest email.message enum fnmatch fractions ftplib functools gettext glob gzip
hashlib heapq hmac html.parser http.client imaplib inspect io ipaddress itertools json locale logging lzma
mailbox mimetypes numbers operator optparse os pathlib pickle platform poplib pprint queue random re sched
secrets shelve shlex shutil smtplib socket sqlite3 ssl statistics string struct subprocess tarfile tempfile
textwrap threading timeit tokenize traceback types typing unittest urllib.parse urllib.request uuid warnings
wave weakref xml.dom.minidom zipfile zlib""".split()
_PREFIXES = ["Explain in simple words what this means:", "Rewrite the following so that a beginner understands it:",
             "Write a short function whose docstring says:", "Give an example where", "Turn this note into a question:",
             "Summarize in one line:", "Is the following statement true? Explain why:", "Translate into plain English:",
             "Write a test case that checks that", "Describe a situation in which", "Correct the grammar of:",
             "Explain to a new colleague why"]


def docstring_sentences() -> list[str]:
    """Sentences of 4-30 words from the docstrings of some standard-library modules, sorted."""
    import importlib
    import inspect
    import re
    import warnings

    seen: set[str] = set()
    sentences: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _DOC_MODULES:
            module = importlib.import_module(name)
            objects = [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")]
            for obj in objects:
                members = [obj]
                if inspect.isclass(obj):
                    members += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_")]
                for member in members:
                    doc = getattr(member, "__doc__", None)
                    if not isinstance(doc, str) or doc in seen:
                        continue
                    seen.add(doc)
                    for paragraph in doc.split("\n\n"):
                        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
                            if (4 <= len(sentence.split()) <= 30 and sentence[0].isalpha()
                                    and not any(c in sentence for c in ">{}=[]|\\")):
                                sentences.add(sentence.rstrip("."))
    return sorted(sentences)


def _half(rng: random.Random, sentence: str) -> list[str]:
    words = sentence.split()
    k = rng.randint(2, max(2, len(words) - 1))
    return words[:k] if rng.random() < 0.5 else words[len(words) - k :]


def make_high_keep_stream(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(seed instructions, `n` candidates) of which about 75% are kept at 0.7 (see above)."""
    from tasks.self_instruct.seeds import demo_seed_path, load_seed_tasks

    seeds = [task.instruction for task in load_seed_tasks(demo_seed_path("en"))]
    sentences = docstring_sentences()
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.07 and out:
            out.append(_near_duplicate(rng, rng.choice(out[-3000:])))
        elif roll < 0.09 and len(out) > 1:
            out.append(_recombination(rng, rng.choice(out), rng.choice(out)))
        elif roll < 0.15:
            out.append(_fresh(rng))
        elif roll < 0.42:
            a, b = rng.sample(sentences, 2)
            out.append(" ".join(_half(rng, a) + _half(rng, b)) + ".")
        elif roll < 0.74:
            a, b = rng.sample(sentences, 2)
            out.append(rng.choice(_PREFIXES) + " " + " ".join(_half(rng, a) + _half(rng, b)).lower() + ".")
        else:
            opening = rng.choice(seeds).rstrip(".?").split()
            words = opening[: rng.randint(2, max(2, len(opening) - 2))] + _half(rng, rng.choice(sentences))
            out.append(" ".join(words) + rng.choice([".", "?", ""]))
    return seeds, out


# ----------------------------------------------------------------------------- baseline
def _baseline_one(tokens: list[str], pool_tokens: list[list[str]], processes: int):
    """One candidate, as Alpaca's generate_instruction.py scores it: a Pool per candidate."""
    import numpy as np
    from rouge_score import rouge_scorer

    if not pool_tokens:
        return 0.0, None
    with multiprocessing.Pool(processes) as pool:
        scores = pool.map(partial(rouge_scorer._score_lcs, tokens), pool_tokens)
    scores = [score.fmeasure for score in scores]
    np.argsort(scores)[-10:][::-1]  # Alpaca keeps the 10 most similar; same work here
    best = max(scores)
    # The engine reports the first pool item reaching the maximum; None when it is 0.
    return best, (scores.index(best) if best > 0 else None)


def run_baseline(stream: list[str], seeds: list[str], positions: list[int], pool_before,
                 threshold: float, processes: int = 2):
    """Alpaca-style decisions for `positions` and the seconds they took.

    `pool_before` None: the real greedy loop over `positions`, with its own pool (seeds, then
    kept). Otherwise `pool_before(i)` lists the texts candidate i meets; their tokens are
    prepared untimed, since the baseline tokenizes each instruction once, when it arrives
    (charged to it here).
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokenize = scorer._tokenizer.tokenize
    results = {}
    elapsed = 0.0
    if pool_before is None:
        started = time.perf_counter()
        pool_tokens = [tokenize(text) for text in seeds]
        for i in positions:
            tokens = tokenize(stream[i])
            best, best_index = _baseline_one(tokens, pool_tokens, processes)
            kept = not best > threshold
            results[i] = (kept, best, best_index)
            if kept:
                pool_tokens.append(tokens)
        elapsed = time.perf_counter() - started
    else:
        cache: dict[str, list[str]] = {}
        for i in positions:
            pool_tokens = [cache[t] if t in cache else cache.setdefault(t, tokenize(t)) for t in pool_before(i)]
            started = time.perf_counter()
            tokens = tokenize(stream[i])
            best, best_index = _baseline_one(tokens, pool_tokens, processes)
            elapsed += time.perf_counter() - started
            results[i] = (not best > threshold, best, best_index)
    return results, elapsed


# ----------------------------------------------------------------------------- engine
def run_engine(stream: list[str], seeds: list[str], threshold: float, batch: int = 64):
    """The engine over `stream` in batches (as the self-instruct flow offers them), timed."""
    started = time.perf_counter()
    engine = RougeLFilter(threshold=threshold)
    engine.add_references(seeds)
    decisions = []
    for start in range(0, len(stream), batch):
        decisions.extend(engine.offer(stream[start : start + batch]))
    return engine, decisions, time.perf_counter() - started


# ----------------------------------------------------------------------------- the CLI at 50K
def run_cli_dedup(stream: list[str], seeds: list[str], threshold: float, repeat: int, workers: int):
    """`alignflow dedup` as a subprocess on `stream` against `seeds`: (wall times, its output, kept rows)."""
    import json
    import shutil
    import subprocess
    import tempfile

    import pyarrow.parquet as pq

    folder = Path(tempfile.mkdtemp(prefix="rouge-bench-"))
    try:
        source, against, output = folder / "stream.jsonl", folder / "seeds.jsonl", folder / "kept.parquet"
        source.write_text("".join(json.dumps({"id": i, "instruction": t}) + "\n" for i, t in enumerate(stream)))
        against.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in seeds))
        executable = Path(sys.executable).with_name("alignflow")
        command = [str(executable)] if executable.exists() else [sys.executable, "-m", "flows.cli"]
        command += ["dedup", "--input", str(source), "--against", str(against), "--column", "instruction",
                    "--threshold", str(threshold), "--workers", str(workers), "--no-progress", "--output", str(output)]
        times, text = [], ""
        for _ in range(repeat):
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            times.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(f"alignflow dedup failed ({done.returncode}): {done.stderr[-2000:]}")
            text = done.stdout
        kept = pq.read_table(output, columns=["id", "max_rouge_l", "most_similar"]).to_pylist()
        return times, text, kept
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def high_keep_section(args) -> bool:
    """The 50K high-keep stream through `alignflow dedup`, against the Alpaca kernel extrapolated."""
    import re

    seeds, stream = make_high_keep_stream(args.high_keep, seed=args.seed)
    times, text, kept_rows = run_cli_dedup(stream, seeds, args.threshold, args.cli_repeat, args.workers)
    best, median = min(times), sorted(times)[len(times) // 2]
    match = re.search(r"pairs: (\d+) met, (\d+) pruned by bounds, (\d+) scored exactly", text)
    pairs, pruned, scored = (int(g) for g in match.groups()) if match else (0, 0, 0)
    kept_ids = [row["id"] for row in kept_rows]
    kept_at = {row["id"]: row for row in kept_rows}
    # The baseline on an evenly spaced sample of the stream, each candidate against the very pool
    # it meets (the seeds, then the rows kept before it): its mean time per candidate, times the
    # stream length, is its time for the whole stream (the sample spans the pool's growth evenly).
    step = max(1, len(stream) // args.high_keep_sample)
    positions = list(range(step // 2, len(stream), step))
    import bisect

    pool_texts = seeds + [stream[i] for i in kept_ids]
    baseline, baseline_time = run_baseline(
        stream, seeds, positions, lambda i: pool_texts[: len(seeds) + bisect.bisect_left(kept_ids, i)], args.threshold)
    same = True
    for i in positions:
        kept, score, index = baseline[i]
        row = kept_at.get(i)
        if kept != (row is not None):
            same = False
        elif kept and (row["max_rouge_l"] != score or row["most_similar"] != (pool_texts[index] if index is not None else None)):
            same = False
    extrapolated = baseline_time / len(positions) * len(stream)
    print(f"\nhigh-keep stream: {len(stream)} candidates (docstring sentences, demo seeds, templates), "
          f"{len(seeds)} demo seeds as --against; threshold {args.threshold}")
    print(f"alignflow dedup (subprocess, start-up included, --workers {args.workers}): best {best:.2f} s, "
          f"median {median:.2f} s of {len(times)} runs; kept {len(kept_rows)} ({len(kept_rows) / len(stream):.1%})")
    if pairs:
        print(f"pairs: {pairs} met, {pruned} pruned by bounds ({pruned / pairs:.2%}), {scored} scored exactly (LCS)")
    print(f"baseline (Alpaca kernel, Pool(2) per candidate) on a sample of {len(positions)} candidates: "
          f"{len(positions) / baseline_time:.2f} cand/s -> {extrapolated:.0f} s ({extrapolated / 3600:.1f} h) "
          f"for the whole stream, extrapolated (not run in full)")
    print(f"ratio: {extrapolated / best:.0f}x (baseline extrapolated / CLI best); sampled decisions "
          f"{'identical' if same else 'DIFFERENT'} ({len(positions)} checked)")
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2500, 5000],
                        help="stream prefixes to compare on")
    parser.add_argument("--full", action="store_true", help="run the baseline on every candidate (slow)")
    parser.add_argument("--sample", type=int, default=150,
                        help="baseline candidates sampled per prefix larger than --full-up-to")
    parser.add_argument("--full-up-to", type=int, default=0,
                        help="run the baseline on every candidate for prefixes up to this size")
    parser.add_argument("--big", type=int, default=50_000, help="stream length for the engine-only run")
    parser.add_argument("--threshold", type=float, default=0.7, help="ROUGE-L threshold")
    parser.add_argument("--repeat", type=int, default=5, help="engine runs before and again after the baseline, per prefix")
    parser.add_argument("--seed", type=int, default=0, help="stream seed")
    parser.add_argument("--high-keep", type=int, default=52_000,
                        help="length of the high-keep stream run through `alignflow dedup` (0: skip)")
    parser.add_argument("--high-keep-sample", type=int, default=40,
                        help="baseline candidates sampled from the high-keep stream")
    parser.add_argument("--cli-repeat", type=int, default=3, help="`alignflow dedup` runs (best and median shown)")
    parser.add_argument("--workers", type=int, default=-1, help="`alignflow dedup --workers` (-1: every core)")
    parser.add_argument("--only-high-keep", action="store_true", help="run the high-keep section alone")
    args = parser.parse_args(argv)
    if args.only_high_keep:
        return 0 if high_keep_section(args) else 1

    stream = make_stream(max(max(args.sizes), args.big), seed=args.seed)
    # Alpaca's pool starts with the 175 seed tasks; these stand in for them.
    seeds = make_stream(175, seed=args.seed + 1000)
    all_ok = True
    print(f"baseline: Alpaca's filter loop (rouge-score tokenizer, _score_lcs over a Pool(2) per candidate);"
          f" engine: RougeLFilter, best of 2 x {args.repeat} runs (median in brackets); 175 seeds + N candidates")
    print(f"{'N':>6} {'baseline':>16} {'cand/s':>8} {'engine cand/s':>22} {'ratio':>7} {'kept':>6} decisions")
    for n in args.sizes:
        prefix = stream[:n]
        # The engine's run takes a fraction of a second, so a slow spell of the machine (a busy
        # neighbour, a throttled vCPU) can cover all of its runs in a row: it runs --repeat times
        # before the baseline and --repeat times after it, and the best and the median of all
        # are shown; the ratio uses the best, as timeit does.
        runs = [run_engine(prefix, seeds, args.threshold) for _ in range(args.repeat)]
        engine, decisions, _ = runs[0]
        got = [(d.kept, d.max_rouge_l, d.most_similar_index) for d in decisions]
        if args.full or n <= args.full_up_to:
            positions = list(range(n))
            baseline, baseline_time = run_baseline(prefix, seeds, positions, None, args.threshold)
            mode = "full"
        else:
            # Evenly spaced candidates, each against the pool it meets: seeds, then kept.
            step = max(1, n // args.sample)
            positions = list(range(step // 2, n, step))
            kept_before = [0] * (n + 1)
            for i, d in enumerate(decisions):
                kept_before[i + 1] = kept_before[i] + d.kept
            pool_texts = engine.pool
            baseline, baseline_time = run_baseline(
                prefix, seeds, positions, lambda i: pool_texts[: len(seeds) + kept_before[i]],
                args.threshold)
            mode = f"sample of {len(positions)}"
        runs += [run_engine(prefix, seeds, args.threshold) for _ in range(args.repeat)]
        times = sorted(run[2] for run in runs)
        engine_time, median_time = times[0], times[len(times) // 2]
        same = all(baseline[i] == got[i] for i in positions)
        all_ok &= same
        baseline_rate = len(positions) / baseline_time
        engine_rate = n / engine_time
        print(f"{n:>6} {mode:>16} {baseline_rate:>8.2f} {engine_rate:>12.0f} [{n / median_time:>7.0f}] "
              f"{engine_rate / baseline_rate:>6.0f}x {len(engine.kept):>6} "
              f"{'identical' if same else 'DIFFERENT'} ({len(positions)} checked)")

    big = stream[: args.big]
    cpu = time.process_time()
    engine, decisions, engine_time = run_engine(big, seeds, args.threshold)
    cpu = time.process_time() - cpu
    print(f"engine alone: {args.big} candidates in {engine_time:.2f} s wall, {cpu:.2f} s CPU "
          f"({args.big / engine_time:.0f} cand/s), kept {len(engine.kept)}")
    if args.high_keep:
        all_ok &= high_keep_section(args)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
