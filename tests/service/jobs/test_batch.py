"""Batch identification jobs end to end over loopback, through ``service.client``: a ZIP, stored
images and photo URLs; results as JSON and CSV; a signed callback to a real receiver that
verifies it and refuses replays; failed deliveries on the job; the SSRF and archive limits."""

from __future__ import annotations

import io
import json
import re
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import WhaleidClient, WhaleidError, verify_callback
from service.errors import FetchRefused, Invalid
from service.jobs.batch.submit import url_items
from service.outbound.callbacks import SIGNATURE_HEADER, BadSignature, CallbackTrust, deliver, sign
from service.outbound.fetch import check_url, fetch_photo
from service.settings import Settings
from tests.conftest import Catalogue, LiveServer, run_server
from tests.toy import encode, photo

SECRET = "test-callback-secret"
QUERY_SHOT = 5


@dataclass
class Receiver:
    """A platform on loopback: serves photos, and takes callbacks that it verifies."""

    url: str
    photos: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    fail_hooks: bool = False
    hosts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes = b"", location: str | None = None) -> None:
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            receiver.hosts.append(self.headers.get("Host", ""))
            if self.path == "/slow":  # a trickle: a byte every 0.3 s
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                try:
                    for _ in range(100):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.3)
                except OSError:  # the client gave up, as it should
                    pass
                return
            if self.path in receiver.redirects:
                self._reply(302, location=receiver.redirects[self.path])
            elif self.path in receiver.photos:
                self._reply(200, receiver.photos[self.path])
            else:
                self._reply(404)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if receiver.fail_hooks:
                self._reply(500)
                return
            headers = dict(self.headers.items())
            try:
                verify_callback(SECRET, headers, body, tolerance=60)
            except BadSignature as e:
                receiver.refused.append((401, str(e)))
                self._reply(401)
                return
            with receiver.lock:
                signature = headers[SIGNATURE_HEADER]
                if signature in receiver.seen:
                    receiver.refused.append((409, "replay"))
                    self._reply(409)
                    return
                receiver.seen.add(signature)
                receiver.accepted.append(json.loads(body))
            self._reply(204)

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Receiver("")))
    rec = Receiver(f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.RequestHandlerClass = _handler(rec)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield rec
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(catalogue: Catalogue) -> Iterator[LiveServer]:
    s = catalogue.settings
    s.job_poll_seconds = 0.05
    s.batch_chunk_size = 4
    s.fetch_hosts = ["127.0.0.1"]
    s.callback_attempts = 3
    s.callback_backoff_seconds = 0.05
    s.unsafe_allow_loopback_for_tests = True
    for live in run_server(s):
        trust_callbacks(live, "integration", SECRET)
        yield live


def trust_callbacks(
    server: LiveServer, role: str, secret: str, hosts: tuple[str, ...] = ("127.0.0.1",)
) -> None:
    """Let the key of ``role`` send callbacks to ``hosts``, signed with ``secret``."""
    from service.db.tables import ApiKey, make_engine, make_sessionmaker

    with server.client("admin") as admin:
        key_id = next(k["id"] for k in admin.get("/keys").json() if k["name"] == f"{role} tester")
        assert (
            admin.put(f"/keys/{key_id}/callback-hosts", json={"hosts": list(hosts)}).status_code
            == 200
        )
        assert admin.post(f"/keys/{key_id}/callback-secret").status_code == 200
    # The secret is random; the receivers of these tests know a fixed one.
    engine = make_engine(server.settings.sqlalchemy_url)
    with make_sessionmaker(engine).begin() as session:
        session.get_one(ApiKey, key_id).callback_secret = secret
    engine.dispose()


def client(server: LiveServer, role: str = "integration") -> WhaleidClient:
    return WhaleidClient(server.url, server.keys[role], timeout=30)


def archive(individuals: range) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in individuals:
            zf.writestr(f"dir/ind{i}.png", encode(photo(i, QUERY_SHOT)))
        zf.writestr("__MACOSX/._ind0.png", b"resource fork")
    return buffer.getvalue()


@pytest.mark.slow
def test_archive_job_results_and_signed_callback(server: LiveServer, receiver: Receiver) -> None:
    with client(server) as api:
        job = api.identify_archive(archive(range(10)), callback_url=f"{receiver.url}/hook")
        assert job["kind"] == "identify_batch" and job["total"] == 10
        done = api.wait_job(job["id"], timeout=60, poll=0.1)
        assert done["state"] == "succeeded" and done["done"] == 10 and done["failed"] == 0
        rows = api.job_results(job["id"])
        assert [r["image"] for r in rows] == [f"dir/ind{i}.png" for i in range(10)]
        top = [r["candidates"][0]["individual_id"] for r in rows]
        assert sum(t == f"ind-{i}" for i, t in enumerate(top)) >= 9
        csv_text = api.job_results_csv(job["id"])
    lines = csv_text.strip().split("\n")
    assert lines[0] == "image,predictions" and len(lines) == 11
    assert lines[1].split(",")[1].split()[0] == top[0] and len(lines[1].split(",")[1].split()) == 5
    assert done["result"]["callback"]["delivered"] is True
    assert len(receiver.accepted) == 1 and not receiver.refused
    body = receiver.accepted[0]
    assert body["job_id"] == job["id"] and body["state"] == "succeeded"
    assert [r["candidates"][0]["individual_id"] for r in body["results"]] == top
    # The archive's photos are gone once the job ended.
    assert not list((server.settings.data_dir / "batches").rglob("*.bin"))


def test_receiver_refuses_replays_and_forgeries(receiver: Receiver) -> None:
    body = json.dumps({"job_id": 1}).encode()
    signed = {SIGNATURE_HEADER: sign(SECRET, body), "Content-Type": "application/json"}
    assert (
        httpx.post(f"{receiver.url}/hook", content=body, headers=signed, timeout=60).status_code
        == 204
    )
    # The same delivery again: a replay.
    assert (
        httpx.post(f"{receiver.url}/hook", content=body, headers=signed, timeout=60).status_code
        == 409
    )
    old = {SIGNATURE_HEADER: sign(SECRET, body, int(time.time()) - 3600)}
    assert (
        httpx.post(f"{receiver.url}/hook", content=body, headers=old, timeout=60).status_code == 401
    )
    forged = {SIGNATURE_HEADER: sign("other-secret", body)}
    assert (
        httpx.post(f"{receiver.url}/hook", content=body, headers=forged, timeout=60).status_code
        == 401
    )
    altered = body.replace(b"1", b"2")
    assert (
        httpx.post(f"{receiver.url}/hook", content=altered, headers=signed, timeout=60).status_code
        == 401
    )
    assert [s for s, _ in receiver.refused] == [409, 401, 401, 401]


@pytest.mark.slow
def test_url_and_image_id_jobs(server: LiveServer, receiver: Receiver) -> None:
    for i in range(4):
        receiver.photos[f"/p/{i}.png"] = encode(photo(i, QUERY_SHOT))
    receiver.redirects["/moved"] = "/p/0.png"
    receiver.redirects["/escape"] = "http://169.254.169.254/latest/meta-data"
    urls = [f"{receiver.url}/p/{i}.png" for i in range(4)]
    urls += [f"{receiver.url}/moved", f"{receiver.url}/escape", f"{receiver.url}/missing"]
    with client(server) as api:
        job = api.wait_job(api.identify_batch(urls=urls)["id"], timeout=60, poll=0.1)
        assert job["state"] == "succeeded" and job["done"] == 5 and job["failed"] == 2
        rows = api.job_results(job["id"])
        assert [r["candidates"][0]["individual_id"] for r in rows[:5]] == [
            "ind-0",
            "ind-1",
            "ind-2",
            "ind-3",
            "ind-0",
        ]
        assert "not on the allowlist" in rows[5]["error"]
        assert "404" in rows[6]["error"]
        # Stored images: the query photos those identifications kept.
        image_ids = [api.identification(r["identification_id"])["query_image_id"] for r in rows[:2]]
        job = api.wait_job(api.identify_batch(image_ids=image_ids)["id"], timeout=60, poll=0.1)
        assert job["done"] == 2
        rows = api.job_results(job["id"])
        assert [r["candidates"][0]["individual_id"] for r in rows] == ["ind-0", "ind-1"]
        # Refused at once: a host off the allowlist, unknown images, both lists, a callback off
        # its allowlist.
        for bad in (
            {"urls": ["http://example.org/a.jpg"]},
            {"image_ids": [10**12]},
            {"urls": urls[:1], "image_ids": [1]},
            {"urls": urls[:1], "callback_url": "http://example.org/hook"},
        ):
            r = httpx.post(
                f"{server.url}/jobs/identify",
                json=bad,
                headers={"Authorization": f"Bearer {server.keys['integration']}"},
                timeout=60,
            )
            assert r.status_code == 422, (bad, r.text)


def test_the_verifier_returns_the_signed_timestamp() -> None:
    """What a receiver keeps to refuse replays within the tolerance."""
    body = b'{"job_id":3}'
    t = int(time.time())
    assert verify_callback(SECRET, {SIGNATURE_HEADER: sign(SECRET, body, t)}, body) == t


def test_callback_attempts_back_off_exponentially(receiver: Receiver) -> None:
    receiver.fail_hooks = True
    settings = Settings(
        callback_attempts=4,
        callback_backoff_seconds=0.5,
        unsafe_allow_loopback_for_tests=True,
        _env_file=None,  # type: ignore[call-arg]
    )
    waits: list[float] = []
    trust = CallbackTrust(SECRET, ["127.0.0.1"])
    done = deliver(settings, trust, f"{receiver.url}/hook", {"job_id": 1}, "1", sleep=waits.append)
    assert [a["status"] for a in done["attempts"]] == [500] * 4 and done["delivered"] is False
    assert waits == [0.5, 1.0, 2.0]


@pytest.mark.slow
def test_failed_delivery_stays_on_the_job(server: LiveServer, receiver: Receiver) -> None:
    receiver.fail_hooks = True
    with client(server) as api:
        job = api.identify_archive(archive(range(2)), callback_url=f"{receiver.url}/hook")
        done = api.wait_job(job["id"], timeout=60, poll=0.1)
    callback = done["result"]["callback"]
    assert done["state"] == "succeeded" and callback["delivered"] is False
    assert [a["status"] for a in callback["attempts"]] == [500, 500, 500]


@pytest.mark.slow
def test_archive_limits(server: LiveServer) -> None:
    server.settings.batch_max_items = 5
    server.settings.max_upload_bytes = 100_000
    with client(server) as api:
        with pytest.raises(WhaleidError) as too_many:
            api.identify_archive(archive(range(6)))
        assert too_many.value.status == 422 and "over the limit of 5" in str(too_many.value)
        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("zeros.png", b"\0" * 50_000_000)  # 50 MB of zeros in about 50 kB
        with pytest.raises(WhaleidError) as inflated:
            api.identify_archive(bomb.getvalue())
        assert inflated.value.status == 422 and "over the limit" in str(inflated.value)
        with pytest.raises(WhaleidError) as broken:
            api.identify_archive(b"PK not a zip")
        assert broken.value.status == 422


@pytest.mark.slow
def test_lying_archive_header_is_not_trusted(server: LiveServer) -> None:
    """An entry whose header claims a small size but inflates to more stops at the limit."""
    server.settings.max_upload_bytes = 100_000
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.png", b"\0" * 5_000_000)
    data = bytearray(buffer.getvalue())
    # Patch the declared size in the central directory (offset 24 of its entry) to 1000.
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (1000).to_bytes(4, "little")
    with client(server) as api, pytest.raises(WhaleidError) as lied:
        api.identify_archive(bytes(data))
    assert lied.value.status == 422


@pytest.mark.parametrize(
    ("url", "allow_loopback", "reason"),
    [
        ("http://example.org/a.jpg", True, "not on the allowlist"),
        ("ftp://127.0.0.1/a.jpg", True, "only http and https"),
        ("http://127.0.0.1/a.jpg", False, "non-public address"),
        ("http://localhost/a.jpg", False, "non-public address"),
        ("http://169.254.169.254/latest", True, "non-public address"),
        ("http://10.0.0.1/a.jpg", True, "non-public address"),
        ("http://[::1]/a.jpg", False, "non-public address"),
        ("http://[::ffff:10.0.0.1]/a.jpg", True, "non-public address"),
        ("http://0.0.0.0/a.jpg", True, "non-public address"),
        ("http://user:pw@127.0.0.1/a.jpg", True, "credentials"),
    ],
)
def test_ssrf_rules(url: str, allow_loopback: bool, reason: str) -> None:
    hosts = ["127.0.0.1", "localhost", "169.254.169.254", "10.0.0.1", "::1", "0.0.0.0"]
    hosts += ["::ffff:10.0.0.1"]
    with pytest.raises(FetchRefused, match=reason):
        check_url(url, hosts, allow_loopback=allow_loopback)


def test_fetch_limits(receiver: Receiver) -> None:
    receiver.photos["/big"] = b"x" * 10_000
    with pytest.raises(FetchRefused, match="over 1000 bytes"):
        fetch_photo(
            f"{receiver.url}/big", ["127.0.0.1"], allow_loopback=True, timeout=5, max_bytes=1000
        )
    receiver.redirects["/hop"] = "http://localhost/x"  # a name off the allowlist
    with pytest.raises(FetchRefused, match="not on the allowlist"):
        fetch_photo(
            f"{receiver.url}/hop", ["127.0.0.1"], allow_loopback=True, timeout=5, max_bytes=1000
        )
    assert (
        fetch_photo(
            f"{receiver.url}/big", ["127.0.0.1"], allow_loopback=True, timeout=5, max_bytes=10_000
        )
        == b"x" * 10_000
    )


@pytest.mark.slow
def test_a_list_of_photos_is_bounded_whatever_the_batch_limit(server: LiveServer) -> None:
    """10 000 image ids or URLs at most per request, even where an operator allows larger
    batches: the list is refused before any of it is looked up or counted."""
    server.settings.batch_max_items = 20_000
    with server.client() as http:
        r = http.post("/jobs/identify", json={"image_ids": [1] * 10_001})
    assert r.status_code == 422 and "at most 10000 items" in r.text, r.text


@pytest.mark.parametrize("host", ["elsewhere.example", "elsewhere.example:port"])
def test_a_refused_url_is_quoted_short_and_without_its_query(host: str) -> None:
    """Off the allowlist, or not a URL at all: the error quotes its first 200 characters."""
    url = f"http://{host}/" + "a" * 1000 + "?token=secret"
    with pytest.raises(Invalid) as refused:
        url_items(Settings(_env_file=None), [url])  # type: ignore[call-arg]
    message = str(refused.value)
    assert f"'{url[:200]}'" in message and "secret" not in message


@pytest.mark.slow
def test_bad_form_fields_are_422_not_500(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {server.keys['integration']}"}
    for fields in ({"callback_url": "http://x\x00y"}, {"species": "a\x00b"}, {"date_from": "inf"}):
        r = httpx.post(
            f"{server.url}/jobs/identify/archive",
            data=fields,
            files={"archive": ("a.zip", archive(range(1)))},
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 422, (fields, r.text)
    # No key: refused before the archive is read.
    r = httpx.post(
        f"{server.url}/jobs/identify/archive", files={"archive": ("a.zip", b"PK")}, timeout=60
    )
    assert r.status_code == 401


@pytest.mark.slow
def test_urls_with_control_characters_are_422(server: LiveServer, receiver: Receiver) -> None:
    """A line feed in a callback URL would forge a log line (urlsplit drops it silently)."""
    headers = {"Authorization": f"Bearer {server.keys['integration']}"}
    forged = f"{receiver.url}/hook\n2030-01-01 INFO forged: all is well"
    photo_url = f"{receiver.url}/p/0.png"
    for body in (
        {"urls": [photo_url], "callback_url": forged},
        {"urls": [photo_url + "\r\nX-Injected: 1"]},
        {"urls": [photo_url], "callback_url": f"{receiver.url}/hook\x85"},
    ):
        r = httpx.post(f"{server.url}/jobs/identify", json=body, headers=headers, timeout=60)
        assert r.status_code == 422, (body, r.text)
        assert "control character" in r.text, r.text
    r = httpx.post(
        f"{server.url}/jobs/identify/archive",
        data={"callback_url": forged},
        files={"archive": ("a.zip", archive(range(1)))},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 422 and "control character (U+000A)" in r.text, r.text


def test_the_documented_verifier_accepts_once_and_refuses_the_rest() -> None:
    """The sample verifier in docs/integration.md, run as a receiver would paste it."""
    doc = (Path(__file__).parents[3] / "docs" / "integration.md").read_text()
    block = re.search(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert block is not None
    namespace: dict[str, Any] = {}
    exec(block.group(1), namespace)
    verify = namespace["verify"]
    body = b'{"job_id":7}'
    header = sign(SECRET, body)
    assert verify(SECRET, header, body) is True
    assert verify(SECRET, header, body) is False  # the same signature again: a replay
    assert verify(SECRET, sign(SECRET, body, int(time.time()) - 3600), body) is False
    assert verify("other", sign(SECRET, body), body) is False
    assert verify(SECRET, sign(SECRET, body), body + b" ") is False


@pytest.mark.slow
def test_a_fetch_connects_to_the_checked_address_within_its_time(receiver: Receiver) -> None:
    receiver.photos["/p"] = b"photo"
    port = receiver.url.rsplit(":", 1)[1]
    got = fetch_photo(
        f"http://localhost:{port}/p", ["localhost"], allow_loopback=True, timeout=5, max_bytes=100
    )
    assert got == b"photo" and receiver.hosts[-1] == f"localhost:{port}"
    start = time.monotonic()
    with pytest.raises((FetchRefused, httpx.TimeoutException)):
        fetch_photo(
            f"{receiver.url}/slow", ["127.0.0.1"], allow_loopback=True, timeout=1, max_bytes=1000
        )
    # The deadline is 1 s; the trickle would hold an unbounded fetch 30 s. The margin is wide
    # enough that a loaded machine cannot fail the test.
    assert time.monotonic() - start < 10
