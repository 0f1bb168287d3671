"""Models and photos in an S3-compatible bucket (moto's S3 server over loopback), shared by
replicas with their own data directories, as on several machines."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, event

from service.catalogue.imports import CatalogueImport
from service.db import migrate
from service.db.tables import Image, make_engine, make_sessionmaker
from service.errors import ModelFileCorrupt
from service.gallery.sync import Filters
from service.matching.runtime import Runtime
from service.models.registry import register_model
from service.models.switch import activate_model
from service.onnx.files import local_model_file, model_key
from service.settings import Settings
from service.store.objects import LocalStore, MissingObject, ObjectStore, S3Store, open_store
from service.store.retention import prune_query_photos
from tests.conftest import free_port, load_catalogue, make_keys, s3_settings, serve_process
from tests.toy import build_toy_model, encode, photo, write_catalogue


@pytest.fixture(params=["local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "data")
    env = request.getfixturevalue("s3_env")
    store = open_store(s3_settings(env, tmp_path / "data", ""))
    assert isinstance(store, S3Store)
    return store


def test_a_key_is_written_once_read_and_deleted(objects: ObjectStore, tmp_path: Path) -> None:
    assert objects.put_new("photos/ab/cd/x.jpg", b"first") is True
    assert objects.put_new("photos/ab/cd/x.jpg", b"second") is False
    assert objects.read("photos/ab/cd/x.jpg") == b"first"
    objects.download("photos/ab/cd/x.jpg", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"first"
    objects.delete("photos/ab/cd/x.jpg")
    objects.delete("photos/ab/cd/x.jpg")  # already gone: nothing happens
    with pytest.raises(MissingObject):
        objects.read("photos/ab/cd/x.jpg")
    with pytest.raises(MissingObject):
        objects.download("photos/ab/cd/x.jpg", tmp_path / "copy2")


def test_a_process_shares_one_store_and_one_s3_client(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Every part of a process (photos, archives, model files, the runtime's two readers) gets
    the same store for the same configuration: one boto3 client and its connection pool."""
    from service.jobs.archives import ArchiveFiles
    from service.store.photos import PhotoStore

    settings = s3_settings(s3_env, tmp_path / "data", "")
    store = open_store(settings)
    assert isinstance(store, S3Store)
    assert open_store(settings.model_copy()) is store
    assert (
        PhotoStore.open(settings).objects is store and ArchiveFiles.open(settings).objects is store
    )
    elsewhere = s3_settings(
        {**s3_env, "WHALEID_STORAGE_URL": s3_env["WHALEID_STORAGE_URL"] + "2"},
        tmp_path / "data",
        "",
    )
    other = open_store(elsewhere)
    assert isinstance(other, S3Store) and other is not store and other.prefix != store.prefix
    assert open_store(Settings(data_dir=tmp_path / "d", _env_file=None)) is not open_store(  # type: ignore[call-arg]
        Settings(data_dir=tmp_path / "e", _env_file=None)  # type: ignore[call-arg]
    )


def _sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    migrate.upgrade(url)
    return url


def test_a_replica_fetches_a_model_by_its_hash_and_verifies_it(
    s3_env: dict[str, str], tmp_path: Path, toy_model: Path
) -> None:
    url = _sqlite(tmp_path)
    a = s3_settings(s3_env, tmp_path / "data-a", url)
    b = s3_settings(s3_env, tmp_path / "data-b", url)
    factory = make_sessionmaker(make_engine(url))
    model = register_model(a, factory, toy_model)
    digest = hashlib.sha256(toy_model.read_bytes()).hexdigest()
    assert model.file_hash == digest and model.file_path == model_key(digest)
    assert open_store(a).read(model.file_path) == toy_model.read_bytes()

    fetched = local_model_file(b, model.file_path)
    assert fetched == b.data_dir / model.file_path
    assert fetched.read_bytes() == toy_model.read_bytes()

    # A tampered object is refused, and nothing is left in the cache.
    fetched.unlink()
    bucket = open_store(b)
    bucket.delete(model.file_path)
    bucket.put_new(model.file_path, b"not the registered model")
    with pytest.raises(ModelFileCorrupt, match=digest):
        local_model_file(b, model.file_path)
    assert [p.name for p in (b.data_dir / "models").iterdir()] == []


