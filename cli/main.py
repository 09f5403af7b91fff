"""The ``tlserve`` command: a thin shell over the Python API.

Exit codes: 0 success, 1 the work failed (bad data, a failed call), 2 bad
usage (argparse's own).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["main"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
_CLASSIFY_BATCH = 16


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlserve",
        description="Transfer learning to your own images, served over gRPC.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a classifier on a folder of images and publish it as ONNX",
        description="DATA_DIR holds train/<class>/*.png|jpg and optionally val/ and test/ "
        "(or class folders directly, then a stratified split is made).",
    )
    train.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    train.add_argument("--model-repository", type=Path, required=True, metavar="REPO")
    train.add_argument("--name", required=True, help="model name in the repository")
    train.add_argument("--strategy", default="linear", help="training strategy (default: linear)")
    train.add_argument(
        "--backbone",
        default="tf_efficientnet_lite0",
        help="pretrained backbone (default: %(default)s)",
    )
    train.add_argument("--seed", type=int, default=0)

    serve = sub.add_parser("serve", help="serve every model in a repository over gRPC")
    serve.add_argument("--model-repository", type=Path, metavar="REPO")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--grpc-port", type=int, help="0 picks a free port (default 8001)")
    serve.add_argument("--metrics-port", type=int, help="0 picks a free port (default 8002)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), help="execution provider")
    serve.add_argument("--max-batch-size", type=int)
    serve.add_argument("--max-queue-delay", type=float, help="seconds to wait to fill a batch")
    serve.add_argument("--max-queue-size", type=int, help="queued rows before RESOURCE_EXHAUSTED")
    serve.add_argument("--drain-delay", type=float, help="seconds to keep serving after SIGTERM")
    serve.add_argument("--grace", type=float, help="seconds in-flight calls get to finish")

    classify = sub.add_parser("classify", help="classify image files through a running server")
    classify.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    classify.add_argument("--target", default="127.0.0.1:8001", metavar="HOST:PORT")
    classify.add_argument("--model", required=True)
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument("--json", action="store_true", help="one JSON object per image")
    classify.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    return parser


def _walk(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            yield path


def _train(args: argparse.Namespace) -> int:
    from tlserve.training import train

    result = train(
        args.data_dir,
        model_repository=args.model_repository,
        name=args.name,
        strategy=args.strategy,
        backbone=args.backbone,
        seed=args.seed,
    )
    print(result.summary())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tlserve.server.app import serve
    from tlserve.server.config import ServerConfig

    overrides = {k: getattr(args, k) for k in (
        "model_repository", "host", "grpc_port", "metrics_port", "device", "max_batch_size",
        "max_queue_delay", "max_queue_size", "drain_delay", "grace",
    )}  # fmt: skip
    serve(ServerConfig.load(overrides))
    return 0


def _classify(args: argparse.Namespace) -> int:
    from tlserve.client import Client

    files = list(_walk(args.paths))
    if not files:
        print("no image files found", file=sys.stderr)
        return 1
    missing = [f for f in files if not f.is_file()]
    if missing:
        print(f"no such file: {missing[0]}", file=sys.stderr)
        return 1
    with Client(args.target) as client:
        for start in range(0, len(files), _CLASSIFY_BATCH):
            chunk = files[start : start + _CLASSIFY_BATCH]
            results = client.classify(
                chunk, model=args.model, top_k=args.top_k, timeout=args.timeout
            )
            for path, labels in zip(chunk, results, strict=True):
                if args.json:
                    row = {"file": str(path), "labels": [vars(p) for p in labels]}
                    print(json.dumps(row))
                else:
                    best = "  ".join(f"{p.label} {p.score:.3f}" for p in labels)
                    print(f"{path}\t{best}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tlserve`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from tlserve.client.errors import TlserveError

    commands = {"train": _train, "serve": _serve, "classify": _classify}
    try:
        return commands[args.command](args)
    except (TlserveError, ValueError, FileNotFoundError) as exc:
        print(f"tlserve {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
