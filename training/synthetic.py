"""A synthetic photo-ID catalogue: procedurally rendered dorsal fins and flukes.

Each individual has a species-level body shape (a bottlenose dorsal fin or a humpback fluke) with
stable individual marks: trailing-edge notches, pigment patches (on flukes, a black-and-white
underside pattern) and scars. Each photo shows that body with a random pose, scale and framing,
on a sea background, under random lighting, with blur, sensor noise, partial occlusion by waves or
spray, and JPEG compression. Everything is deterministic by seed, so a catalogue can be rebuilt
anywhere instead of being shipped.

Only numpy and Pillow are needed (no TensorFlow): the serving virtualenv can write the demo gallery.

    whaleid-synthetic out/ --individuals 40 --photos 5 --queries 1 --unseen 5 --seed 7
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

# Species -> body plan. Happywhale spells species in snake case.
BODY_PLANS = {"bottlenose_dolphin": "fin", "humpback_whale": "fluke"}
SPECIES_CODES = {name: i for i, name in enumerate(BODY_PLANS)}
# The canonical body is drawn on a texture this many times the photo size, then resampled.
_SUPERSAMPLE = 2
CSV_COLUMNS = ("image", "species", "individual_id")

Point = tuple[float, float]


@dataclass(frozen=True)
class Notch:
    """A bite out of the trailing edge: position along it (0 = tip), depth and half-width."""

    at: float
    depth: float
    width: float
    rounded: bool


@dataclass(frozen=True)
class Patch:
    """A pigment patch: centre, radii and angle in body coordinates; tone added to the skin."""

    centre: Point
    radii: Point
    angle: float
    tone: float


@dataclass(frozen=True)
class Scar:
    """A healed scar or rake mark: a polyline in body coordinates, its width and tone."""

    points: tuple[Point, ...]
    width: float
    tone: float


@dataclass(frozen=True)
class Individual:
    """One animal: what stays the same in every photo of it."""

    individual_id: str
    species: str
    skin: float
    shape: tuple[float, ...]
    notches: tuple[Notch, ...]
    patches: tuple[Patch, ...]
    scars: tuple[Scar, ...]
    # Fluke underside pattern: Gaussian bumps (x, y, radius, weight) and the threshold level.
    pattern: tuple[tuple[float, float, float, float], ...] = ()
    pattern_level: float = 0.0

    @property
    def body_plan(self) -> str:
        return BODY_PLANS[self.species]


def individual_id(species: str, seed: int, index: int) -> str:
    """Catalogue id of a synthetic individual, e.g. ``fin-s7-0012``."""
    return f"{BODY_PLANS[species]}-s{seed}-{index:04d}"


def _rng(seed: int, species: str, index: int, photo: int | None = None) -> np.random.Generator:
    key = [seed, SPECIES_CODES[species], index]
    return np.random.default_rng(key if photo is None else [*key, 1 + photo])


def _bezier(p0: Point, p1: Point, p2: Point, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    a, b, c = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    result: np.ndarray = (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c
    return result


def _notched(edge: np.ndarray, notches: Sequence[Notch], interior: Point) -> np.ndarray:
    """Push the points of ``edge`` towards ``interior`` where the notches bite."""
    tangent = np.gradient(edge, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    inward = np.sign(np.sum((np.asarray(interior) - edge) * normal, axis=1, keepdims=True))
    t = np.linspace(0.0, 1.0, len(edge))
    depth = np.zeros(len(edge))
    for notch in notches:
        x = np.clip(1.0 - np.abs(t - notch.at) / notch.width, 0.0, 1.0)
        profile = np.sqrt(x) if notch.rounded else x
        depth = np.maximum(depth, notch.depth * profile)
    result: np.ndarray = edge + normal * inward * depth[:, None]
    return result


def _fin_outline(ind: Individual) -> np.ndarray:
    """Dorsal fin on the animal's back: leading edge, tip, notched trailing edge, then the back."""
    tip_x, tip_y, lead_x, lead_y, trail_x, trail_y = ind.shape
    base_left, base_right = (0.10, 0.90), (0.74, 0.90)
    tip = (0.70 + tip_x, 0.12 + tip_y)
    leading = _bezier(base_left, (0.30 + lead_x, 0.30 + lead_y), tip, 60)
    trailing = _bezier(tip, (0.58 + trail_x, 0.55 + trail_y), base_right, 120)
    trailing = _notched(trailing, ind.notches, (0.45, 0.70))
    back_rear = _bezier(base_right, (1.0, 0.89), (1.3, 0.98), 20)
    back_front = _bezier((-0.3, 0.98), (-0.05, 0.89), base_left, 20)
    below = np.asarray([(1.3, 1.2), (-0.3, 1.2)])
    return np.concatenate([leading, trailing[1:], back_rear[1:], below, back_front[:-1]])


