"""Rules a user relies on that no other test pins down: date filters, the review page's cookie
and CSRF guard, the open-set counters of evaluation, orphan files, and database URLs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, text

from service.db import migrate
from service.db.tables import Image, make_engine
from service.gallery.sync import Filters, GalleryEntries
from service.matching.runtime import Runtime
from service.models.evaluation import evaluate
from service.settings import Settings
from tests.conftest import Catalogue, LiveServer, load_catalogue
from tests.service.access.test_review_sessions import sign_in
from tests.toy import build_toy_model, encode, photo, write_catalogue

JUNE_1, JUNE_2 = dt.date(2024, 6, 1), dt.date(2024, 6, 2)


def entries() -> GalleryEntries:
    # (embedding id, image id, label, species, location, date, encounter)
    return GalleryEntries.from_rows(
        [
            (1, 11, "a", "orca", None, JUNE_1, None),
            (2, 12, "b", "orca", None, JUNE_2, None),
            (3, 13, "c", "orca", None, None, None),  # undated
        ]
    )


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (Filters(date_to=JUNE_1), [1]),  # date_to is inclusive
        (Filters(date_from=JUNE_2), [2]),  # so is date_from
        (Filters(date_from=JUNE_1, date_to=JUNE_1), [1]),
        (Filters(date_from=JUNE_1, date_to=JUNE_2), [1, 2]),
        (Filters(species="orca"), [1, 2, 3]),  # no date filter: undated photos count
    ],
)
def test_date_filters_are_inclusive_and_leave_out_undated_photos(
    filters: Filters, expected: list[int]
) -> None:
    selected = entries().select(filters)
    assert selected is not None and selected.tolist() == expected


@pytest.mark.slow
def test_review_cookie_is_httponly_strict_and_cannot_forge_writes(live: LiveServer) -> None:
    import httpx

    with httpx.Client(base_url=live.url, timeout=60) as browser:
        login = sign_in(browser, live.keys["curator"])
        assert login.status_code == 303
        [cookie] = [c.lower() for c in login.headers.get_list("set-cookie")]
        assert cookie.startswith("whaleid_session=")
        assert "httponly" in cookie and "samesite=strict" in cookie
        with live.client() as integration:
            ident = integration.post(
                "/identify", files={"photo": ("q.png", encode(photo(3, 50)))}
            ).json()["identification_id"]
        url = f"/identifications/{ident}/decision"
        body = {"decision": "confirm", "individual_id": "ind-3"}
        # A form or fetch from another site carries the cookie but cannot add the header.
        forged = browser.post(url, json=body)
        assert forged.status_code == 401
        assert browser.get(f"/identifications/{ident}").json()["status"] == "pending"
        sent = browser.post(url, json=body, headers={"X-Requested-With": "fetch"})
        assert sent.status_code == 200, sent.text
        assert browser.get(f"/identifications/{ident}").json()["status"] == "confirmed"


def test_evaluate_counts_new_individual_answers_on_known_and_unseen(
    settings: Settings, tmp_path: Path
) -> None:
    # A cutoff no gallery photo can meet: every answer starts with new_individual.
    strict = build_toy_model(tmp_path / "strict.onnx", metadata={"whaleid.cutoff": "0.0000001"})
    catalogue = load_catalogue(settings, tmp_path / "cat", strict, individuals=5)
    queries = write_catalogue(tmp_path / "q", [0, 1, 2, 600], [9], name="queries.csv")
    runtime = Runtime(settings, catalogue.sessions)
    result = evaluate(runtime.current(), queries, tmp_path / "q" / "images")
    summary = result.summary()
    assert (summary["known_queries"], summary["unseen_queries"]) == (3, 1)
    assert summary["known_flagged_new"] == 3 and summary["unseen_flagged_new"] == 1
    assert summary["map5_unseen"] == 1.0 and summary["map5_known"] == 0.5  # each at rank 2
    # Each known cow is second, behind new_individual: in the top five, never first.
    assert (summary["known_top1"], summary["known_top5"]) == (0, 3)


def test_photo_file_is_removed_when_the_database_write_fails(catalogue: Catalogue) -> None:
    s = catalogue.settings
    runtime = Runtime(s, catalogue.sessions)
    identifier = runtime.current()
    before = {p for p in s.photos_dir.rglob("*") if p.is_file()}
    engine = identifier.factory.kw["bind"]

    def refuse(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            raise RuntimeError("disk full")

    event.listen(engine, "before_cursor_execute", refuse)
    try:
        with pytest.raises(Exception, match="disk full"):
            identifier.identify(encode(photo(8, 55)), filters=Filters())
    finally:
        event.remove(engine, "before_cursor_execute", refuse)
    assert {p for p in s.photos_dir.rglob("*") if p.is_file()} == before
    with catalogue.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 36
    # The same photo goes through once the database takes writes again.
    assert identifier.identify(encode(photo(8, 55)), filters=Filters()).query_image_id


@pytest.mark.parametrize("scheme", ["postgres://", "postgresql://", "postgresql+psycopg://"])
def test_database_urls_are_normalised_for_sqlalchemy(scheme: str) -> None:
    s = Settings(database_url=f"{scheme}u:p@db.example:5432/whaleid", _env_file=None)  # type: ignore[call-arg]
    assert s.sqlalchemy_url == "postgresql+psycopg://u:p@db.example:5432/whaleid"


@pytest.mark.postgres
def test_a_heroku_style_postgres_url_reaches_the_database(postgres_url: str) -> None:
    heroku = postgres_url.replace("postgresql+psycopg://", "postgres://")
    s = Settings(database_url=heroku, _env_file=None)  # type: ignore[call-arg]
    migrate.upgrade(s.sqlalchemy_url)
    engine = make_engine(s.sqlalchemy_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM models")).scalar() == 0
    engine.dispose()
