"""Keras -> ONNX export of the embedding sub-model, verified before it is written.

1. Load the training model (``model.keras``) and take its image -> embedding part: the ArcFace head
   and the label input are dropped; the batch axis is dynamic.
2. Convert with tf2onnx and write the ``whaleid.*`` metadata (preprocessing, kNN head, name,
   version, training summary).
3. Verify on real photos, before anything is written at ``out``:
   - TF and ONNX agree on identical input tensors (cosine >= 0.9999, batch of 1 and of all);
   - TF fed as in training (the photo files through the tf.data decode and resize) and the
     service's Embedder fed through ``service.imaging`` as the metadata says agree (cosine >=
     ``service_tolerance``): this catches metadata that does not describe the training input.
   A model that fails is not written; the error says what differed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf

from model_export.metadata import build_metadata, head_from
from model_export.quantize import (
    CALIBRATION_PHOTOS,
    INT8,
    MIN_COSINE,
    QUANTIZATION,
    QuantizationRefused,
    calibration_sample,
    check_int8,
    quantize_int8,
)
from service.contract import PixelRange, Preprocessing
from service.errors import ModelContractError
from service.imaging import IMAGENET_STD, decode_photo, to_model_input
from service.onnx.embedder import Embedder, l2_normalise
from training.augment import decode, model_input
from training.data import MAX_PIXELS, Entry, PhotoSource, upright_bytes
from training.evaluate import prepare
from training.model import embedding_submodel
from training.runs import find_summary, load_model, preprocessing_of
from training.train import RUN_CONFIG, build_validation, run_data

log = logging.getLogger(__name__)

INPUT_NAME = "image"
ONNX_TOLERANCE = 0.9999
SERVICE_TOLERANCE = 0.999
# Training (tf.image.resize) and the service (Pillow) round a resampled pixel differently now
# and then, by one 8-bit step. A network that responds strongly to fine texture, such as a frozen
# ImageNet backbone, turns that into cosines down to about 0.997 on real photos (measured on the
# cow faces with EfficientNet-Lite0). When the inputs agree within that one step, only the
# rounding is at work, and the export accepts cosines down to this floor.
ROUNDING_FLOOR = 0.99
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic"}


class ExportRefused(RuntimeError):
    """The exported model does not reproduce the TensorFlow one; nothing was written."""


@dataclass
class Parity:
    """Per-photo cosine similarities of the two checks."""

    photos: list[str]
    tf_vs_onnx: list[float] = field(default_factory=list)
    tf_vs_service: list[float] = field(default_factory=list)
    input_steps: float = 0.0  # the largest pixel difference of the two inputs, in 8-bit steps

    def describe(self) -> str:
        return (
            f"TF vs ONNX min cosine {min(self.tf_vs_onnx):.7f}, TF (training input) vs service "
            f"embedder min cosine {min(self.tf_vs_service):.7f} (inputs within "
            f"{self.input_steps:.2f} pixel steps) on {len(self.photos)} photos"
        )


def pixel_steps(a: np.ndarray, b: np.ndarray, spec: Preprocessing) -> float:
    """The largest difference of two model inputs, in steps of an 8-bit pixel."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if spec.pixel_range == PixelRange.UNIT:
        diff *= 255.0
    elif spec.pixel_range == PixelRange.IMAGENET:
        diff *= 255.0 * np.asarray(IMAGENET_STD)
    return float(diff.max()) if diff.size else 0.0


def to_onnx(embedder: keras.Model, size: int, opset: int) -> onnx.ModelProto:
    """tf2onnx conversion with a dynamic batch axis named ``batch``."""
    import tf2onnx

    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME),)
    converted = tf2onnx.convert.from_keras(embedder, input_signature=spec, opset=opset)
    proto: onnx.ModelProto = converted[0]
    if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
        raise ExportRefused(
            f"the converted graph has {len(proto.graph.input)} inputs and "
            f"{len(proto.graph.output)} outputs: the contract wants one of each"
        )
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    return proto


def _cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(v) for v in np.sum(l2_normalise(a) * l2_normalise(b), axis=1)]


def _tf_training_input(data: bytes, spec: Preprocessing) -> np.ndarray:
    """The photo as the tf.data pipeline fed it in training (no augmentation)."""
    image = decode(tf.constant(upright_bytes(data)), spec.input_size)
    return np.asarray(model_input(image, spec))