def _fluke_outline(ind: Individual) -> np.ndarray:
    """Humpback fluke from behind, underside to the camera: notched trailing edge on top."""
    left_y, right_y, curl_l, curl_r, notch_depth, _ = ind.shape
    left_tip, right_tip = (0.03, 0.30 + left_y), (0.97, 0.30 + right_y)
    centre = (0.50, 0.36 + notch_depth)
    left = _bezier(left_tip, (0.26, 0.14 + curl_l), (0.47, 0.31), 90)
    right = _bezier((0.53, 0.31), (0.74, 0.14 + curl_r), right_tip, 90)
    trailing = np.concatenate([left, np.asarray([centre]), right])
    trailing = _notched(trailing, ind.notches, (0.5, 0.55))
    leading = np.concatenate(
        [
            _bezier(right_tip, (0.80, 0.56), (0.58, 0.62), 40),
            np.asarray([(0.56, 1.25), (0.44, 1.25)]),
            _bezier((0.42, 0.62), (0.20, 0.56), left_tip, 40),
        ]
    )
    return np.concatenate([trailing, leading])


def _outline(ind: Individual) -> np.ndarray:
    return _fin_outline(ind) if ind.body_plan == "fin" else _fluke_outline(ind)


def _inside(outline: np.ndarray, point: Point) -> bool:
    """Even-odd rule point-in-polygon test."""
    x, y = point
    xs, ys = outline[:, 0], outline[:, 1]
    xn, yn = np.roll(xs, -1), np.roll(ys, -1)
    crosses = (ys > y) != (yn > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = xs + (y - ys) * (xn - xs) / (yn - ys)
    return bool(np.count_nonzero(crosses & (x < at)) % 2)


def _points_inside(
    rng: np.random.Generator, outline: np.ndarray, n: int, box: tuple[float, float, float, float]
) -> list[Point]:
    x0, y0, x1, y1 = box
    points: list[Point] = []
    while len(points) < n:
        p = (float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)))
        if _inside(outline, p):
            points.append(p)
    return points


def _draw_notches(rng: np.random.Generator, count: int, span: tuple[float, float]) -> list[Notch]:
    return [
        Notch(
            at=float(rng.uniform(*span)),
            depth=float(rng.uniform(0.025, 0.07)),
            width=float(rng.uniform(0.02, 0.06)),
            rounded=bool(rng.random() < 0.5),
        )
        for _ in range(count)
    ]


def _draw_scars(rng: np.random.Generator, starts: list[Point]) -> list[Scar]:
    scars: list[Scar] = []
    for start in starts:
        angle = rng.uniform(0, math.pi)
        length = rng.uniform(0.08, 0.3)
        bend = rng.uniform(-0.3, 0.3)
        lines = int(rng.integers(1, 4))  # a rake mark is a few parallel lines
        spacing = rng.uniform(0.015, 0.03)
        width = float(rng.uniform(0.007, 0.014))
        tone = float(rng.uniform(55, 110))
        for k in range(lines):
            off = (k - (lines - 1) / 2) * spacing
            ox, oy = -math.sin(angle) * off, math.cos(angle) * off
            pts = []
            for s in np.linspace(0, 1, 6):
                a = angle + bend * (s - 0.5)
                pts.append(
                    (
                        float(start[0] + ox + math.cos(a) * length * (s - 0.5)),
                        float(start[1] + oy + math.sin(a) * length * (s - 0.5)),
                    )
                )
            scars.append(Scar(tuple(pts), width, tone))
    return scars


