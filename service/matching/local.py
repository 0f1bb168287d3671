"""The built-in ``local-features`` matcher's search: every gallery descriptor in one faiss index,
each query descriptor voting for the individuals among its nearest descriptors (LNBNN, in the
spirit of HotSpotter: a vote is worth how much nearer the neighbour is than the ``k + 1``-th),
then the best few individuals verified geometrically (``matching.verify``).

The index follows the model's gallery (``gallery.sync``): after each sync, the photos that
joined are added and those that left are removed, by image id.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.gallery.sync import Filters, GalleryEntries
from service.matching.features import DIM, Features, FeatureStore
from service.matching.matcher import Context, Matcher, Need, Query
from service.matching.verify import Evidence, best_photos
from service.settings import Settings

log = logging.getLogger(__name__)

# faiss (1.15) computes an exact search's inner products with BLAS when the query vectors times
# their dimensions reach this threshold (its default: 128,000), and below it with its own loops.
# A query photo brings about 100-400 descriptors of 128: through BLAS their search over 17k
# gallery descriptors took 10-16 ms here, through the loops 68-135 ms (``bench/local_features.py``).
# One embedding searched alone is faster in the loops (a 512-d query over 50k photos: 6-8 ms
# against 15-16 ms through BLAS): 2,049 keeps one query of up to 2,048 dimensions (a B5's) there
# and sends a photo's 17 or more descriptors to BLAS. It is the whole process's setting.
faiss.cvar.distance_compute_blas_threshold = 2049

_SHIFT = 11  # descriptor id = image id << 11 | keypoint number (features_count <= 2000)
K = 5  # neighbours that vote, per query descriptor; the (K + 1)-th is the normaliser


class DescriptorIndex:
    """The gallery's descriptors, by image. Exact (inner product of unit RootSIFT vectors) up to
    ``ivf_threshold`` descriptors, then an IVF index with 8-bit scalar quantisation (136 bytes a
    descriptor), rebuilt as such when it outgrows the exact one. Built ``compressed``
    (``DescriptorIndex.built``), the mode of large galleries, it is the descriptors' PCA to 96
    components in 6-bit scalar codes (``compressed_layout``: 72 bytes a descriptor, plus its
    8-byte id), searched by L2 distance in lists of about ``LIST_SIZE``, trained on a sample of
    the descriptors; it can be saved and read back (``save``, ``load``). Measured on cow faces
    (``bench/local_index.py``), it answers as the exact search did (MAP@5 at most 0.007 below
    it at 10k, 50k and 100k photos), where 4-bit scalar codes and 4-bit product quantisation (32
    bytes) lost 0.06 and 0.18 of MAP@5: the vote weighs each neighbour by a small difference of
    distances, which coarse codes blur."""

    def __init__(self, ivf_threshold: int = 20_000) -> None:
        self.ivf_threshold = ivf_threshold
        self.index: faiss.Index = self._flat()
        self.images: set[int] = set()
        self.count = 0
        self.trained_on = 0  # descriptors when the compressed index was trained (0: not one)

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

    @property
    def compressed(self) -> bool:
        return self.trained_on > 0

    @classmethod
    def built(
        cls,
        chunks: Iterable[dict[int, Features]],
        sample: dict[int, Features],
        expected: int,
    ) -> DescriptorIndex:
        """A compressed index of the descriptors in ``chunks`` (image id -> features, each chunk
        read, added and dropped in turn), trained on those of ``sample``, for a gallery of about
        ``expected`` descriptors (which sets the number of lists)."""
        descriptors = cls()
        vectors = [f.unit for f in sample.values() if len(f)]
        training = np.concatenate(vectors) if vectors else np.zeros((0, DIM), np.float32)
        # As many lists as the gallery calls for, and as the sample can train.
        trainable = 2 ** int(np.log2(max(len(training) // TRAINING_PER_LIST, 1)))
        nlist = min(compressed_lists(expected), trainable)
        if nlist < MIN_LISTS:
            raise ValueError(f"{len(training)} descriptors cannot train {MIN_LISTS} lists")
        index = faiss.index_factory(DIM, compressed_layout(nlist), faiss.METRIC_L2)
        ivf = faiss.extract_index_ivf(index)
        ivf.by_residual = RESIDUAL
        ivf.cp.niter = TRAINING_ITERATIONS
        index.train(training)
        _probe(index)
        descriptors.index = index
        descriptors.trained_on = max(expected, 1)
        for chunk in chunks:
            descriptors.add(chunk)
        return descriptors

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
        """Remove the descriptors of ``image_ids``: one pass over the index for up to
        ``REMOVE_BATCH`` photos (an IVF index scans every list for each removal)."""
        leaving = sorted(image_ids & self.images)
        for start in range(0, len(leaving), REMOVE_BATCH):
            part = leaving[start : start + REMOVE_BATCH]
            if len(part) == 1:
                first = part[0] << _SHIFT
                selector: Any = faiss.IDSelectorRange(first, first + (1 << _SHIFT))
            else:  # every descriptor id these photos can have
                keys = (np.array(part, np.int64)[:, None] << _SHIFT) + np.arange(1 << _SHIFT)
                selector = faiss.IDSelectorBatch(keys.ravel())
            self.count -= int(self.index.remove_ids(selector))
        self.images -= image_ids

    def search(self, query: Features, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and descriptor ids of each query descriptor's ``k`` nearest."""
        k = min(k, self.count)
        if k == 0 or not len(query):
            return np.zeros((len(query), 0), np.float32), np.zeros((len(query), 0), np.int64)
        found, ids = self.index.search(query.unit, k)
        if self.index.metric_type == faiss.METRIC_L2:  # squared distances already
            return np.maximum(found, 0.0), ids
        return np.maximum(2.0 - 2.0 * found, 0.0), ids

    def nbytes(self) -> int:
        """The index's own size (its serialised form: codes, ids and trained tables)."""
        return len(faiss.serialize_index(self.index))

    def save(self, path: Path, extractor: str) -> None:
        """Write a compressed index to ``path`` with its sidecar (``path`` with ``.json``): the
        extractor whose descriptors it holds, the photos it covers (a photo without descriptors
        too), its size and its file's checksum. Each file is written whole (temporary file,
        fsync, rename), the index first: a crash between the two leaves a sidecar whose checksum
        does not match, so the file is rebuilt, never trusted."""
        assert self.compressed, "only a compressed index is saved"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
        try:
            faiss.write_index(self.index, str(tmp))
            digest = _sha256(tmp)
            _fsync_and_rename(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        sidecar = {
            "format": INDEX_FORMAT,
            "extractor": extractor,
            "layout": _layout(),
            "descriptors": self.count,
            "trained_on": self.trained_on,
            "file_sha256": digest,
            "images": sorted(self.images),
        }
        side = sidecar_path(path)
        tmp = _temporary(side)
        try:
            tmp.write_text(json.dumps(sidecar))
            _fsync_and_rename(tmp, side)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, extractor: str) -> DescriptorIndex:
        """A compressed index written by ``save`` for ``extractor``; ``IndexFileError`` if the
        file or its sidecar is missing, damaged, of another extractor or format, or does not
        hold what its sidecar says."""
        side = sidecar_path(path)
        if not path.exists() or not side.exists():
            raise IndexFileError(f"{path} or its sidecar is missing")
        try:
            sidecar = json.loads(side.read_text())
            layout = (sidecar.get("format"), sidecar.get("layout"))
            if layout != (INDEX_FORMAT, _layout()):
                raise IndexFileError(f"{path} is of another format")
            if sidecar.get("extractor") != extractor:
                raise IndexFileError(f"{path} holds the descriptors of another extractor")
            if _sha256(path) != sidecar["file_sha256"]:
                raise IndexFileError(f"{path} does not match its sidecar's checksum")
            index = faiss.read_index(str(path))
            descriptors = cls()
            descriptors.index = index
            descriptors.count = int(index.ntotal)
            descriptors.trained_on = int(sidecar["trained_on"])
            descriptors.images = {int(i) for i in sidecar["images"]}
        except IndexFileError:
            raise
        except Exception as e:  # unreadable JSON, a truncated or foreign faiss file
            raise IndexFileError(f"{path} cannot be read: {e}") from e
        if descriptors.count != sidecar["descriptors"] or not descriptors.compressed:
            raise IndexFileError(f"{path} does not hold what its sidecar says")
        _probe(index)
        return descriptors


