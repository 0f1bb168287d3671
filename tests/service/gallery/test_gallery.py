"""The faiss gallery: exact against brute force, atomic files, rebuilt when missing or corrupt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.gallery.index import GalleryFileError, GalleryIndex, IndexPlan, sidecar_path
from service.gallery.sync import Filters, index_path
from service.matching.identify import Identifier
from tests.conftest import Catalogue
from tests.toy import encode, photo


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 5), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def exact(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-(vectors @ query), kind="stable")[:k]
    return ids[order]


def test_flat_search_equals_brute_force_with_row_ids() -> None:
    vectors = clustered(500, 16)
    ids = np.arange(1000, 1500, dtype=np.int64) * 3  # sparse ids, as after deletes
    gallery = GalleryIndex.build(ids, vectors, 16)
    assert gallery.plan.kind == "flat"
    for q in vectors[:20]:
        distances, found = gallery.search(q, 10)
        assert np.array_equal(found, exact(vectors, ids, q, 10))
        assert np.all(np.diff(distances) >= -1e-6)
    distances, found = gallery.search(vectors[0], 1)
    assert found[0] == ids[0] and distances[0] == pytest.approx(0.0, abs=1e-5)


def test_filtered_search_only_returns_allowed_ids() -> None:
    vectors = clustered(300, 8)
    ids = np.arange(300, dtype=np.int64)
    gallery = GalleryIndex.build(ids, vectors, 8)
    allowed = ids[ids % 7 == 0]
    _, found = gallery.search(vectors[1], 50, allowed)
    assert len(found) == len(allowed) and set(found) <= set(allowed)


def test_ivf_above_threshold_keeps_recall_and_supports_removal() -> None:
    vectors = clustered(6000, 32)
    ids = np.arange(6000, dtype=np.int64) + 10
    gallery = GalleryIndex.build(ids, vectors, 32, ivf_threshold=5000)
    assert gallery.plan == IndexPlan.for_size(6000, 5000) and gallery.plan.kind == "ivf"
    hits = 0
    for q in vectors[:50]:
        hits += len(set(gallery.search(q, 20)[1]) & set(exact(vectors, ids, q, 20)))
    assert hits / (50 * 20) >= 0.95
    assert gallery.remove(ids[:100]) == 100
    assert gallery.count == 5900
    assert ids[0] not in gallery.search(vectors[0], 20)[1]
    narrow = ids[100:130]  # a narrow filter probes every list: exact
    _, found = gallery.search(vectors[120], 10, narrow)
    sub = exact(vectors[100:130], narrow, vectors[120], 10)
    assert np.array_equal(found, sub)


def test_save_load_round_trip_and_corruption_detected(tmp_path: Path) -> None:
    vectors = clustered(100, 8)
    ids = np.arange(100, dtype=np.int64)
    gallery = GalleryIndex.build(ids, vectors, 8)
    path = tmp_path / "g.faiss"
    gallery.save(path, {"model_id": 1})
    loaded, sidecar = GalleryIndex.load(path)
    assert sidecar["count"] == 100 and sidecar["model_id"] == 1
    assert np.array_equal(loaded.search(vectors[3], 5)[1], gallery.search(vectors[3], 5)[1])
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves nothing behind

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(GalleryFileError, match="checksum"):
        GalleryIndex.load(path)
    sidecar_path(path).unlink()
    with pytest.raises(GalleryFileError, match="missing"):
        GalleryIndex.load(path)


def _answers(catalogue: Catalogue) -> list[list[tuple[str, int | None]]]:
    from service.db.tables import Model

    with catalogue.sessions() as session:
        model = session.get_one(Model, catalogue.model_id)
    identifier = Identifier.load(catalogue.settings, catalogue.sessions, model)
    out = []
    for ind in range(6):
        result = identifier.identify(encode(photo(ind, 9)), filters=Filters(), record=False)
        out.append([(c.individual_id, c.votes) for c in result.candidates])
    return out


@pytest.mark.parametrize("damage", ["delete", "corrupt", "truncate", "stale"])
def test_gallery_rebuilt_from_stored_embeddings_with_identical_answers(
    catalogue: Catalogue, damage: str
) -> None:
    before = _answers(catalogue)
    assert all(a[0][0] == f"ind-{i}" for i, a in enumerate(before))
    path = index_path(catalogue.settings, catalogue.model_id)
    original = path.read_bytes()
    if damage == "delete":
        path.unlink()
    elif damage == "corrupt":
        path.write_bytes(original[:100] + bytes(len(original) - 100))
    elif damage == "truncate":
        path.write_bytes(original[: len(original) // 3])
    else:  # the file of an older gallery: one photo fewer than the database holds
        from service.gallery.index import GalleryIndex as GI

        index, sidecar = GI.load(path)
        index.remove(index.ids()[:1])
        index.save(path, {"model_id": catalogue.model_id})
    assert _answers(catalogue) == before
    repaired, sidecar = GalleryIndex.load(path)
    assert repaired.count == sidecar["count"] == 36
