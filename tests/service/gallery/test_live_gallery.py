"""What a running server answers after the catalogue changes under it: a stale index file,
another model activated, a split, and decisions sent twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from service.cli import main
from service.db.tables import Embedding, Image, Individual
from service.gallery.sync import Filters, Gallery, index_path
from service.onnx.embedder import Embedder
from tests.conftest import Catalogue, LiveServer
from tests.toy import build_toy_model, encode, photo


def identify(client: httpx.Client, individual: int, shot: int) -> dict[str, Any]:
    response = client.post("/identify", files={"photo": ("q.png", encode(photo(individual, shot)))})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_an_index_entry_the_database_no_longer_has_is_removed_at_start(
    catalogue: Catalogue,
) -> None:
    """The index file was written while photo X was in the gallery; the database then lost it
    (restored from a backup, edited by hand). At the next start X must not vote."""
    s = catalogue.settings
    path = index_path(s, catalogue.model_id)
    dim = Embedder(next(s.models_dir.glob("*.onnx"))).dim
    first = Gallery(catalogue.model_id, dim, path)
    first.open(catalogue.sessions)
    assert path.exists()
    with catalogue.sessions() as session:
        image = session.scalars(
            select(Image).join(Individual).where(Individual.catalogue_id == "ind-4")
        ).first()
        assert image is not None
        removed_image = image.id
        embedding = session.scalars(
            select(Embedding).where(Embedding.image_id == removed_image)
        ).one()
        removed_embedding, vector = embedding.id, np.frombuffer(embedding.vector, np.float32)
        image.individual_id = None  # no change-log row: the log cannot tell the replica
        session.commit()
    assert removed_embedding in first.index.ids()  # the file on disk still holds it

    restarted = Gallery(catalogue.model_id, dim, path)
    restarted.open(catalogue.sessions)
    assert removed_embedding not in restarted.index.ids()
    assert restarted.size == first.size - 1
    neighbours, _ = restarted.search(vector, 50, Filters())
    assert removed_image not in {n.image_id for n in neighbours}
    # The repaired file is what the next start loads.
    again = Gallery(catalogue.model_id, dim, path)
    again.open(catalogue.sessions)
    assert removed_embedding not in again.index.ids()


@pytest.mark.slow
def test_activating_another_model_is_answered_with_at_the_next_request(
    live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = live.settings
    monkeypatch.setenv("WHALEID_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", s.sqlalchemy_url)
    other = build_toy_model(tmp_path / "other.onnx", seed=7, metadata={"whaleid.name": "toy-b"})
    with live.client() as client:
        before = identify(client, 2, 30)
        assert before["model"]["name"] == "toy"
        assert main(["models", "add", str(other)]) == 0
        assert identify(client, 2, 30)["model"]["name"] == "toy"  # registered, not active
        new_id = 1 + before["model"]["id"]
        assert main(["models", "activate", str(new_id)]) == 0
        after = identify(client, 2, 30)
    assert after["model"] == {**after["model"], "id": new_id, "name": "toy-b", "version": "seed7"}
    assert after["candidates"][0]["individual_id"] == "ind-2"  # the new gallery was embedded
    assert after["gallery_size"] == before["gallery_size"]


@pytest.mark.slow
def test_a_split_reaches_the_live_gallery(live: LiveServer) -> None:
    with live.client() as integration, live.client("curator") as curator:
        photos = [i["id"] for i in integration.get("/individuals/ind-5").json()["images"]]
        assert len(photos) == 3
        moved = photos[0]
        data = integration.get(f"/images/{moved}/file").content
        response = curator.post(
            "/individuals/ind-5/split", json={"image_ids": [moved], "new_individual_id": "ind-5b"}
        )
        assert response.status_code == 200, response.text
        # The moved photo itself is the nearest gallery photo: it must now vote for ind-5b.
        answer = integration.post("/identify", files={"photo": ("q.png", data)}).json()
    found = {c["individual_id"]: c for c in answer["candidates"]}
    assert found["ind-5b"]["best_image_id"] == moved
    # The photo itself (0, to the rounding of the gallery's half floats).
    assert found["ind-5b"]["distance"] == pytest.approx(0, abs=1e-4)
    assert found["ind-5"]["votes"] == 2 and found["ind-5b"]["votes"] == 1
    assert found["ind-5"]["best_image_id"] in photos[1:]


def decide(client: httpx.Client, ident: int, **body: Any) -> httpx.Response:
    return client.post(f"/identifications/{ident}/decision", json=body)


@pytest.mark.slow
@pytest.mark.parametrize(
    "body", [{"decision": "reject"}, {"decision": "new_individual", "code": "HW-77"}]
)
def test_reject_and_new_individual_replay_when_sent_again(
    live: LiveServer, body: dict[str, Any]
) -> None:
    with live.client() as integration, live.client("curator") as curator:
        ident = identify(integration, 77, 1)["identification_id"]
        first = decide(curator, ident, **body)
        assert first.status_code == 200, first.text
        again = decide(curator, ident, **body)
        assert again.status_code == 200, again.text
        assert again.json()["replayed"] and not first.json()["replayed"]
        assert again.json()["decision_id"] == first.json()["decision_id"]
        history = integration.get(f"/identifications/{ident}").json()["decisions"]
        assert len(history) == 1
        # Something else is a conflict, not a replay.
        other = {"decision": "confirm", "individual_id": "ind-1"}
        assert decide(curator, ident, **other).status_code == 409


@pytest.mark.slow
def test_a_confirmation_naming_a_since_merged_individual_replays(live: LiveServer) -> None:
    with live.client() as integration, live.client("curator") as curator:
        ident = identify(integration, 6, 40)["identification_id"]
        first = decide(curator, ident, decision="confirm", individual_id="ind-6")
        assert first.status_code == 200, first.text
        merged = curator.post("/individuals/ind-6/merge", json={"into": "ind-7"})
        assert merged.status_code == 200, merged.text
        # A client retrying its request after a timeout still names ind-6.
        again = decide(curator, ident, decision="confirm", individual_id="ind-6")
        assert again.status_code == 200, again.text
        assert again.json()["replayed"]
        assert again.json()["decision_id"] == first.json()["decision_id"]
        # Naming the individual it now lives in is the same decision too.
        assert decide(curator, ident, decision="confirm", individual_id="ind-7").json()["replayed"]


@pytest.mark.slow
def test_a_photo_already_in_the_catalogue_cannot_be_confirmed_as_another(
    live: LiveServer,
) -> None:
    with live.client() as integration, live.client("curator") as curator:
        gallery_photo = integration.get("/individuals/ind-2").json()["images"][0]["id"]
        data = integration.get(f"/images/{gallery_photo}/file").content
        # The same bytes uploaded again are the same photo, already filed under ind-2.
        ident = integration.post("/identify", files={"photo": ("q.png", data)}).json()
        response = decide(
            curator, ident["identification_id"], decision="confirm", individual_id="ind-9"
        )
        assert response.status_code == 409
        assert "ind-2" in response.json()["detail"]
        assert len(integration.get("/individuals/ind-9").json()["images"]) == 3


@pytest.mark.slow
def test_creating_an_individual_is_in_its_history(live: LiveServer) -> None:
    with live.client("curator") as curator:
        created = curator.post("/individuals", json={"individual_id": "HW-900", "name": "Scar"})
        assert created.status_code == 201, created.text
        events = curator.get("/individuals/HW-900/history").json()
    assert [e["event"] for e in events] == ["created"]
    assert events[0]["actor"] == "curator tester"


@pytest.mark.slow
def test_a_gallery_growing_past_the_ivf_threshold_switches_index_kind(
    catalogue: Catalogue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay moves a gallery from the flat index to IVF when it crosses the threshold, and the
    moved photos are found by their embedding ids (which differ from their image ids here)."""
    from service.catalogue.imports import CatalogueImport
    from service.db.tables import Model
    from tests.toy import write_catalogue

    s = catalogue.settings
    model_file = next(s.models_dir.glob("*.onnx"))
    other = build_toy_model(tmp_path / "other.onnx", seed=3, metadata={"whaleid.name": "toy-c"})
    monkeypatch.setenv("WHALEID_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", s.sqlalchemy_url)
    assert main(["models", "add", str(other)]) == 0
    dim = Embedder(model_file).dim
    gallery = Gallery(catalogue.model_id, dim, index_path(s, catalogue.model_id), ivf_threshold=40)
    gallery.open(catalogue.sessions)
    assert gallery.index.plan.kind == "flat" and gallery.size == 36
    with catalogue.sessions() as session:
        second = session.scalars(select(Model.id).where(Model.name == "toy-c")).one()

    # The second model's embeddings come first, so the first model's new embedding ids and
    # image ids part ways.
    def add(individuals: range, folder: str) -> None:
        csv_path = write_catalogue(tmp_path / folder, individuals, [0, 1])
        for model_id, path in ((second, tmp_path / "other.onnx"), (catalogue.model_id, model_file)):
            CatalogueImport(s, catalogue.sessions, Embedder(path), model_id).run(
                csv_path, tmp_path / folder / "images"
            )

    def assert_index_equals_database() -> None:
        with catalogue.sessions() as session:
            rows = session.execute(
                select(Embedding.id, Embedding.image_id, Embedding.vector).where(
                    Embedding.model_id == catalogue.model_id
                )
            ).all()
        assert any(e != i for e, i, _ in rows)
        assert sorted(gallery.index.ids().tolist()) == sorted(e for e, _, _ in rows)
        for emb_id, image_id, vector in rows[-12:]:
            neighbours, _ = gallery.search(np.frombuffer(vector, np.float32), 1, Filters())
            assert neighbours[0].image_id == image_id, emb_id

    # The second model's embeddings come first, so the first model's new embedding ids and
    # image ids part ways.
    add(range(20, 26), "more")
    assert gallery.sync(catalogue.sessions)  # a rebuild: the index kind changes
    assert gallery.index.plan.kind == "ivf" and gallery.size == 48
    assert_index_equals_database()
    add(range(30, 31), "again")
    assert gallery.sync(catalogue.sessions)  # a patch of two photos
    assert gallery.size == 50
    assert_index_equals_database()
