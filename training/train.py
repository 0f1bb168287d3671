"""A training run: strategy, data, model, the paper's schedule, per-epoch validation MAP@5,
checkpoints and logs, resume after interruption, then the k / cutoff grid search.

The run folder holds everything: ``config.json``, ``backup/`` (resume state), ``checkpoints/``,
``history.csv``, ``logs/`` (TensorBoard), ``model.keras`` (the training model, ArcFace head
included), ``threshold_search.json``, ``val_predictions.csv`` / ``val_truth.csv`` (out-of-fold
predictions for blending), ``parity/`` (a few validation photos for the export check) and
``summary.json``, which ``whaleid-export`` reads into the ONNX metadata.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from service.contract import Ranking
from training.config import ConfigError, TrainConfig, config_from_dict
from training.data import PhotoSource, Split, open_source, split_catalogue, training_dataset
from training.evaluate import (
    PreparedPhotos,
    Validation,
    fits_in_memory,
    grid_search,
    keras_embed,
    nearest,
    predict,
)
from training.layers import LayerwiseAdam, PaperSchedule
from training.model import (
    backbone_of,
    build_training_model,
    embedding_submodel,
    layerwise_multipliers,
)
from training.runs import SUMMARY

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
RUN_CONFIG = "config.json"
# Settings that may change when a run is resumed: they do not change what is being trained.
_RESUMABLE_CHANGES = {
    "tpu",
    "evaluate_every",
    "snapshots",
    "train_distractors",
    "shuffle_buffer",
    "cache_decoded",
    "output",
}
_PARITY_PHOTOS = 8
BEST_MONITOR = "val_map5_tuned"
FEW_VALIDATION_QUERIES = 50
STAGE1_WEIGHTS = "frozen-stage.weights.h5"


def choose_strategy(tpu: str | None) -> tf.distribute.Strategy:
    """TPU when asked (``auto``: from the environment, e.g. Colab or a GCE VM; ``local``: a TPU
    VM, as on Kaggle; else a TPU name or grpc address), else MirroredStrategy over the visible
    GPUs, else the default (one-device) strategy."""
    if tpu is not None:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver.connect(
            tpu=None if tpu == "auto" else tpu
        )
        return tf.distribute.TPUStrategy(resolver)
    if tf.config.list_logical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _runs_multi_step(strategy: tf.distribute.Strategy) -> bool:
    """Keras 3 cannot run several steps per execution under the (multi-worker) mirrored
    strategies (keras-team/keras#19246: "You must feed a value for placeholder tensor"); on a TPU
    and on one device it can, and a TPU is where it matters."""
    mirrored = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    if isinstance(strategy, mirrored):
        log.info("%s runs one step per execution (Keras 3)", type(strategy).__name__)
        return False
    return True


@dataclass(frozen=True)
class StepPlan:
    """How an epoch is cut for a strategy's replicas."""

    replicas: int
    global_batch: int
    steps_per_epoch: int
    steps_per_execution: int


def plan_steps(
    config: TrainConfig, train_photos: int, replicas: int, *, multi_step: bool = True
) -> StepPlan:
    """Global batch = ``batch_per_replica`` x replicas; an epoch covers the training photos once
    (or ``steps_per_epoch``), in whole executions of ``steps_per_execution`` steps, because Keras
    runs every execution in full: a partial last one would add steps the schedule did not plan.
    ``multi_step=False``: one step per execution whatever the configuration says."""
    global_batch = config.batch_per_replica * replicas
    steps = config.steps_per_epoch or max(1, math.ceil(train_photos / global_batch))
    per_execution = max(1, min(config.steps_per_execution if multi_step else 1, steps))
    steps = math.ceil(steps / per_execution) * per_execution
    return StepPlan(replicas, global_batch, steps, per_execution)


class ValidationMap(keras.callbacks.Callback):  # type: ignore[misc]
    """Validation MAP@5 through the service's kNN head, added to the epoch logs (so the CSV and
    TensorBoard logs and checkpoints see ``val_map5``)."""

    def __init__(
        self,
        validation: Validation,
        embedder: keras.Model,
        *,
        k: int,
        cutoff: float,
        ranking: Ranking,
        every: int,
        epochs: int,
        cutoffs: tuple[float, ...] = (),
    ) -> None:
        super().__init__()
        self.validation = validation
        self.embedder = embedder
        self.k, self.cutoff, self.ranking = k, cutoff, ranking
        self.cutoffs = cutoffs
        self.every = max(1, every)
        self.epochs = epochs

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if (epoch + 1) % self.every and epoch + 1 != self.epochs:
            return
        if logs is not None:
            logs.update(
                validation_logs(
                    self.validation,
                    self.embedder,
                    k=self.k,
                    cutoff=self.cutoff,
                    ranking=self.ranking,
                    cutoffs=self.cutoffs,
                )
            )


def validation_logs(
    validation: Validation,
    embedder: keras.Model,
    *,
    k: int,
    cutoff: float,
    ranking: Ranking,
    cutoffs: tuple[float, ...],
) -> dict[str, float]:
    """``val_map5`` (and its known / unseen parts) with the configured head, and
    ``val_map5_tuned``: the best over ``cutoffs`` with that k. The tuned figure follows what the
    embedding learns whatever the cutoff it will get (the head is chosen after training), so it
    is what early stopping watches."""
    gallery, queries = validation.embeddings(keras_embed(embedder))
    neighbours = nearest(queries, gallery, validation.gallery_labels, k)
    grid = grid_search(
        neighbours,
        validation.truths,
        k_grid=[k],
        cutoff_grid=sorted({cutoff, *cutoffs}),
        rankings=[ranking],
    )
    at_head = next(c for c in grid.cells if c["cutoff"] == cutoff)
    return {
        "val_map5": at_head["map5"],
        "val_map5_known": -1.0 if at_head["map5_known"] is None else at_head["map5_known"],
        "val_map5_unseen": -1.0 if at_head["map5_unseen"] is None else at_head["map5_unseen"],
        "val_map5_tuned": max(c["map5"] for c in grid.cells),
    }


def best_record(checkpoints: Path) -> dict[str, Any] | None:
    """The epoch ``KeepBest`` kept in ``checkpoints`` and its ``val_map5_tuned``, if any."""
    record = checkpoints / "best.json"
    if not record.exists():
        return None
    best: dict[str, Any] = json.loads(record.read_text())
    return best


def load_model_weights(model: keras.Model, path: Path) -> None:
    """The weights in ``path`` (a ``.weights.h5``), never the optimizer's state saved with them.

    Keras 3 writes the compiled optimizer's variables into every ``.weights.h5`` and reads them
    back when the variable counts agree. The frozen stage's optimizer holds the head's few
    variables (11 for the small-catalogue recipe), the whole stage's one every trainable
    variable's (109): restoring a frozen-stage epoch (``KeepBest``'s ``best.weights.h5``) into the
    whole stage's model made Keras warn "Skipping variable loading for optimizer ..., because it
    has 109 variables whereas the saved optimizer has 11". That state is never wanted here:
    each stage compiles a fresh optimizer, and the kept weights are only saved and exported."""
    optimizer = getattr(model, "optimizer", None)
    model.load_weights(path, objects_to_skip=[optimizer] if optimizer is not None else None)


class KeepBest(keras.callbacks.Callback):  # type: ignore[misc]
    """Keeps the weights of the epoch with the best ``val_map5_tuned`` (``best.weights.h5`` and
    ``best.json`` in the checkpoints folder, so a resumed run still knows them) and, with
    ``patience``, stops a stage after that many evaluated epochs without a better one."""

    def __init__(self, folder: Path, patience: int) -> None:
        super().__init__()
        self.folder = folder
        self.weights = folder / "best.weights.h5"
        self.record = folder / "best.json"
        self.patience = patience
        self.since_best = 0

    @property
    def best(self) -> dict[str, Any] | None:
        return best_record(self.folder)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(BEST_MONITOR)
        if value is None:
            return
        best = self.best
        if best is None or value > best[BEST_MONITOR]:
            self.model.save_weights(self.weights)
            self.record.write_text(json.dumps({"epoch": epoch + 1, BEST_MONITOR: value}) + "\n")
            self.since_best = 0
            return
        self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            log.info(
                "no better %s for %d evaluations: stopping (best %.4f at epoch %d)",
                BEST_MONITOR,
                self.since_best,
                best[BEST_MONITOR],
                best["epoch"],
            )
            self.model.stop_training = True


class EpochLog(keras.callbacks.Callback):  # type: ignore[misc]
    """One log line per epoch with its metrics and learning rate (``schedule`` starts at epoch
    ``offset``: a later stage's schedule counts from its own start)."""

    def __init__(self, schedule: PaperSchedule, offset: int = 0) -> None:
        super().__init__()
        self.schedule = schedule
        self.offset = offset
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
        log.info(
            "epoch %d done in %.0f s (lr %.3g): %s",
            epoch + 1,
            time.perf_counter() - self.started,
            self.schedule.at_epoch(epoch + 1 - self.offset),
            metrics,
        )


def _prepare_run_dir(config: TrainConfig, restart: bool) -> Path:
    out = config.output_dir
    if restart and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / RUN_CONFIG
    if saved.exists():
        before = config_from_dict(json.loads(saved.read_text())).to_dict()
        now = config.to_dict()
        changed = sorted(k for k in now if now[k] != before.get(k) and k not in _RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(
                f"{out} holds a run with different settings ({', '.join(changed)}): resume it "
                "with the same configuration, choose another output, or pass --restart"
            )
    saved.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out


def build_validation(source: PhotoSource, split: Split, config: TrainConfig) -> Validation | None:
    """Gallery = validation gallery photos + up to ``train_distractors`` training photos;
    queries = the rest of the validation photos (unseen individuals' answer: new_individual)."""
    if not split.queries:
        return None
    rng = random.Random(config.seed)
    distractors = rng.sample(split.train, min(config.train_distractors, len(split.train)))
    gallery_entries = split.gallery + distractors
    spec = config.preprocessing
    gallery_bytes = dict(source.read(gallery_entries))
    query_bytes = dict(source.read(split.queries))
    gallery = [gallery_bytes[e] for e in gallery_entries]
    queries = [query_bytes[e] for e in split.queries]
    cached = fits_in_memory(len(gallery) + len(queries), spec)
    return Validation(
        gallery=PreparedPhotos.from_bytes(gallery, spec) if cached else gallery,
        gallery_labels=[e.individual_id for e in gallery_entries],
        queries=PreparedPhotos.from_bytes(queries, spec) if cached else queries,
        query_names=[e.image for e in split.queries],
        truths=[split.truth(e) for e in split.queries],
        spec=spec,
    )


def run_data(run: Path) -> tuple[TrainConfig, PhotoSource, Split]:
    """The configuration, photos and split of the run in folder ``run`` (as it trained)."""
    path = run / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run} is not a whaleid-train run folder")
    config = config_from_dict(json.loads(path.read_text()))
    return (config, *_source_and_split(config, run))


def _source_and_split(config: TrainConfig, run: Path) -> tuple[PhotoSource, Split]:
    """The photos of ``config``'s catalogue (upright copies cached in the run folder) and its
    split: the same for the training and for everything that reads the run later."""
    source = open_source(
        catalogue=config.catalogue,
        images=config.images,
        shards=config.shards,
        cache_dir=run / "upright",
    )
    split = split_catalogue(
        source.entries,
        folds=config.folds,
        validation_fold=config.validation_fold,
        unseen_fraction=config.unseen_fraction,
        gallery_fraction=config.gallery_fraction,
        seed=config.seed,
    )
    return source, split


def _write_parity_photos(source: PhotoSource, split: Split, out: Path) -> None:
    """Keep a few real validation (or training) photos for the export's parity check."""
    folder = out / "parity"
    if folder.exists():
        return
    folder.mkdir()
    pool = (split.queries + split.gallery) or split.train
    for n, (entry, data) in enumerate(source.read(pool[:_PARITY_PHOTOS])):
        suffix = Path(entry.image).suffix.lower() or ".img"
        (folder / f"photo{n}{suffix}").write_bytes(data)


def _callbacks(
    config: TrainConfig,
    out: Path,
    schedule: PaperSchedule,
    validation: Validation | None,
    embedder: keras.Model,
    *,
    backup: str = "backup",
    epoch_offset: int = 0,
    patience: int | None = None,
) -> list[keras.callbacks.Callback]:
    """The callbacks of one stage; ``patience`` (default ``early_stopping_patience``) is the
    stage's own: 0 keeps the best epoch without stopping early."""
    callbacks: list[keras.callbacks.Callback] = []
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    if validation is not None:
        callbacks += [
            ValidationMap(
                validation,
                embedder,
                k=config.k,
                cutoff=config.cutoff,
                ranking=config.ranking,  # type: ignore[arg-type]
                every=config.evaluate_every,
                epochs=config.epochs,
                cutoffs=config.cutoff_grid,
            )
        ]
        if config.early_stopping_patience:
            stop_after = config.early_stopping_patience if patience is None else patience
            callbacks.append(KeepBest(checkpoints, stop_after))
    callbacks += [
        EpochLog(schedule, epoch_offset),
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(out / "logs"), update_freq="epoch"),
        keras.callbacks.ModelCheckpoint(str(checkpoints / "last.keras")),
    ]
    if config.snapshots:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(str(checkpoints / "epoch-{epoch:03d}.keras"))
        )
    # Last, so that it saves the epoch only after everything above has logged it.
    callbacks.append(keras.callbacks.BackupAndRestore(str(out / backup)))
    return callbacks


