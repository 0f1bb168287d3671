"""Grad-CAM overlays (§4.2): which parts of a photo drove the model's answer.

The target is the cosine similarity between the photo's embedding and either the ArcFace class
centre it is closest to (the classifier view the paper uses) or, with ``reference``, another
photo's embedding (why do these two photos match?). Its gradient with respect to the backbone's
last feature map weights the map's channels (Selvaraju et al., 2017); the positive part, scaled to
0-1, is coloured with a jet map and blended over the photo.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from service.contract import Preprocessing
from training.data import MAX_PIXELS
from training.evaluate import prepare
from training.model import HEAD_LAYERS, backbone_of
from training.runs import find_summary, load_model, preprocessing_of

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.45
MAX_OVERLAY_SIDE = 1024


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map: 0 -> dark blue, 0.5 -> green, 1 -> dark red; HxW -> HxWx3 in 0-1."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue peaks
    result: np.ndarray = np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)
    return result


def heatmap(
    model: keras.Model, pixels: np.ndarray, reference: np.ndarray | None = None
) -> np.ndarray:
    """Grad-CAM of one preprocessed photo (HxWx3) -> a feature-map-sized heat map in 0-1."""
    backbone = backbone_of(model)
    head = [model.get_layer(name) for name in HEAD_LAYERS]
    x = tf.convert_to_tensor(pixels[None], tf.float32)
    with tf.GradientTape() as tape:
        features = backbone(x, training=False)
        tape.watch(features)
        embedding = features
        for layer in head:
            embedding = layer(embedding, training=False)
        if reference is None:
            target = tf.reduce_max(model.get_layer("arcface").cosine(embedding), axis=1)
        else:
            unit = tf.nn.l2_normalize(embedding, axis=1)
            target = tf.reduce_sum(unit * tf.constant(reference[None], tf.float32), axis=1)
    grads = tape.gradient(target, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam: np.ndarray = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1))[0].numpy()
    peak = float(cam.max())
    return cam / peak if peak > 0 else cam


def overlay(photo: Image.Image, cam: np.ndarray) -> Image.Image:
    """The heat map, resized to the photo, blended over it."""
    scale = min(1.0, MAX_OVERLAY_SIDE / max(photo.size))
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    base = np.asarray(photo.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    heat = Image.fromarray(cam.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR)
    colours = jet(np.asarray(heat))
    blended = (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * colours
    return Image.fromarray(np.clip(blended * 255, 0, 255).astype(np.uint8), "RGB")


def _embedding(model: keras.Model, pixels: np.ndarray) -> np.ndarray:
    from training.model import embedding_submodel

    e = embedding_submodel(model)(pixels[None], training=False).numpy()[0]
    result: np.ndarray = e / max(float(np.linalg.norm(e)), 1e-12)
    return result


def write_overlays(
    model_path: Path, photos: list[Path], out: Path, *, reference: Path | None = None
) -> list[Path]:
    """One ``<name>.gradcam.png`` per photo under ``out``."""
    from service.imaging import decode_photo

    model = load_model(model_path)
    spec: Preprocessing = preprocessing_of(model, find_summary(model_path))
    ref = _embedding(model, prepare(reference.read_bytes(), spec)) if reference else None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in photos:
        data = path.read_bytes()
        cam = heatmap(model, prepare(data, spec), ref)
        picture = decode_photo(data, max_pixels=MAX_PIXELS).image
        target = out / f"{path.stem}.gradcam.png"
        overlay(picture, cam).save(target)
        written.append(target)
    return written
