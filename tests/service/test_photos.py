"""Decoding uploads: formats, EXIF orientation, crops, limits, and model input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.errors import BadBoundingBox, PhotoTooLarge, UnreadablePhoto, UnsupportedPhoto
from service.imaging import Preprocessing, decode_photo, keepsake, parse_bbox, to_model_input
from tests.toy import encode, photo

LIMIT = 50_000_000


def two_tone(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    ("fmt", "media_type"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_accepted_formats(fmt: str, media_type: str) -> None:
    decoded = decode_photo(encode(photo(1, 1), fmt), max_pixels=LIMIT)
    assert decoded.media_type == media_type
    assert decoded.image.mode == "RGB" and decoded.image.size == (64, 64)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(two_tone(80, 40), "JPEG", exif=exif, quality=95)
    decoded = decode_photo(data, max_pixels=LIMIT)
    assert decoded.image.size == (40, 80)
    assert (decoded.width, decoded.height) == (40, 80)
    top = np.asarray(decoded.image)[5, 20]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top


def test_bbox_crops_in_displayed_coordinates() -> None:
    decoded = decode_photo(encode(two_tone(100, 50)), max_pixels=LIMIT, bbox=(60, 10, 30, 20))
    assert decoded.image.size == (30, 20)
    assert np.all(np.asarray(decoded.image)[..., 2] == 255)


def test_bbox_outside_the_photo_is_refused() -> None:
    with pytest.raises(BadBoundingBox, match="outside the 100x50 photo"):
        decode_photo(encode(two_tone(100, 50)), max_pixels=LIMIT, bbox=(80, 0, 30, 20))


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "0,0,0,10", "-1,0,5,5"])
def test_malformed_bbox_is_refused(text: str) -> None:
    with pytest.raises(BadBoundingBox):
        parse_bbox(text)


def test_empty_upload() -> None:
    with pytest.raises(UnreadablePhoto, match="empty"):
        decode_photo(b"", max_pixels=LIMIT)


def test_not_an_image() -> None:
    with pytest.raises(UnsupportedPhoto, match="not an image"):
        decode_photo(b"%PDF-1.4 definitely not a photo", max_pixels=LIMIT)


def test_unsupported_format_is_named() -> None:
    with pytest.raises(UnsupportedPhoto, match="GIF"):
        decode_photo(encode(photo(1, 1), "GIF"), max_pixels=LIMIT)


def test_truncated_jpeg() -> None:
    data = encode(photo(1, 1, size=256), "JPEG")
    with pytest.raises(UnreadablePhoto, match="truncated"):
        decode_photo(data[: len(data) // 2], max_pixels=LIMIT)


def test_pixel_limit_stops_decompression_bombs() -> None:
    # A 4000x4000 PNG of one colour is tiny on disk but 16 MP decoded.
    bomb = encode(Image.new("RGB", (4000, 4000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(PhotoTooLarge, match="over the limit"):
        decode_photo(bomb, max_pixels=1_000_000)


@pytest.mark.slow
def test_large_jpeg_is_decoded_reduced_but_not_below_target() -> None:
    data = encode(photo(3, 1, size=2048), "JPEG", quality=90)
    decoded = decode_photo(data, max_pixels=LIMIT, target_size=380)
    assert 380 <= min(decoded.image.size) < 2048
    assert (decoded.width, decoded.height) == (2048, 2048)
    cropped = decode_photo(data, max_pixels=LIMIT, target_size=380, bbox=(0, 0, 1024, 1024))
    assert min(cropped.image.size) >= 380


def test_photo_at_input_size_is_not_resampled() -> None:
    image = photo(2, 2, size=32)
    pixels = to_model_input(image, Preprocessing(32))
    assert pixels.dtype == np.float32
    assert np.array_equal(pixels, np.asarray(image, np.float32))


def test_pixel_ranges_and_letterbox() -> None:
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    unit = to_model_input(image, Preprocessing(16, "stretch", "0-1"))
    assert unit.shape == (16, 16, 3) and unit.max() == pytest.approx(1.0)
    boxed = to_model_input(image, Preprocessing(16, "letterbox", "0-255"))
    assert boxed[0, 8].sum() == 0 and boxed[8, 8].min() == 255  # black bars above and below
    net = to_model_input(image, Preprocessing(16, "stretch", "imagenet"))
    assert net[0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_an_original_is_kept_only_up_to_three_bytes_a_pixel_and_64_kib() -> None:
    """A small query photo is stored as sent, unless it carries more than its pixels need
    (3 bytes each, plus 64 KiB for headers and metadata): then it is re-encoded, so nothing
    appended to an image is kept."""
    png = encode(photo(1, 1), "PNG")
    w, h = decode_photo(png, max_pixels=LIMIT).image.size
    bound = w * h * 3 + 64 * 1024
    for size, kept_as_sent in ((bound, True), (bound + 1, False)):
        padded = png + b"\0" * (size - len(png))  # after the PNG's end: readers ignore it
        kept = keepsake(padded, decode_photo(padded, max_pixels=LIMIT), max_side=w, cropped=False)
        assert (kept.data == padded) is kept_as_sent, size
        assert kept.photo.image.size == (w, h) and len(kept.data) <= bound
