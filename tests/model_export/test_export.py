"""Keras -> ONNX export: metadata, dynamic batch, parity, and refusals that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")
onnx = pytest.importorskip("onnx")

from model_export.cli import main as export_cli  # noqa: E402
from model_export.export import ROUNDING_FLOOR, ExportRefused, export_model  # noqa: E402
from service.contract import Preprocessing  # noqa: E402
from service.onnx.embedder import Embedder, l2_normalise  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.model import build_training_model, embedding_submodel  # noqa: E402
from training.runs import load_model  # noqa: E402
from training.synthetic import Renderer, make_individual  # noqa: E402


def test_export_follows_the_model_contract(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    result = export_model(tiny_run / "model.keras", out)
    summary = json.loads((tiny_run / "summary.json").read_text())
    embedder = Embedder(out)  # what the service does with the file
    c = embedder.contract
    assert c.preprocessing == Preprocessing(32, "stretch", "0-255")
    head = summary["head"]
    assert (c.head.k, c.head.cutoff, c.head.ranking) == (head["k"], head["cutoff"], head["ranking"])
    assert (c.name, c.version, embedder.dim) == ("tiny", "test", 16)
    best = summary["validation"]["best"]
    assert c.training["whaleid.training.val_map5"] == f"{best['map5']:.4f}"
    assert c.training["whaleid.training.backbone"] == "compact"
    assert c.training["whaleid.training.epochs"] == "2"
    assert "min cosine" in c.training["whaleid.training.export_parity"]
    assert min(result.parity.tf_vs_onnx) >= 0.9999
    assert min(result.parity.tf_vs_service) >= 0.999
    graph = onnx.load(str(out)).graph
    assert len(graph.input) == 1 and len(graph.output) == 1
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any("arcface" in n.name.lower() for n in graph.node)
    keras = embedding_submodel(load_model(tiny_run / "model.keras"))
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    want = l2_normalise(keras(x, training=False).numpy())
    for batch in (x[:1], x):
        got = embedder.embed(batch)
        assert np.sum(got * want[: len(batch)], axis=1) == pytest.approx(
            np.ones(len(batch)), abs=1e-4
        )
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def wide_photos(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Renderer(96).photo(make_individual("humpback_whale", 1, i), 1, i, 0)
        path = folder / f"wide{i}.png"
        image.resize((96, 40)).save(path)
        paths.append(path)
    return paths


def test_save_load_export_round_trip_without_a_run(tmp_path: Path) -> None:
    config = TrainConfig(backbone="compact", input_size=40, embedding_dim=8)
    model = build_training_model(config, n_classes=4)
    model.save(tmp_path / "fresh.keras")
    result = export_model(
        tmp_path / "fresh.keras", tmp_path / "fresh.onnx", photos=wide_photos(tmp_path / "photos")
    )
    c = Embedder(tmp_path / "fresh.onnx").contract
    assert (c.head.k, c.head.cutoff, c.head.ranking, c.name) == (50, 0.62, "vote", "fresh")
    assert c.preprocessing == Preprocessing(40)
    assert result.metadata["whaleid.input_size"] == "40"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"pixel_range": "0-1"}, "pixel_range '0-255' in training but '0-1' in the metadata"),
        ({"resize": "letterbox"}, "resize 'stretch' in training but 'letterbox' in the metadata"),
    ],
)
def test_metadata_that_misdescribes_training_is_refused(
    tiny_run: Path, tmp_path: Path, override: dict[str, str], message: str
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous model")
    with pytest.raises(ExportRefused, match=message):
        export_model(
            tiny_run / "model.keras",
            out,
            preprocessing=override,
            photos=wide_photos(tmp_path / "photos"),
        )
    assert out.read_bytes() == b"the previous model"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "photos"]


def test_metadata_the_service_rejects_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportRefused, match="service would refuse.*whaleid.k=0"):
        export_model(tiny_run / "model.keras", tmp_path / "m.onnx", head={"k": 0})
    assert not (tmp_path / "m.onnx").exists()


def test_no_photos_no_export(tmp_path: Path) -> None:
    model = build_training_model(TrainConfig(backbone="compact", input_size=32, embedding_dim=8), 3)
    model.save(tmp_path / "m.keras")
    with pytest.raises(ExportRefused, match="--photos"):
        export_model(tmp_path / "m.keras", tmp_path / "m.onnx")


def test_cli(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.onnx"
    assert (
        export_cli(
            [str(tiny_run / "model.keras"), "--out", str(out), "--version", "v9", "--cutoff", "0.5"]
        )
        == 0
    )
    c = Embedder(out).contract
    assert (c.version, c.head.cutoff) == ("v9", 0.5)
    bad = tmp_path / "bad.onnx"
    assert (
        export_cli([str(tiny_run / "model.keras"), "--out", str(bad), "--pixel-range", "imagenet"])
        == 1
    )
    assert not bad.exists()


def test_parity_photos_are_real_files_of_the_run(tiny_run: Path) -> None:
    photos = sorted((tiny_run / "parity").iterdir())
    assert photos and all(Image.open(p).format == "JPEG" for p in photos)


def test_frozen_imagenet_lite_exports_and_embeds_in_the_service(tmp_path: Path) -> None:
    """training/configs/lite0-frozen.yaml in small: no training, the pooled ImageNet features
    are the embedding, and the exported file is served like any other model."""
    from tests.training.helpers import tiny_config
    from training.synthetic import write_catalogue
    from training.train import train

    catalogue = write_catalogue(tmp_path / "cat", individuals=8, photos=4, size=192, seed=5)
    config = tiny_config(
        catalogue,
        tmp_path / "run",
        backbone="EfficientNetLite0",
        weights="imagenet",
        input_size=128,
        epochs=0,
        embedding_dim=0,
    )
    summary = train(config)
    assert summary["epochs"] == 0 and summary["stages"] == []
    out = tmp_path / "lite.onnx"
    result = export_model(tmp_path / "run" / "model.keras", out)
    embedder = Embedder(out)
    assert embedder.dim == 1280
    assert embedder.contract.training["whaleid.training.backbone"] == "EfficientNetLite0"
    assert min(result.parity.tf_vs_onnx) >= 0.9999
    # Training and service round a resampled pixel apart by one step at most; the frozen
    # ImageNet features feel it (cosines about 0.997), which the export accepts as rounding.
    assert result.parity.input_steps <= 1.0
    assert min(result.parity.tf_vs_service) >= ROUNDING_FLOOR
    assert embedder.contract.head.k == summary["head"]["k"]
