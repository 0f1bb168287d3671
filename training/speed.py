"""Training speed of a backbone on this machine: a few optimiser steps on random pixels.

No data pipeline and no validation, so it measures the model alone (the figure docs/training.md
reports). The first step builds the graph and is timed separately.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import keras
import numpy as np

from training.config import TrainConfig
from training.layers import PaperSchedule
from training.model import build_training_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speed:
    backbone: str
    input_size: int
    batch: int
    steps: int
    first_step_seconds: float
    steps_per_second: float

    @property
    def photos_per_second(self) -> float:
        return self.steps_per_second * self.batch


def measure(backbone: str, input_size: int, batch: int, steps: int, classes: int = 1000) -> Speed:
    """Time ``steps`` training steps (after one warm-up step) of backbone + ArcFace."""
    config = TrainConfig(backbone=backbone, input_size=input_size)
    model = build_training_model(config, classes)
    model.compile(
        optimizer=keras.optimizers.Adam(PaperSchedule(100)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, input_size, input_size, 3)).astype(np.float32)
    labels = rng.integers(0, classes, batch).astype(np.int32)
    started = time.perf_counter()
    model.train_on_batch({"image": images, "label": labels}, labels)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch({"image": images, "label": labels}, labels)
    elapsed = time.perf_counter() - started
    speed = Speed(backbone, input_size, batch, steps, first, steps / elapsed)
    log.info(
        "%s at %d px, batch %d: %.3f steps/s (%.1f photos/s) over %d steps; first step %.1f s",
        backbone,
        input_size,
        batch,
        speed.steps_per_second,
        speed.photos_per_second,
        steps,
        first,
    )
    return speed
