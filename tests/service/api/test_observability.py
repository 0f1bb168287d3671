"""Observability end to end over loopback: /metrics, request ids, JSON logs, the per-key rate
limit, the request timeout and CORS."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service.api.collectors import JobQueueCollector
from service.db.tables import Job, make_engine, transaction
from service.logs import JsonFormatter
from service.settings import Settings
from tests.conftest import Catalogue, LiveServer, run_server
from tests.toy import encode, photo


def samples(body: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def serve(catalogue: Catalogue, **changes: object) -> Iterator[LiveServer]:
    yield from run_server(catalogue.settings.model_copy(update=changes))


@pytest.mark.slow
def test_metrics_need_a_key_and_count_routes_by_template_and_identify_by_stage(
    live: LiveServer,
) -> None:
    with live.client(None) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
    with live.client() as client:
        assert client.post("/identify", files={"photo": ("q.png", encode(photo(2, 9)))}).is_success
        assert client.get("/identifications/987654").status_code == 404
        assert client.get("/no/such/path/4711").status_code == 404
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    by_route = {
        dict(labels)["route"]
        for (name, labels) in found
        if name == "whaleid_request_duration_seconds_count"
    }
    assert {"/identify", "/identifications/{identification_id}", "unmatched"} <= by_route
    assert not any("987654" in r or "4711" in r for r in by_route)
    stage = ("whaleid_identify_stage_seconds_count", frozenset({("stage", "embed")}))
    assert found[stage] == 1
    assert found[("whaleid_gallery_embeddings", frozenset({("model", "toy:seed0")}))] == 36
    assert found[("whaleid_slots_in_use", frozenset({("step", "decode")}))] == 0
    assert found[("whaleid_slots", frozenset({("step", "decode")}))] == 2
    # One inference at a time by default: it already spreads over every core.
    # Two inferences per core by default (Settings.embed_slot_count), at least two.
    embed_slots = live.settings.embed_slot_count
    assert embed_slots == max(2, 2 * (os.cpu_count() or 1))
    assert found[("whaleid_slots", frozenset({("step", "embed")}))] == embed_slots


@pytest.mark.parametrize(
    ("http", "made_up"),
    [
        # h11 takes any token as a method; httptools (llhttp) the methods it knows, WebDAV's too.
        ("h11", ["BREW0", "BREW1", "BREW2", "X-ANYTHING", "PROPFIND"]),
        ("httptools", ["PROPFIND", "MKCOL", "PURGE", "LOCK", "SEARCH"]),
    ],
)
def test_made_up_methods_share_one_metrics_label(
    sqlite_settings: Settings, http: str, made_up: list[str]
) -> None:
    """Each method a parser lets through must not become a label value of its own."""
    for server in run_server(sqlite_settings, http=http):
        with server.client() as client:
            for method in made_up:
                assert client.request(method, "/health").status_code == 405, method
                assert client.request(method, "/no/such/path").status_code == 404, method
            assert client.request("PATCH", "/health").status_code == 405
            body = client.get("/metrics").text
    methods = {
        dict(labels)["method"]
        for (name, labels) in samples(body)
        if name == "whaleid_request_duration_seconds_count"
    }
    assert methods == {"PATCH", "other"}, methods  # (/metrics counts itself once it answered)
    other = sum(
        value
        for (name, labels), value in samples(body).items()
        if name == "whaleid_request_duration_seconds_count" and ("method", "other") in labels
    )
    assert other == 2 * len(made_up)


@pytest.mark.slow
def test_metrics_can_be_opened_for_a_private_scraper(catalogue: Catalogue) -> None:
    for server in serve(catalogue, metrics_public=True):
        with server.client(None) as anonymous:
            assert anonymous.get("/metrics").status_code == 200


@pytest.mark.slow
def test_the_request_id_is_echoed_when_sane_and_made_otherwise(live: LiveServer) -> None:
    with live.client() as client:
        given = client.get("/health", headers={"X-Request-ID": "trace-42.a:b"})
        assert given.headers["x-request-id"] == "trace-42.a:b"
        made = client.get("/health")
        assert len(made.headers["x-request-id"]) == 32
        for bad in ("x" * 129, "no spaces", "<script>"):
            replaced = client.get("/health", headers={"X-Request-ID": bad})
            assert replaced.headers["x-request-id"] != bad
        # Refusals made before the route runs carry one too.
        refused = client.post("/identify", headers={"Authorization": "Bearer nope"}, content=b"x")
        assert refused.status_code == 401 and refused.headers["x-request-id"]


@pytest.mark.slow
def test_json_logs_carry_the_request_id_and_a_stuck_request_gets_504(
    catalogue: Catalogue,
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        for server in serve(catalogue, log_format="json", request_timeout_seconds=0.5):
            reply = _stalled_upload(server, "stuck-upload-1")
    finally:
        root.removeHandler(handler)
    head = reply.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.1 504"), reply[:300]
    assert "x-request-id: stuck-upload-1" in head
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    stuck = [e for e in lines if "ran past" in e["message"]]
    assert stuck and stuck[0]["request_id"] == "stuck-upload-1"
    assert stuck[0]["level"] == "WARNING" and stuck[0]["logger"].startswith("service.")


def _stalled_upload(server: LiveServer, request_id: str) -> bytes:
    """An upload that announces 1000 bytes and sends 10, then waits for the answer."""
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(
            (
                "POST /identify HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {server.keys['integration']}\r\n"
                f"X-Request-ID: {request_id}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n"
                "--b\r\nConte"
            ).encode()
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.slow
def test_the_rate_limit_is_per_key_with_retry_after(catalogue: Catalogue) -> None:
    for server in serve(catalogue, rate_limit="3/minute"):
        with server.client() as integration, server.client("curator") as curator:
            answers = [integration.get("/identifications/1").status_code for _ in range(4)]
            assert 429 not in answers[:3] and answers[3] == 429
            limited = integration.get("/identifications/1")
            assert limited.status_code == 429
            assert 1 <= int(limited.headers["retry-after"]) <= 60
            assert "rate limit" in limited.json()["detail"]
            assert curator.get("/identifications/1").status_code != 429
            assert integration.get("/health").status_code == 200  # probes are never limited


@pytest.mark.slow
def test_a_review_session_counts_against_its_key(catalogue: Catalogue) -> None:
    from tests.service.access.test_review_sessions import sign_in

    for server in serve(catalogue, rate_limit="4/minute"):
        with (
            httpx.Client(base_url=server.url, timeout=60) as first,
            httpx.Client(base_url=server.url, timeout=60) as again,
        ):
            assert sign_in(first, server.keys["curator"]).status_code == 303
            assert sign_in(again, server.keys["curator"]).status_code == 303
            with server.client("curator") as curator:
                assert curator.get("/identifications").status_code == 200
            # The key's allowance is shared by its bearer calls and all its sessions.
            answers = [c.get("/identifications").status_code for c in (first, again, first, again)]
            assert answers == [200, 200, 200, 429]


@pytest.mark.slow
def test_cors_is_off_by_default_and_allows_only_the_configured_origins(
    catalogue: Catalogue,
) -> None:
    preflight = {
        "Origin": "https://flukebook.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    for server in serve(catalogue):
        with server.client(None) as client:
            answer = client.options("/identify", headers=preflight)
            assert "access-control-allow-origin" not in answer.headers
    for server in serve(catalogue, cors_origins="https://flukebook.example"):
        with server.client(None) as client:
            answer = client.options("/identify", headers=preflight)
            assert answer.headers["access-control-allow-origin"] == "https://flukebook.example"
            other = client.options(
                "/identify", headers={**preflight, "Origin": "https://evil.example"}
            )
            assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_the_job_queue_collector_reports_depth_and_age_of_live_jobs(
    sessions: sessionmaker[Session],
) -> None:
    now = dt.datetime.now(dt.UTC)
    long_ago = now - dt.timedelta(days=400)
    with transaction(sessions) as session:
        for kind, state, created in [
            ("identify", "queued", long_ago),
            ("identify", "queued", now),
            ("reindex", "running", now),
            ("reindex", "succeeded", long_ago),
        ]:
            session.add(
                Job(
                    kind=kind, state=state, params={}, errors=[], created_by="t", created_at=created
                )
            )
    engine = sessions.kw["bind"]
    depth, age = list(JobQueueCollector(lambda: engine).collect())
    counts = {(s.labels["kind"], s.labels["state"]): s.value for s in depth.samples}
    assert counts == {("identify", "queued"): 2, ("reindex", "running"): 1}
    ages = {(s.labels["kind"], s.labels["state"]): s.value for s in age.samples}
    assert ages[("identify", "queued")] > 399 * 24 * 3600
    assert ages[("reindex", "running")] < 3600


def test_the_job_queue_collector_reports_nothing_without_a_jobs_table(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'bare.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE other (id INTEGER PRIMARY KEY)"))
    assert [m.samples for m in JobQueueCollector(lambda: engine).collect()] == [[], []]
    engine.dispose()


def test_json_formatter_writes_one_object_a_line() -> None:
    record = logging.LogRecord("whaleid", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "boom x" and entry["level"] == "ERROR" and "request_id" not in entry
