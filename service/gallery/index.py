"""The gallery index: faiss, keyed by embedding row id, saved atomically with a sidecar.

Below ``ivf_threshold`` embeddings the index is exact (``IndexIDMap2`` over ``IndexFlatIP``).
Above it, an ``IndexIVFFlat`` (inner product, its own ids = embedding row ids, so add and remove
work the same) keeps search within budget at a million embeddings; ``nprobe`` is chosen for a
recall@50 of at least 0.98 (see docs/performance.md).

With ``float16`` (``WHALEID_GALLERY_FLOAT16``) both hold the vectors as IEEE half floats
(faiss's ``QT_fp16`` scalar quantizer): half the memory, and an exact scan that reads half the
bytes; distances move by about 1e-3. What the index holds is then the database's vectors
rounded by faiss's encoder (``stored_vectors``), and its digest is of those.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 1


class GalleryFileError(RuntimeError):
    """The index file is missing, stale or corrupt: rebuild it from the stored embeddings."""


def ids_digest(ids: np.ndarray) -> str:
    """A fingerprint of a set of embedding ids (order does not matter)."""
    return hashlib.sha256(np.sort(ids.astype(np.int64)).tobytes()).hexdigest()


FLOAT32, FLOAT16 = "float32", "float16"


def stored_vectors(vectors: np.ndarray, precision: str) -> np.ndarray:
    """``vectors`` as an index of ``precision`` holds them (float32 for either): rounded to half
    floats by faiss's own encoder, whose rounding numpy's conversion does not always match."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if precision == FLOAT32 or len(vectors) == 0:
        return vectors
    quantizer = faiss.ScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16)
    decoded: np.ndarray = quantizer.decode(quantizer.compute_codes(vectors))
    return decoded


@dataclass(frozen=True)
class IndexPlan:
    """Which faiss index a gallery of a given size gets, and how it holds the vectors."""

    kind: str
    nlist: int = 0
    nprobe: int = 0
    vectors: str = FLOAT32

    @classmethod
    def for_size(cls, n: int, ivf_threshold: int, float16: bool = False) -> IndexPlan:
        vectors = FLOAT16 if float16 else FLOAT32
        if n < ivf_threshold:
            return cls("flat", vectors=vectors)
        nlist = int(2 ** round(math.log2(4 * math.sqrt(n))))
        # recall@50 >= 0.98 needs a wide probe: past a photo's own individual, its 50 neighbours
        # are near-ties spread over many lists. Measured (docs/performance.md): up to 2048 lists
        # (below ~520k embeddings) a quarter of them, from 4096 lists on 3/16.
        nprobe = nlist // 4 if nlist <= 2048 else 3 * nlist // 16
        return cls("ivf", nlist=nlist, nprobe=max(16, nprobe), vectors=vectors)


