"""Backbones, weights files, and a tiny model whose loss falls in a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from training.config import Augmentation, TrainConfig  # noqa: E402
from training.data import CsvSource, split_catalogue, training_dataset  # noqa: E402
from training.layers import ArcFace, PaperSchedule  # noqa: E402
from training.model import (  # noqa: E402
    backbone_of,
    build_backbone,
    build_embedding_model,
    build_training_model,
    embedding_submodel,
)
from training.synthetic import write_catalogue  # noqa: E402


def test_the_head_of_the_paper() -> None:
    config = TrainConfig(backbone="compact", input_size=32, embedding_dim=512)
    model = build_training_model(config, n_classes=7)
    names = [layer.name for layer in model.layers]
    head = ["pool", "embedding_bn", "embedding_dropout", "embedding", "arcface"]
    assert [n for n in names if n in head] == head  # backbone -> BN -> Dropout -> Dense -> ArcFace
    assert model.get_layer("embedding_dropout").rate == 0.2
    assert model.get_layer("embedding").units == 512
    assert isinstance(model.get_layer("arcface"), ArcFace)
    embedder = embedding_submodel(model)
    assert embedder.input_shape == (None, 32, 32, 3) and embedder.output_shape == (None, 512)
    assert backbone_of(model).name == "compact_backbone"


def test_an_efficientnet_backbone_and_a_local_weights_file(tmp_path: Path) -> None:
    config = TrainConfig(backbone="EfficientNetB0", input_size=32, embedding_dim=8)
    model = build_embedding_model(config)
    assert model(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 8)
    first = backbone_of(model)
    first.save_weights(tmp_path / "b0_notop.weights.h5")  # Keras 3's weights format
    # Keras' own ImageNet files (efficientnetb0_notop.h5 ...) are in the legacy HDF5 layout
    keras.saving.save_model(first, tmp_path / "b0_notop.h5")
    for name in ("b0_notop.weights.h5", "b0_notop.h5"):
        loaded = build_backbone("EfficientNetB0", 32, str(tmp_path / name))
        for a, b in zip(first.get_weights(), loaded.get_weights(), strict=True):
            assert np.array_equal(a, b), name
    with pytest.raises(FileNotFoundError):
        build_backbone("EfficientNetB0", 32, str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_backbone("compact", 32, "imagenet")


def test_a_tiny_model_learns(tmp_path: Path) -> None:
    """Six individuals, augmentation off, 40 steps: the ArcFace loss must at least halve."""
    keras.utils.set_random_seed(0)
    catalogue = write_catalogue(tmp_path, individuals=6, photos=4, size=40, seed=1)
    source = CsvSource(catalogue.catalogue_csv, catalogue.images)
    split = split_catalogue(
        source.entries, folds=1, validation_fold=0, unseen_fraction=0, gallery_fraction=0.5, seed=0
    )
    config = TrainConfig(backbone="compact", input_size=32, embedding_dim=16, arcface_scale=16.0)
    dataset = training_dataset(
        source,
        split,
        spec=config.preprocessing,
        augmentation=Augmentation(enabled=False),
        global_batch=12,
        shuffle_buffer=24,
        cache_decoded=True,
        seed=0,
    )
    model = build_training_model(config, len(split.classes))
    model.compile(
        optimizer=keras.optimizers.Adam(
            PaperSchedule(10, start=1e-3, peak=3e-3, end=1e-3, warmup_epochs=1, sustain_epochs=3)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(dataset, epochs=4, steps_per_epoch=10, shuffle=False, verbose=0).history[
        "loss"
    ]
    assert history[-1] < 0.5 * history[0], history
