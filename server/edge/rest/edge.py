"""Start the REST edge beside gRPC: the one call :mod:`tlserve.server.edge.app` makes."""

from __future__ import annotations

import logging

from tlserve.server.config import ServerConfig
from tlserve.server.core.control import ModelControl
from tlserve.server.core.inference import InferenceCore
from tlserve.server.edge.admission import InferenceAdmission
from tlserve.server.edge.rest.listener import RestListener
from tlserve.server.edge.rest.routes import RestApp

__all__ = ["start_rest"]

log = logging.getLogger(__name__)


async def start_rest(
    config: ServerConfig,
    core: InferenceCore,
    admission: InferenceAdmission,
    token: str | None,
) -> RestListener | None:
    """Listen for HTTP on ``config.http_port`` (None when it is 0: off)."""
    if config.http_port == 0:
        return None
    app = RestApp(
        core,
        ModelControl(core),
        admission,
        token=token,
        on_denied=lambda why: core.metrics.auth_failures.labels(why).inc(),
    )
    listener = RestListener(app, config)
    await listener.start()
    tls = "plaintext" if not config.tls_cert else "mTLS" if config.tls_client_ca else "TLS"
    log.info(
        "listening: HTTP (KServe v2 REST, the model page) on http%s://%s:%d/ (%s, %s)",
        "" if tls == "plaintext" else "s", config.host, listener.port, tls,
        "bearer-token auth" if token else "no auth",
    )  # fmt: skip
    return listener
