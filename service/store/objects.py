"""Where model files and photos live: the local data directory (the default) or an S3-compatible
bucket shared by replicas on several machines (``WHALEID_STORAGE_URL=s3://bucket/prefix``).

Keys are paths relative to the data directory (``models/<sha256>.onnx``,
``photos/ab/cd/<sha256>.jpg``), so the local layout is unchanged and a bucket mirrors it."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.settings import Settings


class MissingObject(FileNotFoundError):
    """The store holds no object under that key (a missing file, wherever the store is)."""


@dataclass(frozen=True)
class StoredObject:
    """A key in the store and when it was written (UTC)."""

    key: str
    modified: dt.datetime


class ObjectStore(Protocol):
    """Content-addressed objects: each key is written once and never changes."""

    def put_new(self, key: str, data: bytes) -> bool:
        """Write ``data`` unless ``key`` exists; True when this call created it."""
        ...

    def upload_new(self, source: Path, key: str) -> bool:
        """Copy the file ``source`` to ``key`` unless it exists; True when this call created it."""
        ...

    def read(self, key: str) -> bytes:
        """The object's bytes; raises ``MissingObject``."""
        ...

    def download(self, key: str, target: Path) -> None:
        """Write the object to the file ``target``; raises ``MissingObject``."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object (nothing happens when it is already gone)."""
        ...

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix`` (a folder, ending in "/")."""
        ...


def _write_atomically(target: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file next to ``target``, then rename it into place,
    so a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStore:
    """Objects as files under one folder (the data directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def put_new(self, key: str, data: bytes) -> bool:
        target = self.path(key)
        if target.exists():
            return False
        _write_atomically(target, lambda f: f.write(data))
        return True

    def upload_new(self, source: Path, key: str) -> bool:
        target = self.path(key)
        if target.exists():
            return False
        with source.open("rb") as src:
            _write_atomically(target, lambda f: shutil.copyfileobj(src, f))
        return True

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError as e:
            raise MissingObject(f"{key} is missing from {self.root}") from e

    def download(self, key: str, target: Path) -> None:
        source = self.path(key)
        if not source.is_file():
            raise MissingObject(f"{key} is missing from {self.root}")
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        folder = self.path(prefix)
        if not folder.is_dir():
            return
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith(".upload."):
                modified = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
                yield StoredObject(path.relative_to(self.root).as_posix(), modified)


class S3Store:
    """Objects in an S3-compatible bucket (AWS S3, MinIO, Ceph...), under a key prefix.

    A write is conditional (``If-None-Match: *``), so "created" is true for exactly one of two
    replicas storing the same photo at once, and only that one may delete it on rollback."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def _key(self, key: str) -> str:
        return self.prefix + key

    def put_new(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
            )
        except ClientError as e:
            if _error_code(e) in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
                return False
            raise
        return True

    def upload_new(self, source: Path, key: str) -> bool:
        return self.put_new(key, source.read_bytes())

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if _error_code(e) in {"NoSuchKey", "404"}:
                raise MissingObject(f"{key} is missing from s3://{self.bucket}") from e
            raise
        data: bytes = response["Body"].read()
        return data

    def download(self, key: str, target: Path) -> None:
        target.write_bytes(self.read(key))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> Iterator[StoredObject]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        )
        for page in pages:
            for item in page.get("Contents", []):
                key = str(item["Key"]).removeprefix(self.prefix)
                yield StoredObject(key, item["LastModified"].astimezone(dt.UTC))


def _error_code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


_SECRETS: dict[tuple[str, str, str], bytes] = {}
_SECRETS_LOCK = threading.Lock()


def shared_secret(settings: Settings, key: str) -> bytes:
    """A random secret generated once into the store under ``key`` (the data directory, or the
    bucket every replica shares), so that all processes sharing the store agree on whichever
    was written first; read once per process."""
    place = (settings.storage_url, str(settings.data_dir.resolve()), key)
    with _SECRETS_LOCK:
        found = _SECRETS.get(place)
        if found is None:
            objects = open_store(settings)
            objects.put_new(key, secrets.token_urlsafe(32).encode())
            found = _SECRETS[place] = objects.read(key).strip()
    return found


def open_store(settings: Settings) -> ObjectStore:
    """The store ``settings.storage_url`` names: empty for the data directory, or
    ``s3://bucket/prefix`` (needs the ``s3`` extra: ``pip install 'whaleid[s3]'``). One per
    process and configuration, shared by every caller: an S3 store's boto3 client (its
    connection pool) is made once."""
    config = (
        settings.data_dir,
        settings.storage_url,
        settings.s3_endpoint_url or None,
        settings.s3_region,
        settings.s3_access_key_id or None,
        settings.s3_secret_access_key.get_secret_value() or None,
    )
    with _STORES_LOCK:
        store = _STORES.get(config)
        if store is None:
            store = _STORES[config] = _make_store(*config)
        return store


_STORES: dict[tuple[Any, ...], ObjectStore] = {}
_STORES_LOCK = threading.Lock()


def _make_store(
    data_dir: Path,
    url: str,
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
) -> ObjectStore:
    if not url:
        return LocalStore(data_dir)
    if not url.startswith("s3://"):
        raise ValueError(f"WHALEID_STORAGE_URL must be empty or s3://bucket/prefix, not {url!r}")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    try:
        import boto3
    except ImportError as e:
        raise RuntimeError(
            f"WHALEID_STORAGE_URL={url} needs boto3: pip install 'whaleid[s3]'"
        ) from e
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
    )
    return S3Store(client, bucket, prefix)
