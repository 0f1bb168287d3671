"""The gallery's vectors as half floats (``WHALEID_GALLERY_FLOAT16``): the same neighbours from
half the memory, read back exactly as faiss rounded them, and a file of the other precision
rebuilt when the setting changes."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from service.db.tables import Model
from service.gallery.index import FLOAT16, FLOAT32, GalleryIndex, stored_vectors
from service.gallery.sync import Filters, GalleryDigest, index_path
from service.matching.identify import Identifier
from tests.conftest import Catalogue
from tests.service.gallery.test_gallery import clustered, exact
from tests.toy import encode, photo


@pytest.mark.parametrize("threshold", [100_000, 3_000])  # flat, then IVF
def test_a_float16_index_finds_the_float32_neighbours_from_half_the_bytes(threshold: int) -> None:
    vectors = clustered(4_000, 64)
    ids = np.arange(4_000, dtype=np.int64) * 2 + 7
    full = GalleryIndex.build(ids, vectors, 64, threshold)
    half = GalleryIndex.build(ids, vectors, 64, threshold, float16=True)
    assert half.plan.vectors == FLOAT16 and full.plan.vectors == FLOAT32
    assert half.plan.kind == full.plan.kind == ("flat" if threshold > 4_000 else "ivf")
    by_id = dict(zip(ids.tolist(), vectors, strict=True))
    hits = 0
    for q in vectors[:50]:
        distances, found = half.search(q, 10)
        hits += len(set(found) & set(full.search(q, 10)[1]))
        # Each distance is the float32 one to within the half floats' rounding.
        true = np.array([1.0 - float(by_id[i] @ q) for i in found.tolist()])
        assert np.abs(distances - true).max() < 2e-3
        if threshold > 4_000:  # exact: the nearest is the query itself
            assert found[0] == exact(vectors, ids, q, 1)[0]
    assert hits / (50 * 10) >= 0.97
    size = len(faiss.serialize_index(half.index))
    assert size < 0.6 * len(faiss.serialize_index(full.index))


@pytest.mark.parametrize("threshold", [10_000, 100])  # flat, then IVF
def test_float16_contents_are_the_vectors_as_faiss_rounded_them(threshold: int) -> None:
    rng = np.random.default_rng(3)
    # Components from 1e-6 up: numpy's own float16 conversion rounds some of these otherwise.
    vectors = (rng.standard_normal((300, 16)) * np.geomspace(1e-6, 1, 16)).astype(np.float32)
    ids = rng.permutation(np.arange(500, 800, dtype=np.int64))
    index = GalleryIndex.build(ids, vectors, 16, threshold, float16=True)
    index.remove(ids[:5])
    got_ids, got = index.contents()
    order, expected = np.argsort(got_ids), np.argsort(ids[5:])
    assert np.array_equal(got_ids[order], ids[5:][expected])
    rounded = stored_vectors(vectors[5:][expected], FLOAT16)
    assert np.array_equal(got[order], rounded), index.plan
    assert not np.array_equal(rounded, vectors[5:][expected])  # rounded, not the float32


def _identifier(catalogue: Catalogue) -> Identifier:
    with catalogue.sessions() as session:
        model = session.get_one(Model, catalogue.model_id)
    return Identifier.load(catalogue.settings, catalogue.sessions, model)


def _answer(identifier: Identifier) -> list[list[str]]:
    return [
        [
            c.individual_id
            for c in identifier.identify(
                encode(photo(ind, 9)), filters=Filters(), record=False
            ).candidates
        ]
        for ind in range(6)
    ]


def test_a_change_of_precision_rebuilds_the_file_and_the_digest_follows_it(
    catalogue: Catalogue,
) -> None:
    before = _answer(_identifier(catalogue))
    path = index_path(catalogue.settings, catalogue.model_id)
    default = catalogue.settings.gallery_float16
    digests = {}
    try:
        for float16 in (not default, default):  # the other precision, then back
            catalogue.settings.gallery_float16 = float16
            precision = FLOAT16 if float16 else FLOAT32
            identifier = _identifier(catalogue)
            assert identifier.gallery.index.plan.vectors == precision
            assert GalleryIndex.load(path)[1]["vectors"] == precision  # rebuilt, saved as such
            assert _answer(identifier) == before
            live = identifier.gallery.digest()
            with catalogue.sessions() as session:
                dim = identifier.gallery.dim
                database = GalleryDigest.of_database(session, catalogue.model_id, dim, precision)
            assert live == database and live.vectors == precision
            digests[precision] = live.vectors_sha256
    finally:
        catalogue.settings.gallery_float16 = default
    assert digests[FLOAT16] != digests[FLOAT32]


@pytest.mark.parametrize("threshold", [10_000, 100])  # flat, then IVF
def test_a_float16_index_file_reads_back_as_float16(tmp_path: Path, threshold: int) -> None:
    vectors = clustered(400, 16)
    ids = np.arange(400, dtype=np.int64) + 3
    index = GalleryIndex.build(ids, vectors, 16, threshold, float16=True)
    path = tmp_path / "g.faiss"
    index.save(path, {"model_id": 1})
    loaded, sidecar = GalleryIndex.load(path)
    assert sidecar["vectors"] == FLOAT16 and loaded.plan == index.plan
    for q in vectors[:10]:
        assert np.array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])
    assert np.array_equal(loaded.contents()[1], index.contents()[1])
