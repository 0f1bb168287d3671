"""A training run end to end on a tiny model: outputs, logs, resume after interruption, config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from service.knn import CUTOFF_GRID, K_GRID  # noqa: E402
from tests.training.helpers import tiny_config  # noqa: E402
from training import train as train_module  # noqa: E402
from training.cli import main as cli_main  # noqa: E402
from training.config import ConfigError, load_config  # noqa: E402
from training.synthetic import write_catalogue  # noqa: E402


def test_a_run_leaves_everything_behind(tiny_run: Path) -> None:
    for name in (
        "config.json",
        "model.keras",
        "checkpoints/last.keras",
        "history.csv",
        "threshold_search.json",
        "val_predictions.csv",
        "val_truth.csv",
    ):
        assert (tiny_run / name).is_file(), name
    assert list((tiny_run / "logs").rglob("events.out.tfevents.*"))
    assert len(list((tiny_run / "parity").iterdir())) == 8
    with (tiny_run / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert [r["epoch"] for r in history] == ["0", "1"]
    assert {"loss", "accuracy", "val_map5", "val_map5_known", "val_map5_unseen"} <= set(history[0])
    assert 0.0 <= float(history[-1]["val_map5"]) <= 1.0
    grid = json.loads((tiny_run / "threshold_search.json").read_text())
    assert {c["k"] for c in grid["cells"]} == set(K_GRID)
    cutoffs = sorted({c["cutoff"] for c in grid["cells"]})
    assert cutoffs == list(CUTOFF_GRID) and (cutoffs[0], cutoffs[-1], len(cutoffs)) == (
        0.02,
        0.9,
        45,
    )
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["head"] == {k: grid["best"][k] for k in ("k", "cutoff", "ranking")}
    assert summary["validation"]["best"]["map5"] == grid["best"]["map5"]
    assert summary["preprocessing"] == {
        "input_size": 32,
        "resize": "stretch",
        "pixel_range": "0-255",
    }
    assert summary["epochs"] == 2 and summary["global_batch"] == 8
    with (tiny_run / "val_predictions.csv").open() as f:
        predictions = list(csv.DictReader(f))
    assert predictions and all(len(p["predictions"].split()) <= 5 for p in predictions)


def test_a_finished_run_is_not_trained_again(tiny_run: Path) -> None:
    config = load_config(tiny_run / "config.json")
    before = (tiny_run / "model.keras").stat().st_mtime_ns
    assert train_module.train(config)["epochs"] == 2
    assert (tiny_run / "model.keras").stat().st_mtime_ns == before


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalogue = write_catalogue(tmp_path / "cat", individuals=6, photos=3, size=40, seed=8)
    config = tiny_config(catalogue, tmp_path / "run", epochs=3, steps_per_epoch=2)
    started: list[int] = []

    class Watch(keras.callbacks.Callback):
        def __init__(self, stop_after: int | None) -> None:
            super().__init__()
            self.stop_after = stop_after

        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            started.append(epoch)

        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            if epoch == self.stop_after:
                raise Interrupt  # after the backup of this epoch was written

    original = train_module._callbacks

    def with_watch(stop_after: int | None):  # type: ignore[no-untyped-def]
        def callbacks(*args, **kwargs):  # type: ignore[no-untyped-def]
            return [*original(*args, **kwargs), Watch(stop_after)]

        return callbacks

    monkeypatch.setattr(train_module, "_callbacks", with_watch(1))
    with pytest.raises(Interrupt):
        train_module.train(config)
    assert started == [0, 1] and not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.setattr(train_module, "_callbacks", with_watch(None))
    summary = train_module.train(config)
    assert started == [0, 1, 2]  # the second session ran only the last epoch
    assert summary["epochs"] == 3
    with (tmp_path / "run" / "history.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2"]


def test_resuming_with_other_settings_is_refused(tiny_run: Path) -> None:
    config = load_config(tiny_run / "config.json", {"arcface_margin": 0.5})
    with pytest.raises(ConfigError, match="arcface_margin"):
        train_module.train(config)


def test_config_files_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "backbone: EfficientNetB0\ninput_size: 224\nschedule:\n"
        "  peak: 0.001\ncatalogue: a.csv\nimages: imgs\n"
    )
    config = load_config(tmp_path / "c.yaml", {"schedule.warmup_epochs": 2, "epochs": 9})
    assert (config.backbone, config.input_size, config.epochs) == ("EfficientNetB0", 224, 9)
    assert (config.schedule.peak, config.schedule.warmup_epochs) == (1e-3, 2.0)
    assert config.validate() is config
    defaults = load_config()
    assert (defaults.backbone, defaults.input_size, defaults.embedding_dim) == (
        "EfficientNetB5",
        380,
        512,
    )
    assert (defaults.batch_per_replica, defaults.epochs, defaults.k, defaults.cutoff) == (
        16,
        30,
        50,
        0.62,
    )
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        load_config(None, {"learning_rate": 1})
    with pytest.raises(ConfigError, match="pixel_range 0-255"):
        load_config(None, {"pixel_range": "0-1", "catalogue": "a", "images": "b"}).validate()
    with pytest.raises(ConfigError, match="either catalogue"):
        load_config(None, {}).validate()


def test_cli_trains_from_a_config_file(tmp_path: Path) -> None:
    catalogue = write_catalogue(tmp_path / "cat", individuals=5, photos=3, size=40, seed=2)
    config = tiny_config(catalogue, tmp_path / "ignored", epochs=1, steps_per_epoch=1)
    data = config.to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    code = cli_main(
        [
            "train",
            "--config",
            str(tmp_path / "cfg.json"),
            "--output",
            str(tmp_path / "run"),
            "--set",
            "folds=1",
            "--name",
            "from-cli",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["name"] == "from-cli" and summary["validation"] is None
    assert summary["head"] == {"k": 50, "cutoff": 0.62, "ranking": "vote"}
    assert cli_main(["train", "--set", "backbone=resnet", "--catalogue", "x", "--images", "y"]) == 2


@pytest.mark.parametrize("name", ["effb5.json", "effb5-tpu.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    path = Path(__file__).parents[2] / "training" / "configs" / name
    overrides = {"catalogue": "train.csv", "images": "imgs", "shards": None}
    config = load_config(path, overrides if name.endswith(".json") else {})
    assert config.validate() is config
    assert (config.backbone, config.input_size, config.batch_per_replica) == (
        "EfficientNetB5",
        380,
        16,
    )
    s = config.schedule
    assert (s.start, s.peak, s.end, s.warmup_epochs, config.epochs) == (1e-6, 8e-5, 1e-6, 6, 30)


def test_shards_cli_then_training_from_shards(tmp_path: Path) -> None:
    catalogue = write_catalogue(tmp_path / "cat", individuals=5, photos=3, size=40, seed=6)
    assert (
        cli_main(
            [
                "shards",
                str(catalogue.catalogue_csv),
                "--images",
                str(catalogue.images),
                "--out",
                str(tmp_path / "shards"),
                "--photos-per-shard",
                "6",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "shards").glob("shard-*.tfrecord"))) == 3
    config = tiny_config(catalogue, tmp_path / "run", epochs=1, steps_per_epoch=2)
    config.catalogue, config.images, config.shards = None, None, str(tmp_path / "shards")
    summary = train_module.train(config)
    assert summary["data"]["source"] == str(tmp_path / "shards")
    assert summary["data"]["photos"] == 15 and summary["epochs"] == 1
