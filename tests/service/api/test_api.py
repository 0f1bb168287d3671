"""End to end over loopback: real uvicorn, real database, real ONNX model, real faiss."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from service.catalogue.imports import CatalogueImport
from service.db.tables import Identification
from service.db.tables import Image as ImageRow
from service.gallery.sync import index_path
from service.onnx.embedder import Embedder
from service.settings import Settings
from tests.conftest import Catalogue, LiveServer, run_server
from tests.toy import encode, photo, write_catalogue


def post_photo(
    client: httpx.Client, data: bytes, name: str = "q.png", **form: str
) -> httpx.Response:
    return client.post("/identify", files={"photo": (name, data)}, data=form)


@pytest.mark.slow
def test_identify_answers_the_contract_and_records_it(live: LiveServer) -> None:
    with live.client() as client:
        response = post_photo(client, encode(photo(3, 50), "JPEG", quality=92))
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) >= {"identification_id", "candidates", "model", "gallery_size", "filters"}
        first = body["candidates"][0]
        assert first["individual_id"] == "ind-3"
        assert first["rank"] == 1 and first["species"] == "bottlenose_dolphin"
        assert first["votes"] == 3
        assert first["confidence"] == pytest.approx(1 - first["distance"], abs=1e-6)
        assert first["distance"] < 0.62
        labels = [c["individual_id"] for c in body["candidates"]]
        assert len(labels) == 5 and labels[1] == "new_individual"
        new = body["candidates"][1]
        assert new["votes"] is None and new["distance"] is None and new["best_image_id"] is None
        assert body["model"] == {
            "id": 1,
            "name": "toy",
            "version": "seed0",
            "k": 50,
            "cutoff": 0.62,
            "ranking": "vote",
            "verification": "none",
        }
        assert body["gallery_size"] == 36 and body["filters"] == {}
        # Each stage's time, in milliseconds, within the request's own.
        timing = response.headers["server-timing"].split(", ")
        stages = {name: float(ms) for name, ms in (t.split(";dur=") for t in timing)}
        assert list(stages) == ["decode", "preprocess", "embed", "search", "head", "database"]
        elapsed_ms = response.elapsed.total_seconds() * 1000
        assert all(0 <= ms <= elapsed_ms for ms in stages.values()), (stages, elapsed_ms)

        best = client.get(f"/images/{first['best_image_id']}/file")
        assert best.status_code == 200
        assert Image.open(__import__("io").BytesIO(best.content)).size == (64, 64)

        recorded = client.get(f"/identifications/{body['identification_id']}").json()
        assert recorded["candidates"] == body["candidates"]
        assert recorded["status"] == "pending" and recorded["model"] == body["model"]
        assert client.get("/identifications/999999").status_code == 404


@pytest.mark.slow
def test_unknown_species_or_unseen_animal_is_answered_new_individual(live: LiveServer) -> None:
    with live.client() as client:
        body = post_photo(client, encode(photo(3, 51)), species="narwhal").json()
        assert [c["individual_id"] for c in body["candidates"]] == ["new_individual"]
        assert body["filters"] == {"species": "narwhal"}
        unseen = post_photo(client, encode(photo(777, 1))).json()
        assert unseen["candidates"][0]["individual_id"] == "new_individual"


@pytest.mark.slow
def test_bbox_crops_before_embedding(live: LiveServer) -> None:
    # The animal sits in the lower right of a bigger, noisy scene.
    scene = photo(999, 1, size=192)
    scene.paste(photo(5, 60), (120, 100))
    with live.client() as client:
        body = post_photo(client, encode(scene), bbox="120,100,64,64").json()
        assert body["candidates"][0]["individual_id"] == "ind-5"
        outside = post_photo(client, encode(scene), bbox="150,150,64,64")
        assert outside.status_code == 422
        assert "outside the 192x192 photo" in outside.json()["detail"]


@pytest.mark.slow
def test_filters_and_a_catalogue_imported_while_serving(live: LiveServer, tmp_path: Path) -> None:
    s = live.settings
    with live.client() as client:
        first = post_photo(client, encode(photo(40, 9))).json()
        assert first["candidates"][0]["individual_id"] == "new_individual"
        # Another process (here: the import code path) adds a new individual with metadata;
        # the running service picks it up from the database at the next request.
        csv_path = write_catalogue(
            tmp_path,
            [40],
            [0, 1],
            species="orca",
            extra={"encounter": "E1", "location": "Moray Firth", "date": "2024-06-01"},
        )
        from service.db.tables import make_engine, make_sessionmaker

        factory = make_sessionmaker(make_engine(s.sqlalchemy_url))
        embedder = Embedder(next(s.models_dir.glob("*.onnx")))
        CatalogueImport(s, factory, embedder, 1).run(csv_path, tmp_path / "images")

        def top(**form: str) -> str:
            body = post_photo(client, encode(photo(40, 9)), **form).json()
            return str(body["candidates"][0]["individual_id"])

        assert top() == "ind-40"
        assert top(species="orca") == "ind-40"
        assert top(species="bottlenose_dolphin") == "new_individual"
        assert top(location="Moray Firth") == "ind-40"
        assert top(date_from="2024-05-01", date_to="2024-06-30") == "ind-40"
        assert top(date_from="2024-06-02") == "new_individual"
        assert top(exclude_encounter="E1") == "new_individual"
        assert post_photo(client, encode(photo(40, 9)), date_from="June").status_code == 422


@pytest.fixture
def strict_live(catalogue: Catalogue) -> Iterator[LiveServer]:
    s = catalogue.settings.model_copy(
        update={"max_upload_bytes": 60_000, "max_image_pixels": 1_000_000}
    )
    yield from run_server(s)


def _state(settings: Settings) -> tuple[int, int, set[Path], bytes]:
    from service.db.tables import make_engine, make_sessionmaker

    engine = make_engine(settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        images = session.scalar(select(func.count()).select_from(ImageRow)) or 0
        idents = session.scalar(select(func.count()).select_from(Identification)) or 0
    engine.dispose()
    files = set(settings.photos_dir.rglob("*"))
    index = hashlib.sha256(index_path(settings, 1).read_bytes()).digest()
    return images, idents, files, index


@pytest.mark.slow
def test_bad_input_is_refused_clearly_and_leaves_nothing_behind(strict_live: LiveServer) -> None:
    before = _state(strict_live.settings)
    good = photo(1, 1, size=128)
    jpeg = encode(good, "JPEG")
    cases = [
        (b"", 422, "empty"),
        (b"hello, I am a text file", 415, "not an image"),
        (encode(good, "GIF"), 415, "GIF"),
        (jpeg[: len(jpeg) // 2], 422, "truncated"),
        (encode(Image.new("RGB", (1500, 1000)), "PNG"), 413, "pixels"),
        (encode(photo(1, 1, size=512), "BMP"), 413, "over the limit"),
    ]
    with strict_live.client() as client:
        for data, status, words in cases:
            response = post_photo(client, data)
            assert response.status_code == status, (words, response.text)
            assert words in response.json()["detail"]
        assert post_photo(client, jpeg, bbox="0,0,500,20").status_code == 422
        assert post_photo(client, jpeg, bbox="a,b").status_code == 422
        assert client.post("/identify", data={"species": "orca"}).status_code == 422
    assert _state(strict_live.settings) == before


def test_no_active_model_is_503_saying_how_to_add_one(sqlite_settings: Settings) -> None:
    for server in run_server(sqlite_settings):
        with server.client(None) as anonymous:
            assert anonymous.get("/health").json() == {"status": "ok"}
            ready = anonymous.get("/ready")
            assert ready.status_code == 503 and ready.json() == {"status": "not ready"}
        with server.client() as client:
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert "whaleid models add" in ready.json()["detail"]
            response = post_photo(client, encode(photo(1, 1)))
            assert response.status_code == 503
            assert "whaleid models add" in response.json()["detail"]


@pytest.mark.slow
def test_ready_tells_the_model_and_gallery_only_to_a_key(live: LiveServer) -> None:
    with live.client(None) as anonymous:
        assert anonymous.get("/ready").json() == {"status": "ready"}
        bogus = {"Authorization": "Bearer wid_" + "x" * 43}
        answer = anonymous.get("/ready", headers=bogus)
        assert answer.status_code == 200 and answer.json() == {"status": "ready"}
    for role in ("integration", "curator", "admin"):
        with live.client(role) as client:
            ready = client.get("/ready").json()
            assert ready["model"]["name"] == "toy" and ready["gallery_size"] == 36, role


@pytest.mark.slow
def test_catalogue_endpoints(live: LiveServer) -> None:
    with live.client() as client:
        ready = client.get("/ready").json()
        assert ready["status"] == "ready" and ready["gallery_size"] == 36
        page = client.get("/individuals", params={"limit": 5, "offset": 10}).json()
        assert page["total"] == 12 and page["offset"] == 10
        assert [i["individual_id"] for i in page["items"]] == ["ind-8", "ind-9"]
        assert all(i["image_count"] == 3 for i in page["items"])
        assert client.get("/individuals", params={"species": "orca"}).json()["total"] == 0
        detail = client.get("/individuals/ind-4").json()
        assert detail["species"] == "bottlenose_dolphin" and len(detail["images"]) == 3
        image = detail["images"][0]
        assert image["original_name"] == "ind4_shot0.png"
        data = client.get(image["url"]).content
        assert data == encode(photo(4, 0))
        assert client.get("/individuals/nobody").status_code == 404
        assert client.get("/images/424242/file").status_code == 404
        spec = client.get("/openapi.json").json()
        assert "/identify" in spec["paths"] and "humpback_whale" in str(spec)
