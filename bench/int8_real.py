"""int8 against fp32 on the real sets, through the service's path: the fine-tuned
EfficientNet-Lite0 runs that ``bench/quality.py`` trained (``SCRATCH/<set>/runs/finetuned``) are
exported in int8 and both models answer the same test split.

For each set:

1. ``python -m model_export RUN/model.keras --quantize int8`` (the training virtualenv). If the
   export's gate refuses the model, the refusal is recorded; when the documented override
   applies (``--int8-accept-unjudged`` for too few validation queries, ``--int8-min-cosine 0``
   for a cosine refusal) it is exported again with it, *only to measure*, and the report says so.
2. MAP@5 of each model by ``whaleid evaluate`` on a data directory of its own (``models add
   --activate``, the split's gallery imported, so embedded by that model): decode and
   preprocessing by ``service.imaging``, the service's ``Embedder``, its gallery index and the
   model's own kNN head. Each query's AP@5 comes from the predictions it writes; the paired
   difference gets the export gate's bootstrap interval (``model_export.map5_drop``).
3. Embed milliseconds per photo (one query photo, decoded and preprocessed once) of both models
   in this process, taking turns in blocks of ten (``model_export.compare.interleaved_seconds``),
   while holding ``--lock`` (``flock``), so that no other timing run on the machine overlaps.

The split (gallery.csv, queries.csv) is the one the quality bench evaluated the ``finetuned``
mode on, so the fp32 MAP@5 here reproduces docs/identification-quality.md's figure.

    PYTHONPATH=$PWD .venv/bin/python bench/int8_real.py [--scratch /tmp/qs-final] \
        [--sets holstein_cow_faces_holstein2025,orl_faces] [--markdown int8.md]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, setup_logging  # noqa: E402
from bench.quality_cli import Cli, registered_id  # noqa: E402
from bench.quality_modes import TRAIN_PYTHON  # noqa: E402
from model_export.map5_drop import bootstrap_interval, judge_map5_drop  # noqa: E402
from service.catalogue.csv_file import read_catalogue  # noqa: E402
from service.knn import NEW_INDIVIDUAL, average_precision_at_5  # noqa: E402

log = logging.getLogger("bench.int8_real")

SETS = (
    "holstein_cow_faces_holstein2025",
    "orl_faces",
    "marine_photoid_kabuga",
    "harbour_seals_pieterburen",
)
RUN = Path("runs") / "finetuned"
SPLIT = Path("finetuned")  # the quality bench's mode folder: gallery.csv, queries.csv
BLOCK = 10
# The export's refusals that a documented flag overrides, and the flag (used only to measure).
OVERRIDES = (
    ("too few validation queries", ("--int8-accept-unjudged",)),
    ("stray from fp32", ("--int8-min-cosine", "0")),
)


@dataclass
class Export:
    """How the int8 file came to be: the gate's check as logged, the refusals of the gate (None
    when it passed) and the overrides then used to write it anyway, to measure."""

    check: str
    refused: str | None = None
    override: tuple[str, ...] = ()


def override_for(refusal: str) -> tuple[str, ...] | None:
    """The documented flag that writes a model the gate refused for this reason, or None."""
    return next((flag for reason, flag in OVERRIDES if reason in refusal), None)


def last_line(text: str, marker: str) -> str:
    """The last log line holding ``marker``, from ``marker`` on ('' if none)."""
    lines = [line for line in text.splitlines() if marker in line]
    return lines[-1].split(marker, 1)[1].strip() if lines else ""


def export_int8(keras_model: Path, out: Path, logs: Path) -> Export:
    """Export in int8; on a refusal with a documented override, export again with it. An int8
    file newer than the model, with its record beside it, is reused."""
    record = out.with_suffix(".json")
    if record.is_file() and out.is_file() and out.stat().st_mtime > keras_model.stat().st_mtime:
        log.info("reusing %s", out)
        kept = json.loads(record.read_text())
        return Export(kept["check"], kept["refused"], tuple(kept["override"]))
    export = _export_int8(keras_model, out, logs)
    record.write_text(json.dumps(asdict(export), indent=2) + "\n")
    return export


def _export_int8(keras_model: Path, out: Path, logs: Path) -> Export:
    args = ["-m", "model_export", str(keras_model), "--out", str(out), "--quantize", "int8"]
    refusals: list[str] = []
    used: list[str] = []
    while True:
        done = subprocess.run(
            [str(TRAIN_PYTHON), *args, *used],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=False,
        )
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"export-{len(refusals)}.log").write_text(done.stderr)
        check = last_line(done.stderr, "int8 check:")
        if done.returncode == 0:
            return Export(check, "; ".join(refusals) or None, tuple(used))
        refusal = last_line(done.stderr, "not exported:") or done.stderr[-500:]
        flag = override_for(refusal)
        if flag is None or flag[0] in used:
            raise RuntimeError(f"int8 export of {keras_model} refused: {refusal}")
        log.warning("int8 export refused (%s): exporting again with %s to measure", refusal, flag)
        refusals.append(refusal)
        used += flag


def truths(gallery_csv: Path, queries_csv: Path) -> dict[str, str]:
    """Each query image's right first answer, as ``whaleid evaluate`` scores it."""
    known = {r.individual_id for r in read_catalogue(gallery_csv) if not isinstance(r, tuple)}
    return {
        r.image: r.individual_id if r.individual_id in known else NEW_INDIVIDUAL
        for r in read_catalogue(queries_csv, new_individual_allowed=True)
        if not isinstance(r, tuple)
    }


