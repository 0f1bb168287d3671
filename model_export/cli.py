"""The ``whaleid-export`` command line (also ``python -m model_export``)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_export.map5_drop import CONFIDENCE, MAX_MAP5_DROP, MIN_QUERIES

log = logging.getLogger("whaleid-export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whaleid-export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export the embedding part of a trained model (model.keras from "
        "whaleid-train) to ONNX with the whaleid.* metadata, after checking on real photos "
        "that TensorFlow, onnxruntime and the service's embedder agree. A model that fails the "
        "check is not written.",
        epilog="example:\n  whaleid-export runs/b5/model.keras --out effb5-arcface.onnx\n"
        "  whaleid-export runs/b5/model.keras --out m.onnx --photos fins/*.jpg --version 2026.11\n"
        "  whaleid-export runs/b5/model.keras --out effb5-int8.onnx --quantize int8",
    )
    parser.add_argument("model", help="model.keras written by whaleid-train")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--photos",
        nargs="+",
        help="real photos for the parity check (default: the run's parity/ folder)",
    )
    parser.add_argument("--name", help="whaleid.name (default: the run's name)")
    parser.add_argument("--version", help="whaleid.version (default: the run's version)")
    parser.add_argument("--k", type=int, help="override the k the run's grid search chose")
    parser.add_argument("--cutoff", type=float, help="override the chosen cutoff")
    parser.add_argument("--ranking", choices=("vote", "nearest"), help="override the ranking")
    parser.add_argument(
        "--resize", choices=("stretch", "letterbox"), help="override the run's resize policy"
    )
    parser.add_argument(
        "--pixel-range", choices=("0-255", "0-1", "imagenet"), help="override the pixel range"
    )
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument(
        "--service-tolerance",
        type=float,
        default=None,
        help="least cosine between TF (as trained) and the service embedder (default 0.999)",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        help="write a static int8 (QDQ, per-channel) model instead of fp32, if it stays within "
        "--int8-min-cosine of fp32 on the run's validation photos and its validation MAP@5 is "
        f"not shown to drop by more than {MAX_MAP5_DROP} (query by query against fp32: refused "
        f"when the {CONFIDENCE * 100:.0f}%% bootstrap interval of the drop lies wholly above it; "
        f"judged on {MIN_QUERIES} queries or more); its version gets the suffix -int8",
    )
    parser.add_argument(
        "--calibration-photos",
        metavar="DIR",
        help="calibrate int8 on the photos of this folder (default: 64 of the run's training "
        "photos)",
    )
    parser.add_argument(
        "--int8-min-cosine",
        type=float,
        default=None,
        help="least cosine between int8 and fp32 embeddings of any held-out photo (default 0.98)",
    )
    parser.add_argument(
        "--int8-accept-unjudged",
        action="store_true",
        help="write the int8 model on the cosine check alone when the run has too few validation "
        f"queries (under {MIN_QUERIES}) to judge its MAP@5 (refused otherwise); the metadata "
        "says so",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _overrides(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from model_export.export import SERVICE_TOLERANCE, ExportRefused, export_model
        from model_export.quantize import MIN_COSINE
    except ImportError as e:
        log.error("whaleid-export needs the export extra (%s): pip install -e '.[export]'", e)
        return 2
    try:
        export_model(
            Path(args.model),
            Path(args.out),
            photos=[Path(p) for p in args.photos or []],
            name=args.name,
            version=args.version,
            head=_overrides(args, ("k", "cutoff", "ranking")),
            preprocessing=_overrides(args, ("resize", "pixel_range")),
            opset=args.opset,
            service_tolerance=args.service_tolerance or SERVICE_TOLERANCE,
            quantize=args.quantize,
            calibration_photos=Path(args.calibration_photos) if args.calibration_photos else None,
            int8_min_cosine=MIN_COSINE if args.int8_min_cosine is None else args.int8_min_cosine,
            int8_accept_unjudged=args.int8_accept_unjudged,
        )
    except (ExportRefused, FileNotFoundError, ValueError) as e:
        log.error("not exported: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
