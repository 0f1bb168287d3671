"""What an operator relies on: bounded decode and embed slots, bounded storage of query photos
and their retention, the last admin key, merged individuals, the review page's headers and
cookie, and 405s that say what is allowed."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import select, update

from service.cli import main
from service.db.tables import Embedding, Identification, make_engine, make_sessionmaker
from service.db.tables import Image as ImageRow
from service.settings import Settings
from tests.conftest import LiveServer, load_catalogue, run_server
from tests.service.access.test_review_sessions import sign_in
from tests.service.catalogue.test_curation import decide, identify
from tests.toy import encode, photo


@pytest.fixture
def busy_server(sqlite_settings: Settings, tmp_path: Path, toy_model: Path) -> Iterator[LiveServer]:
    settings = sqlite_settings.model_copy(
        update={"decode_slots": 1, "embed_slots": 1, "slot_wait_seconds": 0.3}
    )
    load_catalogue(settings, tmp_path / "catalogue", toy_model, individuals=4, shots=(0,))
    yield from run_server(settings)


def post(client: httpx.Client, data: bytes, name: str = "q.png", **form: str) -> httpx.Response:
    return client.post("/identify", files={"photo": (name, data)}, data=form)


@pytest.mark.parametrize("step", ["decode", "embed"])
def test_a_request_that_gets_no_slot_in_time_is_503_with_retry_after(
    busy_server: LiveServer, step: str
) -> None:
    slots = getattr(busy_server.app.state.runtime.slots, step)
    with busy_server.client() as client:
        with slots.hold():  # every slot taken (there is one)
            refused = post(client, encode(photo(1, 5)))
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert f"every {step} slot" in refused.json()["detail"]
        assert post(client, encode(photo(1, 5))).status_code == 200
    with make_sessionmaker(make_engine(busy_server.settings.sqlalchemy_url))() as session:
        # The refused request left nothing behind: one identification, from the second try.
        assert len(session.scalars(select(Identification)).all()) == 1


def _stored(live: LiveServer, client: httpx.Client, image_id: int) -> bytes:
    response = client.get(f"/images/{image_id}/file")
    assert response.status_code == 200
    engine = make_engine(live.settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        row = session.get_one(ImageRow, image_id)
        assert row.byte_size == len(response.content)
    engine.dispose()
    return response.content


@pytest.mark.slow
def test_query_photos_are_stored_bounded(live: LiveServer) -> None:
    big = photo(3, 50, size=64).resize((3000, 2000))
    junk = b"\xff" * 2_000_000
    with live.client() as client:
        # A large JPEG with junk appended: the region the model saw, at most 1024 px, re-encoded.
        body = post(client, encode(big, "JPEG", quality=95) + junk, "big.jpg").json()
        kept = _stored(live, client, body["query_image_id"])
        stored = Image.open(io.BytesIO(kept))
        assert max(stored.size) <= 1024 and stored.format == "JPEG"
        assert len(kept) < 500_000
        # A small photo with junk appended is re-encoded too (3 bytes per pixel at most are kept).
        small = encode(photo(4, 51), "JPEG", quality=90) + junk
        kept = _stored(live, client, post(client, small, "s.jpg").json()["query_image_id"])
        assert len(kept) < 64 * 1024 and Image.open(io.BytesIO(kept)).size == (64, 64)
        # A small, plain photo is kept byte for byte.
        plain = encode(photo(5, 52))
        kept = _stored(live, client, post(client, plain).json()["query_image_id"])
        assert hashlib.sha256(kept).digest() == hashlib.sha256(plain).digest()
        # A crop keeps only the crop: that is what was embedded.
        scene = photo(999, 1, size=192)
        scene.paste(photo(5, 60), (120, 100))
        cropped = post(client, encode(scene), bbox="120,100,64,64").json()
        kept = _stored(live, client, cropped["query_image_id"])
        assert Image.open(io.BytesIO(kept)).size == (64, 64)


def _age(live: LiveServer, image_ids: list[int], days: int) -> None:
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    engine = make_engine(live.settings.sqlalchemy_url)
    with make_sessionmaker(engine).begin() as session:
        session.execute(update(ImageRow).where(ImageRow.id.in_(image_ids)).values(created_at=then))
        session.execute(
            update(Identification)
            .where(Identification.query_image_id.in_(image_ids))
            .values(created_at=then)
        )
    engine.dispose()


@pytest.mark.slow
def test_prune_removes_unconfirmed_query_photos_after_the_retention_period(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = live.settings
    with live.client() as client, live.client("curator") as curator:
        pending = identify(client, 50, 1)
        rejected = identify(client, 51, 1)
        confirmed = identify(client, 52, 1)
        recent = identify(client, 53, 1)
        assert decide(curator, rejected["identification_id"], decision="reject").status_code == 200
        made = decide(
            curator, confirmed["identification_id"], decision="new_individual", code="HW-52"
        )
        assert made.status_code == 200
        old = [b["query_image_id"] for b in (pending, rejected, confirmed)]
        _age(live, old, days=100)

        monkeypatch.setenv("WHALEID_DATA_DIR", str(s.data_dir))
        monkeypatch.setenv("WHALEID_DATABASE_URL", s.sqlalchemy_url)
        with caplog.at_level(logging.INFO, logger="whaleid"):
            assert main(["prune", "--days", "90"]) == 0
        assert "pruned 2 query photos never confirmed within 90 days" in caplog.text

        factory = make_sessionmaker(make_engine(s.sqlalchemy_url))
        with factory() as session:
            rows = {i: session.get_one(ImageRow, i) for i in [*old, recent["query_image_id"]]}
            embedded = set(session.scalars(select(Embedding.image_id)))
        for body in (pending, rejected):
            row = rows[body["query_image_id"]]
            assert row.pruned_at is not None and row.id not in embedded
            assert not (s.photos_dir / row.file_path).exists()
            file = client.get(f"/images/{row.id}/file")
            assert file.status_code == 404 and "pruned" in file.text
            # The identification keeps its answer.
            kept = client.get(f"/identifications/{body['identification_id']}").json()
            assert kept["candidates"] == body["candidates"]
        for body in (confirmed, recent):  # in a gallery, or not old enough
            row = rows[body["query_image_id"]]
            assert row.pruned_at is None and (s.photos_dir / row.file_path).exists()
        assert identify(client, 52, 2)["candidates"][0]["individual_id"] == "HW-52"

        late = decide(curator, pending["identification_id"], decision="confirm", individual_id="x")
        assert late.status_code == 409 and "pruned" in late.text
        # The same photo sent again is kept again.
        again = identify(client, 50, 1)
        assert again["query_image_id"] == pending["query_image_id"]
        assert client.get(f"/images/{again['query_image_id']}/file").status_code == 200


@pytest.mark.slow
def test_the_last_admin_key_cannot_be_revoked_over_the_api(live: LiveServer) -> None:
    with live.client("admin") as admin:
        first = next(k for k in admin.get("/keys").json() if k["role"] == "admin")
        refused = admin.delete(f"/keys/{first['id']}")
        assert refused.status_code == 409 and "last admin key" in refused.json()["detail"]
        second = admin.post("/keys", json={"name": "deputy", "role": "admin"}).json()
        assert admin.delete(f"/keys/{first['id']}").status_code == 204
    with httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {second['key']}"}, timeout=60
    ) as deputy:
        assert deputy.delete(f"/keys/{second['id']}").status_code == 409
        assert deputy.get("/keys").status_code == 200


@pytest.mark.slow
def test_the_command_line_may_revoke_the_last_admin_key(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The way out the API's refusal names: on the server, ``whaleid keys revoke`` does it (and
    says so when there is no such key)."""
    with live.client("admin") as admin:
        last = next(k for k in admin.get("/keys").json() if k["role"] == "admin")
        assert admin.delete("/keys/999").status_code == 404  # no such key
    monkeypatch.setenv("WHALEID_DATA_DIR", str(live.settings.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", live.settings.sqlalchemy_url)
    assert main(["keys", "revoke", "999"]) == 2
    assert main(["keys", "revoke", str(last["id"])]) == 0
    with live.client("admin") as admin:
        assert admin.get("/keys").status_code == 401


@pytest.mark.slow
def test_editing_a_merged_individual_is_409_pointing_at_the_target(live: LiveServer) -> None:
    with live.client("curator") as curator:
        assert curator.post("/individuals/ind-1/merge", json={"into": "ind-2"}).status_code == 200
        for body in ({"name": "Notchy"}, {"species": "orca"}, {"individual_id": "ind-1b"}):
            refused = curator.patch("/individuals/ind-1", json=body)
            assert refused.status_code == 409, refused.text
            assert "'ind-2'" in refused.json()["detail"]
        assert curator.patch("/individuals/ind-2", json={"name": "Notchy"}).status_code == 200


@pytest.mark.slow
def test_a_405_carries_allow_with_every_method_of_the_path(live: LiveServer) -> None:
    with live.client() as client:
        for method, path, allow in (
            ("DELETE", "/individuals", "GET, POST"),
            ("DELETE", "/individuals/ind-1", "GET, PATCH"),
            ("PUT", "/identify", "POST"),
            ("POST", "/health", "GET"),
        ):
            response = client.request(method, path)
            assert response.status_code == 405
            assert response.headers["allow"] == allow


def test_the_review_page_sends_security_headers_and_a_secure_cookie_over_https(
    busy_server: LiveServer,
) -> None:
    with httpx.Client(base_url=busy_server.url, timeout=60) as browser:
        page = browser.get("/review/login")
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'nonce-" in csp
        assert "unsafe-inline" not in csp
        nonce = csp.split("'nonce-")[1].split("'")[0]
        assert f'nonce="{nonce}"' in page.text
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        key = busy_server.keys["curator"]
        plain = sign_in(browser, key)
        assert plain.status_code == 303 and "secure" not in plain.headers["set-cookie"].lower()
        # Behind a proxy (trusted by uvicorn: loopback) that says the request came over HTTPS.
        proxied = sign_in(browser, key, **{"X-Forwarded-Proto": "https"})
        cookie = proxied.headers["set-cookie"].lower()
        assert "; secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        # So is the form token's cookie of a page served over HTTPS.
        page = browser.get("/review/login", headers={"X-Forwarded-Proto": "https"})
        token = page.headers["set-cookie"].lower()
        assert (
            token.startswith("whaleid_csrf=") and "; secure" in token and "samesite=strict" in token
        )


@pytest.mark.parametrize(("setting", "secure"), [("always", True), ("never", False)])
def test_the_cookie_setting_overrides_the_scheme(
    sqlite_settings: Settings, setting: str, secure: bool
) -> None:
    from starlette.requests import Request

    from service.api.routes.review import secure_cookie

    scope = {"type": "http", "scheme": "https" if not secure else "http", "headers": []}
    scope |= {"server": ("whaleid", 80), "path": "/", "query_string": b""}
    settings = sqlite_settings.model_copy(update={"secure_cookie": setting})
    assert secure_cookie(Request(scope), settings) is secure


@pytest.mark.slow
def test_two_admins_revoking_each_other_at_once_leave_one(live: LiveServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with live.client("admin") as admin:
        first = next(k for k in admin.get("/keys").json() if k["role"] == "admin")
        second = admin.post("/keys", json={"name": "deputy", "role": "admin"}).json()
    pairs = [(live.keys["admin"], second["id"]), (second["key"], first["id"])]

    def revoke(pair: tuple[str, int]) -> int:
        key, target = pair
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=live.url, headers=headers, timeout=30) as client:
            return client.delete(f"/keys/{target}").status_code

    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(revoke, pairs))
    # Either one revocation wins and the other is refused (409), or the second caller's key was
    # already revoked when it came (401); never both revoked.
    assert statuses in ([204, 401], [204, 409]), statuses
    with (
        live.client("admin") as admin,
        httpx.Client(
            base_url=live.url, headers={"Authorization": f"Bearer {second['key']}"}, timeout=60
        ) as deputy,
    ):
        alive = [c.get("/keys").status_code for c in (admin, deputy)]
    assert sorted(alive) == [200, 401]
