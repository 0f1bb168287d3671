"""Verification at its physical cost (issue 27): the shortlist matched in one batched step gives
the pair-by-pair inliers, pairs below the minimum are not sent to the homography, the query is
decoded once, and the shortlist's descriptors come from memory, not from the database, per
request — on real OpenCV, ONNX Runtime and SQLite."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from sqlalchemy import Engine, event
from threadpoolctl import threadpool_info, threadpool_limits

import service.imaging
from service.catalogue.imports import CatalogueImport
from service.db.tables import Model, make_engine, make_sessionmaker, transaction
from service.gallery.sync import Filters
from service.matching import verify
from service.matching.features import DIM, Features, extractor_for
from service.matching.runtime import Runtime
from service.models.registry import register_model
from service.models.switch import activate_model
from service.onnx.embedder import Embedder
from service.settings import Settings
from tests.toy import encode, textured_photo, write_catalogue


def _descriptors(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` RootSIFT-like byte descriptors: non-negative, about unit length once scaled."""
    d = rng.gamma(0.6, size=(n, DIM))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return np.clip(np.rint(d * 512), 0, 255).astype(np.uint8)


def _photo_of(
    query: Features, rng: np.random.Generator, shared: int, own: int, size: int = 400
) -> Features:
    """A photo showing ``shared`` of the query's keypoints (moved by one homography, their
    descriptors slightly changed) among ``own`` keypoints of its own, shuffled."""
    h = np.array([[0.9, 0.05, 20.0], [-0.04, 1.1, 10.0], [1e-4, 0.0, 1.0]])
    chosen = rng.choice(len(query), shared, replace=False)
    src = np.concatenate([query.points[chosen], np.ones((shared, 1), np.float32)], axis=1)
    moved = src @ h.T
    points = np.concatenate([moved[:, :2] / moved[:, 2:], rng.uniform(0, size, (own, 2))]).astype(
        np.float32
    )
    noisy = query.descriptors[chosen].astype(np.int16) + rng.integers(-4, 5, (shared, DIM))
    descriptors = np.concatenate([np.clip(noisy, 0, 255).astype(np.uint8), _descriptors(rng, own)])
    order = rng.permutation(len(points))
    return Features(points[order], descriptors[order], size, size)


def _query(rng: np.random.Generator, n: int = 300, size: int = 400) -> Features:
    return Features(
        rng.uniform(0, size, (n, 2)).astype(np.float32), _descriptors(rng, n), size, size
    )


def _shortlist(rng: np.random.Generator, query: Features) -> list[Features]:
    """Photos of every kind a shortlist holds: the same animal (many or few shared keypoints),
    other animals, photos of different lengths, one keypoint, none."""
    empty = Features(np.zeros((0, 2), np.float32), np.zeros((0, DIM), np.uint8), 50, 50)
    return [
        _photo_of(query, rng, 120, 150),
        _photo_of(query, rng, 40, 300),
        _photo_of(query, rng, 12, 80),
        _photo_of(query, rng, 3, 200),  # below the minimum
        _photo_of(query, rng, 0, 250),  # another animal
        _photo_of(query, rng, 60, 10),
        Features(np.zeros((1, 2), np.float32), _descriptors(rng, 1), 50, 50),
        empty,
        _photo_of(query, rng, 0, 2),
    ]


