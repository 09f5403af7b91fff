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
from tlserve.cli.remote import EXIT_CODES, EXIT_PIPE, add_commands, exit_code_for
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
        default="linear",
        choices=STRATEGY_NAMES,
        help="linear/trees: frozen features + a classifier; finetune: new head, then the "
        "backbone at smaller learning rates; scratch: the whole network; auto: measure "
        "the data and pick one (default: %(default)s)",
    )
    train.add_argument(
        "--backbone",
        default="tf_efficientnet_lite0",
        help="tf_efficientnet_lite0/1/2 (weights shipped), timm:<model> or tv:<model> "
        "(torchvision; weights from --backbone-weights) (default: %(default)s)",
    )
    train.add_argument("--seed", type=int, default=0)
    _add_training_flags(train)

    _add_quantize(sub)
    add_check(sub)  # tlserve check DATA_DIR: tlserve.cli.check
    inspect = sub.add_parser(
        "inspect", help="print a model version's metadata and evaluation report"
    )
    inspect.add_argument("model_dir", type=Path, metavar="MODEL_DIR")

    serve = sub.add_parser("serve", help="serve every model in a repository over gRPC")
    serve.add_argument("--model-repository", type=Path, metavar="REPO")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--grpc-port", type=int, help="0 picks a free port (default 8001)")
    serve.add_argument("--metrics-port", type=int, help="0 picks a free port (default 8002)")
    serve.add_argument(
        "--device", choices=("auto", "cpu", "cuda", "tensorrt"), help="execution provider"
    )
    serve.add_argument(
        "--gpu-fallback", choices=("fail", "cpu"), help="GPU asked for but unusable: fail or cpu"
    )
    serve.add_argument("--max-batch-size", type=int)
    serve.add_argument("--max-queue-delay", type=float, help="seconds to wait to fill a batch")
    serve.add_argument("--max-queue-size", type=int, help="queued rows before RESOURCE_EXHAUSTED")
    serve.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        help="calls held at once; more are refused before they are read (0: derived)",
    )
    serve.add_argument(
        "--queue-policy", help="adaptive-lifo: freshest first while the queue stands; or fifo"
    )
    serve.add_argument(
        "--max-streams-per-connection",
        type=int,
        help="calls one connection may have open; more wait on the caller's side (0: derived)",
    )
    serve.add_argument("--preferred-batch-sizes", help='e.g. "4,8": run at once at these sizes')
    serve.add_argument("--instances", type=int, help="concurrent executions per model")
    serve.add_argument("--intra-op-threads", type=int, help="threads per run (0: onnxruntime's)")
    serve.add_argument(
        "--tune",
        choices=("auto", "on", "off"),
        help="measure threads x instances x batch size at load (auto: models >= 1 ms)",
    )
    serve.add_argument("--tune-seconds", type=float, help="time bound of tuning per model")
    serve.add_argument("--trt-cache-dir", help="keep TensorRT engines here across restarts")
    serve.add_argument(
        "--version-policy", help='"latest:N" (default latest:1), "specific:1,3", "all"'
    )
    serve.add_argument(
        "--model-control", choices=("poll", "explicit"), help="watch the repository, or RPCs only"
    )
    serve.add_argument("--poll-interval", type=float, help="seconds between repository scans")
    serve.add_argument("--drain-delay", type=float, help="seconds to keep serving after SIGTERM")
    serve.add_argument("--grace", type=float, help="seconds in-flight calls get to finish")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates (mTLS)")
    serve.add_argument("--auth-token-file", help="file holding the bearer token callers must send")

    add_commands(sub)  # classify, models, health: tlserve.cli.remote
    return parser


def _train(args: argparse.Namespace) -> int:
    from tlserve.training import TrainConfig, train

    result = train(
        TrainConfig(
            args.data_dir,
            model_repository=args.model_repository,
            name=args.name,
            strategy=args.strategy,
            backbone=args.backbone,
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
        help="publish a faster variant when measured worth it here: auto keeps int8 (fp16 "
        "on a GPU) within the accuracy and speed budgets (default: %(default)s)",
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


def _add_quantize(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _inspect(args: argparse.Namespace) -> int:
    """Print the model card in MODEL_DIR/model.onnx and the summary of report.json."""
    import json

    from tlserve.contract.card import ModelCard

    model_dir = Path(args.model_dir)
    model = model_dir / "model.onnx"
    if not model.is_file():
        print(f"tlserve inspect: no model.onnx in {model_dir}", file=sys.stderr)
        return 1
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
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
    report = model_dir / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        test = data.get("evaluation", {}).get("test") or {}
        if test:
            print(f"held-out   accuracy {test['accuracy']:.4f}, "
                  f"macro-F1 {test.get('macro_f1', 0.0):.4f} on {test['n']} images")  # fmt: skip
            for name, row in (test.get("per_class") or {}).items():
                recall, precision = row.get("recall"), row.get("precision")
                print(f"  {name:<20} recall {_fmt(recall)}  precision {_fmt(precision)}")
        calibration = data.get("calibration") or {}
        if calibration:
            print(f"calibration T={calibration['temperature']:.3f}, ECE "
                  f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}")  # fmt: skip
            if calibration.get("reason"):
                print(f"  {calibration['reason']}")
        print(f"wall time  {data.get('wall_seconds', 0):.0f} s; report: {model_dir / 'report.md'}")
    return 0


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def _serve(args: argparse.Namespace) -> int:
    from tlserve.server.app import serve
    from tlserve.server.config import ServerConfig

    overrides = {k: getattr(args, k) for k in (
        "model_repository", "host", "grpc_port", "metrics_port", "device", "gpu_fallback",
        "max_batch_size", "max_queue_delay", "max_queue_size", "max_concurrent_rpcs",
        "max_streams_per_connection", "queue_policy", "preferred_batch_sizes",
        "instances", "version_policy", "model_control", "poll_interval", "drain_delay", "grace",
        "tls_cert", "tls_key", "tls_client_ca", "auth_token_file",
        "intra_op_threads", "tune", "tune_seconds", "trt_cache_dir",
    )}  # fmt: skip
    from tlserve.server.eventloop import install_event_loop

    install_event_loop()
    serve(ServerConfig.load(overrides))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tlserve`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    commands = {"train": _train, "serve": _serve, "inspect": _inspect}
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
