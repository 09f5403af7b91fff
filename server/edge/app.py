"""Server construction and lifecycle.

:func:`start_server` builds and starts everything and returns a
:class:`RunningServer` (tests bind port 0 and read the ports back);
:func:`serve` runs one until SIGTERM/SIGINT, then drains: health goes
NOT_SERVING, requests are still served for ``drain_delay`` so load balancers
stop sending, then in-flight calls get ``grace`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from tlserve.protos import (
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    tlserve_v1_pb2,
    tlserve_v1_pb2_grpc,
)
from tlserve.protos import health_pb2 as own_health_pb2
from tlserve.server.batching.batcher import DynamicBatcher
from tlserve.server.config import CONTROL_RPC_ROOM, ServerConfig
from tlserve.server.core.control import ModelControl
from tlserve.server.core.inference import InferenceCore
from tlserve.server.edge.admission import InferenceAdmission
from tlserve.server.edge.interceptors import RequestGuard
from tlserve.server.edge.limit import AdaptiveLimit
from tlserve.server.edge.rest.edge import start_rest
from tlserve.server.edge.rest.listener import RestListener
from tlserve.server.edge.security import BearerTokenInterceptor, load_token, server_credentials
from tlserve.server.edge.servicers import ImageServicer, InferenceServicer
from tlserve.server.metrics import ServerMetrics
from tlserve.server.models.gpu import register_gpu_metrics
from tlserve.server.models.lifecycle import ModelRegistry

__all__ = ["RunningServer", "serve", "start_server"]

log = logging.getLogger(__name__)

# Between refusing new calls and stopping gRPC: calls that arrived just before
# are still being handed to Python one per event-loop turn.
_CLOSE_TURNS_S = 0.05

_SERVICES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    tlserve_v1_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """tlserve's private pool (see tlserve.protos._pool), health included, for reflection."""
    # tlserve.protos.health_pb2 registered grpc.health.v1 in POOL on import (the
    # client uses it too); grpc_health's own copy lives in protobuf's default pool.
    pool: descriptor_pool.DescriptorPool = own_health_pb2.DESCRIPTOR.pool
    return pool


