"""The learning-rate schedule of §3.6 / Figure 4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from training.layers import PaperSchedule  # noqa: E402

STEPS = 10


@pytest.fixture
def schedule() -> PaperSchedule:
    return PaperSchedule(STEPS)  # the paper's numbers are the defaults


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, 1e-6),  # warm-up starts at 1e-6
        (3, (1e-6 + 8e-5) / 2),  # linear: half way at epoch 3
        (6, 8e-5),  # peak after 6 epochs
        (6.5, 8e-5),  # sustained
        (7, 8e-5),  # decay starts
        (18.5, 8e-5 * (1e-6 / 8e-5) ** 0.5),  # exponential: geometric mean half way
        (30, 1e-6),  # reaches 1e-6 at epoch 30
        (45, 1e-6),  # and stays there
    ],
)
def test_key_epochs(schedule: PaperSchedule, epoch: float, expected: float) -> None:
    assert schedule.at_epoch(epoch) == pytest.approx(expected, rel=1e-4)


def test_shape_rises_then_falls(schedule: PaperSchedule) -> None:
    lrs = np.array([schedule.at_epoch(e / STEPS) for e in range(31 * STEPS)])
    warm, decay = lrs[: 6 * STEPS], lrs[7 * STEPS : 30 * STEPS]
    assert np.all(np.diff(warm) > 0)
    assert np.all(np.diff(decay) < 0)
    # exponential decay: equal ratios per step
    ratios = decay[1:] / decay[:-1]
    assert ratios == pytest.approx(np.full_like(ratios, ratios[0]), rel=1e-3)


def test_config_round_trip(schedule: PaperSchedule) -> None:
    custom = PaperSchedule(7, start=1e-5, peak=1e-3, end=1e-5, warmup_epochs=2, sustain_epochs=0)
    for s in (schedule, custom):
        restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(s))
        assert isinstance(restored, PaperSchedule)
        assert restored.get_config() == s.get_config()
        assert restored.at_epoch(4.3) == s.at_epoch(4.3)


def test_saved_with_the_optimizer(tmp_path: Path) -> None:
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(PaperSchedule(5, peak=3e-4)), loss="mse")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    lr = restored.optimizer._learning_rate  # the schedule, not its current value
    assert isinstance(lr, PaperSchedule)
    assert lr.get_config() == PaperSchedule(5, peak=3e-4).get_config()
