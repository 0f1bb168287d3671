"""No 500 from any input, on SQLite and PostgreSQL alike: integers beyond 64 bits, numbers that
are not finite, NUL characters, text longer than its column, and the reserved `new_individual`.
Each case is answered 404 or 422, and nothing of it is stored."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from service.catalogue.curation import create_individual
from service.catalogue.imports import CatalogueImport
from service.db.tables import Identification, Individual, make_engine, make_sessionmaker
from service.errors import BadText
from tests.conftest import Catalogue, LiveServer
from tests.service.catalogue.test_curation import decide, identify
from tests.toy import encode, photo, write_catalogue

HUGE = str(2**64)  # no 64-bit database column holds it
MAX_ID = str(2**63 - 1)  # the largest id there can be: a well-formed id that names nothing


def post_photo(client: httpx.Client, name: str = "q.png", **form: str) -> httpx.Response:
    return client.post("/identify", files={"photo": (name, encode(photo(3, 50)))}, data=form)


def post_raw_file_name(client: httpx.Client, name: bytes) -> httpx.Response:
    """A multipart upload whose file name bytes are sent as they are (httpx would escape a NUL)."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="photo"; filename="' + name + b'"\r\n'
        b"Content-Type: image/png\r\n\r\n" + encode(photo(3, 50)) + b"\r\n--b--\r\n"
    )
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    return client.post("/identify", content=body, headers=headers)


def assert_refused(response: httpx.Response, *statuses: int, says: str | None = None) -> None:
    assert response.status_code in (statuses or (422,)), (response.status_code, response.text)
    if says is not None:
        assert says in response.text, response.text


@pytest.mark.slow
def test_integers_beyond_64_bits_are_404_or_422(live: LiveServer) -> None:
    with live.client("admin") as admin:
        ident = identify(admin, 3, 50)["identification_id"]
        for path in (
            f"/images/{HUGE}/file",
            f"/identifications/{HUGE}",
            f"/identifications?offset={HUGE}",
            f"/identifications?model_id={HUGE}",
            f"/individuals?offset={HUGE}",
            f"/review?identification_id={HUGE}",
        ):
            assert_refused(admin.get(path), 404, 422)
        assert_refused(admin.delete(f"/keys/{HUGE}"), 404, 422)
        assert_refused(decide(admin, int(HUGE), decision="reject"), 404, 422)
        split = admin.post(
            "/individuals/ind-3/split", json={"image_ids": [int(HUGE)], "new_individual_id": "x"}
        )
        assert_refused(split, 404, 422)
        # The largest 64-bit id is well formed: it names nothing.
        assert admin.get(f"/images/{MAX_ID}/file").status_code == 404
        assert admin.get(f"/identifications/{MAX_ID}").status_code == 404
        assert admin.delete(f"/keys/{MAX_ID}").status_code == 404
        assert decide(admin, int(MAX_ID), decision="reject").status_code == 404
        page = admin.get(f"/identifications?offset={MAX_ID}&model_id={MAX_ID}")
        assert page.status_code == 200 and page.json()["items"] == []
        assert admin.get(f"/identifications/{ident}").status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    "bbox", ["inf,0,10,10", "0,0,1e400,10", "0,0,10," + "9" * 5000, "nan,0,1,1"]
)
def test_a_bbox_that_is_not_a_finite_number_is_422(live: LiveServer, bbox: str) -> None:
    with live.client() as client:
        assert_refused(post_photo(client, bbox=bbox), says="bbox")


