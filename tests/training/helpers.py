"""Shared pieces of the TensorFlow tests: a small synthetic catalogue and a tiny trained run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from training.synthetic import SyntheticCatalogue, write_catalogue


def tiny_config(catalogue: SyntheticCatalogue, output: Path, **overrides: Any) -> Any:
    """A compact-CNN run at 32 px that takes seconds on a CPU."""
    from training.config import load_config

    settings: dict[str, Any] = {
        "output": str(output),
        "name": "tiny",
        "version": "test",
        "catalogue": str(catalogue.catalogue_csv),
        "images": str(catalogue.images),
        "backbone": "compact",
        "input_size": 32,
        "embedding_dim": 16,
        "epochs": 2,
        "batch_per_replica": 8,
        "steps_per_epoch": 3,
        "cache_decoded": True,
        "folds": 3,
        "train_distractors": 10,
        "k_grid": [1, 3, 5, 10, 20, 50, 75, 100],
        "schedule": {
            "start": 1e-4,
            "peak": 1e-3,
            "end": 1e-4,
            "warmup_epochs": 1,
            "sustain_epochs": 0,
        },
    }
    settings.update(overrides)
    return load_config(None, settings)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder (model.keras, summary.json, parity/...) of a tiny model."""
    from training.train import train

    root = tmp_path_factory.mktemp("tiny-run")
    catalogue = write_catalogue(root / "catalogue", individuals=9, photos=4, size=48, seed=3)
    config = tiny_config(catalogue, root / "run")
    summary = train(config)
    assert json.loads((root / "run" / "summary.json").read_text()) == summary
    return root / "run"
