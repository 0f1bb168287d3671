"""Custom Keras objects of the training model, registered so that save -> load -> export works.

The ``.keras`` file names this module; Keras imports it when the file is loaded.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="whaleid")
class ArcFace(keras.layers.Layer):  # type: ignore[misc]
    """Additive angular margin head (Deng et al., 2019): ``s * cos(theta_y + m)`` for the true
    class and ``s * cos(theta_j)`` for the others, with embeddings and class centres normalised.

    Inputs ``[embedding, label]``; output logits ``[batch, n_classes]`` for a softmax
    cross-entropy. Past ``theta + m > pi`` the margin term becomes ``cos(theta) - m sin(m)`` so
    the logit stays monotonic in theta (the usual "easy margin off" form).

    ``subcenters`` > 1 is sub-center ArcFace (Deng et al., 2020): each class keeps that many
    centres and a photo is compared with the nearest, so an individual may look two ways (left
    and right flank, head-on and profile) without one centre having to sit between them.
    """

    def __init__(
        self,
        n_classes: int,
        scale: float = 30.0,
        margin: float = 0.3,
        subcenters: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.n_classes = int(n_classes)
        self.scale = float(scale)
        self.margin = float(margin)
        self.subcenters = int(subcenters)
        if self.subcenters < 1:
            raise ValueError("subcenters must be at least 1")

    def build(self, input_shape: Any) -> None:
        embedding_shape = input_shape[0]
        self.centres = self.add_weight(
            name="centres",
            shape=(int(embedding_shape[-1]), self.n_classes * self.subcenters),
            initializer="glorot_uniform",
            trainable=True,
        )
        super().build(input_shape)

    def cosine(self, embedding: tf.Tensor) -> tf.Tensor:
        """Cosine similarity of each embedding to each class (its nearest sub-centre), with no
        margin and no scale."""
        x = tf.nn.l2_normalize(tf.cast(embedding, tf.float32), axis=1)
        w = tf.nn.l2_normalize(self.centres, axis=0)
        cos = tf.matmul(x, w)
        if self.subcenters > 1:  # centres are laid out class-major: [c0s0, c0s1, c1s0, ...]
            cos = tf.reduce_max(tf.reshape(cos, [-1, self.n_classes, self.subcenters]), axis=2)
        return tf.clip_by_value(cos, -1.0 + 1e-7, 1.0 - 1e-7)

    def call(self, inputs: Any) -> tf.Tensor:
        embedding, label = inputs
        cos = self.cosine(embedding)
        sin = tf.sqrt(1.0 - tf.square(cos))
        cos_m, sin_m = math.cos(self.margin), math.sin(self.margin)
        with_margin = cos * cos_m - sin * sin_m
        threshold = math.cos(math.pi - self.margin)
        with_margin = tf.where(cos > threshold, with_margin, cos - sin_m * self.margin)
        one_hot = tf.one_hot(tf.cast(tf.reshape(label, [-1]), tf.int32), self.n_classes)
        return self.scale * (one_hot * with_margin + (1.0 - one_hot) * cos)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, int]:
        return (input_shape[0][0], self.n_classes)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "n_classes": self.n_classes,
            "scale": self.scale,
            "margin": self.margin,
            "subcenters": self.subcenters,
        }


@keras.saving.register_keras_serializable(package="whaleid")
class PaperSchedule(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
    """The learning rate of §3.6 / Figure 4, per step: linear warm-up from ``start`` to ``peak``
    over ``warmup_epochs``, ``peak`` for ``sustain_epochs``, then exponential decay that reaches
    ``end`` at ``decay_until_epoch`` and stays there."""

    def __init__(
        self,
        steps_per_epoch: int,
        start: float = 1e-6,
        peak: float = 8e-5,
        end: float = 1e-6,
        warmup_epochs: float = 6.0,
        sustain_epochs: float = 1.0,
        decay_until_epoch: float = 30.0,
    ) -> None:
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.start = float(start)
        self.peak = float(peak)
        self.end = float(end)
        self.warmup_epochs = float(warmup_epochs)
        self.sustain_epochs = float(sustain_epochs)
        self.decay_until_epoch = float(decay_until_epoch)

    def __call__(self, step: Any) -> tf.Tensor:
        epoch = tf.cast(step, tf.float32) / float(self.steps_per_epoch)
        warm = self.start + (self.peak - self.start) * epoch / max(self.warmup_epochs, 1e-9)
        decay_from = self.warmup_epochs + self.sustain_epochs
        span = max(self.decay_until_epoch - decay_from, 1e-9)
        progress = tf.clip_by_value((epoch - decay_from) / span, 0.0, 1.0)
        decayed = self.peak * tf.pow(self.end / self.peak, progress)
        lr = tf.where(
            epoch < self.warmup_epochs, warm, tf.where(epoch < decay_from, self.peak, decayed)
        )
        return tf.cast(lr, tf.float32)

    def at_epoch(self, epoch: float) -> float:
        """The learning rate at a (fractional) epoch, for logs, plots and tests."""
        return float(self(round(epoch * self.steps_per_epoch)))

    def get_config(self) -> dict[str, Any]:
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "start": self.start,
            "peak": self.peak,
            "end": self.end,
            "warmup_epochs": self.warmup_epochs,
            "sustain_epochs": self.sustain_epochs,
            "decay_until_epoch": self.decay_until_epoch,
        }


@keras.saving.register_keras_serializable(package="whaleid")
class LayerwiseAdam(keras.optimizers.Adam):  # type: ignore[misc]
    """Adam with a learning-rate factor per variable: ``multipliers`` maps a variable's path
    (``variable.path``) to its factor, 1 where absent. Fine-tuning a pretrained backbone gives its
    early layers, which hold general edges and textures, a smaller step than its late ones and
    the new embedding head (layer-wise learning-rate decay). A factor scales the step itself: with
    Adam, scaling the gradient instead would change nothing."""

    def __init__(self, multipliers: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.multipliers = {str(k): float(v) for k, v in (multipliers or {}).items()}
        self._factors: list[float] = []

    def build(self, var_list: Any) -> None:
        super().build(var_list)
        self._factors = [self.multipliers.get(v.path, 1.0) for v in var_list]

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> Any:
        factor = self._factors[self._get_variable_index(variable)]
        if factor != 1.0:
            learning_rate = learning_rate * factor
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "multipliers": self.multipliers}
