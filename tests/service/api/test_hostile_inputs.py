"""Names a hostile partner or a bad catalogue file sends in: control characters are refused where
a name comes in (a photo's file name, an archive's entry name, a catalogue id), so nothing
prints one raw later (answers, ``results.csv``, logs); and an import never opens a path outside
its images folder."""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.catalogue.imports import CatalogueImport
from service.db.tables import Image, Individual, make_engine, make_sessionmaker
from service.settings import Settings
from tests.conftest import LiveServer, run_server
from tests.toy import encode, photo

CONTROLS = {"ESC": "\x1b[31m", "CR": "\r", "LF": "\n", "DEL": "\x7f", "NEL": "\x85"}


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    settings.worker = False
    yield from run_server(settings)


def _multipart(filename: str, data: bytes) -> tuple[bytes, str]:
    """A form with one file whose name is sent byte for byte (clients escape some characters)."""
    boundary = "whaleid-test-boundary"
    body = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="photo"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + data
    body += f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "char", ["\x1b[2J", "\x7f", "\x85", "\u2028"], ids=["ESC", "DEL", "NEL", "LS"]
)
def test_identify_refuses_a_file_name_with_a_control_character(
    server: LiveServer, char: str
) -> None:
    body, kind = _multipart(f"fluke{char}.png", encode(photo(1, 5)))
    with server.client() as http:
        answer = http.post("/identify", content=body, headers={"Content-Type": kind})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert "file name holds a control character" in detail and "rename" in detail
    assert char not in answer.text


@pytest.mark.parametrize("char", CONTROLS.values(), ids=CONTROLS.keys())
def test_an_archive_entry_named_with_a_control_character_is_refused(
    server: LiveServer, char: str
) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("good.png", encode(photo(1, 5)))
        zf.writestr(f"bad{char}name.png", encode(photo(2, 5)))
    with server.client() as http:
        answer = http.post(
            "/jobs/identify/archive", files={"archive": ("a.zip", buffer.getvalue())}
        )
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert "holds a control character" in detail and "bad" in detail and char not in detail
    assert not [p for p in (server.settings.data_dir / "batches").rglob("*") if p.is_file()]


def _import(settings: Settings, folder: Path, rows: list[list[str]]) -> list[tuple[int, str]]:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / "catalogue.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "species", "individual_id"])
        writer.writerows(rows)
    engine = make_engine(settings.sqlalchemy_url)
    report = CatalogueImport(settings, make_sessionmaker(engine), None, None).run(
        path, folder / "images"
    )
    engine.dispose()
    return report.errors


def _count(settings: Settings, table: type[Image] | type[Individual]) -> int:
    engine = make_engine(settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        n = session.scalar(select(func.count()).select_from(table)) or 0
    engine.dispose()
    return n


def test_an_imported_catalogue_id_with_a_control_character_is_a_row_error(
    settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "catalogue"
    (folder / "images").mkdir(parents=True)
    rows = [["ok.png", "dolphin", "ind-1"]]
    (folder / "images" / "ok.png").write_bytes(encode(photo(1, 0)))
    for n, char in enumerate(CONTROLS.values()):
        (folder / "images" / f"{n}.png").write_bytes(encode(photo(10 + n, 0)))
        rows.append([f"{n}.png", "dolphin", f"ind{char}{n}"])
    errors = _import(settings, folder, rows)
    assert len(errors) == len(CONTROLS), errors
    for _, message in errors:
        assert "holds a control character" in message and "choose one without" in message
        assert not any(char in message for char in CONTROLS.values()), message
    assert _count(settings, Individual) == 1 and _count(settings, Image) == 1


def test_an_individual_made_with_a_catalogue_id_with_a_control_character_is_422(
    server: LiveServer,
) -> None:
    with server.client("curator") as curator:
        made = curator.post("/individuals", json={"individual_id": "HW\x1b[31m-1"})
    assert made.status_code == 422, made.text
    assert "control character" in made.text


def test_import_never_opens_a_path_outside_the_images_folder(
    settings: Settings, tmp_path: Path
) -> None:
    """A valid photo outside the folder: read, it would have been imported."""
    folder = tmp_path / "deep" / "catalogue"
    outside = tmp_path / "outside.png"
    outside.write_bytes(encode(photo(4, 0)))
    (folder / "images" / "sub").mkdir(parents=True)
    (folder / "images" / "sub" / "in.png").write_bytes(encode(photo(5, 0)))
    errors = _import(
        settings,
        folder,
        [
            ["../../../outside.png", "dolphin", "ind-4"],
            ["sub/../../../../outside.png", "dolphin", "ind-4"],
            [str(outside), "dolphin", "ind-4"],
            ["../../../../../../etc/passwd", "dolphin", "ind-4"],
            ["sub/in.png", "dolphin", "ind-5"],
        ],
    )
    assert [line for line, _ in errors] == [2, 3, 4, 5], errors
    assert all("leads outside the images folder" in message for _, message in errors)
    assert _count(settings, Image) == 1  # sub/in.png only
