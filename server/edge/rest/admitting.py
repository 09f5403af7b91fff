"""The gRPC edge's inference bound, shared by REST calls.

REST inference calls hold a unit of the same
:class:`~tlserve.server.edge.admission.InferenceAdmission` bound as gRPC
ones (one server, one limit), are refused past it with the same message
before their bodies are read, and get UNAVAILABLE (503) once the server
is closing. The admission object is used through its public state
(``closing``, ``inflight``, ``limit``, ``bound``); its refusal messages are
repeated here word for word.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tlserve.contract.errors import Overloaded, Unavailable
from tlserve.server.edge.admission import InferenceAdmission

__all__ = ["RestAdmission"]


class RestAdmission:
    """Admits a REST inference call against the gRPC edge's bound; see the module docstring.

    ``retry_after()`` gives the hint in seconds, ``over_time()`` whether the
    queues hold more work than ``--max-queue-time`` (as for gRPC).
    """

    def __init__(
        self,
        admission: InferenceAdmission,
        retry_after: Callable[[], float],
        over_time: Callable[[], bool],
    ) -> None:
        self._admission = admission
        self._retry_after = retry_after
        self._over_time = over_time

    @property
    def closing(self) -> bool:
        return self._admission.closing

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one unit of the bound for the call; Overloaded or Unavailable if none."""
        bound = self._admission
        if bound.closing:
            raise Unavailable("the server is shutting down; retry on another replica")
        full = bound.inflight >= bound.limit
        if full or self._over_time():
            why = (
                f"the server is working on {bound.inflight} inference calls, its limit"
                if full
                else "the queues hold more work than --max-queue-time"
            )
            raise Overloaded(f"{why}; retry later", retry_after=self._retry_after())
        bound.inflight += 1
        try:
            yield
        finally:
            bound.inflight -= 1
            bound.bound.update(bound.inflight)