def check_parity(
    embedder: keras.Model,
    onnx_path: Path,
    photos: Sequence[Path],
    *,
    trained_with: Preprocessing,
    service_tolerance: float = SERVICE_TOLERANCE,
) -> Parity:
    """Both checks; raises ExportRefused with what differed."""
    try:
        service = Embedder(onnx_path)
    except ModelContractError as e:
        raise ExportRefused(f"the service would refuse the exported file: {e}") from e
    declared = service.contract.preprocessing
    datas = [p.read_bytes() for p in photos]
    served = np.stack(
        [
            to_model_input(
                decode_photo(d, max_pixels=MAX_PIXELS, target_size=declared.input_size).image,
                declared,
            )
            for d in datas
        ]
    )
    parity = Parity([p.name for p in photos])
    tf_same = embedder(served, training=False).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    onnx_all = session.run(None, {name: served})[0]
    onnx_one = np.concatenate(
        [session.run(None, {name: served[i : i + 1]})[0] for i in range(len(served))]
    )
    parity.tf_vs_onnx = [
        min(a, b)
        for a, b in zip(_cosines(tf_same, onnx_all), _cosines(tf_same, onnx_one), strict=True)
    ]
    worst = int(np.argmin(parity.tf_vs_onnx))
    if parity.tf_vs_onnx[worst] < ONNX_TOLERANCE:
        raise ExportRefused(
            f"TF and ONNX embeddings of the same input differ: cosine "
            f"{parity.tf_vs_onnx[worst]:.6f} < {ONNX_TOLERANCE} on {photos[worst]} (max |diff| "
            f"{float(np.max(np.abs(tf_same - onnx_all))):.3g}); the conversion is not faithful"
        )
    trained = np.stack([_tf_training_input(d, trained_with) for d in datas])
    tf_trained = embedder(trained, training=False).numpy()
    parity.tf_vs_service = _cosines(tf_trained, service.embed(served))
    parity.input_steps = pixel_steps(trained, served, declared)
    worst = int(np.argmin(parity.tf_vs_service))
    rounding_only = trained_with == declared and parity.input_steps <= 1.0 + 1e-4
    limit = min(ROUNDING_FLOOR, service_tolerance) if rounding_only else service_tolerance
    if parity.tf_vs_service[worst] < limit:
        raise ExportRefused(_service_mismatch(parity, worst, photos, trained_with, declared))
    if parity.tf_vs_service[worst] < service_tolerance:
        log.info(
            "TF (training input) vs service cosine %.5f < %s, but the inputs differ by at most "
            "one pixel step: rounding, accepted down to %s",
            parity.tf_vs_service[worst],
            service_tolerance,
            ROUNDING_FLOOR,
        )
    return parity


def _service_mismatch(
    parity: Parity,
    worst: int,
    photos: Sequence[Path],
    trained_with: Preprocessing,
    declared: Preprocessing,
) -> str:
    message = (
        f"the service's embedding of {photos[worst]} differs from TensorFlow's as trained: cosine "
        f"{parity.tf_vs_service[worst]:.6f} < {SERVICE_TOLERANCE} (inputs up to "
        f"{parity.input_steps:.1f} pixel steps apart). "
    )
    if trained_with != declared:
        differing = [
            f"{key} {getattr(trained_with, key)!r} in training but {getattr(declared, key)!r} "
            "in the metadata"
            for key in ("input_size", "resize", "pixel_range")
            if getattr(trained_with, key) != getattr(declared, key)
        ]
        return message + "Preprocessing differs: " + "; ".join(differing) + "."
    return message + (
        f"Both say {declared}: the decoders or resamplers disagree more than expected; "
        "compare the photos' tensors (training.augment.model_input vs service.imaging)."
    )


def default_photos(model_path: Path) -> list[Path]:
    """The run's ``parity/`` folder (real validation photos kept by training)."""
    for folder in (model_path.parent / "parity", model_path.parent.parent / "parity"):
        if folder.is_dir():
            return sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    return []


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: dict[str, str]
    parity: Parity
    seconds: float


