"""The local matcher's compressed descriptor index (PCA, IVF, 6-bit scalar codes, real faiss)
and its rebuild in the background: answers keep coming from the index in use until the new one
replaces it."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from service.gallery.sync import Filters, GalleryEntries
from service.matching.features import DIM, Features
from service.matching.local import DescriptorIndex, LocalMatcher, _labels_by_image

PHOTOS = 240
PER_PHOTO = 60
PLANTED = 17  # the photo the query is a view of


def _photo(rng: np.random.Generator, n: int = PER_PHOTO) -> Features:
    """RootSIFT-like descriptors (non-negative, sparse, bytes) at random points."""
    raw = rng.gamma(0.6, 1.0, (n, DIM)) * (rng.random((n, DIM)) < 0.6)
    unit = np.sqrt(raw / np.maximum(raw.sum(axis=1, keepdims=True), 1e-9))
    descriptors = np.clip(np.rint(unit * 512), 0, 255).astype(np.uint8)
    return Features(rng.uniform(0, 300, (n, 2)).astype(np.float32), descriptors, 300, 300)


def _view(photo: Features, rng: np.random.Generator) -> Features:
    """Another photo of the same pattern: noisy descriptors, half of them."""
    keep = rng.permutation(len(photo))[: len(photo) // 2]
    noisy = photo.descriptors[keep].astype(np.float32) + rng.normal(0, 6, (len(keep), DIM))
    descriptors = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return Features(photo.points[keep], descriptors, photo.width, photo.height)


class _Stored:
    """The features rows of a gallery (image id -> features), as ``FeatureStore.get`` reads them;
    ``gate``, when set, holds back reads from the background builder until it is opened."""

    def __init__(self, features: dict[int, Features]) -> None:
        self.features = features
        self.gate: threading.Event | None = None
        self.builder_waiting = threading.Event()

    def get(self, image_ids: Iterable[int]) -> dict[int, Features]:
        if self.gate is not None and threading.current_thread().name == "descriptor-index":
            self.builder_waiting.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return {i: self.features[i] for i in image_ids if i in self.features}


def _gallery(photos: int) -> tuple[dict[int, Features], GalleryEntries]:
    rng = np.random.default_rng(3)
    features = {i: _photo(rng) for i in range(1, photos + 1)}
    rows = [(i, i, f"animal-{i}", None, None, None, None) for i in features]
    return features, GalleryEntries.from_rows(rows)


def _first(matcher: LocalMatcher, query: Features, entries: GalleryEntries) -> str:
    return matcher.candidates(query, entries, Filters(), top=5, photos=1)[0].label


def test_the_compressed_index_ranks_a_planted_match_first() -> None:
    features, entries = _gallery(PHOTOS)
    index = DescriptorIndex.built([features], features, PHOTOS * PER_PHOTO)
    assert index.compressed and index.count == PHOTOS * PER_PHOTO
    # 72 bytes of codes (96 PCA components, 6 bits each) and an 8-byte id a descriptor, against
    # 512 for the float vectors.
    assert index.nbytes() < 90 * index.count
    matcher = LocalMatcher(_Stored(features), compressed_photos=1)  # type: ignore[arg-type]
    matcher.sync(entries)
    assert matcher.descriptors.compressed
    rng = np.random.default_rng(11)
    for planted in (PLANTED, 101, 222):
        assert _first(matcher, _view(features[planted], rng), entries) == f"animal-{planted}"
    matcher.descriptors.remove({PLANTED})
    assert _first(matcher, _view(features[PLANTED], rng), entries) != f"animal-{PLANTED}"


def test_a_rebuild_in_the_background_keeps_answering_from_the_index_in_use() -> None:
    features, entries = _gallery(PHOTOS)
    small = GalleryEntries.from_rows(
        [(i, i, f"animal-{i}", None, None, None, None) for i in range(1, 101)]
    )
    store = _Stored(features)
    matcher = LocalMatcher(store, compressed_photos=150)  # type: ignore[arg-type]
    matcher.sync(small)  # 100 photos: the exact index, built at once
    old = matcher.descriptors
    assert not old.compressed and matcher.builder is None
    store.gate = threading.Event()
    matcher.sync(entries)  # 240 photos: a compressed index is due, built in the background
    assert store.builder_waiting.wait(30)
    rng = np.random.default_rng(5)
    query = _view(features[200], rng)  # a photo that joined with this sync
    answers: list[str] = []
    asking = threading.Thread(target=lambda: answers.append(_first(matcher, query, entries)))
    asking.start()
    asking.join(10)  # no lock is held across the build: the answer does not wait for it
    assert answers == ["animal-200"]
    assert matcher.descriptors is old and len(old.images) == PHOTOS
    store.gate.set()
    assert matcher.builder is not None
    matcher.builder.join(60)
    assert matcher.descriptors is not old and matcher.descriptors.compressed
    assert matcher.descriptors.images == set(features)
    assert _first(matcher, query, entries) == "animal-200"


def test_photos_that_come_and_go_during_a_rebuild_are_replayed_into_the_new_index() -> None:
    features, entries = _gallery(PHOTOS)
    store = _Stored(features)
    matcher = LocalMatcher(store, compressed_photos=150)  # type: ignore[arg-type]
    first = GalleryEntries.from_rows(
        [(i, i, f"animal-{i}", None, None, None, None) for i in range(1, 201)]
    )
    matcher.sync(first)  # 200 photos: compressed at once (nothing to answer from yet)
    assert matcher.descriptors.compressed and matcher.builder is None
    # Grown fourfold past its training: rebuilt in the background while photos change.
    matcher.descriptors.trained_on = 10
    store.gate = threading.Event()
    matcher.sync(entries)
    assert store.builder_waiting.wait(30)
    later = GalleryEntries.from_rows(
        [(i, i, f"animal-{i}", None, None, None, None) for i in range(2, PHOTOS + 1)]
    )
    matcher.sync(later)  # photo 1 leaves during the build
    store.gate.set()
    assert matcher.builder is not None
    matcher.builder.join(60)
    assert matcher.descriptors.images == set(range(2, PHOTOS + 1))
    assert matcher.descriptors.trained_on > 10


def test_the_vote_reads_each_gallery_photos_individual_within_the_filters() -> None:
    """The vote's image -> individual map: built once per gallery version when nothing is
    filtered out (it cost the vote 28 ms a query at 100k photos), and only the photos within a
    request's filters when it has them."""
    rows = [
        (i, 100 + i, f"ind-{i % 3}", "seal" if i % 2 else "dolphin", None, None, f"enc-{i}")
        for i in range(1, 9)
    ]
    entries = GalleryEntries.from_rows(rows)
    everything = _labels_by_image(entries, Filters())
    assert everything == {100 + i: f"ind-{i % 3}" for i in range(1, 9)}
    assert _labels_by_image(entries, Filters()) is everything  # not rebuilt per query
    seals = _labels_by_image(entries, Filters(species="seal"))
    assert seals == {100 + i: f"ind-{i % 3}" for i in range(1, 9) if i % 2}
    later = entries.patched(np.array([101]), [(1, 101, "ind-9", "seal", None, None, "enc-1")])
    assert _labels_by_image(later, Filters())[101] == "ind-9"  # a new version, a new map
    assert everything[101] == "ind-1"


def test_many_photos_leave_in_a_few_passes_and_only_they_do() -> None:
    features, _ = _gallery(PHOTOS)
    index = DescriptorIndex.built([features], features, PHOTOS * PER_PHOTO)
    leaving = set(range(1, 201))  # two passes of REMOVE_BATCH
    index.remove(leaving | {9999})  # a photo it never held changes nothing
    assert index.count == int(index.index.ntotal) == (PHOTOS - 200) * PER_PHOTO
    assert index.images == set(range(201, PHOTOS + 1))
    _, ids = index.search(features[230], 1)
    assert set((ids[:, 0] >> 11).tolist()) <= index.images
