"""Malformed archives from a hostile partner: each is a 422 (or a job of the photos that could be
read), never a 500, and a refused archive leaves no file behind.

The fuzz mutates valid archives (bytes of their headers set or flipped, fields set to boundary
values, records truncated, duplicated or cut out), seeded so that a failure can be replayed. The
normal run tries ``WHALEID_ARCHIVE_FUZZ`` mutations (300 by default) on the reader itself and a
slice of them through ``POST /jobs/identify/archive``; the 10,000-mutation run is

    WHALEID_ARCHIVE_FUZZ=10000 pytest tests/service/jobs/test_hostile_archives.py -k reader
"""

from __future__ import annotations

import io
import os
import random
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.errors import Invalid
from service.jobs.archives import ArchiveFiles, declared_directory
from service.jobs.batch.submit import read_archive
from service.settings import Settings
from tests.conftest import LiveServer, run_server
from tests.toy import encode, photo

FUZZ = int(os.environ.get("WHALEID_ARCHIVE_FUZZ", "300"))
HTTP_SLICE = 120
SEED = 25
SIGNATURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07")
BOUNDARIES = (0, 1, 0x7F, 0x80, 0xF1, 0xFF, 0xFFFF, 0xFFFFFFFF, 2**62, 2**63, 2**64 - 1)


def _zip(photos: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in photos.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def as_zip64(data: bytes, locator_offset: int | None = None) -> bytes:
    """``data`` ended as a ZIP64 writer ends it: a ZIP64 record, its locator (pointing at
    ``locator_offset``, by default the record), and the classic record saying "see ZIP64"."""
    end = data.rfind(b"PK\x05\x06")
    count, size, offset = struct.unpack("<HLL", data[end + 10 : end + 20])
    zip64 = struct.pack("<4sQHHLLQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)
    at = end if locator_offset is None else locator_offset
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
    classic = struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, size, offset, 0)
    return data[:end] + zip64 + locator + classic


def valid_archives() -> list[bytes]:
    photos = {f"dir/{i}.png": encode(photo(i, 5, size=32)) for i in range(2)}
    one = {"a.png": encode(photo(3, 5, size=32)), "notes.txt": b"field notes"}
    return [
        _zip(photos),
        _zip(photos, zipfile.ZIP_STORED),
        _zip(one),
        as_zip64(_zip(photos)),
    ]


def _headers(data: bytes) -> list[int]:
    """Where the archive's records start."""
    found = []
    for signature in SIGNATURES:
        at = data.find(signature)
        while at >= 0:
            found.append(at)
            at = data.find(signature, at + 1)
    return found or [0]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random mutations of ``data``, mostly in its records' headers."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        starts = _headers(bytes(out))
        at = min(rng.choice(starts) + rng.randrange(0, 46), max(len(out) - 1, 0))
        kind = rng.randrange(7)
        if not out:
            break
        if kind == 0:  # a byte flipped
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:  # a byte set
            out[at] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xF1, 0xFF, rng.randrange(256)))
        elif kind == 2:  # a field set to a boundary
            width = rng.choice((2, 4, 8))
            value = rng.choice(BOUNDARIES) % (1 << (8 * width))
            out[at : at + width] = value.to_bytes(width, "little")
        elif kind == 3:  # truncated
            del out[rng.randrange(len(out)) :]
        elif kind == 4:  # a record duplicated
            length = rng.randrange(4, 120)
            out[at:at] = out[at : at + length]
        elif kind == 5:  # a record cut out
            del out[at : at + rng.randrange(1, 60)]
        else:  # random bytes over a header
            length = rng.randrange(1, 16)
            out[at : at + length] = rng.randbytes(length)
    return bytes(out)


def mutations(count: int, seed: int = SEED) -> Iterator[tuple[int, bytes]]:
    rng = random.Random(seed)
    bases = valid_archives()
    for n in range(count):
        yield n, mutate(rng.choice(bases), rng)


def kept_files(settings: Settings) -> list[Path]:
    return sorted(p for p in (settings.data_dir / "batches").rglob("*") if p.is_file())


def sweep_empty_folders(settings: Settings) -> None:
    """Remove the upload folders left empty (the file store keeps a folder once its files are
    gone), so that looking for files left behind stays quick over 10,000 uploads."""
    for folder in (settings.data_dir / "batches").glob("*"):
        try:
            folder.rmdir()
        except OSError:  # not empty: what the test looks for next
            pass


def named_cases() -> list[bytes]:
    """The review's two findings: a ZIP64 locator at 2^63, and "version needed" 0xF1."""
    one = _zip({"a.png": encode(photo(1, 5, size=32))})
    version = bytearray(one)
    version[version.rfind(b"PK\x01\x02") + 6] = 0xF1
    return [
        as_zip64(one, locator_offset=2**63),
        as_zip64(one, locator_offset=2**62),
        bytes(version),
    ]


