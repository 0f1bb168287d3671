"""Model input in TensorFlow: the twin of ``service.photos.to_model_input``, and §3.2 augmentation.

The service's ``Preprocessing`` is the one description of the input. Here it is implemented with
tf ops so that it runs inside tf.data (on TPU hosts too): resize as Pillow does (bilinear with an
antialiasing kernel; letterbox pads with black), quantise to 8 bits as Pillow's resized image is,
then scale the pixels. A photo already at the input size is not resampled, so for such photos the
tensors equal the service's bit for bit.
"""

from __future__ import annotations

import tensorflow as tf

from service.contract import Preprocessing
from service.photos import IMAGENET_MEAN, IMAGENET_STD
from training.config import Augmentation

_DRAFT_RATIOS = (1, 2, 4, 8)


def _draft_index(data: tf.Tensor, target_size: int) -> tf.Tensor:
    """Which JPEG DCT scaling (1, 2, 4, 8: an index into ``_DRAFT_RATIOS``) ``decode_photo``
    gets from Pillow's ``draft``: when the shorter side exceeds twice the target, the largest
    reduction that keeps at least ``ceil(side * target / shorter side)`` pixels on both sides."""
    shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.float64)
    h, w = shape[0], shape[1]
    region = tf.minimum(h, w)
    factor = target_size / region
    scale = tf.minimum(w // tf.math.ceil(w * factor), h // tf.math.ceil(h * factor))
    index = tf.where(scale >= 8, 3, tf.where(scale >= 4, 2, tf.where(scale >= 2, 1, 0)))
    return tf.where(region > 2 * target_size, index, 0)


def _decode_jpeg(data: tf.Tensor, target_size: int | None) -> tf.Tensor:
    def at(ratio: int) -> tf.Tensor:
        return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE", ratio=ratio)

    if target_size is None:
        return at(1)
    branches = [lambda r=r: at(r) for r in _DRAFT_RATIOS]
    return tf.switch_case(_draft_index(data, target_size), branches)


def decode(data: tf.Tensor, target_size: int | None = None) -> tf.Tensor:
    """JPEG/PNG bytes -> uint8 HxWx3 (greyscale is replicated to RGB, alpha dropped), decoded as
    ``service.photos.decode_photo`` decodes them, bit for bit.

    JPEGs use the accurate integer DCT and fancy chroma upsampling (libjpeg's defaults, which
    Pillow uses; TensorFlow's default fast DCT is off by about one level), and with
    ``target_size`` the same DCT-domain reduction the service's ``draft`` decoding applies to
    large photos.
    """
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: _decode_jpeg(data, target_size),
        lambda: tf.io.decode_png(data, channels=3),
    )
    image.set_shape([None, None, 3])
    return image


def _quantise(image: tf.Tensor) -> tf.Tensor:
    return tf.round(tf.clip_by_value(image, 0.0, 255.0))


def _letterbox(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    scale = size / tf.maximum(h, w)
    new_h = tf.maximum(1, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(1, tf.cast(tf.round(w * scale), tf.int32))
    fitted = _quantise(tf.image.resize(image, [new_h, new_w], "bilinear", antialias=True))
    return tf.image.pad_to_bounding_box(
        fitted, (size - new_h) // 2, (size - new_w) // 2, size, size
    )


def resize(image: tf.Tensor, spec: Preprocessing) -> tf.Tensor:
    """float32 0-255 HxWx3 -> float32 0-255 SxSx3 on the 8-bit grid, as Pillow would give it."""
    size = spec.input_size
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))

    def resample() -> tf.Tensor:
        if spec.resize == "letterbox":
            return _letterbox(image, size)
        return tf.image.resize(image, [size, size], "bilinear", antialias=True)

    resized = tf.cond(same, lambda: image, resample)
    resized = _quantise(resized)
    resized.set_shape([size, size, 3])
    return resized


def scale_pixels(image: tf.Tensor, spec: Preprocessing) -> tf.Tensor:
    """0-255 pixels -> the model's pixel range, with the service's constants."""
    if spec.pixel_range == "0-1":
        return image / 255.0
    if spec.pixel_range == "imagenet":
        return (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return image


def model_input(image: tf.Tensor, spec: Preprocessing) -> tf.Tensor:
    """uint8 HxWx3 (from ``decode(data, spec.input_size)``) -> float32 model input, no
    augmentation: the TF twin of ``to_model_input``."""
    return scale_pixels(resize(tf.cast(image, tf.float32), spec), spec)


def _random_crop(image: tf.Tensor, aug: Augmentation, seed: tf.Tensor) -> tf.Tensor:
    shape = tf.shape(image)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=aug.crop_aspect,
        area_range=(aug.crop_min_area, 1.0),
        max_attempts=20,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.slice(image, begin, extent)


def _colour(x: tf.Tensor, aug: Augmentation, seeds: tf.Tensor) -> tf.Tensor:
    """Hue, saturation, contrast and brightness jitter, then sometimes grayscale; x in 0-1.
    ``seeds``: five stateless seeds, one per draw."""
    if aug.hue > 0:
        x = tf.image.stateless_random_hue(x, aug.hue, seeds[0])
    if aug.saturation[0] < aug.saturation[1]:
        x = tf.image.stateless_random_saturation(x, *aug.saturation, seed=seeds[1])
    if aug.contrast[0] < aug.contrast[1]:
        x = tf.image.stateless_random_contrast(x, *aug.contrast, seed=seeds[2])
    if aug.brightness > 0:
        x = tf.image.stateless_random_brightness(x, aug.brightness, seeds[3])
    x = tf.clip_by_value(x, 0.0, 1.0)
    if aug.grayscale > 0:
        grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))
        x = tf.where(tf.random.stateless_uniform([], seeds[4]) < aug.grayscale, grey, x)
    return x


def augmented_input(
    image: tf.Tensor, spec: Preprocessing, aug: Augmentation, seed: tf.Tensor
) -> tf.Tensor:
    """uint8 HxWx3 -> float32 model input with §3.2 augmentation (training only).

    ``seed`` (shape [2], integers) determines every random draw: stateless ops, so the same
    photo and seed give the same tensor whatever the order in which tf.data's parallel map
    calls run (stateful random ops there draw in thread-timing order, and training would
    not repeat)."""
    if not aug.enabled:
        return model_input(image, spec)
    crop, flip, *colour = tf.unstack(tf.random.experimental.stateless_split(seed, 7))
    x = tf.cast(image, tf.float32)
    if aug.crop_min_area < 1.0:
        x = _random_crop(x, aug, crop)
    x = _colour(resize(x, spec) / 255.0, aug, tf.stack(colour))
    if aug.hflip:
        x = tf.image.stateless_random_flip_left_right(x, flip)
    return scale_pixels(x * 255.0, spec)
