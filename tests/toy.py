"""Real, tiny things for tests: an ONNX embedding model built with ``onnx.helper`` and synthetic
photo-ID photos of individuals whose marks a model can tell apart."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image


def build_toy_model(
    path: Path,
    *,
    input_size: int = 32,
    dim: int = 64,
    grid: int = 8,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    output_rank: int = 2,
) -> Path:
    """An ONNX model following the model contract: NHWC float32 in, [batch, dim] out.

    It centres the pixels, average-pools them to a ``grid`` x ``grid`` colour map and projects
    that with a fixed random matrix: photos of the same marks land close together.
    """
    rng = np.random.default_rng(seed)
    features = grid * grid * 3
    weights = rng.standard_normal((features, dim)).astype(np.float32)
    pool = input_size // grid
    nodes = [
        helper.make_node("Sub", ["pixels", "centre"], ["centred"]),
        helper.make_node("Transpose", ["centred"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "AveragePool", ["nchw"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]
        ),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["projected"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([127.5], dtype=np.float32), "centre"),
        numpy_helper.from_array(np.array([0, features], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(weights, "weights"),
    ]
    output = "projected"
    out_shape: list[str | int] = ["batch", dim]
    if output_rank == 3:
        nodes.append(helper.make_node("Unsqueeze", ["projected", "axis"], ["embedding"]))
        initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"))
        output, out_shape = "embedding", ["batch", 1, dim]
    graph = helper.make_graph(
        nodes,
        "toy-embedder",
        [
            helper.make_tensor_value_info(
                "pixels", TensorProto.FLOAT, ["batch", input_size, input_size, 3]
            )
        ],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    props = {
        "whaleid.input_size": str(input_size),
        "whaleid.name": "toy",
        "whaleid.version": f"seed{seed}",
    }
    if metadata is not None:
        props = {k: v for k, v in {**props, **metadata}.items() if v is not None}
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def marks(individual: int, grid: int = 8) -> np.ndarray:
    """The stable colour marks of one individual: a grid x grid x 3 pattern."""
    rng = np.random.default_rng(10_000 + individual)
    return rng.integers(0, 256, size=(grid, grid, 3)).astype(np.float32)


def photo(individual: int, shot: int, size: int = 64, noise: float = 12.0) -> Image.Image:
    """One photo of ``individual``: its marks, with lighting and sensor noise of shot ``shot``."""
    rng = np.random.default_rng(individual * 7919 + shot)
    base = np.kron(marks(individual), np.ones((size // 8, size // 8, 1), dtype=np.float32))
    gain = rng.uniform(0.85, 1.15)
    pixels = base * gain + rng.normal(0, noise, base.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def texture(individual: int, size: int = 320) -> Image.Image:
    """The natural marks of one individual as local features see them: a fixed random drawing of
    nicks, spots and scars (grey shapes on a mid-grey body), different for each individual."""
    from PIL import ImageDraw

    rng = np.random.default_rng(20_000 + individual)
    canvas = Image.new("L", (size, size), 128)
    draw = ImageDraw.Draw(canvas)
    for _ in range(60):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(3, 14)
        shade = int(rng.choice([20, 60, 200, 240]))
        if rng.random() < 0.6:
            draw.ellipse((x - r, y - r * rng.uniform(0.4, 1.0), x + r, y + r), fill=shade)
        else:
            dx, dy = rng.uniform(-25, 25, 2)
            draw.line((x, y, x + dx, y + dy), fill=shade, width=int(rng.integers(2, 5)))
    return canvas


def textured_photo(individual: int, shot: int, size: int = 192) -> Image.Image:
    """One photo of ``individual``'s marks from shot ``shot``: turned (up to 20 degrees), scaled
    (0.8-1.2), moved, lit and noised differently, as photos of one fin in the field are. A
    model that pools colours cannot tell these apart; keypoint matching can."""
    rng = np.random.default_rng(individual * 104_729 + shot)
    base = texture(individual)
    angle = rng.uniform(-20, 20)
    scale = rng.uniform(0.8, 1.2)
    turned = base.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=128)
    side = round(base.size[0] * scale)
    turned = turned.resize((side, side), Image.Resampling.BICUBIC)
    cx, cy = side / 2 + rng.uniform(-15, 15, 2)
    left, top = round(cx - size / 2), round(cy - size / 2)
    crop = turned.crop((left, top, left + size, top + size))
    pixels = np.asarray(crop, np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
    pixels += rng.normal(0, 4, pixels.shape)
    grey = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=2), "RGB")


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_catalogue(
    folder: Path,
    individuals: Sequence[int],
    shots: Sequence[int],
    *,
    species: str = "bottlenose_dolphin",
    name: str = "catalogue.csv",
    extra: dict[str, str] | None = None,
    textured: bool = False,
) -> Path:
    """Photos of each individual and a Happywhale-style CSV naming them (``textured``: photos
    of ``textured_photo``, for local features)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("w", newline="") as f:
        columns = ["image", "species", "individual_id", *(extra or {})]
        writer = csv.writer(f)
        writer.writerow(columns)
        for ind in individuals:
            for shot in shots:
                file = f"ind{ind}_shot{shot}.png"
                image = textured_photo(ind, shot) if textured else photo(ind, shot)
                (images / file).write_bytes(encode(image))
                writer.writerow([file, species, f"ind-{ind}", *(extra or {}).values()])
    return path


def main() -> None:
    """``python -m tests.toy DIR``: a toy model, a synthetic catalogue and held-out queries."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--individuals", type=int, default=30)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    build_toy_model(args.folder / "toy.onnx")
    write_catalogue(args.folder, range(args.individuals), range(4))
    write_catalogue(args.folder, [0, 1, 2, 900], [20], name="queries.csv")
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("toy").info(
        "wrote toy.onnx, catalogue.csv, queries.csv and images/ under %s", args.folder
    )


if __name__ == "__main__":
    main()
