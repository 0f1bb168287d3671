"""Identification quality on real photo sets and a synthetic catalogue; writes
docs/identification-quality.md.

For every set (../shared/data/*, read in place, and the synthetic catalogue of
``training.synthetic``) the photos are split by encounter into a gallery, evaluation queries and,
where a set is large enough, a calibration split; about a fifth of the individuals (seeded) have no
gallery photo, so their right answer is ``new_individual``. Then each identification mode runs
through the real command line, in a subprocess with a throw-away data directory:

1. ``global``: the demo model and its kNN head;
2. ``local``: the built-in ``local-features`` matcher;
3. ``fused``: the demo model with verification ``rerank`` (after ``models calibrate`` on the
   calibration split when the set has one);
4. ``scratch``: EfficientNet-Lite0 trained from random weights on the set's gallery
   (``training/configs/lite0-small-catalogue.yaml`` with ``weights=none``, no frozen stage, every
   layer at the head's learning rate, BatchNorm statistics learnt, peak learning rate 2e-3);
5. ``frozen``: ImageNet EfficientNet-Lite0 features, not trained at all
   (``training/configs/lite0-frozen.yaml``, 0 epochs; the trainer still chooses the kNN head's
   k and cutoff on its validation fold);
6. ``finetuned``: ImageNet EfficientNet-Lite0 fine-tuned on the set's gallery
   (``training/configs/lite0-small-catalogue.yaml``);
7. ``fused-finetuned``: ``fused`` with the ``finetuned`` model in place of the demo model.

The trained modes (4-7) train with ``python -m training train`` of ``.venv-train`` on the split's
gallery photos only: the queries, the calibration split and the unseen individuals are never
trained on (the trainer deals the gallery's individuals into folds and holds one fold out to
choose its head). The run is exported with ``python -m model_export`` and registered with
``whaleid models add RUN/model.onnx --activate``. Runs are kept in
``SCRATCH/<set>/runs/<recipe>`` and reused while the config file, its overrides and the gallery
are the same (``--retrain`` trains again). A set whose gallery holds fewer than 2 individuals
cannot be trained on: those modes are "not run" there.

``whaleid evaluate`` gives MAP@5 (overall, known, unseen); ``POST /identify`` on ``whaleid serve``,
timed from the client on a seeded sample of the queries, gives the latency per query. A mode whose
commands the CLI does not have yet is reported "not run" with the step that failed.

    PYTHONPATH=$PWD .venv/bin/python bench/quality.py                     # all sets and modes
    PYTHONPATH=$PWD .venv/bin/python bench/quality.py --modes global      # mode 1 only
    PYTHONPATH=$PWD .venv/bin/python bench/quality.py --modes frozen,finetuned --sets orl_faces
    PYTHONPATH=$PWD .venv/bin/python bench/quality.py --render-only       # doc from last results
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jinja2
from PIL import Image
from tqdm import tqdm

log = logging.getLogger("bench.quality")

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "demo" / "whaleid-demo.onnx"
TEMPLATE = Path(__file__).with_name("quality.md.j2")
TRAIN_PYTHON = ROOT / ".venv-train" / "bin" / "python"
TRAIN_CONFIGS = ROOT / "training" / "configs"
TRAIN_TIMEOUT = 45 * 60
EXPORT_TIMEOUT = 30 * 60
# Training needs at least two individuals in the gallery (the trainer's ArcFace classes).
MIN_TRAIN_INDIVIDUALS = 2
SEED = 0
UNSEEN_FRACTION = 0.2
CALIBRATION_CAP = 200
# Camera frames whose numbers are this close are one burst (one encounter) of one individual.
BURST_GAP = 20
NEW_INDIVIDUAL = "new_individual"
TOP = 5
# `whaleid` output: the id a registration got, and a row of `whaleid models list`.
REGISTERED = re.compile(r"registered model .* as id (\d+)")
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ [\w.]+: ")
MODEL_ROW = re.compile(
    r"^(\d+)\t(\w+)\t(\S+)\t(\S+)\tdim=\d+\tk=(\d+)\tcutoff=([\d.]+)\t(\w+)(?:\t.*)?$"
)


# --------------------------------------------------------------------------- data sets


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
        frames: dict[str, tuple[str, int] | None] = {}
        for r in mine:
            m = SEAL_FRAME.match(Path(r["image"]).name)
            frames[r["image"]] = (m.group(1), int(m.group(2))) if m else None
        encounter = bursts(frames, ind)
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
        frames: dict[str, tuple[str, int] | None] = {}
        for r in mine:
            m = DOLPHIN_FRAME.match(Path(r["image"]).name)
            frames[r["image"]] = (m.group(1), int(m.group(2))) if m else None
        encounter = bursts(frames, ind)
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


# --------------------------------------------------------------------------- the split


@dataclass
class Split:
    gallery: list[Photo]
    queries: list[Photo]
    calibration: list[Photo]
    unseen: set[str]

    def counts(self) -> dict[str, int]:
        known = [q for q in self.queries if q.individual_id not in self.unseen]
        return {
            "gallery_photos": len(self.gallery),
            "gallery_individuals": len({p.individual_id for p in self.gallery}),
            "known_queries": len(known),
            "known_query_individuals": len({q.individual_id for q in known}),
            "unseen_queries": len(self.queries) - len(known),
            "unseen_query_individuals": len(
                {q.individual_id for q in self.queries if q.individual_id in self.unseen}
            ),
            "calibration_photos": len(self.calibration),
        }


def choose_unseen(data: DataSet, rng: random.Random) -> set[str]:
    """About ``unseen_fraction`` of the individuals of each species, drawn with ``rng``."""
    unseen = set(data.fixed_unseen)
    by_species: dict[str, set[str]] = defaultdict(set)
    for p in data.photos:
        if p.individual_id not in data.fixed_unseen:
            by_species[p.species].add(p.individual_id)
    for species in sorted(by_species):
        individuals = sorted(by_species[species])
        unseen |= set(rng.sample(individuals, round(data.unseen_fraction * len(individuals))))
    return unseen


def take(photos: list[Photo], cap: int | None, rng: random.Random) -> list[Photo]:
    if cap is None or len(photos) <= cap:
        return photos
    return sorted(rng.sample(photos, cap), key=lambda p: p.image)


def split(data: DataSet, seed: int, max_queries: int | None) -> Split:
    """Gallery, queries and calibration by encounter: no encounter is on two sides."""
    rng = random.Random(seed)
    unseen = choose_unseen(data, rng)
    encounters: dict[str, dict[str, list[Photo]]] = defaultdict(lambda: defaultdict(list))
    for p in sorted(data.photos, key=lambda p: p.image):
        encounters[p.individual_id][p.encounter].append(p)
    gallery: list[Photo] = []
    queries: list[Photo] = []
    calibration: list[Photo] = []
    for ind in sorted(encounters):
        keys = sorted(encounters[ind])
        rng.shuffle(keys)
        held = keys
        if ind not in unseen:
            n_gallery = (len(keys) + 1) // 2
            for key in keys[:n_gallery]:
                gallery += take(encounters[ind][key], data.gallery_per_encounter, rng)
            held = keys[n_gallery:]
        if data.calibration and len(held) >= 3:
            calibration += take(encounters[ind][held[0]], data.queries_per_encounter, rng)
            held = held[1:]
        for key in held:
            queries += take(encounters[ind][key], data.queries_per_encounter, rng)
    cap = min(c for c in (data.max_queries, max_queries, len(queries)) if c is not None)
    queries = take(queries, cap, rng)
    calibration = take(calibration, CALIBRATION_CAP, rng)
    return Split(gallery, queries, calibration, unseen)


def chance_map5(data: DataSet, s: Split) -> float:
    """MAP@5 of a uniformly random ordering of the candidates (the gallery's individuals, of the
    query's species with the species filter, and ``new_individual``)."""
    per_species: dict[str, set[str]] = defaultdict(set)
    for p in s.gallery:
        per_species[p.species].add(p.individual_id)
    everyone = {p.individual_id for p in s.gallery}
    total = 0.0
    for q in s.queries:
        m = len(per_species[q.species] if data.species_filter else everyone) + 1
        total += sum(1.0 / r for r in range(1, min(TOP, m) + 1)) / m
    return total / len(s.queries) if s.queries else 0.0


def write_csv(path: Path, photos: Sequence[Photo]) -> Path:
    """A catalogue CSV (``service.catalogue.csv_file``): image, species, individual_id,
    encounter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "species", "individual_id", "encounter"])
        for p in photos:
            writer.writerow([p.image, p.species, p.individual_id, p.encounter[:200]])
    return path


# --------------------------------------------------------------------------- the command line


class CommandFailed(RuntimeError):
    """A ``whaleid`` command exited non-zero or ran out of time."""

    def __init__(self, command: Sequence[str], why: str, tail: str) -> None:
        self.command = " ".join(command)
        self.why = why
        self.tail = tail
        super().__init__(f"`{self.command}` {why}: {tail}")


@dataclass(frozen=True)
class Done:
    stdout: str
    stderr: str
    seconds: float


class Cli:
    """``python -m service.cli`` of this checkout, on one data directory (or none)."""

    def __init__(self, data_dir: Path | None, logs: Path) -> None:
        self.data_dir = data_dir
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WHALEID_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["WHALEID_LOG_LEVEL"] = "INFO"
        env["WHALEID_WORKER"] = "false"
        if data_dir is not None:
            env["WHALEID_DATA_DIR"] = str(data_dir)
        self.env = env
        self.count = 0

    def python(self, *args: str, timeout: float = 600, interpreter: Path | None = None) -> Done:
        """``python ARGS`` (this interpreter, or ``interpreter``: the training virtualenv's),
        its stderr logged to a numbered file of the log folder."""
        command = [str(interpreter or sys.executable), *args]
        self.count += 1
        logfile = self.logs / f"{self.count:02d}-{_slug(args)}.log"
        started = time.perf_counter()
        try:
            # The scratch folder as working directory: no .env of the checkout is read.
            done = subprocess.run(
                command,
                cwd=self.logs,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            logfile.write_text(_text(e.stderr))
            raise CommandFailed(_shown(args), f"ran past {timeout:.0f} s", "") from e
        seconds = time.perf_counter() - started
        logfile.write_text(done.stderr)
        if done.returncode != 0:
            raise CommandFailed(_shown(args), f"exited {done.returncode}", _tail(done.stderr))
        return Done(done.stdout, done.stderr, seconds)

    def whaleid(self, *args: str, timeout: float = 600) -> Done:
        return self.python("-m", "service.cli", *args, timeout=timeout)

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """``whaleid serve`` on a free loopback port until the block ends."""
        port = free_port()
        logfile = (self.logs / f"serve-{port}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--no-migrate", "--port", str(port)],
            cwd=self.logs,
            env=self.env,
            stdout=logfile,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            with httpx.Client(base_url=url, timeout=5) as client:
                while True:
                    if process.poll() is not None:
                        raise CommandFailed(["serve"], "exited", f"see {logfile.name}")
                    if time.monotonic() > deadline:
                        raise CommandFailed(["serve"], "was not ready in 300 s", "")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get("/ready").status_code == 200:
                            break
                    time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            logfile.close()


def _slug(args: Sequence[str]) -> str:
    words = [
        a
        for a in args
        if not a.startswith("-") and "/" not in a and "=" not in a and a != "service.cli"
    ]
    return "-".join(words[:3]) or "python"


def _shown(args: Sequence[str]) -> list[str]:
    """The command as a reader types it: ``whaleid ...`` with paths cut to their names."""
    args = list(args)
    programs = {
        "service.cli": "whaleid",
        "training": "whaleid-train",
        "model_export": "whaleid-export",
    }
    if len(args) >= 2 and args[0] == "-m" and args[1] in programs:
        args = [programs[args[1]], *args[2:]]
    return [Path(a).name if "/" in a else a for a in args]


def _tail(text: str, lines: int = 2) -> str:
    """The last lines a command wrote, without the log prefix (time, level, logger)."""
    kept = [LOG_PREFIX.sub("", line).strip() for line in text.strip().splitlines()]
    return " / ".join([line for line in kept if line][-lines:])[-300:]


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def capabilities(cli: Cli) -> dict[str, bool]:
    """What ``whaleid evaluate`` accepts today: the modes use ``--model`` and
    ``--verification`` where it has them."""
    usage = cli.whaleid("evaluate", "--help").stdout
    return {"model": "--model" in usage, "verification": "--verification" in usage}


@dataclass(frozen=True)
class ModelRow:
    id: int
    status: str
    name: str
    version: str
    k: int
    cutoff: float
    ranking: str


def models(cli: Cli) -> list[ModelRow]:
    rows = []
    for line in cli.whaleid("models", "list").stdout.splitlines():
        m = MODEL_ROW.match(line)
        if m:
            rows.append(ModelRow(int(m[1]), m[2], m[3], m[4], int(m[5]), float(m[6]), m[7]))
    return rows


def registered_id(done: Done, cli: Cli) -> int:
    """The id ``whaleid models add`` gave, from its log line or else the newest model."""
    m = REGISTERED.search(done.stderr)
    if m:
        return int(m[1])
    return max(r.id for r in models(cli))


# --------------------------------------------------------------------------- modes


class ModeUnavailable(RuntimeError):
    """This checkout's command line cannot run the mode (yet)."""


@dataclass(frozen=True)
class Recipe:
    """How a trained mode's model is trained: a config file of ``training/configs`` and
    ``--set`` overrides. ``name`` is the run folder under ``SCRATCH/<set>/runs``."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()


RECIPES = {
    # The same recipe from random weights: nothing to freeze, no pretrained layers to spare (every
    # layer at the head's rate, BatchNorm statistics learnt), and a from-scratch learning rate.
    "scratch": Recipe(
        "scratch",
        "lite0-small-catalogue.yaml",
        (
            "weights=none",
            "freeze_epochs=0",
            "backbone_lr_scale=1",
            "layer_decay=1",
            "freeze_batchnorm=false",
            "schedule.peak=2e-3",
        ),
    ),
    "frozen": Recipe("frozen", "lite0-frozen.yaml"),
    "finetuned": Recipe("finetuned", "lite0-small-catalogue.yaml"),
}


@dataclass(frozen=True)
class TrainOptions:
    """The command line's say over the trained modes: another config file per recipe (or for
    all), extra ``--set`` overrides for every run, and the training interpreter."""

    configs: dict[str, Path] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    python: Path = TRAIN_PYTHON
    # whaleid-export --service-tolerance (None: the exporter's default).
    service_tolerance: float | None = None
    timeout_s: float = TRAIN_TIMEOUT

    def config(self, recipe: Recipe) -> Path:
        return (
            self.configs.get(recipe.name)
            or self.configs.get("*")
            or TRAIN_CONFIGS / (recipe.config)
        )

    def overrides(self, recipe: Recipe) -> tuple[str, ...]:
        return (*recipe.overrides, *self.extra)


@dataclass
class Case:
    """One set's split as files, and a data directory with the demo model active over its
    gallery: what every mode starts from. ``runs`` holds the set's training runs; a trained
    mode records what its training and export took in ``training``."""

    data: DataSet
    cli: Cli
    demo_id: int
    gallery_csv: Path
    queries_csv: Path
    calibration_csv: Path | None
    features: dict[str, bool]
    runs: Path | None = None
    train: TrainOptions = field(default_factory=TrainOptions)
    training: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """What a mode evaluates with: extra ``whaleid evaluate`` arguments, and notes."""

    evaluate_args: tuple[str, ...]
    notes: tuple[str, ...] = ()


def _model_arg(case: Case, model_id: int) -> tuple[str, ...]:
    return ("--model", str(model_id)) if case.features["model"] else ()


def prepare_global(case: Case) -> Prepared:
    head = next(r for r in models(case.cli) if r.id == case.demo_id)
    return Prepared(
        (), (f"kNN head of the model: k {head.k}, cutoff {head.cutoff}, {head.ranking}",)
    )


def prepare_local(case: Case) -> Prepared:
    try:
        added = case.cli.whaleid("models", "add", "builtin:local-features")
        model_id = registered_id(added, case.cli)
        case.cli.whaleid("models", "activate", str(model_id), timeout=1800)
    except CommandFailed as e:
        raise ModeUnavailable(str(e)) from e
    notes = [f"local-features model id {model_id}"]
    if case.calibration_csv is not None:
        notes.append(calibrate(case, model_id))
    return Prepared(_model_arg(case, model_id), tuple(notes))


def calibrate(case: Case, model_id: int) -> str:
    """``whaleid models calibrate`` on the calibration split; what happened, as a note."""
    try:
        case.cli.whaleid(
            "models",
            "calibrate",
            str(model_id),
            str(case.calibration_csv),
            "--images",
            str(case.data.images),
            timeout=1800,
        )
    except CommandFailed as e:
        return f"`models calibrate` failed ({e.why}): default calibration"
    return "calibrated on the calibration split (`models calibrate`)"


def prepare_fused(case: Case) -> Prepared:
    return verified(case, case.demo_id, [])


def verified(case: Case, model_id: int, notes: list[str]) -> Prepared:
    """Verification ``rerank`` on ``model_id``, calibrated on the calibration split when the set
    has one."""
    if case.calibration_csv is None:
        notes.append("no calibration split: default calibration")
    else:
        notes.append(calibrate(case, model_id))
    try:
        case.cli.whaleid("models", "verify", str(model_id), "--mode", "rerank")
    except CommandFailed as e:
        raise ModeUnavailable(str(e)) from e
    if not case.features["verification"]:
        raise ModeUnavailable("`whaleid evaluate` has no --verification option")
    return Prepared(("--verification", "rerank", *_model_arg(case, model_id)), tuple(notes))


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def trained_model(case: Case, recipe: Recipe) -> Path:
    """Train ``recipe`` on the case's gallery (or reuse the finished run of the same config,
    overrides and gallery), export it to ONNX, and record the figures in ``case.training``;
    the ONNX file."""
    assert case.runs is not None, "a trained mode needs the set's runs folder"
    config = case.train.config(recipe)
    if not config.is_file():
        raise ModeUnavailable(f"no training config {config}")
    if not case.train.python.exists():
        raise ModeUnavailable(f"no training virtualenv ({case.train.python}): see docs/training.md")
    run = case.runs / recipe.name
    # The trainer keeps the catalogue's path in the run's config: one stable file per set.
    case.runs.mkdir(parents=True, exist_ok=True)
    catalogue = case.runs / "gallery.csv"
    gallery = case.gallery_csv.read_text()
    if not catalogue.exists() or catalogue.read_text() != gallery:
        catalogue.write_text(gallery)
    overrides = (
        f"catalogue={catalogue}",
        f"images={case.data.images.resolve()}",
        f"output={run}",
        *case.train.overrides(recipe),
    )
    key = _fingerprint(str(config.resolve()), config.read_text(), *overrides, gallery)
    key_file, record_file, summary_file = (
        run / "bench-key.txt",
        run / "bench.json",
        run / "summary.json",
    )
    if run.exists() and (not key_file.exists() or key_file.read_text() != key):
        log.info("%s: config, overrides or gallery changed since the run: training again", run)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    record = _read_json(record_file)
    case.training.update(
        recipe=recipe.name,
        config=str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        overrides=list(case.train.overrides(recipe)),
        run=str(run),
        cached=summary_file.exists(),
    )
    if not summary_file.exists():
        sets = [a for o in overrides for a in ("--set", o)]
        # An earlier session of this run that timed out or failed: the trainer resumes from its
        # last finished epoch, and the wall time counts both.
        before = float(record.get("interrupted_s", 0.0))
        started = time.perf_counter()
        try:
            done = case.cli.python(
                "-m",
                "training",
                "train",
                "--config",
                str(config.resolve()),
                *sets,
                timeout=case.train.timeout_s,
                interpreter=case.train.python,
            )
        except CommandFailed:
            record["interrupted_s"] = before + time.perf_counter() - started
            record_file.write_text(json.dumps(record, indent=2) + "\n")
            raise
        if not summary_file.exists():
            raise CommandFailed(
                ["whaleid-train", "train"], "wrote no summary.json", _tail(done.stderr)
            )
        record = {"train_wall_s": before + done.seconds}
        if before:
            record["resumed_after_s"] = before
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    summary = _read_json(summary_file)
    validation = summary.get("validation") or {}
    best = validation.get("best") or {}
    kept = summary.get("best_epoch")
    case.training.update(
        train_wall_s=record.get("train_wall_s"),
        # Wall time of earlier sessions of the run (timed out or failed), included above.
        resumed_after_s=record.get("resumed_after_s"),
        train_seconds_last_session=summary.get("train_seconds_last_session"),
        epochs=summary.get("epochs"),
        # The epoch whose weights the trainer kept (early stopping), when it says.
        kept_epoch=kept.get("epoch") if isinstance(kept, dict) else kept,
        head=summary.get("head"),
        best_val_map5=best.get("map5"),
        best_val_queries=best.get("queries"),
        data=summary.get("data"),
    )
    onnx = run / "model.onnx"
    tolerance: list[str] = []
    if case.train.service_tolerance is not None:
        tolerance = ["--service-tolerance", str(case.train.service_tolerance)]
    if "export_s" not in record or not onnx.exists() or record.get("export_args") != tolerance:
        onnx.unlink(missing_ok=True)
        done = case.cli.python(
            "-m",
            "model_export",
            str(run / "model.keras"),
            "--out",
            str(onnx),
            # Its own version: the run's name and version may be the demo model's (registered
            # in the same data directory), which `models add` refuses for another file.
            "--version",
            f"bench-{case.data.key}-{recipe.name}",
            *tolerance,
            timeout=EXPORT_TIMEOUT,
            interpreter=case.train.python,
        )
        record.update(export_s=done.seconds, export_args=tolerance)
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    case.training.update(
        export_s=record["export_s"],
        export_args=tolerance,
        model_mb=onnx.stat().st_size / 1e6,
    )
    return onnx


def activate_trained(case: Case, recipe: Recipe) -> tuple[int, list[str]]:
    """Train (or reuse) and export ``recipe``, register the model, embed the gallery with it."""
    onnx = trained_model(case, recipe)
    model_id = registered_id(
        case.cli.whaleid("models", "add", str(onnx), "--activate", timeout=1800), case.cli
    )
    head = next(r for r in models(case.cli) if r.id == model_id)
    t = case.training
    notes = [
        f"{recipe.name} run ({'reused' if t['cached'] else 'trained now'}): {t['config']}"
        + (f" with {', '.join(t['overrides'])}" if t["overrides"] else ""),
        f"kNN head of the model: k {head.k}, cutoff {head.cutoff}, {head.ranking}",
    ]
    if t["export_args"]:
        notes.append(f"exported with {' '.join(t['export_args'])}")
    return model_id, notes


def prepare_trained(recipe: str) -> Callable[[Case], Prepared]:
    def prepare(case: Case) -> Prepared:
        model_id, notes = activate_trained(case, RECIPES[recipe])
        return Prepared(_model_arg(case, model_id), tuple(notes))

    return prepare


def prepare_fused_trained(recipe: str) -> Callable[[Case], Prepared]:
    def prepare(case: Case) -> Prepared:
        model_id, notes = activate_trained(case, RECIPES[recipe])
        return verified(case, model_id, notes)

    return prepare


@dataclass(frozen=True)
class Mode:
    name: str
    prepare: Callable[[Case], Prepared]
    # The training recipe the mode's model comes from (None: no training).
    recipe: str | None = None


MODES = {
    "global": Mode("global", prepare_global),
    "local": Mode("local", prepare_local),
    "fused": Mode("fused", prepare_fused),
    "scratch": Mode("scratch", prepare_trained("scratch"), "scratch"),
    "frozen": Mode("frozen", prepare_trained("frozen"), "frozen"),
    "finetuned": Mode("finetuned", prepare_trained("finetuned"), "finetuned"),
    "fused-finetuned": Mode("fused-finetuned", prepare_fused_trained("finetuned"), "finetuned"),
}


# --------------------------------------------------------------------------- measuring


@dataclass
class ModeResult:
    mode: str
    status: str  # "ran", "not run" or "failed"
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    setup_s: float = 0.0
    evaluate_s: float = 0.0
    wall_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    # Trained modes: recipe, config, overrides, run, cached, train_wall_s,
    # train_seconds_last_session, epochs, kept_epoch, head, best_val_map5, best_val_queries,
    # data (the trainer's split), export_s, export_args, model_mb.
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class SetResult:
    key: str
    title: str
    protocol: list[str]
    reading: str
    species_filter: bool
    counts: dict[str, int]
    chance: float
    all_new: float
    modes: list[ModeResult]
    setup_s: float = 0.0


def prepare_case(
    data: DataSet,
    s: Split,
    folder: Path,
    features: dict[str, bool],
    train: TrainOptions | None = None,
) -> Case:
    """A fresh data directory: schema, the demo model active, the gallery imported. Training
    runs go to ``runs`` beside the mode folders (``SCRATCH/<set>/runs``), which outlive them."""
    shutil.rmtree(folder, ignore_errors=True)
    cli = Cli(folder / "data", folder / "logs")
    cli.whaleid("db", "upgrade")
    demo_id = registered_id(cli.whaleid("models", "add", str(DEMO_MODEL), "--activate"), cli)
    gallery_csv = write_csv(folder / "gallery.csv", s.gallery)
    queries_csv = write_csv(folder / "queries.csv", s.queries)
    calibration_csv = (
        write_csv(folder / "calibration.csv", s.calibration) if s.calibration else None
    )
    cli.whaleid("import", str(gallery_csv), "--images", str(data.images), "--strict", timeout=1800)
    return Case(
        data,
        cli,
        demo_id,
        gallery_csv,
        queries_csv,
        calibration_csv,
        features,
        runs=folder.parent / "runs",
        train=train or TrainOptions(),
    )


def timed_identify(case: Case, sample: Sequence[Photo]) -> dict[str, float]:
    """Client-side milliseconds of ``POST /identify`` (recorded, as a caller's request is) for
    each photo of ``sample``, after two warm-up requests."""
    key = case.cli.whaleid(
        "keys", "create", "--role", "integration", "--name", "quality-bench"
    ).stdout.strip()
    times = []
    with (
        case.cli.serve() as url,
        httpx.Client(
            base_url=url, timeout=300, headers={"Authorization": f"Bearer {key}"}
        ) as client,
    ):
        for i, photo in enumerate(tqdm([*sample[:2], *sample], desc="identify", unit="query")):
            data = (case.data.images / photo.image).read_bytes()
            form = {"species": photo.species} if case.data.species_filter else {}
            started = time.perf_counter()
            response = client.post(
                "/identify", files={"photo": (Path(photo.image).name, data)}, data=form
            )
            elapsed = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if i >= 2:
                times.append(elapsed)
    times.sort()
    return {
        "p50": times[len(times) // 2],
        "p90": times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)],
        "n": float(len(times)),
    }


def cannot_train(s: Split) -> str | None:
    """Why the split's gallery cannot be trained on, or None."""
    individuals = s.counts()["gallery_individuals"]
    if individuals < MIN_TRAIN_INDIVIDUALS:
        return (
            f"the gallery holds {individuals} individual(s): training needs at least "
            f"{MIN_TRAIN_INDIVIDUALS}"
        )
    return None


def run_mode(
    mode: Mode,
    data: DataSet,
    s: Split,
    folder: Path,
    features: dict[str, bool],
    timed: int,
    train: TrainOptions | None = None,
) -> ModeResult:
    result = ModeResult(mode.name, "ran")
    started = time.perf_counter()
    if mode.recipe is not None and (why := cannot_train(s)):
        result.status, result.reason = "not run", why
        log.warning("%s on %s: not run: %s", mode.name, data.key, why)
        return result
    case: Case | None = None
    try:
        case = prepare_case(data, s, folder, features, train)
        prepared = mode.prepare(case)
        result.notes = list(prepared.notes)
        result.setup_s = time.perf_counter() - started
        args = ["evaluate", str(case.queries_csv), "--images", str(data.images)]
        if data.species_filter:
            args.append("--species-filter")
        try:
            done = case.cli.whaleid(*args, *prepared.evaluate_args, timeout=3600)
        except CommandFailed as e:
            if not prepared.evaluate_args:
                raise
            # The setup worked but evaluate does not take this mode's arguments yet.
            raise ModeUnavailable(str(e)) from e
        result.summary = json.loads(done.stdout)
        result.evaluate_s = done.seconds
        sample = take(list(s.queries), timed, random.Random(SEED))
        try:
            result.latency_ms = timed_identify(case, sample)
        except (CommandFailed, httpx.HTTPError) as e:
            result.notes.append(f"timed /identify failed: {e}")
    except ModeUnavailable as e:
        result.status, result.reason = "not run", str(e)
        log.warning("%s on %s: not run: %s", mode.name, data.key, e)
    except CommandFailed as e:
        result.status, result.reason = "failed", str(e)
        log.error("%s on %s failed: %s", mode.name, data.key, e)
    if case is not None:
        result.training = dict(case.training)
    result.wall_s = time.perf_counter() - started
    return result


def all_new_map5(s: Split, chance_known: float) -> float:
    """MAP@5 of answering ``new_individual`` first for every query (1 on unseen queries; the
    known ones get what a random order of the rest gives them at ranks 2 to 5)."""
    if not s.queries:
        return 0.0
    unseen = sum(q.individual_id in s.unseen for q in s.queries)
    known = len(s.queries) - unseen
    return (unseen + known * chance_known) / len(s.queries)


def known_after_new(s: Split, data: DataSet) -> float:
    """Expected AP of a known query when ``new_individual`` is first and the rest random."""
    per_species: dict[str, set[str]] = defaultdict(set)
    for p in s.gallery:
        per_species[p.species].add(p.individual_id)
    everyone = {p.individual_id for p in s.gallery}
    values = []
    for q in s.queries:
        if q.individual_id in s.unseen:
            continue
        n = len(per_species[q.species] if data.species_filter else everyone)
        values.append(sum(1.0 / r for r in range(2, min(TOP, n + 1) + 1)) / n)
    return sum(values) / len(values) if values else 0.0


def measure(
    data: DataSet,
    modes: Sequence[Mode],
    scratch: Path,
    features: dict[str, bool],
    args: argparse.Namespace,
) -> SetResult:
    s = split(data, args.seed, args.max_queries)
    counts = s.counts()
    log.info("%s: %s", data.key, counts)
    if args.retrain:
        for recipe in sorted({m.recipe for m in modes if m.recipe is not None}):
            run = scratch / data.key / "runs" / recipe
            if run.exists():
                log.info("--retrain: deleting %s", run)
                shutil.rmtree(run)
    results = []
    for mode in modes:
        log.info("%s: mode %s", data.key, mode.name)
        results.append(
            run_mode(
                mode, data, s, scratch / data.key / mode.name, features, args.timed, args.train
            )
        )
    return SetResult(
        data.key,
        data.title,
        data.protocol,
        data.reading,
        data.species_filter,
        counts,
        chance_map5(data, s),
        all_new_map5(s, known_after_new(s, data)),
        results,
    )


# --------------------------------------------------------------------------- the report


def environment() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "load": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def render(results: dict[str, Any]) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["f3"] = lambda v: "–" if v is None else f"{v:.3f}"
    return env.get_template(TEMPLATE.name).render(**results)


# --------------------------------------------------------------------------- main


def _shared_data() -> Path:
    """../shared/data beside the checkout (or beside the worktrees' folder)."""
    for parent in ROOT.parents[:2]:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return ROOT.parent / "shared" / "data"


REAL_SETS: dict[str, Callable[[Path, Path], DataSet]] = {
    "holstein_cow_faces_holstein2025": lambda folder, scratch: holstein(folder),
    "orl_faces": orl,
    "marine_photoid_kabuga": lambda folder, scratch: kabuga(folder),
    "harbour_seals_pieterburen": lambda folder, scratch: seals(folder),
    "dolphin_fins_moray": lambda folder, scratch: dolphins(folder),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=_shared_data())
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/quality-scratch"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "identification-quality.md")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    parser.add_argument(
        "--sets", default=",".join([*REAL_SETS, "synthetic"]), help="comma-separated"
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--max-queries", type=int, help="cap every set's queries (seeded)")
    parser.add_argument("--timed", type=int, default=40, help="timed /identify per set and mode")
    parser.add_argument(
        "--render-only", action="store_true", help="write the doc from the last results.json"
    )
    training = parser.add_argument_group(
        "trained modes", f"{', '.join(m for m in MODES if MODES[m].recipe)}"
    )
    training.add_argument(
        "--train-config",
        action="append",
        default=[],
        metavar="[RECIPE=]PATH",
        help="train recipe RECIPE (scratch, frozen or finetuned; every recipe without RECIPE=) "
        "with this config file instead of its own under training/configs, e.g. "
        "demo/config.json for a quick check; repeatable",
    )
    training.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more `--set KEY=VALUE` for every training run (after the recipe's own), e.g. "
        "epochs=2; repeatable",
    )
    training.add_argument(
        "--train-python",
        type=Path,
        default=TRAIN_PYTHON,
        help="the interpreter of the training virtualenv (default .venv-train/bin/python)",
    )
    training.add_argument(
        "--service-tolerance",
        type=float,
        help="passed to whaleid-export: the least cosine between TensorFlow's embedding (as "
        "trained) and the service embedder's of the run's parity photos (default: the "
        "exporter's, 0.999)",
    )
    training.add_argument(
        "--train-timeout",
        type=float,
        default=TRAIN_TIMEOUT / 60,
        metavar="MINUTES",
        help="stop a training command after this long (default %(default).0f); the run folder "
        "stays, so the next bench run resumes it from its last finished epoch",
    )
    training.add_argument(
        "--retrain",
        action="store_true",
        help="delete the sets' cached runs of the requested trained modes and train again "
        "(otherwise a finished run of the same config, overrides and gallery is reused)",
    )
    return parser


def train_options(args: argparse.Namespace) -> TrainOptions:
    configs: dict[str, Path] = {}
    for text in args.train_config:
        recipe, sep, path = text.partition("=") if "=" in text else ("*", "", text)
        if sep and recipe not in RECIPES:
            raise SystemExit(
                f"--train-config {text}: no recipe {recipe!r} (of {', '.join(RECIPES)})"
            )
        configs[recipe] = Path(path).resolve()
    for text in args.train_set:
        if "=" not in text.strip("="):
            raise SystemExit(f"--train-set {text}: write KEY=VALUE")
    return TrainOptions(
        configs,
        tuple(args.train_set),
        args.train_python.absolute(),
        args.service_tolerance,
        args.train_timeout * 60,
    )


def selected_modes(text: str) -> list[Mode]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)} (of {', '.join(MODES)})")
    return [MODES[m] for m in names]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.train = train_options(args)
    args.selected = selected_modes(args.modes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    results_json = scratch / "results.json"
    if not args.render_only:
        started = time.perf_counter()
        results = measure_all(args, scratch)
        results["wall_min"] = (time.perf_counter() - started) / 60
        results_json.write_text(json.dumps(results, indent=2))
        log.info("results in %s", results_json)
    results = json.loads(results_json.read_text())
    args.out.write_text(render(results))
    log.info("wrote %s", args.out)
    return 0


def measure_all(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    modes: list[Mode] = args.selected
    wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    env = environment()
    features = capabilities(Cli(None, scratch / "logs"))
    log.info("whaleid evaluate accepts: %s", features)
    sets = []
    for key in tqdm(wanted, desc="sets", unit="set"):
        started = time.perf_counter()
        if key == "synthetic":
            data = synthetic(scratch, Cli(None, scratch / "logs"))
        elif (args.data / key / "labels.csv").exists():
            data = REAL_SETS[key](args.data / key, scratch)
        else:
            log.warning("no %s under %s: skipped", key, args.data)
            continue
        result = measure(data, modes, scratch, features, args)
        result.setup_s = time.perf_counter() - started
        sets.append(asdict(result))
    return {
        "env": env,
        "features": features,
        "modes_requested": [m.name for m in modes],
        "seed": args.seed,
        "command": " ".join(
            ["PYTHONPATH=$PWD .venv/bin/python bench/quality.py", *map(shlex.quote, args.argv)]
        ),
        "sets": sets,
    }


if __name__ == "__main__":
    raise SystemExit(main())
