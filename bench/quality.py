"""Identification quality on real photo sets and a synthetic catalogue; writes
docs/identification-quality.md.

For every set (../shared/data/*, read in place, and the synthetic catalogue of
``training.synthetic``) the photos are split by encounter into a gallery, evaluation queries and,
where a set is large enough, a calibration split; about a fifth of the individuals (seeded) have no
gallery photo, so their right answer is ``new_individual``. Then each identification mode runs
through the real command line, in a subprocess with a throw-away data directory:

1. ``global``: the demo model and its kNN head;
2. ``local``: the built-in ``local-features`` matcher;
3. ``fused``: the demo model with verification ``rerank`` (after ``models calibrate`` on the
   calibration split when the set has one);
4. ``scratch``: EfficientNet-Lite0 trained from random weights on the set's gallery
   (``training/configs/lite0-small-catalogue.yaml`` with ``weights=none``, no frozen stage, every
   layer at the head's learning rate, BatchNorm statistics learnt, peak learning rate 2e-3);
5. ``frozen``: ImageNet EfficientNet-Lite0 features, not trained at all
   (``training/configs/lite0-frozen.yaml``, 0 epochs; the trainer still chooses the kNN head's
   k and cutoff on its validation fold);
6. ``finetuned``: ImageNet EfficientNet-Lite0 fine-tuned on the set's gallery
   (``training/configs/lite0-small-catalogue.yaml``);
7. ``fused-finetuned``: ``fused`` with the ``finetuned`` model in place of the demo model.

The trained modes (4-7) train with ``python -m training train`` of ``.venv-train`` on the split's
gallery photos only: the queries, the calibration split and the unseen individuals are never
trained on (the trainer deals the gallery's individuals into folds and holds one fold out to
choose its head). The run is exported with ``python -m model_export`` and registered with
``whaleid models add RUN/model.onnx --activate``. Runs are kept in
``SCRATCH/<set>/runs/<recipe>`` and reused while the config file, its overrides and the gallery
are the same (``--retrain`` trains again). A set whose gallery holds fewer than 2 individuals
cannot be trained on: those modes are "not run" there.

``whaleid evaluate`` gives MAP@5 (overall, known, unseen); ``POST /identify`` on ``whaleid serve``,
timed from the client on a seeded sample of the queries, gives the latency per query. A mode whose
commands the CLI does not have yet is reported "not run" with the step that failed.

The parts: the sets (``quality_data``), the split (``quality_split``), the command line
(``quality_cli``), the modes and their training (``quality_modes``), the measuring, which saves the
raw figures as ``SCRATCH/results.json`` (``quality_measure``), and the report rendered from that
file alone (``quality_report``, ``quality.md.j2``): ``--render-only`` writes the doc again without
measuring.

    PYTHONPATH=$PWD .venv/bin/python bench/quality.py                     # all sets and modes
    PYTHONPATH=$PWD .venv/bin/python bench/quality.py --modes global      # mode 1 only
    PYTHONPATH=$PWD .venv/bin/python bench/quality.py --modes frozen,finetuned --sets orl_faces
    PYTHONPATH=$PWD .venv/bin/python bench/quality.py --render-only       # doc from last results
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, bench_parser, setup_logging, shared_data  # noqa: E402
from bench.quality_cli import Cli  # noqa: E402
from bench.quality_data import REAL_SETS  # noqa: E402
from bench.quality_measure import measure_all  # noqa: E402
from bench.quality_modes import (  # noqa: E402
    MODES,
    RECIPES,
    TRAIN_PYTHON,
    TRAIN_TIMEOUT,
    Mode,
    TrainOptions,
)
from bench.quality_report import load_results, render, save_results  # noqa: E402
from bench.quality_split import SEED  # noqa: E402

log = logging.getLogger("bench.quality")


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(__doc__)
    parser.add_argument("--data", type=Path, default=shared_data())
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/quality-scratch"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "identification-quality.md")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    parser.add_argument(
        "--sets", default=",".join([*REAL_SETS, "synthetic"]), help="comma-separated"
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--max-queries", type=int, help="cap every set's queries (seeded)")
    parser.add_argument("--timed", type=int, default=40, help="timed /identify per set and mode")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="WHALEID_NAME=VALUE",
        help="a service setting for every command the bench runs (repeatable), e.g. "
        "WHALEID_GALLERY_FLOAT16=true; the bench otherwise drops the caller's WHALEID_ variables",
    )
    parser.add_argument(
        "--render-only", action="store_true", help="write the doc from the last results.json"
    )
    parser.add_argument(
        "--results",
        type=Path,
        metavar="JSON",
        help="the raw figures: written by a run, read by --render-only (default "
        "SCRATCH/results.json)",
    )
    training = parser.add_argument_group(
        "trained modes", f"{', '.join(m for m in MODES if MODES[m].recipe)}"
    )
    training.add_argument(
        "--train-config",
        action="append",
        default=[],
        metavar="[RECIPE=]PATH",
        help="train recipe RECIPE (scratch, frozen or finetuned; every recipe without RECIPE=) "
        "with this config file instead of its own under training/configs, e.g. "
        "demo/config.json for a quick check; repeatable",
    )
    training.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more `--set KEY=VALUE` for every training run (after the recipe's own), e.g. "
        "epochs=2; repeatable",
    )
    training.add_argument(
        "--train-python",
        type=Path,
        default=TRAIN_PYTHON,
        help="the interpreter of the training virtualenv (default .venv-train/bin/python)",
    )
    training.add_argument(
        "--service-tolerance",
        type=float,
        help="passed to whaleid-export: the least cosine between TensorFlow's embedding (as "
        "trained) and the service embedder's of the run's parity photos (default: the "
        "exporter's, 0.999)",
    )
    training.add_argument(
        "--train-timeout",
        type=float,
        default=TRAIN_TIMEOUT / 60,
        metavar="MINUTES",
        help="stop a training command after this long (default %(default).0f); the run folder "
        "stays, so the next bench run resumes it from its last finished epoch",
    )
    training.add_argument(
        "--retrain",
        action="store_true",
        help="delete the sets' cached runs of the requested trained modes and train again "
        "(otherwise a finished run of the same config, overrides and gallery is reused)",
    )
    return parser


def train_options(args: argparse.Namespace) -> TrainOptions:
    configs: dict[str, Path] = {}
    for text in args.train_config:
        recipe, sep, path = text.partition("=") if "=" in text else ("*", "", text)
        if sep and recipe not in RECIPES:
            raise SystemExit(
                f"--train-config {text}: no recipe {recipe!r} (of {', '.join(RECIPES)})"
            )
        configs[recipe] = Path(path).resolve()
    for text in args.train_set:
        if "=" not in text.strip("="):
            raise SystemExit(f"--train-set {text}: write KEY=VALUE")
    return TrainOptions(
        configs,
        tuple(args.train_set),
        args.train_python.absolute(),
        args.service_tolerance,
        args.train_timeout * 60,
    )


def selected_modes(text: str) -> list[Mode]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)} (of {', '.join(MODES)})")
    return [MODES[m] for m in names]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.train = train_options(args)
    args.selected = selected_modes(args.modes)
    setup_logging("%(asctime)s %(levelname)s %(message)s")
    for setting in args.setting:
        name, sep, value = setting.partition("=")
        if not sep or not name.startswith("WHALEID_"):
            raise SystemExit(f"--setting {setting!r}: give WHALEID_NAME=VALUE")
        Cli.settings[name] = value
    if Cli.settings:
        log.info("service settings for every command: %s", Cli.settings)
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    results_json = args.results or scratch / "results.json"
    if not args.render_only:
        started = time.perf_counter()
        results = measure_all(args, scratch)
        results["wall_min"] = (time.perf_counter() - started) / 60
        save_results(results_json, results)
        log.info("results in %s", results_json)
    args.out.write_text(render(load_results(results_json)))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
