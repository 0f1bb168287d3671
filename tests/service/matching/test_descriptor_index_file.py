"""The compressed descriptor index saved beside the gallery's: a replica reads it back and
replays only the photos that changed since, and a missing, damaged or foreign file is rebuilt
from the stored features, never trusted."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from service.gallery.sync import Filters, GalleryEntries
from service.matching.features import Features
from service.matching.local import DescriptorIndex, IndexFileError, LocalMatcher, sidecar_path

from .test_descriptor_index import PHOTOS, _gallery, _view

EXTRACTOR = "rootsift-test"


class _Counted:
    """The stored features rows, counting the photos read."""

    def __init__(self, features: dict[int, Features]) -> None:
        self.features = features
        self.read: list[int] = []

    def get(self, image_ids: Iterable[int]) -> dict[int, Features]:
        wanted = list(image_ids)
        self.read.extend(wanted)
        return {i: self.features[i] for i in wanted if i in self.features}


def _entries(ids: Iterable[int]) -> GalleryEntries:
    return GalleryEntries.from_rows([(i, i, f"animal-{i}", None, None, None, None) for i in ids])


def _matcher(store: _Counted, path: Path) -> LocalMatcher:
    return LocalMatcher(store, compressed_photos=150, path=path, extractor=EXTRACTOR)  # type: ignore[arg-type]


def _answers(matcher: LocalMatcher, entries: GalleryEntries, queries: list[Features]) -> list:
    return [
        [
            (e.label, e.photos, e.votes)
            for e in matcher.candidates(q, entries, Filters(), top=5, photos=2)
        ]
        for q in queries
    ]


def test_a_replica_reads_the_saved_index_and_replays_only_what_changed(tmp_path: Path) -> None:
    features, _ = _gallery(PHOTOS)
    path = tmp_path / "local.faiss"
    built = _matcher(_Counted(features), path)
    built.sync(_entries(range(1, 201)))  # compressed at once, and saved
    assert built.descriptors.compressed and path.exists() and sidecar_path(path).exists()

    now = _entries(range(3, PHOTOS + 1))  # since the save: photos 1-2 left, 201-240 joined
    built.sync(now)
    store = _Counted(features)
    replica = _matcher(store, path)
    replica.sync(now)
    assert replica.descriptors.compressed and replica.builder is None
    assert sorted(store.read) == list(range(201, PHOTOS + 1))  # nothing else read
    assert replica.descriptors.images == built.descriptors.images == set(range(3, PHOTOS + 1))
    assert replica.descriptors.count == built.descriptors.count
    rng = np.random.default_rng(7)
    queries = [_view(features[i], rng) for i in (1, 17, 150, 222)]
    assert _answers(replica, now, queries) == _answers(built, now, queries)
    assert _answers(replica, now, queries[1:])[0][0][0] == "animal-17"


@pytest.mark.parametrize("damage", ["flipped", "truncated", "sidecar", "extractor", "missing"])
def test_a_damaged_or_foreign_saved_index_is_rebuilt(tmp_path: Path, damage: str) -> None:
    features, entries = _gallery(PHOTOS)
    path = tmp_path / "local.faiss"
    _matcher(_Counted(features), path).sync(entries)
    data = bytearray(path.read_bytes())
    side = sidecar_path(path)
    if damage == "flipped":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "sidecar":
        side.write_text("{not json")
    elif damage == "extractor":
        sidecar = json.loads(side.read_text())
        side.write_text(json.dumps({**sidecar, "extractor": "another"}))
    else:
        path.unlink()
    with pytest.raises(IndexFileError):
        DescriptorIndex.load(path, EXTRACTOR)

    store = _Counted(features)
    replica = _matcher(store, path)
    replica.sync(entries)  # rebuilt from every stored photo, then saved again
    assert set(store.read) == set(features)
    assert replica.descriptors.compressed and replica.descriptors.images == set(features)
    rng = np.random.default_rng(9)
    query = _view(features[101], rng)
    assert replica.candidates(query, entries, Filters(), top=5, photos=1)[0].label == "animal-101"
    assert DescriptorIndex.load(path, EXTRACTOR).count == replica.descriptors.count
