"""Several partners on one service, each with its own integration key, against real uvicorn: a
job is its key's, one partner's jobs cannot delete or starve another's, quotas and rates hold
per key, and callbacks are signed and sent per key."""

from __future__ import annotations

import datetime as dt
import io
import os
import struct
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.access.auth import create_key
from service.client import WhaleidClient, WhaleidError
from service.db.tables import Job, make_engine, make_sessionmaker
from service.jobs.batch.chunks import batch_handlers
from service.jobs.batch.closing import JobCloser, prune_batch_files
from service.jobs.queue import Worker, create_job, lease_next, release
from service.outbound.callbacks import BadSignature, sign, verify
from service.settings import Settings
from tests.conftest import Catalogue, LiveServer, run_server
from tests.service.jobs import test_batch
from tests.service.jobs.test_batch import SECRET, Receiver, archive, trust_callbacks
from tests.toy import encode, photo

QUERY_SHOT = 5
receiver = test_batch.receiver  # the platform on loopback, a fixture


@dataclass
class Partners:
    """A server with two integration keys: partner A ("integration tester") and partner B."""

    server: LiveServer
    a: str
    b: str

    def client(self, key: str) -> WhaleidClient:
        return WhaleidClient(self.server.url, key, timeout=30)

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url, timeout=30, headers={"Authorization": f"Bearer {key}"}
        )


def _settings(catalogue: Catalogue, worker: bool) -> Settings:
    s = catalogue.settings
    s.worker = worker
    s.job_poll_seconds = 0.05
    s.batch_chunk_size = 4
    s.fetch_hosts = ["127.0.0.1"]
    s.callback_attempts = 2
    s.callback_backoff_seconds = 0.05
    s.unsafe_allow_loopback_for_tests = True
    return s


def _partners(s: Settings) -> Iterator[Partners]:
    for server in run_server(s):
        with server.client("admin") as admin:
            b = admin.post("/keys", json={"name": "partner B", "role": "integration"}).json()
        yield Partners(server, server.keys["integration"], b["key"])


@pytest.fixture
def partners(catalogue: Catalogue) -> Iterator[Partners]:
    yield from _partners(_settings(catalogue, worker=True))


@pytest.fixture
def idle_partners(catalogue: Catalogue) -> Iterator[Partners]:
    """Partners on a server whose jobs wait until the test runs the worker."""
    yield from _partners(_settings(catalogue, worker=False))


def run_worker(settings: Settings) -> None:
    """Work every chunk there is, then close ended jobs, as the in-process worker does."""
    engine = make_engine(settings.sqlalchemy_url)
    factory = make_sessionmaker(engine)
    Worker(factory, batch_handlers(settings, factory), poll_seconds=0.01, idle=[]).run(
        threading.Event(), exit_when_idle=True
    )
    JobCloser(settings, factory)()
    engine.dispose()


