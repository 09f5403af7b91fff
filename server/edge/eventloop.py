"""The event loop ``tlserve serve`` runs on: uvloop's when it is installed, else asyncio's.

Measured on the overhead-bound bench model (2 shared cores, V2 ModelInfer,
alternating passes): uvloop gave a lower concurrency-1 p50 in 4 of 4 passes
(-0.08 to -0.14 ms of ~1.3 ms) and a higher median peak throughput
(1090 vs 824 requests/s over 5 passes, ratio 0.5-1.8 per pass). grpc.aio
runs on it unchanged. ``uvloop`` is in the ``serve`` extras; without it the
server runs on asyncio's loop as before.
"""

from __future__ import annotations

import asyncio
import importlib
import logging

__all__ = ["install_event_loop"]

log = logging.getLogger(__name__)


def install_event_loop() -> str:
    """Make ``asyncio.run`` use uvloop when it is installed; return the loop's name."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        log.info("event loop: asyncio (pip install uvloop for a faster one)")
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    log.info("event loop: uvloop %s", uvloop.__version__)
    return "uvloop"
