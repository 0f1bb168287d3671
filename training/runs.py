"""Reading what a training run left behind: its summary and the model's input description."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras

from service.contract import Preprocessing
from training.model import embedding_submodel

SUMMARY = "summary.json"


def find_summary(model_path: Path) -> dict[str, Any] | None:
    """``summary.json`` of the run folder the model lives in (a checkpoint sits one level down)."""
    for folder in (model_path.parent, model_path.parent.parent):
        path = folder / SUMMARY
        if path.is_file():
            data: dict[str, Any] = json.loads(path.read_text())
            return data
    return None


def load_model(path: Path) -> keras.Model:
    """A ``.keras`` file written by training (its custom layers come from ``training.layers``)."""
    import training.layers  # noqa: F401  (registers ArcFace and PaperSchedule)

    model: keras.Model = keras.models.load_model(path, compile=False)
    return model


def input_size_of(model: keras.Model) -> int:
    shape = embedding_submodel(model).input_shape
    if shape[1] is None or shape[1] != shape[2]:
        raise ValueError(f"the model input must be square with a fixed size, not {shape}")
    return int(shape[1])


def preprocessing_of(model: keras.Model, summary: dict[str, Any] | None) -> Preprocessing:
    """How the model was fed in training: the run summary's description, else the defaults
    (stretch, 0-255) at the model's input size."""
    size = input_size_of(model)
    described = (summary or {}).get("preprocessing", {})
    if described and int(described["input_size"]) != size:
        raise ValueError(
            f"the run summary says input_size {described['input_size']} but the model takes {size}"
        )
    return Preprocessing(
        size, described.get("resize", "stretch"), described.get("pixel_range", "0-255")
    )