def make_individual(species: str, seed: int, index: int) -> Individual:
    """The stable marks of individual ``index`` of the catalogue ``seed``."""
    if species not in BODY_PLANS:
        raise ValueError(f"unknown species {species!r}: use one of {', '.join(BODY_PLANS)}")
    rng = _rng(seed, species, index)
    plan = BODY_PLANS[species]
    shape = tuple(float(v) for v in rng.uniform(-0.07, 0.07, size=6))
    stub = Individual(individual_id(species, seed, index), species, 0.0, shape, (), (), ())
    outline = _outline(stub)
    if plan == "fin":
        skin = float(rng.uniform(75, 125))
        notches = _draw_notches(rng, int(rng.integers(1, 5)), (0.08, 0.92))
        box = (0.15, 0.2, 0.8, 0.9)
        patch_tones = (-45.0, 70.0)
    else:
        skin = float(rng.uniform(25, 55))
        notches = _draw_notches(rng, int(rng.integers(2, 7)), (0.03, 0.97))
        box = (0.05, 0.2, 0.95, 0.6)
        patch_tones = (150.0, 190.0)
    patches = [
        Patch(
            centre=c,
            radii=(float(rng.uniform(0.035, 0.1)), float(rng.uniform(0.025, 0.07))),
            angle=float(rng.uniform(0, 180)),
            tone=float(rng.uniform(min(patch_tones), max(patch_tones)))
            * (1 if rng.random() < 0.7 else -0.6),
        )
        for c in _points_inside(rng, outline, int(rng.integers(2, 6)), box)
    ]
    scars = _draw_scars(rng, _points_inside(rng, outline, int(rng.integers(1, 4)), box))
    pattern: tuple[tuple[float, float, float, float], ...] = ()
    if plan == "fluke":
        pattern = tuple(
            (
                float(rng.uniform(0.05, 0.95)),
                float(rng.uniform(0.15, 0.65)),
                float(rng.uniform(0.04, 0.14)),
                float(rng.uniform(0.5, 1.0)),
            )
            for _ in range(int(rng.integers(4, 10)))
        )
    return Individual(
        stub.individual_id,
        species,
        skin,
        shape,
        tuple(notches),
        tuple(patches),
        tuple(scars),
        pattern,
        float(rng.uniform(0.25, 0.6)),
    )


def _to_px(points: Sequence[Point] | np.ndarray, size: int) -> list[Point]:
    return [(float(x) * size, float(y) * size) for x, y in points]