def test_a_registration_the_database_refuses_leaves_no_object(
    s3_env: dict[str, str], tmp_path: Path, toy_model: Path
) -> None:
    url = _sqlite(tmp_path)
    s = s3_settings(s3_env, tmp_path / "data", url)
    engine = make_engine(url)

    def refuse(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.startswith("INSERT INTO models"):
            raise RuntimeError("database refused the model row")

    event.listen(engine, "before_cursor_execute", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        register_model(s, make_sessionmaker(engine), toy_model)
    key = model_key(hashlib.sha256(toy_model.read_bytes()).hexdigest())
    with pytest.raises(MissingObject):
        open_store(s).read(key)


def _identify(client: httpx.Client, data: bytes) -> dict[str, object]:
    response = client.post("/identify", files={"photo": ("q.png", data)})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


@pytest.mark.slow
@pytest.mark.postgres
def test_two_replicas_share_one_database_and_one_bucket(
    s3_env: dict[str, str], postgres_url: str, tmp_path: Path, toy_model: Path
) -> None:
    a = s3_settings(s3_env, tmp_path / "data-a", postgres_url)
    b = s3_settings(s3_env, tmp_path / "data-b", postgres_url)
    migrate.upgrade(a.sqlalchemy_url)
    load_catalogue(a, tmp_path / "catalogue", toy_model)
    keys = make_keys(a)
    assert not any((b.data_dir / "photos").rglob("*.*")), "replica b has no photo of its own"
    ports = free_port(), free_port()
    replicas = [
        serve_process(s, port, wait_for="/ready", **s3_env)
        for s, port in zip((a, b), ports, strict=True)
    ]
    headers = {"Authorization": f"Bearer {keys['integration']}"}
    clients = [
        httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30)
        for port in ports
    ]
    try:
        # The model registered through replica a was fetched by b into its own data directory.
        digest = hashlib.sha256(toy_model.read_bytes()).hexdigest()
        model_file = b.data_dir / model_key(digest)
        assert model_file.read_bytes() == toy_model.read_bytes()

        # Both answer alike.
        query = encode(photo(3, 50), "PNG")
        answers = [_identify(c, query) for c in clients]
        rankings = [[c["individual_id"] for c in x["candidates"]] for x in answers]  # type: ignore[attr-defined]
        assert rankings[0] == rankings[1] and rankings[0][0] == "ind-3"

        # A photo stored through one is served by the other (from the bucket, not a folder).
        stored = _identify(clients[0], encode(photo(5, 51), "PNG"))["query_image_id"]
        served = [c.get(f"/images/{stored}/file") for c in clients]
        assert [r.status_code for r in served] == [200, 200]
        assert served[0].content == served[1].content and len(served[0].content) > 100
        assert not any((b.data_dir / "photos").rglob("*.*"))
        gallery = clients[1].get("/images/1/file")  # a catalogue photo, imported through a
        assert gallery.status_code == 200 and gallery.content

        # A model uploaded to replica b (POST /models) and activated from a third machine (the
        # CLI's path, with its own data directory) is the one replica a then serves.
        second = build_toy_model(tmp_path / "second.onnx", seed=7)
        uploaded = clients[1].post(
            "/models",
            content=second.read_bytes(),
            headers={
                "Authorization": f"Bearer {keys['admin']}",
                "Content-Type": "application/octet-stream",
            },
        )
        assert uploaded.status_code == 201, uploaded.text
        c = s3_settings(s3_env, tmp_path / "data-c", postgres_url)
        activate_model(c, make_sessionmaker(make_engine(c.sqlalchemy_url)), uploaded.json()["id"])
        ready = clients[0].get("/ready").json()
        assert ready["model"]["version"] == "seed7" and ready["gallery_size"] == 36
        assert _identify(clients[0], query)["model"] == _identify(clients[1], query)["model"]
    finally:
        for client in clients:
            client.close()
        for process in replicas:
            process.terminate()
            process.wait(timeout=10)


def test_local_store_keeps_the_data_directory_layout(sqlite_settings: Settings) -> None:
    """The default (no WHALEID_STORAGE_URL) stores under the data directory, as before."""
    store = open_store(sqlite_settings)
    assert isinstance(store, LocalStore) and store.root == sqlite_settings.data_dir


def _bucket_keys(settings: Settings) -> set[str]:
    store = open_store(settings)
    assert isinstance(store, S3Store)
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _refuse_inserts(engine: Engine) -> None:
    def refuse(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            raise RuntimeError("disk full")

    event.listen(engine, "before_cursor_execute", refuse)


def test_photos_in_the_bucket_leave_no_orphan_and_prune_removes_them(
    s3_env: dict[str, str], tmp_path: Path, toy_model: Path
) -> None:
    s = s3_settings(s3_env, tmp_path / "data", _sqlite(tmp_path))
    catalogue = load_catalogue(s, tmp_path / "catalogue", toy_model, individuals=4)
    keys = _bucket_keys(s)
    assert len([k for k in keys if k.startswith("replicas/photos/")]) == 12
    assert not any((s.data_dir / "photos").rglob("*.*")), "photos go to the bucket only"

    # An import and an identification the database refuses leave no object behind.
    refusing = make_engine(s.sqlalchemy_url)
    _refuse_inserts(refusing)
    more = write_catalogue(tmp_path / "more", range(20, 23), (0,))
    with pytest.raises(RuntimeError, match="disk full"):
        CatalogueImport(s, make_sessionmaker(refusing), None, None).run(
            more, tmp_path / "more" / "images"
        )
    identifier = Runtime(s, make_sessionmaker(refusing)).current()
    with pytest.raises(Exception, match="disk full"):
        identifier.identify(encode(photo(8, 55)), filters=Filters())
    assert _bucket_keys(s) == keys

    # A query photo pruned after the retention period is deleted from the bucket.
    query = (
        Runtime(s, catalogue.sessions).current().identify(encode(photo(8, 56)), filters=Filters())
    )
    with catalogue.sessions() as session:
        image = session.get_one(Image, query.query_image_id)
    assert _bucket_keys(s) - keys == {f"replicas/photos/{image.file_path}"}
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=100)
    assert prune_query_photos(s, catalogue.sessions, 90, now=later).photos == 1
    assert _bucket_keys(s) == keys
