"""Before a body is read: the key is checked, and the body is limited while it streams (chunked
included). Spoken over raw sockets to a real uvicorn, so nothing is buffered for us."""

from __future__ import annotations

import logging
import secrets
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from service.settings import Settings
from tests.conftest import LiveServer, load_catalogue, run_server

UPLOAD_LIMIT = 200_000
BODY_LIMIT = 100_000


@pytest.fixture
def guarded(sqlite_settings: Settings, tmp_path: Path, toy_model: Path) -> Iterator[LiveServer]:
    settings = sqlite_settings.model_copy(
        update={"max_upload_bytes": UPLOAD_LIMIT, "max_body_bytes": BODY_LIMIT}
    )
    load_catalogue(settings, tmp_path / "catalogue", toy_model, individuals=4, shots=(0,))
    yield from run_server(settings)


def connect(live: LiveServer) -> socket.socket:
    address = urlsplit(live.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=10)
    return sock


def send_head(sock: socket.socket, method: str, path: str, headers: dict[str, str]) -> None:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: whaleid",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())


PHOTO_PART = (
    b'--xyz\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n"
)


def send_chunks(sock: socket.socket, total: int, chunk: int = 16 * 1024, start: bytes = b"") -> int:
    """Send ``total`` bytes (``start``, then filler) as chunks without the final empty chunk: a
    body still streaming. Returns what was sent before the server stopped taking it."""
    sent = 0
    try:
        while sent < total:
            size = min(chunk, total - sent)
            data = (start + b"x" * size)[:size] if sent == 0 else b"x" * size
            sock.sendall(f"{size:x}\r\n".encode() + data + b"\r\n")
            sent += size
    except OSError:  # the server answered and closed: it stopped reading
        pass
    return sent


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of the response (a timeout fails the test: no answer
    came). The body is read up to its Content-Length: it may arrive in a later segment."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    while len(rest) < length:
        part = sock.recv(65536)
        if not part:
            break
        rest += part
    return int(status_line.split()[1]), headers, rest


CHUNKED = {"Transfer-Encoding": "chunked"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/keys", "application/json"),
        ("/identify", "multipart/form-data; boundary=xyz"),
        ("/identifications/1/decision", "application/json"),
        ("/individuals", "application/json"),
    ],
)
def test_a_chunked_body_without_a_key_is_refused_before_it_is_read(
    guarded: LiveServer, path: str, content_type: str
) -> None:
    with connect(guarded) as sock:
        send_head(sock, "POST", path, {**CHUNKED, "Content-Type": content_type})
        send_chunks(sock, 32 * 1024)
        # The body never ends: only a server that answers before reading it can answer.
        status, headers, rest = read_head(sock)
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert headers["connection"] == "close"
    assert b"Authorization: Bearer" in rest


def test_a_key_without_the_role_is_refused_before_the_body_is_read(guarded: LiveServer) -> None:
    key = guarded.keys["integration"]
    with connect(guarded) as sock:
        send_head(
            sock,
            "POST",
            "/keys",
            {**CHUNKED, "Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        send_chunks(sock, 32 * 1024)
        status, _, rest = read_head(sock)
    assert status == 403 and b"admin role" in rest


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "content_type", "role", "limit"),
    [
        ("/identify", "multipart/form-data; boundary=xyz", "integration", UPLOAD_LIMIT + 65536),
        ("/keys", "application/json", "admin", BODY_LIMIT),
    ],
)
def test_a_chunked_body_over_the_limit_is_cut_off_at_the_limit(
    guarded: LiveServer, path: str, content_type: str, role: str, limit: int
) -> None:
    key = guarded.keys[role]
    with connect(guarded) as sock:
        send_head(
            sock,
            "POST",
            path,
            {**CHUNKED, "Content-Type": content_type, "Authorization": f"Bearer {key}"},
        )
        sent = send_chunks(sock, limit + 1, start=PHOTO_PART)
        # Still no final chunk: the 413 must come from counting, not from the end of the body.
        status, headers, rest = read_head(sock)
    assert sent == limit + 1
    assert status == 413, rest
    assert headers["connection"] == "close"
    assert f"limit of {limit} bytes".encode() in rest
    with guarded.client() as client:
        assert client.get("/health").status_code == 200


