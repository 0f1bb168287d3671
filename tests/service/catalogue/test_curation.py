"""Curators' decisions and catalogue edits, end to end over loopback, and their integrity under
concurrency and crashes."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from service.db.tables import ApiKey, Individual, make_engine, make_sessionmaker
from service.gallery.index import GalleryIndex
from service.gallery.sync import GalleryEntries, gallery_rows, index_path
from service.settings import Settings
from tests.conftest import (
    Catalogue,
    LiveServer,
    free_port,
    make_keys,
    run_server,
    serve_process,
)
from tests.toy import encode, photo


def identify(client: httpx.Client, individual: int, shot: int, **form: str) -> dict[str, Any]:
    response = client.post(
        "/identify", files={"photo": ("q.png", encode(photo(individual, shot)))}, data=form
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def top(body: dict[str, Any]) -> str:
    return str(body["candidates"][0]["individual_id"])


def decide(client: httpx.Client, ident: int, **body: Any) -> httpx.Response:
    return client.post(f"/identifications/{ident}/decision", json=body)


@pytest.mark.slow
def test_new_individual_joins_the_gallery_at_once(live: LiveServer) -> None:
    with live.client() as integration, live.client("curator") as curator:
        first = identify(integration, 40, 1)
        assert top(first) == "new_individual"
        response = decide(
            curator,
            first["identification_id"],
            decision="new_individual",
            code="HW-40",
            name="Notchy",
            comment="clear trailing-edge nick",
        )
        assert response.status_code == 200, response.text
        decision = response.json()
        assert decision["individual_id"] == "HW-40" and decision["candidate_rank"] == 1
        assert decision["curator"] == "curator tester" and not decision["replayed"]
        again = identify(integration, 40, 2)  # another photo of the same animal
        assert top(again) == "HW-40"
        assert again["candidates"][0]["best_image_id"] == first["query_image_id"]
        assert again["gallery_size"] == first["gallery_size"] + 1
        detail = integration.get("/individuals/HW-40").json()
        assert detail["display_name"] == "Notchy" and len(detail["images"]) == 1
        events = [e["event"] for e in integration.get("/individuals/HW-40/history").json()]
        assert events == ["created", "photo_added"]
        recorded = integration.get(f"/identifications/{first['identification_id']}").json()
        assert recorded["status"] == "new_individual"
        assert recorded["decisions"][0]["comment"] == "clear trailing-edge nick"


@pytest.mark.slow
def test_decisions_are_idempotent_conflicts_409_and_supersede_keeps_history(
    live: LiveServer,
) -> None:
    with live.client() as integration, live.client("curator") as curator:
        body = identify(integration, 3, 60)
        ident = body["identification_id"]
        first = decide(curator, ident, decision="confirm", individual_id="ind-3").json()
        assert first["candidate_rank"] == 1
        repeat = decide(curator, ident, decision="confirm", individual_id="ind-3")
        assert repeat.status_code == 200
        assert repeat.json()["decision_id"] == first["decision_id"] and repeat.json()["replayed"]
        conflict = decide(curator, ident, decision="confirm", individual_id="ind-4")
        assert conflict.status_code == 409
        assert "supersede" in conflict.json()["detail"]
        moved = decide(curator, ident, decision="confirm", individual_id="ind-4", supersede=True)
        assert moved.status_code == 200
        assert moved.json()["candidate_rank"] is None  # ind-4 was not among the five proposed
        # The gallery follows: the same photo now matches ind-4 exactly.
        same = identify(integration, 3, 60)
        assert top(same) == "ind-4" and same["candidates"][0]["distance"] < 1e-4
        history = integration.get(f"/identifications/{ident}").json()["decisions"]
        assert [(d["individual_id"], d["superseded"]) for d in history] == [
            ("ind-3", True),
            ("ind-4", False),
        ]
        assert len(integration.get("/individuals/ind-3").json()["images"]) == 3
        assert len(integration.get("/individuals/ind-4").json()["images"]) == 4
        rejected = decide(curator, ident, decision="reject", supersede=True)
        assert rejected.status_code == 200
        assert len(integration.get("/individuals/ind-4").json()["images"]) == 3
        assert integration.get(f"/identifications/{ident}").json()["status"] == "rejected"
        assert decide(curator, 999999, decision="reject").status_code == 404
        assert decide(curator, ident, decision="confirm").status_code == 422
        unknown = decide(curator, ident, decision="confirm", individual_id="nobody", supersede=True)
        assert unknown.status_code == 404 and "nobody" in unknown.json()["detail"]


@pytest.mark.slow
def test_review_queue_lists_pending_identifications(live: LiveServer) -> None:
    with live.client() as integration, live.client("curator") as curator:
        a = identify(integration, 1, 70)["identification_id"]
        b = identify(integration, 2, 70)["identification_id"]
        decide(curator, a, decision="reject")
        c = identify(integration, 2, 71, species="orca")["identification_id"]
        pending = integration.get("/identifications", params={"status": "pending"}).json()
        assert [i["identification_id"] for i in pending["items"]] == [b, c]
        assert pending["items"][0]["top_candidate"] == "ind-2" and pending["total"] == 2
        orca = integration.get("/identifications", params={"species": "orca"}).json()
        assert [i["identification_id"] for i in orca["items"]] == [c]
        paged = integration.get("/identifications", params={"limit": 1, "offset": 1}).json()
        assert paged["total"] == 3 and [i["identification_id"] for i in paged["items"]] == [b]


@pytest.mark.slow
def test_merge_moves_every_photo_and_redirects(live: LiveServer) -> None:
    with live.client() as integration, live.client("curator") as curator:
        response = curator.post("/individuals/ind-7/merge", json={"into": "ind-8"})
        assert response.status_code == 200, response.text
        assert response.json()["individual_id"] == "ind-8"
        assert response.json()["image_count"] == 6
        assert top(identify(integration, 7, 80)) == "ind-8"
        redirect = integration.get("/individuals/ind-7", follow_redirects=False)
        assert redirect.status_code == 308
        assert redirect.headers["location"] == "/individuals/ind-8"
        followed = integration.get("/individuals/ind-7", follow_redirects=True)
        assert followed.json()["individual_id"] == "ind-8" and len(followed.json()["images"]) == 6
        merged = [e["event"] for e in integration.get("/individuals/ind-7/history").json()]
        assert merged[-1] == "merged_into"
        listing = integration.get("/individuals", params={"limit": 100}).json()
        assert "ind-7" not in [i["individual_id"] for i in listing["items"]]
        # A confirmation naming the merged id lands in the individual it was merged into.
        ident = identify(integration, 7, 81)["identification_id"]
        assert (
            decide(curator, ident, decision="confirm", individual_id="ind-7").json()[
                "individual_id"
            ]
            == "ind-8"
        )
        again = curator.post("/individuals/ind-7/merge", json={"into": "ind-9"})
        assert again.status_code == 409
        assert curator.post("/individuals/ind-8/merge", json={"into": "ind-8"}).status_code == 422


@pytest.mark.slow
def test_split_rename_and_species_change_reach_the_gallery(live: LiveServer) -> None:
    with live.client() as integration, live.client("curator") as curator:
        images = integration.get("/individuals/ind-5").json()["images"]
        moved = images[0]["id"]
        response = curator.post(
            "/individuals/ind-5/split", json={"image_ids": [moved], "new_individual_id": "ind-5b"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["image_count"] == 1
        assert len(integration.get("/individuals/ind-5").json()["images"]) == 2
        bad = curator.post("/individuals/ind-5/split", json={"image_ids": [moved], "into": "ind-6"})
        assert bad.status_code == 422 and str(moved) in bad.json()["detail"]

        renamed = curator.patch(
            "/individuals/ind-6",
            json={"individual_id": "ind-6x", "name": "Notchy", "species": "orca"},
        )
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["display_name"] == "Notchy"
        same = curator.patch("/individuals/ind-6x", json={"name": "Notchy"})  # no change, no event
        assert same.status_code == 200 and same.json()["display_name"] == "Notchy"
        assert top(identify(integration, 6, 90)) == "ind-6x"
        assert top(identify(integration, 6, 90, species="orca")) == "ind-6x"
        assert top(identify(integration, 6, 90, species="bottlenose_dolphin")) != "ind-6x"
        events = [e["event"] for e in integration.get("/individuals/ind-6x/history").json()]
        assert events == ["renamed", "name_changed", "species_changed"]
        assert integration.get("/individuals/ind-6").status_code == 404
        created = curator.post("/individuals", json={"individual_id": "ind-99", "species": "orca"})
        assert created.status_code == 201
        assert curator.post("/individuals", json={"individual_id": "ind-99"}).status_code == 409


@pytest.mark.slow
def test_roles_are_enforced_with_messages_saying_what_is_missing(live: LiveServer) -> None:
    with (
        live.client(None) as anonymous,
        live.client() as integration,
        live.client("curator") as curator,
        live.client("admin") as admin,
    ):
        missing = anonymous.post("/identify", files={"photo": ("q.png", encode(photo(1, 1)))})
        assert missing.status_code == 401
        assert "whaleid keys create" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        ident = identify(integration, 1, 95)["identification_id"]
        forbidden = decide(integration, ident, decision="reject")
        assert forbidden.status_code == 403
        assert "curator role" in forbidden.json()["detail"]
        assert "integration tester" in forbidden.json()["detail"]
        assert curator.get("/keys").status_code == 403
        assert curator.post("/individuals/ind-1/merge", json={"into": "ind-2"}).status_code != 403
        created = admin.post("/keys", json={"name": "Field app", "role": "integration"})
        assert created.status_code == 201
        key = created.json()["key"]
        with httpx.Client(
            base_url=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as app:
            assert app.get("/individuals").status_code == 200
            assert admin.delete(f"/keys/{created.json()['id']}").status_code == 204
            revoked = app.get("/individuals")
            assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
        assert anonymous.get("/health").status_code == 200
    engine = make_engine(live.settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        hashes = set(session.scalars(select(ApiKey.key_hash)))
    engine.dispose()
    assert key not in hashes and all(len(h) == 64 for h in hashes)


@pytest.mark.slow
def test_auth_can_be_switched_off_explicitly(catalogue: Catalogue) -> None:
    open_settings = catalogue.settings.model_copy(update={"auth": False})
    for server in run_server(open_settings):
        with server.client(None) as client:
            ident = identify(client, 2, 96)["identification_id"]
            decision = decide(client, ident, decision="confirm", individual_id="ind-2").json()
            assert decision["curator"] == "anonymous (auth off)"


def _race(live: LiveServer, ident: int, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(bodies))

    def send(body: dict[str, Any]) -> httpx.Response:
        with live.client("curator") as client:
            barrier.wait()
            return decide(client, ident, **body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


@pytest.mark.slow
def test_two_curators_deciding_at_once(live: LiveServer) -> None:
    with live.client() as integration:
        for round_ in range(4):
            ident = identify(integration, 200 + round_, 1)["identification_id"]
            answers = _race(
                live,
                ident,
                [
                    {"decision": "confirm", "individual_id": "ind-1"},
                    {"decision": "confirm", "individual_id": "ind-2"},
                ],
            )
            assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
            same = identify(integration, 300 + round_, 1)["identification_id"]
            twins = _race(live, same, [{"decision": "new_individual", "code": f"N{round_}"}] * 2)
            assert [r.status_code for r in twins] == [200, 200]
            assert twins[0].json()["decision_id"] == twins[1].json()["decision_id"]
    engine = make_engine(live.settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        created = session.scalar(
            select(func.count()).select_from(Individual).where(Individual.catalogue_id.like("N%"))
        )
    engine.dispose()
    assert created == 4


@pytest.mark.slow
def test_merges_while_identify_runs_leave_a_consistent_index(live: LiveServer) -> None:
    stop = threading.Event()
    failures: list[str] = []

    def hammer() -> None:
        with live.client() as client:
            while not stop.is_set():
                r = client.post("/identify", files={"photo": ("q.png", encode(photo(9, 5)))})
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with live.client("curator") as curator:
            for a, b in [(9, 10), (10, 11), (0, 1), (2, 3)]:
                r = curator.post(f"/individuals/ind-{a}/merge", json={"into": f"ind-{b}"})
                assert r.status_code == 200, r.text
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    with live.client() as client:
        assert top(identify(client, 9, 6)) == "ind-11"
    # The live index holds exactly the gallery the database describes, with the new labels.
    engine = make_engine(live.settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        expected = GalleryEntries.from_rows(gallery_rows(session, 1))
    engine.dispose()
    gallery = live.app.state.runtime.loaded.gallery
    assert np.array_equal(np.sort(gallery.index.ids()), expected.ids)
    assert np.array_equal(gallery.entries.ids, expected.ids)
    assert gallery.entries.labels == expected.labels
    assert "ind-9" not in expected.labels and "ind-11" in expected.labels


@pytest.fixture
def subprocess_server(catalogue: Catalogue) -> Iterator[tuple[Settings, dict[str, str]]]:
    yield catalogue.settings, make_keys(catalogue.settings)


@pytest.mark.slow
def test_crash_between_commit_and_index_update_is_repaired_at_next_start(
    subprocess_server: tuple[Settings, dict[str, str]],
) -> None:
    settings, keys = subprocess_server
    port = free_port()
    headers = {"Authorization": f"Bearer {keys['curator']}"}
    process = serve_process(settings, port, WHALEID_FAILPOINT="after-decision-commit")
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60
        ) as client:
            first = identify(client, 41, 1)
            assert top(first) == "new_individual"
            with pytest.raises(httpx.TransportError):
                decide(client, first["identification_id"], decision="new_individual", code="X41")
        assert process.wait(timeout=30) == 70  # it died after the commit, before the index
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    stale, _ = GalleryIndex.load(index_path(settings, 1))
    process = serve_process(settings, port)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60
        ) as client:
            assert top(identify(client, 41, 2)) == "X41"
            status = client.get(f"/identifications/{first['identification_id']}").json()["status"]
            assert status == "new_individual"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    repaired, sidecar = GalleryIndex.load(index_path(settings, 1))
    assert repaired.count == stale.count + 1  # the confirmed photo, written at the restart
    assert np.isin(stale.ids(), repaired.ids()).all()
