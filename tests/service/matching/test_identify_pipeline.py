"""The side work of an identification: the upload's hash, the active model's check and the photo
kept run on another thread beside the decoding (``Identifier._prepare``). What the answer relies
on: a switch seen during the decoding answers with the new model, a failure after the photo was
kept leaves neither file nor row, and the record is the same whichever way the photo's row came
(new, or the same photo again)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, func, select, update

from service.db.tables import (
    ApiKey,
    Candidate,
    Embedding,
    Identification,
    Image,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from service.gallery.sync import Filters
from service.matching.runtime import Runtime
from service.models.registry import register_model
from service.models.switch import activate_model
from tests.conftest import Catalogue, LiveServer
from tests.toy import build_toy_model, encode, photo


def _files(catalogue: Catalogue) -> set[Path]:
    return {p for p in catalogue.settings.photos_dir.rglob("*") if p.is_file()}


def _count(catalogue: Catalogue, table: type) -> int:
    with catalogue.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def test_a_failed_embedding_leaves_no_photo_file_and_no_row(
    catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The photo is kept (written) while it is preprocessed, before the embedding: an
    embedding that fails takes the file away again."""
    identifier = Runtime(catalogue.settings, catalogue.sessions).current()
    files, images = _files(catalogue), _count(catalogue, Image)

    def broken(_pixels: np.ndarray) -> np.ndarray:
        raise RuntimeError("onnxruntime ran out of memory")

    monkeypatch.setattr(identifier.embedder, "embed", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        identifier.identify(encode(photo(8, 55)), filters=Filters())
    assert _files(catalogue) == files
    assert _count(catalogue, Image) == images
    monkeypatch.undo()
    answer = identifier.identify(encode(photo(8, 55)), filters=Filters())
    assert answer.query_image_id is not None and len(_files(catalogue)) == len(files) + 1


def test_a_model_activated_while_the_photo_decodes_answers_from_the_start(
    catalogue: Catalogue, tmp_path: Path
) -> None:
    """The check runs beside the decoding; when it finds another model active, that model
    answers, from its own decoding, and the photo is kept once."""
    s = catalogue.settings
    runtime = Runtime(s, catalogue.sessions)
    old = runtime.current()
    second = register_model(
        s,
        catalogue.sessions,
        build_toy_model(tmp_path / "v2.onnx", seed=7, metadata={"whaleid.name": "v2"}),
    )
    activate_model(s, catalogue.sessions, second.id)
    new = runtime.current()
    assert new is not old and new.model.id == second.id
    files, embeddings = _files(catalogue), _count(catalogue, Embedding)

    # The old identifier decodes; its check (as Runtime.identify passes it) finds the new one.
    answer = old.identify(encode(photo(3, 41)), filters=Filters(), check=runtime.current)
    assert answer.model.id == second.id and answer.model.name == "v2"
    assert answer.candidates[0].individual_id == "ind-3"
    assert len(_files(catalogue)) == len(files) + 1
    assert _count(catalogue, Embedding) == embeddings + 1
    with catalogue.sessions() as session:
        ident = session.get_one(Identification, answer.identification_id)
        assert ident.model_id == second.id
        stored = session.scalar(
            select(Embedding.model_id).where(Embedding.image_id == answer.query_image_id)
        )
    assert stored == second.id


def test_the_same_photo_twice_is_one_row_and_two_answers(catalogue: Catalogue) -> None:
    """A new photo's row is inserted unless its content is there; the second upload finds the
    first's row, its embedding and its file, and records an answer of its own."""
    runtime = Runtime(catalogue.settings, catalogue.sessions)
    images, files = _count(catalogue, Image), _files(catalogue)
    upload = encode(photo(5, 77))
    first = runtime.identify(upload, filters=Filters(species=None), original_name="a.png")
    again = runtime.identify(upload, filters=Filters(), original_name="b.png", key_id=None)
    assert first.query_image_id == again.query_image_id
    assert first.identification_id != again.identification_id
    assert _count(catalogue, Image) == images + 1 and len(_files(catalogue)) == len(files) + 1
    assert [c.individual_id for c in again.candidates] == [
        c.individual_id for c in first.candidates
    ]
    with catalogue.sessions() as session:
        image = session.get_one(Image, first.query_image_id)
        assert (image.source, image.original_name, image.byte_size) == (
            "query",
            "a.png",
            len(upload),
        )
        assert image.created_at is not None
        for result in (first, again):
            ident = session.get_one(Identification, result.identification_id)
            assert ident.created_at is not None
            rows = session.scalars(
                select(Candidate)
                .where(Candidate.identification_id == result.identification_id)
                .order_by(Candidate.rank)
            ).all()
            assert [(c.rank, c.label) for c in rows] == [
                (c.rank, c.individual_id) for c in result.candidates
            ]
            named = [c for c in rows if c.label != "new_individual"]
            assert named and all(c.individual_id is not None for c in named)
        assert (
            session.scalar(
                select(func.count())
                .select_from(Embedding)
                .where(Embedding.image_id == first.query_image_id)
            )
            == 1
        )


@pytest.mark.slow
def test_a_key_revoked_elsewhere_is_refused_by_identify_before_anything_is_stored(
    live: LiveServer,
) -> None:
    """/identify admits a key it saw valid moments ago without a lookup before the body; the
    active model's check confirms it beside the decoding. A key revoked behind this process's
    back (another replica, the command line) is refused at once, and nothing is stored."""
    files = {p for p in live.settings.photos_dir.rglob("*") if p.is_file()}
    with live.client("integration") as client:
        first = client.post("/identify", files={"photo": ("a.png", encode(photo(2, 61)))})
        assert first.status_code == 200, first.text
        key_id = _key_id(live, "integration tester")
        engine = make_engine(live.settings.sqlalchemy_url)
        with make_sessionmaker(engine).begin() as session:
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
        images = _rows(engine, Image)
        idents = _rows(engine, Identification)
        refused = client.post("/identify", files={"photo": ("b.png", encode(photo(3, 62)))})
        assert refused.status_code == 401, refused.text
        assert "revoked" in refused.json()["detail"]
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (_rows(engine, Image), _rows(engine, Identification)) == (images, idents)
        # Routes that read look the key up every time.
        assert client.get("/individuals").status_code == 401
        # And the next upload is refused before its body is read.
        again = client.post("/identify", files={"photo": ("c.png", encode(photo(4, 63)))})
        assert again.status_code == 401
        engine.dispose()
    after = {p for p in live.settings.photos_dir.rglob("*") if p.is_file()}
    assert len(after - files) == 1  # the first answer's photo only


def _key_id(live: LiveServer, name: str) -> int:
    engine = make_engine(live.settings.sqlalchemy_url)
    with make_sessionmaker(engine)() as session:
        found = session.scalar(select(ApiKey.id).where(ApiKey.name == name))
    engine.dispose()
    assert found is not None
    return int(found)


def _rows(engine: Engine, table: type) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(table)) or 0)
