"""The int8 gate's MAP@5 statistics on synthetic per-query AP@5: every outcome is fixed by the
scores and the seed, none by a training run."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

from model_export.map5_drop import (
    MAX_MAP5_DROP,
    MIN_QUERIES,
    Verdict,
    bootstrap_interval,
    judge_map5_drop,
)
from training.evaluate import Scores

if TYPE_CHECKING:
    from model_export.quantize import Int8Check

AP5 = np.array([1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 0.0])  # what one query's AP@5 can be


def scores(queries: int, seed: int = 5) -> np.ndarray:
    """Per-query AP@5 of a decent model: mostly right first, some lower, some missed."""
    return np.random.default_rng(seed).choice(AP5, queries, p=[0.7, 0.1, 0.05, 0.03, 0.02, 0.1])


def flipped(ap: np.ndarray, count: int, to: float = 0.0) -> np.ndarray:
    """``ap`` with its first ``count`` queries answered right first (AP@5 1) now scoring ``to``."""
    out = ap.copy()
    out[np.flatnonzero(ap == 1.0)[:count]] = to
    return out


def test_one_flip_in_8_queries_is_too_few_to_judge() -> None:
    # the CI flake: 0.3750 -> 0.2500 on 8 queries, one query flipped; the old gate refused
    fp32 = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    int8 = flipped(fp32, 1)
    drop = judge_map5_drop(fp32, int8)
    assert drop.queries == 8 and drop.mean == pytest.approx(0.125)
    assert drop.verdict is Verdict.UNJUDGED
    assert drop.low == 0.0 and drop.high > MAX_MAP5_DROP  # nothing to tell it from noise
    assert "too few queries to judge (8 < 100)" in drop.describe()


def test_one_flip_in_400_queries_passes() -> None:
    fp32 = scores(400)
    drop = judge_map5_drop(fp32, flipped(fp32, 1))
    assert drop.verdict is Verdict.PASSED
    assert drop.mean == pytest.approx(1 / 400) and drop.low == 0.0


def test_a_real_loss_on_400_queries_is_refused() -> None:
    fp32 = scores(400)
    int8 = flipped(fp32, 20)  # 20 queries right first now missed: MAP@5 drops by 0.05
    drop = judge_map5_drop(fp32, int8)
    assert drop.verdict is Verdict.REFUSED
    assert drop.mean == pytest.approx(0.05)
    assert MAX_MAP5_DROP < drop.low < drop.mean < drop.high


def test_a_loss_the_queries_cannot_tell_from_the_allowed_one_passes() -> None:
    # 3 flips in 400 (0.0075, under the allowed 0.01) and 6 (0.015, over it): neither interval
    # lies wholly above 0.01, so neither is refused
    fp32 = scores(400)
    for count in (3, 6):
        drop = judge_map5_drop(fp32, flipped(fp32, count))
        assert drop.verdict is Verdict.PASSED and drop.low <= MAX_MAP5_DROP < drop.high


def test_the_minimum_is_a_query_count() -> None:
    fp32 = scores(MIN_QUERIES)
    assert judge_map5_drop(fp32[:-1], fp32[:-1]).verdict is Verdict.UNJUDGED
    assert judge_map5_drop(fp32, fp32).verdict is Verdict.PASSED


def test_same_scores_same_interval_in_any_order() -> None:
    fp32 = scores(400)
    int8 = flipped(fp32, 12, to=0.5)
    first, again = judge_map5_drop(fp32, int8), judge_map5_drop(fp32, int8)
    assert first == again
    order = np.random.default_rng(2).permutation(400)
    shuffled = judge_map5_drop(fp32[order], int8[order])
    assert (shuffled.low, shuffled.high) == (first.low, first.high)


def test_int8_as_good_or_better_passes() -> None:
    fp32 = scores(400)
    same = judge_map5_drop(fp32, fp32)
    assert (same.mean, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, Verdict.PASSED)
    better = judge_map5_drop(flipped(fp32, 30), fp32)
    assert better.verdict is Verdict.PASSED and better.high < 0.0


def test_the_interval_is_the_bootstrap_of_the_mean() -> None:
    """The multinomial shortcut equals resampling the queries; both match the normal interval
    of a mean of 400 Bernoulli(0.1) drops (0.1 +- 1.96 * 0.015)."""
    drops = np.zeros(400)
    drops[:40] = 1.0
    low, high = bootstrap_interval(drops)
    rng = np.random.default_rng(11)
    means = drops[rng.integers(0, 400, (20_000, 400))].mean(axis=1)
    assert low == pytest.approx(np.quantile(means, 0.025), abs=0.004)
    assert high == pytest.approx(np.quantile(means, 0.975), abs=0.004)
    half = 1.96 * np.sqrt(0.1 * 0.9 / 400)
    assert (low, high) == pytest.approx((0.1 - half, 0.1 + half), abs=0.006)


def test_unpaired_scores_are_an_error() -> None:
    with pytest.raises(ValueError, match="not paired"):
        judge_map5_drop(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="no values"):
        judge_map5_drop(np.ones(0), np.ones(0))


def int8_check(fp32: np.ndarray, int8: np.ndarray, min_cosine: float = 0.999) -> Int8Check:
    """The check of a model whose queries score ``int8`` where fp32's score ``fp32``."""
    from model_export.quantize import Int8Check

    def mean(ap: np.ndarray) -> Scores:
        return Scores(float(ap.mean()), None, None, len(ap))

    return Int8Check(
        photos=2 * len(fp32),
        min_cosine=min_cosine,
        mean_cosine=0.9995,
        fp32=mean(fp32),
        int8=mean(int8),
        drop=judge_map5_drop(fp32, int8),
    )


