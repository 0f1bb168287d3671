"""Registered ONNX files: published to the object store under their sha256, and fetched by each
replica into its own data directory (a cache) before it loads them."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from service.errors import ModelFileCorrupt
from service.settings import Settings
from service.store.objects import ObjectStore, open_store

log = logging.getLogger(__name__)


def model_key(digest: str) -> str:
    """The store key (and the path under the data directory) of the model with ``digest``:
    ``Model.file_path``."""
    return f"models/{digest}.onnx"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def publish_model(objects: ObjectStore, source: Path, digest: str) -> bool:
    """Put ``source`` into the store under its hash; True when this call created the object."""
    return objects.upload_new(source, model_key(digest))


def local_model_file(settings: Settings, key: str) -> Path:
    """The model's file in this replica's data directory. A replica that lacks it fetches it from
    the store and checks its sha256 (the key names it, see ``model_key``) before renaming it into
    place, so a half-fetched or altered file is never loaded."""
    target = settings.data_dir / key
    if target.is_file():
        return target
    digest = Path(key).name.removesuffix(".onnx")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".fetch.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        open_store(settings).download(key, tmp)
        actual = file_sha256(tmp)
        if actual != digest:
            raise ModelFileCorrupt(
                f"{key} in {settings.storage_url or settings.data_dir} has sha256 {actual}, not "
                f"the registered {digest}: register the model again with `whaleid models add`"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("fetched model file %s from %s", key, settings.storage_url)
    return target
