"""Whether the int8 model loses validation MAP@5 beyond the noise of the queries it is judged on.

MAP@5 is the mean of the queries' AP@5, so the change from fp32 to int8 is the mean of the
per-query changes. With few queries it is mostly noise: on 8 queries one query that flips moves
MAP@5 by up to 0.125, twelve times the allowed drop. So the gate

- pairs the two models query by query: ``drop_i = AP@5_fp32_i - AP@5_int8_i`` (queries both
  answer alike cancel, which is most of them);
- puts a seeded percentile bootstrap interval on the mean drop (``CONFIDENCE``, ``RESAMPLES``
  resamples of the queries with replacement; the same scores give the same interval) and
  refuses only when the whole interval lies above the allowed drop: int8 is then worse by more
  than allowed, beyond what the choice of queries explains;
- does not judge below ``MIN_QUERIES`` queries: one query moves MAP@5 by up to 1/n, more than
  the allowed 0.01 below 100 queries, and a bootstrap of so few sparse, discrete differences
  gives intervals too narrow to trust. The caller decides what "unjudged" means.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

MAX_MAP5_DROP = 0.01
MIN_QUERIES = 100
CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0


class Verdict(StrEnum):
    PASSED = "passed"
    REFUSED = "refused"
    UNJUDGED = "unjudged"


@dataclass(frozen=True)
class Map5Drop:
    """The paired MAP@5 drop of int8 against fp32 (positive: int8 is worse) and its verdict."""

    queries: int
    mean: float
    low: float
    high: float
    allowed: float
    min_queries: int
    confidence: float
    resamples: int
    verdict: Verdict

    def interval(self) -> str:
        return (
            f"{self.confidence:.0%} paired bootstrap interval [{self.low:+.4f}, {self.high:+.4f}]"
        )

    def reason(self) -> str:
        """Why the verdict is what it is, in a few words."""
        if self.verdict is Verdict.UNJUDGED:
            return f"too few queries to judge ({self.queries} < {self.min_queries})"
        if self.verdict is Verdict.REFUSED:
            return f"the whole interval lies above the allowed {self.allowed}"
        return f"the interval reaches the allowed {self.allowed} or below"

    def describe(self) -> str:
        return (
            f"MAP@5 drop {self.mean:+.4f} (fp32 - int8, paired over {self.queries} queries), "
            f"{self.interval()} ({self.resamples} resamples): {self.verdict}, {self.reason()}"
        )


def bootstrap_interval(
    values: np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``: ``resamples`` resamples with
    replacement, drawn from a generator seeded with ``seed``, so the same values (in any order)
    give the same interval.

    A resample's mean depends only on how often it draws each distinct value, and those counts
    are multinomial: drawing them directly is the same bootstrap as drawing indices, at a cost
    that grows with the distinct values (AP@5 takes six, so a drop takes a few dozen at most)
    instead of with the queries."""
    if not len(values):
        raise ValueError("no values to bootstrap")
    distinct, counts = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
    n = int(counts.sum())
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)
    means = draws @ distinct / n
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def judge_map5_drop(
    fp32: np.ndarray,
    int8: np.ndarray,
    *,
    allowed: float = MAX_MAP5_DROP,
    min_queries: int = MIN_QUERIES,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Map5Drop:
    """The verdict on the per-query AP@5 of the same queries (same order) under both models:
    refused when the whole bootstrap interval of the mean drop lies above ``allowed``, unjudged
    below ``min_queries`` queries (the interval is reported all the same), else passed."""
    fp32, int8 = np.asarray(fp32, dtype=np.float64), np.asarray(int8, dtype=np.float64)
    if fp32.shape != int8.shape or fp32.ndim != 1:
        raise ValueError(f"per-query scores of shapes {fp32.shape} and {int8.shape}: not paired")
    drops = fp32 - int8
    low, high = bootstrap_interval(drops, confidence=confidence, resamples=resamples, seed=seed)
    if len(drops) < min_queries:
        verdict = Verdict.UNJUDGED
    elif low > allowed:
        verdict = Verdict.REFUSED
    else:
        verdict = Verdict.PASSED
    return Map5Drop(
        queries=len(drops),
        mean=float(drops.mean()),
        low=low,
        high=high,
        allowed=allowed,
        min_queries=min_queries,
        confidence=confidence,
        resamples=resamples,
        verdict=verdict,
    )
