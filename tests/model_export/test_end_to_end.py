"""Synthetic catalogue -> train a small model -> export -> import into the service -> evaluate.

Training holds out a quarter of the individuals to choose k and the cutoff, which the export
carries into the model's metadata. The service's gallery is the whole catalogue (so a quarter of
its individuals were never trained on); the queries are photos the model never saw, of catalogued
individuals and of individuals the catalogue does not hold (right answer: new_individual).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")

from model_export.export import export_model  # noqa: E402
from service.catalogue.imports import CatalogueImport  # noqa: E402
from service.db.tables import make_engine, make_sessionmaker  # noqa: E402
from service.matching.identify import Identifier  # noqa: E402
from service.models.evaluation import evaluate  # noqa: E402
from service.models.registry import register_model  # noqa: E402
from service.models.switch import activate_model  # noqa: E402
from service.onnx.embedder import Embedder  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.training.helpers import tiny_config  # noqa: E402
from training.synthetic import write_catalogue  # noqa: E402
from training.train import train  # noqa: E402


def test_synthetic_catalogue_to_served_identifications(
    tmp_path: Path, sqlite_settings: Settings
) -> None:
    catalogue = write_catalogue(
        tmp_path / "synthetic",
        individuals=32,
        photos=8,
        queries=2,
        unseen=3,
        size=96,
        seed=11,
        variation=0.5,  # calmer photos than the demo's, so that 600 steps are enough
    )
    config = tiny_config(
        catalogue,
        tmp_path / "run",
        input_size=64,
        embedding_dim=64,
        epochs=20,
        steps_per_epoch=30,
        batch_per_replica=32,
        folds=4,  # a quarter of the individuals validate: the grid search picks k and cutoff
        unseen_fraction=0.25,
        evaluate_every=10,
        arcface_scale=24.0,
        arcface_margin=0.2,
        schedule={
            "start": 2e-4,
            "peak": 3e-3,
            "end": 1e-4,
            "warmup_epochs": 1,
            "sustain_epochs": 10,
        },
        augmentation={
            "crop_min_area": 0.8,
            "hue": 0.02,
            "grayscale": 0.1,
            "brightness": 0.1,
            "contrast": [0.85, 1.15],
            "saturation": [0.8, 1.2],
        },
    )
    summary = train(config)
    assert summary["epochs"] == 20 and summary["data"]["train_individuals"] == 24
    onnx_path = tmp_path / "model.onnx"
    export_model(tmp_path / "run" / "model.keras", onnx_path)

    factory = make_sessionmaker(make_engine(sqlite_settings.sqlalchemy_url))
    model = register_model(sqlite_settings, factory, onnx_path)
    head = summary["head"]
    assert (model.k, model.cutoff, model.ranking) == (head["k"], head["cutoff"], head["ranking"])
    activate_model(sqlite_settings, factory, model.id)
    embedder = Embedder(sqlite_settings.data_dir / model.file_path)
    report = CatalogueImport(sqlite_settings, factory, embedder, model.id).run(
        catalogue.catalogue_csv, catalogue.images
    )
    assert report.imported == 32 * 8 and not report.errors
    identifier = Identifier.load(sqlite_settings, factory, model)
    assert catalogue.queries_csv is not None
    figures = evaluate(identifier, catalogue.queries_csv, catalogue.images).summary()
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert figures["known_queries"] == 64 and figures["unseen_queries"] == 24
    # Answering new_individual first to every query scores 1 on the unseen ones and at most 1/2
    # on the known ones; with nothing useful after it, MAP@5 = the unseen share (0.27 here).
    # A model that identifies is far above that, and above 1/2 on the known individuals.
    floor = figures["unseen_queries"] / figures["queries"]
    assert figures["map5"] >= floor + 0.35, figures
    assert figures["map5_known"] >= 0.6, figures
