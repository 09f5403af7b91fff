"""Build the small Fashion-MNIST example dataset in ImageFolder layout.

Reads the Fashion-MNIST IDX files shipped by Debian's ``dataset-fashion-mnist``
package (``apt-get install dataset-fashion-mnist``; files under
``/usr/share/datasets/fashion-mnist/``, gzipped or not), draws a deterministic,
stratified random sample of images per class from the training set and,
separately, from the test (``t10k``) set, and writes them as 8-bit grayscale
28x28 PNGs::

    <out>/train/<class>/<index>.png
    <out>/test/<class>/<index>.png

``<class>`` is the human label in lowercase with spaces and slashes replaced by
``-`` (``t-shirt-top``, ``trouser``, ..., ``ankle-boot``) and ``<index>`` is the
image's zero-padded position in its source IDX file, so every file can be traced
back to the original data. The ``train`` and ``test`` folders under ``<out>`` are
deleted and rewritten on every run (anything else there, such as ``LICENSE`` and
``README.md``, is left alone); the output is byte-for-byte identical for the same
source files, counts and seed.

Re-run from the repository root with the defaults (100 train and 30 test images
per class, seed 0)::

    python examples/make_fashion_mnist.py

Needs only the standard library, numpy and pillow.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parent / "fashion-mnist"

# Fashion-MNIST label ids 0..9, in order, as folder names.
CLASS_NAMES: tuple[str, ...] = tuple(
    name.lower().replace(" ", "-").replace("/", "-")
    for name in (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
)

# Source file stem prefix per output split.
SPLITS: dict[str, str] = {"train": "train", "test": "t10k"}
# Fixed per-split stream ids, so changing one split's count never changes the
# sample drawn for the other.
SPLIT_STREAM: dict[str, int] = {"train": 0, "test": 1}

_IDX_UBYTE = 0x08
_INDEX_WIDTH = 5  # 60000 images -> 5 digits


def _open_idx(source: Path, stem: str) -> bytes:
    """Return the raw bytes of ``stem`` (or ``stem.gz``) in ``source``."""
    plain = source / stem
    packed = source / f"{stem}.gz"
    if plain.is_file():
        return plain.read_bytes()
    if packed.is_file():
        with gzip.open(packed, "rb") as fh:
            return fh.read()
    raise FileNotFoundError(f"neither {plain} nor {packed} exists")


def read_idx(source: Path, stem: str) -> npt.NDArray[np.uint8]:
    """Parse an unsigned-byte IDX file into an array of its declared shape."""
    data = _open_idx(source, stem)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{stem}: not an IDX file")
    if data[2] != _IDX_UBYTE:
        raise ValueError(f"{stem}: IDX type 0x{data[2]:02x} is not unsigned byte")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) if dims else 1
    if len(data) - header != expected:
        raise ValueError(f"{stem}: {len(data) - header} data bytes, expected {expected} for {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(source: Path, prefix: str) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Load (images, labels) for ``prefix`` (``train`` or ``t10k``)."""
    images = read_idx(source, f"{prefix}-images-idx3-ubyte")
    labels = read_idx(source, f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{prefix}: unexpected image shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{prefix}: {labels.shape} labels for {images.shape[0]} images")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise ValueError(f"{prefix}: label {int(labels.max())} out of range")
    return images, labels


def stratified_sample(
    labels: npt.NDArray[np.uint8], per_class: int, rng: np.random.Generator
) -> dict[int, list[int]]:
    """Pick ``per_class`` distinct indices for every class, sorted ascending."""
    picked: dict[int, list[int]] = {}
    for label in range(len(CLASS_NAMES)):
        pool = np.flatnonzero(labels == label)
        if per_class > pool.size:
            raise ValueError(
                f"class {CLASS_NAMES[label]!r} has {pool.size} images, {per_class} requested"
            )
        chosen = rng.choice(pool, size=per_class, replace=False)
        picked[label] = sorted(int(i) for i in chosen)
    return picked


def write_split(
    out: Path,
    split: str,
    images: npt.NDArray[np.uint8],
    picked: dict[int, list[int]],
) -> int:
    """Write the picked images of one split as PNGs; return how many were written."""
    split_dir = out / split
    if split_dir.exists():
        shutil.rmtree(split_dir)
    written = 0
    for label, indices in picked.items():
        class_dir = split_dir / CLASS_NAMES[label]
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in indices:
            image = Image.fromarray(np.ascontiguousarray(images[index]))
            if image.mode != "L":
                raise ValueError(f"expected an 8-bit grayscale image, got mode {image.mode}")
            image.save(class_dir / f"{index:0{_INDEX_WIDTH}d}.png", format="PNG", optimize=True)
            written += 1
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a stratified Fashion-MNIST sample as PNG folders "
        "(train/<class>/, test/<class>/)."
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        metavar="DIR",
        help=f"folder with the Fashion-MNIST IDX files (default: {DEFAULT_SOURCE})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help="output folder (default: examples/fashion-mnist in this repository)",
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=100,
        metavar="N",
        help="training images per class, drawn from the training set (default: 100)",
    )
    parser.add_argument(
        "--test-per-class",
        type=int,
        default=30,
        metavar="N",
        help="test images per class, drawn from the t10k test set (default: 30)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    for name in ("train_per_class", "test_per_class"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    source: Path = args.source
    out: Path = args.out
    counts = {"train": int(args.train_per_class), "test": int(args.test_per_class)}
    # Load and sample every split before touching the output folder, so a bad
    # source or an impossible count leaves the existing dataset intact.
    plans: list[tuple[str, str, npt.NDArray[np.uint8], dict[int, list[int]]]] = []
    for split, prefix in SPLITS.items():
        images, labels = load_split(source, prefix)
        rng = np.random.default_rng([int(args.seed), SPLIT_STREAM[split]])
        plans.append((split, prefix, images, stratified_sample(labels, counts[split], rng)))
    out.mkdir(parents=True, exist_ok=True)
    for split, prefix, images, picked in plans:
        written = write_split(out, split, images, picked)
        print(
            f"{split}: {written} images ({counts[split]} per class) from {prefix} -> {out / split}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