def _fluke_pattern(ind: Individual, size: int) -> np.ndarray:
    """The black-and-white underside of a fluke: a thresholded sum of Gaussian bumps in [0, 1]."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    field_ = np.zeros((size, size))
    for x, y, r, w in ind.pattern:
        field_ += w * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (r * r))
    result: np.ndarray = 1.0 / (1.0 + np.exp(-(field_ - ind.pattern_level) * 25.0))
    return result


@dataclass(frozen=True)
class Body:
    """An individual drawn in its canonical frame: RGB skin with marks, and its silhouette."""

    rgb: np.ndarray  # float32 HxWx3
    alpha: np.ndarray  # float32 HxW in [0, 1]


def render_body(ind: Individual, size: int) -> Body:
    """Skin, marks and silhouette on a ``size`` x ``size`` canonical texture."""
    ys = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    skin = np.full((size, size), ind.skin, dtype=np.float32) + 25.0 * (0.5 - ys)
    if ind.body_plan == "fluke":
        skin += _fluke_pattern(ind, size).astype(np.float32) * 180.0
    # Lighter and darker marks on two layers (Pillow blurs 8-bit layers only).
    light, dark = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
    for p in ind.patches:
        _ellipse(ImageDraw.Draw(light if p.tone > 0 else dark), p, size)
    light = light.filter(ImageFilter.GaussianBlur(size * 0.004))
    dark = dark.filter(ImageFilter.GaussianBlur(size * 0.004))
    draw = ImageDraw.Draw(light)
    for s in ind.scars:
        draw.line(_to_px(s.points, size), fill=round(s.tone), width=max(1, round(s.width * size)))
    marks = np.asarray(light, dtype=np.float32) - np.asarray(dark, dtype=np.float32)
    grey = np.clip(skin + marks, 0, 255)
    tint = np.array([0.96, 1.0, 1.06], dtype=np.float32)  # cetacean skin is slightly blue-grey
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(_to_px(_outline(ind), size), fill=255)
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32) / 255.0
    return Body(np.clip(grey[:, :, None] * tint, 0, 255), alpha)


def _ellipse(draw: ImageDraw.ImageDraw, patch: Patch, size: int) -> None:
    cx, cy = patch.centre
    rx, ry = patch.radii
    a = math.radians(patch.angle)
    pts = [
        (
            (cx + rx * math.cos(t) * math.cos(a) - ry * math.sin(t) * math.sin(a)) * size,
            (cy + rx * math.cos(t) * math.sin(a) + ry * math.sin(t) * math.cos(a)) * size,
        )
        for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)
    ]
    draw.polygon(pts, fill=min(255, round(abs(patch.tone))))


def _sea(rng: np.random.Generator, size: int) -> np.ndarray:
    """Open water: a colour gradient, wave ripples and a few glints; sometimes a sky band."""
    base = np.array(
        [rng.uniform(20, 70), rng.uniform(55, 110), rng.uniform(80, 140)], dtype=np.float32
    )
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.repeat(base[None, None, :], size, 0).repeat(size, 1)
    img *= (0.8 + 0.4 * ys)[:, :, None]
    waves = np.zeros((size, size), dtype=np.float32)
    for _ in range(5):
        angle = rng.uniform(-0.4, 0.4)
        freq = rng.uniform(8, 40)
        phase = rng.uniform(0, 2 * math.pi)
        waves += np.sin((math.sin(angle) * xs + math.cos(angle) * ys) * freq + phase).astype(
            np.float32
        )
    img += waves[:, :, None] * rng.uniform(3, 10)
    for _ in range(int(rng.integers(0, 30))):
        y, x = rng.integers(0, size, 2)
        img[max(0, y - 1) : y + 1, max(0, x - 2) : x + 2] += rng.uniform(40, 120)
    if rng.random() < 0.3:
        horizon = int(rng.uniform(0.05, 0.2) * size)
        sky = np.array([rng.uniform(150, 210), rng.uniform(170, 220), rng.uniform(190, 240)])
        img[:horizon] = sky.astype(np.float32)
    return img


def _vary(value: float, calm: float, variation: float) -> float:
    """``value`` pulled towards ``calm`` for easier photos (``variation`` < 1). The random draws
    stay the same, so a catalogue at variation 1 is identical whatever the code path."""
    return value if variation == 1.0 else calm + (value - calm) * variation


def _pose(
    rng: np.random.Generator, size: int, texture: int, variation: float = 1.0
) -> tuple[float, ...]:
    """The inverse affine map (photo pixel -> texture pixel) of a random pose and framing."""
    v = variation
    angle = math.radians(_vary(rng.uniform(-12, 12), 0.0, v))
    scale = _vary(rng.uniform(0.6, 0.95), 0.85, v) * size / texture
    yaw = _vary(rng.uniform(0.75, 1.0), 1.0, v)  # foreshortening when not side-on
    shear = _vary(rng.uniform(-0.12, 0.12), 0.0, v)
    cx = size / 2 + _vary(rng.uniform(-0.12, 0.12), 0.0, v) * size
    cy = size / 2 + _vary(rng.uniform(-0.1, 0.12), 0.0, v) * size
    # forward: texture -> photo = T(cx, cy) R(angle) S(scale*yaw, scale) Sh(shear) T(-centre)
    cos, sin = math.cos(angle), math.sin(angle)
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.diag([scale * yaw, scale])
    forward = forward @ np.array([[1.0, shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    centre = np.array([texture / 2, texture * 0.6])
    offset = centre - inverse @ np.array([cx, cy])
    return (
        inverse[0, 0],
        inverse[0, 1],
        offset[0],
        inverse[1, 0],
        inverse[1, 1],
        offset[1],
    )


def _waterline(rng: np.random.Generator, body: Body, plan: str) -> np.ndarray:
    """The silhouette with everything below a wavy waterline removed."""
    size = body.alpha.shape[0]
    xs = np.arange(size, dtype=np.float32) / size
    level = rng.uniform(0.9, 0.97) if plan == "fin" else rng.uniform(0.8, 0.98)
    line = level + 0.012 * np.sin(xs * rng.uniform(10, 30) + rng.uniform(0, 6.3))
    rows = np.arange(size, dtype=np.float32)[:, None] / size
    result: np.ndarray = body.alpha * (rows < line[None, :])
    return result


def _occlude(
    rng: np.random.Generator, img: np.ndarray, size: int, variation: float = 1.0
) -> np.ndarray:
    """A wave crest or spray in front of the animal, some of the time."""
    roll = rng.random()
    if roll < 0.3 * variation:  # a wave crest from the bottom
        layer = Image.new("L", (size, size), 0)
        top = rng.uniform(0.65, 0.85) * size
        pts = [(0.0, float(size))]
        for x in np.linspace(0, size, 9):
            pts.append((float(x), float(top + rng.uniform(-0.06, 0.06) * size)))
        pts.append((float(size), float(size)))
        ImageDraw.Draw(layer).polygon(pts, fill=255)
        a = np.asarray(layer.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)[..., None]
        colour = np.array([rng.uniform(30, 60), rng.uniform(70, 100), rng.uniform(90, 130)])
        img = img * (1 - a / 255) + colour.astype(np.float32) * (a / 255)
    elif roll < 0.5 * variation:  # spray
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        x0, y0 = rng.uniform(0.1, 0.9, 2) * size
        for _ in range(int(rng.integers(4, 12))):
            x, y = x0 + rng.normal(0, 0.08 * size), y0 + rng.normal(0, 0.05 * size)
            r = rng.uniform(0.02, 0.06) * size
            draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(120, 230)))
        a = np.asarray(layer.filter(ImageFilter.GaussianBlur(3)), dtype=np.float32)[..., None]
        img = img * (1 - a / 255) + 235.0 * (a / 255)
    return img


def _light(
    rng: np.random.Generator, img: np.ndarray, size: int, variation: float = 1.0
) -> np.ndarray:
    """Exposure, contrast, colour cast and a light gradient across the frame."""
    gain = _vary(rng.uniform(0.65, 1.3), 1.0, variation)
    contrast = _vary(rng.uniform(0.75, 1.2), 1.0, variation)
    cast = rng.uniform(0.92, 1.08, 3).astype(np.float32)
    if variation != 1.0:
        cast = 1.0 + (cast - 1.0) * variation
    mean = img.mean()
    img = (img - mean) * contrast + mean
    img = img * gain * cast
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    gradient = (math.cos(direction) * xs + math.sin(direction) * ys) * _vary(
        rng.uniform(0, 50), 0.0, variation
    )
    result: np.ndarray = img + gradient[:, :, None]
    return result


@dataclass
class Renderer:
    """Renders photos of individuals; caches each individual's canonical body."""

    size: int = 192
    variation: float = 1.0  # 1: field conditions; smaller: calmer poses and light (faster tests)
    _bodies: dict[str, Body] = field(default_factory=dict)

    def body(self, ind: Individual) -> Body:
        if ind.individual_id not in self._bodies:
            self._bodies[ind.individual_id] = render_body(ind, self.size * _SUPERSAMPLE)
        return self._bodies[ind.individual_id]

    def photo(self, ind: Individual, seed: int, index: int, shot: int) -> Image.Image:
        """Photo ``shot`` of individual ``index`` of catalogue ``seed``."""
        rng = _rng(seed, ind.species, index, shot)
        size = self.size
        body = self.body(ind)
        texture = body.alpha.shape[0]
        affine = _pose(rng, size, texture, self.variation)
        alpha = _waterline(rng, body, ind.body_plan)

        def warp(channel: np.ndarray) -> np.ndarray:
            image = Image.fromarray(channel.astype(np.float32), "F")
            warped = image.transform(
                (size, size), Image.Transform.AFFINE, affine, Image.Resampling.BILINEAR
            )
            return np.asarray(warped, dtype=np.float32)

        rgb = np.stack([warp(body.rgb[:, :, c]) for c in range(3)], axis=2)
        a = warp(alpha)[:, :, None]
        img = _sea(rng, size) * (1 - a) + rgb * a
        img = _occlude(rng, img, size, self.variation)
        img = _light(rng, img, size, self.variation)
        picture = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        sigma = _vary(rng.uniform(0.0, 1.4), 0.0, self.variation)
        if sigma > 0.3:
            picture = picture.filter(ImageFilter.GaussianBlur(sigma))
        noisy = np.asarray(picture, dtype=np.float32) + rng.normal(
            0, _vary(rng.uniform(1.5, 8), 1.5, self.variation), (size, size, 3)
        )
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")

    def jpeg(self, ind: Individual, seed: int, index: int, shot: int) -> bytes:
        """The photo as a JPEG file, at a quality that varies from photo to photo."""
        quality = int(_rng(seed, ind.species, index, 10_000 + shot).integers(72, 95))
        buf = io.BytesIO()
        self.photo(ind, seed, index, shot).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