@pytest.mark.parametrize("block", [verify._BLOCK_COLUMNS, 300])  # one block; many blocks
def test_the_batched_matcher_gives_the_pair_by_pair_inliers(
    monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(verify, "_BLOCK_COLUMNS", block)
    rng = np.random.default_rng(7)
    query = _query(rng)
    others = _shortlist(rng, query)
    batched = verify.match_many(query, others)
    assert len(batched) == len(others)
    for other, together in zip(others, batched, strict=True):
        alone = verify.match_pair(query, other)  # MAGSAC is seeded: the same every time
        assert np.array_equal(alone.pairs, together.pairs)
        assert np.array_equal(alone.inlier, together.inlier)
        assert alone.inliers == together.inliers
    inliers = [m.inliers for m in batched]
    assert inliers[0] >= 100 and inliers[1] >= 30 and inliers[2] >= 8, inliers
    assert inliers[3:5] == [0, 0] and inliers[6:] == [0, 0, 0], inliers


def test_the_ratio_test_matches_each_photo_on_its_own() -> None:
    """A photo's matches do not depend on the other photos of the shortlist (its padding
    neither), nor on their order."""
    rng = np.random.default_rng(3)
    query = _query(rng)
    others = _shortlist(rng, query)
    alone = [verify.tentative(query, o) for o in others]
    reversed_ = verify.tentative_many(query, others[::-1])[::-1]
    for a, b in zip(alone, reversed_, strict=True):
        assert np.array_equal(a, b)


def test_pairs_below_the_minimum_are_not_sent_to_the_homography(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(11)
    query = _query(rng)
    others = [_photo_of(query, rng, 3, 200), _photo_of(query, rng, 80, 100)]
    assert len(verify.tentative(query, others[0])) < verify.MIN_MATCHES
    calls: list[int] = []
    real = cv2.findHomography

    def counting(src: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(src))
        return real(src, *args, **kwargs)

    monkeypatch.setattr(cv2, "findHomography", counting)
    few, many = verify.match_many(query, others)
    assert few.inliers == 0 and not few.inlier.any()
    assert many.inliers >= 40
    assert calls == [len(many.pairs)]  # one homography: the pair with enough matches


# The service: one decode, descriptors from memory ----------------------------------------------


@pytest.fixture
def verifying(
    sqlite_settings: Settings, tmp_path: Path, toy_model: Path
) -> Iterator[tuple[Runtime, Engine]]:
    """A runtime of the toy model verifying its answers over 4 textured individuals, and the
    engine its requests run on."""
    settings = sqlite_settings
    engine = make_engine(settings.sqlalchemy_url)
    factory = make_sessionmaker(engine)
    model = register_model(settings, factory, toy_model)
    with transaction(factory) as session:
        session.get_one(Model, model.id).verification = "rerank"
    activate_model(settings, factory, model.id)
    folder = tmp_path / "catalogue"
    csv_path = write_catalogue(folder, range(4), (0, 1), textured=True)
    embedder = Embedder.for_model(settings, model.file_path)
    report = CatalogueImport(settings, factory, embedder, model.id, extractor_for(settings)).run(
        csv_path, folder / "images"
    )
    assert not report.errors
    yield Runtime(settings, factory), engine
    engine.dispose()


def test_the_query_is_decoded_once(
    verifying: tuple[Runtime, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, _ = verifying
    runtime.current().descriptors()  # the gallery's index is built before counting
    opened: list[int] = []
    real = service.imaging.open_photo

    def counting(data: bytes, *, max_pixels: int) -> Any:
        opened.append(len(data))
        return real(data, max_pixels=max_pixels)

    monkeypatch.setattr(service.imaging, "open_photo", counting)
    photo = encode(textured_photo(2, 7, size=1400), "JPEG")  # larger than the kept photo
    answer = runtime.identify(photo, filters=Filters())
    assert answer.identification_id is not None  # recorded: the photo was kept too
    assert answer.candidates[0].individual_id == "ind-2"
    assert (answer.candidates[0].inliers or 0) >= 8
    assert opened == [len(photo)]


def test_the_shortlists_descriptors_are_not_read_from_the_database_per_request(
    verifying: tuple[Runtime, Engine],
) -> None:
    runtime, engine = verifying
    runtime.identify(encode(textured_photo(1, 8)), filters=Filters())  # loads the model
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        for ind in range(4):
            answer = runtime.identify(encode(textured_photo(ind, 7)), filters=Filters())
            assert answer.candidates[0].inliers is not None
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert statements  # the listener sees the requests' statements (each answer is recorded)
    reads = [s for s in statements if "features.descriptors" in s]  # what FeatureStore reads
    assert reads == []


def test_a_serving_process_runs_its_matrix_products_on_the_blas_threads_set(
    sqlite_settings: Settings,
) -> None:
    """Verification's products are small: a serving process keeps numpy's BLAS to
    ``blas_threads`` (1 by default), and 0 leaves the library's own count."""
    factory = make_sessionmaker(make_engine(sqlite_settings.sqlalchemy_url))
    with threadpool_limits(None):  # whatever the test process had is restored afterwards
        threadpool_limits(3, user_api="blas")
        Runtime(sqlite_settings.model_copy(update={"blas_threads": 0}), factory)
        assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {3}
        Runtime(sqlite_settings, factory)
        assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {1}


def test_the_embedding_is_made_while_the_query_features_are_extracted(
    verifying: tuple[Runtime, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verifying model embeds the photo on another thread while the query's local features
    are extracted: the extraction here waits for the embedder to have begun, which it never
    would if the two ran one after the other."""
    runtime, _ = verifying
    identifier = runtime.current()
    identifier.descriptors()
    begun = threading.Event()
    embed, extract = identifier.embedder.embed, identifier.features.extractor.extract
    overlapped: list[bool] = []

    def embedding(pixels: np.ndarray) -> np.ndarray:
        begun.set()
        return embed(pixels)

    def extracting(image: Any, size: Any = None) -> Features:
        overlapped.append(begun.wait(timeout=10))
        return extract(image, size)

    monkeypatch.setattr(identifier.embedder, "embed", embedding)
    monkeypatch.setattr(identifier.features.extractor, "extract", extracting)
    answer = runtime.identify(encode(textured_photo(3, 7)), filters=Filters())
    assert overlapped == [True]
    assert answer.candidates[0].individual_id == "ind-3"
    assert "embed" in answer.timings and "features" in answer.timings
