"""Catalogue import (idempotent, resumable, bad rows reported) and evaluation, via the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.catalogue import imports as catalogue_module
from service.cli import main
from service.db.tables import Embedding, Image, Individual, make_engine, make_sessionmaker
from service.settings import Settings
from tests.conftest import Catalogue
from tests.toy import encode, photo, write_catalogue


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("WHALEID_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", settings.sqlalchemy_url)
    return settings


def counts(settings: Settings) -> tuple[int, int, int]:
    engine = make_engine(settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as s:
        result = tuple(
            s.scalar(select(func.count()).select_from(t)) or 0
            for t in (Individual, Image, Embedding)
        )
    engine.dispose()
    return result  # type: ignore[return-value]


def stored_files(settings: Settings) -> set[str]:
    return {
        str(p.relative_to(settings.photos_dir))
        for p in settings.photos_dir.rglob("*")
        if p.is_file()
    }


def file_rows(settings: Settings) -> set[str]:
    engine = make_engine(settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as s:
        rows = set(s.scalars(select(Image.file_path)))
    engine.dispose()
    return rows


def activate(toy_model: Path) -> None:
    assert main(["models", "add", str(toy_model), "--activate"]) == 0


@pytest.mark.slow
def test_import_twice_adds_nothing(env: Settings, tmp_path: Path, toy_model: Path) -> None:
    activate(toy_model)
    csv_path = write_catalogue(tmp_path, range(5), range(3))
    assert main(["import", str(csv_path), "--images", str(tmp_path / "images")]) == 0
    assert counts(env) == (5, 15, 15)
    files = stored_files(env)
    assert main(["import", str(csv_path), "--images", str(tmp_path / "images")]) == 0
    assert counts(env) == (5, 15, 15)
    assert stored_files(env) == files == file_rows(env)


@pytest.mark.slow
def test_interrupted_import_resumes(
    env: Settings, tmp_path: Path, toy_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    activate(toy_model)
    csv_path = write_catalogue(tmp_path, range(10), range(4))  # 40 rows: batches of 16
    real_bump = catalogue_module.log_gallery_changes
    calls = {"n": 0}

    def crash_on_second_batch(session, image_ids, model_id):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the operator's Ctrl-C, mid-transaction
        real_bump(session, image_ids, model_id)

    monkeypatch.setattr(catalogue_module, "log_gallery_changes", crash_on_second_batch)
    args = ["import", str(csv_path), "--images", str(tmp_path / "images"), "--batch-size", "16"]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert counts(env)[1:] == (16, 16)
    assert stored_files(env) == file_rows(env)  # the rolled-back batch left no files
    monkeypatch.setattr(catalogue_module, "log_gallery_changes", real_bump)
    assert main(args) == 0
    assert counts(env) == (10, 40, 40)
    assert stored_files(env) == file_rows(env)


def test_bad_rows_are_reported_with_line_numbers_and_the_rest_imported(
    env: Settings, tmp_path: Path, toy_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    activate(toy_model)
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(encode(photo(1, 1)))
    (images / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (images / "empty.jpg").write_bytes(b"")
    full = encode(photo(2, 1, size=128), "JPEG")
    (images / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (images / "good2.png").write_bytes(encode(photo(2, 2)))
    rows = [
        ["image", "species", "individual_id", "date"],
        ["good.png", "fin_whale", "w1", "2024-05-01"],  # line 2
        ["missing.png", "fin_whale", "w2", ""],  # line 3
        ["garbage.jpg", "fin_whale", "w2", ""],  # line 4
        ["empty.jpg", "fin_whale", "w2", ""],  # line 5
        ["truncated.jpg", "fin_whale", "w2", ""],  # line 6
        ["good2.png", "fin_whale", "w2", "May 2024"],  # line 7
        ["good2.png", "fin_whale", "", ""],  # line 8
    ]
    csv_path = tmp_path / "cat.csv"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert main(["import", str(csv_path), "--images", str(images)]) == 0
    assert counts(env) == (1, 1, 1)
    errors = {r.getMessage() for r in caplog.records if r.levelname == "ERROR"}
    for line, word in [
        (3, "not found"),
        (4, "not an image"),
        (5, "empty"),
        (6, "truncated"),
        (7, "YYYY-MM-DD"),
        (8, "must not be empty"),
    ]:
        assert any(m.startswith(f"line {line}:") and word in m for m in errors), (line, errors)
    assert main(["import", str(csv_path), "--images", str(images), "--strict"]) == 1


def test_catalogue_without_required_columns_is_refused(
    env: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv_path = tmp_path / "cat.csv"
    csv_path.write_text("file,whale\na.jpg,w1\n")
    assert main(["import", str(csv_path), "--images", str(tmp_path)]) == 2
    assert "image, species, individual_id" in caplog.text


def test_photo_filed_under_two_individuals_is_a_conflict(
    env: Settings, tmp_path: Path, toy_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    activate(toy_model)
    csv_path = write_catalogue(tmp_path, [1], [1])
    assert main(["import", str(csv_path), "--images", str(tmp_path / "images")]) == 0
    other = tmp_path / "other.csv"
    other.write_text("image,species,individual_id\nind1_shot1.png,bottlenose_dolphin,someone\n")
    assert main(["import", str(other), "--images", str(tmp_path / "images")]) == 0
    assert "already in the catalogue as individual 'ind-1'" in caplog.text
    assert counts(env) == (1, 1, 1)


def test_import_before_a_model_then_activation_embeds_the_gallery(
    env: Settings, tmp_path: Path, toy_model: Path
) -> None:
    csv_path = write_catalogue(tmp_path, range(4), range(2))
    assert main(["import", str(csv_path), "--images", str(tmp_path / "images")]) == 0
    assert counts(env) == (4, 8, 0)
    activate(toy_model)
    assert counts(env) == (4, 8, 8)


@pytest.mark.slow
def test_evaluate_scores_known_and_unseen_individuals(
    catalogue: Catalogue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = catalogue.settings
    monkeypatch.setenv("WHALEID_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", s.sqlalchemy_url)
    queries = write_catalogue(tmp_path / "q", [0, 1, 2, 3, 500, 501], [7], name="queries.csv")
    predictions = tmp_path / "predictions.csv"
    assert (
        main(
            [
                "evaluate",
                str(queries),
                "--images",
                str(tmp_path / "q" / "images"),
                "--predictions",
                str(predictions),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["known_queries"] == 4 and summary["unseen_queries"] == 2
    assert summary["map5_known"] == 1.0
    assert summary["map5_unseen"] == 1.0  # unseen individuals are answered new_individual first
    assert summary["map5"] == 1.0
    with predictions.open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["image"] == "ind0_shot7.png"
    assert rows[0]["predictions"].split()[0] == "ind-0"
    assert rows[4]["predictions"].split()[0] == "new_individual"
    assert len(rows[0]["predictions"].split()) == 5


def test_the_catalogue_files_text_limits_are_the_databases() -> None:
    """The CSV reader knows no database, yet refuses exactly what the columns would."""
    from service.catalogue.csv_file import TEXT_LIMITS
    from service.db.checks import column_length
    from service.db.tables import Image, Individual

    assert TEXT_LIMITS == {
        "image": column_length(Image.original_name),
        "species": column_length(Image.species),
        "individual_id": column_length(Individual.catalogue_id),
        "encounter": column_length(Image.encounter),
        "location": column_length(Image.location),
    }


def test_the_catalogue_file_reader_imports_no_database_index_or_store() -> None:
    """Training reads catalogues with it: in a fresh interpreter it loads no SQLAlchemy, faiss,
    boto3 or onnxruntime."""
    code = (
        "import sys; from service.catalogue.csv_file import read_catalogue; "
        "print(sorted(m for m in ('sqlalchemy', 'faiss', 'boto3', 'onnxruntime') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _relabel(csv_path: Path, labels: dict[str, str]) -> None:
    """Give the rows of some individuals another individual_id, e.g. ``new_individual``."""
    text = csv_path.read_text()
    for old, new in labels.items():
        text = text.replace(f",{old}\n", f",{new}\n").replace(f",{old}\r\n", f",{new}\r\n")
    csv_path.write_text(text)


@pytest.mark.slow
def test_evaluate_scores_new_individual_rows_as_unseen_and_warns_of_skipped_rows(
    catalogue: Catalogue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Kaggle convention: a query labelled new_individual is an animal outside the catalogue,
    scored like one the gallery has no photo of, not skipped as an error."""
    s = catalogue.settings
    monkeypatch.setenv("WHALEID_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", s.sqlalchemy_url)
    queries = write_catalogue(tmp_path / "q", [0, 1, 500, 501], [7], name="queries.csv")
    _relabel(queries, {"ind-500": "new_individual", "ind-501": "NEW_INDIVIDUAL"})
    with queries.open("a", newline="") as f:
        csv.writer(f).writerow(["missing.png", "bottlenose_dolphin", "ind-0"])  # line 6
    predictions = tmp_path / "predictions.csv"
    images = str(tmp_path / "q" / "images")
    argv = ["evaluate", str(queries), "--images", images, "--predictions", str(predictions)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["known_queries"], summary["unseen_queries"]) == (2, 2)
    assert (summary["queries"], summary["rows"], summary["errors"]) == (4, 5, 1)
    # Both new_individual rows are answered new_individual first: AP 1 each.
    assert summary["unseen_flagged_new"] == 2 and summary["map5_unseen"] == 1.0
    assert summary["map5_known"] == 1.0 and summary["map5"] == 1.0
    with predictions.open() as f:
        firsts = [r["predictions"].split()[0] for r in csv.DictReader(f)]
    assert firsts == ["ind-0", "ind-1", "new_individual", "new_individual"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("line 6:") for m in warnings), warnings
    assert any("MAP@5 covers only the scored queries (4 of 5 rows)" in m for m in warnings)


