"""`make bench-train`: each forward and training path's images/s beside the limit.

Prints, in one run on the same real images (examples/fashion-mnist), lite0:

- raw forward at the batch size on already-decoded uint8 batches: torch eager
  NCHW, channels_last, bf16 autocast + channels_last (not exact: shown for
  reference), and onnxruntime float32 on the exported embedder, **the limit**;
  each with its largest difference from torch float32. The paths take turns,
  round by round, so a busy machine slows them alike and the ratios hold;
- the one-time export (wall and CPU seconds) and how many images it takes
  to pay for itself, the figure behind ``EXPORT_PAYS_OFF_IMAGES``;
- feature extraction as training runs it (decode in decoding threads +
  forward), torch and onnxruntime, as a fraction of the limit
  (target: >= 80% for the default path);
- fine-tune steps (backbone + new head, AdamW) in float32 NCHW, channels_last,
  and bf16 autocast + channels_last: images/s, and test accuracy after the
  same steps on the same batches, scored in float32 as the export serves;
- the wall time of ``tlserve train --strategy auto`` (``--skip-auto`` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
Forward = Callable[[np.ndarray], np.ndarray]


def _rates(
    paths: dict[str, Forward], images: np.ndarray, batch: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """(images/s, CPU seconds per image) of each path over ``rounds`` interleaved passes."""
    wall, cpu = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0.0)
    for forward in paths.values():
        forward(images[:batch])  # warm-up: allocations, kernel choice
    for _ in range(rounds):
        for name, forward in paths.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for i in range(0, len(images), batch):
                forward(images[i : i + batch])
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - start_cpu
    n = rounds * len(images)
    return {name: (n / wall[name], cpu[name] / n) for name in paths}


def _torch_forward(module: torch.nn.Module, *, bf16: bool = False) -> Forward:
    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return module(torch.from_numpy(batch)).float().numpy()

    return forward


def _forwards(images: np.ndarray, args: argparse.Namespace, export_dir: Path) -> Forward:
    """Print each path's raw forward speed; return the limit (onnxruntime on the export)."""
    from tlserve.training import create_backbone
    from tlserve.training.backbone.modules import ImageEmbedder
    from tlserve.training.features.onnx_features import OnnxEmbedder, embedder_key, export_embedder

    net = create_backbone("tf_efficientnet_lite0")
    eager = ImageEmbedder.from_backbone(net).eval()
    fast = ImageEmbedder.from_backbone(copy.deepcopy(net)).eval()
    fast.to(memory_format=torch.channels_last)
    wall, cpu = time.perf_counter(), time.process_time()
    model = export_embedder(eager, images)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    (export_dir / f"embedder-{embedder_key(eager)}.onnx").write_bytes(model)
    paths = {
        "torch eager float32 NCHW": _torch_forward(eager),
        "torch float32 channels_last": _torch_forward(fast),
        "torch bf16 autocast + channels_last": _torch_forward(fast, bf16=True),
        # onnxruntime's default session, as the server runs it:
        "onnxruntime float32 (the limit)": OnnxEmbedder(model, spinning=True),
    }
    reference = paths["torch eager float32 NCHW"](images[: args.batch_size])
    rates = _rates(paths, images, args.batch_size, args.rounds)
    limit, limit_cpu = rates["onnxruntime float32 (the limit)"]
    for name, (rate, _) in rates.items():
        diff = float(np.max(np.abs(paths[name](images[: args.batch_size]) - reference)))
        print(f"  {name:38} {rate:7.1f} images/s  {rate / limit:6.1%} of the limit"
              f"  max |diff| vs torch {diff:.1e}")  # fmt: skip
    saved = rates["torch float32 channels_last"][1] - limit_cpu
    print(f"  export to ONNX (once per backbone, layers and size; cached): {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU = the CPU onnxruntime saves on {cpu / max(saved, 1e-9):.0f} images "
          "vs torch channels_last")  # fmt: skip
    return paths["onnxruntime float32 (the limit)"]


def _extraction(args: argparse.Namespace, export_dir: Path, limit: Forward) -> None:
    """Extraction as training runs it, taking turns with the limit on the same images."""
    from tlserve.contract.images import prepare_image
    from tlserve.training import create_backbone, load_dataset
    from tlserve.training.backbone.modules import ImageEmbedder
    from tlserve.training.features.extract import default_workers, extract_features

    samples = load_dataset(ROOT / "examples" / "fashion-mnist").train[: args.extract_images]
    embedder = ImageEmbedder.from_backbone(create_backbone("tf_efficientnet_lite0"))
    decoded = np.stack([prepare_image(path, embedder.preprocessing) for path, _ in samples])
    runs = [("onnxruntime", w) for w in (0, 1, 2)] + [("torch", default_workers())]
    seconds = dict.fromkeys(runs, 0.0)
    limit_seconds = 0.0
    for _ in range(args.rounds):
        start = time.perf_counter()
        for i in range(0, len(decoded), args.batch_size):
            limit(decoded[i : i + args.batch_size])
        limit_seconds += time.perf_counter() - start
        for engine, workers in runs:
            start = time.perf_counter()
            extract_features(embedder, samples, batch_size=args.batch_size, workers=workers,
                             engine=engine, export_dir=export_dir)  # fmt: skip
            seconds[(engine, workers)] += time.perf_counter() - start
    limit_rate = args.rounds * len(samples) / limit_seconds
    print(f"  the limit (raw onnxruntime on these images, decoded) {limit_rate:7.1f} images/s")
    for (engine, workers), s in seconds.items():
        rate = args.rounds * len(samples) / s
        default = " (default)" if workers == default_workers() and engine != "torch" else ""
        print(f"  {engine:11} workers={workers} {rate:7.1f} images/s = {rate / limit_rate:6.1%} "
              f"of the limit{default}")  # fmt: skip
    print("  target: the default path >= 80% of the limit", flush=True)


