"""Tokenizers for the ROUGE-L novelty filter.

Two tokenizers:

- ``rouge``: exactly rouge-score 0.1.2's default tokenizer. The text is lower-cased (Python's
  ``str.lower``, so for example the Kelvin sign becomes ``k``), every character outside a-z and 0-9
  becomes a separator, and with stemming on, tokens longer than 3 characters go through NLTK's
  Porter stemmer, as rouge-score does. Every letter outside a-z is dropped, so a Chinese or Korean
  text has no tokens at all.
- ``unicode``: for non-English data. Tokens are runs of Unicode letters and digits (the
  underscore separates). Scripts written without spaces (Han, Hiragana, Katakana) give one token
  per character; Korean (Hangul) words stay whole. Stemming, when on, applies to tokens of a-z
  only, with the same rule as ``rouge``.

``make_batch_tokenizer`` tokenizes a list of texts at once, with the same tokens as
``make_tokenizer``; for ``rouge`` without stemming it lower-cases the whole list joined by NUL
characters in one call and, when the result is ASCII (the usual case), maps every character outside
a-z, 0-9 and NUL to a space with one ``str.translate`` (CPython's fast ASCII path) before splitting:
several times faster than a regular expression per text. A text holding a NUL, or a list with
anything else than ASCII after lower-casing, goes through the per-text tokenizer.

Run ``python -m tasks.rouge.tokenize "Some text"`` to print the tokens of a text.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Literal, Sequence

TokenizerName = Literal["rouge", "unicode"]
TOKENIZERS: tuple[str, ...] = ("rouge", "unicode")

# rouge-score replaces [^a-z0-9]+ by a space and splits; findall on the complement is the same.
_ROUGE_TOKEN_RE = re.compile(r"[a-z0-9]+")
_VALID_TOKEN_RE = re.compile(r"^[a-z0-9]+$")
# The same rule for ASCII text as a translation table: every character outside a-z, 0-9 becomes a
# space, except NUL, which separates the texts of a batch.
_ASCII_SEPARATORS = {
    code: " " for code in range(1, 128) if not ("a" <= chr(code) <= "z" or "0" <= chr(code) <= "9")
}

# Scripts written without spaces between words: one token per character.
_PER_CHAR_RANGES = (
    "\u2e80-\u2fdf"  # CJK radicals, Kangxi radicals
    "\u3005\u3007\u3021-\u3029\u3038-\u303b"  # ideographic iteration marks and numerals
    "\u3040-\u30ff"  # Hiragana, Katakana (including the prolonged sound mark)
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # half-width Katakana
    "\U0001b000-\U0001b16f"  # Kana supplement and extensions
    "\U00020000-\U0003134f"  # CJK extensions B to G
)
# One per-character token, or a run of letters/digits (no underscore) outside those scripts.
_UNICODE_TOKEN_RE = re.compile(rf"[{_PER_CHAR_RANGES}]|[^\W_{_PER_CHAR_RANGES}]+")


class _Stemmer:
    """NLTK's Porter stemmer (the one rouge-score uses) with a cache: stemming is the slow part."""

    def __init__(self) -> None:
        try:
            from nltk.stem import porter
        except ImportError as error:  # nltk comes with rouge-score; say so instead of a traceback
            raise ImportError(
                "stemming needs NLTK's Porter stemmer (pip install nltk), the one rouge-score uses"
            ) from error
        self._stem = porter.PorterStemmer().stem
        self._cache: dict[str, str] = {}

    def __call__(self, token: str) -> str:
        stem = self._cache.get(token)
        if stem is None:
            stem = self._stem(token)
            self._cache[token] = stem
        return stem


def make_tokenizer(name: str = "rouge", stemming: bool = False) -> Callable[[str], list[str]]:
    """Return a function text -> tokens for tokenizer `name` ("rouge" or "unicode")."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")
    stemmer = _Stemmer() if stemming else None

    if name == "rouge":
        findall = _ROUGE_TOKEN_RE.findall
        if stemmer is None:
            def tokenize_rouge(text: str) -> list[str]:
                return findall(text.lower())
            return tokenize_rouge

        valid = _VALID_TOKEN_RE.match

        def tokenize_rouge_stemmed(text: str) -> list[str]:
            tokens = [stemmer(t) if len(t) > 3 else t for t in findall(text.lower())]
            # rouge-score drops whatever the stemmer turned into an invalid token.
            return [t for t in tokens if valid(t)]
        return tokenize_rouge_stemmed

    findall = _UNICODE_TOKEN_RE.findall
    if stemmer is None:
        def tokenize_unicode(text: str) -> list[str]:
            return findall(text.lower())
        return tokenize_unicode

    ascii_word = _VALID_TOKEN_RE.match

    def tokenize_unicode_stemmed(text: str) -> list[str]:
        return [
            stemmer(t) if len(t) > 3 and ascii_word(t) else t for t in findall(text.lower())
        ]
    return tokenize_unicode_stemmed


def make_batch_tokenizer(name: str = "rouge", stemming: bool = False) -> Callable[[Sequence[str]], list[list[str]]]:
    """Return a function texts -> one token list per text, the tokens of `make_tokenizer`."""
    tokenize_one = make_tokenizer(name, stemming)
    if name != "rouge" or stemming:
        def tokenize_each(texts: Sequence[str]) -> list[list[str]]:
            return list(map(tokenize_one, texts))
        return tokenize_each

    def tokenize_batch(texts: Sequence[str]) -> list[list[str]]:
        try:
            # str.lower maps character by character (the one context rule, final sigma, only
            # chooses between two non-ASCII letters), so lowering the joined texts is lowering
            # each one; a non-str item fails the join and gets its own error below.
            joined = "\x00".join(texts).lower()
        except TypeError:
            return list(map(tokenize_one, texts))
        if joined.isascii():
            parts = joined.translate(_ASCII_SEPARATORS).split("\x00")
            if len(parts) == len(texts):  # else a text holds a NUL itself
                return list(map(str.split, parts))
        return list(map(tokenize_one, texts))
    return tokenize_batch


def tokenize(text: str, name: str = "rouge", stemming: bool = False) -> list[str]:
    """Tokenize one text (convenience; build the function once with `make_tokenizer` for speed)."""
    return make_tokenizer(name, stemming)(text)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print("rouge:  ", tokenize(arg))
        print("unicode:", tokenize(arg, "unicode"))
