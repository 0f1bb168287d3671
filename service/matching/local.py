"""The built-in ``local-features`` matcher's search: every gallery descriptor in one faiss index,
each query descriptor voting for the individuals among its nearest descriptors (LNBNN, in the
spirit of HotSpotter: a vote is worth how much nearer the neighbour is than the ``k + 1``-th),
then the best few individuals verified geometrically (``matching.verify``).

The index follows the model's gallery (``gallery.sync``): after each sync, the photos that
joined are added and those that left are removed, by image id.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from service.gallery.sync import Filters, GalleryEntries
from service.matching.features import DIM, Features, FeatureStore
from service.matching.matcher import Context, Matcher, Need, Query
from service.matching.verify import Evidence, best_photos

log = logging.getLogger(__name__)

_SHIFT = 11  # descriptor id = image id << 11 | keypoint number (features_count <= 2000)
K = 5  # neighbours that vote, per query descriptor; the (K + 1)-th is the normaliser


class DescriptorIndex:
    """The gallery's descriptors, by image. Exact (inner product of unit RootSIFT vectors) up to
    ``ivf_threshold`` descriptors, then an IVF index with 8-bit scalar quantisation (136 bytes a
    descriptor), rebuilt as such when it outgrows the exact one."""

    def __init__(self, ivf_threshold: int = 20_000) -> None:
        self.ivf_threshold = ivf_threshold
        self.index: faiss.Index = self._flat()
        self.images: set[int] = set()
        self.count = 0

    @staticmethod
    def _flat() -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))

    def _ivf(self, sample: np.ndarray) -> faiss.Index:
        nlist = int(min(1024, max(64, np.sqrt(self.count))))
        quantizer = faiss.IndexFlatIP(DIM)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, DIM, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        index.train(sample)
        index.nprobe = 8
        return index

    @property
    def exact(self) -> bool:
        return isinstance(self.index, faiss.IndexIDMap2)

    def add(self, found: dict[int, Features]) -> None:
        vectors, ids = [], []
        for image_id, features in found.items():
            if image_id in self.images or not len(features):
                self.images.add(image_id)
                continue
            vectors.append(features.unit)
            ids.append((image_id << _SHIFT) + np.arange(len(features), dtype=np.int64))
            self.images.add(image_id)
        if not vectors:
            return
        matrix, id_array = np.concatenate(vectors), np.concatenate(ids)
        self.index.add_with_ids(matrix, id_array)
        self.count += len(matrix)
        if self.exact and self.count > self.ivf_threshold:
            self._to_ivf()

    def _to_ivf(self) -> None:
        mapped: Any = self.index
        flat: Any = faiss.downcast_index(mapped.index)
        everything = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * DIM).reshape(-1, DIM).copy()
        ids = faiss.vector_to_array(mapped.id_map).copy()
        rng = np.random.default_rng(0)
        sample = everything[rng.choice(len(everything), min(len(everything), 50_000), False)]
        index = self._ivf(sample)
        index.add_with_ids(everything, ids)
        self.index = index
        log.info("local features: %d descriptors moved to an IVF index", len(everything))

    def remove(self, image_ids: set[int]) -> None:
        for image_id in image_ids & self.images:
            removed = self.index.remove_ids(
                faiss.IDSelectorRange(image_id << _SHIFT, (image_id + 1) << _SHIFT)
            )
            self.count -= int(removed)
        self.images -= image_ids

    def search(self, query: Features, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and descriptor ids of each query descriptor's ``k`` nearest."""
        k = min(k, self.count)
        if k == 0 or not len(query):
            return np.zeros((len(query), 0), np.float32), np.zeros((len(query), 0), np.int64)
        similarity, ids = self.index.search(query.unit, k)
        return np.maximum(2.0 - 2.0 * similarity, 0.0), ids


