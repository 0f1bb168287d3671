"""Strategy selection, and the batch plan following the replica count: TPUs cannot run here, so
eight replicas are a MirroredStrategy over eight logical CPU devices (in a child process, because
logical devices must be set before TensorFlow starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from training import train as train_module  # noqa: E402
from training.config import TrainConfig  # noqa: E402

REPO = Path(__file__).parents[2]


def test_the_default_strategy_on_this_machine() -> None:
    strategy = train_module.choose_strategy(None)
    assert strategy.num_replicas_in_sync == 1  # accelerators are hidden in the tests
    assert not isinstance(strategy, tf.distribute.MirroredStrategy)


class FakeTPUStrategy:
    """Stands in for TPUStrategy, which needs a TPU."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver


@pytest.mark.parametrize(
    ("tpu", "resolved"),
    [
        ("auto", None),  # from the environment (Colab, a GCE VM with a TPU node)
        ("local", "local"),  # a TPU VM, as on Kaggle and Cloud TPU v3-8 / v5e-8 VMs
        ("my-v3-8", "my-v3-8"),  # a TPU node's name
        ("grpc://10.0.0.2:8470", "grpc://10.0.0.2:8470"),
    ],
)
def test_a_tpu_is_connected_as_asked(
    monkeypatch: pytest.MonkeyPatch, tpu: str, resolved: str | None
) -> None:
    calls: list[str | None] = []

    def connect(tpu: str | None = None) -> str:
        calls.append(tpu)
        return f"resolver of {tpu}"

    resolver_class = tf.distribute.cluster_resolver.TPUClusterResolver
    monkeypatch.setattr(resolver_class, "connect", staticmethod(connect))
    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    strategy = train_module.choose_strategy(tpu)
    assert calls == [resolved] and isinstance(strategy, FakeTPUStrategy)
    assert strategy.resolver == f"resolver of {resolved}"


@pytest.mark.parametrize(
    ("replicas", "photos", "per_replica", "per_execution", "plan"),
    [
        (1, 40, 2, 1, (1, 2, 20, 1)),
        (8, 40, 2, 1, (8, 16, 3, 1)),  # the global batch grows with the replicas
        (8, 40, 2, 2, (8, 16, 4, 2)),  # 3 steps -> 2 whole executions of 2
        (8, 40, 2, 32, (8, 16, 3, 3)),  # an execution is never longer than an epoch
        (8, 51033, 16, 32, (8, 128, 416, 32)),  # the paper on a v3-8: 399 steps -> 13 x 32
    ],
)
def test_the_plan_follows_the_replicas(
    replicas: int,
    photos: int,
    per_replica: int,
    per_execution: int,
    plan: tuple[int, int, int, int],
) -> None:
    config = TrainConfig(batch_per_replica=per_replica, steps_per_execution=per_execution)
    got = train_module.plan_steps(config, photos, replicas)
    assert (got.replicas, got.global_batch, got.steps_per_epoch, got.steps_per_execution) == plan
    one_step = train_module.plan_steps(config, photos, replicas, multi_step=False)
    assert (one_step.global_batch, one_step.steps_per_execution) == (plan[1], 1)


def test_several_steps_per_execution_run_whole(tmp_path: Path) -> None:
    """On one device, 3 steps per epoch and 2 per execution: 2 whole executions per epoch."""
    from tests.training.helpers import tiny_config
    from training.synthetic import write_catalogue

    catalogue = write_catalogue(tmp_path / "cat", individuals=5, photos=4, size=40, seed=5)
    config = tiny_config(catalogue, tmp_path / "run", folds=1, batch_per_replica=8)
    config.steps_per_epoch, config.steps_per_execution = None, 2
    summary = train_module.train(config)
    assert (summary["steps_per_epoch"], summary["steps_per_execution"]) == (4, 2)
    last = keras.models.load_model(tmp_path / "run" / "checkpoints" / "last.keras")
    assert int(last.optimizer.iterations.numpy()) == summary["epochs"] * 4


EIGHT_REPLICAS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 8)
    import keras
    from tests.training.helpers import tiny_config
    from training.synthetic import write_catalogue
    from training.train import train

    root = Path(sys.argv[1])
    catalogue = write_catalogue(root / "cat", individuals=10, photos=4, size=40, seed=5)
    config = tiny_config(
        catalogue, root / "run", folds=1, batch_per_replica=2, steps_per_epoch=None,
        steps_per_execution=2, epochs=2,
    )
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(8)])
    summary = train(config, strategy=strategy)
    last = keras.models.load_model(root / "run" / "checkpoints" / "last.keras")
    summary["optimizer_steps"] = int(last.optimizer.iterations.numpy())
    (root / "result.json").write_text(json.dumps(summary))
    """
)


def test_eight_replicas_over_logical_cpus(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", EIGHT_REPLICAS, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "result.json").read_text())
    assert (summary["strategy"], summary["replicas"]) == ("MirroredStrategy", 8)
    # 40 photos, 2 per replica: a global batch of 16 and 3 steps per epoch; one step per
    # execution, as Keras 3 needs under MirroredStrategy (keras-team/keras#19246)
    assert summary["global_batch"] == 16 and summary["data"]["train_photos"] == 40
    assert (summary["steps_per_epoch"], summary["steps_per_execution"]) == (3, 1)
    assert summary["epochs"] == 2 and summary["optimizer_steps"] == 2 * 3
    assert summary["last_epoch"]["loss"] not in ("", "nan")
