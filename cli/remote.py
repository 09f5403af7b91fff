"""The ``tlserve`` subcommands that call a running server: classify, models, health.

They share one set of connection flags, each with an environment variable
(flags win), so a script or a pod sets them once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tlserve.client import (
    Client,
    Credentials,
    DeadlineExceeded,
    Overloaded,
    TlserveError,
    Unauthenticated,
    Unavailable,
)
from tlserve.contract.errors import ConfigError
from tlserve.contract.predictions import DEFAULT_TOP_K
from tlserve.contract.rules import IMAGE_SUFFIXES

__all__ = ["EXIT_CODES", "EXIT_PIPE", "add_commands", "exit_code_for"]

_CLASSIFY_BATCH = 16

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RETRY, EXIT_DENIED = 0, 1, 2, 3, 4
EXIT_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away
EXIT_CODES = """\
exit codes:
  0    success (health: the server is ready)
  1    the work failed: an error answer, bad files, or (health) not ready
  2    bad usage: an unknown flag or a bad setting
  3    try again later: server unreachable, draining, overloaded or too slow
  4    refused: missing or wrong credentials (token, client certificate)
  130  interrupted
  141  the reader of the output went away (e.g. `| head`)
"""


# Each error of the tree (tlserve.contract.errors) by its nearest listed base.
_EXIT_BY_ERROR: dict[type[TlserveError], int] = {
    Unavailable: EXIT_RETRY,
    Overloaded: EXIT_RETRY,
    DeadlineExceeded: EXIT_RETRY,
    Unauthenticated: EXIT_DENIED,
    ConfigError: EXIT_USAGE,
    TlserveError: EXIT_FAILED,
}


def exit_code_for(error: TlserveError) -> int:
    """The exit code of a command that failed with ``error``."""
    for cls in type(error).__mro__:
        if cls in _EXIT_BY_ERROR:
            return _EXIT_BY_ERROR[cls]
    return EXIT_FAILED


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _connection_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("connection (flags override TLSERVE_* variables)")
    add = group.add_argument
    # Beside a server (a container's HEALTHCHECK), its own TLSERVE_GRPC_PORT is the default.
    local = f"127.0.0.1:{_env('TLSERVE_GRPC_PORT', '8001')}"
    add("--target", default=_env("TLSERVE_TARGET", local), metavar="HOST:PORT",
        help="server address (TLSERVE_TARGET, else 127.0.0.1:TLSERVE_GRPC_PORT; "
        "default: %(default)s)")  # fmt: skip
    add(
        "--timeout",
        type=float,
        default=float(_env("TLSERVE_TIMEOUT") or 30),
        metavar="SECONDS",
        help="deadline of a call, retries included (TLSERVE_TIMEOUT; default: %(default)s)",
    )
    add("--tls", action="store_true", default=bool(_env("TLSERVE_TLS")),
        help="use TLS, trusting the system's root certificates (TLSERVE_TLS=1)")  # fmt: skip
    add("--ca-cert", type=Path, default=_env("TLSERVE_CA_CERT"), metavar="PEM",
        help="use TLS, trusting this CA (TLSERVE_CA_CERT)")  # fmt: skip
    add("--client-cert", type=Path, default=_env("TLSERVE_CLIENT_CERT"), metavar="PEM",
        help="mutual TLS: this certificate (TLSERVE_CLIENT_CERT)")  # fmt: skip
    add("--client-key", type=Path, default=_env("TLSERVE_CLIENT_KEY"), metavar="PEM",
        help="mutual TLS: its key (TLSERVE_CLIENT_KEY)")  # fmt: skip
    add("--token-file", type=Path, default=_env("TLSERVE_AUTH_TOKEN_FILE"), metavar="FILE",
        help="bearer token from a file (TLSERVE_AUTH_TOKEN_FILE); or set TLSERVE_AUTH_TOKEN "
        "(no --token flag: a command line is visible to every user)")  # fmt: skip
    add("--json", action="store_true", help="print JSON lines, one per result")
    return flags


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register classify, models and health on the ``tlserve`` parser."""
    flags = _connection_flags()
    formatter = argparse.RawDescriptionHelpFormatter

    classify = sub.add_parser(
        "classify", parents=[flags], formatter_class=formatter, epilog=EXIT_CODES,
        help="classify image files (or folders of them) through a running server",
        description="Prints one line per image: the file, then its best labels and scores.",
    )  # fmt: skip
    classify.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    classify.add_argument("--model", required=True, help="model name on the server")
    classify.add_argument("--version", default="", help="model version (default: the newest)")
    classify.add_argument(
        "--top-k", type=int, default=DEFAULT_TOP_K, help="labels per image (default: %(default)s)"
    )
    classify.add_argument(
        "--preprocess", choices=("server", "client"), default="server",
        help="where images are decoded and resized (default: server)",
    )  # fmt: skip
    classify.set_defaults(handler=_classify)

    models = sub.add_parser(
        "models", parents=[flags], formatter_class=formatter, epilog=EXIT_CODES,
        help="list the server's models, their versions and states",
    )  # fmt: skip
    models.add_argument("--ready-only", action="store_true", help="only versions ready to serve")
    models.set_defaults(handler=_models)

    health = sub.add_parser(
        "health", parents=[flags], formatter_class=formatter, epilog=EXIT_CODES,
        help="is the server up and ready? (exit code 0 when ready)",
        description="Prints grpc.health.v1 status (what Kubernetes probes see) and readiness.",
    )  # fmt: skip
    health.set_defaults(handler=_health)


