"""Build a randomly initialised Keras EfficientNet embedding model and export it to ONNX.

The result is for timing / plumbing benchmarks only (weights are random). It follows the
whaleid model contract:

* one input ``images``: float32 NHWC ``[batch, size, size, 3]``, RGB, pixel range 0-255
  (Keras EfficientNets rescale/normalise inside the graph); batch axis dynamic;
* one output ``embedding``: float32 ``[batch, 512]``, before L2 normalisation;
* ``whaleid.*`` entries in the ONNX ``metadata_props``.

Architecture: EfficientNet<variant>(include_top=False, weights=None) -> GlobalAveragePooling2D
-> BatchNormalization -> Dropout(0.2) -> Dense(512).

Needs the export environment pinned in ``bench/requirements-export.txt`` (TensorFlow 2.15 with
tf.keras 2, tf2onnx, onnx; onnxruntime for ``--verify``), not the service environment::

    python bench/make_effb5_onnx.py --out /work/bench-cache/effb5-380.onnx [--size 380] \
        [--variant B5] [--verify]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The contract module imports only the standard library: any environment can write through it.
from service.contract import ModelContract, PixelRange, Preprocessing, Resize  # noqa: E402

log = logging.getLogger("make_effb5_onnx")

EMBEDDING_DIM = 512
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
VARIANTS = ("B0", "B1", "B2", "B3", "B4", "B5", "B6", "B7")


def metadata_for(size: int, variant: str) -> dict[str, str]:
    """The whaleid.* metadata_props written into the ONNX file (all values strings), through the
    model contract: the paper's head, 0-255 input stretched to ``size``."""
    contract = ModelContract(
        name=f"eff{variant.lower()}-random",
        version="bench",
        preprocessing=Preprocessing(size, Resize.STRETCH, PixelRange.BYTES),
        training={"whaleid.training.note": "random weights, for timing only"},
    )
    return contract.to_metadata()


def build_model(size: int, variant: str, seed: int):
    """Randomly initialised EfficientNet embedding model (tf.keras)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    backbone_cls = getattr(tf.keras.applications, f"EfficientNet{variant}")
    inputs = tf.keras.Input(shape=(size, size, 3), dtype="float32", name=INPUT_NAME)
    backbone = backbone_cls(include_top=False, weights=None, input_shape=(size, size, 3))
    x = backbone(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = tf.keras.layers.BatchNormalization(name="head_bn")(x)
    x = tf.keras.layers.Dropout(0.2, name="head_dropout")(x)
    outputs = tf.keras.layers.Dense(EMBEDDING_DIM, name=OUTPUT_NAME)(x)
    return tf.keras.Model(inputs, outputs, name=f"efficientnet{variant.lower()}_embedding")


def _name_batch_dim(model_proto) -> None:
    """Give the dynamic batch axis of every graph input/output the symbolic name 'batch'."""
    for value_info in list(model_proto.graph.input) + list(model_proto.graph.output):
        dims = value_info.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


def export(model, out: Path, size: int, variant: str, opset: int):
    import onnx
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME),)
    model_proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)

    if len(model_proto.graph.input) != 1 or len(model_proto.graph.output) != 1:
        raise RuntimeError(
            f"expected 1 input and 1 output, got {len(model_proto.graph.input)} and "
            f"{len(model_proto.graph.output)}"
        )
    _name_batch_dim(model_proto)
    del model_proto.metadata_props[:]
    onnx.helper.set_model_props(model_proto, metadata_for(size, variant))
    onnx.checker.check_model(model_proto)

    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model_proto, str(out))
    return model_proto


def verify(model, out: Path, size: int, seed: int) -> None:
    """Check shapes for batch 1 and 2 and Keras-vs-ONNX cosine similarity per row."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    (outp,) = sess.get_outputs()
    log.info(
        "onnx input %s %s %s; output %s %s %s",
        inp.name,
        inp.shape,
        inp.type,
        outp.name,
        outp.shape,
        outp.type,
    )
    rng = np.random.default_rng(seed)
    worst = 1.0
    for batch in (1, 2):
        x = rng.uniform(0.0, 255.0, size=(batch, size, size, 3)).astype(np.float32)
        (y_onnx,) = sess.run(None, {inp.name: x})
        if y_onnx.shape != (batch, EMBEDDING_DIM):
            raise RuntimeError(f"batch {batch}: onnx output shape {y_onnx.shape}")
        y_keras = model(x, training=False).numpy()
        num = np.sum(y_onnx * y_keras, axis=1)
        den = np.linalg.norm(y_onnx, axis=1) * np.linalg.norm(y_keras, axis=1)
        cos = num / np.maximum(den, 1e-12)
        max_abs = float(np.max(np.abs(y_onnx - y_keras)))
        log.info(
            "batch %d: shape %s, cosine per row %s, max |diff| %.3g",
            batch,
            y_onnx.shape,
            np.round(cos, 7).tolist(),
            max_abs,
        )
        if not np.all(np.isfinite(y_onnx)):
            raise RuntimeError(f"batch {batch}: non-finite ONNX output")
        worst = min(worst, float(cos.min()))
    if worst < 0.9999:
        raise RuntimeError(f"Keras/ONNX mismatch: min cosine {worst:.6f} < 0.9999")
    log.info("verify ok: min cosine %.7f", worst)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="path of the .onnx file to write")
    p.add_argument("--size", type=int, default=380, help="input height = width (default 380)")
    p.add_argument(
        "--variant",
        default="B5",
        type=str.upper,
        choices=VARIANTS,
        help="EfficientNet variant (default B5)",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="after export, check the file with onnxruntime against Keras",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)

    t0 = time.perf_counter()
    model = build_model(args.size, args.variant, args.seed)
    t1 = time.perf_counter()
    log.info(
        "built EfficientNet%s embedding model (%d params) in %.1f s",
        args.variant,
        model.count_params(),
        t1 - t0,
    )

    export(model, args.out, args.size, args.variant, args.opset)
    t2 = time.perf_counter()
    log.info(
        "exported %s (%.1f MB, opset %d) in %.1f s",
        args.out,
        args.out.stat().st_size / 1e6,
        args.opset,
        t2 - t1,
    )

    if args.verify:
        verify(model, args.out, args.size, args.seed)
        log.info("verified in %.1f s", time.perf_counter() - t2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
