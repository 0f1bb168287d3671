"""Static int8 quantization of an exported model, and the gate it must pass to be written.

onnxruntime's quantization tools rewrite the fp32 graph in QDQ form: weights int8 per output
channel, activations uint8 per tensor with ranges calibrated (min/max) on real photos fed
through the service's preprocessing. Dynamic quantization (``ConvInteger``) is not used: it runs
several times slower than fp32 on a CPU.

The int8 model is accepted only if, on held-out photos (the run's validation photos, never used
for calibration),
- every photo's int8 embedding is within ``min_cosine`` of its fp32 embedding, and
- validation MAP@5 through the serving path (``service.photos`` → the service's ``Embedder`` →
  exact search → ``service.knn``) with the model's own head is not shown to drop by more than
  ``max_map5_drop``: compared query by query, with a bootstrap interval, and only on enough
  queries to tell a drop from noise (``model_export.map5_drop``). On fewer, the model is
  refused as unjudged unless the caller accepts it on the cosine check alone.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from model_export.map5_drop import MAX_MAP5_DROP, MIN_QUERIES, Map5Drop, Verdict, judge_map5_drop
from service.contract import Ranking
from training.evaluate import Scores, Validation, average_precisions, onnx_embed, score

log = logging.getLogger(__name__)
T = TypeVar("T")

INT8 = "int8"
MIN_COSINE = 0.98
CALIBRATION_PHOTOS = 64
CALIBRATION_BATCH = 4
QUANTIZATION = (
    "int8 static QDQ (onnxruntime): weights int8 per channel, activations uint8 per tensor, "
    "min/max calibration"
)


class QuantizationRefused(RuntimeError):
    """The int8 model is not close enough to the fp32 one; nothing was written."""


class _Batches(CalibrationDataReader):  # type: ignore[misc]
    """Model-input tensors in batches, as onnxruntime's calibrator wants them; ``set_range``
    lets it take them a few at a time (``CalibStridedMinMax``)."""

    def __init__(self, input_name: str, tensors: np.ndarray) -> None:
        self.input_name = input_name
        self.batches = [
            tensors[i : i + CALIBRATION_BATCH] for i in range(0, len(tensors), CALIBRATION_BATCH)
        ]
        self.window: Iterator[np.ndarray] = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.window = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.window, None)
        return None if batch is None else {self.input_name: batch}


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Write the int8 QDQ version of ``fp32`` at ``out``, calibrated on ``calibration`` (NHWC
    model input, as the service feeds it). Metadata is not carried over: the caller sets it."""
    if not len(calibration):
        raise QuantizationRefused("no calibration photos")
    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="whaleid-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # shape inference and graph fusions first, as onnxruntime recommends before quantizing
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            _Batches(input_name, calibration.astype(np.float32)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # onnxruntime keeps every intermediate tensor of the batches it is given until it
            # computes their ranges (gigabytes per batch for a B5 at 380 px): one batch at a time
            extra_options={"CalibStridedMinMax": 1},
        )


@dataclass(frozen=True)
class Int8Check:
    """How close the int8 model stays to the fp32 one on held-out photos."""

    photos: int
    min_cosine: float
    mean_cosine: float
    fp32: Scores
    int8: Scores
    drop: Map5Drop

    def describe(self) -> str:
        return (
            f"int8 vs fp32 cosine min {self.min_cosine:.5f} / mean {self.mean_cosine:.5f} on "
            f"{self.photos} held-out photos; validation MAP@5 {self.int8.map5:.4f} int8 against "
            f"{self.fp32.map5:.4f} fp32 ({self.int8.queries} queries); {self.drop.describe()}"
        )

    def metadata(self) -> dict[str, str]:
        """What the int8 model's ``whaleid.training.*`` metadata says of this check."""
        verdict = f"{self.drop.verdict}: {self.drop.reason()}"
        if self.drop.verdict is Verdict.UNJUDGED:
            verdict += ", written on the cosine check alone"
        return {
            "whaleid.training.int8_check": self.describe(),
            "whaleid.training.int8_val_map5": f"{self.int8.map5:.4f}",
            "whaleid.training.fp32_val_map5": f"{self.fp32.map5:.4f}",
            "whaleid.training.int8_val_queries": str(self.drop.queries),
            "whaleid.training.int8_map5_drop": f"{self.drop.mean:+.4f}",
            "whaleid.training.int8_map5_drop_interval": self.drop.interval(),
            "whaleid.training.int8_map5_verdict": verdict,
        }


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # both come L2-normalised from the service's Embedder
    result: np.ndarray = np.sum(a * b, axis=1)
    return result


