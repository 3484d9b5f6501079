"""The one exact ROUGE-L engine: the greedy novelty filter and nearest-neighbour search, fast.

Semantics, exactly those of rouge-score 0.1.2 with ``RougeScorer(["rougeL"])``:

- a pair scores the LCS F-measure, computed in floating point as rouge-score does it
  (``p = l / len(prediction)``, ``r = l / len(target)``, ``2 * p * r / (p + r)``, 0 when
  ``p + r == 0``); a pair where either side has no tokens scores 0;
- candidates are decided greedily in stream order: a candidate is rejected when its highest score
  against the pool (the references, then every candidate kept so far) is above the threshold,
  strictly; a kept candidate joins the pool at once, so later items of the same batch see it;
- every decision reports the exact highest score and the first pool item (lowest pool index)
  reaching it; ``most_similar`` is None when that score is 0 (nothing in common, or an empty text).

Users: ``RougeLFilter`` (``alignflow dedup``, the benchmark) and ``nearest`` (the self-instruct
flow's shards score their candidates against the batch's planned pool with it, and the commit
checks the batch's own earlier keeps with it; the nearest-seed figure). Both run on
``NearestIndex``.

How it is fast, with every step exact:

1. Each text becomes a string of one code point per token (frequent words below 256), so
   rapidfuzz's bit-parallel LCS (``LCSseq``) runs on them in C; a block is tokenized in one go.
2. ``NearestIndex`` holds a pool with an inverted index over token *occurrences* (the k-th "the"
   of an item is its own feature), so the size of a set intersection of features is the size of
   the token multiset intersection, an upper bound of the LCS length (which is also at most
   min(m, n)): a pair of lengths m, n sharing ``o`` tokens scores at most ``2 * o / (m + n)``.
   The 64 features in the most postings (the common words) are not scanned: each pool item
   carries a 64-bit mask of them, and the overlap on them is a popcount. A query of m tokens then
   (a) scans the postings of its other features and counts, per item met, the shared ones; plus
   the popcount, that is each such item's exact overlap; (b) verifies these items with an exact
   LCS (rapidfuzz) in decreasing order of their bound, the few most promising first, and stops
   once the best score found is above every remaining bound; (c) bounds the items that share only
   common words by their popcount, per length n, only for the lengths where ``2 * min(c, n) /
   (m + n)`` (c: the query's common words) can still reach the best score, and verifies the few
   that can. The result is the exact maximum and the lowest pool index reaching it: every item
   whose bound reaches the best score is verified, and ties go to the lowest index. All bounds
   are compared with a 1e-9 margin, far above float rounding (~1e-16), so rounding can only add
   work, never lose a pair. The common words are chosen again when the pool doubles.
3. ``RougeLFilter.offer`` works in rounds: every candidate of a round is scored against the pool
   as it was when the round began (a snapshot), speculatively and in parallel, one share per
   worker process (``workers``; each holds its own copy of the index, kept in sync with the
   pool's growth), then the round is committed in order: a candidate's highest score is the
   larger of its snapshot score and its score against the candidates kept earlier in the same
   round (one LCS matrix per round; ties go to the snapshot, which comes first in pool order).
   A candidate can only be rejected by earlier kept ones, so this is the sequential filter.

``pair_counts`` tells how many (candidate, pool item) pairs the greedy filter meets and how many
got an exact LCS; the rest were settled by the bounds.

Use::

    f = RougeLFilter(threshold=0.7, workers=2)
    f.add_references(seed_instructions)
    decisions = f.offer(new_instructions)   # one Decision per text, in order
    state = f.state_dict()                  # JSON-serialisable checkpoint
    f2 = RougeLFilter.from_state_dict(state)
    nearest(["Write a poem about the sea."], seed_instructions)   # [(0.53, 12)]
"""

from __future__ import annotations

import math
import multiprocessing
import os
from array import array
from collections import Counter
from itertools import chain, repeat
from typing import Any, NamedTuple, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from tasks.rouge.tokenize import TOKENIZERS, make_batch_tokenizer, make_tokenizer

STATE_FORMAT = "alignflow.rouge_l_filter/1"