def export_model(
    model_path: Path,
    out: Path,
    *,
    photos: Sequence[Path] = (),
    name: str | None = None,
    version: str | None = None,
    head: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    opset: int = 17,
    service_tolerance: float = SERVICE_TOLERANCE,
    quantize: str | None = None,
    calibration_photos: Path | None = None,
    int8_min_cosine: float = MIN_COSINE,
    int8_accept_unjudged: bool = False,
) -> ExportResult:
    """Export ``model_path`` to ``out`` (written only if both parity checks pass).

    ``head`` and ``preprocessing`` override what the run's summary says (k/cutoff/ranking and
    resize/pixel_range); overriding the preprocessing to something training did not do makes the
    second check fail, as it should. ``quantize="int8"`` writes the int8 model instead of the
    fp32 one, calibrated on the run's training photos (or ``calibration_photos``, a folder), and
    only if it passes the gate of ``model_export.quantize`` on the run's validation photos; with
    too few validation queries to judge its MAP@5 it is refused unless ``int8_accept_unjudged``.
    """
    if quantize not in (None, INT8):
        raise ValueError(f"quantize={quantize!r}: only {INT8!r} is supported")
    started = time.perf_counter()
    photos = list(photos) or default_photos(model_path)
    if not photos:
        raise ExportRefused(
            "no photos to verify the export with: pass --photos (a few real photos of the kind "
            "the model was trained on)"
        )
    summary = find_summary(model_path)
    model = load_model(model_path)
    trained_with = preprocessing_of(model, summary)
    declared = replace(trained_with, **(preprocessing or {}))
    chosen = replace(head_from(summary), **(head or {}))
    embedder = embedding_submodel(model)
    metadata = build_metadata(
        spec=declared,
        head=chosen,
        name=name or (summary or {}).get("name") or model_path.stem,
        version=version or str((summary or {}).get("version", "0")),
        summary=summary,
    )
    proto = to_onnx(embedder, declared.input_size, opset)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _save(proto, metadata, tmp)
        parity = check_parity(
            embedder, tmp, photos, trained_with=trained_with, service_tolerance=service_tolerance
        )
        metadata["whaleid.training.export_parity"] = parity.describe()
        _save(proto, metadata, tmp)
        if quantize == INT8:
            del model, embedder  # TensorFlow's part is done: calibration needs the memory
            keras.backend.clear_session()
            metadata = _write_int8(
                tmp,
                out,
                model_path,
                metadata,
                calibration_photos=calibration_photos,
                min_cosine=int8_min_cosine,
                accept_unjudged=int8_accept_unjudged,
            )
        else:
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    log.info(
        "exported %s (%.1f MB) in %.1f s: %s",
        out,
        out.stat().st_size / 1e6,
        seconds,
        parity.describe(),
    )
    return ExportResult(out, metadata, parity, seconds)


def run_folder(model_path: Path) -> Path:
    """The run folder of a model written by training (a checkpoint sits one level down)."""
    for folder in (model_path.parent, model_path.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            return folder
    raise FileNotFoundError(
        f"no {RUN_CONFIG} beside {model_path} or above it: int8 quantization needs the training "
        "run (its validation photos check the int8 model)"
    )


def _calibration_tensors(
    source: PhotoSource,
    train: Sequence[Entry],
    folder: Path | None,
    spec: Preprocessing,
    seed: int,
) -> tuple[np.ndarray, str]:
    """Model input of the calibration photos: ``folder``'s, else a sample of the run's training
    photos (the validation photos stay held out for the check)."""
    if folder is not None:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        if not files:
            raise ExportRefused(f"no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {folder}")
        datas = [p.read_bytes() for p in files]
        where = f"{len(datas)} photos of {folder.name}/"
    else:
        entries = calibration_sample(list(train), CALIBRATION_PHOTOS, seed)
        datas = [data for _, data in source.read(entries)]
        where = f"{len(datas)} training photos of the run"
    return np.stack([prepare(d, spec) for d in datas]), where


def _write_int8(
    fp32: Path,
    out: Path,
    model_path: Path,
    metadata: dict[str, str],
    *,
    calibration_photos: Path | None,
    min_cosine: float,
    accept_unjudged: bool,
) -> dict[str, str]:
    """Quantize the verified fp32 file, check it, and write it at ``out``; its metadata."""
    config, source, split = run_data(run_folder(model_path))
    validation = build_validation(source, split, config)
    if validation is None:
        raise ExportRefused(
            "int8 quantization needs the run's validation photos to check the int8 model, and "
            "this run has none (folds: 1): train with validation, or export fp32"
        )
    contract = Embedder(fp32).contract
    tensors, where = _calibration_tensors(
        source, split.train, calibration_photos, contract.preprocessing, config.seed
    )
    quantized = out.with_name(f".{out.name}.{os.getpid()}.int8.tmp")
    try:
        quantize_int8(fp32, quantized, tensors)
        int8_metadata = {
            **metadata,
            "whaleid.version": f"{metadata['whaleid.version']}-int8",
            "whaleid.training.quantization": f"{QUANTIZATION}, calibrated on {where}",
        }
        proto = onnx.load(str(quantized))
        _save(proto, int8_metadata, quantized)
        try:
            check = check_int8(
                fp32,
                quantized,
                validation,
                k=contract.head.k,
                cutoff=contract.head.cutoff,
                ranking=contract.head.ranking,
                min_cosine=min_cosine,
                accept_unjudged=accept_unjudged,
            )
        except QuantizationRefused as e:
            raise ExportRefused(str(e)) from e
        int8_metadata.update(check.metadata())
        _save(proto, int8_metadata, quantized)
        os.replace(quantized, out)
    finally:
        quantized.unlink(missing_ok=True)
    return int8_metadata


def _save(proto: onnx.ModelProto, metadata: dict[str, str], path: Path) -> None:
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