@contextlib.contextmanager
def _mode(name: str) -> Iterator[None]:
    with torch.autocast("cpu", torch.bfloat16, enabled="bf16" in name):
        yield


def _finetune(args: argparse.Namespace) -> None:
    from tlserve.contract.images import prepare_image
    from tlserve.training import create_backbone, load_dataset
    from tlserve.training.backbone.modules import ImageEmbedder

    data = load_dataset(ROOT / "examples" / "fashion-mnist")
    net = create_backbone("tf_efficientnet_lite0")
    spec = dataclasses.replace(net.preprocessing, height=args.size, width=args.size)
    n_train = args.steps * args.batch_size
    train = [data.train[i % len(data.train)] for i in range(n_train)]
    x_train = np.stack([prepare_image(path, spec) for path, _ in train])
    y_train = torch.tensor([label for _, label in train])
    x_test = np.stack([prepare_image(path, spec) for path, _ in data.test])
    y_test = np.array([label for _, label in data.test])
    torch.manual_seed(0)
    head = torch.nn.Linear(net.feature_dim, len(data.classes))
    modes = ("float32 NCHW", "float32 channels_last", "bf16 autocast + channels_last")
    models, optimisers, seconds = {}, {}, dict.fromkeys(modes, 0.0)
    for name in modes:
        embedder = ImageEmbedder(copy.deepcopy(net.module), spec)
        model = torch.nn.Sequential(embedder, copy.deepcopy(head))  # images -> logits
        if "channels_last" in name:
            model.to(memory_format=torch.channels_last)
        models[name] = model.train()
        optimisers[name] = torch.optim.AdamW(model.parameters(), lr=args.lr)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
    for step, index in enumerate(order.split(args.batch_size)):
        x, y = torch.from_numpy(x_train[index.numpy()]), y_train[index]
        for name in modes:  # interleaved, step by step
            start = time.perf_counter()
            with _mode(name):
                loss = torch.nn.functional.cross_entropy(models[name](x), y)
            optimisers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimisers[name].step()
            if step > 0:  # the first step allocates and picks kernels
                seconds[name] += time.perf_counter() - start
    timed = n_train - args.batch_size
    for name in modes:
        model = models[name].eval().to(memory_format=torch.contiguous_format)
        with torch.inference_mode():
            scores = np.concatenate([model(torch.from_numpy(x_test[i : i + 64])).numpy()
                                     for i in range(0, len(x_test), 64)])  # fmt: skip
        accuracy = float(np.mean(scores.argmax(1) == y_test))
        print(f"  {name:30} {timed / seconds[name]:7.1f} images/s  test accuracy {accuracy:.1%}"
              f" (+-{1.96 * np.sqrt(accuracy * (1 - accuracy) / len(y_test)):.1%})")  # fmt: skip
    print(f"  ({args.steps} steps of {args.batch_size} at {args.size} px, lr {args.lr}, same "
          f"batches for each; accuracy on {len(y_test)} test images in float32)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="images per raw-forward pass")
    parser.add_argument("--extract-images", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved passes per path")
    parser.add_argument("--steps", type=int, default=30, help="fine-tune steps per mode")
    parser.add_argument("--size", type=int, default=128, help="fine-tune image size")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--skip-forward", action="store_true", help="no raw/extraction figures")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--skip-auto", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from tlserve.contract.images import prepare_image
    from tlserve.training import create_backbone, load_dataset, train

    samples = load_dataset(ROOT / "examples" / "fashion-mnist").train[: args.images]
    spec = create_backbone("tf_efficientnet_lite0").preprocessing
    images = np.stack([prepare_image(path, spec) for path, _ in samples])
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(f"tf_efficientnet_lite0 @ {spec.height}x{spec.width}, batch {args.batch_size}, torch "
          f"threads {torch.get_num_threads()}, AVX-512 BF16: {'avx512_bf16' in flags}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tlserve-bench-train-") as tmp:
        if not args.skip_forward:
            print(f"raw forward, {len(images)} decoded images x {args.rounds} rounds:")
            limit = _forwards(images, args, Path(tmp))
            print(f"feature extraction (decode + forward), {args.extract_images} images:")
            _extraction(args, Path(tmp), limit)
    if not args.skip_finetune:
        print("fine-tune steps (forward + backward + AdamW):")
        _finetune(args)
    if args.skip_auto:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train(ROOT / "examples" / "fashion-mnist", model_repository=Path(tmp),
                       name="bench", strategy="auto", cache=False)  # fmt: skip
        wall = time.perf_counter() - start
    print(f"auto on examples/fashion-mnist  {wall:7.1f} s wall -> {result.strategy}, "
          f"test accuracy {result.test_accuracy:.3f}")  # fmt: skip
    print(f"  why: {result.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
