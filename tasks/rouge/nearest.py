"""Each text's nearest neighbour in a fixed pool under ROUGE-L, exactly as rouge-score scores it.

The greedy filter (`engine.RougeLFilter`) decides a stream against a pool that grows as it goes.
This is its stateless companion: score many texts against one pool snapshot, independently of each
other, so the work can be split across processes or machines and merged afterwards in stream order
(the self-instruct flow's fan-out does this). It is also the nearest-seed figure's scorer.

    scores = nearest(["Write a poem about the sea."], seed_instructions)   # [(0.53, 12)]

Every pair is scored (in C, with rapidfuzz's bit-parallel LCS over one code point per token): the
highest score of a kept text may lie anywhere below the threshold, so no pair can be skipped for it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from tasks.rouge.engine import _codepoint, _fmeasures
from tasks.rouge.tokenize import make_tokenizer

# Texts scored per cdist call: bounds the temporary matrix at _ROWS x len(pool).
_ROWS = 256


def nearest(texts: Sequence[str], pool: Sequence[str], tokenizer: str = "rouge", stemming: bool = False) -> list[tuple[float, int | None]]:
    """For each text, (highest ROUGE-L F against the pool, index of the first pool item reaching it).

    The index is None when the highest score is 0 (nothing in common, an empty text, an empty pool).
    Scores are rouge-score's own floating-point values, bit for bit.
    """
    tokenize = make_tokenizer(tokenizer, stemming)
    codes: dict[str, str] = {}

    def encode(text: str) -> str:
        # One code point per distinct token: LCS over these strings is LCS over the token lists.
        return "".join([codes.setdefault(token, chr(_codepoint(len(codes)))) for token in tokenize(text)])

    pool_codes = [encode(text) for text in pool]
    text_codes = [encode(text) for text in texts]
    if not pool_codes:
        return [(0.0, None)] * len(text_codes)
    pool_lengths = np.array([len(code) for code in pool_codes], dtype=np.float64)
    result: list[tuple[float, int | None]] = []
    for start in range(0, len(text_codes), _ROWS):
        block = text_codes[start : start + _ROWS]
        lcs = process.cdist(block, pool_codes, scorer=LCSseq.similarity, dtype=np.int32, workers=1).astype(np.float64)
        lengths = np.array([len(code) for code in block], dtype=np.float64)[:, None]
        scores = _fmeasures(lcs, lengths, pool_lengths[None, :])
        best = scores.argmax(axis=1)  # argmax returns the first maximum: the lowest pool index
        for row, column in enumerate(best):
            score = float(scores[row, column])
            result.append((score, int(column) if score > 0 else None))
    return result
