"""Grad-CAM overlays (§4.2) and the robustness figures (§4.3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from service.contract import Preprocessing  # noqa: E402
from training.cli import main as cli_main  # noqa: E402
from training.gradcam import heatmap, jet, write_overlays  # noqa: E402
from training.robustness import CONDITIONS, at_input_size, blur, dim, run_robustness  # noqa: E402
from training.runs import load_model  # noqa: E402


def test_jet_colour_map() -> None:
    colours = jet(np.array([0.0, 0.5, 1.0]))
    assert colours[0] == pytest.approx([0, 0, 0.5])  # dark blue
    assert colours[1] == pytest.approx([0.5, 1, 0.5], abs=1e-6)  # green in the middle
    assert colours[2] == pytest.approx([0.5, 0, 0])  # dark red


def test_heatmap_of_the_trained_model(tiny_run: Path) -> None:
    model = load_model(tiny_run / "model.keras")
    photo = next((tiny_run / "parity").iterdir())
    from training.evaluate import prepare

    pixels = prepare(photo.read_bytes(), Preprocessing(32))
    for reference in (None, np.ones(16, dtype=np.float32) / 4.0):
        cam = heatmap(model, pixels, reference)
        assert cam.shape == (2, 2)  # the compact backbone's last map at 32 px
        assert cam.min() >= 0.0 and cam.max() in (0.0, pytest.approx(1.0))


def two_colour_model() -> keras.Model:
    """Backbone channel 0 sees red, channel 1 sees blue; a fixed projection to 4-d."""
    inner = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(2, 1, use_bias=False, name="colours")
    backbone = keras.Model(inner, keras.layers.ReLU()(conv(inner)), name="backbone")
    image = keras.Input((8, 8, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(image))
    x = keras.layers.BatchNormalization(name="embedding_bn")(x)
    x = keras.layers.Dropout(0.2, name="embedding_dropout")(x)
    dense = keras.layers.Dense(4, use_bias=False, name="embedding")
    model = keras.Model(image, dense(x))
    conv.set_weights([np.array([[[[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]]], np.float32)])
    dense.set_weights([np.array([[1.0, 0.2, 0.0, 0.5], [0.0, 0.3, 1.0, -0.5]], np.float32)])
    return model


def test_heatmap_points_at_what_makes_the_match() -> None:
    """Query: a red patch top left and a blue one bottom right; reference: red only. The red
    patch is what the two share, so that is where the heat is."""
    model = two_colour_model()
    query = np.zeros((8, 8, 3), np.float32)
    query[:3, :3, 0] = 255.0
    query[5:, 5:, 2] = 255.0
    red_only = np.zeros((8, 8, 3), np.float32)
    red_only[:3, :3, 0] = 255.0
    reference = model(red_only[None], training=False).numpy()[0]
    cam = heatmap(model, query, reference / np.linalg.norm(reference))
    assert cam[:3, :3].min() == pytest.approx(1.0)
    assert cam[5:, 5:].max() == 0.0


def test_overlays_are_written_at_the_photo_size(tiny_run: Path, tmp_path: Path) -> None:
    photos = sorted((tiny_run / "parity").iterdir())[:2]
    code = cli_main(
        [
            "gradcam",
            str(tiny_run / "model.keras"),
            *map(str, photos),
            "--out",
            str(tmp_path / "cams"),
            "--reference",
            str(photos[1]),
        ]
    )
    assert code == 0
    for photo in photos:
        overlay = tmp_path / "cams" / f"{photo.stem}.gradcam.png"
        with Image.open(overlay) as image, Image.open(photo) as original:
            assert image.size == original.size
            # blended: neither the photo nor a flat colour
            diff = np.abs(np.asarray(image, np.float32) - np.asarray(original, np.float32))
            assert diff.mean() > 5
    assert len(write_overlays(tiny_run / "model.keras", photos, tmp_path / "again")) == 2


def test_degradations_do_what_they_say() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3)).astype(np.uint8))
    spec = Preprocessing(32)
    sharp = np.asarray(at_input_size(blur(0.01), spec)(image), np.float32)
    assert sharp.shape == (32, 32, 3)
    blurred = np.asarray(at_input_size(blur(2.0), spec)(image), np.float32)
    assert blurred.std() < 0.6 * sharp.std()
    dark = np.asarray(at_input_size(dim(0.6), spec)(image), np.float32)
    assert dark.mean() == pytest.approx(0.6 * sharp.mean(), rel=0.02)
    assert list(CONDITIONS) == [
        "clean",
        "blur sigma 0.5",
        "blur sigma 1",
        "blur sigma 2",
        "brightness 70%",
        "brightness 60%",
        "brightness 50%",
    ]


def test_robustness_report(tiny_run: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_run / "config.json").read_text())
    report = run_robustness(
        tiny_run / "model.keras",
        Path(config["catalogue"]),
        Path(config["images"]),
        out=tmp_path / "r.json",
    )
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert set(report["conditions"]) == set(CONDITIONS)
    for figures in report["conditions"].values():
        assert 0.0 <= figures["map5"] <= 1.0 and figures["queries"] == 9 * 2
    assert report["gallery_photos"] == 9 * 2


def test_calibration_grid(tiny_run: Path, tmp_path: Path) -> None:
    from training.calibrate import run_calibration

    config = json.loads((tiny_run / "config.json").read_text())
    report = run_calibration(
        tiny_run / "model.keras",
        Path(config["catalogue"]),
        Path(config["images"]),
        out=tmp_path / "grid.json",
    )
    summary = json.loads((tiny_run / "summary.json").read_text())
    own = report["models_head"]
    assert (own["k"], own["cutoff"], own["ranking"]) == tuple(summary["head"].values())
    assert report["best"]["map5"] >= own["map5"]
    assert {c["ranking"] for c in report["cells"]} == {"vote", "nearest"}


def test_speed_is_measured() -> None:
    from training.speed import measure

    speed = measure("compact", 32, batch=4, steps=2, classes=10)
    assert speed.steps_per_second > 0 and speed.photos_per_second == 4 * speed.steps_per_second