def test_the_refusal_carries_the_interval() -> None:
    pytest.importorskip("onnx")
    from model_export.quantize import QuantizationRefused, enforce

    fp32 = scores(400)
    check = int8_check(fp32, flipped(fp32, 20))
    with pytest.raises(QuantizationRefused) as refused:
        enforce(check, min_cosine=0.98)
    message = str(refused.value)
    assert message.startswith("int8 loses validation MAP@5")
    low, high = check.drop.low, check.drop.high
    assert f"95% paired bootstrap interval [{low:+.4f}, {high:+.4f}] over 400 queries" in message
    assert "refused, the whole interval lies above the allowed 0.01" in message


def test_too_few_queries_refuse_unless_accepted_and_the_metadata_says_so() -> None:
    pytest.importorskip("onnx")
    from model_export.quantize import QuantizationRefused, enforce

    fp32 = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    check = int8_check(fp32, flipped(fp32, 1))
    with pytest.raises(QuantizationRefused) as refused:
        enforce(check, min_cosine=0.98)
    message = str(refused.value)
    assert message.startswith("too few validation queries to judge int8's MAP@5: 8 < 100")
    assert "--int8-accept-unjudged" in message and "validate on more photos" in message
    assert "95% paired bootstrap interval [+0.0000, " in message
    enforce(check, min_cosine=0.98, accept_unjudged=True)  # written on the cosine check alone
    facts = check.metadata()
    assert facts["whaleid.training.int8_map5_verdict"] == (
        "unjudged: too few queries to judge (8 < 100), written on the cosine check alone"
    )
    assert facts["whaleid.training.int8_val_queries"] == "8"
    assert facts["whaleid.training.int8_map5_drop"] == "+0.1250"
    assert facts["whaleid.training.int8_map5_drop_interval"].startswith(
        "95% paired bootstrap interval [+0.0000, "
    )
    with pytest.raises(QuantizationRefused, match="int8 embeddings stray from fp32"):
        enforce(int8_check(fp32, fp32, min_cosine=0.9), min_cosine=0.98, accept_unjudged=True)
