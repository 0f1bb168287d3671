"""The training configuration: one dataclass, read from a JSON or YAML file and overridden by flags.

Defaults are the paper's recipe (§3): EfficientNet-B5 at 380 px, a 512-d embedding, ArcFace,
16 photos per replica, 30 epochs with warm-up to 8e-5, the kNN head with k = 50 and cutoff 0.62.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.contract import PAPER_HEAD, RANKINGS, Head, PixelRange, Preprocessing, Ranking, Resize
from service.knn import CUTOFF_GRID, K_GRID

BACKBONES = (
    tuple(f"EfficientNetB{i}" for i in range(8))
    + tuple(f"EfficientNetLite{i}" for i in range(5))
    + ("compact",)
)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what to do."""


@dataclass
class Augmentation:
    """§3.2: random crop, colour jitter, grayscale; flipping is off by default because a flipped
    left flank looks like a right flank, which is a different set of marks."""

    crop_min_area: float = 0.65
    crop_aspect: tuple[float, float] = (0.8, 1.25)
    hue: float = 0.04
    saturation: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: float = 0.15
    grayscale: float = 0.2
    hflip: bool = False
    enabled: bool = True


@dataclass
class Schedule:
    """§3.6 / Figure 4: linear warm-up, a short sustain at the peak, exponential decay."""

    start: float = 1e-6
    peak: float = 8e-5
    end: float = 1e-6
    warmup_epochs: float = 6.0
    sustain_epochs: float = 1.0
    decay_until_epoch: float | None = None  # None: the last epoch of training


@dataclass
class TrainConfig:
    """Everything a training run needs; ``output`` is the run folder."""

    output: str = "runs/effb5"
    name: str = "effb5-arcface"
    version: str = "0"
    # data: a Happywhale-style CSV + image folder, or a folder of TFRecord shards (local or gs://)
    catalogue: str | None = None
    images: str | None = None
    shards: str | None = None
    # model
    backbone: str = "EfficientNetB5"
    input_size: int = 380
    weights: str = "none"  # none | imagenet | path to a weights file
    embedding_dim: int = 512
    dropout: float = 0.2
    bn_momentum: float = 0.99  # of the embedding's BatchNorm (Keras' default)
    arcface_scale: float = 30.0
    arcface_margin: float = 0.3
    arcface_subcenters: int = 1  # > 1: sub-center ArcFace (training.layers.ArcFace)
    resize: str = "stretch"
    pixel_range: str = "0-255"
    # optimisation
    epochs: int = 30
    batch_per_replica: int = 16
    steps_per_execution: int = 1  # more (e.g. 32) keeps a TPU busy between host round trips
    steps_per_epoch: int | None = None
    schedule: Schedule = field(default_factory=Schedule)
    augmentation: Augmentation = field(default_factory=Augmentation)
    # fine-tuning a pretrained backbone (training/configs/lite0-small-catalogue.yaml): the first
    # freeze_epochs train only the head, at freeze_lr; then the whole network follows `schedule`,
    # the backbone's layers at backbone_lr_scale x layer_decay ** (blocks below the top)
    freeze_epochs: int = 0
    freeze_lr: float = 1e-3
    backbone_lr_scale: float = 1.0
    layer_decay: float = 1.0
    freeze_batchnorm: bool = False  # keep the backbone's ImageNet BatchNorm statistics
    # stop after this many evaluations without a better val_map5_tuned (0: never); the best
    # epoch's weights are the ones kept
    early_stopping_patience: int = 0
    shuffle_buffer: int = 4096
    cache_decoded: bool = False  # keep decoded photos in memory (small catalogues)
    seed: int = 0
    tpu: str | None = None
    # splits: individuals stay in one fold; a share of validation individuals is held out unseen
    folds: int = 5
    validation_fold: int = 0
    unseen_fraction: float = 0.1
    gallery_fraction: float = 0.5
    train_distractors: int = 2000
    # evaluation and the kNN head
    k: int = PAPER_HEAD.k
    cutoff: float = PAPER_HEAD.cutoff
    ranking: str = str(PAPER_HEAD.ranking)
    k_grid: tuple[int, ...] = K_GRID
    cutoff_grid: tuple[float, ...] = CUTOFF_GRID
    rankings: tuple[str, ...] = ("vote",)
    evaluate_every: int = 1
    snapshots: bool = False  # keep a checkpoint of every epoch (for blending, §3.10)

    @property
    def head(self) -> Head:
        """The kNN head this run evaluates with by default (the grid search may pick another)."""
        return Head(self.k, self.cutoff, Ranking(self.ranking))

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.input_size, Resize(self.resize), PixelRange(self.pixel_range))

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Raise ConfigError for values that cannot work; return self."""
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone={self.backbone!r}: use one of {', '.join(BACKBONES)}")
        if self.resize not in tuple(Resize):
            raise ConfigError(f"resize={self.resize!r}: use one of {', '.join(Resize)}")
        if self.pixel_range not in tuple(PixelRange):
            raise ConfigError(f"pixel_range={self.pixel_range!r}: use {', '.join(PixelRange)}")
        if self.backbone.startswith("EfficientNet") and self.pixel_range != "0-255":
            raise ConfigError(
                "Keras EfficientNets rescale and normalise inside the graph: use pixel_range 0-255"
            )
        for ranking in (self.ranking, *self.rankings):
            if ranking not in RANKINGS:
                raise ConfigError(f"ranking {ranking!r}: use one of {', '.join(RANKINGS)}")
        if (self.catalogue is None) == (self.shards is None):
            raise ConfigError(
                "give the data as either catalogue (a CSV) + images (a folder), or shards "
                "(a folder of TFRecords written by `whaleid-train shards`)"
            )
        if self.catalogue is not None and self.images is None:
            raise ConfigError("catalogue needs images: the folder its image column is relative to")
        if not 0 <= self.validation_fold < self.folds and self.folds > 0:
            raise ConfigError(f"validation_fold must be in 0..{self.folds - 1}")
        if self.input_size < 32 or self.epochs < 0 or self.batch_per_replica < 1:
            raise ConfigError("input_size >= 32, epochs >= 0 and batch_per_replica >= 1, please")
        if not 0 <= self.freeze_epochs <= self.epochs:
            raise ConfigError(f"freeze_epochs must be in 0..epochs ({self.epochs})")
        if self.embedding_dim < 0 or self.arcface_subcenters < 1:
            raise ConfigError("embedding_dim >= 0 (0: the pooled features) and subcenters >= 1")
        if not (0 < self.layer_decay <= 1 and self.backbone_lr_scale > 0):
            raise ConfigError("layer_decay must be in (0, 1] and backbone_lr_scale above 0")
        if self.early_stopping_patience < 0:
            raise ConfigError("early_stopping_patience must be 0 (off) or more")
        return self


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Turn a JSON value into the type of the default it replaces (tuples stay tuples)."""
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _merge(target: Any, values: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"unknown setting {where}{key!r}: known are {', '.join(sorted(names))}"
            )
        current = getattr(target, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(target, key, _coerce(value, current, f"{where}{key}"))


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON file, or YAML when the name ends in .yaml/.yml (needs PyYAML, in the train extra)."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return data


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the file, then ``overrides`` (dotted keys such as ``schedule.peak``)."""
    config = TrainConfig()
    if path is not None:
        _merge(config, read_config_file(path), "")
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition(".")
        _merge(config, {head: {rest: value}} if rest else {key: value}, "")
    return config


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is JSON if it parses, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: write key=value, e.g. --set schedule.peak=1e-3")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    config = TrainConfig()
    _merge(config, values, "")
    return config