class GalleryIndex:
    """A faiss index of unit vectors searched by inner product; distances are ``1 - cos``."""

    search_threads = 1

    def __init__(self, index: Any, plan: IndexPlan, dim: int) -> None:
        self.index = index
        self.plan = plan
        self.dim = dim
        self._write_lock = threading.Lock()

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray,
        dim: int,
        ivf_threshold: int = 200_000,
        float16: bool = False,
    ) -> GalleryIndex:
        """A new index holding ``vectors`` under ``ids``, of the kind its size calls for."""
        plan = IndexPlan.for_size(len(ids), ivf_threshold, float16)
        half = faiss.ScalarQuantizer.QT_fp16
        index: Any
        if plan.kind == "flat" and plan.vectors == FLOAT16:
            flat = faiss.IndexScalarQuantizer(dim, half, faiss.METRIC_INNER_PRODUCT)
            index = faiss.IndexIDMap2(flat)
        elif plan.kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        else:
            quantizer = faiss.IndexFlatIP(dim)
            if plan.vectors == FLOAT16:  # the vectors themselves, not their residuals
                index = faiss.IndexIVFScalarQuantizer(
                    quantizer, dim, plan.nlist, half, faiss.METRIC_INNER_PRODUCT, False
                )
            else:
                index = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
            sample = vectors[np.random.default_rng(0).permutation(len(vectors))[: plan.nlist * 64]]
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
            index.nprobe = plan.nprobe
        gallery = cls(index, plan, dim)
        gallery.add(ids, vectors)
        return gallery

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        with self._write_lock:
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32),
                np.ascontiguousarray(ids, dtype=np.int64),
            )

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        with self._write_lock:
            return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def ids(self) -> np.ndarray:
        """Every embedding id the index holds."""
        if self.plan.kind == "flat":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        invlists = self.index.invlists
        parts = [
            faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
            for i in range(invlists.nlist)
            if invlists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def contents(self) -> tuple[np.ndarray, np.ndarray]:
        """Every embedding id the index holds and its stored vector, row for row (in the
        index's order, not sorted): what it searches, read back to compare with the database.
        A flat float32 index's vectors are a view of its memory, not a copy; half floats are
        read back as float32."""
        ids = self.ids()
        half = self.plan.vectors == FLOAT16
        if self.plan.kind == "flat":
            flat: Any = faiss.downcast_index(self.index.index)
            if not half:
                xb = faiss.rev_swig_ptr(flat.get_xb(), len(ids) * self.dim)
                return ids, np.asarray(xb, np.float32).reshape(-1, self.dim)
            codes = faiss.vector_to_array(flat.codes)
        else:
            invlists = self.index.invlists
            width = self.dim * (2 if half else 4)  # bytes a vector
            parts = [
                faiss.rev_swig_ptr(invlists.get_codes(i), invlists.list_size(i) * width)
                for i in range(invlists.nlist)
                if invlists.list_size(i)
            ]
            codes = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        vectors = codes.view(np.float16).astype(np.float32) if half else codes.view(np.float32)
        return ids, vectors.reshape(-1, self.dim)

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of one query: (cosine distances ascending, embedding ids).

        ``allowed`` restricts the search to those embedding ids (the caller's filters).
        """
        if k <= 0 or self.count == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        params: Any = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            if self.plan.kind == "ivf":
                # A narrow filter leaves few vectors per list: probe all lists to stay exact.
                nprobe = self.plan.nlist if len(allowed) < self.count // 20 else self.plan.nprobe
                params = faiss.SearchParametersIVF()
                params.nprobe = nprobe
            else:
                params = faiss.SearchParameters()
            params.sel = selector
        # One query gains nothing from OpenMP threads here, and their spinning starves the
        # embedder's pool in the server (docs/performance.md): search on the calling thread.
        # omp_set_num_threads sets the calling thread's value, so index builds keep theirs.
        faiss.omp_set_num_threads(self.search_threads)
        scores, ids = self.index.search(q, k, params=params)
        keep = ids[0] >= 0
        return (1.0 - scores[0][keep]).astype(np.float32), ids[0][keep].astype(np.int64)

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write the index and its sidecar atomically (temporary file, fsync, rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = faiss.serialize_index(self.index).tobytes()
        sidecar = {
            "format": SIDECAR_FORMAT,
            "kind": self.plan.kind,
            "vectors": self.plan.vectors,
            "nlist": self.plan.nlist,
            "nprobe": self.plan.nprobe,
            "dim": self.dim,
            "count": self.count,
            "ids_sha256": ids_digest(self.ids()),
            "file_sha256": hashlib.sha256(data).hexdigest(),
            **meta,
        }
        _atomic_write(path, data)
        _atomic_write(sidecar_path(path), json.dumps(sidecar, indent=2).encode())

    @classmethod
    def load(cls, path: Path) -> tuple[GalleryIndex, dict[str, Any]]:
        """Read an index written by ``save``; ``GalleryFileError`` if missing or corrupt."""
        side = sidecar_path(path)
        if not path.exists() or not side.exists():
            raise GalleryFileError(f"{path} or its sidecar is missing")
        try:
            sidecar = json.loads(side.read_text())
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != sidecar["file_sha256"]:
                raise GalleryFileError(f"{path} does not match its sidecar's checksum")
            index: Any = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            plan = IndexPlan(
                sidecar["kind"],
                sidecar["nlist"],
                sidecar["nprobe"],
                sidecar.get("vectors", FLOAT32),  # files from before half floats: float32
            )
            if plan.kind == "ivf":
                index.nprobe = plan.nprobe
            gallery = cls(index, plan, int(sidecar["dim"]))
        except GalleryFileError:
            raise
        except Exception as e:
            raise GalleryFileError(f"{path} cannot be read: {e}") from e
        if gallery.count != sidecar["count"]:
            raise GalleryFileError(
                f"{path} holds {gallery.count}, its sidecar says {sidecar['count']}"
            )
        return gallery, sidecar


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
