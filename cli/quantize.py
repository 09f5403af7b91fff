"""``tlserve quantize``: a faster variant of a published model, measured before it is kept."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_quantize"]


def add_quantize(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``quantize`` subcommand."""
    quantize = sub.add_parser(
        "quantize",
        help="publish a faster (int8 or fp16) variant of a published model, measured here",
        description="Quantize REPO/NAME/VERSION, check its held-out accuracy and speed on this "
        "host against the float32 model, and publish the chosen one as the next version.",
    )
    quantize.add_argument("version_dir", type=Path, metavar="REPO/NAME/VERSION")
    quantize.add_argument(
        "--variant",
        default="auto",
        choices=("int8", "fp16", "auto"),
        help="auto: int8 on CPU hosts, fp16 with a GPU, kept only within the budgets "
        "(default: %(default)s)",
    )
    quantize.add_argument("--data", type=Path, help="images (default: the folder it trained on)")
    _add_budget_flags(quantize)
    quantize.set_defaults(handler=_quantize)


def _add_budget_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accuracy-budget", type=float, default=0.5, help="accuracy points a variant may lose"
    )
    parser.add_argument(
        "--min-speedup", type=float, default=1.2, help="how much faster a variant must measure"
    )


def _quantize(args: argparse.Namespace) -> int:
    from tlserve.training.requantize import quantize_published

    version_dir, decision = quantize_published(
        args.version_dir,
        data_dir=args.data,
        mode=args.variant,
        budget_points=args.accuracy_budget,
        min_speedup=args.min_speedup,
    )
    print(f"published {version_dir} ({decision.chosen}): {decision.reason}")
    return 0
