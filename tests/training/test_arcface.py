"""The ArcFace head against a numpy reference written from the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from training.layers import ArcFace  # noqa: E402


def reference_logits(
    embedding: np.ndarray, centres: np.ndarray, labels: np.ndarray, scale: float, margin: float
) -> np.ndarray:
    """s * cos(theta_y + m) for the true class, s * cos(theta_j) otherwise; past theta + m > pi
    the true class gets s * (cos(theta) - m sin(m))."""
    x = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    w = centres / np.linalg.norm(centres, axis=0, keepdims=True)
    theta = np.arccos(np.clip(x @ w, -1.0, 1.0))
    logits = scale * np.cos(theta)
    for i, y in enumerate(labels):
        t = theta[i, y]
        target = (
            np.cos(t + margin) if t + margin <= math.pi else np.cos(t) - margin * math.sin(margin)
        )
        logits[i, y] = scale * target
    return logits


def layer_with(centres: np.ndarray, scale: float, margin: float) -> ArcFace:
    layer = ArcFace(centres.shape[1], scale=scale, margin=margin)
    layer.build([(None, centres.shape[0]), (None,)])
    layer.centres.assign(centres)
    return layer


@pytest.mark.parametrize(("scale", "margin"), [(30.0, 0.3), (64.0, 0.5), (16.0, 0.0)])
def test_logits_match_the_reference(scale: float, margin: float) -> None:
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((12, 8)).astype(np.float32)
    centres = rng.standard_normal((8, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 12)
    got = layer_with(centres, scale, margin)([embedding, labels]).numpy()
    want = reference_logits(embedding, centres, labels, scale, margin)
    assert got == pytest.approx(want, abs=2e-3 * scale)
    # only the true class carries the margin
    mask = np.eye(5, dtype=bool)[labels]
    cos = layer_with(centres, scale, margin).cosine(embedding).numpy()
    assert got[~mask] == pytest.approx(scale * cos[~mask], abs=1e-4)
    if margin > 0:
        assert np.all(got[mask] < scale * cos[mask])


def test_past_pi_the_target_logit_stays_monotonic() -> None:
    centres = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    # theta_y close to pi: the embedding points away from its own class centre
    embedding = np.array([[-1.0, 0.05]], dtype=np.float32)
    got = layer_with(centres, 30.0, 0.5)([embedding, np.array([0])]).numpy()
    want = reference_logits(embedding, centres, np.array([0]), 30.0, 0.5)
    assert got == pytest.approx(want, abs=1e-3)
    theta = math.acos(-1.0 / math.hypot(1.0, 0.05))
    assert theta + 0.5 > math.pi  # the fallback branch was the one taken


def test_serialisable() -> None:
    layer = ArcFace(7, scale=20.0, margin=0.4, name="head")
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, ArcFace)
    assert (restored.n_classes, restored.scale, restored.margin, restored.name) == (
        7,
        20.0,
        0.4,
        "head",
    )
