"""Server configuration: one frozen object, read once at the edge.

Values come from ``TLSERVE_*`` environment variables, overridden by command
line flags. A bad value fails at start-up with a sentence naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlserve.contract.errors import ConfigError
from tlserve.contract.rules import MAX_IMAGE_PIXELS, MAX_MESSAGE_BYTES, MAX_REQUEST_PIXELS
from tlserve.server.policy import (
    MODEL_CONTROLS,
    QUEUE_POLICIES,
    VersionPolicy,
    parse_batch_sizes,
    parse_version_policy,
)

__all__ = [
    "DEVICES",
    "GPU_FALLBACKS",
    "TUNE_MODES",
    "VARIANT_CHOICES",
    "ConfigError",
    "ServerConfig",
    "derived_rpc_limit",
]

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
LATEST_ONE = VersionPolicy("latest")
_PARSERS: dict[str, Callable[[str], Any]] = {
    "preferred_batch_sizes": parse_batch_sizes,
    "version_policy": parse_version_policy,
}
GPU_FALLBACKS = ("fail", "cpu")
TUNE_MODES = ("auto", "on", "off")
# Which variant of each version serves (server/models/variants.py): "auto" checks and
# times the version's variants here; a kind by name serves it if it passes the
# accuracy check, else the version does not load.
VARIANT_CHOICES = ("auto", "float32", "int8", "fp16")
# Calls past max_concurrent_rpcs that gRPC itself still takes: health checks,
# metadata and reflection, which the inference bound never refuses.
CONTROL_RPC_ROOM = 32


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start. Durations are in seconds."""

    model_repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_port: int = 8002
    # The KServe v2 REST edge and the page (server/edge/rest/), on the same core
    # as gRPC; 8000 as Triton's. 0 = off (it has no "any free port": tests pick one).
    http_port: int = 8000
    # auto: CUDA when onnxruntime has it, else CPU. cuda/tensorrt: that GPU
    # provider; if it is unusable, gpu_fallback says what happens: "fail" (the
    # model fails to load, the server is not ready) or "cpu" (serve on CPU,
    # logged at WARNING and visible in metadata and metrics).
    device: str = "auto"
    gpu_fallback: str = "fail"
    max_batch_size: int = 32
    # 0 = no waiting: a batch is whatever queued while the model was busy
    # (Triton's default too); raise it to trade latency for bigger batches.
    max_queue_delay: float = 0.0
    # Images queued per model before new requests get RESOURCE_EXHAUSTED.
    max_queue_size: int = 256
    # Seconds of work (at the measured compute time) a model's queue may hold;
    # a request that would wait longer gets RESOURCE_EXHAUSTED with the queue's
    # drain time as the hint, and the inference bound adapts to it. In time, not
    # rows: 256 rows are 0.3 s on a fast model and seconds on a slow one. 0 (the
    # default) = off: on 2 cores the refused callers' retries cost more than
    # their waiting did (docs/overload.md, "Admission in time").
    max_queue_time: float = 0.0
    # Inference calls (ModelInfer, Classify, Embed, streams) the server works
    # on at once; one more is refused with RESOURCE_EXHAUSTED before its
    # message is read (server/edge/admission.py); health and metadata calls never
    # are. 0 = derived: three batches per instance, at least 32 (derived_rpc_limit),
    # adaptive below that (server/edge/limit.py) when max_queue_time is set; a
    # number given is kept fixed.
    max_concurrent_rpcs: int = 0
    # Calls one connection may have open at once; more wait on the caller's
    # side (HTTP/2 flow control), costing the server nothing, and leave room
    # for other callers. 0 = derived: a quarter of max_concurrent_rpcs, at least 16.
    max_streams_per_connection: int = 0
    # Queue order (server/batching/queueing.py): "adaptive-lifo" serves the freshest
    # requests first while the queue stands; "fifo" always in arrival order.
    queue_policy: str = "adaptive-lifo"
    # Batch sizes the batcher runs at once, without waiting out max_queue_delay
    # ("4,8" in flags and env); empty: none preferred. See server/batching/batcher.py.
    preferred_batch_sizes: tuple[int, ...] = ()
    # Concurrent executions per model: N batches of one onnxruntime session run
    # at once, each on its own thread (one copy of the weights).
    instances: int = 1
    # Model lifecycle (server/models/lifecycle.py). Which versions of each model are
    # served: "latest:N" or "specific:1,3" (or "all") in flags and env.
    version_policy: VersionPolicy = LATEST_ONE
    # "poll": rescan the repository every poll_interval seconds and load, swap
    # or unload to match it; "explicit": only the repository RPCs change models.
    model_control: str = "poll"
    poll_interval: float = 10.0
    # After SIGTERM: health says NOT_SERVING and requests are still served for
    # drain_delay (so load balancers notice), then in-flight work gets grace.
    drain_delay: float = 5.0
    grace: float = 10.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    intra_op_threads: int = 0
    preprocess_threads: int = 4
    # Load-time tuning (server/models/tuning.py) of intra_op_threads, instances and
    # max_batch_size, within tune_seconds per model version, for the best
    # throughput whose batch runs within tune_latency_cap seconds. "auto":
    # models whose batch-1 run takes at least a millisecond; "on"; "off".
    # Settings given by flag or env are never changed (explicit_keys).
    tune: str = "auto"
    variant: str = "auto"
    tune_seconds: float = 5.0
    tune_latency_cap: float = 0.1
    # TensorRT engine and timing caches; empty: rebuilt on every load.
    trt_cache_dir: str = ""
    # The keys given by flags or env (filled by load); the tuner leaves them alone.
    explicit_keys: frozenset[str] = frozenset()
    log_level: str = "INFO"
    # Security and limits (server/edge/security.py). TLS when cert and key are set;
    # mTLS (client certificates required) when tls_client_ca is set too.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Bearer token for every RPC but health and reflection; give one or the other.
    auth_token: str = ""
    auth_token_file: str = ""
    max_images_per_request: int = 256
    # Decoded size limit per image (width x height), checked from the header
    # before anything is decoded; capped by tlserve.contract.images.MAX_IMAGE_PIXELS.
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # Pixels of all the images of one request together, also from headers.
    max_request_pixels: int = MAX_REQUEST_PIXELS

    def __post_init__(self) -> None:
        # Flags and env give text; it is parsed here, once, and used typed everywhere.
        for key, parse in _PARSERS.items():
            value = getattr(self, key)
            if isinstance(value, str):
                try:
                    object.__setattr__(self, key, parse(value))
                except ValueError as exc:
                    raise ConfigError(f"{_env_name(key)}: {exc}") from exc
        if self.device not in DEVICES:
            raise ConfigError(f"TLSERVE_DEVICE must be one of {DEVICES}, got {self.device!r}")
        if self.gpu_fallback not in GPU_FALLBACKS:
            raise ConfigError(
                f"TLSERVE_GPU_FALLBACK must be one of {GPU_FALLBACKS}, got {self.gpu_fallback!r}"
            )
        for key in ("grpc_port", "metrics_port", "http_port"):
            port = getattr(self, key)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{_env_name(key)} must be a port in 0..65535, got {port}")
        for key in (
            "max_batch_size", "max_queue_size", "max_message_bytes", "preprocess_threads",
            "max_images_per_request", "max_image_pixels", "max_request_pixels",
        ):  # fmt: skip
            if getattr(self, key) < 1:
                raise ConfigError(f"{_env_name(key)} must be at least 1, got {getattr(self, key)}")
        if self.variant not in VARIANT_CHOICES:
            raise ConfigError(
                f"TLSERVE_VARIANT must be one of {VARIANT_CHOICES}, got {self.variant!r}"
            )
        if self.tune not in TUNE_MODES:
            raise ConfigError(f"TLSERVE_TUNE must be one of {TUNE_MODES}, got {self.tune!r}")
        if self.tune_latency_cap <= 0:
            raise ConfigError(
                f"TLSERVE_TUNE_LATENCY_CAP must be positive, got {self.tune_latency_cap}"
            )
        for key in (
            "max_queue_delay", "drain_delay", "grace", "intra_op_threads", "tune_seconds",
            "max_queue_time",
        ):  # fmt: skip
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"{_env_name(key)} must not be negative, got {getattr(self, key)}"
                )
        _check_serving(self)
        _derive_call_bounds(self)

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        """Build from ``TLSERVE_*`` variables, then ``overrides`` (flags) on top.

        ``None`` values in ``overrides`` mean "not given" and leave the
        environment's (or the default) value in place.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "explicit_keys":
                continue
            raw = environ.get(_env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        if "model_repository" not in values:
            raise ConfigError(
                "no model repository: pass --model-repository or set TLSERVE_MODEL_REPOSITORY"
            )
        values["model_repository"] = Path(values["model_repository"])
        values["explicit_keys"] = frozenset(values)
        return cls(**values)


def derived_rpc_limit(config: ServerConfig) -> int:
    """The default bound on inference calls: three batches per instance.

    One running and two waiting keep the model busy; a call past that would
    only wait (or be refused) after costing a parse, and the answers of the
    ones in the server come sooner (at least 32 calls, for small batches).
    Requests of many rows are bounded by ``max_queue_size`` rows too.
    """
    return max(32, 3 * config.instances * config.max_batch_size)


def _derive_call_bounds(config: ServerConfig) -> None:
    """Fill in the derived defaults (0) of the two bounds on calls held at once."""
    for key in ("max_concurrent_rpcs", "max_streams_per_connection"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{_env_name(key)} must not be negative, got {getattr(config, key)}")
    if config.max_concurrent_rpcs == 0:
        object.__setattr__(config, "max_concurrent_rpcs", derived_rpc_limit(config))
        # 0 given asks for the default: the adaptive limit, not a fixed one.
        keys = config.explicit_keys - {"max_concurrent_rpcs"}
        object.__setattr__(config, "explicit_keys", keys)
    if config.max_streams_per_connection == 0:
        streams = max(16, config.max_concurrent_rpcs // 4)
        object.__setattr__(config, "max_streams_per_connection", streams)


def _check_serving(config: ServerConfig) -> None:
    """Batching and lifecycle settings: a bad one fails at start-up."""
    if config.queue_policy not in QUEUE_POLICIES:
        raise ConfigError(
            f"TLSERVE_QUEUE_POLICY must be one of {QUEUE_POLICIES}, got {config.queue_policy!r}"
        )
    if config.instances < 1:
        raise ConfigError(f"TLSERVE_INSTANCES must be at least 1, got {config.instances}")
    if config.model_control not in MODEL_CONTROLS:
        raise ConfigError(
            f"TLSERVE_MODEL_CONTROL must be one of {MODEL_CONTROLS}, got {config.model_control!r}"
        )
    if config.poll_interval <= 0:
        raise ConfigError(f"TLSERVE_POLL_INTERVAL must be positive, got {config.poll_interval}")


def _env_name(key: str) -> str:
    return "TLSERVE_" + key.upper()


def _parse(key: str, kind: object, raw: str) -> Any:
    try:
        if kind in ("int", int):
            return int(raw)
        if kind in ("float", float):
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{_env_name(key)}={raw!r} is not a valid {kind}") from None