def test_evaluate_logs_no_coverage_warning_without_errors(
    catalogue: Catalogue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = catalogue.settings
    monkeypatch.setenv("WHALEID_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("WHALEID_DATABASE_URL", s.sqlalchemy_url)
    queries = write_catalogue(tmp_path / "q", [2, 502], [7], name="queries.csv")
    _relabel(queries, {"ind-502": "new_individual"})
    assert main(["evaluate", str(queries), "--images", str(tmp_path / "q" / "images")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["queries"], summary["rows"], summary["errors"]) == (2, 2, 0)
    assert summary["unseen_queries"] == 1 and summary["map5"] == 1.0
    assert "MAP@5 covers only" not in caplog.text


def test_import_still_refuses_new_individual_as_a_catalogue_id(
    env: Settings, tmp_path: Path, toy_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only evaluate's query file opts in to new_individual; a catalogue never holds it."""
    activate(toy_model)
    csv_path = write_catalogue(tmp_path, [1, 2], [0])
    _relabel(csv_path, {"ind-2": "new_individual"})  # line 3
    args = ["import", str(csv_path), "--images", str(tmp_path / "images")]
    assert main(args) == 0
    assert counts(env) == (1, 1, 1)  # ind-1 only
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(m.startswith("line 3:") and "reserved" in m for m in errors), errors
    assert main([*args, "--strict"]) == 1


def test_the_catalogue_reader_accepts_new_individual_only_when_asked(tmp_path: Path) -> None:
    from service.catalogue.csv_file import CatalogueRow, read_catalogue

    csv_path = tmp_path / "q.csv"
    csv_path.write_text(
        "image,species,individual_id\na.png,fin_whale, New_Individual \nb.png,fin_whale,w1\n"
    )
    refused = list(read_catalogue(csv_path))
    assert isinstance(refused[0], tuple) and refused[0][0] == 2 and "reserved" in refused[0][1]
    assert isinstance(refused[1], CatalogueRow) and refused[1].individual_id == "w1"
    accepted = list(read_catalogue(csv_path, new_individual_allowed=True))
    assert [r.individual_id for r in accepted if isinstance(r, CatalogueRow)] == [
        "new_individual",
        "w1",
    ]
