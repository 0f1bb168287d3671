"""The photo sets of ``bench/quality.py``: each real set of ../shared/data (read in place) and the
synthetic catalogue, as labelled photos with the encounter each belongs to (the unit of the split),
and the protocol and reading the report prints beside its figures."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from tqdm import tqdm

if TYPE_CHECKING:
    from bench.quality_cli import Cli

UNSEEN_FRACTION = 0.2
CALIBRATION_CAP = 200
# Camera frames whose numbers are this close are one burst (one encounter) of one individual.
BURST_GAP = 20


@dataclass(frozen=True)
class Photo:
    """One labelled photo: its path under the set's image folder, and the encounter it belongs
    to (the unit of the split, unique across individuals)."""

    image: str
    individual_id: str
    species: str
    encounter: str


@dataclass
class DataSet:
    """A labelled photo set and how it is split."""

    key: str
    title: str
    images: Path
    photos: list[Photo]
    protocol: list[str]
    reading: str
    species_filter: bool = False
    max_queries: int | None = None
    gallery_per_encounter: int | None = None
    queries_per_encounter: int | None = None
    calibration: bool = False
    # Individuals that never go to the gallery whatever the draw (the unlabelled fins).
    fixed_unseen: frozenset[str] = frozenset()
    unseen_fraction: float = UNSEEN_FRACTION


def labels(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def without_duplicates(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
    """Drop exact duplicates; when the two copies name different individuals, drop both (the
    label conflicts and it is not known which is right)."""
    by_image = {r["image"]: r for r in rows}
    dropped: set[str] = set()
    notes = []
    for r in rows:
        original = r.get("exact_duplicate_of") or ""
        if not original:
            continue
        dropped.add(r["image"])
        other = by_image.get(original)
        if other is not None and other["individual_id"] != r["individual_id"]:
            dropped.add(original)
            notes.append(
                f"`{original}` ({other['individual_id']}) and its copy `{r['image']}` "
                f"({r['individual_id']}): label conflict, both dropped"
            )
        else:
            notes.append(f"`{r['image']}`: exact duplicate of `{original}`, dropped")
    return [r for r in rows if r["image"] not in dropped], notes


def bursts(frames: dict[str, tuple[str, int] | None], owner: str) -> dict[str, str]:
    """Encounter per photo: frames of one camera whose numbers are within ``BURST_GAP`` of the
    previous one form a burst; a photo without a frame number is an encounter of its own."""
    out: dict[str, str] = {}
    by_camera: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for image, frame in frames.items():
        if frame is None:
            out[image] = f"{owner}/{Path(image).stem}"
        else:
            by_camera[frame[0]].append((frame[1], image))
    for camera, numbered in by_camera.items():
        numbered.sort()
        start = previous = numbered[0][0]
        for number, image in numbered:
            if number - previous > BURST_GAP:
                start = number
            previous = number
            out[image] = f"{owner}/{camera}{start:04d}"
    return out


def frame_bursts(rows: list[dict[str, str]], frame: re.Pattern[str], owner: str) -> dict[str, str]:
    """``bursts`` of ``owner``'s photos, the camera and frame number read from each file name
    by ``frame`` (its groups: camera, number)."""
    frames: dict[str, tuple[str, int] | None] = {}
    for r in rows:
        m = frame.match(Path(r["image"]).name)
        frames[r["image"]] = (m.group(1), int(m.group(2))) if m else None
    return bursts(frames, owner)


def holstein(folder: Path) -> DataSet:
    rows = [r for r in labels(folder) if r["subset"] == "datasets_v2"]
    rows, _ = without_duplicates(rows)
    photos = [Photo(r["image"], r["individual_id"], r["species"], r["encounter"]) for r in rows]
    return DataSet(
        folder.name,
        "Holstein cow faces (Holstein2025, datasets_v2)",
        folder,
        photos,
        [
            "Only `datasets_v2` (82 cows); the repository's open-set gallery/query folders are "
            "left out, as SOURCE.txt advises against pooling them.",
            "Encounter = the `encounter` column (one video clip, parsed from file names), so "
            "frames of one clip never sit on both sides.",
            "Known cows: half of their clips (rounded up, seeded) give at most 5 frames each to "
            "the gallery; from every other clip at most 2 frames are queries. One clip of each "
            "cow with 3 or more held-out clips is the calibration split instead (at most "
            f"{CALIBRATION_CAP} frames).",
            "The queries are then capped at 600, drawn with the seed, so that one mode runs in "
            "minutes on 2 cores.",
        ],
        "A real many-individual set whose identity lives in a coat pattern, at CCTV quality "
        "(faces of 57 to 142 px wide, upsampled to the model's input). The demo model never saw a "
        "cow: it was trained on synthetic dorsal fins only, so this measures how far a "
        "fin-trained embedding carries to another pattern domain, not the service at its best. "
        "The split by clip keeps near-identical video frames off both sides; a random photo "
        "split would score far higher.",
        max_queries=600,
        gallery_per_encounter=5,
        queries_per_encounter=2,
        calibration=True,
    )


def orl(folder: Path, scratch: Path) -> DataSet:
    """The PGM faces, converted to PNG in the scratch folder (the service takes JPEG, PNG, WebP
    or HEIC)."""
    rows, _ = without_duplicates(labels(folder))
    out = scratch / "orl_faces_png"
    photos = []
    for r in tqdm(rows, desc="ORL to PNG", unit="photo"):
        image = Path(r["image"]).with_suffix(".png").as_posix()
        target = out / image
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(folder / r["image"]) as pgm:
                pgm.convert("RGB").save(target, format="PNG")
        photos.append(Photo(image, r["individual_id"], r["species"], r["image"]))
    return DataSet(
        folder.name,
        "ORL faces (AT&T)",
        out,
        photos,
        [
            "40 people x 10 greyscale photos, converted losslessly from PGM to RGB PNG in the "
            "scratch folder (never into the repository).",
            "No encounters are recorded: each photo is its own encounter.",
            "Known people: 5 photos (seeded) in the gallery, the other 5 held out; of those, 1 is "
            "the calibration split and 4 are queries. Unseen people: 1 photo calibration, 9 "
            "queries.",
        ],
        "Human frontal faces on a plain dark background: no whale in sight, but a clean identity "
        "set on which any working pipeline should rank well, so a low score points at the "
        "pipeline or the model's domain rather than at the data. A person's ten photos differ "
        "only in expression, glasses and slight light or pose (some were taken on other days), "
        "so even a split by photo leaves queries close to their gallery photos: the figures "
        "flatter any model.",
        calibration=True,
    )


def kabuga(folder: Path) -> DataSet:
    rows, _ = without_duplicates(labels(folder))
    photos = [
        Photo(
            r["image"],
            r["individual_id"],
            r["species"],
            f"{r['individual_id']}/{r['encounter'] or Path(r['image']).stem}",
        )
        for r in rows
    ]
    return DataSet(
        folder.name,
        "Marine photo-ID examples (Kabuga et al.)",
        folder,
        photos,
        [
            "16 individuals of three species (6 bottlenose dolphins, 4 humpback whales, 6 harbour "
            "seals), 2 to 4 photos each.",
            "Encounter = the `encounter` column (survey and sighting, parsed from dolphin and "
            "seal file names) of that individual; humpback photos have none, so each is its own "
            "encounter. Encounters holding two individuals put one animal's photo in the gallery "
            "and the other's among the queries: hard negatives in the same light, as in the "
            "field.",
            "Unseen individuals are drawn per species (1 dolphin, 1 humpback, 1 seal). Known "
            "individuals: half of their encounters (rounded up) in the gallery, the rest "
            "queries; an individual with one encounter (such as seal Or004, four consecutive "
            "frames) is gallery only.",
            "**Species filter on** (`whaleid evaluate --species-filter`): each query is matched "
            "against the gallery photos of its own species only, as a deployment that knows the "
            "species would.",
            "No calibration split: the set is too small to spare photos.",
        ],
        "Real research photo-ID crops (dolphin fins and seal heads from SMRU, humpback flukes "
        "from Happywhale), photos of one animal years apart. With a handful of queries per "
        "species one query moves MAP@5 by several points: read it as a smoke test of the real "
        "domain, not a stable number. The demo model saw synthetic fins and flukes in training, "
        "never a seal.",
        species_filter=True,
    )


# Same scene twice: a crop and a screenshot of one photo.
SEAL_SAME_SCENE = {
    "images/Sharkbite/teste.png": "images/Sharkbite/screenshot_2024-03-22_17.13.49.jpg"
}
SEAL_FRAME = re.compile(r"^(DSCN|DSC_)(\d+)")


def seals(folder: Path) -> DataSet:
    rows, notes = without_duplicates(labels(folder))
    photos = []
    for ind in sorted({r["individual_id"] for r in rows}):
        mine = [r for r in rows if r["individual_id"] == ind]
        encounter = frame_bursts(mine, SEAL_FRAME, ind)
        for r in mine:
            same = SEAL_SAME_SCENE.get(r["image"])
            photos.append(
                Photo(
                    r["image"],
                    ind,
                    r["species"],
                    encounter[same] if same else encounter[r["image"]],
                )
            )
    return DataSet(
        folder.name,
        "Harbour seals (Pieterburen)",
        folder,
        photos,
        [
            "13 seals, 1 to 18 photos each; " + "; ".join(notes) + ".",
            "No encounter column: an encounter is a burst of one seal's frames from one camera "
            f"(DSCN or DSC_ numbers within {BURST_GAP} of each other), whichever flank they "
            "show; a photo without a frame number is its own encounter, except the crop "
            "`Sharkbite/teste.png`, which goes with the screenshot of the same scene.",
            "Unseen: 3 seals (seeded). Known seals: half of their bursts (rounded up) in the "
            "gallery, the rest queries. Left and right flanks are mixed, so a query's flank may "
            "be missing from the gallery.",
            "No calibration split: the set is too small.",
        ],
        "Caveat first: the photos are uncropped scenes (mud flats, sometimes several seals, "
        "birds), and the service embeds the whole photo, so the model mostly sees background. "
        "A fair test needs a crop step (the `bbox` field of `/identify`) that this set does not "
        "provide. With 13 seals and a few dozen queries the figures are a sanity check only.",
    )


DOLPHIN_FRAME = re.compile(r"^(?:[01]_)?(0J4A|IMG_)(\d+)")
DOLPHIN_SURVEY = re.compile(r"^(?:[01]_)?(SB\d\d-\d+)-")


def dolphins(folder: Path) -> DataSet:
    rows, notes = without_duplicates(labels(folder))
    photos = []
    for ind in ("1056", "not_1056"):
        mine = [r for r in rows if r["individual_id"] == ind]
        encounter = frame_bursts(mine, DOLPHIN_FRAME, ind)
        for r in mine:
            survey = DOLPHIN_SURVEY.match(Path(r["image"]).name)
            enc = f"{ind}/{survey.group(1)}" if survey else encounter[r["image"]]
            photos.append(Photo(r["image"], ind, r["species"], enc))
    return DataSet(
        folder.name,
        "Dolphin fins (Moray Firth)",
        folder,
        photos,
        [
            "**One labelled individual** (1056, 163 crops) and 213 crops of other, unnamed "
            "dolphins (`not_1056`); " + "; ".join(notes) + ".",
            "Encounter of a 1056 crop = its survey and sighting (`SByy-NNNN` in the file name), "
            f"or a burst of camera frames (0J4A / IMG_ numbers within {BURST_GAP}).",
            "Gallery: the 1056 crops of half of its encounters (rounded up, seeded); queries: "
            "its crops from the other encounters (truth 1056) and every `not_1056` crop (truth "
            "`new_individual`; they are never in the gallery).",
            "**This is a known-vs-new check, not MAP@5 over many individuals**: the gallery holds "
            "one individual, so every answer is 1056 and `new_individual` in some order and a "
            "query scores 1 or 0.5. The `new_individual` first columns say how well the cutoff "
            "separates 1056 from other dolphins.",
        ],
        "Real field crops of dorsal fins, the domain the service is built for. The unnamed fins "
        "come partly from the same surveys as 1056 (same light and sea), which makes the "
        "known-vs-new decision realistic; they may include the six Kabuga dolphins.",
        fixed_unseen=frozenset({"not_1056"}),
        unseen_fraction=0.0,
    )


def synthetic(scratch: Path, cli: Cli) -> DataSet:
    """The synthetic catalogue of ``training.synthetic`` (seed 7, as the demo gallery: the demo
    model trained on seed 1), rendered through its command line."""
    folder = scratch / "synthetic-50x8-seed7"
    if not (folder / "catalogue.csv").exists():
        cli.python(
            "-m",
            "training.synthetic",
            str(folder),
            "--individuals",
            "50",
            "--photos",
            "8",
            "--seed",
            "7",
            "--size",
            "160",
        )
    with (folder / "catalogue.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    photos = [
        Photo(r["image"], r["individual_id"], r["species"], f"{r['individual_id']}/{r['image']}")
        for r in rows
    ]
    return DataSet(
        "synthetic",
        "Synthetic fins (training.synthetic, seed 7)",
        folder / "images",
        photos,
        [
            "`python -m training.synthetic DIR --individuals 50 --photos 8 --seed 7 --size 160`: "
            "50 rendered bottlenose fins the demo model never trained on (it trained on seed 1), "
            "8 photos each, each an independent render (pose, light, blur, occlusion), so each "
            "photo is its own encounter.",
            "Unseen: 10 individuals (seeded). Known: 4 photos in the gallery, 1 calibration, 3 "
            "queries; unseen: 1 calibration, 7 queries.",
        ],
        "The domain the demo model was trained on, rendered by the same generator with another "
        "seed: an upper reference for the demo model, not evidence about real animals.",
        calibration=True,
    )


REAL_SETS: dict[str, Callable[[Path, Path], DataSet]] = {
    "holstein_cow_faces_holstein2025": lambda folder, scratch: holstein(folder),
    "orl_faces": orl,
    "marine_photoid_kabuga": lambda folder, scratch: kabuga(folder),
    "harbour_seals_pieterburen": lambda folder, scratch: seals(folder),
    "dolphin_fins_moray": lambda folder, scratch: dolphins(folder),
}
