"""``tlserve quantize``: a faster variant of a published model, measured before it is kept."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_quantize"]


def add_quantize(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``quantize`` subcommand."""
    quantize = sub.add_parser(
        "quantize",
        help="publish faster (int8 or fp16) variants of a published model beside it",
        description="Quantize REPO/NAME/VERSION, check each variant's accuracy on this host "
        "against the float32 model, and publish the float32 model with the variants that "
        "pass and a reference set as the next version; the serving host checks and times "
        "them again and decides which one serves.",
    )
    quantize.add_argument("version_dir", type=Path, metavar="REPO/NAME/VERSION")
    quantize.add_argument(
        "--variant",
        default="auto",
        choices=("int8", "fp16", "auto"),
        help="auto: int8 on CPU hosts, fp16 with a GPU, kept only within the accuracy "
        "budget; int8 or fp16: published whatever the check says (default: %(default)s)",
    )
    quantize.add_argument("--data", type=Path, help="images (default: the folder it trained on)")
    _add_budget_flags(quantize)
    quantize.set_defaults(handler=_quantize)


def _add_budget_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accuracy-budget",
        type=float,
        default=0.5,
        help="accuracy points a variant may lose; written into the card, so the serving "
        "host applies the same budget (default: %(default)s)",
    )


def _quantize(args: argparse.Namespace) -> int:
    from tlserve.training.quantize_published import quantize_published

    version_dir, report = quantize_published(
        args.version_dir, data_dir=args.data, mode=args.variant, budget_points=args.accuracy_budget
    )
    published = ", ".join(["float32", *report.published])
    print(f"published {version_dir} ({published})")
    for outcome in report.outcomes:
        print(f"  {outcome.variant}: {outcome.reason}")
    return 0
