"""``python -m model_export.matchers OUT_DIR``: write ``aliked-n16.onnx`` (and
``lightglue-aliked.onnx`` with ``--lightglue``), each checked in onnxruntime against PyTorch."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from model_export.matchers.export import export_aliked, export_lightglue


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model_export.matchers", description=__doc__)
    parser.add_argument("out", type=Path, help="folder the ONNX files are written to")
    parser.add_argument("--model", default="aliked-n16", help="aliked-n16 (default), aliked-t16")
    parser.add_argument("--size", type=int, default=640, help="the square input side (640)")
    parser.add_argument("--keypoints", type=int, default=1024, help="fixed keypoint count")
    parser.add_argument(
        "--lightglue",
        action="store_true",
        help="also export LightGlue (unfinished: not yet seen to export, see export_lightglue)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    export_aliked(args.out / f"{args.model}.onnx", args.model, args.size, args.keypoints)
    if args.lightglue:
        export_lightglue(args.out / "lightglue-aliked.onnx", "aliked")


if __name__ == "__main__":
    main()
