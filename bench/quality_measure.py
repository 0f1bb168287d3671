"""The measuring half of ``bench/quality.py``: for every set and mode, a fresh data directory,
``whaleid evaluate`` on the split's queries and ``POST /identify`` timed from a client; the
figures as records (``SetResult``, ``ModeResult``) and as the raw ``results.json`` that
``bench/quality_report.py`` renders."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shlex
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench._common import DEMO_MODEL, cpu_name, git_commit, load_average, utc_now
from bench.quality_cli import Cli, CommandFailed, capabilities, registered_id
from bench.quality_data import REAL_SETS, DataSet, Photo, synthetic
from bench.quality_modes import Case, Mode, ModeUnavailable, TrainOptions
from bench.quality_split import (
    SEED,
    Split,
    all_new_map5,
    cannot_train,
    chance_map5,
    known_after_new,
    split,
    take,
    write_csv,
)

log = logging.getLogger("bench.quality")


@dataclass
class ModeResult:
    mode: str
    status: str  # "ran", "not run" or "failed"
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    setup_s: float = 0.0
    evaluate_s: float = 0.0
    wall_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    # Trained modes: recipe, config, overrides, run, cached, train_wall_s,
    # train_seconds_last_session, epochs, kept_epoch, head, best_val_map5, best_val_queries,
    # data (the trainer's split), export_s, export_args, model_mb.
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class SetResult:
    key: str
    title: str
    protocol: list[str]
    reading: str
    species_filter: bool
    counts: dict[str, int]
    chance: float
    all_new: float
    modes: list[ModeResult]
    setup_s: float = 0.0


def prepare_case(
    data: DataSet,
    s: Split,
    folder: Path,
    features: dict[str, bool],
    train: TrainOptions | None = None,
) -> Case:
    """A fresh data directory: schema, the demo model active, the gallery imported. Training
    runs go to ``runs`` beside the mode folders (``SCRATCH/<set>/runs``), which outlive them."""
    shutil.rmtree(folder, ignore_errors=True)
    cli = Cli(folder / "data", folder / "logs")
    cli.whaleid("db", "upgrade")
    demo_id = registered_id(cli.whaleid("models", "add", str(DEMO_MODEL), "--activate"), cli)
    gallery_csv = write_csv(folder / "gallery.csv", s.gallery)
    queries_csv = write_csv(folder / "queries.csv", s.queries)
    calibration_csv = (
        write_csv(folder / "calibration.csv", s.calibration) if s.calibration else None
    )
    cli.whaleid("import", str(gallery_csv), "--images", str(data.images), "--strict", timeout=1800)
    return Case(
        data,
        cli,
        demo_id,
        gallery_csv,
        queries_csv,
        calibration_csv,
        features,
        runs=folder.parent / "runs",
        train=train or TrainOptions(),
    )


def timed_identify(case: Case, sample: Sequence[Photo]) -> dict[str, float]:
    """Client-side milliseconds of ``POST /identify`` (recorded, as a caller's request is) for
    each photo of ``sample``, after two warm-up requests."""
    key = case.cli.whaleid(
        "keys", "create", "--role", "integration", "--name", "quality-bench"
    ).stdout.strip()
    times = []
    with (
        case.cli.serve() as url,
        httpx.Client(
            base_url=url, timeout=300, headers={"Authorization": f"Bearer {key}"}
        ) as client,
    ):
        for i, photo in enumerate(tqdm([*sample[:2], *sample], desc="identify", unit="query")):
            data = (case.data.images / photo.image).read_bytes()
            form = {"species": photo.species} if case.data.species_filter else {}
            started = time.perf_counter()
            response = client.post(
                "/identify", files={"photo": (Path(photo.image).name, data)}, data=form
            )
            elapsed = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if i >= 2:
                times.append(elapsed)
    times.sort()
    return {
        "p50": times[len(times) // 2],
        "p90": times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)],
        "n": float(len(times)),
    }


def run_mode(
    mode: Mode,
    data: DataSet,
    s: Split,
    folder: Path,
    features: dict[str, bool],
    timed: int,
    train: TrainOptions | None = None,
) -> ModeResult:
    result = ModeResult(mode.name, "ran")
    started = time.perf_counter()
    if mode.recipe is not None and (why := cannot_train(s)):
        result.status, result.reason = "not run", why
        log.warning("%s on %s: not run: %s", mode.name, data.key, why)
        return result
    case: Case | None = None
    try:
        case = prepare_case(data, s, folder, features, train)
        prepared = mode.prepare(case)
        result.notes = list(prepared.notes)
        result.setup_s = time.perf_counter() - started
        args = ["evaluate", str(case.queries_csv), "--images", str(data.images)]
        if data.species_filter:
            args.append("--species-filter")
        try:
            done = case.cli.whaleid(*args, *prepared.evaluate_args, timeout=3600)
        except CommandFailed as e:
            if not prepared.evaluate_args:
                raise
            # The setup worked but evaluate does not take this mode's arguments yet.
            raise ModeUnavailable(str(e)) from e
        result.summary = json.loads(done.stdout)
        result.evaluate_s = done.seconds
        sample = take(list(s.queries), timed, random.Random(SEED))
        try:
            if sample:  # --timed 0: no latency measured
                result.latency_ms = timed_identify(case, sample)
        except (CommandFailed, httpx.HTTPError) as e:
            result.notes.append(f"timed /identify failed: {e}")
    except ModeUnavailable as e:
        result.status, result.reason = "not run", str(e)
        log.warning("%s on %s: not run: %s", mode.name, data.key, e)
    except CommandFailed as e:
        result.status, result.reason = "failed", str(e)
        log.error("%s on %s failed: %s", mode.name, data.key, e)
    if case is not None:
        result.training = dict(case.training)
    result.wall_s = time.perf_counter() - started
    return result


def measure(
    data: DataSet,
    modes: Sequence[Mode],
    scratch: Path,
    features: dict[str, bool],
    args: argparse.Namespace,
) -> SetResult:
    s = split(data, args.seed, args.max_queries)
    counts = s.counts()
    log.info("%s: %s", data.key, counts)
    if args.retrain:
        for recipe in sorted({m.recipe for m in modes if m.recipe is not None}):
            run = scratch / data.key / "runs" / recipe
            if run.exists():
                log.info("--retrain: deleting %s", run)
                shutil.rmtree(run)
    results = []
    for mode in modes:
        log.info("%s: mode %s", data.key, mode.name)
        results.append(
            run_mode(
                mode, data, s, scratch / data.key / mode.name, features, args.timed, args.train
            )
        )
    return SetResult(
        data.key,
        data.title,
        data.protocol,
        data.reading,
        data.species_filter,
        counts,
        chance_map5(data, s),
        all_new_map5(s, known_after_new(s, data)),
        results,
    )


def environment() -> dict[str, str]:
    return {
        "date": utc_now(),
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "commit": git_commit(),
        "load": load_average(),
    }


def measure_all(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    modes: list[Mode] = args.selected
    wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    env = environment()
    features = capabilities(Cli(None, scratch / "logs"))
    log.info("whaleid evaluate accepts: %s", features)
    sets = []
    for key in tqdm(wanted, desc="sets", unit="set"):
        started = time.perf_counter()
        if key == "synthetic":
            data = synthetic(scratch, Cli(None, scratch / "logs"))
        elif (args.data / key / "labels.csv").exists():
            data = REAL_SETS[key](args.data / key, scratch)
        else:
            log.warning("no %s under %s: skipped", key, args.data)
            continue
        result = measure(data, modes, scratch, features, args)
        result.setup_s = time.perf_counter() - started
        sets.append(asdict(result))
    return {
        "env": env,
        "features": features,
        "modes_requested": [m.name for m in modes],
        "seed": args.seed,
        "command": " ".join(
            ["PYTHONPATH=$PWD .venv/bin/python bench/quality.py", *map(shlex.quote, args.argv)]
        ),
        "sets": sets,
    }