def _history(out: Path) -> list[dict[str, str]]:
    """history.csv, one row per epoch (a re-run epoch after an interruption counts once)."""
    path = out / "history.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = {row["epoch"]: row for row in csv.DictReader(f)}
    return [rows[k] for k in sorted(rows, key=int)]


def _search_head(
    config: TrainConfig, validation: Validation | None, embedder: keras.Model, out: Path
) -> dict[str, Any]:
    """Grid search of k, cutoff (and ranking) on validation; writes the out-of-fold predictions."""
    head: dict[str, Any] = {"k": config.k, "cutoff": config.cutoff, "ranking": config.ranking}
    if validation is None:
        log.warning(
            "no validation photos: the head keeps k=%d, cutoff=%.2f", config.k, config.cutoff
        )
        return {"head": head, "validation": None}
    started = time.perf_counter()
    neighbours = validation.neighbours(keras_embed(embedder), max(config.k_grid))
    rankings: list[Ranking] = list(dict.fromkeys([config.ranking, *config.rankings]))  # type: ignore[list-item]
    grid = grid_search(
        neighbours,
        validation.truths,
        k_grid=sorted(set(config.k_grid) | {config.k}),
        cutoff_grid=sorted(set(config.cutoff_grid) | {config.cutoff}),
        rankings=rankings,
    )
    (out / "threshold_search.json").write_text(json.dumps(grid.as_dict(), indent=1) + "\n")
    default = next(
        c
        for c in grid.cells
        if c["k"] == config.k and c["cutoff"] == config.cutoff and c["ranking"] == config.ranking
    )
    best = grid.best
    head = {"k": best["k"], "cutoff": best["cutoff"], "ranking": best["ranking"]}
    predictions = predict(neighbours, k=head["k"], cutoff=head["cutoff"], ranking=head["ranking"])
    _write_predictions(out, validation, predictions)
    log.info(
        "validation MAP@5 %.4f with the paper's head (k=%d, cutoff %.2f, %s); best %.4f with "
        "k=%d, cutoff %.2f, %s (grid of %d cells in %.0f s)",
        default["map5"],
        config.k,
        config.cutoff,
        config.ranking,
        best["map5"],
        best["k"],
        best["cutoff"],
        best["ranking"],
        len(grid.cells),
        time.perf_counter() - started,
    )
    return {"head": head, "validation": {"default_head": default, "best": best}}