class IndexFileError(RuntimeError):
    """A saved descriptor index that cannot be used: it is rebuilt from the stored features."""


INDEX_FORMAT = 1


def local_index_path(settings: Settings, extractor: str) -> Path:
    """Where the compressed descriptor index of ``extractor``'s descriptors is saved: beside
    the gallery indexes. The descriptors depend on the photos, not on the model, so the models
    share it; its sidecar says which photos it covers."""
    return settings.indexes_dir / f"local-{extractor}.faiss"


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _temporary(path: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _fsync_and_rename(tmp: Path, path: Path) -> None:
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# The compressed mode: the descriptors rotated by a PCA to their ``REDUCED`` main components
# (99% of their variance), 6 bits each (of the vector itself, not of its residual from its
# list's centroid: the same answers, and the scan decodes them 2.4x faster), searched by L2
# distance (which the PCA's centring keeps; inner products it does not), in lists of about
# ``LIST_SIZE`` descriptors, assigned through an HNSW graph over the centroids.
COMPRESSED = "SQ6"
REDUCED = 96
RESIDUAL = False
# Lists probed: at 100k cow photos 4 keep MAP@5 within 0.01 of the exact search (0.577 against
# 0.584) where 8 and 16 lose 0.03 (0.554, 0.548): each list probed past the nearest few brings
# far descriptors that the 6-bit codes place, now and then, among the 6 nearest.
COMPRESSED_NPROBE = 4
LIST_SIZE = 3_000
MIN_LISTS, MAX_LISTS = 16, 4096
TRAINING_PER_LIST = 39  # faiss's k-means wants at least this many points per centroid
TRAINING_DESCRIPTORS = 200_000  # 4096 lists x 39, and some
TRAINING_ITERATIONS = 10
READ_CHUNK = 1000  # photos whose features are read from the store at a time
TRIM_AFTER = 100  # photos added or removed in one sync after which freed memory is handed back
REMOVE_BATCH = 128  # photos removed in one pass over the index (2,048 possible ids each)


def compressed_lists(descriptors: int) -> int:
    """The compressed index's number of lists for about ``descriptors`` descriptors: about
    ``LIST_SIZE`` descriptors a list, so that a query descriptor scans about
    ``COMPRESSED_NPROBE`` x ``LIST_SIZE`` codes whatever the gallery's size (to ``MAX_LISTS``
    lists: 12M descriptors, 90k cow faces). The build assigns each descriptor to its list
    through an HNSW graph over the centroids, whose cost hardly grows with the lists; the
    k-means that trains them does (``TRAINING_ITERATIONS`` over ``TRAINING_DESCRIPTORS``)."""
    lists = 2 ** round(np.log2(max(descriptors, 1) / LIST_SIZE))
    return int(min(MAX_LISTS, max(MIN_LISTS, lists)))


def compressed_layout(lists: int) -> str:
    """The compressed index's faiss factory string (``lists`` lists)."""
    reduced = f"PCAR{REDUCED}," if REDUCED < DIM else ""
    return f"{reduced}IVF{lists}_HNSW32,{COMPRESSED}"


def _layout() -> str:
    """The compressed mode's settings, as a saved index's sidecar records them."""
    return f"{compressed_layout(0)} residual={RESIDUAL}"


def _probe(index: faiss.Index) -> None:
    """The search settings of a compressed index (not saved with it)."""
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = COMPRESSED_NPROBE
    quantizer: Any = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(64, 2 * COMPRESSED_NPROBE)


class LocalMatcher:
    """The descriptor index of one gallery, kept in step with it, and the LNBNN vote.

    From ``compressed_photos`` gallery photos the index is compressed (``DescriptorIndex.built``).
    A compressed index is built, and rebuilt when the gallery has grown fourfold since it was
    trained, in a background thread from the stored features (read once, chunk by chunk): until
    it is ready, answers come from the index in use, which syncs keep current; the new one then
    replays what changed meanwhile and replaces it in one assignment. Only the first build of a
    replica, with no index to answer from yet, runs in the caller's thread.

    With a ``path``, each compressed index built is saved there (``DescriptorIndex.save``,
    before it is put in use), and a replica's first sync reads it back instead of building:
    seconds instead of minutes at 100k photos; the photos that joined or left since it was
    written are then replayed from the database, which stays the source of truth (a missing,
    damaged or foreign file is rebuilt, ``DescriptorIndex.load``)."""

    def __init__(
        self,
        store: FeatureStore,
        ivf_threshold: int = 20_000,
        compressed_photos: int = 20_000,
        path: Path | None = None,
        extractor: str = "",
    ) -> None:
        self.store = store
        self.descriptors = DescriptorIndex(ivf_threshold)
        self.compressed_photos = compressed_photos
        self.path = path  # where the compressed index is saved and read back (None: never)
        self.extractor = extractor
        self._lock = threading.Lock()  # guards self.descriptors (the reference and the index)
        self._wanted: set[int] = set()  # the gallery's photos at the last sync
        self._loaded = False
        self.builder: threading.Thread | None = None

    def sync(self, entries: GalleryEntries) -> None:
        """Add the gallery photos the index lacks, remove those that left the gallery; start
        building a compressed index when one is due."""
        current = set(entries.image_ids.tolist())
        with self._lock:
            self._wanted = current
            joined = current - self.descriptors.images
            left = self.descriptors.images - current
        if not self._loaded and len(current) >= self.compressed_photos and self._read_file():
            self._loaded = True  # answers from the saved index; a rebuild goes to the background
            with self._lock:  # replay what changed since it was written
                joined = current - self.descriptors.images
                left = self.descriptors.images - current
        if self._rebuild_due(len(current)):
            if not self._loaded:  # nothing to answer from yet: build it now
                self._rebuild()
                self._loaded = True
                return
            if self.builder is None or not self.builder.is_alive():
                self.builder = threading.Thread(
                    target=self._rebuild, name="descriptor-index", daemon=True
                )
                self.builder.start()
        self._loaded = True
        found = self._read(joined)
        with self._lock:
            self.descriptors.remove(left)
            self.descriptors.add(found)
        del found  # their descriptors are in the index now
        if len(joined) + len(left) >= TRIM_AFTER:
            # The lists that grew were moved to larger blocks; hand the old ones back. At 100k
            # cow photos, replaying 2,000 changed photos after a load: 1,567 -> 1,389 MiB.
            _hand_back_freed_memory()
        if joined or left:
            log.debug("local features: +%d -%d photos", len(joined), len(left))

    def _read_file(self) -> bool:
        """Put the saved compressed index in use, if there is a sound one."""
        if self.path is None:
            return False
        started = time.perf_counter()
        try:
            loaded = DescriptorIndex.load(self.path, self.extractor)
        except IndexFileError as e:
            if self.path.exists():
                log.warning("local features: the saved index is rebuilt: %s", e)
            return False
        with self._lock:
            self.descriptors = loaded
        log.info(
            "local features: a compressed index of %d descriptors (%d photos) read in %.1f s",
            loaded.count,
            len(loaded.images),
            time.perf_counter() - started,
        )
        return True

    def _save(self, index: DescriptorIndex) -> None:
        """Write ``index`` (not yet shared with other threads) beside the gallery's index; a
        failure costs only the next replica's load time."""
        if self.path is None:
            return
        try:
            index.save(self.path, self.extractor)
        except (OSError, RuntimeError):
            log.exception("local features: the compressed index could not be saved")

    def _rebuild_due(self, photos: int) -> bool:
        if photos < self.compressed_photos:
            return False
        index = self.descriptors
        return not index.compressed or index.count > 4 * index.trained_on

    def _read(self, image_ids: set[int]) -> dict[int, Features]:
        """The features of ``image_ids``; a photo without any (unreadable) gets none, so it
        joins the index empty and is not asked for again."""
        found: dict[int, Features] = {}
        for chunk in self._chunks(image_ids):
            found.update(chunk)
        return found

    def _chunks(self, image_ids: set[int]) -> Iterator[dict[int, Features]]:
        ordered = sorted(image_ids)
        for start in range(0, len(ordered), READ_CHUNK):
            part = ordered[start : start + READ_CHUNK]
            found = self.store.get(part)
            yield {i: found.get(i, _EMPTY) for i in part}

    def _rebuild(self) -> None:
        """Build a compressed index of the gallery's photos and put it in use."""
        try:
            started = time.perf_counter()
            with self._lock:
                wanted = set(self._wanted)
            sample = self._sample(wanted)
            per_photo = sum(len(f) for f in sample.values()) / max(len(sample), 1)
            fresh = DescriptorIndex.built(
                self._chunks(wanted), sample, int(per_photo * len(wanted))
            )
            self._save(fresh)
            while True:  # replay the syncs that came during the build
                with self._lock:
                    joined = self._wanted - fresh.images
                    left = fresh.images - self._wanted
                    if not joined:
                        fresh.remove(left)
                        self.descriptors = fresh
                        break
                fresh.remove(left)
                fresh.add(self._read(joined))
            _hand_back_freed_memory()
            log.info(
                "local features: a compressed index of %d descriptors (%d photos) in %.1f s",
                fresh.count,
                len(fresh.images),
                time.perf_counter() - started,
            )
        except Exception:  # the index in use stays; the next sync tries again
            log.exception("local features: the compressed index could not be built")

    def _sample(self, image_ids: set[int]) -> dict[int, Features]:
        """The features of random photos among ``image_ids``, about ``TRAINING_DESCRIPTORS``."""
        ordered = np.array(sorted(image_ids), dtype=np.int64)
        np.random.default_rng(0).shuffle(ordered)
        sample: dict[int, Features] = {}
        total = 0
        for start in range(0, len(ordered), READ_CHUNK // 4):
            part = ordered[start : start + READ_CHUNK // 4].tolist()
            found = self.store.get(part)
            sample.update(found)
            total += sum(len(f) for f in found.values())
            if total >= TRAINING_DESCRIPTORS:
                break
        return sample

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


def _hand_back_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc). The inverted lists grow by
    reallocation while an index is built, and the blocks they leave stay resident otherwise:
    at 10k cow photos the process held 353 MiB after the build and 156 MiB after this, for an
    index of 134 MiB (``bench/local_index.py``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_EMPTY = Features(np.zeros((0, 2), np.float32), np.zeros((0, DIM), np.uint8), 0, 0)


def _labels_by_image(entries: GalleryEntries, filters: Filters) -> dict[int, str]:
    """Image id -> catalogue id of the gallery photos within ``filters`` (read it only)."""
    allowed = entries.select(filters)
    if allowed is None:
        return entries.label_of_image
    words = entries.vocab["labels"].words
    codes = entries.codes["labels"]
    keep = np.isin(entries.ids, allowed)
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
