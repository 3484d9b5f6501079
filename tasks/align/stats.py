"""Error bars for the align stage: every difference it reports carries a standard error.

Paired where the same test prompts are scored twice (base vs SFT, SFT vs PPO): the per-prompt
difference cancels the prompt's own difficulty, so the standard error is that of the differences.
Per-token rates (NLL per token) are ratios of sums, so their difference gets a bootstrap over
prompts, which keeps each prompt's tokens together.

    diff, se = paired_difference(ppo_rewards, sft_rewards)
    diff, se = ratio_difference(sft_nll_sums, base_nll_sums, token_counts)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan when it cannot be estimated)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    se = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else float("nan")
    return float(array.mean()), se


def paired_difference(ours: Sequence[float], theirs: Sequence[float]) -> tuple[float, float]:
    """Mean of ours - theirs over paired items, and its standard error."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.size} vs {b.size}")
    return mean_se(a - b)


def ratio_difference(ours: Sequence[float], theirs: Sequence[float], counts: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """sum(ours)/sum(counts) - sum(theirs)/sum(counts), with a bootstrap SE over items (prompts)."""
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (ours, theirs, counts))
    if not a.shape == b.shape == n.shape or a.size == 0:
        raise ValueError("ratio_difference needs equally long, non-empty sequences")
    diff = float((a.sum() - b.sum()) / n.sum())
    if a.size < 2:
        return diff, float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, a.size, size=(BOOTSTRAP_RESAMPLES, a.size))
    resampled = (a[picks].sum(1) - b[picks].sum(1)) / n[picks].sum(1)
    return diff, float(resampled.std(ddof=1))


def proportion_se(successes: float, n: int) -> float:
    """Standard error of a proportion (binomial); a tie counted as 1/2 is a half success."""
    if n <= 0:
        return float("nan")
    p = successes / n
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 1 else float("nan")