def _scored(
    validation: Validation,
    gallery: np.ndarray,
    queries: np.ndarray,
    *,
    k: int,
    cutoff: float,
    ranking: Ranking,
) -> tuple[Scores, np.ndarray]:
    """MAP@5 and each query's AP@5, from one set of predictions."""
    predictions = validation.predictions(gallery, queries, k=k, cutoff=cutoff, ranking=ranking)
    truths = validation.truths
    return score(predictions, truths), average_precisions(predictions, truths)


def check_int8(
    fp32: Path,
    int8: Path,
    validation: Validation,
    *,
    k: int,
    cutoff: float,
    ranking: Ranking,
    min_cosine: float = MIN_COSINE,
    max_map5_drop: float = MAX_MAP5_DROP,
    min_queries: int = MIN_QUERIES,
    accept_unjudged: bool = False,
) -> Int8Check:
    """Compare the two files through the service's embedder; raise QuantizationRefused when the
    int8 one strays too far, or when there are too few queries to judge its MAP@5 and
    ``accept_unjudged`` is not set."""
    fp32_embed, _ = onnx_embed(fp32)
    int8_embed, _ = onnx_embed(int8)
    fp32_gallery, fp32_queries = validation.embeddings(fp32_embed)
    int8_gallery, int8_queries = validation.embeddings(int8_embed)
    cos = _cosines(
        np.concatenate([fp32_gallery, fp32_queries]), np.concatenate([int8_gallery, int8_queries])
    )
    fp32_scores, fp32_ap = _scored(
        validation, fp32_gallery, fp32_queries, k=k, cutoff=cutoff, ranking=ranking
    )
    int8_scores, int8_ap = _scored(
        validation, int8_gallery, int8_queries, k=k, cutoff=cutoff, ranking=ranking
    )
    check = Int8Check(
        photos=len(cos),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        fp32=fp32_scores,
        int8=int8_scores,
        drop=judge_map5_drop(fp32_ap, int8_ap, allowed=max_map5_drop, min_queries=min_queries),
    )
    log.info("int8 check: %s", check.describe())
    enforce(check, min_cosine=min_cosine, accept_unjudged=accept_unjudged)
    return check


def enforce(check: Int8Check, *, min_cosine: float, accept_unjudged: bool = False) -> None:
    """Raise QuantizationRefused, saying why and what to do, unless ``check`` passes: the cosine
    first, then the MAP@5 verdict (an unjudged one passes only with ``accept_unjudged``)."""
    if check.min_cosine < min_cosine:
        raise QuantizationRefused(
            f"int8 embeddings stray from fp32: cosine {check.min_cosine:.5f} < {min_cosine} on "
            f"a held-out photo ({check.describe()}); calibrate on more, or more typical, photos "
            "(--calibration-photos), or keep the fp32 model"
        )
    drop = check.drop
    if drop.verdict is Verdict.REFUSED:
        raise QuantizationRefused(
            f"int8 loses validation MAP@5: {check.int8.map5:.4f} against {check.fp32.map5:.4f} "
            f"fp32, a drop of {drop.mean:+.4f} whose {drop.interval()} over {drop.queries} "
            f"queries lies wholly above the allowed {drop.allowed} ({check.describe()}); keep "
            "the fp32 model"
        )
    if drop.verdict is Verdict.UNJUDGED:
        if not accept_unjudged:
            raise QuantizationRefused(
                f"too few validation queries to judge int8's MAP@5: {drop.queries} < "
                f"{drop.min_queries}, where one query moves MAP@5 by up to {1 / drop.queries:.3f} "
                f"({check.describe()}); validate on more photos (a run whose validation fold "
                "holds more queries), or write it on the cosine check alone with "
                "--int8-accept-unjudged, or keep the fp32 model"
            )
        log.warning(
            "int8 MAP@5 not judged (%d queries < %d): written on the cosine check alone",
            drop.queries,
            drop.min_queries,
        )


def calibration_sample(photos: Sequence[T], count: int, seed: int) -> list[T]:
    """Up to ``count`` photos, a seeded sample so that a re-export calibrates alike."""
    if len(photos) <= count:
        return list(photos)
    picked = np.random.default_rng(seed).choice(len(photos), count, replace=False)
    return [photos[int(i)] for i in sorted(picked)]