# Bounds are evaluated with this much slack below the best score; float rounding is ~1e-16.
_MARGIN = 1e-9
# Candidates per round: scored against the round's pool snapshot in parallel, then committed.
_ROUND = 512
# Rounds with fewer candidates to score than this stay in this process (not worth the messages).
_PARALLEL_MIN = 128
# Seen items are verified in chunks, the first this large, each next one 4x larger.
_FIRST_CHUNK = 16
# Features in the most postings get one bit each of a per-item mask (the rest are scanned).
_COMMON_BITS = 64
# The common features are chosen again when the pool reaches this size, then each time it doubles.
_FIRST_REBUILD = 64
# A feature is a token's code point plus (its occurrence number in the text << this).
_OCCURRENCE_SHIFT = 40
# Highest code point usable for a token id once surrogates are skipped.
_MAX_CODEPOINT = 0x10FFFF


class Decision(NamedTuple):
    """The filter's verdict on one candidate (an immutable record; built by the million, so a tuple)."""

    text: str
    kept: bool
    max_rouge_l: float  # highest ROUGE-L F-measure against the pool (exact, rouge-score's value)
    most_similar: str | None  # the first pool item reaching max_rouge_l; None when it is 0
    most_similar_index: int | None  # its index in pool order (references first, then kept)
    empty: bool  # the text has no tokens under the chosen tokenizer (scores 0 against everything)


def rouge_l_fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge-score's LCS F-measure from the LCS length and both token counts, bit for bit."""
    if target_len == 0 or prediction_len == 0:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _fmeasures(lcs: np.ndarray, target_len: Any, prediction_len: np.ndarray) -> np.ndarray:
    """`rouge_l_fmeasure` elementwise: the very float64 operations, so the same bits."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_len
        recall = lcs / target_len
        scores = 2 * precision * recall / (precision + recall)
    scores[lcs == 0] = 0.0  # also covers empty items (0 / 0)
    return scores


def _codepoint(token_id: int) -> int:
    # Skip the surrogate block: those code points cannot stand alone in every string operation.
    return token_id if token_id < 0xD800 else token_id + 0x800


def _point(char: str | int) -> int:
    return ord(char) if isinstance(char, str) else char


def _features(code: str | list[int]) -> list[int]:
    """A code's token occurrences: the k-th occurrence of a token is its own feature."""
    points = list(map(ord, code)) if isinstance(code, str) else list(code)
    if len(set(points)) == len(points):
        return points
    seen: dict[int, int] = {}
    features = []
    for point in points:
        k = seen.get(point, 0)
        seen[point] = k + 1
        features.append(point + (k << _OCCURRENCE_SHIFT))
    return features


if hasattr(np, "bitwise_count"):
    def _popcount(values: np.ndarray) -> np.ndarray:
        return np.bitwise_count(values)
else:  # numpy < 2
    _BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(values: np.ndarray) -> np.ndarray:
        return _BYTE_BITS[values.view(np.uint8).reshape(-1, 8)].sum(axis=1, dtype=np.int64)