def kept_files(settings: Settings) -> list[Path]:
    return sorted(p for p in (settings.data_dir / "batches").rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_job_is_its_keys_and_only_admins_see_all(partners: Partners) -> None:
    with partners.client(partners.a) as a:
        job = a.wait_job(a.identify_archive(archive(range(2)))["id"], timeout=60, poll=0.05)
    assert job["state"] == "succeeded"
    job_id = job["id"]
    paths = [f"/jobs/{job_id}", f"/jobs/{job_id}/results", f"/jobs/{job_id}/results.csv"]
    with partners.http(partners.b) as b:
        for path in paths:
            r = b.get(path)
            assert r.status_code == 404, (path, r.text)
            assert r.json()["detail"] == f"job {job_id} does not exist"  # as if there were none
        assert b.post(f"/jobs/{job_id}/cancel").status_code == 404
        assert all(j["id"] != job_id for j in b.get("/jobs").json())
    with partners.http(partners.a) as a_http:
        assert [j["id"] for j in a_http.get("/jobs").json()] == [job_id]
        for path in paths:
            assert a_http.get(path).status_code == 200
    with partners.server.client("admin") as admin:
        for path in paths:
            assert admin.get(path).status_code == 200
    # A re-index is an admin's: no integration key sees it.
    engine = make_engine(partners.server.settings.sqlalchemy_url)
    with make_sessionmaker(engine).begin() as session:
        reindex = create_job(
            session, kind="reindex", model_id=None, params={}, chunks=[], created_by="admin"
        ).id
    engine.dispose()
    with partners.http(partners.a) as a_http:
        assert a_http.get(f"/jobs/{reindex}").status_code == 404
    with partners.server.client("admin") as admin:
        assert admin.get(f"/jobs/{reindex}").status_code == 200
        # It has no photos to answer for.
        for path in (f"/jobs/{reindex}/results", f"/jobs/{reindex}/results.csv"):
            r = admin.get(path)
            assert r.status_code == 404 and "is not a batch identification" in r.text, r.text


@pytest.mark.slow
def test_results_are_paged_and_the_poll_stays_small(partners: Partners) -> None:
    with partners.client(partners.a) as a:
        job = a.wait_job(a.identify_archive(archive(range(7)))["id"], timeout=60, poll=0.05)
        assert "items" not in (job["result"] or {})
        assert len(a.job_results(job["id"], page=3)) == 7  # the client reads every page
    with partners.http(partners.a) as http:
        r = http.get(f"/jobs/{job['id']}/results", params={"offset": 2, "limit": 3})
        assert [row["index"] for row in r.json()] == [2, 3, 4]
        assert r.headers["X-Total-Count"] == "7"
        assert r.headers["Link"] == f'</jobs/{job["id"]}/results?offset=5&limit=3>; rel="next"'
        last = http.get(f"/jobs/{job['id']}/results", params={"offset": 5, "limit": 3})
        assert [row["index"] for row in last.json()] == [5, 6] and "Link" not in last.headers
        for bad in ({"limit": 0}, {"limit": 10_001}, {"offset": -1}):
            assert http.get(f"/jobs/{job['id']}/results", params=bad).status_code == 422


@pytest.mark.slow
def test_signed_urls_and_server_paths_never_reach_a_partner(
    partners: Partners, receiver: Receiver
) -> None:
    query = "?X-Amz-Signature=secret-token&X-Amz-Expires=60"
    receiver.photos["/p/0.png" + query] = encode(photo(0, QUERY_SHOT))
    signed = f"{receiver.url}/p/0.png{query}"
    missing = f"{receiver.url}/gone.png?token=secret-token"
    with partners.client(partners.a) as a:
        job = a.wait_job(a.identify_batch(urls=[signed, missing])["id"], timeout=60, poll=0.05)
        rows = a.job_results(job["id"])
        csv_text = a.job_results_csv(job["id"])
    everything = repr(job) + repr(rows) + csv_text
    assert rows[0]["image"] == f"{receiver.url}/p/0.png"
    assert rows[0]["candidates"][0]["individual_id"] == "ind-0"
    assert "404" in rows[1]["error"]
    assert "secret-token" not in everything
    # Once closed, the job keeps no signed query string either.
    engine = make_engine(partners.server.settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        assert "secret-token" not in repr(session.get_one(Job, job["id"]).params)
    engine.dispose()


@pytest.mark.slow
def test_a_photo_gone_from_the_store_is_an_error_without_a_server_path(
    idle_partners: Partners,
) -> None:
    settings = idle_partners.server.settings
    with idle_partners.client(idle_partners.a) as a:
        job_id = a.identify_archive(archive(range(2)))["id"]
        kept_files(settings)[0].unlink()
        run_worker(settings)
        job = a.job(job_id)
        rows = a.job_results(job_id)
    failed = [r for r in rows if "error" in r]
    assert [r["error"] for r in failed] == ["the photo is no longer stored"]
    assert job["failed"] == 1
    assert job["errors"] == [f"{failed[0]['image']}: the photo is no longer stored"]
    assert str(settings.data_dir) not in repr(job) + repr(rows)


def _archive_with(photos: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in photos.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.slow
def test_a_refused_archive_never_removes_another_jobs_photo(idle_partners: Partners) -> None:
    """B's job is queued; A sends the same photo plus an oversized entry and gets a 422. B's
    photo stays, and B's job succeeds."""
    settings = idle_partners.server.settings
    shared = encode(photo(3, QUERY_SHOT))
    with idle_partners.client(idle_partners.b) as b:
        b_job = b.identify_archive(_archive_with({"b.png": shared}))["id"]
    before = kept_files(settings)
    settings.max_upload_bytes = 200_000
    oversized = _archive_with({"a.png": shared, "huge.png": b"\0" * 300_000})
    with idle_partners.client(idle_partners.a) as a, pytest.raises(WhaleidError) as refused:
        a.identify_archive(oversized)
    assert refused.value.status == 422 and "over the limit" in str(refused.value)
    assert kept_files(settings) == before  # nothing of A's stays, nothing of B's went
    run_worker(settings)
    with idle_partners.client(idle_partners.b) as b:
        job = b.job(b_job)
        assert job["state"] == "succeeded" and job["done"] == 1 and job["failed"] == 0
        assert b.job_results(b_job)[0]["candidates"][0]["individual_id"] == "ind-3"


@pytest.mark.slow
def test_two_jobs_sharing_a_photo_each_keep_their_own(idle_partners: Partners) -> None:
    settings = idle_partners.server.settings
    shared = encode(photo(4, QUERY_SHOT))
    with idle_partners.client(idle_partners.a) as a, idle_partners.client(idle_partners.b) as b:
        first = a.identify_archive(_archive_with({"x.png": shared}))["id"]
        second = b.identify_archive(_archive_with({"y.png": shared}))["id"]
        assert len(kept_files(settings)) == 2  # one copy each
        engine = make_engine(settings.sqlalchemy_url)
        factory = make_sessionmaker(engine)
        handlers = batch_handlers(settings, factory)
        # The first job runs to its end (its files removed) before the second starts.
        first_done = False
        while (lease := lease_next(factory, "w", 30, list(handlers))) is not None:
            if lease.job_id == second and not first_done:
                release(factory, lease)
                continue
            handlers[lease.kind](lease, lambda: True)
            if lease.job_id == first and lease.phase == 1:
                first_done = True
                assert a.job(first)["state"] == "succeeded"
                assert len(kept_files(settings)) == 1  # the second job's copy
        engine.dispose()
        job = b.job(second)
        assert job["state"] == "succeeded" and job["done"] == 1, job
        assert b.job_results(second)[0]["candidates"][0]["individual_id"] == "ind-4"
    assert kept_files(settings) == []


@pytest.mark.slow
def test_entries_that_are_not_photos_are_answered_but_never_kept(idle_partners: Partners) -> None:
    settings = idle_partners.server.settings
    payload = _archive_with(
        {
            "zeros.png": b"\0" * 1_000_000,  # 1 MB that deflates to 1 kB: not a photo
            "notes.txt": b"field notes",
            "ok.png": encode(photo(2, QUERY_SHOT)),
        }
    )
    with idle_partners.client(idle_partners.a) as a:
        job_id = a.identify_archive(payload)["id"]
        stored = kept_files(settings)
        assert len(stored) == 1 and stored[0].stat().st_size < 100_000
        run_worker(settings)
        rows = a.job_results(job_id)
        with pytest.raises(WhaleidError) as none:
            a.identify_archive(_archive_with({"notes.txt": b"no photo here"}))
    assert none.value.status == 422 and "holds no photos we can read" in str(none.value)
    assert "not an image" in rows[0]["error"] and "not an image" in rows[1]["error"]
    assert rows[2]["candidates"][0]["individual_id"] == "ind-2"


@pytest.mark.slow
def test_an_encrypted_entry_is_refused_not_a_500(idle_partners: Partners) -> None:
    data = bytearray(_archive_with({"secret.png": encode(photo(1, QUERY_SHOT))}))
    # Set the "encrypted" bit in the local header (offset 6) and the central directory (8).
    data[6] |= 1
    central = data.rfind(b"PK\x01\x02")
    data[central + 8] |= 1
    with idle_partners.client(idle_partners.a) as a, pytest.raises(WhaleidError) as refused:
        a.identify_archive(bytes(data))
    assert refused.value.status == 422 and "encrypted" in str(refused.value)


@pytest.mark.slow
def test_a_directory_bomb_is_refused_by_what_it_declares(idle_partners: Partners) -> None:
    settings = idle_partners.server.settings
    settings.batch_max_items = 5
    one = bytearray(_archive_with({"a.png": encode(photo(1, QUERY_SHOT))}))
    end = one.rfind(b"PK\x05\x06")
    one[end + 8 : end + 12] = (60_000).to_bytes(2, "little") * 2  # entries: on disk, in all
    # Many entries, a few bytes each: a directory far larger than 5 photos need.
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(3000):
            zf.writestr(f"{i}.png", b"")
    lying = bytearray(many.getvalue())
    end = lying.rfind(b"PK\x05\x06")
    lying[end + 8 : end + 12] = (1).to_bytes(2, "little") * 2  # "one entry"
    with idle_partners.http(idle_partners.a) as http:
        declared = http.post("/jobs/identify/archive", files={"archive": ("a.zip", bytes(one))})
        huge = http.post("/jobs/identify/archive", files={"archive": ("b.zip", many.getvalue())})
        lies = http.post("/jobs/identify/archive", files={"archive": ("c.zip", bytes(lying))})
    assert declared.status_code == 422 and "declares 60000 entries" in declared.text
    assert huge.status_code == 422 and "declares 3000 entries" in huge.text
    assert lies.status_code == 422 and "central directory is" in lies.text
    assert kept_files(settings) == []


def _as_zip64(data: bytes, entries: int | None = None) -> bytes:
    """``data`` (a ZIP) as a ZIP64 writer ends it: a ZIP64 end of central directory record and
    its locator, then the classic record saying "see ZIP64" (0xFFFF entries). ``entries``: what
    the ZIP64 record declares (by default, the truth)."""
    end = data.rfind(b"PK\x05\x06")
    count, size, offset = struct.unpack("<HLL", data[end + 10 : end + 20])
    declared = count if entries is None else entries
    zip64 = struct.pack(
        "<4sQHHLLQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, declared, declared, size, offset
    )
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1)
    classic = struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, size, offset, 0)
    return data[:end] + zip64 + locator + classic


@pytest.mark.slow
def test_a_zip64_archive_is_judged_by_its_zip64_record(idle_partners: Partners) -> None:
    """Some tools always write ZIP64: the classic record's 0xFFFF entries means "read the ZIP64
    record", which is what counts, both ways."""
    plain = _archive_with({f"{i}.png": encode(photo(i, QUERY_SHOT)) for i in range(2)})
    with idle_partners.http(idle_partners.a) as http:
        good = http.post("/jobs/identify/archive", files={"archive": ("a.zip", _as_zip64(plain))})
        bomb = _as_zip64(plain, entries=60_000)
        bad = http.post("/jobs/identify/archive", files={"archive": ("b.zip", bomb)})
    assert good.status_code == 202 and good.json()["total"] == 2, good.text
    assert bad.status_code == 422 and "declares 60000 entries" in bad.text, bad.text


@pytest.mark.slow
def test_a_photo_or_a_quota_exactly_at_its_limit_is_accepted(idle_partners: Partners) -> None:
    settings = idle_partners.server.settings
    photos = {f"{i}.png": encode(photo(i, QUERY_SHOT)) for i in range(2)}
    settings.max_upload_bytes = max(len(d) for d in photos.values())
    settings.batch_max_items = 2
    settings.key_max_live_jobs = 1
    settings.key_max_waiting_photos = 2
    settings.key_max_held_bytes = sum(len(d) for d in photos.values())
    with idle_partners.http(idle_partners.a) as http:
        r = http.post("/jobs/identify/archive", files={"archive": ("a.zip", _archive_with(photos))})
        assert r.status_code == 202, r.text
        r = http.post("/jobs/identify/archive", files={"archive": ("a.zip", _archive_with(photos))})
        assert r.status_code == 429, r.text  # now the key is at its limits


@pytest.mark.slow
def test_quotas_hold_per_key(idle_partners: Partners) -> None:
    settings = idle_partners.server.settings
    settings.key_max_live_jobs = 2
    with idle_partners.client(idle_partners.a) as a, idle_partners.client(idle_partners.b) as b:
        first = a.identify_archive(archive(range(2)))["id"]
        a.identify_archive(archive(range(2)))
        with pytest.raises(WhaleidError) as jobs:
            a.identify_archive(archive(range(2)))
        assert jobs.value.status == 429 and "has 2 jobs queued or running" in str(jobs.value)
        b.identify_archive(archive(range(2)))  # B is not held to A's count
        a.cancel_job(first)
        a.identify_archive(archive(range(2)))  # a slot is free again
        settings.key_max_live_jobs = 10
        settings.key_max_waiting_photos = 5  # A has 4 waiting in its 2 live jobs
        with pytest.raises(WhaleidError) as photos:
            a.identify_archive(archive(range(2)))
        assert photos.value.status == 429 and "photos waiting" in str(photos.value)
        settings.key_max_waiting_photos = 1000
        before = kept_files(settings)
        settings.key_max_held_bytes = 1000
        with pytest.raises(WhaleidError) as held:
            b.identify_archive(archive(range(3)))
        assert held.value.status == 429 and "bytes of archive photos" in str(held.value)
    assert kept_files(settings) == before  # the refused archive left nothing


@pytest.mark.slow
def test_a_jobs_files_go_when_it_ends_in_any_state_and_prune_sweeps_orphans(
    idle_partners: Partners,
) -> None:
    settings = idle_partners.server.settings
    with idle_partners.client(idle_partners.a) as a:
        job_id = a.identify_archive(archive(range(3)))["id"]
        assert len(kept_files(settings)) == 3
        a.cancel_job(job_id)
    run_worker(settings)  # closes the cancelled job
    assert kept_files(settings) == []
    with idle_partners.client(idle_partners.b) as b:
        b.identify_archive(archive(range(2)))  # a live job: its files stay
    live = kept_files(settings)
    orphans = settings.data_dir / "batches" / "deadbeef"
    orphans.mkdir(parents=True)
    old, young = orphans / "old.bin", orphans / "young.bin"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    engine = make_engine(settings.sqlalchemy_url)
    removed = prune_batch_files(settings, make_sessionmaker(engine), dt.timedelta(hours=1))
    engine.dispose()
    assert removed == 1 and not old.exists() and young.exists()
    assert set(live) <= set(kept_files(settings))


def test_keys_take_turns_for_the_worker(sessions: sessionmaker[Session]) -> None:
    """A's twelve chunks were queued first; B's one chunk is the second leased, not the 13th."""
    a_key, _ = create_key(sessions, "A", "integration")
    b_key, _ = create_key(sessions, "B", "integration")
    with sessions.begin() as session:
        a_job = create_job(
            session,
            kind="t",
            model_id=None,
            params={},
            chunks=[[i] for i in range(12)],
            created_by="A",
            key_id=a_key.id,
        ).id
        b_job = create_job(
            session,
            kind="t",
            model_id=None,
            params={},
            chunks=[[0]],
            created_by="B",
            key_id=b_key.id,
        ).id
    order = []
    while (lease := lease_next(sessions, "w", 30, ["t"])) is not None:
        order.append(lease.job_id)
    assert order[:3] == [a_job, b_job, a_job] and order.count(a_job) == 12
    # The command line's jobs (no key) take their turn too.
    with sessions.begin() as session:
        create_job(session, kind="t", model_id=None, params={}, chunks=[[0], [1]], created_by="cli")
    assert lease_next(sessions, "w", 30, ["t"]) is not None


@pytest.mark.slow
def test_a_jobs_photos_count_against_the_keys_rate(catalogue: Catalogue) -> None:
    s = _settings(catalogue, worker=False)
    s.rate_limit = "20/minute"
    for p in _partners(s):
        with p.http(p.a) as a, p.http(p.b) as b:
            ids = {"image_ids": [1] * 25}
            over = a.post("/jobs/identify", json=ids)
            assert over.status_code == 429 and "at most 20 photos per job" in over.text
            assert a.post("/jobs/identify", json={"image_ids": [1] * 15}).status_code == 202
            spent = a.post("/jobs/identify", json={"image_ids": [1] * 5})
            assert spent.status_code == 429 and int(spent.headers["Retry-After"]) >= 1
            # B's rate is B's own.
            assert b.post("/jobs/identify", json={"image_ids": [1] * 15}).status_code == 202
            # An archive's photos count too, and a refused archive keeps nothing.
            zipped = b.post(
                "/jobs/identify/archive", files={"archive": ("a.zip", archive(range(6)))}
            )
            assert zipped.status_code == 429 and "rate limit" in zipped.text
            assert kept_files(s) == []


@pytest.mark.slow
def test_callbacks_are_signed_and_sent_per_key(partners: Partners, receiver: Receiver) -> None:
    """A may call back only its hosts, with its secret; B's secret does not verify A's."""
    server = partners.server
    trust_callbacks(server, "integration", SECRET, hosts=("127.0.0.1",))
    port = receiver.url.rsplit(":", 1)[1]
    with server.client("admin") as admin:
        b_id = next(k["id"] for k in admin.get("/keys").json() if k["name"] == "partner B")
        admin.put(f"/keys/{b_id}/callback-hosts", json={"hosts": ["localhost"]})
    with partners.http(partners.b) as b:
        b_secret = b.post("/callbacks/secret").json()["callback_secret"]
        # B's key may not call back A's receiver host...
        refused = b.post(
            "/jobs/identify",
            json={"image_ids": [1], "callback_url": f"{receiver.url}/hook"},
        )
        assert refused.status_code == 422 and "not on the allowlist" in refused.text
    with partners.http(partners.a) as a:
        # ...nor A's B's.
        refused = a.post(
            "/jobs/identify",
            json={"image_ids": [1], "callback_url": f"http://localhost:{port}/hook"},
        )
        assert refused.status_code == 422 and "not on the allowlist" in refused.text
    with partners.client(partners.a) as a:
        job = a.identify_archive(archive(range(2)), callback_url=f"{receiver.url}/hook")
        done = a.wait_job(job["id"], timeout=60, poll=0.05)
    assert done["result"]["callback"]["delivered"] is True
    assert len(receiver.accepted) == 1  # verified with A's secret by the receiver
    body = b'{"job_id":1}'
    with pytest.raises(BadSignature):
        verify(b_secret, {"X-Whaleid-Signature": sign(SECRET, body)}, body)
    assert b_secret != SECRET and b_secret.startswith("whsec_")
    with server.client("admin") as admin:
        keys = {k["name"]: k for k in admin.get("/keys").json()}
    assert keys["partner B"]["callback_hosts"] == ["localhost"]
    assert keys["partner B"]["has_callback_secret"] is True
    assert "callback_secret" not in keys["partner B"]  # never shown again


@pytest.mark.slow
def test_callbacks_need_the_keys_own_trust(partners: Partners, receiver: Receiver) -> None:
    with partners.http(partners.b) as b:
        r = b.post("/jobs/identify", json={"image_ids": [1], "callback_url": f"{receiver.url}/h"})
    assert r.status_code == 422 and "callbacks are off for the key of 'partner B'" in r.text
    with partners.server.client("admin") as admin:
        assert admin.put("/keys/1/callback-hosts", json={"hosts": ["http://x/"]}).status_code == 422
        assert admin.put("/keys/999/callback-hosts", json={"hosts": []}).status_code == 404
        assert admin.post("/keys/999/callback-secret").status_code == 404


@pytest.mark.slow
def test_a_job_that_fails_or_is_cancelled_calls_back_too(
    idle_partners: Partners, receiver: Receiver
) -> None:
    server = idle_partners.server
    trust_callbacks(server, "integration", SECRET)
    with idle_partners.client(idle_partners.a) as a:
        failing = a.identify_archive(archive(range(2)), callback_url=f"{receiver.url}/hook")["id"]
        cancelled = a.identify_archive(archive(range(1)), callback_url=f"{receiver.url}/hook")
        a.cancel_job(cancelled["id"])
    # Break the failing job as a whole: every attempt of its chunk raises.
    engine = make_engine(server.settings.sqlalchemy_url)
    with make_sessionmaker(engine).begin() as session:
        job = session.get_one(Job, failing)
        job.params = {**job.params, "filters": {"date_from": "not a date"}}
    engine.dispose()
    run_worker(server.settings)
    with idle_partners.client(idle_partners.a) as a:
        assert a.job(failing)["state"] == "failed"
        delivered = a.job(failing)["result"]["callback"]
    assert delivered["delivered"] is True
    states = {body["job_id"]: body["state"] for body in receiver.accepted}
    assert states == {failing: "failed", cancelled["id"]: "cancelled"}
    assert kept_files(server.settings) == []


@pytest.mark.slow
def test_csv_results_cannot_run_as_formulas(partners: Partners) -> None:
    payload = _archive_with(
        {
            '=HYPERLINK("http://evil","x").png': encode(photo(0, QUERY_SHOT)),
            "@x.png": encode(photo(1, QUERY_SHOT)),
        }
    )
    with partners.client(partners.a) as a:
        job = a.wait_job(a.identify_archive(payload)["id"], timeout=60, poll=0.05)
        lines = a.job_results_csv(job["id"]).strip().split("\n")[1:]
    assert lines[0].startswith("\"'=HYPERLINK(") and lines[1].startswith("'@x.png,")


@pytest.mark.slow
def test_a_partners_identifications_and_query_photos_are_its_own(partners: Partners) -> None:
    fluke = encode(photo(5, QUERY_SHOT))
    with partners.client(partners.a) as a:
        answer = a.identify(("fluke.png", fluke))
    ident, image = answer["identification_id"], answer["query_image_id"]
    with partners.http(partners.b) as b:
        assert b.get(f"/identifications/{ident}").status_code == 404
        assert b.get(f"/images/{image}/file").status_code == 404
        assert ident not in [
            i["identification_id"] for i in b.get("/identifications").json()["items"]
        ]
        walked = b.post("/jobs/identify", json={"image_ids": [image]})
        assert walked.status_code == 422 and "do not exist" in walked.text
        assert b.get("/images/1/file").status_code == 200  # the catalogue is everyone's
    with partners.http(partners.a) as a_http:
        assert a_http.get(f"/identifications/{ident}").status_code == 200
        assert a_http.get(f"/images/{image}/file").status_code == 200
        listed = a_http.get("/identifications").json()["items"]
        assert [i["identification_id"] for i in listed] == [ident]
    with partners.server.client("curator") as curator:  # curators review everything
        assert curator.get(f"/identifications/{ident}").status_code == 200
        assert curator.get(f"/images/{image}/file").status_code == 200
    # The same photo sent by B too: stored once, and B reads it through its own answer.
    with partners.client(partners.b) as b_client:
        again = b_client.identify(("same.png", fluke))
    assert again["query_image_id"] == image
    with partners.http(partners.b) as b:
        assert b.get(f"/images/{image}/file").status_code == 200
        assert b.get(f"/identifications/{ident}").status_code == 404  # still A's
