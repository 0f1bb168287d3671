"""Training data: catalogue rows, individual-level splits, photo sources and tf.data pipelines.

A source is either a Happywhale-style CSV + image folder, or TFRecord shards (local or ``gs://``,
read through ``tf.io.gfile``) written by ``whaleid-train shards`` with a ``manifest.csv`` beside
them. Photos whose EXIF orientation rotates them, or in a format TensorFlow does not decode, are
stored upright as PNG (decoded by the service's ``decode_photo``), so training sees them as the
service does.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import tensorflow as tf
from PIL import Image
from tqdm import tqdm

from service.catalogue.csv_file import read_catalogue
from service.contract import Preprocessing
from service.imaging import decode_photo
from service.knn import NEW_INDIVIDUAL
from service.settings import Settings
from training.augment import augmented_input, decode
from training.config import Augmentation

log = logging.getLogger(__name__)

MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default
MANIFEST = "manifest.csv"
AUTOTUNE = tf.data.AUTOTUNE
_PASS_THROUGH_FORMATS = ("JPEG", "PNG")


@dataclass(frozen=True)
class Entry:
    """One catalogue photo: its name (relative to the image folder), species and individual."""

    image: str
    species: str
    individual_id: str


def read_entries(csv_path: Path) -> list[Entry]:
    """The usable rows of a catalogue CSV (same reader as ``whaleid import``)."""
    entries = []
    for row in read_catalogue(csv_path):
        if isinstance(row, tuple):
            log.warning("%s line %d: %s (skipped)", csv_path, *row)
            continue
        entries.append(Entry(row.image, row.species, row.individual_id))
    return entries


def _hash(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


@dataclass
class Split:
    """Train photos; validation gallery and queries. Every individual lives in one fold."""

    train: list[Entry]
    gallery: list[Entry] = field(default_factory=list)
    queries: list[Entry] = field(default_factory=list)
    unseen: set[str] = field(default_factory=set)

    @property
    def classes(self) -> list[str]:
        """Training individuals, in class-index order."""
        return sorted({e.individual_id for e in self.train})

    def truth(self, entry: Entry) -> str:
        return NEW_INDIVIDUAL if entry.individual_id in self.unseen else entry.individual_id

    def summary(self) -> dict[str, int]:
        val_known = {e.individual_id for e in self.gallery}
        return {
            "train_photos": len(self.train),
            "train_individuals": len(self.classes),
            "val_gallery_photos": len(self.gallery),
            "val_queries": len(self.queries),
            "val_known_individuals": len(val_known),
            "val_unseen_individuals": len(self.unseen),
        }


def split_catalogue(
    entries: Sequence[Entry],
    *,
    folds: int,
    validation_fold: int,
    unseen_fraction: float,
    gallery_fraction: float,
    seed: int,
) -> Split:
    """Assign individuals to folds (per species, in turn, in a seeded hash order, so each fold
    gets its share of every species); hold out ``unseen_fraction`` of the validation individuals
    as unseen (all their photos are queries whose answer is ``new_individual``); split the other
    validation individuals' photos into gallery and queries."""
    by_individual: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_individual[e.individual_id].append(e)
    if folds <= 1:
        return Split(list(entries))
    by_species: dict[str, list[str]] = defaultdict(list)
    for ind, photos in by_individual.items():
        by_species[photos[0].species].append(ind)
    validation: list[str] = []
    for species in sorted(by_species):
        ordered = sorted(by_species[species], key=lambda i: _hash(seed, i))
        validation += [ind for n, ind in enumerate(ordered) if n % folds == validation_fold]
    validation.sort(key=lambda i: _hash(seed + 1, i))
    n_unseen = round(len(validation) * unseen_fraction)
    if unseen_fraction > 0 and len(validation) >= 2:
        n_unseen = max(1, n_unseen)
    unseen = set(validation[:n_unseen])
    val_set = set(validation)
    split = Split([e for e in entries if e.individual_id not in val_set], unseen=unseen)
    for ind in validation:
        photos = sorted(by_individual[ind], key=lambda e: _hash(seed, e.image))
        if ind in unseen:
            split.queries += photos
            continue
        # at least one photo in the gallery, and one query when there are two or more
        wanted = max(1, math.ceil(len(photos) * gallery_fraction))
        in_gallery = max(1, min(len(photos) - 1, wanted))
        split.gallery += photos[:in_gallery]
        split.queries += photos[in_gallery:]
    return split