def _client(args: argparse.Namespace) -> Client:
    token = os.environ.get("TLSERVE_AUTH_TOKEN") or None
    if args.token_file is not None:
        token = Path(args.token_file).read_text().strip()
    credentials = Credentials(
        tls=args.tls,
        root_certificates=args.ca_cert,
        certificate_chain=args.client_cert,
        private_key=args.client_key,
        token=token,
    )
    return Client(args.target, credentials=credentials, timeout=args.timeout)


def _walk(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            yield path


def _classify(args: argparse.Namespace) -> int:
    files = list(_walk(args.paths))
    if not files:
        print("no image files found", file=sys.stderr)
        return EXIT_FAILED
    missing = [f for f in files if not f.is_file()]
    if missing:
        print(f"no such file: {missing[0]}", file=sys.stderr)
        return EXIT_FAILED
    with _client(args) as client:
        for start in range(0, len(files), _CLASSIFY_BATCH):
            chunk = files[start : start + _CLASSIFY_BATCH]
            results = client.classify(
                chunk, model=args.model, version=args.version, top_k=args.top_k,
                preprocess=args.preprocess,
            )  # fmt: skip
            for path, labels in zip(chunk, results, strict=True):
                # Client-side preprocessing ranks probabilities only: no score there.
                score = getattr(labels, "ood_score", None)
                flagged = bool(getattr(labels, "out_of_distribution", False))
                if args.json:
                    print(json.dumps({
                        "file": str(path), "labels": [vars(p) for p in labels],
                        "ood_score": score, "out_of_distribution": flagged,
                    }))  # fmt: skip
                else:
                    best = "  ".join(f"{p.label} {p.score:.3f}" for p in labels)
                    unusual = "\tout of distribution" if flagged else ""
                    print(f"{path}\t{best}{unusual}")
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models(ready_only=args.ready_only)
    if args.json:
        for m in models:
            print(json.dumps(vars(m)))
        return EXIT_OK
    rows = [("MODEL", "VERSION", "STATE", "REASON")]
    rows += [(m.name, m.version, m.state, m.reason) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health()
        try:
            ready = client.server_ready()
        except Unauthenticated:  # health is open to all; ServerReady may need a token
            ready = status == "SERVING"
    if args.json:
        print(json.dumps({"target": args.target, "health": status, "ready": ready}))
    else:
        print(f"{args.target}: {status}, {'ready' if ready else 'not ready'}")
    return EXIT_OK if ready and status == "SERVING" else EXIT_FAILED
