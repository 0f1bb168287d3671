"""Fixtures: a real SQLite file or a real PostgreSQL database, a real ONNX model, real uvicorn."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.db import migrate
from service.db.tables import make_engine, make_sessionmaker
from service.settings import Settings
from tests.toy import build_toy_model

POSTGRES_URL = os.environ.get("WHALEID_TEST_POSTGRES_URL", "")


def _postgres_or_skip() -> str:
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("WHALEID_TEST_POSTGRES_URL is not set: run the tests with scripts/test.sh")
        pytest.skip("no PostgreSQL: run the tests with scripts/test.sh to start one")
    return POSTGRES_URL


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    base = _postgres_or_skip()
    name = f"whaleid_test_{uuid.uuid4().hex[:12]}"
    admin = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield base.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'whaleid.sqlite3'}"


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file brought to the newest schema by the migrations, once a session: each test
    gets a copy (running the migrations on SQLite takes about a second a file; on PostgreSQL
    they run for each database, in a tenth of that)."""
    path = tmp_path_factory.mktemp("schema") / "whaleid.sqlite3"
    migrate.upgrade(f"sqlite:///{path}")
    return path


def migrated(settings: Settings, template: Path) -> Settings:
    """``settings`` with their database at the newest schema."""
    url = make_url(settings.sqlalchemy_url)
    if url.get_backend_name() == "sqlite" and url.database:
        shutil.copyfile(template, url.database)
    else:
        migrate.upgrade(settings.sqlalchemy_url)
    return settings


@pytest.fixture
def settings(tmp_path: Path, database_url: str, migrated_sqlite: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", database_url=database_url, _env_file=None)  # type: ignore[call-arg]
    s.ensure_dirs()
    return migrated(s, migrated_sqlite)


@pytest.fixture
def sqlite_settings(tmp_path: Path, migrated_sqlite: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", _env_file=None)  # type: ignore[call-arg]
    s.ensure_dirs()
    return migrated(s, migrated_sqlite)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.sqlalchemy_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def toy_model(tmp_path: Path) -> Path:
    return build_toy_model(tmp_path / "toy.onnx")


@dataclass
class LiveServer:
    url: str
    settings: Settings
    keys: dict[str, str]
    app: Any = None

    def client(self, role: str | None = "integration") -> httpx.Client:
        """A client holding the key of ``role`` (None: no key)."""
        headers = {"Authorization": f"Bearer {self.keys[role]}"} if role else {}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers)


def make_keys(settings: Settings) -> dict[str, str]:
    """One key per role, owned by "<role> tester"."""
    from service.access.auth import ROLES, create_key

    engine = make_engine(settings.sqlalchemy_url)
    factory = make_sessionmaker(engine)
    keys = {role: create_key(factory, f"{role} tester", role)[1] for role in ROLES}
    engine.dispose()
    return keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_process(
    settings: Settings, port: int, *, wait_for: str = "/health", timeout: float = 60, **env: str
) -> subprocess.Popen[bytes]:
    """``whaleid serve`` in a subprocess over loopback (it can be killed for real), once
    ``wait_for`` answers 200."""
    environment = {
        **os.environ,
        "WHALEID_DATA_DIR": str(settings.data_dir),
        "WHALEID_DATABASE_URL": settings.sqlalchemy_url,
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--no-migrate"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{wait_for}", timeout=timeout).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("whaleid serve did not start")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server, a real S3 API over loopback, for the whole session."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/moto-api/", timeout=5)
            break
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint: str) -> dict[str, str]:
    """A fresh bucket; the ``WHALEID_*`` variables that point a replica at it."""
    import boto3

    bucket = f"whaleid-{uuid.uuid4().hex[:12]}"
    env = {
        "WHALEID_STORAGE_URL": f"s3://{bucket}/replicas",
        "WHALEID_S3_ENDPOINT_URL": s3_endpoint,
        "WHALEID_S3_ACCESS_KEY_ID": "testing",
        "WHALEID_S3_SECRET_ACCESS_KEY": "testing",
    }
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)
    return env


def s3_settings(env: dict[str, str], data_dir: Path, database_url: str) -> Settings:
    """Settings for a replica with its own data directory, sharing the bucket in ``env``."""
    s = Settings(
        data_dir=data_dir,
        database_url=database_url,
        _env_file=None,  # type: ignore[call-arg]
        **{k.removeprefix("WHALEID_").lower(): v for k, v in env.items()},
    )
    s.ensure_dirs()
    return s


def run_server(settings: Settings, http: str = "auto") -> Iterator[LiveServer]:
    """uvicorn serving ``create_app(settings)`` over loopback, in a thread (``http``: its HTTP
    parser, "h11" or "httptools"; "auto" takes httptools when installed)."""
    keys = make_keys(settings)
    port = free_port()
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", settings, keys, app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class Catalogue:
    settings: Settings
    sessions: sessionmaker[Session]
    model_id: int
    folder: Path


def load_catalogue(
    settings: Settings,
    folder: Path,
    model_path: Path,
    *,
    individuals: int = 12,
    shots: tuple[int, ...] = (0, 1, 2),
) -> Catalogue:
    """Register and activate ``model_path``, then import a synthetic catalogue through the CLI
    code path."""
    from service.catalogue.imports import CatalogueImport
    from service.models.registry import register_model
    from service.models.switch import activate_model
    from service.onnx.embedder import Embedder
    from tests.toy import write_catalogue

    engine = make_engine(settings.sqlalchemy_url)
    factory = make_sessionmaker(engine)
    model = register_model(settings, factory, model_path)
    activate_model(settings, factory, model.id)
    csv_path = write_catalogue(folder, range(individuals), shots)
    embedder = Embedder.for_model(settings, model.file_path)
    report = CatalogueImport(settings, factory, embedder, model.id).run(csv_path, folder / "images")
    assert not report.errors and report.imported == individuals * len(shots)
    return Catalogue(settings, factory, model.id, folder)


@pytest.fixture
def catalogue(settings: Settings, tmp_path: Path, toy_model: Path) -> Catalogue:
    return load_catalogue(settings, tmp_path / "catalogue", toy_model)


@pytest.fixture
def live(catalogue: Catalogue) -> Iterator[LiveServer]:
    yield from run_server(catalogue.settings)
