"""The identification modes of ``bench/quality.py``: what each sets up on a case's data directory
before ``whaleid evaluate`` runs (a matcher, a calibration, verification), and for the trained
modes the training run (``.venv-train``), its export and registration, reused while the config,
overrides and gallery are the same."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import ROOT
from bench.quality_cli import Cli, CommandFailed, _tail, models, registered_id
from bench.quality_data import DataSet

log = logging.getLogger("bench.quality")

TRAIN_PYTHON = ROOT / ".venv-train" / "bin" / "python"
TRAIN_CONFIGS = ROOT / "training" / "configs"
TRAIN_TIMEOUT = 45 * 60
EXPORT_TIMEOUT = 30 * 60


class ModeUnavailable(RuntimeError):
    """This checkout's command line cannot run the mode (yet)."""


@dataclass(frozen=True)
class Recipe:
    """How a trained mode's model is trained: a config file of ``training/configs`` and
    ``--set`` overrides. ``name`` is the run folder under ``SCRATCH/<set>/runs``."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()


RECIPES = {
    # The same recipe from random weights: nothing to freeze, no pretrained layers to spare (every
    # layer at the head's rate, BatchNorm statistics learnt), and a from-scratch learning rate.
    "scratch": Recipe(
        "scratch",
        "lite0-small-catalogue.yaml",
        (
            "weights=none",
            "freeze_epochs=0",
            "backbone_lr_scale=1",
            "layer_decay=1",
            "freeze_batchnorm=false",
            "schedule.peak=2e-3",
        ),
    ),
    "frozen": Recipe("frozen", "lite0-frozen.yaml"),
    "finetuned": Recipe("finetuned", "lite0-small-catalogue.yaml"),
}


@dataclass(frozen=True)
class TrainOptions:
    """The command line's say over the trained modes: another config file per recipe (or for
    all), extra ``--set`` overrides for every run, and the training interpreter."""

    configs: dict[str, Path] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    python: Path = TRAIN_PYTHON
    # whaleid-export --service-tolerance (None: the exporter's default).
    service_tolerance: float | None = None
    timeout_s: float = TRAIN_TIMEOUT

    def config(self, recipe: Recipe) -> Path:
        return (
            self.configs.get(recipe.name)
            or self.configs.get("*")
            or TRAIN_CONFIGS / (recipe.config)
        )

    def overrides(self, recipe: Recipe) -> tuple[str, ...]:
        return (*recipe.overrides, *self.extra)


@dataclass
class Case:
    """One set's split as files, and a data directory with the demo model active over its
    gallery: what every mode starts from. ``runs`` holds the set's training runs; a trained
    mode records what its training and export took in ``training``."""

    data: DataSet
    cli: Cli
    demo_id: int
    gallery_csv: Path
    queries_csv: Path
    calibration_csv: Path | None
    features: dict[str, bool]
    runs: Path | None = None
    train: TrainOptions = field(default_factory=TrainOptions)
    training: dict[str, Any] = field(default_factory=dict)
    # A mode fitted on the gallery: the figures `models calibrate ID` printed (expected MAP@5).
    fitted: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """What a mode evaluates with: extra ``whaleid evaluate`` arguments, and notes."""

    evaluate_args: tuple[str, ...]
    notes: tuple[str, ...] = ()


def _model_arg(case: Case, model_id: int) -> tuple[str, ...]:
    return ("--model", str(model_id)) if case.features["model"] else ()


def prepare_global(case: Case) -> Prepared:
    head = next(r for r in models(case.cli) if r.id == case.demo_id)
    return Prepared(
        (), (f"kNN head of the model: k {head.k}, cutoff {head.cutoff}, {head.ranking}",)
    )


def prepare_local(case: Case) -> Prepared:
    try:
        added = case.cli.whaleid("models", "add", "builtin:local-features")
        model_id = registered_id(added, case.cli)
        case.cli.whaleid("models", "activate", str(model_id), timeout=1800)
    except CommandFailed as e:
        raise ModeUnavailable(str(e)) from e
    notes = [f"local-features model id {model_id}"]
    if case.calibration_csv is not None:
        notes.append(calibrate(case, model_id))
    return Prepared(_model_arg(case, model_id), tuple(notes))


def calibrate(case: Case, model_id: int) -> str:
    """``whaleid models calibrate`` on the calibration split; what happened, as a note."""
    try:
        case.cli.whaleid(
            "models",
            "calibrate",
            str(model_id),
            str(case.calibration_csv),
            "--images",
            str(case.data.images),
            timeout=1800,
        )
    except CommandFailed as e:
        return f"`models calibrate` failed ({e.why}): default calibration"
    return "calibrated on the calibration split (`models calibrate`)"


def fit_on_gallery(case: Case, model_id: int, *extra: str) -> str:
    """``whaleid models calibrate ID`` with no CSV: the open-set decision fitted on the gallery
    (no labelled query); its figures, as a note (the expected MAP@5 the report compares with the
    measured one). ``extra``: more arguments (``--aggregation max``)."""
    try:
        done = case.cli.whaleid("models", "calibrate", str(model_id), *extra, timeout=3600)
    except CommandFailed as e:
        raise ModeUnavailable(f"`models calibrate` on the gallery failed: {e.why}") from e
    f = json.loads(done.stdout)
    case.fitted = f
    q = f["queries"]
    c = f.get("calibration")
    fitted = ""
    if c:
        tried = ", ".join(f"{k} {v:.3f}" for k, v in (c.get("tried") or {}).items())
        fitted = (
            f"calibration fitted on {c['pairs']} gallery pairs ({c['matches']} right), "
            f"aggregation {c['aggregation']} (expected MAP@5 of each: {tried}); "
        )
    return fitted + (
        f"fitted on the gallery (`models calibrate {model_id}`, {done.seconds:.0f} s): "
        f"{f['mode']} {f['value']} (was {f['start']}), p_new {f['p_new']}; expected MAP@5 "
        f"{f['expected_map5']:.3f} (known {f['map5_known']:.3f}, unseen {f['map5_unseen']:.3f}), "
        f"known answered new first {100 * f['known_new_first']:.0f} %; "
        f"{q['known_photos']} known queries of {q['known_animals']} animals, "
        f"{q['unseen_photos']} unseen of {q['unseen_animals']}"
    )


def prepare_global_fitted(case: Case) -> Prepared:
    prepared = prepare_global(case)
    return Prepared(prepared.evaluate_args, (fit_on_gallery(case, case.demo_id),))


def prepare_local_fitted(case: Case) -> Prepared:
    """The local-features matcher with its threshold fitted on the gallery only: no
    calibration split (``local`` calibrates on it)."""
    try:
        added = case.cli.whaleid("models", "add", "builtin:local-features")
        model_id = registered_id(added, case.cli)
        case.cli.whaleid("models", "activate", str(model_id), timeout=1800)
    except CommandFailed as e:
        raise ModeUnavailable(str(e)) from e
    notes = (f"local-features model id {model_id}", fit_on_gallery(case, model_id))
    return Prepared(_model_arg(case, model_id), notes)


def prepare_fused(case: Case) -> Prepared:
    return verified(case, case.demo_id, [])


def _verify_rerank(case: Case, model_id: int) -> None:
    """``models verify ID --mode rerank``, where ``whaleid evaluate`` can use it."""
    try:
        case.cli.whaleid("models", "verify", str(model_id), "--mode", "rerank")
    except CommandFailed as e:
        raise ModeUnavailable(str(e)) from e
    if not case.features["verification"]:
        raise ModeUnavailable("`whaleid evaluate` has no --verification option")


def fitted_fusion(case: Case, model_id: int, notes: list[str], aggregation: str) -> Prepared:
    """Verification ``rerank`` on ``model_id``, its calibration and threshold fitted on the
    gallery alone (``models calibrate ID`` with no CSV; ``aggregation``: ``--aggregation``)."""
    _verify_rerank(case, model_id)
    notes.append(fit_on_gallery(case, model_id, "--aggregation", aggregation))
    return Prepared(("--verification", "rerank", *_model_arg(case, model_id)), tuple(notes))


def prepare_fused_fitted(aggregation: str) -> Callable[[Case], Prepared]:
    def prepare(case: Case) -> Prepared:
        return fitted_fusion(case, case.demo_id, [], aggregation)

    return prepare


def prepare_fused_trained_fitted(recipe: str, aggregation: str) -> Callable[[Case], Prepared]:
    def prepare(case: Case) -> Prepared:
        model_id, notes = activate_trained(case, RECIPES[recipe])
        return fitted_fusion(case, model_id, notes, aggregation)

    return prepare


def verified(case: Case, model_id: int, notes: list[str]) -> Prepared:
    """Verification ``rerank`` on ``model_id``, calibrated on the calibration split when the set
    has one."""
    if case.calibration_csv is None:
        notes.append("no calibration split: default calibration")
    else:
        notes.append(calibrate(case, model_id))
    _verify_rerank(case, model_id)
    return Prepared(("--verification", "rerank", *_model_arg(case, model_id)), tuple(notes))


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def trained_model(case: Case, recipe: Recipe) -> Path:
    """Train ``recipe`` on the case's gallery (or reuse the finished run of the same config,
    overrides and gallery), export it to ONNX, and record the figures in ``case.training``;
    the ONNX file."""
    assert case.runs is not None, "a trained mode needs the set's runs folder"
    config = case.train.config(recipe)
    if not config.is_file():
        raise ModeUnavailable(f"no training config {config}")
    if not case.train.python.exists():
        raise ModeUnavailable(f"no training virtualenv ({case.train.python}): see docs/training.md")
    run = case.runs / recipe.name
    # The trainer keeps the catalogue's path in the run's config: one stable file per set.
    case.runs.mkdir(parents=True, exist_ok=True)
    catalogue = case.runs / "gallery.csv"
    gallery = case.gallery_csv.read_text()
    if not catalogue.exists() or catalogue.read_text() != gallery:
        catalogue.write_text(gallery)
    overrides = (
        f"catalogue={catalogue}",
        f"images={case.data.images.resolve()}",
        f"output={run}",
        *case.train.overrides(recipe),
    )
    # What the model depends on, not where this run's files lie: the config, the extra
    # overrides, the gallery and the photos' folder by name. A new --scratch whose runs folder
    # links to finished runs reuses them (a key with the paths in it retrained them, and
    # removed the linked runs first).
    key = _fingerprint(
        config.name,
        config.read_text(),
        *case.train.overrides(recipe),
        gallery,
        case.data.images.resolve().name,
    )
    key_file, record_file, summary_file = (
        run / "bench-key.txt",
        run / "bench.json",
        run / "summary.json",
    )
    if run.exists() and (not key_file.exists() or key_file.read_text() != key):
        log.info("%s: config, overrides or gallery changed since the run: training again", run)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    record = _read_json(record_file)
    case.training.update(
        recipe=recipe.name,
        config=str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        overrides=list(case.train.overrides(recipe)),
        run=str(run),
        cached=summary_file.exists(),
    )
    if not summary_file.exists():
        sets = [a for o in overrides for a in ("--set", o)]
        # An earlier session of this run that timed out or failed: the trainer resumes from its
        # last finished epoch, and the wall time counts both.
        before = float(record.get("interrupted_s", 0.0))
        started = time.perf_counter()
        try:
            done = case.cli.python(
                "-m",
                "training",
                "train",
                "--config",
                str(config.resolve()),
                *sets,
                timeout=case.train.timeout_s,
                interpreter=case.train.python,
            )
        except CommandFailed:
            record["interrupted_s"] = before + time.perf_counter() - started
            record_file.write_text(json.dumps(record, indent=2) + "\n")
            raise
        if not summary_file.exists():
            raise CommandFailed(
                ["whaleid-train", "train"], "wrote no summary.json", _tail(done.stderr)
            )
        record = {"train_wall_s": before + done.seconds}
        if before:
            record["resumed_after_s"] = before
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    summary = _read_json(summary_file)
    validation = summary.get("validation") or {}
    best = validation.get("best") or {}
    kept = summary.get("best_epoch")
    case.training.update(
        train_wall_s=record.get("train_wall_s"),
        # Wall time of earlier sessions of the run (timed out or failed), included above.
        resumed_after_s=record.get("resumed_after_s"),
        train_seconds_last_session=summary.get("train_seconds_last_session"),
        epochs=summary.get("epochs"),
        # The epoch whose weights the trainer kept (early stopping), when it says.
        kept_epoch=kept.get("epoch") if isinstance(kept, dict) else kept,
        head=summary.get("head"),
        best_val_map5=best.get("map5"),
        best_val_queries=best.get("queries"),
        data=summary.get("data"),
    )
    onnx = run / "model.onnx"
    tolerance: list[str] = []
    if case.train.service_tolerance is not None:
        tolerance = ["--service-tolerance", str(case.train.service_tolerance)]
    if "export_s" not in record or not onnx.exists() or record.get("export_args") != tolerance:
        onnx.unlink(missing_ok=True)
        done = case.cli.python(
            "-m",
            "model_export",
            str(run / "model.keras"),
            "--out",
            str(onnx),
            # Its own version: the run's name and version may be the demo model's (registered
            # in the same data directory), which `models add` refuses for another file.
            "--version",
            f"bench-{case.data.key}-{recipe.name}",
            *tolerance,
            timeout=EXPORT_TIMEOUT,
            interpreter=case.train.python,
        )
        record.update(export_s=done.seconds, export_args=tolerance)
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    case.training.update(
        export_s=record["export_s"],
        export_args=tolerance,
        model_mb=onnx.stat().st_size / 1e6,
    )
    return onnx


def activate_trained(case: Case, recipe: Recipe) -> tuple[int, list[str]]:
    """Train (or reuse) and export ``recipe``, register the model, embed the gallery with it."""
    onnx = trained_model(case, recipe)
    model_id = registered_id(
        case.cli.whaleid("models", "add", str(onnx), "--activate", timeout=1800), case.cli
    )
    head = next(r for r in models(case.cli) if r.id == model_id)
    t = case.training
    notes = [
        f"{recipe.name} run ({'reused' if t['cached'] else 'trained now'}): {t['config']}"
        + (f" with {', '.join(t['overrides'])}" if t["overrides"] else ""),
        f"kNN head of the model: k {head.k}, cutoff {head.cutoff}, {head.ranking}",
    ]
    if t["export_args"]:
        notes.append(f"exported with {' '.join(t['export_args'])}")
    return model_id, notes


def prepare_trained(recipe: str) -> Callable[[Case], Prepared]:
    def prepare(case: Case) -> Prepared:
        model_id, notes = activate_trained(case, RECIPES[recipe])
        return Prepared(_model_arg(case, model_id), tuple(notes))

    return prepare


def prepare_fused_trained(recipe: str) -> Callable[[Case], Prepared]:
    def prepare(case: Case) -> Prepared:
        model_id, notes = activate_trained(case, RECIPES[recipe])
        return verified(case, model_id, notes)

    return prepare


# The suffixes of the fitted-fusion modes and the aggregation each forces ("": chosen on the
# gallery).
_AGGREGATION_MODES = (("", "auto"), ("-max", "max"), ("-two", "best-two"), ("-mix", "mix"))


@dataclass(frozen=True)
class Mode:
    name: str
    prepare: Callable[[Case], Prepared]
    # The training recipe the mode's model comes from (None: no training).
    recipe: str | None = None


MODES = {
    "global": Mode("global", prepare_global),
    "local": Mode("local", prepare_local),
    "fused": Mode("fused", prepare_fused),
    "scratch": Mode("scratch", prepare_trained("scratch"), "scratch"),
    "frozen": Mode("frozen", prepare_trained("frozen"), "frozen"),
    "finetuned": Mode("finetuned", prepare_trained("finetuned"), "finetuned"),
    "fused-finetuned": Mode("fused-finetuned", prepare_fused_trained("finetuned"), "finetuned"),
    # The open-set decision fitted on the gallery (issue 26): no labelled query used.
    "global-fitted": Mode("global-fitted", prepare_global_fitted),
    "local-fitted": Mode("local-fitted", prepare_local_fitted),
    # The fusion's calibration and threshold fitted on the gallery's pairs (issue 26, item 2):
    # the aggregation chosen on the gallery (auto), or one forced.
    **{
        f"fused-fitted{suffix}": Mode(f"fused-fitted{suffix}", prepare_fused_fitted(aggregation))
        for suffix, aggregation in _AGGREGATION_MODES
    },
    **{
        f"fused-finetuned-fitted{suffix}": Mode(
            f"fused-finetuned-fitted{suffix}",
            prepare_fused_trained_fitted("finetuned", aggregation),
            "finetuned",
        )
        for suffix, aggregation in _AGGREGATION_MODES
    },
}
