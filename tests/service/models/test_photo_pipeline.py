"""The re-index's photo pipeline (``PhotoEmbedder``): photos read in parallel and decoded ahead of
the embedder, in order, with a bound on what is held, unreadable photos reported and a lost lease
stopping the work."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.imaging import decode_photo, to_model_input
from service.jobs.queue import LeaseLost
from service.models.reindex import PhotoEmbedder
from service.onnx.embedder import Embedder
from service.settings import Settings
from service.store.photos import PhotoStore
from tests.toy import encode, photo


class WatchedStore:
    """The photo store, counting reads and how many run at once (each takes ``delay`` s)."""

    def __init__(self, store: PhotoStore, delay: float = 0.0) -> None:
        self.store = store
        self.delay = delay
        self.started = 0
        self.running = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def read(self, path: str) -> bytes:
        with self.lock:
            self.started += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.delay)
            return self.store.read(path)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", _env_file=None)  # type: ignore[call-arg]
    s.ensure_dirs()
    return s


def stored_photos(settings: Settings, count: int) -> list[tuple[int, str]]:
    """``count`` photos in the store, as (image id, file) rows."""
    store = PhotoStore.open(settings)
    return [
        (i, store.put(encode(photo(i % 5, i), "JPEG"), "image/jpeg").relative_path)
        for i in range(1, count + 1)
    ]


def serial_embeddings(
    settings: Settings, embedder: Embedder, rows: list[tuple[int, str]]
) -> np.ndarray:
    """Decode, preprocess and embed one photo after another: what the pipeline must match."""
    store, spec = PhotoStore.open(settings), embedder.contract.preprocessing
    pixels = [
        to_model_input(
            decode_photo(
                store.read(path), max_pixels=settings.max_image_pixels, target_size=spec.input_size
            ).image,
            spec,
        )
        for _, path in rows
    ]
    return embedder.embed(np.stack(pixels))


def test_unreadable_photos_midway_are_reported_and_the_rest_embedded_in_order(
    settings: Settings, toy_model: Path
) -> None:
    rows = stored_photos(settings, 11)
    store = PhotoStore.open(settings)
    (settings.photos_dir / rows[3][1]).unlink()  # gone from the store
    store.objects.put_new("photos/bad/corrupt.jpg", b"\xff\xd8 not a JPEG")
    rows.insert(7, (99, "bad/corrupt.jpg"))
    embedder = Embedder(toy_model, max_batch_size=4)
    result = PhotoEmbedder(settings, embedder, decoders=2, readers=3).embed(rows)
    readable = [r for r in rows if r[0] not in (rows[3][0], 99)]
    assert result.image_ids == [i for i, _ in readable]
    assert len(result.errors) == 2
    assert rows[3][1] in result.errors[0] and "image 99 (bad/corrupt.jpg)" in result.errors[1]
    np.testing.assert_allclose(
        result.matrix(embedder.dim), serial_embeddings(settings, embedder, readable), atol=1e-5
    )


@pytest.mark.slow
def test_reads_run_in_parallel_and_no_more_than_the_bound_is_held(
    settings: Settings, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = stored_photos(settings, 24)
    embedder = Embedder(toy_model, max_batch_size=4)
    photos = PhotoEmbedder(settings, embedder, readers=4, ahead=6)
    store = WatchedStore(photos.store, delay=0.1)
    photos.store = store  # type: ignore[assignment]
    embedded, held = 0, []
    embed = embedder.embed

    def slow_embed(batch: np.ndarray) -> np.ndarray:
        nonlocal embedded
        time.sleep(0.15)  # the readers get as far ahead as they may
        held.append(store.started - embedded)  # read or decoded, and not yet embedded
        embedded += len(batch)
        return embed(batch)

    monkeypatch.setattr(embedder, "embed", slow_embed)
    result = photos.embed(rows)
    assert result.image_ids == [i for i, _ in rows]
    assert store.most_at_once == 4
    assert max(held) <= photos.batch_size + photos.ahead
    assert max(held) > photos.batch_size  # it did read ahead while a batch was embedded


def test_a_lost_lease_stops_reading_and_embedding(
    settings: Settings, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = stored_photos(settings, 40)
    embedder = Embedder(toy_model, max_batch_size=4)
    photos = PhotoEmbedder(settings, embedder, readers=2, ahead=4)
    store = WatchedStore(photos.store, delay=0.01)
    photos.store = store  # type: ignore[assignment]
    batches = 0
    embed = embedder.embed

    def counted(batch: np.ndarray) -> np.ndarray:
        nonlocal batches
        batches += 1
        return embed(batch)

    monkeypatch.setattr(embedder, "embed", counted)
    with pytest.raises(LeaseLost):
        photos.embed(rows, alive=lambda: batches < 2)
    assert batches == 2
    # Two batches embedded, a third gathered, and no more than ``ahead`` read beyond them.
    assert store.started <= 3 * photos.batch_size + photos.ahead < len(rows)
