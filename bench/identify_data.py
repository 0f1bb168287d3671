"""The synthetic inputs of ``bench/identify.py``: galleries of embeddings clustered like a
photo-ID catalogue, and the ~3-megapixel query JPEG (each upload a fresh variant of it)."""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from bench.identify_records import (
    DIM,
    ISO_NOISE,
    JPEG_NOISE,
    JPEG_QUALITY,
    JPEG_SIZE,
    LATENT_DIM,
    N_SPECIES,
    PHOTO_NOISE,
    PHOTOS_PER_INDIVIDUAL,
    POSE_NOISE,
    SPECIES_WEIGHT,
)


@dataclass
class Synthetic:
    """A synthetic gallery: unit vectors, the individual of each, and fresh query photos of
    individuals that are in the gallery."""

    structure: str
    vectors: np.ndarray
    owners: np.ndarray
    species: np.ndarray  # species index of each individual
    queries: np.ndarray
    query_owners: np.ndarray

    @property
    def n_individuals(self) -> int:
        return len(self.species)

    def label(self, position: int) -> str:
        return f"ind-{int(self.owners[position]):07d}"


def _unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return out.astype(np.float32, copy=False)


def synthetic_gallery(n: int, n_queries: int, *, structure: str, seed: int = 0) -> Synthetic:
    """``n`` photo embeddings of ``n / 3.3`` individuals, clustered like a photo-ID gallery.

    ``lowrank`` (the realistic case): 30 species centres and per-individual centres in a
    64-dimensional latent space (an individual = 0.5 species + 0.87 own direction), a photo = its
    individual's centre + pose noise (norm 0.5) in that space, mapped into 512 dimensions by a
    random orthonormal basis, + isotropic noise (norm 0.15), L2-normalised. Learnt embeddings have
    a far lower intrinsic dimension than their width; this is what makes IVF work on them.

    ``isotropic`` (the stress case): individuals = random unit centres in all 512 dimensions,
    photo = centre + 0.6 * random unit direction, renormalised. Apart from a photo's own
    individual, its neighbours are then random points: the worst case for any partitioning index.
    """
    rng = np.random.default_rng(seed)
    n_ind = max(1, round(n / PHOTOS_PER_INDIVIDUAL))
    species = rng.integers(0, N_SPECIES, n_ind)
    if structure == "lowrank":
        basis = np.linalg.qr(rng.standard_normal((DIM, LATENT_DIM)))[0].astype(np.float32)
        species_centres = _unit(rng.standard_normal((N_SPECIES, LATENT_DIM), dtype=np.float32))
        own = _unit(rng.standard_normal((n_ind, LATENT_DIM), dtype=np.float32))
        centres = _unit(
            SPECIES_WEIGHT * species_centres[species] + math.sqrt(1 - SPECIES_WEIGHT**2) * own
        )

        def photos(owners: np.ndarray) -> np.ndarray:
            pose = _unit(rng.standard_normal((len(owners), LATENT_DIM), dtype=np.float32))
            latent = _unit(centres[owners] + POSE_NOISE * pose)
            iso = _unit(rng.standard_normal((len(owners), DIM), dtype=np.float32))
            return _unit(latent @ basis.T + ISO_NOISE * iso)

    elif structure == "isotropic":
        centres = _unit(rng.standard_normal((n_ind, DIM), dtype=np.float32))

        def photos(owners: np.ndarray) -> np.ndarray:
            noise = _unit(rng.standard_normal((len(owners), DIM), dtype=np.float32))
            return _unit(centres[owners] + PHOTO_NOISE * noise)

    else:
        raise ValueError(f"unknown structure {structure!r}")
    owners = rng.integers(0, n_ind, n)
    vectors = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        vectors[start : start + 100_000] = photos(owners[start : start + 100_000])
    query_owners = owners[rng.integers(0, n, n_queries)]
    return Synthetic(structure, vectors, owners, species, photos(query_owners), query_owners)


def make_jpeg(size: tuple[int, int] = JPEG_SIZE, seed: int = 0) -> bytes:
    """A ~1 MB, 3-megapixel JPEG with photo-like content: a sky/sea gradient, shapes, and sensor
    noise (noise is what makes real photos large and slow to decode)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [40 + 80 * xx / w + 30 * yy / h, 70 + 60 * yy / h, 110 + 90 * (1 - yy / h)], axis=-1
    )
    image = PILImage.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(20, 400)), y0 + int(rng.integers(20, 300)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, JPEG_NOISE, (h, w, 3))
    image = PILImage.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def downscaled(jpeg: bytes, size: tuple[int, int]) -> bytes:
    """The photo as a client would send it after resizing it itself (Lanczos, same quality)."""
    buf = io.BytesIO()
    with PILImage.open(io.BytesIO(jpeg)) as image:
        image.resize(size, PILImage.Resampling.LANCZOS).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def unique_variant(jpeg: bytes, n: int) -> bytes:
    """The same photo with a JPEG comment segment holding ``n``: new bytes (so a new stored photo
    and database row, as with real traffic) but identical pixels and decode cost."""
    payload = f"whaleid bench request {n}".encode()
    segment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


_counter = 0
_counter_lock = threading.Lock()


def next_variant(jpeg: bytes) -> bytes:
    """The next fresh upload of ``jpeg`` (a new comment segment: a new photo, same pixels)."""
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return unique_variant(jpeg, n)