def upright_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> bytes:
    """The photo as TensorFlow should decode it: unchanged when it is a plain RGB/grey JPEG or
    PNG without EXIF rotation, else decoded as the service does and re-encoded losslessly."""
    with Image.open(io.BytesIO(data)) as image:
        try:
            orientation = int(image.getexif().get(0x0112, 1))
        except Exception:  # a broken EXIF block: the service treats it as unrotated too
            orientation = 1
        if (
            image.format in _PASS_THROUGH_FORMATS
            and orientation == 1
            and image.mode in ("RGB", "L")
        ):
            return data
    photo = decode_photo(data, max_pixels=max_pixels)
    buf = io.BytesIO()
    photo.image.save(buf, format="PNG")
    return buf.getvalue()


class PhotoSource(Protocol):
    """Where the photos of a catalogue come from."""

    entries: list[Entry]

    def read(self, entries: Sequence[Entry]) -> Iterator[tuple[Entry, bytes]]:
        """The stored bytes of these photos (for evaluation through the service's decoder)."""
        ...

    def dataset(self, entries: Sequence[Entry]) -> tf.data.Dataset:
        """(image bytes, individual_id) of these photos, for tf.data."""
        ...


class CsvSource:
    """A catalogue CSV and the folder its ``image`` column is relative to."""

    def __init__(self, csv_path: Path, images: Path, cache_dir: Path | None = None) -> None:
        self.csv_path = csv_path
        self.images = images
        self.cache_dir = cache_dir
        self.entries = read_entries(csv_path)

    def read(self, entries: Sequence[Entry]) -> Iterator[tuple[Entry, bytes]]:
        for e in entries:
            yield e, (self.images / e.image).read_bytes()

    def _decodable_path(self, entry: Entry) -> str:
        path = self.images / entry.image
        data = path.read_bytes()
        upright = upright_bytes(data)
        if upright is data:
            return str(path)
        if self.cache_dir is None:
            raise ValueError(f"{path} needs converting to an upright PNG: give a cache_dir")
        target = self.cache_dir / (_hash(0, entry.image)[:24] + ".png")
        if not target.exists():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            target.write_bytes(upright)
        return str(target)

    def dataset(self, entries: Sequence[Entry]) -> tf.data.Dataset:
        paths = [self._decodable_path(e) for e in tqdm(entries, desc="check photos", unit="photo")]
        ids = [e.individual_id for e in entries]
        ds = tf.data.Dataset.from_tensor_slices((paths, ids))
        return ds.map(lambda p, i: (tf.io.read_file(p), i), num_parallel_calls=tf.data.AUTOTUNE)


_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "name": tf.io.FixedLenFeature([], tf.string),
    "species": tf.io.FixedLenFeature([], tf.string),
    "individual_id": tf.io.FixedLenFeature([], tf.string),
}


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _example(entry: Entry, data: bytes) -> bytes:
    features = {
        "image": _bytes_feature(data),
        "name": _bytes_feature(entry.image.encode()),
        "species": _bytes_feature(entry.species.encode()),
        "individual_id": _bytes_feature(entry.individual_id.encode()),
    }
    example = tf.train.Example(features=tf.train.Features(feature=features))
    serialised: bytes = example.SerializeToString()
    return serialised


