"""``tlserve check DATA_DIR``: the data check that ``tlserve train`` runs, on its own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_check"]


def add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``check`` on the ``tlserve`` parser."""
    check = sub.add_parser(
        "check",
        help="find likely label issues, near-duplicates, train/test leaks and imbalance",
        description="Embeds DATA_DIR's images with the pretrained backbone (cached for a later "
        "`tlserve train`) and reports, without changing anything: likely label issues "
        "(cleanlab on a probe's out-of-fold probabilities), near-duplicate pairs and those "
        "across train and test/val (leaks), per-class counts, unreadable files.",
    )
    check.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    # No default here: the training package's, read when the command runs (the
    # parser must not import torch for every tlserve command).
    check.add_argument("--backbone", help="the backbone to embed with, as for tlserve train")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--workers", type=int, help="image decoding processes")
    check.add_argument(
        "--report-dir",
        type=Path,
        help="write data_check.json (every suspect by path), data_check.md and thumbnail grids",
    )
    check.add_argument("--json", action="store_true", help="print the whole check as JSON")
    check.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    from tlserve.training.backbone.backbones import DEFAULT_BACKBONE
    from tlserve.training.check.datacheck import check_folder
    from tlserve.training.report.thumbnails import data_check_files, data_check_markdown

    found = check_folder(
        args.data_dir,
        backbone=args.backbone or DEFAULT_BACKBONE,
        seed=args.seed,
        workers=args.workers,
    )
    found_json = json.dumps(found.to_dict(), indent=2)
    if args.json:
        print(found_json)
    else:
        print(found.summary())
        for line in found.findings(where="--report-dir's data_check.md"):
            print(line)
    if args.report_dir is not None:
        args.report_dir.mkdir(parents=True, exist_ok=True)
        for name, data in data_check_files(found).items():
            (args.report_dir / name).write_bytes(data)
        (args.report_dir / "data_check.json").write_text(found_json)
        markdown = "\n".join(data_check_markdown(found)).lstrip("\n")
        (args.report_dir / "data_check.md").write_text(f"# {args.data_dir}\n{markdown}\n")
        print(f"report: {args.report_dir / 'data_check.md'}")
    return 0