def query_aps(predictions_csv: Path, truth: dict[str, str]) -> dict[str, float]:
    """Each query's AP@5 from ``whaleid evaluate --predictions``."""
    with predictions_csv.open(newline="") as f:
        return {
            row["image"]: average_precision_at_5(row["predictions"].split(), truth[row["image"]])
            for row in csv.DictReader(f)
        }


def evaluate(
    model: Path, folder: Path, split: Path, images: Path, species_filter: bool
) -> tuple[dict[str, Any], dict[str, float]]:
    """``whaleid evaluate``'s summary and each query's AP@5 with ``model`` active, on a fresh
    data directory whose gallery it embedded."""
    shutil.rmtree(folder, ignore_errors=True)
    cli = Cli(folder / "data", folder / "logs")
    cli.whaleid("db", "upgrade")
    model_id = registered_id(cli.whaleid("models", "add", str(model), "--activate"), cli)
    gallery, queries = split / "gallery.csv", split / "queries.csv"
    cli.whaleid("import", str(gallery), "--images", str(images), "--strict", timeout=3600)
    predictions = folder / "predictions.csv"
    args = ["evaluate", str(queries), "--images", str(images), "--model", str(model_id)]
    args += ["--predictions", str(predictions)] + (["--species-filter"] if species_filter else [])
    summary = json.loads(cli.whaleid(*args, timeout=3600).stdout)
    aps = query_aps(predictions, truths(gallery, queries))
    if abs(float(np.mean(list(aps.values()))) - summary["map5"]) > 1e-9:
        raise RuntimeError(f"per-query AP@5 of {predictions} do not average to the MAP@5")
    return summary, aps