@dataclass(frozen=True)
class SyntheticCatalogue:
    """What ``write_catalogue`` wrote."""

    folder: Path
    catalogue_csv: Path
    queries_csv: Path | None
    images: Path
    individuals: int
    photos: int
    queries: int


def _species_of(species: Sequence[str], index: int) -> str:
    return species[index % len(species)]


def write_catalogue(
    folder: Path,
    *,
    individuals: int,
    photos: int,
    seed: int = 0,
    size: int = 192,
    variation: float = 1.0,
    species: Sequence[str] = ("bottlenose_dolphin",),
    queries: int = 0,
    unseen: int = 0,
    first_individual: int = 0,
) -> SyntheticCatalogue:
    """Write ``photos`` photos of each of ``individuals`` individuals (``catalogue.csv``).

    With ``queries`` or ``unseen``, also write ``queries.csv``: ``queries`` further photos of each
    catalogued individual, and ``photos`` photos of each of ``unseen`` individuals that are not
    in the catalogue (their right answer is ``new_individual``).
    """
    for name in species:
        if name not in BODY_PLANS:
            raise ValueError(f"unknown species {name!r}: use one of {', '.join(BODY_PLANS)}")
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(size, variation)
    known = range(first_individual, first_individual + individuals)
    rows = _write_photos(renderer, images, seed, species, known, range(photos))
    catalogue_csv = _write_csv(folder / "catalogue.csv", rows)
    queries_csv = None
    query_rows: list[tuple[str, str, str]] = []
    if queries or unseen:
        query_rows = _write_photos(
            renderer, images, seed, species, known, range(photos, photos + queries)
        )
        new = range(first_individual + individuals, first_individual + individuals + unseen)
        query_rows += _write_photos(renderer, images, seed, species, new, range(photos))
        queries_csv = _write_csv(folder / "queries.csv", query_rows)
    log.info(
        "wrote %d catalogue photos of %d individuals and %d query photos under %s",
        len(rows),
        individuals,
        len(query_rows),
        folder,
    )
    return SyntheticCatalogue(
        folder, catalogue_csv, queries_csv, images, individuals, len(rows), len(query_rows)
    )


