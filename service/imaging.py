"""Decoding uploaded photos and turning them into model input, as the model's metadata says."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from service.contract import PixelRange, Preprocessing, Resize
from service.errors import BadBoundingBox, PhotoTooLarge, UnreadablePhoto, UnsupportedPhoto

try:  # HEIC from iPhones, when the optional extra is installed
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIC = True
except ImportError:  # pragma: no cover - depends on the install
    HEIC = False

# Pillow allocates pixels in blocks (16 MiB by default), which glibc serves from per-thread
# arenas that keep freed memory: a worker whose threads each decoded a large photo once would hold
# it all. Blocks above glibc's largest mmap threshold (32 MiB) are mapped and returned on release.
Image.core.set_block_size(64 * 1024 * 1024)  # type: ignore[attr-defined]

ACCEPTED_FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "HEIF": "image/heic",
}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_PIXELS = re.compile(r"-?\d{1,9}(\.\d{1,6})?")
# EXIF orientations 5-8 rotate by 90 degrees: width and height swap.
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass(frozen=True)
class Photo:
    """A decoded upload: RGB pixels (possibly reduced and cropped) and facts about the file."""

    image: Image.Image
    format: str
    media_type: str
    width: int
    height: int


def parse_bbox(text: str | None) -> tuple[int, int, int, int] | None:
    """``"x,y,w,h"`` in pixels of the photo as displayed (after EXIF orientation)."""
    if text is None or not text.strip():
        return None
    parts = text.split(",")
    # Plain decimals of at most 9 digits: no inf, nan, exponents or numbers of any length.
    if len(parts) != 4 or not all(_PIXELS.fullmatch(p.strip()) for p in parts):
        shown = text if len(text) <= 60 else text[:60] + "…"
        raise BadBoundingBox(
            f"bbox {shown!r} is not four numbers of at most 9 digits: send bbox=x,y,w,h in "
            "pixels, e.g. 10,20,300,200"
        )
    x, y, w, h = (int(float(p)) for p in parts)
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise BadBoundingBox(f"bbox {text!r} needs x,y >= 0 and a positive width and height")
    return x, y, w, h


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make the photo unusable
        return 1


def open_photo(data: bytes, *, max_pixels: int) -> Image.Image:
    """The photo's header, read and checked (an accepted format, at most ``max_pixels``); its
    pixels are not decoded yet. Raises ``PhotoError`` saying what is wrong."""
    if not data:
        raise UnreadablePhoto("the upload is empty (0 bytes): attach the photo file")
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise PhotoTooLarge(f"the photo has too many pixels: {e}") from e
    except Exception as e:
        raise UnsupportedPhoto(
            "the upload is not an image we can decode: send a JPEG, PNG, WebP"
            + (" or HEIC" if HEIC else "")
            + " photo"
        ) from e
    fmt = image.format or "unknown"
    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedPhoto(
            f"photos in {fmt} format are not accepted: convert it to JPEG, PNG or WebP"
        )
    raw_w, raw_h = image.size
    if raw_w * raw_h > max_pixels:
        raise PhotoTooLarge(
            f"the photo is {raw_w}x{raw_h} = {raw_w * raw_h} pixels, over the limit of "
            f"{max_pixels}: downscale it before uploading"
        )
    return image


def decode_photo(
    data: bytes,
    *,
    max_pixels: int,
    target_size: int | None = None,
    bbox: tuple[int, int, int, int] | None = None,
) -> Photo:
    """Decode, apply EXIF orientation, crop to ``bbox`` and convert to RGB.

    With ``target_size``, JPEGs are decoded at the smallest DCT scale that still gives the crop at
    least ``target_size`` pixels on each side, which makes large photos several times cheaper.
    """
    image = open_photo(data, max_pixels=max_pixels)
    fmt = image.format or "unknown"
    raw_w, raw_h = image.size
    orientation = _orientation(image)
    shown_w, shown_h = (raw_h, raw_w) if orientation in _SWAPS_AXES else (raw_w, raw_h)
    if bbox is not None:
        x, y, w, h = bbox
        if x + w > shown_w or y + h > shown_h:
            raise BadBoundingBox(
                f"bbox {x},{y},{w},{h} falls outside the {shown_w}x{shown_h} photo: "
                "give x,y,w,h inside it"
            )
    region = min(bbox[2], bbox[3]) if bbox else min(shown_w, shown_h)
    if target_size and fmt in ("JPEG", "MPO") and region > 2 * target_size:
        factor = target_size / region
        image.draft("RGB", (math.ceil(raw_w * factor), math.ceil(raw_h * factor)))
    try:
        image.load()
        # In place: a copy of a 60-megapixel photo would double the decode's memory.
        ImageOps.exif_transpose(image, in_place=True)
    except Image.DecompressionBombError as e:
        raise PhotoTooLarge(f"the photo has too many pixels: {e}") from e
    except Exception as e:
        raise UnreadablePhoto(
            f"the photo could not be decoded ({e}): it is truncated or corrupt; upload the "
            "complete file"
        ) from e
    if bbox is not None:
        scale = image.size[0] / shown_w
        x, y, w, h = bbox
        image = image.crop(
            (round(x * scale), round(y * scale), round((x + w) * scale), round((y + h) * scale))
        )
    if image.mode != "RGB":
        image = image.convert("RGB")
    return Photo(image, fmt, ACCEPTED_FORMATS[fmt], shown_w, shown_h)


@dataclass(frozen=True)
class Keepsake:
    """What is stored of a query photo: its bytes and what they show."""

    data: bytes
    photo: Photo


# An original is kept byte for byte only if it carries no more than this per pixel (a JPEG of a
# photo needs well under one byte; anything appended to the image would not fit).
_KEPT_BYTES_PER_PIXEL = 3
_KEPT_OVERHEAD = 64 * 1024


def kept_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The pixels of a decoded photo of ``size`` as ``keepsake`` keeps it: its longer side at
    most ``max_side``."""
    w, h = size
    if max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def keepsake(
    data: bytes, photo: Photo, *, max_side: int, cropped: bool, quality: int = 92
) -> Keepsake:
    """What identification needs of a query photo, bounded: the original when it is already
    small (not cropped, longer side at most ``max_side``, at most 3 bytes per pixel, not HEIC),
    else the region the model saw, its longer side at most ``max_side``, re-encoded (PNG stays
    lossless PNG, anything else becomes JPEG)."""
    w, h = photo.image.size
    if (
        not cropped
        and photo.format != "HEIF"
        and (w, h) == (photo.width, photo.height)
        and max(w, h) <= max_side
        and len(data) <= w * h * _KEPT_BYTES_PER_PIXEL + _KEPT_OVERHEAD
    ):
        return Keepsake(data, photo)
    image = photo.image
    size = kept_size((w, h), max_side)
    if size != (w, h):
        image = image.resize(size, Image.Resampling.LANCZOS)
    fmt = "PNG" if photo.format == "PNG" else "JPEG"
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    kept = Photo(image, fmt, ACCEPTED_FORMATS[fmt], image.width, image.height)
    return Keepsake(out.getvalue(), kept)


def to_model_input(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """HWC float32 pixels as the model wants them. A photo already at the input size is not
    resampled, so a model can be checked bit-for-bit."""
    size = spec.input_size
    if image.size != (size, size):
        if spec.resize == Resize.LETTERBOX:
            scale = size / max(image.size)
            fitted = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                Image.Resampling.BILINEAR,
            )
            canvas = Image.new("RGB", (size, size))
            canvas.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
            image = canvas
        else:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    if spec.pixel_range == PixelRange.UNIT:
        return pixels / 255.0
    if spec.pixel_range == PixelRange.IMAGENET:
        result: np.ndarray = (pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return result
    return pixels