def _write_predictions(out: Path, validation: Validation, predictions: list[list[str]]) -> None:
    with (out / "val_predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "predictions"])
        for name, labels in zip(validation.query_names, predictions, strict=True):
            writer.writerow([name, " ".join(labels)])
    with (out / "val_truth.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "individual_id"])
        writer.writerows(zip(validation.query_names, validation.truths, strict=True))


@dataclass(frozen=True)
class Stage:
    """A part of the training with one optimiser: epochs ``first`` (0-based) to ``last``
    (exclusive), the backbone frozen or not."""

    name: str
    first: int
    last: int
    frozen_backbone: bool
    schedule: PaperSchedule


def _stages(config: TrainConfig, steps: int) -> list[Stage]:
    """``freeze_epochs`` with the backbone frozen at a constant ``freeze_lr``, then the rest on
    the configured schedule (counted from the stage's start); none when ``epochs`` is 0."""
    stages = []
    if config.freeze_epochs:
        lr = config.freeze_lr
        constant = PaperSchedule(steps, start=lr, peak=lr, end=lr, warmup_epochs=0.0)
        stages.append(Stage("frozen", 0, config.freeze_epochs, True, constant))
    rest = config.epochs - config.freeze_epochs
    if rest:
        s = config.schedule
        schedule = PaperSchedule(
            steps,
            start=s.start,
            peak=s.peak,
            end=s.end,
            warmup_epochs=s.warmup_epochs,
            sustain_epochs=s.sustain_epochs,
            decay_until_epoch=s.decay_until_epoch or rest,
        )
        stages.append(Stage("whole", config.freeze_epochs, config.epochs, False, schedule))
    return stages


def _set_trainable(model: keras.Model, config: TrainConfig, *, frozen_backbone: bool) -> None:
    backbone = backbone_of(model)
    backbone.trainable = not frozen_backbone
    if not frozen_backbone and config.freeze_batchnorm:
        # A frozen BatchNorm runs in inference mode: its ImageNet statistics stay, which small
        # batches of a few individuals would otherwise pull about.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def _fit_stage(
    stage: Stage,
    config: TrainConfig,
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    plan: StepPlan,
    dataset: tf.data.Dataset,
    out: Path,
    validation: Validation | None,
    embedder: keras.Model,
) -> None:
    """Train one stage, resumable: a finished frozen stage left its weights in
    ``checkpoints/frozen-stage.weights.h5`` and is not run again; an interrupted stage resumes
    from its own backup folder."""
    done_marker = out / "checkpoints" / STAGE1_WEIGHTS
    if stage.frozen_backbone and done_marker.exists():
        log.info("the frozen stage is done: loading its weights")
        load_model_weights(model, done_marker)
        return
    last_stage = stage.last == config.epochs
    if (
        not stage.frozen_backbone
        and config.early_stopping_patience
        and (out / "checkpoints" / "stopped").exists()
    ):
        log.info("this run stopped early: nothing left to train")
        return
    with strategy.scope():
        _set_trainable(model, config, frozen_backbone=stage.frozen_backbone)
        multipliers = (
            {}
            if stage.frozen_backbone
            else layerwise_multipliers(
                backbone_of(model), config.backbone_lr_scale, config.layer_decay
            )
        )
        model.compile(
            optimizer=LayerwiseAdam(multipliers, learning_rate=stage.schedule, epsilon=1e-5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            steps_per_execution=plan.steps_per_execution,
        )
    log.info(
        "stage %s: epochs %d-%d, backbone %s, %d trainable weights",
        stage.name,
        stage.first + 1,
        stage.last,
        "frozen" if stage.frozen_backbone else "training",
        len(model.trainable_weights),
    )
    callbacks = _callbacks(
        config,
        out,
        stage.schedule,
        validation,
        embedder,
        backup=f"backup/{stage.name}",
        epoch_offset=stage.first,
        patience=0 if stage.frozen_backbone else None,  # early stopping: the last stage only
    )
    history = model.fit(
        dataset,
        initial_epoch=stage.first,
        epochs=stage.last,
        steps_per_epoch=plan.steps_per_epoch,
        shuffle=False,  # the dataset shuffles itself
        callbacks=callbacks,
        verbose=1 if sys.stderr.isatty() else 2,
    )
    if stage.frozen_backbone:
        model.save_weights(done_marker)
    elif last_stage and len(history.epoch) and history.epoch[-1] + 1 < stage.last:
        (out / "checkpoints" / "stopped").write_text(f"{history.epoch[-1] + 1}\n")


def train(
    config: TrainConfig,
    *,
    restart: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip when finished) the training described by ``config``; under
    ``strategy`` when given (e.g. a MultiWorkerMirroredStrategy), else ``choose_strategy``'s."""
    config.validate()
    out = _prepare_run_dir(config, restart)
    if (out / SUMMARY).exists():
        log.info("%s is a finished run: nothing to do (pass --restart to train again)", out)
        summary: dict[str, Any] = json.loads((out / SUMMARY).read_text())
        return summary
    keras.utils.set_random_seed(config.seed)
    source, split = _source_and_split(config, out)
    if len(split.classes) < 2:
        raise ConfigError("the training fold needs at least two individuals")
    log.info("split: %s", split.summary())
    strategy = strategy or choose_strategy(config.tpu)
    plan = plan_steps(
        config,
        len(split.train),
        strategy.num_replicas_in_sync,
        multi_step=_runs_multi_step(strategy),
    )
    replicas, global_batch, steps = plan.replicas, plan.global_batch, plan.steps_per_epoch
    log.info(
        "%s with %d replica(s): global batch %d, %d steps per epoch, %d per execution",
        type(strategy).__name__,
        replicas,
        global_batch,
        steps,
        plan.steps_per_execution,
    )
    dataset = training_dataset(
        source,
        split,
        spec=config.preprocessing,
        augmentation=config.augmentation,
        global_batch=global_batch,
        shuffle_buffer=config.shuffle_buffer,
        cache_decoded=config.cache_decoded,
        seed=config.seed,
    )
    with strategy.scope():
        model = build_training_model(config, len(split.classes))
        embedder = embedding_submodel(model)
    validation = build_validation(source, split, config)
    if validation is not None and len(validation.truths) < FEW_VALIDATION_QUERIES:
        log.warning(
            "only %d validation queries: the head's cutoff%s rest on little (one query moves "
            "MAP@5 by %.2f); with a small catalogue, fewer folds give more (e.g. --set folds=3)",
            len(validation.truths),
            " and early stopping" if config.early_stopping_patience else "",
            1 / len(validation.truths),
        )
    _write_parity_photos(source, split, out)
    started = time.perf_counter()
    stages = _stages(config, steps)
    for stage in stages:
        _fit_stage(stage, config, model, strategy, plan, dataset, out, validation, embedder)
    train_seconds = time.perf_counter() - started
    best = best_record(out / "checkpoints") if config.early_stopping_patience else None
    if best is not None and stages:
        load_model_weights(model, out / "checkpoints" / "best.weights.h5")
        log.info("keeping epoch %d (%s %.4f)", best["epoch"], BEST_MONITOR, best[BEST_MONITOR])
    model.save(out / MODEL_FILE)
    searched = _search_head(config, validation, embedder, out)
    history = _history(out)
    summary = {
        "name": config.name,
        "version": config.version,
        "model": MODEL_FILE,
        "backbone": config.backbone,
        "preprocessing": {
            "input_size": config.input_size,
            "resize": config.resize,
            "pixel_range": config.pixel_range,
        },
        "data": {
            "source": config.shards or config.catalogue,
            "photos": len(source.entries),
            **split.summary(),
        },
        "epochs": len(history),
        "steps_per_epoch": steps,
        "steps_per_execution": plan.steps_per_execution,
        "global_batch": global_batch,
        "strategy": type(strategy).__name__,
        "replicas": replicas,
        "train_seconds_last_session": round(train_seconds, 1),
        "last_epoch": history[-1] if history else {},
        "best_epoch": best if stages else None,
        "stages": [stage.name for stage in stages],
        **searched,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("run finished: %s", out / SUMMARY)
    return summary