def write_shards(
    entries: Sequence[Entry],
    images: Path,
    out: str,
    *,
    photos_per_shard: int = 1000,
    seed: int = 0,
) -> list[str]:
    """Write the photos (upright, see ``upright_bytes``) as TFRecord shards under ``out`` (a
    folder or ``gs://`` prefix) in a seeded shuffled order, and ``manifest.csv`` listing them."""
    ordered = sorted(entries, key=lambda e: _hash(seed, e.image))
    count = max(1, math.ceil(len(ordered) / photos_per_shard))
    tf.io.gfile.makedirs(out)
    names = [f"shard-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]
    rows = []
    bar = tqdm(total=len(ordered), desc="shards", unit="photo")
    for i, name in enumerate(names):
        chunk = ordered[i * photos_per_shard : (i + 1) * photos_per_shard]
        with tf.io.TFRecordWriter(f"{out.rstrip('/')}/{name}") as writer:
            for e in chunk:
                writer.write(_example(e, upright_bytes((images / e.image).read_bytes())))
                rows.append((e.image, e.species, e.individual_id, name))
                bar.update()
    bar.close()
    with tf.io.gfile.GFile(f"{out.rstrip('/')}/{MANIFEST}", "w") as f:
        buf = io.StringIO()
        writer_csv = csv.writer(buf)
        writer_csv.writerow(["image", "species", "individual_id", "shard"])
        writer_csv.writerows(rows)
        f.write(buf.getvalue())
    log.info("wrote %d photos in %d shards under %s", len(rows), count, out)
    return names


class ShardSource:
    """TFRecord shards written by ``write_shards`` (a local folder or a ``gs://`` prefix)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder.rstrip("/")
        manifest = f"{self.folder}/{MANIFEST}"
        if not tf.io.gfile.exists(manifest):
            raise FileNotFoundError(
                f"{manifest} not found: write the shards with `whaleid-train shards`"
            )
        with tf.io.gfile.GFile(manifest) as f:
            rows = list(csv.DictReader(io.StringIO(f.read())))
        self.entries = [Entry(r["image"], r["species"], r["individual_id"]) for r in rows]
        self.files = sorted({f"{self.folder}/{r['shard']}" for r in rows})

    def _records(self) -> tf.data.Dataset:
        files = tf.data.Dataset.from_tensor_slices(self.files)
        ds = files.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(16, len(self.files)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
        return ds.map(
            lambda r: tf.io.parse_single_example(r, _FEATURES), num_parallel_calls=tf.data.AUTOTUNE
        )

    def dataset(self, entries: Sequence[Entry]) -> tf.data.Dataset:
        wanted = tf.constant(sorted({e.image for e in entries}) or [""])
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(wanted, tf.ones_like(wanted, dtype=tf.int32)), 0
        )
        ds = self._records().filter(lambda r: table.lookup(r["name"]) > 0)
        return ds.map(lambda r: (r["image"], r["individual_id"]))

    def read(self, entries: Sequence[Entry]) -> Iterator[tuple[Entry, bytes]]:
        by_name = {e.image: e for e in entries}
        for record in self._records().as_numpy_iterator():
            entry = by_name.get(record["name"].decode())
            if entry is not None:
                yield entry, bytes(record["image"])


def open_source(
    *, catalogue: str | None, images: str | None, shards: str | None, cache_dir: Path
) -> PhotoSource:
    if shards is not None:
        return ShardSource(shards)
    assert catalogue is not None and images is not None
    return CsvSource(Path(catalogue), Path(images), cache_dir)


def class_table(classes: Sequence[str]) -> tf.lookup.StaticHashTable:
    """individual_id -> class index; -1 for individuals not trained on."""
    keys = tf.constant(list(classes))
    values = tf.range(len(classes), dtype=tf.int32)
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), -1)


def photo_counts(entries: Iterable[Entry]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for e in entries:
        counts[e.individual_id] += 1
    return dict(counts)


def training_dataset(
    source: PhotoSource,
    split: Split,
    *,
    spec: Preprocessing,
    augmentation: Augmentation,
    global_batch: int,
    shuffle_buffer: int,
    cache_decoded: bool,
    seed: int,
) -> tf.data.Dataset:
    """Endless, shuffled, augmented ``({"image", "label"}, label)`` batches of the train fold."""
    table = class_table(split.classes)
    ds = source.dataset(split.train)
    ds = ds.map(lambda data, ind: (data, table.lookup(ind)))
    ds = ds.filter(lambda _, label: label >= 0)
    if cache_decoded:
        ds = ds.map(
            lambda data, label: (decode(data, spec.input_size), label), num_parallel_calls=AUTOTUNE
        ).cache()
    ds = ds.shuffle(min(shuffle_buffer, max(len(split.train), 1)), seed=seed).repeat()
    # the n-th example of the endless stream is augmented with the stateless seed (seed, n), so
    # a run repeats exactly however the parallel map's threads are scheduled
    ds = ds.enumerate()

    def example(
        n: tf.Tensor, pair: tuple[tf.Tensor, tf.Tensor]
    ) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        item, label = pair
        image = item if cache_decoded else decode(item, spec.input_size)
        draws = tf.stack([tf.constant(seed, tf.int64), n])
        return {"image": augmented_input(image, spec, augmentation, draws), "label": label}, label

    ds = ds.map(example, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(global_batch, drop_remainder=True).prefetch(AUTOTUNE)
    # tf.data's documented default, said explicitly: left unset, the same run trained twice
    # under model.fit (TF 2.21, CPU) sometimes ended with other weights; set, it repeats.
    # Sharded sources still interleave their files in any order (deterministic=False there).
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)
