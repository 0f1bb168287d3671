"""Where the pixels of a decoded photo come from: crops on the reduced-size JPEG path and the
EXIF orientations that swap width and height."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.imaging import decode_photo
from tests.toy import encode

LIMIT = 50_000_000
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def gradient(width: int, height: int) -> Image.Image:
    """Red grows with x, green with y: every region of the photo has its own colour."""
    xs = np.linspace(0, 255, width, dtype=np.float32)[np.newaxis, :]
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, np.newaxis]
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.broadcast_to(xs, (height, width)).astype(np.uint8)
    pixels[..., 1] = np.broadcast_to(ys, (height, width)).astype(np.uint8)
    pixels[..., 2] = 90
    return Image.fromarray(pixels)


@pytest.mark.parametrize("bbox", [(1200, 900, 640, 560), (64, 1000, 900, 400), (0, 0, 520, 520)])
def test_crop_on_the_reduced_jpeg_path_returns_the_region_asked_for(
    bbox: tuple[int, int, int, int],
) -> None:
    data = encode(gradient(2000, 1600), "JPEG", quality=95)
    full = decode_photo(data, max_pixels=LIMIT, bbox=bbox)
    reduced = decode_photo(data, max_pixels=LIMIT, target_size=64, bbox=bbox)
    # The reduced path decodes at a smaller DCT scale: fewer pixels, same region.
    assert reduced.image.width < full.image.width
    assert abs(reduced.image.width / reduced.image.height - bbox[2] / bbox[3]) < 0.05
    expected = np.asarray(full.image.resize(reduced.image.size, Image.Resampling.BOX), np.float32)
    got = np.asarray(reduced.image, np.float32)
    # Mean colour says where the crop came from (red = x, green = y); corners pin its edges.
    assert np.abs(got.mean(axis=(0, 1)) - expected.mean(axis=(0, 1))).max() < 3
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert np.abs(got[corner] - expected[corner]).max() < 12, corner


def quadrants(width: int = 80, height: int = 40) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = RED
    pixels[: height // 2, width // 2 :] = GREEN
    pixels[height // 2 :, : width // 2] = BLUE
    pixels[height // 2 :, width // 2 :] = WHITE
    return Image.fromarray(pixels)


def colour_at(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in np.asarray(image)[y, x])
    return min(
        (RED, GREEN, BLUE, WHITE),
        key=lambda c: sum(abs(a - b) for a, b in zip(c, (r, g, b), strict=True)),
    )


# Raw photo 80x40: red top-left, green top-right, blue bottom-left, white bottom-right.
# Orientation 5 (transpose): displayed (x, y) shows raw (y, x).
# Orientation 7 (transverse): displayed (x, y) shows raw (79 - y, 39 - x).
@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (5, {(30, 10): BLUE, (5, 60): GREEN, (5, 10): RED, (30, 60): WHITE}),
        (7, {(5, 10): WHITE, (30, 60): RED, (30, 10): GREEN, (5, 60): BLUE}),
    ],
)
def test_exif_orientations_5_and_7_swap_width_and_height(
    orientation: int, expected: dict[tuple[int, int], tuple[int, int, int]]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(quadrants(), "JPEG", exif=exif, quality=95)
    decoded = decode_photo(data, max_pixels=LIMIT)
    assert (decoded.width, decoded.height) == (40, 80)
    assert decoded.image.size == (40, 80)
    for (x, y), colour in expected.items():
        assert colour_at(decoded.image, x, y) == colour, (x, y)
    # A crop box is given in displayed coordinates: the lower part exists only after the swap.
    crop = decode_photo(data, max_pixels=LIMIT, bbox=(0, 50, 40, 30))
    assert crop.image.size == (40, 30)


def test_a_crop_may_start_at_the_origin_and_must_fit_vertically_too() -> None:
    from service.errors import BadBoundingBox
    from service.imaging import parse_bbox

    assert parse_bbox("0,0,5,5") == (0, 0, 5, 5)
    data = encode(quadrants(), "PNG")
    assert decode_photo(data, max_pixels=LIMIT, bbox=(0, 0, 80, 40)).image.size == (80, 40)
    with pytest.raises(BadBoundingBox, match="outside the 80x40 photo"):
        decode_photo(data, max_pixels=LIMIT, bbox=(0, 30, 20, 20))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_every_pixel_mode_arrives_as_rgb(mode: str) -> None:
    image = quadrants().convert(mode)
    decoded = decode_photo(encode(image, "PNG"), max_pixels=LIMIT)
    assert decoded.image.mode == "RGB" and decoded.image.size == (80, 40)
