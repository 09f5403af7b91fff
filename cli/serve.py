"""``tlserve serve``: its flags, each a ``ServerConfig`` field of the same name."""

from __future__ import annotations

import argparse
from pathlib import Path

# The config's own tuples: a value the config refuses is never a choice here.
from tlserve.server.config import DEVICES, GPU_FALLBACKS, TUNE_MODES, VARIANT_CHOICES
from tlserve.server.policy import MODEL_CONTROLS, QUEUE_POLICIES

__all__ = ["add_serve"]


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``serve`` subcommand; a flag left out keeps the env's (or the default) value."""
    serve = sub.add_parser("serve", help="serve every model in a repository over gRPC")
    serve.add_argument("--model-repository", type=Path, metavar="REPO")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--grpc-port", type=int, help="0 picks a free port (default 8001)")
    serve.add_argument("--metrics-port", type=int, help="0 picks a free port (default 8002)")
    serve.add_argument(
        "--http-port", type=int, help="KServe v2 REST and the model page (default 8000; 0: off)"
    )
    serve.add_argument("--device", choices=DEVICES, help="execution provider")
    serve.add_argument(
        "--gpu-fallback", choices=GPU_FALLBACKS, help="GPU asked for but unusable: fail or cpu"
    )
    serve.add_argument("--max-batch-size", type=int)
    serve.add_argument("--max-queue-delay", type=float, help="seconds to wait to fill a batch")
    serve.add_argument("--max-queue-size", type=int, help="queued rows before RESOURCE_EXHAUSTED")
    serve.add_argument(
        "--max-queue-time",
        type=float,
        help="seconds of queued work per model before RESOURCE_EXHAUSTED (0: off, rows only)",
    )
    serve.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        help="calls held at once; more are refused before they are read (0: derived)",
    )
    serve.add_argument(
        "--queue-policy",
        choices=QUEUE_POLICIES,
        help="adaptive-lifo: freshest first while the queue stands; or fifo",
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
        choices=TUNE_MODES,
        help="measure threads x instances x batch size at load (auto: models >= 1 ms)",
    )
    serve.add_argument(
        "--variant",
        choices=VARIANT_CHOICES,
        help="auto: check each version's variants on this host, serve the fastest that keeps "
        "accuracy; a kind by name: serve it if it passes the accuracy check, else refuse",
    )
    serve.add_argument("--tune-seconds", type=float, help="time bound of tuning per model")
    serve.add_argument("--trt-cache-dir", help="keep TensorRT engines here across restarts")
    serve.add_argument(
        "--version-policy", help='"latest:N" (default latest:1), "specific:1,3", "all"'
    )
    serve.add_argument(
        "--model-control", choices=MODEL_CONTROLS, help="watch the repository, or RPCs only"
    )
    serve.add_argument("--poll-interval", type=float, help="seconds between repository scans")
    serve.add_argument("--drain-delay", type=float, help="seconds to keep serving after SIGTERM")
    serve.add_argument("--grace", type=float, help="seconds in-flight calls get to finish")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates (mTLS)")
    serve.add_argument("--auth-token-file", help="file holding the bearer token callers must send")

    flags = tuple(action.dest for action in serve._actions if action.dest != "help")
    serve.set_defaults(handler=_serve, config_flags=flags)


def _serve(args: argparse.Namespace) -> int:
    from tlserve.server.config import ServerConfig
    from tlserve.server.edge.app import serve
    from tlserve.server.edge.eventloop import install_event_loop

    overrides = {name: getattr(args, name) for name in args.config_flags}
    install_event_loop()
    serve(ServerConfig.load(overrides))
    return 0