class LocalMatcher:
    """The descriptor index of one gallery, kept in step with it, and the LNBNN vote."""

    def __init__(self, store: FeatureStore, ivf_threshold: int = 20_000) -> None:
        self.store = store
        self.descriptors = DescriptorIndex(ivf_threshold)
        self._lock = threading.Lock()

    def sync(self, entries: GalleryEntries) -> None:
        """Add the gallery photos the index lacks, remove those that left the gallery."""
        current = set(entries.image_ids.tolist())
        with self._lock:
            joined = current - self.descriptors.images
            left = self.descriptors.images - current
        found = self.store.get(sorted(joined)) if joined else {}
        with self._lock:
            self.descriptors.remove(left)
            # A photo without features (unreadable) joins with none, so it is not asked again.
            self.descriptors.add({i: found.get(i, _EMPTY) for i in joined})
        if joined or left:
            log.debug("local features: +%d -%d photos", len(joined), len(left))

    def candidates(
        self,
        query: Features,
        entries: GalleryEntries,
        filters: Filters,
        *,
        top: int,
        photos: int,
    ) -> list[Evidence]:
        """The ``top`` individuals with the largest LNBNN score, each with its ``photos`` most
        voted photos; ``votes`` is how many query descriptors voted for it."""
        with self._lock:
            distances, ids = self.descriptors.search(query, K + 1)
        if distances.shape[1] < 2:
            return []
        label_of = _labels_by_image(entries, filters)
        normaliser = distances[:, -1:]
        scores = np.maximum(normaliser - distances[:, :-1], 0.0)
        images = ids[:, :-1] >> _SHIFT
        per_label: dict[str, float] = defaultdict(float)
        per_image: dict[int, float] = defaultdict(float)
        votes: dict[str, int] = defaultdict(int)
        for row in range(len(images)):
            seen: set[str] = set()
            for image_id, score in zip(images[row].tolist(), scores[row].tolist(), strict=True):
                label = label_of.get(image_id)
                if label is None or label in seen or score <= 0.0:
                    continue  # each query descriptor votes once per individual, its nearest
                seen.add(label)
                per_label[label] += score
                per_image[image_id] += score
                votes[label] += 1
        best = sorted(per_label, key=lambda label: (-per_label[label], label))[:top]
        by_label: dict[str, list[int]] = defaultdict(list)
        for image_id in sorted(per_image, key=lambda i: (-per_image[i], i)):
            label = label_of[image_id]
            if len(by_label[label]) < photos:
                by_label[label].append(image_id)
        return [Evidence(label, None, tuple(by_label[label]), votes[label]) for label in best]

    def weights(self, query: Features, entries: GalleryEntries, filters: Filters) -> np.ndarray:
        """Each query descriptor's distinctiveness over this gallery (``query_weights``)."""
        with self._lock:
            return query_weights(self.descriptors, query, entries, filters)


def query_weights(
    index: DescriptorIndex, query: Features, entries: GalleryEntries, filters: Filters
) -> np.ndarray:
    """(n,) the distinctiveness of each of the query's descriptors among the gallery photos
    within ``filters`` (``distinctiveness``)."""
    distances, ids = index.search(query, K + 1)
    return distinctiveness(distances, ids, _labels_by_image(entries, filters), len(query))


def distinctiveness(
    distances: np.ndarray, ids: np.ndarray, label_of: dict[int, str], count: int
) -> np.ndarray:
    """(count,) weights in [0, 1]: each query descriptor's share of its LNBNN vote (its ``K``
    nearest gallery descriptors, each worth how much nearer it is than the ``K + 1``-th:
    ``distances`` squared, ``ids`` descriptor ids) that goes to the individual it votes most
    for. A point on the animal's pattern votes for one individual (1); a point on mud, water or
    a site photographed again lies near many individuals' and splits its vote (1/n). A
    descriptor with no vote within ``label_of`` keeps its full weight: nothing says it is
    shared."""
    weights = np.ones(count, np.float32)
    if distances.shape[1] < 2:
        return weights
    votes = np.maximum(distances[:, -1:] - distances[:, :-1], 0.0)
    images = ids[:, :-1] >> _SHIFT
    for row in range(count):
        per: dict[str, float] = defaultdict(float)
        for image_id, vote in zip(images[row].tolist(), votes[row].tolist(), strict=True):
            label = label_of.get(image_id)
            if label is not None and vote > 0.0:
                per[label] += vote
        if per:
            weights[row] = max(per.values()) / sum(per.values())
    return weights


_EMPTY = Features(np.zeros((0, 2), np.float32), np.zeros((0, DIM), np.uint8), 0, 0)


def _labels_by_image(entries: GalleryEntries, filters: Filters) -> dict[int, str]:
    """Image id -> catalogue id of the gallery photos within ``filters``."""
    words = entries.vocab["labels"].words
    codes = entries.codes["labels"]
    allowed = entries.select(filters)
    keep = np.ones(len(entries), bool) if allowed is None else np.isin(entries.ids, allowed)
    return {
        int(image_id): str(words[code])
        for image_id, code, ok in zip(
            entries.image_ids.tolist(), codes.tolist(), keep.tolist(), strict=True
        )
        if ok
    }


class LocalFeatures(Matcher):
    """Local features as a ``Matcher``: it shortlists by the LNBNN vote of the query's
    descriptors over the gallery's (``LocalMatcher.candidates``), and scores a pair by the most
    inliers one homography explains between the query and the individual's photos
    (``verify.best_photos``). It is the ``rerank`` verification of an embedding model, and,
    alone, the built-in ``local-features`` matcher."""

    name = "local-features"
    needs = frozenset({Need.LOCAL_FEATURES})

    def shortlist(self, query: Query, context: Context, *, top: int, photos: int) -> list[Evidence]:
        assert query.features is not None, "the local-features matcher needs local features"
        return context.descriptors().candidates(
            query.features, context.gallery.entries, query.filters, top=top, photos=photos
        )

    def score(
        self, query: Query, context: Context, candidates: Sequence[Evidence]
    ) -> list[Evidence]:
        assert query.features is not None, "the local-features matcher needs local features"
        return best_photos(query.features, candidates, context.features.get)