def _write_photos(
    renderer: Renderer,
    images: Path,
    seed: int,
    species: Sequence[str],
    indices: Sequence[int],
    shots: Sequence[int],
) -> list[tuple[str, str, str]]:
    rows = []
    for index in indices:
        ind = make_individual(_species_of(species, index), seed, index)
        for shot in shots:
            name = f"{ind.individual_id}_{shot:03d}.jpg"
            (images / name).write_bytes(renderer.jpeg(ind, seed, index, shot))
            rows.append((name, ind.species, ind.individual_id))
        renderer._bodies.pop(ind.individual_id, None)  # one individual at a time: bounded memory
    return rows


def _write_csv(path: Path, rows: Sequence[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whaleid-synthetic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a synthetic photo-ID catalogue (rendered dorsal fins / flukes of "
        "individuals with stable marks) and a Happywhale-style CSV, deterministically by seed.",
        epilog="example:\n  whaleid-synthetic out/ --individuals 40 --photos 5 --queries 1 "
        "--unseen 5 --seed 7\n  whaleid import out/catalogue.csv --images out/images",
    )
    parser.add_argument("folder", type=Path, help="where catalogue.csv and images/ go")
    parser.add_argument("--individuals", type=int, default=40)
    parser.add_argument("--photos", type=int, default=5, help="catalogue photos per individual")
    parser.add_argument(
        "--queries", type=int, default=0, help="held-out photos per individual (queries.csv)"
    )
    parser.add_argument(
        "--unseen", type=int, default=0, help="individuals only in queries.csv (new_individual)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the catalogue: same seed, same photos")
    parser.add_argument("--size", type=int, default=192, help="photo width = height in pixels")
    parser.add_argument(
        "--species",
        default="bottlenose_dolphin",
        help=f"comma-separated, assigned in turn: {', '.join(BODY_PLANS)}",
    )
    parser.add_argument(
        "--first-individual", type=int, default=0, help="index of the first individual"
    )
    parser.add_argument(
        "--variation",
        type=float,
        default=1.0,
        help="1 = field conditions (pose, light, blur, occlusion); less = calmer photos",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    write_catalogue(
        args.folder,
        individuals=args.individuals,
        photos=args.photos,
        seed=args.seed,
        size=args.size,
        species=[s.strip() for s in args.species.split(",") if s.strip()],
        queries=args.queries,
        unseen=args.unseen,
        first_individual=args.first_individual,
        variation=args.variation,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
