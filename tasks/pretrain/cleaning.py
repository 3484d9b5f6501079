"""Corpus cleaning: PII scrub, quality filters, exact and near-duplicate removal, with a funnel.

`clean_corpus(docs, CleaningConfig())` runs the steps in this order and counts what each does:

1. PII scrub (when `scrub_pii`): e-mail addresses -> `<EMAIL>`, API-key-like strings ->
   `<API_KEY>`, IPv4/IPv6 addresses -> `<IP>`, phone numbers -> `<PHONE>`. Documents are kept;
   the funnel counts replacements of each kind over all input documents. Scrubbing comes first
   so that the filters judge the text that is kept, and so that two documents that differ only in
   an address or a number collapse as duplicates below.
2. Quality filters, each document counted under the first rule it fails: `too_short`,
   `too_long` (characters), `symbol_ratio` (non-alphanumeric non-space characters over all
   non-space characters), `repeated_lines` (fraction of non-blank lines that repeat an earlier
   line of the same document).
3. Exact duplicates (`exact_duplicate`): same text after casefolding and collapsing whitespace;
   the first occurrence is kept.
4. Near duplicates (`near_duplicate`): Jaccard similarity of the word n-gram sets. MinHash
   signatures with LSH banding (numpy, seeded, deterministic) propose candidate pairs, and each
   candidate is verified with the Jaccard similarity of the two n-gram sets, so there is no
   all-pairs loop. A document is removed when it is at least `near_dup_threshold` similar to an
   earlier kept document. N-grams are identified by a 64-bit hash, so "exact" holds up to hash
   collisions (about 2^-64 per pair of n-grams). With the default 32 bands of 4 rows, a pair at
   Jaccard 0.8 becomes a candidate with probability 1 - (1 - 0.8^4)^32 > 0.9999.

The funnel is `[("input", n), <six removal counts>, <four PII replacement counts>, ("output", m)]`;
PII counts are replacements, not removals, so input - sum(removals) = output. Known limits of the
PII patterns: a four-part number such as a section "2.7.2.2" is a valid IPv4 address and is
replaced; "::1" and other one-group IPv6 forms are left alone because Python slices look the same.

Try it:

    python -c "from tasks.pretrain.cleaning import *; print(clean_corpus(['a b c'] * 3, CleaningConfig(min_chars=1)).funnel)"
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import AlignflowError
from tasks.pretrain.corpus import Document

REMOVAL_RULES = (
    "too_short",
    "too_long",
    "symbol_ratio",
    "repeated_lines",
    "exact_duplicate",
    "near_duplicate",
)
PII_KINDS = ("pii_email", "pii_phone", "pii_ip", "pii_api_key")


class EmptyCorpusError(AlignflowError, ValueError):
    """Cleaning removed every document."""


class CleaningConfig(BaseModel):
    """Thresholds of the cleaning rules."""

    model_config = ConfigDict(extra="forbid")

    min_chars: int = Field(
        default=20, ge=0, description="Drop documents shorter than this many characters (after the PII scrub)."
    )
    max_chars: int = Field(
        default=100_000, ge=1, description="Drop documents longer than this many characters (after the PII scrub)."
    )
    max_symbol_ratio: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Drop documents whose non-alphanumeric, non-space characters exceed this fraction "
        "of all non-space characters.",
    )
    max_duplicate_line_fraction: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Drop documents in which more than this fraction of the non-blank lines repeat an "
        "earlier line of the same document.",
    )
    exact_dedup: bool = Field(
        default=True, description="Remove documents equal to an earlier one after casefolding and collapsing whitespace."
    )
    near_dedup: bool = Field(
        default=True, description="Remove documents whose word n-grams overlap an earlier kept document's."
    )
    near_dup_ngram: int = Field(
        default=5, ge=1, le=50, description="Word n-gram size for near-duplicate detection."
    )
    near_dup_threshold: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="Jaccard similarity of the n-gram sets at or above which a later document is a near duplicate.",
    )
    minhash_permutations: int = Field(
        default=128, ge=8, le=1024, description="Number of MinHash functions per document signature."
    )
    lsh_bands: int = Field(
        default=32,
        ge=1,
        description="LSH bands the signature is cut into; more bands find more candidate pairs at lower "
        "similarity (each candidate is verified exactly). Must divide minhash_permutations.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the MinHash functions (results are deterministic).")
    scrub_pii: bool = Field(
        default=True,
        description="Replace e-mail addresses, phone numbers, IP addresses and API-key-like strings with placeholders.",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> "CleaningConfig":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must not exceed max_chars ({self.max_chars})")
        if self.minhash_permutations % self.lsh_bands:
            raise ValueError(
                f"lsh_bands ({self.lsh_bands}) must divide minhash_permutations ({self.minhash_permutations})"
            )
        return self


@dataclass
class CleaningResult:
    """Cleaned texts in input order, the input positions they came from, and the funnel."""

    texts: list[str]
    kept_indices: list[int]
    funnel: list[tuple[str, int]] = field(default_factory=list)

    def funnel_dict(self) -> dict[str, int]:
        return dict(self.funnel)

    def removed(self) -> int:
        counts = self.funnel_dict()
        return sum(counts[rule] for rule in REMOVAL_RULES)


def clean_corpus(docs: Sequence[Document] | Sequence[str], config: CleaningConfig | None = None) -> CleaningResult:
    """Clean `docs` (Documents or plain strings); an empty result is returned, not raised."""
    config = config or CleaningConfig()
    texts = [doc.text if isinstance(doc, Document) else doc for doc in docs]
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"document {index} is a {type(text).__name__}, not a string")

    pii_counts: Counter[str] = Counter()
    if config.scrub_pii:
        scrubbed = []
        for text in texts:
            clean, counts = scrub_pii(text)
            scrubbed.append(clean)
            pii_counts.update(counts)
        texts = scrubbed
    # Surrounding whitespace is noise for every rule below and for training.
    texts = [text.strip() for text in texts]

    removed: Counter[str] = Counter()
    kept: list[int] = []
    for index, text in enumerate(texts):
        rule = quality_rule_failed(text, config)
        if rule is None:
            kept.append(index)
        else:
            removed[rule] += 1

    if config.exact_dedup:
        seen: set[str] = set()
        unique: list[int] = []
        for index in kept:
            key = normalize_for_dedup(texts[index])
            if key in seen:
                removed["exact_duplicate"] += 1
            else:
                seen.add(key)
                unique.append(index)
        kept = unique

    if config.near_dedup and len(kept) > 1:
        duplicates = find_near_duplicates(
            [texts[i] for i in kept],
            ngram=config.near_dup_ngram,
            threshold=config.near_dup_threshold,
            permutations=config.minhash_permutations,
            bands=config.lsh_bands,
            seed=config.seed,
        )
        removed["near_duplicate"] += len(duplicates)
        kept = [index for position, index in enumerate(kept) if position not in duplicates]

    funnel = [("input", len(texts))]
    funnel += [(rule, removed[rule]) for rule in REMOVAL_RULES]
    funnel += [(kind, pii_counts[kind]) for kind in PII_KINDS]
    funnel.append(("output", len(kept)))
    return CleaningResult(texts=[texts[i] for i in kept], kept_indices=kept, funnel=funnel)


def require_nonempty(result: CleaningResult, sources: Sequence[str]) -> CleaningResult:
    """Return `result`, or raise EmptyCorpusError naming the sources and the funnel when it is empty."""
    if result.texts:
        return result
    funnel = ", ".join(f"{name}={count}" for name, count in result.funnel)
    names = ", ".join(str(source) for source in sources) or "(no sources)"
    raise EmptyCorpusError(
        f"the corpus is empty after cleaning (sources: {names}); funnel: {funnel}. "
        "Check the sources, or loosen the cleaning thresholds."
    )


# ---------------------------------------------------------------------------------------------
# Quality heuristics


# Neither alphanumeric nor whitespace ("\w" also holds "_", which counts as a symbol here).
_SYMBOL = re.compile(r"[^\w\s]|_")


def symbol_ratio(text: str) -> float:
    """Non-alphanumeric, non-space characters over all non-space characters (0 for blank text)."""
    visible = len("".join(text.split()))
    if not visible:
        return 0.0
    # Regex counting runs in C; a per-character Python loop is the slowest part on big corpora.
    return len(_SYMBOL.findall(text)) / visible


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-blank lines that repeat an earlier line (compared after stripping)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def quality_rule_failed(text: str, config: CleaningConfig) -> str | None:
    """The name of the first quality rule `text` fails, or None when it passes them all."""
    if len(text) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    if symbol_ratio(text) > config.max_symbol_ratio:
        return "symbol_ratio"
    if duplicate_line_fraction(text) > config.max_duplicate_line_fraction:
        return "repeated_lines"
    return None


_WHITESPACE = re.compile(r"\s+")


def normalize_for_dedup(text: str) -> str:
    """The exact-duplicate key: casefolded, whitespace runs collapsed to one space, stripped."""
    return _WHITESPACE.sub(" ", text.casefold()).strip()


# ---------------------------------------------------------------------------------------------
# PII scrub
#
# Each kind is a candidate regex that starts with a character class (Python's regex engine then
# skips quickly to plausible starts; a leading look-behind would make it try every position) and
# an `accept` check in Python for what a regex says badly: boundaries, octet ranges, digit counts,
# randomness. A rejected candidate stays as it is.

_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+=_-")

# Lengths are bounded (RFC 5321: 64-character local parts, 63-character labels) so that a long
# run of word characters cannot make the regex backtrack quadratically.
_EMAIL = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"
)
# Known key shapes; the generic long token below is judged by `looks_like_api_key`.
_API_KEY_KNOWN = re.compile(
    r"sk-(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic / Stripe style (has a digit)
    r"|gh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{30,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
)
# "/" is left out so that file paths never form one long token.
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+=_-]{32,}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
# Two colons at least, then hex groups, optionally ending in a dotted quad ("::ffff:192.0.2.1").
_IPV6 = re.compile(r"[0-9A-Fa-f]{0,4}:(?:[0-9A-Fa-f]{0,4}:)+(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?")
# International numbers start with "+"; national ones need separators and a recognised shape,
# so that years, versions, dates and plain counts never match.
_PHONE = re.compile(
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){2,5}"  # +44 20 7946 0958, +1 (555) 123-4567
    r"|\(\d{2,5}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"  # (555) 123-4567, (030) 1234 5678
    r"|\d{3}([.-])\d{3}\1\d{4}"  # 555-123-4567, 555.123.4567
    r"|0\d{1,4}[ .-]\d{3,4}[ .-]?\d{3,4}"  # 020 7946 0958, 07700 900123, 030 123 4567
    r"|0[1-9](?:[ .-]\d{2}){4}"  # 01 23 45 67 89
)
_SIGNED_DECIMAL = re.compile(r"\+\d+\.\d+")
_DIGIT = re.compile(r"\d")


def _char_before(match: re.Match[str]) -> str:
    return match.string[match.start() - 1] if match.start() > 0 else ""


def _char_after(match: re.Match[str], offset: int = 0) -> str:
    index = match.end() + offset
    return match.string[index] if index < len(match.string) else ""


def _inside_number(match: re.Match[str]) -> bool:
    """The match continues a word or a dotted/dashed number on either side ("v1.2.3.4", "1.2.3.4.5")."""
    before, after = _char_before(match), _char_after(match)
    return (
        bool(before) and (before.isalnum() or before in "_.+-")
        or bool(after) and (after.isalnum() or after == "_")
        or after in (".", "-") and _char_after(match, 1).isdigit()
    )


def _accept_token(match: re.Match[str]) -> bool:
    # A known prefix in the middle of a longer token ("mask-...") is not a key.
    return _char_before(match) not in _TOKEN_CHARS and _char_after(match) not in _TOKEN_CHARS


def _accept_ipv4(match: re.Match[str]) -> bool:
    if _inside_number(match):
        return False
    return all(int(octet) <= 255 and (octet == "0" or not octet.startswith("0")) for octet in match.group(0).split("."))


def _accept_ipv6(match: re.Match[str]) -> bool:
    candidate = match.group(0)
    before, after = _char_before(match), _char_after(match)
    if before.isalnum() or before in "_:." or after.isalnum() or after == "_":
        return False
    if after == "." and _char_after(match, 1).isdigit():
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    # Python slices ("x[1::2]") and bare "::" parse as IPv6; real addresses have a longer group.
    groups = [group for group in re.split(r"[:.]", candidate) if group]
    return len(groups) >= 2 and any(len(group) >= 2 for group in groups)


def _accept_phone(match: re.Match[str]) -> bool:
    candidate = match.group(0)
    if _inside_number(match) or _SIGNED_DECIMAL.fullmatch(candidate):
        # "+35236450.6" is a number with a sign, not a phone number.
        return False
    digits = sum(ch.isdigit() for ch in candidate)
    return (8 if candidate.startswith("+") else 9) <= digits <= 15


def _shannon_entropy(token: str) -> float:
    counts = Counter(token)
    return -sum(c / len(token) * math.log2(c / len(token)) for c in counts.values())


def looks_like_api_key(token: str) -> bool:
    """A long token that looks random: hex with digits and letters, or base64-like with mixed classes."""
    if len(token) < 32:
        return False
    digits = sum(ch.isdigit() for ch in token)
    if _HEX.fullmatch(token):
        # Hashes and hex secrets; a run of one class only (all digits, "deadbeef" words) is not.
        return digits >= 4 and len(token) - digits >= 4
    has_lower = any(ch.islower() for ch in token)
    has_upper = any(ch.isupper() for ch in token)
    # Random base64 of this length has several digits and both cases; identifiers such as
    # CamelCaseNames or snake_case_names rarely do, and have low character entropy.
    return has_lower and has_upper and digits >= 3 and _shannon_entropy(token) >= 4.0


def scrub_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace PII in `text` with placeholders; returns the new text and replacements per kind."""
    counts: Counter[str] = Counter()

    def substitute(
        text: str,
        pattern: re.Pattern[str],
        kind: str,
        placeholder: str,
        accept: Callable[[re.Match[str]], bool] | None,
    ) -> str:
        def one(match: re.Match[str]) -> str:
            if accept is not None and not accept(match):
                return match.group(0)
            counts[kind] += 1
            return placeholder

        return pattern.sub(one, text)

    # E-mails first (their local parts can look like keys); IPv6 before IPv4 so that a mapped
    # "::ffff:1.2.3.4" goes whole; IPs before phones so that a dotted address is never a number. Cheap containment checks skip the regex scans for the
    # many texts that cannot match.
    if "@" in text:
        text = substitute(text, _EMAIL, "pii_email", "<EMAIL>", None)
    text = substitute(text, _API_KEY_KNOWN, "pii_api_key", "<API_KEY>", _accept_token)
    text = substitute(
        text, _LONG_TOKEN, "pii_api_key", "<API_KEY>", lambda m: _accept_token(m) and looks_like_api_key(m.group(0))
    )
    if "::" in text or text.count(":") >= 7:
        text = substitute(text, _IPV6, "pii_ip", "<IP>", _accept_ipv6)
    has_digit = _DIGIT.search(text) is not None
    if has_digit and "." in text:
        text = substitute(text, _IPV4, "pii_ip", "<IP>", _accept_ipv4)
    if has_digit:
        text = substitute(text, _PHONE, "pii_phone", "<PHONE>", _accept_phone)
    return text, counts


