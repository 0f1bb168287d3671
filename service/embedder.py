"""The ONNX embedder: reads the model contract from the file's metadata and embeds photos."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.knn import RANKINGS, Ranking
from service.modelfiles import local_model_file
from service.photos import PixelRange, Preprocessing, Resize
from service.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_K = 50
DEFAULT_CUTOFF = 0.62
RESIZES: tuple[Resize, ...] = ("stretch", "letterbox")
PIXEL_RANGES: tuple[PixelRange, ...] = ("0-255", "0-1", "imagenet")


class ModelContractError(ValueError):
    """An ONNX file that does not follow the model contract; the message says what to fix."""


@dataclass(frozen=True)
class ModelContract:
    """What the service needs to know about a model, read from ``whaleid.*`` metadata."""

    name: str
    version: str
    preprocessing: Preprocessing
    k: int = DEFAULT_K
    cutoff: float = DEFAULT_CUTOFF
    ranking: Ranking = "vote"
    training: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, props: dict[str, str], *, fallback_name: str) -> ModelContract:
        """Parse ``metadata_props``; missing optional keys take the documented defaults."""
        if "whaleid.input_size" not in props:
            raise ModelContractError(
                "the model has no whaleid.input_size metadata: export it with model_export, or "
                "add metadata_props whaleid.input_size (e.g. '380') to the ONNX file"
            )
        try:
            size = int(props["whaleid.input_size"])
            k = int(props.get("whaleid.k", DEFAULT_K))
            cutoff = float(props.get("whaleid.cutoff", DEFAULT_CUTOFF))
        except ValueError as e:
            raise ModelContractError(f"a whaleid.* metadata value is not a number: {e}") from e
        resize = props.get("whaleid.resize", "stretch")
        pixel_range = props.get("whaleid.pixel_range", "0-255")
        ranking = props.get("whaleid.ranking", "vote")
        _check_choice("whaleid.resize", resize, RESIZES)
        _check_choice("whaleid.pixel_range", pixel_range, PIXEL_RANGES)
        _check_choice("whaleid.ranking", ranking, RANKINGS)
        if size <= 0 or k <= 0 or not 0.0 <= cutoff <= 2.0:
            raise ModelContractError(
                f"whaleid.input_size={size}, whaleid.k={k}, whaleid.cutoff={cutoff}: size and k "
                "must be positive and the cutoff a cosine distance in [0, 2]"
            )
        return cls(
            name=props.get("whaleid.name", fallback_name),
            version=props.get("whaleid.version", "0"),
            preprocessing=Preprocessing(size, resize, pixel_range),  # type: ignore[arg-type]
            k=k,
            cutoff=cutoff,
            ranking=ranking,  # type: ignore[arg-type]
            training={k_: v for k_, v in props.items() if k_.startswith("whaleid.training.")},
        )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ModelContractError(f"{key}={value!r} is not one of {', '.join(choices)}")


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
    def for_model(cls, settings: Settings, file_path: str, *, spinning: bool = True) -> Embedder:
        """The embedder of a registered model (``Model.file_path``), with the thread count and
        batch size from ``settings``; the file is fetched from the model store first if this
        replica lacks it (``service.modelfiles``)."""
        return cls(
            local_model_file(settings, file_path),
            threads=settings.onnx_threads,
            max_batch_size=settings.embed_batch_size,
            spinning=spinning,
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
