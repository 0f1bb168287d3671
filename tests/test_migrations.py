"""Migrations up and down on SQLite and PostgreSQL; the models match the newest migration."""

from __future__ import annotations

import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.db import migrate
from service.db.tables import Base, make_engine

TABLES = {
    "individuals",
    "images",
    "models",
    "embeddings",
    "identifications",
    "identification_candidates",
}


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(database_url)
        assert TABLES <= set(inspect(engine).get_table_names())
        assert migrate.is_current(engine)
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert diff == [], f"models and migrations differ: {diff}"
        migrate.downgrade(database_url, "base")
        assert not TABLES & set(inspect(engine).get_table_names())
        assert not migrate.is_current(engine)
        migrate.upgrade(database_url)
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_0003_removes_nul_characters_stored_before_it(database_url: str) -> None:
    """Before 0003 a NUL reached the database: PostgreSQL kept it as \\u0000 in JSON (and then
    failed every query reading that JSON), SQLite kept it in text columns too."""
    from sqlalchemy import text
    from sqlalchemy.exc import DataError

    engine = make_engine(database_url)
    postgres = engine.dialect.name == "postgresql"
    now = "2026-01-01 00:00:00"
    try:
        migrate.upgrade(database_url, "0002")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO models (id, name, version, file_hash, file_path, embedding_dim, "
                    "preprocessing, k, cutoff, ranking, status, metadata_props, created_at) "
                    "VALUES (1, 'm', '1', 'h', 'm.onnx', 4, '{}', 5, 0.6, 'vote', 'active', "
                    "'{}', :now)"
                ),
                {"now": now},
            )
            name = "q.png" if postgres else "q\x00.png"
            conn.execute(
                text(
                    "INSERT INTO images (id, content_hash, file_path, media_type, byte_size, "
                    "width, height, original_name, source, created_at) VALUES (1, 'c', 'f', "
                    "'image/png', 1, 1, 1, :name, 'query', :now)"
                ),
                {"name": name, "now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO identifications (id, query_image_id, model_id, filters, k, "
                    "cutoff, ranking, gallery_size, status, created_at) VALUES (1, 1, 1, "
                    ":filters, 5, 0.6, 'vote', 0, 'pending', :now)"
                ),
                {"filters": '{"species": "x\\u0000y"}', "now": now},
            )
            if not postgres:
                conn.execute(
                    text(
                        "INSERT INTO individuals (id, catalogue_id, created_at) VALUES (1, :c, :n)"
                    ),
                    {"c": "a\x00b", "n": now},
                )
        if postgres:  # the failure the repair ends
            with pytest.raises(DataError), engine.connect() as conn:
                conn.execute(text("SELECT filters->>'species' FROM identifications")).all()
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            filters = conn.execute(text("SELECT CAST(filters AS TEXT) FROM identifications"))
            assert json.loads(filters.scalar_one()) == {"species": "xy"}
            original = conn.execute(text("SELECT original_name FROM images")).scalar_one()
            assert original == "q.png"
            if postgres:
                found = conn.execute(text("SELECT filters->>'species' FROM identifications"))
                assert found.scalar_one() == "xy"
            else:
                ids = conn.execute(text("SELECT catalogue_id FROM individuals")).scalars().all()
                assert ids == ["ab"]
    finally:
        engine.dispose()


def test_0007_backfills_each_identifications_verification(database_url: str) -> None:
    """Rows recorded before 0007 get the mode their answer shows: ``rerank`` where a candidate
    carries inliers (what ``GET /identifications/{id}`` used to infer), else ``none``; their
    calibration version is unknown."""
    from sqlalchemy import text

    engine = make_engine(database_url)
    now = "2026-01-01 00:00:00"
    try:
        migrate.upgrade(database_url, "0006")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO models (id, name, version, file_hash, file_path, embedding_dim, "
                    "preprocessing, k, cutoff, ranking, status, metadata_props, created_at) "
                    "VALUES (1, 'm', '1', 'h', 'm.onnx', 4, '{}', 5, 0.6, 'vote', 'active', "
                    "'{}', :now)"
                ),
                {"now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO images (id, content_hash, file_path, media_type, byte_size, "
                    "width, height, source, created_at) VALUES (1, 'c', 'f', 'image/png', 1, 1, "
                    "1, 'query', :now)"
                ),
                {"now": now},
            )
            for ident, inliers in ((1, None), (2, 12), (3, None)):
                conn.execute(
                    text(
                        "INSERT INTO identifications (id, query_image_id, model_id, filters, k, "
                        "cutoff, ranking, gallery_size, status, created_at) VALUES (:i, 1, 1, "
                        "'{}', 5, 0.6, 'vote', 0, 'pending', :now)"
                    ),
                    {"i": ident, "now": now},
                )
                if ident < 3:  # the third has no candidates at all
                    conn.execute(
                        text(
                            "INSERT INTO identification_candidates (identification_id, rank, "
                            "label, inliers) VALUES (:i, 1, 'a', :n), (:i, 2, 'b', NULL)"
                        ),
                        {"i": ident, "n": inliers},
                    )
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, verification, calibration_version FROM identifications ORDER BY id"
                )
            ).all()
        assert [tuple(r) for r in rows] == [
            (1, "none", None),
            (2, "rerank", None),
            (3, "none", None),
        ]
    finally:
        engine.dispose()
