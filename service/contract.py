"""The model contract: what an exported ONNX model tells the service about itself, in one place.

Training writes it (``to_metadata``), export checks it, and the service reads it
(``from_metadata``): the preprocessing a photo needs, the kNN head (k, cutoff, ranking) and the
model's name and version, as ``whaleid.*`` strings in the ONNX file's ``metadata_props``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, Protocol, TypeVar

from service.errors import ModelContractError


class _Choice(StrEnum):
    """A closed set of strings that reads as its value in messages (``'vote'``, not
    ``<Ranking.VOTE: 'vote'>``)."""

    def __repr__(self) -> str:
        return repr(self.value)


class Ranking(_Choice):
    """How the kNN head orders individuals: most votes first (the paper), or nearest first."""

    VOTE = "vote"
    NEAREST = "nearest"


class Resize(_Choice):
    STRETCH = "stretch"
    LETTERBOX = "letterbox"


class PixelRange(_Choice):
    """``0-255``: Keras EfficientNets normalise inside the graph; ``imagenet``: mean/std."""

    BYTES = "0-255"
    UNIT = "0-1"
    IMAGENET = "imagenet"


class ModelStatus(_Choice):
    """A registered model's lifecycle: registered → indexing → ready → active → retired."""

    REGISTERED = "registered"
    INDEXING = "indexing"
    READY = "ready"
    ACTIVE = "active"
    RETIRED = "retired"


