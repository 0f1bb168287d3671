"""The ONNX embedder: reads the model contract from the file's metadata and embeds photos."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.contract import BUILTIN_PREFIX, Head, ModelContract, ModelKind, Preprocessing
from service.errors import ModelContractError
from service.onnx.files import local_model_file
from service.settings import Settings

log = logging.getLogger(__name__)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return result


class Embedder:
    """One onnxruntime session for one model; thread-safe for concurrent ``embed`` calls."""

    def __init__(
        self, path: Path, *, threads: int = 0, max_batch_size: int = 16, spinning: bool = True
    ) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            # Idle onnxruntime threads spin by default; a background job turns that off so its
            # decoding threads (and /identify in the same process) get the cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise ModelContractError(f"{path} is not a loadable ONNX model: {e}") from e
        meta = self.session.get_modelmeta()
        self.contract = ModelContract.from_metadata(
            dict(meta.custom_metadata_map), fallback_name=path.stem
        )
        self.max_batch_size = max_batch_size
        self.dim = self._check_shapes(path)

    @classmethod
    def for_model(
        cls, settings: Settings, file_path: str, *, spinning: bool | None = None
    ) -> Embedder:
        """The embedder of a registered model (``Model.file_path``), with the thread count, batch
        size and spinning from ``settings``; the file is fetched from the model store first if this
        replica lacks it (``service.onnx.files``). A built-in matcher gets its stand-in."""
        if file_path.startswith(BUILTIN_PREFIX):
            return ThumbnailEmbedder.builtin(file_path, max_batch_size=settings.embed_batch_size)
        return cls(
            local_model_file(settings, file_path),
            threads=settings.onnx_threads,
            max_batch_size=settings.embed_batch_size,
            spinning=settings.onnx_spinning if spinning is None else spinning,
        )

    def _check_shapes(self, path: Path) -> int:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelContractError(f"{path} must have one input and one output")
        shape: list[Any] = list(inputs[0].shape)
        if len(shape) != 4 or shape[3] not in (3, "3"):
            raise ModelContractError(
                f"{path}: the input must be NHWC [batch, H, W, 3], not {shape}"
            )
        out_shape: list[Any] = list(outputs[0].shape)
        if len(out_shape) != 2:
            raise ModelContractError(
                f"{path}: the output must be 2-D [batch, D] embeddings, not {out_shape}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        if isinstance(out_shape[1], int):
            return out_shape[1]
        size = self.contract.preprocessing.input_size
        probe = np.zeros((1, size, size, 3), dtype=np.float32)
        return int(self.session.run([self.output_name], {self.input_name: probe})[0].shape[1])

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings of an NHWC batch, cut into ``max_batch_size`` pieces."""
        pieces = []
        for start in range(0, len(batch), self.max_batch_size):
            chunk = np.ascontiguousarray(batch[start : start + self.max_batch_size], np.float32)
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            pieces.append(np.asarray(out, dtype=np.float32))
        if not pieces:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalise(np.concatenate(pieces))


class ThumbnailEmbedder(Embedder):
    """The built-in ``local-features`` matcher's stand-in for an embedding: the photo's grey
    levels at 16 x 16, centred and normalised (256 numbers, no model file). It gives the matcher
    a gallery like any model's (its rows, filters, change log, re-index and switch); the matcher
    answers from local features (``service.matching.local``) and uses this only to name further
    individuals when the features name fewer than five."""

    SIZE = 16

    def __init__(self, *, name: str, max_batch_size: int = 16) -> None:  # no ONNX session
        self.contract = ModelContract(
            name=name,
            version="v1",
            preprocessing=Preprocessing(self.SIZE),
            # The head only orders the stand-in's fill; new_individual is the features' call.
            head=Head(k=50, cutoff=2.0),
        )
        self.max_batch_size = max_batch_size
        self.dim = self.SIZE * self.SIZE

    @classmethod
    def builtin(cls, file_path: str, *, max_batch_size: int = 16) -> ThumbnailEmbedder:
        kind = file_path.removeprefix(BUILTIN_PREFIX)
        if kind != ModelKind.LOCAL_FEATURES:
            raise ModelContractError(
                f"unknown built-in matcher {kind!r}: the one built in is "
                f"{BUILTIN_PREFIX}{ModelKind.LOCAL_FEATURES}"
            )
        return cls(name=kind, max_batch_size=max_batch_size)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        grey = np.asarray(batch, np.float32).mean(axis=3).reshape(len(batch), -1)
        return l2_normalise(grey - grey.mean(axis=1, keepdims=True))