def _no_nul_stored(live: LiveServer) -> None:
    """No row holds a NUL, and the species filter still works for everyone."""
    engine = make_engine(live.settings.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            for table, column in (
                ("individuals", "catalogue_id"),
                ("individuals", "display_name"),
                ("images", "original_name"),
                ("decisions", "comment"),
                ("api_keys", "name"),
            ):
                values = conn.execute(text(f"SELECT {column} FROM {table}")).scalars()
                assert not [v for v in values if v and "\x00" in v], (table, column)
            filters = conn.execute(text("SELECT CAST(filters AS TEXT) FROM identifications"))
            assert not [f for f in filters.scalars() if "\\u0000" in f]
    finally:
        engine.dispose()
    with live.client() as client:
        assert client.get("/identifications", params={"species": "x"}).status_code == 200


@pytest.mark.slow
def test_nul_in_any_text_is_422_and_never_stored(live: LiveServer) -> None:
    nul = "x\x00y"
    with live.client("admin") as admin:
        for field in ("species", "location", "exclude_encounter", "bbox"):
            assert_refused(post_photo(admin, **{field: nul}))
        assert_refused(post_raw_file_name(admin, b"q\x00.png"), says="NUL")
        for path in ("/identifications", "/individuals"):
            assert_refused(admin.get(path, params={"species": nul}))
        assert_refused(admin.get("/identifications", params={"status": nul}))
        assert_refused(admin.get("/review", params={"status": nul}))
        assert_refused(admin.get("/individuals/a%00b"))
        assert_refused(admin.get("/individuals/a%00b/history"))
        ident = identify(admin, 41, 1)["identification_id"]
        for body in (
            {"decision": "new_individual", "code": nul},
            {"decision": "new_individual", "name": nul},
            {"decision": "new_individual", "species": nul},
            {"decision": "reject", "comment": nul},
            {"decision": "confirm", "individual_id": nul},
        ):
            assert_refused(decide(admin, ident, **body), says="NUL")
        assert_refused(admin.post("/individuals", json={"individual_id": nul}))
        assert_refused(admin.post("/individuals", json={"individual_id": "ok", "name": nul}))
        assert_refused(admin.patch("/individuals/ind-3", json={"individual_id": nul}))
        assert_refused(admin.patch("/individuals/ind-3", json={"species": nul}))
        assert_refused(admin.post("/individuals/ind-3/merge", json={"into": nul}))
        ind3 = admin.get("/individuals/ind-3").json()["images"][0]["id"]
        split = {"image_ids": [ind3], "new_individual_id": nul}
        assert_refused(admin.post("/individuals/ind-3/split", json=split))
        assert_refused(admin.post("/keys", json={"name": nul, "role": "curator"}))
        assert admin.get(f"/identifications/{ident}").json()["status"] == "pending"
    _no_nul_stored(live)


@pytest.mark.slow
def test_text_longer_than_its_column_is_422_naming_the_limit(live: LiveServer) -> None:
    with live.client("admin") as admin:
        ident = identify(admin, 42, 1)["identification_id"]
        long_code = decide(admin, ident, decision="new_individual", code="c" * 201)
        assert_refused(long_code, says="200")
        assert_refused(
            decide(admin, ident, decision="new_individual", species="s" * 101), says="100"
        )
        assert_refused(decide(admin, ident, decision="new_individual", name="n" * 201), says="200")
        assert_refused(post_photo(admin, species="s" * 101), says="100")
        assert_refused(post_photo(admin, name="f" * 596 + ".png"), says="500")
        assert_refused(admin.post("/individuals", json={"individual_id": "i" * 201}), says="200")
        assert_refused(admin.post("/keys", json={"name": "k" * 201, "role": "admin"}), says="200")
        # At the limit itself everything is stored.
        exact = decide(admin, ident, decision="new_individual", code="c" * 200, species="s" * 100)
        assert exact.status_code == 200, exact.text
        assert admin.get("/individuals/" + "c" * 200).json()["species"] == "s" * 100
        assert post_photo(admin, name="f" * 496 + ".png").status_code == 200


def test_the_database_refuses_what_the_api_refuses(catalogue: Catalogue) -> None:
    """Below the API, a session refuses the same text on both databases (SQLite would keep it)."""
    with pytest.raises(BadText, match="over its limit of 200"):
        create_individual(catalogue.sessions, "c" * 201, None, None, "test")
    with pytest.raises(BadText, match="NUL"):
        create_individual(catalogue.sessions, "ok", None, "a\x00b", "test")
    with catalogue.sessions() as session:
        assert session.scalar(select(Individual).where(Individual.catalogue_id == "ok")) is None


@pytest.mark.slow
def test_a_blank_key_name_is_422(live: LiveServer) -> None:
    with live.client("admin") as admin:
        for name in ("", "   ", "\t"):
            assert_refused(admin.post("/keys", json={"name": name, "role": "curator"}))
        created = admin.post("/keys", json={"name": "  Ana  ", "role": "curator"})
        assert created.status_code == 201 and created.json()["name"] == "Ana"


RESERVED = ["new_individual", "NEW_INDIVIDUAL", " New_Individual ", "new_individual\t"]


@pytest.mark.slow
@pytest.mark.parametrize("code", RESERVED)
def test_new_individual_never_becomes_a_catalogue_id(
    live: LiveServer, tmp_path: Path, code: str
) -> None:
    with live.client("admin") as admin:
        ident = identify(admin, 43, 1)["identification_id"]
        assert_refused(decide(admin, ident, decision="new_individual", code=code), says="reserved")
        assert_refused(decide(admin, ident, decision="confirm", individual_id=code))
        assert_refused(admin.post("/individuals", json={"individual_id": code}), says="reserved")
        rename = admin.patch("/individuals/ind-3", json={"individual_id": code})
        assert_refused(rename, says="reserved")
        ind3 = admin.get("/individuals/ind-3").json()["images"][0]["id"]
        split = {"image_ids": [ind3], "new_individual_id": code}
        assert_refused(admin.post("/individuals/ind-3/split", json=split), says="reserved")
    # The catalogue import refuses the row.
    s = live.settings
    csv_path = write_catalogue(tmp_path / "import", [44], [0])
    csv_path.write_text(csv_path.read_text().replace("ind-44", code.strip() or code))
    factory = make_sessionmaker(make_engine(s.sqlalchemy_url))
    report = CatalogueImport(s, factory, None, None).run(csv_path, tmp_path / "import" / "images")
    assert report.imported == 0 and "reserved" in report.errors[0][1]
    with factory() as session:
        ids = session.scalars(select(Individual.catalogue_id)).all()
        assert not [i for i in ids if i.strip().lower() == "new_individual"]


def _zoned(value: Any) -> None:
    parsed = dt.datetime.fromisoformat(value)
    assert parsed.tzinfo is not None and parsed.utcoffset() == dt.timedelta(0), value


@pytest.mark.slow
def test_every_timestamp_is_iso_8601_with_a_timezone(live: LiveServer) -> None:
    with live.client("admin") as admin:
        ident = identify(admin, 45, 1)["identification_id"]
        decided = decide(admin, ident, decision="new_individual", code="HW-45").json()
        _zoned(decided["created_at"])
        one = admin.get(f"/identifications/{ident}").json()
        _zoned(one["created_at"])
        _zoned(one["decisions"][0]["created_at"])
        for item in admin.get("/identifications").json()["items"]:
            _zoned(item["created_at"])
        for event in admin.get("/individuals/HW-45/history").json():
            _zoned(event["created_at"])
        for key in admin.get("/keys").json():
            _zoned(key["created_at"])
        for model in admin.get("/models").json():
            _zoned(model["created_at"])
    with live.client() as client:
        _zoned(post_photo(client).json()["created_at"])
    with make_sessionmaker(make_engine(live.settings.sqlalchemy_url))() as session:
        assert session.get(Identification, ident) is not None