@dataclass
class RunningServer:
    """A started server: its ports, its parts, and how to stop it."""

    config: ServerConfig
    grpc_server: grpc.aio.Server
    grpc_port: int
    metrics_port: int
    core: InferenceCore
    admission: InferenceAdmission
    health: health_aio.HealthServicer
    _http: WSGIServer
    _http_thread: threading.Thread
    _preprocess: ThreadPoolExecutor
    rest: RestListener | None = None  # the HTTP port (KServe v2 REST, the page); None: off

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    @property
    def http_port(self) -> int:
        """The HTTP port bound (0 when HTTP is off)."""
        return self.rest.port if self.rest else 0

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for service in ("", *_SERVICES):
            await self.health.set(service, status)

    async def stop(self, *, drain_delay: float | None = None, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, serve for ``drain_delay``, then ``grace``."""
        drain = self.config.drain_delay if drain_delay is None else drain_delay
        grace = self.config.grace if grace is None else grace
        self.core.drain()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining: health NOT_SERVING, still serving for %.1fs", drain)
        await asyncio.sleep(drain)
        log.info("stopping: in-flight calls have %.1fs to finish", grace)
        # New calls from here on get UNAVAILABLE, which callers retry: taken in
        # as the stop begins, they would be cancelled (CANCELLED is not retried).
        # Their refusals wait for the shutdown to begin (see admission.py).
        self.admission.close()
        await asyncio.sleep(_CLOSE_TURNS_S)  # let calls gRPC already holds reach the refusal
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace))
        # HTTP calls in flight get the same grace, at the same time as gRPC's.
        rest_stopping = asyncio.ensure_future(self.rest.stop()) if self.rest else None
        await asyncio.sleep(0)  # the shutdown begins: gRPC takes no new calls
        self.admission.release()
        await stopping
        if rest_stopping is not None:
            await rest_stopping
        await self.core.registry.stop()
        self._preprocess.shutdown(wait=False, cancel_futures=True)
        self._http.shutdown()
        self._http.server_close()
        log.info("stopped")


async def start_server(
    config: ServerConfig, metrics_registry: CollectorRegistry | None = None
) -> RunningServer:
    """Start listening, then load and warm every model; health follows readiness."""
    metrics = ServerMetrics(metrics_registry)
    registry = ModelRegistry(config, metrics)
    preprocess = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="preprocess")
    core = InferenceCore(registry, metrics, preprocess)
    register_gpu_metrics(metrics.registry, config.device)

    credentials = server_credentials(config)  # bad TLS/auth settings fail before binding
    token = load_token(config)
    interceptors: list[grpc.aio.ServerInterceptor] = (
        [BearerTokenInterceptor(token, lambda why: metrics.auth_failures.labels(why).inc())]
        if token
        else []
    )
    # Before anything reads the message: a refused call costs almost nothing.
    admission = _admission(config, registry, metrics)
    interceptors.append(admission)
    # Last, so it wraps the servicers' own handlers: requests that do not
    # parse and unknown methods get a clear code and are counted.
    interceptors.append(
        RequestGuard(lambda api, outcome: metrics.requests.labels("unknown", api, outcome).inc())
    )
    server = grpc.aio.server(
        interceptors=interceptors,
        # The hard bound on every call, answered by gRPC before the message is
        # read; the inference bound above keeps CONTROL_RPC_ROOM free of it.
        maximum_concurrent_rpcs=config.max_concurrent_rpcs + CONTROL_RPC_ROOM,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # The SDK pings every 30 s to keep idle channels and long streams
            # alive; allow it rather than answering GOAWAY "too many pings".
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # A caller's calls past this wait on its side of the connection.
            ("grpc.max_concurrent_streams", config.max_streams_per_connection),
            # ...but only if the limit counts open HTTP/2 streams, which the
            # client also counts. gRPC's default counts streams until the
            # server has freed them, which grpc.aio does late: past the limit
            # the client's next calls were refused (REFUSED_STREAM, seen as
            # UNAVAILABLE) instead of waiting their turn: on one channel with
            # the default limit of 24, 40% of them at 24 in flight, 46% at 32.
            ("grpc.http.overload_protection", 0),
        ],
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(core, ModelControl(core)), server
    )
    tlserve_v1_pb2_grpc.add_ImageServiceServicer_to_server(ImageServicer(core), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *_SERVICES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
        pool=_reflection_pool(),
    )
    address = f"{config.host}:{config.grpc_port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {config.host}:{config.grpc_port}")
    http, http_thread = metrics.serve_http(config.host, config.metrics_port)
    running = RunningServer(
        config, server, port, http.server_port, core, admission, health, http, http_thread,
        preprocess,
    )  # fmt: skip
    await running._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    running.rest = await start_rest(config, core, admission, token)
    log.info(
        "listening: gRPC on %s:%d (%s, %s), metrics on http://%s:%d/metrics",
        config.host,
        port,
        "plaintext" if credentials is None else "mTLS" if config.tls_client_ca else "TLS",
        "bearer-token auth" if token else "no auth",
        config.host,
        running.metrics_port,
    )
    await registry.load_all()
    if registry.ready:
        await running._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: serving %s", ", ".join(registry.names()) or "no models")
    else:
        log.error("not ready: models failed to load: %s", registry.failed)
    return running


def _admission(
    config: ServerConfig, registry: ModelRegistry, metrics: ServerMetrics
) -> InferenceAdmission:
    def batchers() -> list[DynamicBatcher]:
        return [m.batcher for n in registry.names() for m in registry.versions(n)]

    def retry_after() -> float:  # the longest drain of any serving queue
        return max((b.retry_after() for b in batchers()), default=0.1)

    def queue_time() -> float:  # the longest estimated wait of any serving queue
        return max((b.expected_wait() for b in batchers()), default=0.0)

    limit: AdaptiveLimit | int = config.max_concurrent_rpcs
    if "max_concurrent_rpcs" not in config.explicit_keys and config.max_queue_time > 0:
        # The configured bound is the ceiling; the queues' wait moves it below,
        # never under two batches: at 8 calls lite0 (16-row batches) went idle
        # between batches while the refused callers' retries kept the loop busy.
        floor = max(32, 2 * config.instances * config.max_batch_size)
        limit = AdaptiveLimit(
            config.max_concurrent_rpcs, floor=min(config.max_concurrent_rpcs, floor),
            ceiling=config.max_concurrent_rpcs, target=config.max_queue_time,
            queue_time=queue_time,
        )  # fmt: skip

    def over_time() -> bool:  # as the queues' own bound, but before the message is parsed
        return config.max_queue_time > 0 and queue_time() > config.max_queue_time

    def too_late(seconds_left: float, model: str | None) -> tuple[str, float] | None:
        # Before the message is read its model is unknown: refuse only what no
        # serving model could answer in time (with one model, exactly its rule);
        # once read, what its own model cannot (an unknown name: as unknown).
        named = [b for b in batchers() if b.name == model]
        deadline = asyncio.get_running_loop().time() + seconds_left
        soonest = min(
            ((b.time_to_answer(1, deadline), b.name) for b in named or batchers()), default=None
        )
        if soonest is None or soonest[0] <= seconds_left:
            return None
        metrics.shed.labels(soonest[1], "late").inc()
        return soonest[1], soonest[0]

    return InferenceAdmission(
        limit,
        retry_after,
        lambda api, code: metrics.requests.labels("unknown", api, code).inc(),
        over_time=over_time,
        too_late=too_late,
    )


def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then drain and stop."""
    asyncio.run(_serve(config))


async def _serve(config: ServerConfig) -> None:
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received")
    await running.stop()
