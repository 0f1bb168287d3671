"""Registered ONNX files: published to the object store under their sha256, and fetched by each
replica into its own data directory (a cache) before it loads them."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from service.embedder import file_sha256
from service.settings import Settings
from service.storage import ObjectStore, open_store

log = logging.getLogger(__name__)


class ModelFileCorrupt(RuntimeError):
    """A fetched model file does not have the sha256 it was registered with."""


def model_key(digest: str) -> str:
    """The store key (and the path under the data directory) of the model with ``digest``."""
    return f"models/{digest}.onnx"


def publish_model(objects: ObjectStore, source: Path, digest: str) -> bool:
    """Put ``source`` into the store under its hash; True when this call created the object."""
    return objects.upload_new(source, model_key(digest))


def local_model_file(settings: Settings, key: str, digest: str) -> Path:
    """The model's file in this replica's data directory, fetched from the store by its hash and
    verified first if this replica does not have it yet."""
    target = settings.data_dir / key
    if target.is_file():
        return target
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
