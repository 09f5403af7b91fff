"""The ``tlserve`` command: a thin shell over the Python API.

Exit codes (``tlserve --help`` lists them): 0 success, 1 the work failed,
2 bad usage (argparse's own), 3 try again later (unreachable, draining,
overloaded, too slow), 4 refused credentials, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tlserve.cli.check import add_check
from tlserve.cli.quantize import add_quantize
from tlserve.cli.remote import EXIT_CODES, EXIT_PIPE, add_commands, exit_code_for
from tlserve.cli.serve import add_serve
from tlserve.contract.errors import TlserveError

__all__ = ["STRATEGY_NAMES", "main"]

# tlserve.training.STRATEGIES' names, spelled out so `tlserve --help` needs no torch.
STRATEGY_NAMES = ("linear", "trees", "finetune", "scratch", "auto")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlserve",
        description="Transfer learning to your own images, served over gRPC.",
        epilog=EXIT_CODES + "\n`tlserve COMMAND --help` says more about each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    train.add_argument(
        "--strategy",
        # No default here: TrainConfig's (auto), read when the command runs.
        choices=STRATEGY_NAMES,
        help="linear/trees: frozen features + a classifier; finetune: new head, then the "
        "backbone at smaller learning rates; scratch: the whole network; auto: score "
        "the candidates on the data and keep the best (default: auto)",
    )
    train.add_argument(
        "--backbone",
        # No default here: TrainConfig's, read when the command runs (the parser
        # must not import torch for every tlserve command).
        help="tf_efficientnet_lite0/1/2 (weights shipped), timm:<model> or tv:<model> "
        "(torchvision; weights from --backbone-weights) (default: lite0)",
    )
    train.add_argument("--seed", type=int, default=0)
    _add_training_flags(train)

    add_quantize(sub)  # tlserve.cli.quantize
    add_check(sub)  # tlserve check DATA_DIR: tlserve.cli.check
    inspect = sub.add_parser(
        "inspect", help="print a model version's metadata and evaluation report"
    )
    inspect.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    inspect.add_argument(
        "--check",
        action="store_true",
        help="also check and time the version's variants on this host, as `tlserve serve` "
        "does at load, and say which one it would serve and why",
    )

    add_serve(sub)  # tlserve.cli.serve
    add_commands(sub)  # classify, models, health: tlserve.cli.remote
    return parser


def _train(args: argparse.Namespace) -> int:
    from tlserve.training import TrainConfig, train
    from tlserve.training.backbone.backbones import DEFAULT_BACKBONE
    from tlserve.training.config import DEFAULT_STRATEGY
    from tlserve.training.fit.distributed import leave_distributed

    try:
        result = train(
            TrainConfig(
                args.data_dir,
                model_repository=args.model_repository,
                name=args.name,
                strategy=args.strategy or DEFAULT_STRATEGY,
                backbone=args.backbone or DEFAULT_BACKBONE,
                seed=args.seed,
                options=_strategy_options(args),
                backbone_weights=args.backbone_weights,
                image_size=args.image_size,
                batch_size=args.batch_size,
                workers=args.workers,
                balanced={"auto": None, "balanced": True, "none": False}[args.class_weights],
                calibrate=not args.no_calibrate,
                cache=not args.no_cache,
                resume=args.resume,
                time_budget=args.time_budget,
                drop_duplicates=args.drop_duplicates,
                quantize=args.quantize,
            )
        )
    finally:
        leave_distributed()  # under torchrun; nothing otherwise
    print(result.summary())
    return 0


def _add_training_flags(train: argparse.ArgumentParser) -> None:
    """Flags of ``tlserve train`` beyond the basics (strategy options, run settings)."""
    add = train.add_argument
    add("--backbone-weights", type=Path, help="weights file for a timm:/tv: backbone")
    add("--layer", help="linear/trees: 'last' (default) or an earlier stage, e.g. -2")
    add("--epochs", type=int, help="finetune/scratch: most epochs (early stopping picks the best)")
    add(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="seconds the whole run may take: auto tries only the candidates that fit "
        "(default for auto: 60 on CPU, 900 with a GPU); finetune/scratch stop before an "
        "epoch that would pass it",
    )
    add("--lr", help="finetune/scratch: learning rate of the head, or 'auto' (LR finder)")
    add("--unfreeze", help="finetune: 'all' (default) or the number of last layer groups")
    add("--label-smoothing", type=float)
    add(
        "--augment",
        choices=("auto", "none", "light", "colour", "flip"),
        help="finetune/scratch augmentation (auto: crops; colour jitter only on colour images; "
        "never flips unless asked)",
    )
    add("--bn", choices=("frozen", "train"), help="BatchNorm statistics while training")
    add("--random-init", action="store_true", help="scratch: start from random weights")
    add("--image-size", type=int, help="input size (smaller trains faster)")
    add("--batch-size", type=int, default=32)
    add("--workers", type=int, help="image decoding processes (default: CPUs - 1)")
    add("--class-weights", choices=("auto", "balanced", "none"), default="auto")
    add("--no-calibrate", action="store_true", help="skip temperature scaling")
    add("--no-cache", action="store_true", help="do not keep embeddings in ~/.cache/tlserve")
    add("--resume", action="store_true", help="finetune/scratch: continue from the last epoch")
    add(
        "--drop-duplicates",
        action="store_true",
        help="leave out one image of each near-duplicate pair the data check finds "
        "(the training copy of a train/test leak); without it nothing is dropped",
    )
    add(
        "--quantize",
        choices=("none", "int8", "fp16", "auto"),
        default="auto",
        help="also publish faster variants beside the float32 model: auto keeps int8 (fp16 "
        "on a GPU) when it passes the accuracy check here; the serving host checks and "
        "times it again and decides (default: %(default)s)",
    )


def _strategy_options(args: argparse.Namespace) -> dict[str, object]:
    options: dict[str, object] = {}
    for key in ("layer", "epochs", "unfreeze", "label_smoothing", "augment", "bn"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.lr is not None:
        options["lr"] = args.lr if args.lr == "auto" else float(args.lr)
    if args.unfreeze not in (None, "all"):
        options["unfreeze"] = int(args.unfreeze)
    if args.random_init:
        options["pretrained"] = False
    return options


def _inspect(args: argparse.Namespace) -> int:
    """Print the model card in MODEL_DIR/model.onnx and the summary of report.json."""
    from tlserve.contract.card import ModelCard

    model_dir = Path(args.model_dir)
    model = model_dir / "model.onnx"
    if not model.is_file():
        print(f"tlserve inspect: no model.onnx in {model_dir}", file=sys.stderr)
        return 1
    try:
        import onnxruntime as ort

        from tlserve.contract.rules import CPU_PROVIDER

        session = ort.InferenceSession(str(model), providers=[CPU_PROVIDER])
        props = dict(session.get_modelmeta().custom_metadata_map)
    except ImportError:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    card = ModelCard.from_props(props)
    if card is None:
        print(f"{model}: no tlserve model card")
        return 1
    spec = card.preprocessing
    print(f"model      {model}")
    print(f"labels     {', '.join(card.labels)}")
    print(f"input      {spec.height}x{spec.width} RGB uint8, {spec.interpolation}, "
          f"crop {spec.crop_pct}, mean {spec.mean}, std {spec.std}")  # fmt: skip
    print(f"backbone   {card.backbone}")
    print(f"strategy   {card.strategy}")
    print(f"created    {card.created} (tlserve {card.tlserve_version})")
    print(f"data       {card.data_fingerprint}")
    for key, value in sorted(card.metrics.items()):
        print(f"metric     {key} = {value:.4f}")
    for key, note in sorted(card.notes.items()):
        print(f"note       {key} = {note}")
    _print_variants(model_dir, args.check)
    report = model_dir / "report.json"
    if report.is_file():
        try:
            from tlserve.training.report.record import RunRecord
        except ImportError:  # a serving install: the run record needs the training extra
            print(f"report     {model_dir / 'report.md'} (the train extra prints its summary)")
            return 0
        for line in RunRecord.load(report).summary():
            print(line)
        print(f"report     {model_dir / 'report.md'}")
    return 0


def _print_variants(model_dir: Path, check: bool) -> None:
    """The variant files beside model.onnx and, with ``check``, what this host would serve."""
    from tlserve.contract.variants import REFERENCE_FILE, VARIANTS, variant_file

    files = [v for v in VARIANTS if (model_dir / variant_file(v)).is_file()]
    reference = (model_dir / REFERENCE_FILE).is_file()
    print(f"variants   {', '.join(files)}" + (f" (+ {REFERENCE_FILE})" if reference else ""))
    if check:
        from tlserve.server.config import ServerConfig
        from tlserve.server.models.variants import choose_variant

        config = ServerConfig(model_repository=model_dir.parent.parent, device="cpu")
        choice = choose_variant(model_dir, config)
        print(f"this host  {choice.host}")
        print(f"  serves {choice.variant} [{choice.source}]: {choice.reason}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tlserve`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    commands = {"train": _train, "inspect": _inspect}
    try:
        handler = getattr(args, "handler", None) or commands[args.command]
        code = int(handler(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at exit
        return code
    except TlserveError as exc:
        print(f"tlserve {args.command}: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except (ValueError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _closed_pipe()
        print(f"tlserve {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _closed_pipe() -> int:
    """The reader of our output went away (``tlserve classify ... | head``): end quietly.

    The exit code is the shell's for SIGPIPE, as ``yes | head`` gives.
    """
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