def test_a_declared_length_over_the_limit_is_refused_unread(guarded: LiveServer) -> None:
    key = guarded.keys["integration"]
    with connect(guarded) as sock:
        send_head(
            sock,
            "POST",
            "/identify",
            {
                "Content-Length": str(10**12),
                "Content-Type": "multipart/form-data; boundary=xyz",
                "Authorization": f"Bearer {key}",
            },
        )
        status, _, rest = read_head(sock)
    assert status == 413 and b"over the limit" in rest
    # Without a key the answer is 401, whatever the length.
    with connect(guarded) as sock:
        send_head(sock, "POST", "/identify", {"Content-Length": str(10**12)})
        assert read_head(sock)[0] == 401


def test_a_body_within_the_limit_still_works_chunked(guarded: LiveServer) -> None:
    key = guarded.keys["admin"]
    body = b'{"name": "chunked", "role": "curator"}'
    with connect(guarded) as sock:
        send_head(
            sock,
            "POST",
            "/keys",
            {**CHUNKED, "Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        sock.sendall(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        status, _, rest = read_head(sock)
    assert status == 201, rest


def test_a_500_closes_the_keep_alive_connection_cleanly(guarded: LiveServer) -> None:
    # Break the database under the running server: the only way left to get a 500.
    database = guarded.settings.data_dir / "whaleid.sqlite3"
    with sqlite3.connect(database) as db:
        db.execute("ALTER TABLE individuals RENAME TO individuals_away")
    try:
        key = guarded.keys["integration"]
        with connect(guarded) as sock:
            request = (
                f"GET /individuals HTTP/1.1\r\nHost: whaleid\r\nAuthorization: Bearer {key}\r\n\r\n"
            )
            sock.sendall(request.encode())
            status, headers, _ = read_head(sock)
            assert status == 500
            # The server closes after a 500; the response must say so, so a keep-alive client
            # does not send its next request into the closing socket.
            assert headers.get("connection") == "close"
    finally:
        with sqlite3.connect(database) as db:
            db.execute("ALTER TABLE individuals_away RENAME TO individuals")
    with guarded.client() as client:
        assert client.get("/individuals").status_code == 200


def test_keys_in_a_query_string_are_refused_and_never_logged(guarded: LiveServer) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    access = logging.getLogger("uvicorn.access")
    handler = Keep()
    old_level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(handler)
    try:
        key = guarded.keys["admin"]
        with guarded.client(None) as anonymous:
            for query in (f"api_key={key}", f"key={key}", f"access_token={key}", key):
                response = anonymous.get(f"/identifications?{query}")
                assert response.status_code == 401, query
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    logged = [handler.format(r) for r in records]
    assert len(logged) == 4
    assert all(key not in line and "REDACTED" in line for line in logged), logged


def test_key_shaped_path_segments_are_never_logged(guarded: LiveServer) -> None:
    """A client that puts a key in a path (a job id field filled with the key, say): the
    access log shows the path with the key replaced."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    access = logging.getLogger("uvicorn.access")
    handler = Keep()
    old_level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(handler)
    random_key = "wid_" + secrets.token_urlsafe(32)
    real_key = guarded.keys["integration"]
    paths = [
        f"/jobs/{random_key}",
        f"/jobs/{real_key}/results",
        f"/individuals/{real_key.replace('_', '%5F', 1)}",  # percent-encoded
        f"/jobs/1?note=see-{random_key}",
        f"/jobs/1?{random_key}",
    ]
    try:
        with guarded.client() as client:
            for path in paths:
                assert client.get(path).status_code in (404, 422), path
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    logged = [handler.format(r) for r in records]
    assert len(logged) == len(paths)
    secrets_seen = (random_key, real_key, random_key[4:], real_key[4:])
    assert not [line for line in logged if any(s in line for s in secrets_seen)], logged
    assert all("REDACTED" in line for line in logged), logged
    assert any("/jobs/REDACTED/results" in line for line in logged), logged


def test_a_get_with_a_body_is_answered_at_once(guarded: LiveServer) -> None:
    # A file response listens on receive while its route holds a database session: the guard
    # must not open another one there (SQLite would wait on itself).
    key = guarded.keys["integration"]
    with connect(guarded) as sock:
        sock.settimeout(5)
        send_head(
            sock, "GET", "/images/1/file", {"Content-Length": "5", "Authorization": f"Bearer {key}"}
        )
        sock.sendall(b"hello")
        status, headers, _ = read_head(sock)
    assert status == 200 and headers["content-type"] == "image/png"