# ---------------------------------------------------------------------------------------------
# Near-duplicate detection: MinHash + LSH, then exact Jaccard on the candidates

_WORD = re.compile(r"\w+")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixer (uint64 arithmetic wraps, which is what we want)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _WordHasher:
    """Stable 64-bit word hashes (Python's own str hash is salted per process)."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, words: list[str]) -> np.ndarray:
        cache = self._cache
        for word in set(words).difference(cache):
            cache[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def ngram_hashes(text: str, ngram: int, hasher: _WordHasher | None = None) -> np.ndarray:
    """Sorted unique 64-bit hashes of the casefolded word n-grams of `text`.

    A text with fewer than `ngram` words (but at least one) is one n-gram of all its words.
    """
    hasher = hasher or _WordHasher()
    words = hasher(_WORD.findall(text.casefold()))
    if len(words) == 0:
        return np.zeros(0, dtype=np.uint64)
    width = min(ngram, len(words))
    count = len(words) - width + 1
    # Position-dependent multipliers make the hash order-sensitive: "a b" != "b a".
    multipliers = _splitmix64(np.arange(1, width + 1, dtype=np.uint64))
    combined = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(width):
            combined = combined + words[offset : offset + count] * multipliers[offset]
        combined = _splitmix64(combined)
    return np.unique(combined)


def minhash_signatures(shingles: list[np.ndarray], permutations: int, seed: int) -> np.ndarray:
    """MinHash signatures (documents x permutations, uint32) of sets of 64-bit shingle hashes.

    Each hash function is multiply-shift on 64 bits (an odd random multiplier plus an offset,
    taking the top 32 bits). Empty sets get the all-ones signature.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=permutations, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=permutations, dtype=np.uint64)
    signatures = np.full((len(shingles), permutations), np.iinfo(np.uint32).max, dtype=np.uint32)
    # Documents are processed in batches so that the (shingles x permutations) matrix stays small.
    budget = 4_000_000
    start = 0
    while start < len(shingles):
        stop, size = start, 0
        while stop < len(shingles) and (stop == start or size + len(shingles[stop]) * permutations <= budget):
            size += len(shingles[stop]) * permutations
            stop += 1
        batch = shingles[start:stop]
        lengths = np.array([len(s) for s in batch])
        nonempty = np.flatnonzero(lengths)
        if len(nonempty):
            values = np.concatenate([batch[i] for i in nonempty])
            offsets = np.concatenate([[0], np.cumsum(lengths[nonempty])[:-1]])
            with np.errstate(over="ignore"):
                hashed = ((values[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)
            signatures[start + nonempty] = np.minimum.reduceat(hashed, offsets, axis=0)
        start = stop
    return signatures


def _band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """One 64-bit key per (document, band): equal bands give equal keys."""
    rows = signatures.shape[1] // bands
    grouped = signatures.reshape(len(signatures), bands, rows).astype(np.uint64)
    keys = np.zeros(grouped.shape[:2], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            keys = _splitmix64(keys ^ grouped[:, :, r])
        # The band number is mixed in so that equal values in different bands do not collide.
        keys = _splitmix64(keys + np.arange(bands, dtype=np.uint64)[None, :])
    return keys


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique hash arrays (two empty sets count as 0)."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def find_near_duplicates(
    texts: Sequence[str],
    ngram: int = 5,
    threshold: float = 0.8,
    permutations: int = 128,
    bands: int = 32,
    seed: int = 0,
) -> set[int]:
    """Positions of texts whose n-gram Jaccard with an earlier kept text is >= threshold.

    Texts are visited in order; each is compared only with earlier kept texts that share an LSH
    bucket with it, most shared buckets first, and is dropped at the first verified match.
    """
    if permutations % bands:
        raise ValueError(f"bands ({bands}) must divide permutations ({permutations})")
    hasher = _WordHasher()
    shingles = [ngram_hashes(text, ngram, hasher) for text in texts]
    keys = _band_keys(minhash_signatures(shingles, permutations, seed), bands).tolist()

    buckets: dict[int, list[int]] = {}
    duplicates: set[int] = set()
    for position, doc_keys in enumerate(keys):
        if len(shingles[position]) == 0:
            continue
        shared: Counter[int] = Counter()
        for key in doc_keys:
            bucket = buckets.get(key)
            if bucket is not None:
                shared.update(bucket)
        is_duplicate = any(
            jaccard(shingles[position], shingles[other]) >= threshold
            for other, _ in sorted(shared.items(), key=lambda item: (-item[1], item[0]))
        )
        if is_duplicate:
            duplicates.add(position)
            continue
        for key in doc_keys:
            buckets.setdefault(key, []).append(position)
    return duplicates
