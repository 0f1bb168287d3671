"""The split of ``bench/quality.py``: a set's photos dealt by encounter into gallery, queries and
calibration (no encounter on two sides; about a fifth of the individuals unseen), the catalogue
CSVs the command line reads, and the chance baselines the report compares with."""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.quality_data import CALIBRATION_CAP, DataSet, Photo

SEED = 0
NEW_INDIVIDUAL = "new_individual"
TOP = 5
# Training needs at least two individuals in the gallery (the trainer's ArcFace classes).
MIN_TRAIN_INDIVIDUALS = 2


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
    """A catalogue CSV (``service.catalogue.csv_file``): image, species, individual_id and
    encounter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "species", "individual_id", "encounter"])
        for p in photos:
            writer.writerow([p.image, p.species, p.individual_id, p.encounter[:200]])
    return path


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


def cannot_train(s: Split) -> str | None:
    """Why the split's gallery cannot be trained on, or None."""
    individuals = s.counts()["gallery_individuals"]
    if individuals < MIN_TRAIN_INDIVIDUALS:
        return (
            f"the gallery holds {individuals} individual(s): training needs at least "
            f"{MIN_TRAIN_INDIVIDUALS}"
        )
    return None
