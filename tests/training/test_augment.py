"""The TF model input agrees with the service's preprocessing; augmentation does what §3.2 says."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from service.contract import Preprocessing  # noqa: E402
from service.photos import decode_photo, to_model_input  # noqa: E402
from training.augment import augmented_input, decode, model_input  # noqa: E402
from training.config import Augmentation  # noqa: E402
from training.data import upright_bytes  # noqa: E402
from training.synthetic import Renderer, make_individual  # noqa: E402


def photo_bytes(size: tuple[int, int], fmt: str, seed: int = 0, **save: object) -> bytes:
    ind = make_individual("bottlenose_dolphin", seed, 1)
    image = Renderer(max(size)).photo(ind, seed, 1, 0).resize(size)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def both(data: bytes, spec: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    served = to_model_input(
        decode_photo(data, max_pixels=10**8, target_size=spec.input_size).image, spec
    )
    trained = model_input(decode(tf.constant(upright_bytes(data)), spec.input_size), spec).numpy()
    return trained, served


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("pixel_range", ["0-255", "0-1", "imagenet"])
@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_bit_exact_at_the_input_size(fmt: str, pixel_range: str, resize: str) -> None:
    spec = Preprocessing(40, resize, pixel_range)  # type: ignore[arg-type]
    trained, served = both(photo_bytes((40, 40), fmt), spec)
    assert trained.dtype == served.dtype == np.float32
    assert np.array_equal(trained, served)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize("size", [(150, 90), (23, 31), (640, 480)])
def test_within_one_level_when_resampled(resize: str, size: tuple[int, int]) -> None:
    spec = Preprocessing(48, resize)  # type: ignore[arg-type]
    trained, served = both(photo_bytes(size, "JPEG", quality=90), spec)
    assert trained.shape == served.shape == (48, 48, 3)
    diff = np.abs(trained - served)
    assert diff.max() <= 1.0 and diff.mean() < 0.3
    if resize == "letterbox" and size[0] > size[1]:
        assert np.all(trained[0] == 0) and np.all(served[0] == 0)  # black bars top and bottom


def test_exif_rotated_photos_are_stored_upright() -> None:
    image = Image.new("RGB", (60, 20), (200, 30, 30))
    image.paste((20, 200, 20), (0, 0, 10, 20))  # a green stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    data = buf.getvalue()
    upright = upright_bytes(data)
    assert upright != data and upright.startswith(b"\x89PNG")
    decoded = decode(tf.constant(upright)).numpy()
    assert decoded.shape == (60, 20, 3)  # portrait, as displayed
    expected = np.asarray(decode_photo(data, max_pixels=10**6).image)
    assert np.array_equal(decoded, expected)
    plain = photo_bytes((30, 30), "JPEG")
    assert upright_bytes(plain) is plain  # nothing to do: the file is used as it is


def seed(n: int) -> tf.Tensor:
    """The stateless seed training gives the n-th example of a run with seed 0."""
    return tf.constant([0, n], tf.int64)


def test_augmentation_varies_within_range() -> None:
    spec = Preprocessing(32)
    image = decode(tf.constant(photo_bytes((64, 64), "PNG")))
    aug = Augmentation()
    outs = np.stack([augmented_input(image, spec, aug, seed(n)).numpy() for n in range(6)])
    assert outs.shape == (6, 32, 32, 3)
    assert outs.min() >= 0.0 and outs.max() <= 255.0
    assert np.std(outs, axis=0).mean() > 1.0  # random crops and colours differ
    clean = model_input(image, spec).numpy()
    disabled = augmented_input(image, spec, Augmentation(enabled=False), seed(0)).numpy()
    assert np.array_equal(disabled, clean)
    again = augmented_input(image, spec, aug, seed(3)).numpy()
    assert np.array_equal(again, outs[3])  # the seed alone decides: stateless draws


def test_grayscale_and_flip() -> None:
    spec = Preprocessing(32, pixel_range="0-1")
    image = decode(tf.constant(photo_bytes((32, 32), "PNG")))
    grey = Augmentation(
        crop_min_area=1.0, hue=0, saturation=(1, 1), contrast=(1, 1), brightness=0, grayscale=1.0
    )
    out = augmented_input(image, spec, grey, seed(0)).numpy()
    assert np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 1], out[..., 2])
    assert out.max() <= 1.0
    flips = Augmentation(
        crop_min_area=1.0,
        hue=0,
        saturation=(1, 1),
        contrast=(1, 1),
        brightness=0,
        grayscale=0,
        hflip=True,
    )
    clean = model_input(image, spec).numpy()
    seen = {
        "same" if np.allclose(o, clean) else "flipped" if np.allclose(o, clean[:, ::-1]) else "?"
        for o in (augmented_input(image, spec, flips, seed(n)).numpy() for n in range(12))
    }
    assert seen == {"same", "flipped"}