def paired(fp32: dict[str, float], int8: dict[str, float]) -> dict[str, Any]:
    """MAP@5 of each with a bootstrap interval, and the paired drop (fp32 - int8) judged as the
    export's gate judges it."""
    images = sorted(fp32)
    a = np.array([fp32[i] for i in images])
    b = np.array([int8[i] for i in images])
    drop = judge_map5_drop(a, b)
    return {
        "queries": len(images),
        "fp32_map5": float(a.mean()),
        "fp32_interval": bootstrap_interval(a),
        "int8_map5": float(b.mean()),
        "int8_interval": bootstrap_interval(b),
        "drop": float(drop.mean),
        "drop_interval": (drop.low, drop.high),
        "drop_verdict": f"{drop.verdict}: {drop.reason()}",
        "queries_answered_differently": int(np.sum(a != b)),
    }


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold ``flock(path)`` (as ``flock PATH command`` does) for the block."""
    with path.open("a") as f:
        log.info("waiting for %s", path)
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def embed_ms(models: Sequence[Path], photo: bytes, rounds: int, lock: Path) -> list[dict[str, Any]]:
    """p50/p90 ms per ``Embedder.embed`` of one preprocessed photo, models interleaved."""
    from model_export.compare import interleaved_seconds
    from service.imaging import decode_photo, to_model_input
    from service.onnx.embedder import Embedder
    from service.settings import Settings

    embedders = [Embedder(m) for m in models]
    inputs = []
    for e in embedders:
        spec = e.contract.preprocessing
        image = decode_photo(
            photo, max_pixels=Settings().max_image_pixels, target_size=spec.input_size
        ).image
        inputs.append(to_model_input(image, spec)[None])
    with locked(lock):
        seconds = interleaved_seconds(embedders, inputs, rounds, BLOCK)
    return [
        {"p50_ms": 1000 * float(np.median(s)), "p90_ms": 1000 * float(np.percentile(s, 90))}
        | {"calls": len(s)}
        for s in seconds
    ]


def species_filtered(scratch: Path, key: str) -> bool:
    """Whether the quality bench evaluated this set with the species filter."""
    results = scratch / "results.json"
    if not results.is_file():
        return False
    sets = json.loads(results.read_text()).get("sets", [])
    return any(s.get("key") == key and s.get("species_filter") for s in sets)


def measure_set(scratch: Path, key: str, work: Path, rounds: int, lock: Path) -> dict[str, Any]:
    run, split = scratch / key / RUN, scratch / key / SPLIT
    images = Path(json.loads((run / "config.json").read_text())["images"])
    fp32, int8 = run / "model.onnx", work / key / "model-int8.onnx"
    export = export_int8(run / "model.keras", int8, work / key / "logs")
    log.info("%s: int8 exported: %s", key, export.check)
    species = species_filtered(scratch, key)
    summary32, ap32 = evaluate(fp32, work / key / "fp32", split, images, species)
    summary8, ap8 = evaluate(int8, work / key / "int8", split, images, species)
    first = next(r for r in read_catalogue(split / "queries.csv") if not isinstance(r, tuple))
    timing = embed_ms([fp32, int8], (images / first.image).read_bytes(), rounds, lock)
    return {
        "set": key,
        "export": asdict(export),
        "species_filter": species,
        "map5": paired(ap32, ap8),
        "summary": {"fp32": summary32, "int8": summary8},
        "embed": {"fp32": timing[0], "int8": timing[1]},
        "size_mb": {"fp32": fp32.stat().st_size / 1e6, "int8": int8.stat().st_size / 1e6},
    }


def _interval(pair: Sequence[float]) -> str:
    return f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"


def render(rows: Sequence[dict[str, Any]], command: str) -> str:
    """The markdown table of the results."""
    lines = [
        "| set | queries | fp32 MAP@5 | int8 MAP@5 | Δ (int8 − fp32), 95 % paired CI | "
        "queries answered differently | embed p50 fp32 / int8 | size fp32 / int8 | int8 export |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, e, s, x = r["map5"], r["embed"], r["size_mb"], r["export"]
        low, high = m["drop_interval"]
        gate = "passed" if x["refused"] is None else f"refused; `{' '.join(x['override'])}`"
        lines.append(
            f"| {r['set']} | {m['queries']} | {m['fp32_map5']:.3f} | {m['int8_map5']:.3f} "
            f"| {-m['drop']:+.3f} {_interval((-high, -low))} "
            f"| {m['queries_answered_differently']} "
            f"| {e['fp32']['p50_ms']:.1f} / {e['int8']['p50_ms']:.1f} ms "
            f"({e['fp32']['p50_ms'] / e['int8']['p50_ms']:.2f}x) "
            f"| {s['fp32']:.1f} / {s['int8']:.1f} MB | {gate} |"
        )
    lines += ["", f"Reproduce: `{command}`"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", default="/tmp/qs-final", help="bench/quality.py's --scratch")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated set keys")
    parser.add_argument("--work", default="/tmp/int8-real", help="int8 files, data directories")
    parser.add_argument("--rounds", type=int, default=6, help="timing rounds of 10 calls each")
    parser.add_argument("--lock", default="/tmp/bench.lock", help="held while timing")
    parser.add_argument("--out", help="results JSON (default: WORK/results.json)")
    parser.add_argument("--markdown", help="write the table here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("%(asctime)s %(levelname)s %(message)s", quiet=())
    scratch, work = Path(args.scratch), Path(args.work)
    rows = [
        measure_set(scratch, key, work, args.rounds, Path(args.lock))
        for key in args.sets.split(",")
    ]
    out = Path(args.out) if args.out else work / "results.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    command = "PYTHONPATH=$PWD .venv/bin/python bench/int8_real.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    table = render(rows, command.strip())
    log.info("results in %s\n%s", out, table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