def _counted(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of some arrays of distinct values, and in how many arrays each is."""
    values = np.concatenate(arrays) if len(arrays) > 1 else arrays[0].copy()
    values.sort()
    first = np.empty(len(values), dtype=bool)
    first[0] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    starts = first.nonzero()[0]
    counts = np.empty(len(starts), dtype=np.intp)
    np.subtract(starts[1:], starts[:-1], out=counts[:-1])
    counts[-1] = len(values) - starts[-1]
    return values[starts], counts


def resolve_workers(workers: int) -> int:
    """`workers` as a process count: -1 or 0 mean every core this process may run on."""
    if workers is None or workers <= 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    return int(workers)


# ----------------------------------------------------------------------------- encoding
class _TokenCodes(dict):
    """token -> its code (one character, or an int past the Unicode range); unseen tokens get one."""

    __slots__ = ("_assign",)

    def __init__(self, assign) -> None:
        super().__init__()
        self._assign = assign  # Encoder._new_token: picks the next code point and stores it

    def __missing__(self, token: str) -> str | int:
        self._assign(token)
        return dict.__getitem__(self, token)


class Encoder:
    """Texts -> codes: one code point per token, the same for every text this encoder sees."""

    def __init__(self, tokenizer: str = "rouge", stemming: bool = False) -> None:
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
        self.tokenize = make_tokenizer(tokenizer, stemming)
        self._tokenize_batch = make_batch_tokenizer(tokenizer, stemming)
        self._chars: dict[str, str | int] = _TokenCodes(self._new_token)

    def encode(self, texts: list[str]) -> list[str | list[int]]:
        """Each text as its tokens' code points: a string of one character per token.

        Tokens map straight to their character (no list of ids in between), and a block whose
        tokens are all known is encoded by C-level maps alone: no Python frame per token.
        """
        try:
            token_lists = self._tokenize_batch(texts)
        except (AttributeError, TypeError):
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"texts must be str, got {type(text).__name__}: {text!r}") from None
            raise
        chars = self._chars
        if len(chars) < 256:
            # The first texts (the references, usually) hand out the code points below 256:
            # rapidfuzz looks those up in a table and the others in a hash map, so the most
            # frequent words should get them.
            counts = Counter(chain.from_iterable(token_lists))
            for token in sorted(counts.keys() - chars.keys(), key=lambda t: (-counts[t], t)):
                self._new_token(token)
        lookup = chars.__getitem__
        try:
            return list(map("".join, map(map, repeat(lookup), token_lists)))
        except TypeError:  # a vocabulary past ~1.1M tokens: rapidfuzz also takes int sequences
            return [[_point(chars[token]) for token in tokens] for tokens in token_lists]

    def _new_token(self, token: str) -> None:
        point = _codepoint(len(self._chars))
        self._chars[token] = chr(point) if point <= _MAX_CODEPOINT else point


# ----------------------------------------------------------------------------- nearest search
class NearestIndex:
    """A growing pool of codes with an inverted index over token occurrences.

    ``query(code)`` returns the exact highest ROUGE-L F of `code` (as the target) against the pool
    and the lowest pool index reaching it (None when it is 0); see the module docstring, step 2.
    """

    def __init__(self) -> None:
        self._codes: list[str | list[int]] = []
        self._lens = np.zeros(1024, dtype=np.float64)
        self._masks = np.zeros(1024, dtype=np.uint64)  # bit b: the item holds common feature b
        self._verified = np.zeros(1024, dtype=bool)  # scratch: items verified by the current query
        self._postings: dict[int, array] = {}  # feature -> pool indices holding it, ascending
        self._by_length: dict[int, array] = {}  # n -> pool indices of the items of n tokens
        self._group_masks: dict[int, array] = {}  # n -> their masks, in the same order
        self._lengths = np.zeros(0)  # the distinct non-zero lengths in the pool, ascending
        self._bits: dict[int, int] = {}  # common feature -> its bit
        self._rebuilt_at = 0
        self.pairs = 0  # pool items met by queries
        self.scored = 0  # of those, exact LCS computations

    def __len__(self) -> int:
        return len(self._codes)

    def add(self, codes: Sequence[str | list[int]]) -> None:
        """Append items to the pool (their indices follow the current ones)."""
        start = len(self._codes)
        end = start + len(codes)
        if end > len(self._lens):
            capacity = max(end, 2 * len(self._lens))
            grow = capacity - len(self._lens)
            self._lens = np.concatenate([self._lens, np.zeros(grow)])
            self._masks = np.concatenate([self._masks, np.zeros(grow, dtype=np.uint64)])
            self._verified = np.zeros(capacity, dtype=bool)
        postings, by_length, bits = self._postings, self._by_length, self._bits
        new_length = False
        for index, code in enumerate(codes, start):
            self._codes.append(code)
            n = len(code)
            self._lens[index] = n
            if not n:
                continue
            mask = 0
            for feature in _features(code):
                posting = postings.get(feature)
                if posting is None:
                    postings[feature] = array("i", (index,))
                else:
                    posting.append(index)
                bit = bits.get(feature)
                if bit is not None:
                    mask |= 1 << bit
            self._masks[index] = mask
            group = by_length.get(n)
            if group is None:
                by_length[n] = array("i", (index,))
                self._group_masks[n] = array("Q", (mask,))
                new_length = True
            else:
                group.append(index)
                self._group_masks[n].append(mask)
        if new_length:
            self._lengths = np.array(sorted(by_length), dtype=np.float64)
        if end >= max(_FIRST_REBUILD, 2 * self._rebuilt_at):
            self._rebuild()

    def _rebuild(self) -> None:
        """Pick the common features (the longest postings now) and set every item's bits."""
        size = len(self._codes)
        ranked = sorted(((len(p), f) for f, p in self._postings.items() if len(p) > 1), reverse=True)
        self._bits = {feature: bit for bit, (_, feature) in enumerate(ranked[:_COMMON_BITS])}
        masks = np.zeros(len(self._lens), dtype=np.uint64)
        for feature, bit in self._bits.items():
            masks[np.frombuffer(self._postings[feature], dtype=np.int32)] |= np.uint64(1 << bit)
        self._masks = masks
        self._group_masks = {n: array("Q", masks[np.frombuffer(group, dtype=np.int32)].tobytes())
                             for n, group in self._by_length.items()}
        self._rebuilt_at = size

    def query(self, code: str | list[int]) -> tuple[float, int | None]:
        """Exact (highest score, lowest pool index reaching it) of `code` (the target) against the pool."""
        m = len(code)
        size = len(self._codes)
        self.pairs += size
        if not m or not size or not len(self._lengths):
            return 0.0, None
        postings, bits = self._postings, self._bits
        common_mask, common = 0, 0
        others = []
        for feature in _features(code):
            bit = bits.get(feature)
            if bit is not None:
                common_mask |= 1 << bit
                common += 1
            else:
                posting = postings.get(feature)
                if posting is not None:
                    others.append(np.frombuffer(posting, dtype=np.int32))
        mask = np.uint64(common_mask)
        lens, masks = self._lens, self._masks
        best, best_index = 0.0, None
        touched: list[np.ndarray] = []
        if others:
            # Items sharing a rarer token: their exact multiset overlap, shared rare tokens plus
            # shared common ones (bits), bounds their LCS.
            seen, overlap = _counted(others)
            del others  # views of the postings: released before the pool may grow
            if common:
                overlap += _popcount(masks[seen] & mask)
            n = lens[seen]
            bound = 2.0 * overlap / (m + n)  # overlap <= min(m, n): the length bound is in it
            best, best_index = self._verify_in_order(code, m, seen, bound, best, best_index, touched)
        if common and 2.0 * common / (m + common) >= best - _MARGIN:  # (the most the lengths allow)
            # The other items share common tokens only: at most `common`, fewer for most; only
            # the lengths where that could reach the best score so far are looked at.
            lengths = self._lengths
            reach = 2.0 * np.minimum(common, lengths) / (m + lengths)
            parts, part_bounds = [], []
            verified = self._verified
            half_level = (best - _MARGIN) / 2.0
            for n in lengths[reach >= best - _MARGIN].tolist():
                # Least overlap reaching the best so far at this length (and at least one token).
                need = max(1, math.ceil(half_level * (m + n)))
                counts = _popcount(np.frombuffer(self._group_masks[int(n)], dtype=np.uint64) & mask)
                hits = (counts >= need).nonzero()[0]
                if not len(hits):
                    continue
                items = np.frombuffer(self._by_length[int(n)], dtype=np.int32)[hits]
                open_ = ~verified[items]
                parts.append(items[open_])
                part_bounds.append(2.0 * counts[hits][open_] / (m + n))
            if parts:
                best, best_index = self._verify_in_order(
                    code, m, np.concatenate(parts), np.concatenate(part_bounds), best, best_index, touched)
        verified = self._verified
        for chosen in touched:
            verified[chosen] = False
        return best, best_index

    def _verify_in_order(self, code: str | list[int], m: int, items: np.ndarray, bound: np.ndarray,
                         best: float, best_index: int | None, touched: list[np.ndarray]) -> tuple[float, int | None]:
        """Verify `items` (none verified yet; `bound` is ours to change) in decreasing order of
        their bound until none left can reach the best score."""
        verified = self._verified
        if len(items) > _FIRST_CHUNK:
            # The few most promising first (no full sort): usually they hold the best score, and
            # then the bounds of nearly all the others fall below it.
            top = np.argpartition(bound, len(items) - _FIRST_CHUNK)[-_FIRST_CHUNK:]
            chosen = items[top]
            best, best_index = self._verify(code, m, chosen, best, best_index)
            verified[chosen] = True
            touched.append(chosen)
            bound[top] = -1.0
        open_ = (bound >= best - _MARGIN).nonzero()[0]
        if not len(open_):
            return best, best_index
        items, bound = items[open_], bound[open_]
        order = np.argsort(-bound, kind="stable")
        items, bound = items[order], bound[order]
        start, chunk = 0, _FIRST_CHUNK
        while start < len(items) and bound[start] >= best - _MARGIN:
            chosen = items[start : start + chunk]
            best, best_index = self._verify(code, m, chosen, best, best_index)
            verified[chosen] = True
            touched.append(chosen)
            start += chunk
            chunk *= 4
        return best, best_index

    def _verify(self, code: str | list[int], m: int, items: np.ndarray, best: float,
                best_index: int | None) -> tuple[float, int | None]:
        """Update (best, best_index) with the exact scores of pool `items`."""
        codes = self._codes
        self.scored += len(items)
        lcs = process.cdist([code], [codes[i] for i in items.tolist()], scorer=LCSseq.similarity,
                            dtype=np.int32)[0].astype(np.float64)
        # Every item verified shares a token with the text: l >= 1, no zero division. The very
        # float operations of `rouge_l_fmeasure` (p = l / n, r = l / m, 2 * p * r / (p + r)).
        precision = lcs / self._lens[items]
        recall = lcs / m
        scores = 2 * precision * recall / (precision + recall)
        top = float(scores.max())
        if top > 0.0 and top >= best:
            first = int(items[scores == top].min())
            if top > best or best_index is None or first < best_index:
                best, best_index = top, first
        return best, best_index

    def query_many(self, codes: Sequence[str | list[int]]) -> list[tuple[float, int | None]]:
        return [self.query(code) for code in codes]


def nearest(texts: Sequence[str], pool: Sequence[str], tokenizer: str = "rouge",
            stemming: bool = False) -> list[tuple[float, int | None]]:
    """For each text, (highest ROUGE-L F against the pool, index of the first pool item reaching it).

    The index is None when the highest score is 0 (nothing in common, an empty text, an empty pool).
    Scores are rouge-score's own floating-point values, bit for bit (the text is the target).
    Texts are scored independently against the same pool, so the work splits across processes or
    machines and merges afterwards (the self-instruct flow's shards do this).
    """
    encoder = Encoder(tokenizer, stemming)
    codes = encoder.encode(list(pool) + list(texts))
    index = NearestIndex()
    index.add(codes[: len(pool)])
    return index.query_many(codes[len(pool) :])


# ----------------------------------------------------------------------------- worker processes
def _worker_main(connection, index: NearestIndex | None) -> None:
    """A scoring process: grow its copy of the pool, score the queries it is sent, reply."""
    index = index if index is not None else NearestIndex()
    while True:
        message = connection.recv()
        if message is None:
            break
        new_codes, queries = message
        index.add(new_codes)
        pairs, scored = index.pairs, index.scored
        results = index.query_many(queries)
        connection.send((results, index.pairs - pairs, index.scored - scored))
    connection.close()


class _Workers:
    """Worker processes, each with a copy of the pool index, synchronised before every round."""

    def __init__(self, count: int, index: NearestIndex) -> None:
        try:
            context = multiprocessing.get_context("fork")
            inherited = index  # forked: the child starts from this very index, no copy sent
        except ValueError:  # no fork on this platform
            context = multiprocessing.get_context("spawn")
            inherited = None
        self.connections = []
        self.processes = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            worker = context.Process(target=_worker_main, args=(theirs, inherited), daemon=True)
            worker.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(worker)
        self.synced = len(index) if inherited is not None else 0

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(None)
                connection.close()
            except (OSError, ValueError):
                pass
        for worker in self.processes:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
        self.connections, self.processes = [], []


# ----------------------------------------------------------------------------- the filter
class RougeLFilter:
    """Greedy ROUGE-L novelty filter over a growing pool; see the module docstring."""

    def __init__(
        self,
        threshold: float = 0.7,
        tokenizer: str = "rouge",
        stemming: bool = False,
        workers: int = 1,
    ) -> None:
        """`workers`: processes scoring candidates, this one included (-1: every core)."""
        if not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
        self.threshold = float(threshold)
        self.tokenizer = tokenizer
        self.stemming = bool(stemming)
        self.workers = resolve_workers(workers)
        self._encoder = Encoder(tokenizer, self.stemming)
        self._tokenize = self._encoder.tokenize
        self._index = NearestIndex()
        self._texts: list[str] = []  # pool, in pool order
        self._is_reference: list[bool] = []
        self._codes: list[str | list[int]] = []
        self._pool: _Workers | None = None  # started on the first round worth sharing
        self._round_pairs = 0  # pairs met / LCS computed by the in-round commit
        self._round_scored = 0
        self._worker_pairs = 0
        self._worker_scored = 0

    # ----------------------------------------------------------------- public API
    def add_references(self, texts: Sequence[str]) -> None:
        """Add items (for example the seed instructions) that candidates are compared against."""
        texts = list(texts)
        self._append(texts, self._encoder.encode(texts), is_reference=True)

    def offer(self, texts: Sequence[str]) -> list[Decision]:
        """Decide each text in order; kept ones join the pool at once."""
        texts = list(texts)
        codes = self._encoder.encode(texts)
        results: list[Decision] = []
        for start in range(0, len(texts), _ROUND):
            results.extend(self._offer_round(texts[start : start + _ROUND], codes[start : start + _ROUND]))
        return results

    @property
    def pair_counts(self) -> tuple[int, int]:
        """(pairs met, pairs given an exact LCS) so far: (candidate, pool item) pairs of the greedy
        filter, and how many of them needed an LCS; the others were settled by the bounds."""
        return (self._index.pairs + self._worker_pairs + self._round_pairs,
                self._index.scored + self._worker_scored + self._round_scored)

    def close(self) -> None:
        """Stop the worker processes (they also stop with this process)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "RougeLFilter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    @property
    def kept(self) -> list[str]:
        """Kept candidates in order (the references are not included)."""
        return [text for text, ref in zip(self._texts, self._is_reference) if not ref]

    @property
    def references(self) -> list[str]:
        """The reference items, in the order they were added."""
        return [text for text, ref in zip(self._texts, self._is_reference) if ref]

    @property
    def pool(self) -> list[str]:
        """Every item candidates are compared against, in pool order."""
        return list(self._texts)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable checkpoint (configuration and pool texts)."""
        return {
            "format": STATE_FORMAT,
            "threshold": self.threshold,
            "tokenizer": self.tokenizer,
            "stemming": self.stemming,
            "pool": list(self._texts),
            "is_reference": [int(ref) for ref in self._is_reference],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], workers: int = 1) -> "RougeLFilter":
        """Rebuild a filter from `state_dict()`'s output; it decides exactly as the original would."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a RougeLFilter state (expected format {STATE_FORMAT!r})")
        missing = [k for k in ("threshold", "tokenizer", "stemming", "pool", "is_reference") if k not in state]
        if missing:
            raise ValueError(f"RougeLFilter state lacks {', '.join(missing)}")
        pool, flags = state["pool"], state["is_reference"]
        if len(pool) != len(flags):
            raise ValueError("RougeLFilter state: 'pool' and 'is_reference' differ in length")
        engine = cls(state["threshold"], state["tokenizer"], state["stemming"], workers=workers)
        codes = engine._encoder.encode(list(pool))
        for text, code, flag in zip(pool, codes, flags):
            engine._append([text], [code], is_reference=bool(flag))
        return engine

    # ----------------------------------------------------------------- internals
    def _append(self, texts: list[str], codes: list[str | list[int]], is_reference: bool) -> None:
        self._texts.extend(texts)
        self._is_reference.extend([is_reference] * len(texts))
        self._codes.extend(codes)
        self._index.add(codes)

    def _snapshot_scores(self, codes: list[str | list[int]]) -> list[tuple[float, int | None]]:
        """Each code's exact (best, index) against the pool as it is now, in parallel when it pays."""
        rows = [i for i, code in enumerate(codes) if code]
        results: list[tuple[float, int | None]] = [(0.0, None)] * len(codes)
        if self.workers <= 1 or len(rows) < _PARALLEL_MIN or len(self._codes) < _PARALLEL_MIN:
            for i in rows:
                results[i] = self._index.query(codes[i])
            return results
        if self._pool is None:
            self._pool = _Workers(self.workers - 1, self._index)
        pool = self._pool
        new_codes = self._codes[pool.synced :]
        pool.synced = len(self._codes)
        shares = [rows[k :: self.workers] for k in range(self.workers)]  # interleaved: balanced
        for connection, share in zip(pool.connections, shares[1:]):
            connection.send((new_codes, [codes[i] for i in share]))
        for i in shares[0]:
            results[i] = self._index.query(codes[i])
        for connection, share in zip(pool.connections, shares[1:]):
            answers, pairs, scored = connection.recv()
            self._worker_pairs += pairs
            self._worker_scored += scored
            for i, answer in zip(share, answers):
                results[i] = answer
        return results

    def _offer_round(self, texts: list[str], codes: list[str | list[int]]) -> list[Decision]:
        """Score the round against the pool snapshot, then commit it in order."""
        snapshot = len(self._texts)
        scores = self._snapshot_scores(codes)
        count = len(codes)
        lens = np.fromiter(map(len, codes), dtype=np.float64, count=count)
        if count > 1:
            # The round against itself: LCS lengths, and 2l / (m + n), which bounds the F-measure
            # (up to rounding), of each candidate against the earlier ones.
            lcs = process.cdist(codes, codes, scorer=LCSseq.similarity, dtype=np.int32)
            self._round_scored += count * count
            denominator = lens[:, None] + lens[None, :]
            denominator[denominator == 0] = 1.0  # two empty texts: LCS 0
            earlier_max = np.tril(2.0 * lcs / denominator, -1).max(axis=1).tolist()
        threshold = self.threshold
        pool_texts = self._texts
        kept_columns = np.empty(count, dtype=np.intp)  # round positions of the kept candidates
        kept = 0
        kept_texts: list[str] = []
        kept_codes: list[str | list[int]] = []
        results: list[Decision] = []
        for row, (text, code) in enumerate(zip(texts, codes)):
            if not code:
                # Scores 0 against everything, so it is always kept; it still takes a pool slot,
                # as it does in the reference implementations.
                kept_columns[kept] = row
                kept += 1
                kept_texts.append(text)
                kept_codes.append(code)
                results.append(Decision(text, True, 0.0, None, None, True))
                continue
            best, best_index = scores[row]
            self._round_pairs += kept
            if kept and earlier_max[row] >= best - _MARGIN:
                columns = kept_columns[:kept]
                round_scores = _fmeasures(lcs[row, columns].astype(np.float64), lens[row], lens[columns])
                top = float(round_scores.max())
                if top > best:  # ties: the snapshot's item comes first in pool order
                    best, best_index = top, snapshot + int(np.argmax(round_scores == top))
            if best > threshold:
                similar = pool_texts[best_index] if best_index < snapshot else kept_texts[best_index - snapshot]
                results.append(Decision(text, False, best, similar, best_index, False))
                continue
            kept_columns[kept] = row
            kept += 1
            kept_texts.append(text)
            kept_codes.append(code)
            if best_index is None:
                results.append(Decision(text, True, 0.0, None, None, False))
            else:
                similar = pool_texts[best_index] if best_index < snapshot else kept_texts[best_index - snapshot]
                results.append(Decision(text, True, best, similar, best_index, False))
        self._append(kept_texts, kept_codes, is_reference=False)
        return results
