"""`make bench-train`: feature extraction vs raw backbone forward, and `auto`'s wall time.

Prints, in one run on the same images:

- raw forward: the backbone (ImageEmbedder, inference_mode) on already-decoded
  uint8 batches — the ceiling;
- the same with the model in channels_last memory format;
- feature extraction (decode + resize in DataLoader workers + forward), for
  workers = 0, 1, 2, as a fraction of raw (target: >= 80%);
- the wall time of ``tlserve train --strategy auto`` on examples/fashion-mnist
  (features computed, not cached).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def _raw(embedder: torch.nn.Module, images: np.ndarray, batch_size: int) -> float:
    with torch.inference_mode():
        embedder(torch.from_numpy(images[:batch_size]))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            embedder(torch.from_numpy(images[i : i + batch_size]))
    return len(images) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-auto", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from tlserve.contract.images import prepare_image
    from tlserve.training import create_backbone, load_dataset, train
    from tlserve.training.features import default_workers, extract_features
    from tlserve.training.modules import ImageEmbedder

    data = ROOT / "examples" / "fashion-mnist"
    samples = load_dataset(data).train[: args.images]
    backbone = create_backbone("tf_efficientnet_lite0")
    embedder = ImageEmbedder.from_backbone(backbone)
    spec = backbone.preprocessing
    images = np.stack([prepare_image(path, spec) for path, _ in samples])
    print(f"tf_efficientnet_lite0 @ {spec.height}x{spec.width}, {len(samples)} images, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")  # fmt: skip

    raw = _raw(embedder, images, args.batch_size)
    print(f"raw backbone forward            {raw:7.1f} images/s")
    backbone.module.to(memory_format=torch.channels_last)
    raw_cl = _raw(embedder, images, args.batch_size)
    print(f"raw forward, channels_last      {raw_cl:7.1f} images/s")
    backbone.module.to(memory_format=torch.contiguous_format)
    for workers in (0, 1, 2):
        start = time.perf_counter()
        extract_features(embedder, samples, batch_size=args.batch_size, workers=workers)
        rate = len(samples) / (time.perf_counter() - start)
        default = " (default)" if workers == default_workers() else ""
        print(f"feature extraction, workers={workers} {rate:7.1f} images/s = "
              f"{rate / raw:5.1%} of raw{default}")  # fmt: skip
    if args.skip_auto:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train(data, model_repository=Path(tmp), name="bench", strategy="auto",
                       cache=False)  # fmt: skip
        wall = time.perf_counter() - start
    print(f"auto on examples/fashion-mnist  {wall:7.1f} s wall -> {result.strategy}, "
          f"test accuracy {result.test_accuracy:.3f}")  # fmt: skip
    print(f"  why: {result.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