RANKINGS: tuple[Ranking, ...] = tuple(Ranking)
E = TypeVar("E", bound=StrEnum)


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: the one description training, export and serving share."""

    input_size: int
    resize: Resize = Resize.STRETCH
    pixel_range: PixelRange = PixelRange.BYTES


@dataclass(frozen=True)
class Head:
    """The kNN head's per-model settings: ``k`` neighbours, the ``new_individual`` cutoff (a
    cosine distance) and the ranking."""

    k: int = 50
    cutoff: float = 0.62
    ranking: Ranking = Ranking.VOTE

    @classmethod
    def of(cls, row: HasHead) -> Head:
        """The head a registered model answers with (its row, which an activation may change)."""
        return cls(int(row.k), float(row.cutoff), Ranking(row.ranking))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, default: Head | None = None) -> Head:
        """A head written as ``{"k", "cutoff", "ranking"}`` (a run summary, a report, a request);
        a key it lacks takes ``default``'s value (the paper's head unless given). Other keys,
        such as a grid cell's scores, are ignored."""
        base = default or PAPER_HEAD
        data = data or {}
        return cls(
            int(data.get("k", base.k)),
            float(data.get("cutoff", base.cutoff)),
            Ranking(data.get("ranking", base.ranking)),
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``from_dict`` reads back (ranking as its plain string)."""
        return {"k": self.k, "cutoff": self.cutoff, "ranking": str(self.ranking)}


class HasHead(Protocol):
    """Anything carrying a head's three fields, such as a model row."""

    k: Any
    cutoff: Any
    ranking: Any


PAPER_HEAD = Head()  # the seed paper's head: k 50, cutoff 0.62, vote


class Verification(_Choice):
    """The built-in verification modes, a model's second look at its candidates: ``none``
    (the kNN head's answer as it is) or ``rerank`` (the top candidates verified with local
    features, re-ranked on the fused score, ``service.matching.verify``). Which modes exist is
    ``service.matching.registry``'s list: these are the names of the built-in ones."""

    NONE = "none"
    RERANK = "rerank"


class ModelKind(_Choice):
    """The built-in model kinds: an ONNX embedding model, or the built-in ``local-features``
    matcher (no trained model: RootSIFT descriptors voted per individual, then verified).
    ``service.matching.registry`` lists the kinds and the matchers each answers with."""

    ONNX = "onnx"
    LOCAL_FEATURES = "local-features"


BUILTIN_PREFIX = "builtin:"  # ``Model.file_path`` of a built-in matcher: ``builtin:local-features``


# How an individual's photos make its inlier evidence (``Calibration.aggregation``).
AGGREGATIONS = ("max", "best-two", "mix")


def _logistic(pair: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    values = tuple(float(v) for v in pair) if pair is not None else default
    if len(values) != len(default) or not all(abs(v) < 1e6 for v in values):
        raise ValueError(f"expected {len(default)} finite coefficients, not {pair!r}")
    return values


@dataclass(frozen=True)
class Calibration:
    """How the evidence on one candidate becomes one match probability.

    ``d`` is the embedding distance of the candidate's nearest photo, ``n`` the most RANSAC
    inliers any of its photos had with the query. Each matcher is calibrated by a logistic
    (Platt) curve, ``p = 1 / (1 + exp(-(a + b * x)))`` with ``x = d`` for the global model and
    ``x = log(1 + n)`` for local features; the fused probability is one logistic over both,
    ``w0 + w1 * d + w2 * log(1 + n)``. A candidate whose probability is below ``threshold`` is
    ranked after ``new_individual`` (0.5 by default; a fit on labelled queries chooses it for
    the best MAP@5 there). The defaults put the global curve's midpoint at the model's
    cutoff and need 9 inliers for an even chance; ``whaleid models calibrate`` fits all
    three on labelled queries, on the curators' confirmations, or on the pairs the gallery's
    own queries give (``models.openset``).

    ``aggregation`` says how an individual's photos make its inlier evidence
    (``AGGREGATIONS``): ``max`` (the default, and every calibration stored before it existed:
    ``n`` is its best photo's inliers), ``best-two`` (``n`` is the sum of its best two photos'
    inliers), or ``mix`` (a learned logistic over the distance, the best and second best
    photos' ``log(1 + n)`` and ``log(1 + m)``, ``m`` the photos with any inlier: ``mix`` with
    the distance, ``mix_local`` without it; absent, the ``max`` curves answer)."""

    global_: tuple[float, float]
    local: tuple[float, float] = (-1.5 * math.log1p(9), 1.5)  # an even chance at 9 inliers
    fused: tuple[float, float, float] | None = None
    threshold: float = 0.5
    fitted: Mapping[str, Any] = field(default_factory=dict)
    aggregation: str = "max"
    mix: tuple[float, ...] | None = None  # w0 + w . (d, x1, x2, xm)
    mix_local: tuple[float, ...] | None = None  # w0 + w . (x1, x2, xm)

    @classmethod
    def default(cls, cutoff: float) -> Calibration:
        return cls(global_=(10.0 * cutoff, -10.0))

    @cached_property
    def version(self) -> str:
        """The calibration's version, recorded with each identification it scored: the first
        12 hex digits of the SHA-256 of its stored form (``as_dict`` as sorted JSON). Any
        change (a refit, a new threshold, another cutoff for the defaults) is a new version."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def fused_weights(self) -> tuple[float, float, float]:
        if self.fused is not None:
            return self.fused
        a_g, b_g = self.global_
        a_l, b_l = self.local
        return (a_g + a_l, b_g, b_l)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, cutoff: float) -> Calibration:
        """The calibration stored with a model (``Model.calibration``), or the defaults."""
        base = cls.default(cutoff)
        if not data:
            return base
        g = _logistic(data.get("global"), base.global_)
        loc = _logistic(data.get("local"), base.local)
        fused = data.get("fused")
        threshold = float(data.get("threshold", base.threshold))
        if not 0.0 < threshold < 1.0:
            raise ValueError(
                f"the calibration threshold is a probability in (0, 1), not {threshold}"
            )
        aggregation = str(data.get("aggregation", "max"))
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {aggregation!r}: one of {', '.join(AGGREGATIONS)}")
        mix, mix_local = data.get("mix"), data.get("mix_local")
        return cls(
            global_=(g[0], g[1]),
            local=(loc[0], loc[1]),
            fused=None if fused is None else _three(_logistic(fused, (0.0, 0.0, 0.0))),
            threshold=threshold,
            fitted=dict(data.get("fitted") or {}),
            aggregation=aggregation,
            mix=None if mix is None else _logistic(mix, (0.0,) * 5),
            mix_local=None if mix_local is None else _logistic(mix_local, (0.0,) * 4),
        )

    def as_dict(self) -> dict[str, Any]:
        """The stored form. The aggregation and its mix only where not ``max``: a calibration
        stored before they existed keeps its form and its version."""
        out: dict[str, Any] = {
            "global": list(self.global_),
            "local": list(self.local),
            "fused": list(self.fused_weights),
            "threshold": self.threshold,
            "fitted": dict(self.fitted),
        }
        if self.aggregation != "max":
            out["aggregation"] = self.aggregation
        if self.mix is not None:
            out["mix"] = list(self.mix)
        if self.mix_local is not None:
            out["mix_local"] = list(self.mix_local)
        return out


def calibration_shown(
    stored: Mapping[str, Any], *, distance: bool, inliers: bool
) -> dict[str, Any]:
    """A stored calibration (``Calibration.as_dict``) as shown for a model whose matchers give
    a ``distance`` (the kNN head) and, or, ``inliers`` (local features): only the curves of
    the evidence it has (no ``global`` curve for the local-features matcher, which has no
    distance: its defaults are a placeholder)."""
    drop = set()
    if not distance:
        drop |= {"global", "fused", "mix"}
    if not inliers:
        drop |= {"local", "fused", "mix", "mix_local", "aggregation"}
    return {k: v for k, v in stored.items() if k not in drop}


def _three(values: tuple[float, ...]) -> tuple[float, float, float]:
    return (values[0], values[1], values[2])


_PREFIX = "whaleid."
_TRAINING = "whaleid.training."


@dataclass(frozen=True)
class ModelContract:
    """What the service needs to know about a model, read from ``whaleid.*`` metadata."""

    name: str
    version: str
    preprocessing: Preprocessing
    head: Head = PAPER_HEAD
    training: dict[str, str] = field(default_factory=dict)  # whaleid.training.* as written

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
            k = int(props.get("whaleid.k", PAPER_HEAD.k))
            cutoff = float(props.get("whaleid.cutoff", PAPER_HEAD.cutoff))
        except ValueError as e:
            raise ModelContractError(f"a whaleid.* metadata value is not a number: {e}") from e
        if size <= 0 or k <= 0 or not 0.0 <= cutoff <= 2.0:
            raise ModelContractError(
                f"whaleid.input_size={size}, whaleid.k={k}, whaleid.cutoff={cutoff}: size and k "
                "must be positive and the cutoff a cosine distance in [0, 2]"
            )
        return cls(
            name=props.get("whaleid.name", fallback_name),
            version=props.get("whaleid.version", "0"),
            preprocessing=Preprocessing(
                size,
                _choice(props, "whaleid.resize", Resize, Resize.STRETCH),
                _choice(props, "whaleid.pixel_range", PixelRange, PixelRange.BYTES),
            ),
            head=Head(k, cutoff, _choice(props, "whaleid.ranking", Ranking, Ranking.VOTE)),
            training={k_: v for k_, v in props.items() if k_.startswith(_TRAINING)},
        )

    def to_metadata(self) -> dict[str, str]:
        """The ``metadata_props`` that ``from_metadata`` reads back to this contract."""
        spec, head = self.preprocessing, self.head
        return {
            "whaleid.input_size": str(spec.input_size),
            "whaleid.resize": str(spec.resize),
            "whaleid.pixel_range": str(spec.pixel_range),
            "whaleid.k": str(head.k),
            "whaleid.cutoff": f"{head.cutoff:g}",
            "whaleid.ranking": str(head.ranking),
            "whaleid.name": self.name,
            "whaleid.version": self.version,
            **{k: v for k, v in self.training.items() if k.startswith(_TRAINING)},
        }


def _choice(props: dict[str, str], key: str, kind: type[E], default: E) -> E:
    value = props.get(key, str(default))
    try:
        return kind(value)
    except ValueError:
        raise ModelContractError(
            f"{key}={value!r} is not one of {', '.join(str(v) for v in kind)}"
        ) from None