@pytest.fixture
def plain_settings(tmp_path: Path) -> Settings:
    """Settings for the reader alone (it stores files, and touches no database)."""
    s = Settings(data_dir=tmp_path / "data", _env_file=None)  # type: ignore[call-arg]
    s.ensure_dirs()
    return s


@pytest.mark.parametrize(
    ("offset", "spooled"),
    [(2**63, False), (2**64 - 1, False), (2**62, True), (2**63, True), (10**9, True)],
)
def test_a_zip64_locator_past_the_end_is_refused(
    plain_settings: Settings, offset: int, spooled: bool
) -> None:
    data = as_zip64(_zip({"a.png": encode(photo(1, 5, size=32))}), locator_offset=offset)
    if spooled:  # as an upload spooled to disk (UploadFile's file)
        archive: io.IOBase = tempfile.SpooledTemporaryFile(max_size=16)  # noqa: SIM115
        archive.write(data)
        archive.seek(0)
    else:
        archive = io.BytesIO(data)
    with pytest.raises(Invalid, match="ZIP64 locator points past its end"):
        declared_directory(archive)  # type: ignore[arg-type]
    with pytest.raises(Invalid):
        read_archive(plain_settings, archive)  # type: ignore[arg-type]
    assert kept_files(plain_settings) == []


def test_an_unknown_version_needed_is_refused(plain_settings: Settings) -> None:
    data = bytearray(_zip({"a.png": encode(photo(1, 5, size=32))}))
    central = data.rfind(b"PK\x01\x02")
    data[central + 6] = 0xF1  # "version needed to extract": 24.1
    with pytest.raises(Invalid, match="not a readable ZIP file"):
        read_archive(plain_settings, io.BytesIO(bytes(data)))
    assert kept_files(plain_settings) == []


def test_the_reader_fuzzed(plain_settings: Settings) -> None:
    """Every mutation is read or refused with ``Invalid``; nothing else escapes, and a refused
    archive keeps no file. An archive that was read holds only photos."""
    plain_settings.batch_max_items = 20
    files = ArchiveFiles.open(plain_settings)
    outcomes = {"read": 0, "refused": 0}
    for n, data in mutations(FUZZ):
        sweep_empty_folders(plain_settings)
        try:
            archive = read_archive(plain_settings, io.BytesIO(data))
        except Invalid:
            outcomes["refused"] += 1
            assert kept_files(plain_settings) == [], f"mutation {n} left files behind"
            continue
        except Exception as e:  # pragma: no cover - what the test exists to catch
            pytest.fail(f"mutation {n} (seed {SEED}) raised {type(e).__name__}: {e}")
        outcomes["read"] += 1
        assert len(kept_files(plain_settings)) == len(archive.kept)
        files.remove(archive.kept)
    assert outcomes["read"] + outcomes["refused"] == FUZZ
    assert outcomes["read"] > 0 and outcomes["refused"] > 0  # both ways were walked
    assert kept_files(plain_settings) == []


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    settings.worker = False
    settings.batch_max_items = 20
    settings.key_max_live_jobs = HTTP_SLICE + 10
    yield from run_server(settings)


@pytest.mark.slow
def test_the_archive_route_fuzzed(server: LiveServer) -> None:
    """A slice of the mutations through ``POST /jobs/identify/archive``: 202 or 422, never a 5xx;
    the files kept are exactly those of the jobs accepted."""
    statuses: dict[int, int] = {}
    with server.client() as http:
        for data in named_cases():
            answer = http.post("/jobs/identify/archive", files={"archive": ("a.zip", data)})
            assert answer.status_code == 422, answer.text
            assert "not a readable ZIP file" in answer.json()["detail"]
        for n, data in mutations(HTTP_SLICE, seed=SEED + 1):
            answer = http.post("/jobs/identify/archive", files={"archive": ("a.zip", data)})
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            assert answer.status_code in (202, 422), (n, answer.status_code, answer.text)
        with server.client("admin") as admin:
            accepted = [j["id"] for j in admin.get("/jobs", params={"limit": 500}).json()]
    assert statuses.get(202, 0) == len(accepted) and statuses.get(422, 0) > 0, statuses
    from service.db.tables import Job, make_engine, make_sessionmaker

    engine = make_engine(server.settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        refs = {
            str(i["ref"])
            for job_id in accepted
            for i in session.get_one(Job, job_id).params["items"]
            if i["kind"] == "archive"
        }
    engine.dispose()
    kept = {
        str(p.relative_to(server.settings.data_dir / "batches"))
        for p in kept_files(server.settings)
    }
    assert kept == refs
