"""Admission before the message is read: a bound on inference calls in the server.

Under overload the expensive part of a refused call is everything before the
refusal: reading a 150 KB message into Python, parsing it, finding the
model. :class:`InferenceAdmission` counts the inference calls the server is
working on (ModelInfer, Classify, Embed and the two streams) and refuses one
more, past its limit (:class:`~tlserve.server.edge.limit.AdaptiveLimit`,
which follows the queues' estimated wait), with RESOURCE_EXHAUSTED and a
``retry-after-ms`` hint, before anything parses its bytes.

A unary call whose deadline is nearer than the soonest any serving model
could answer it (``too_late``: the queue's own rule,
:meth:`~tlserve.server.batching.queueing.RequestQueue.time_to_answer`) gets
DEADLINE_EXCEEDED on arrival, its message still unread: the caller hears at
once instead of at its deadline, and the server spends no parse on it.
Once read, before it is parsed, the call is judged again by its own model
(named in the message's first field, :mod:`tlserve.server.edge.wire`):
beside an idle model "no model can answer in time" is never true, and a
late call for a busy one was parsed only for its queue to refuse it.

Once the server is closing (:meth:`InferenceAdmission.close`, at the end of
the drain window) new inference calls get UNAVAILABLE, which callers retry
elsewhere, rather than being taken in and then cancelled by the stop. The
refusal is held until gRPC's shutdown has begun (:meth:`release`): a caller
answered at once sends its retry straight back, and a call gRPC holds but
has not yet handed to Python when the shutdown begins is failed with
CANCELLED (gRPC core, grpc/grpc#41785). Held, the caller waits instead.

Health checks, reflection and metadata calls are never refused here: a
Kubernetes probe must not fail because the model is busy. gRPC's own
``maximum_concurrent_rpcs`` (set ``CONTROL_RPC_ROOM`` higher, see
:mod:`tlserve.server.edge.app`) stays as the hard bound on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc

from tlserve.contract.errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    TlserveError,
    Unavailable,
    error_trailer,
)
from tlserve.protos import grpc_service_pb2, tlserve_v1_pb2
from tlserve.server.edge.limit import AdaptiveLimit
from tlserve.server.edge.wire import model_name

__all__ = ["INFERENCE_METHODS", "InferenceAdmission"]

_V2 = "/" + grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_V1 = "/" + tlserve_v1_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
#: The calls that do model work, and so count against the bound.
INFERENCE_METHODS = frozenset(
    {f"{_V2}/ModelInfer", f"{_V2}/ModelStreamInfer"}
    | {f"{_V1}/{name}" for name in ("Classify", "Embed", "ClassifyStream")}
)

if TYPE_CHECKING:  # grpc's classes are generic only in its stubs
    _Continuation: TypeAlias = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]
    _Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

#: Called with the method's name and the status code's name for each refused call.
Refused = Callable[[str, str], None]
#: Given the seconds a call has left and its model (None: not known yet):
#: None if that model (else some serving model) can answer in time, else the
#: fastest such model's name and the seconds it would take.
TooLate = Callable[[float, str | None], tuple[str, float] | None]


def _api(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class InferenceAdmission(grpc.aio.ServerInterceptor):
    """Refuses inference calls past the limit before they are read; see the module docstring.

    ``limit`` is an :class:`AdaptiveLimit` (or a fixed count);
    ``retry_after()`` gives the hint in seconds (how long the queues need to
    drain); ``too_late(seconds_left)`` says whether a call can be answered
    in time; ``on_refused(api, code)`` counts each refusal. Install it before
    any interceptor that parses requests.
    """

    def __init__(
        self,
        limit: AdaptiveLimit | int,
        retry_after: Callable[[], float],
        on_refused: Refused,
        *,
        over_time: Callable[[], bool] = lambda: False,
        too_late: TooLate = lambda seconds_left, model: None,
    ) -> None:
        self.bound = limit if isinstance(limit, AdaptiveLimit) else AdaptiveLimit.fixed(limit)
        # True while the queues hold more work than they may: refusing here costs
        # no parse, where the queue's own refusal comes after one.
        self._over_time = over_time
        self._too_late = too_late
        self.inflight = 0
        self.closing = False
        self._released = asyncio.Event()
        self._retry_after = retry_after
        self._on_refused = on_refused

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method not in INFERENCE_METHODS:
            return await continuation(handler_call_details)
        error = self.refusal(_api(method))
        if error is not None:
            refusal: grpc.RpcMethodHandler[Any, Any] = self._refusal(method, error)
            return refusal
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        counted: grpc.RpcMethodHandler[Any, Any] = self._counted(handler, _api(method))
        return counted

    @property
    def limit(self) -> int:
        return self.bound.value

    def close(self) -> None:
        """From now on new inference calls get UNAVAILABLE: the server is stopping."""
        self.closing = True

    def release(self) -> None:
        """Answer the held refusals: call this once gRPC's shutdown has begun."""
        self._released.set()

    def refusal(self, api: str) -> TlserveError | None:
        """Why a new inference call is refused now (counted), or None: it may enter."""
        if self.closing:
            return Unavailable("the server is shutting down; retry on another replica")
        full = self.inflight >= self.limit
        if not full and not self._over_time():
            return None
        self._on_refused(api, Overloaded.code.name)
        why = (
            f"the server is working on {self.inflight} inference calls, its limit"
            if full
            else "the queues hold more work than --max-queue-time"
        )
        return Overloaded(f"{why}; retry later", retry_after=self._retry_after())

    def lateness(
        self, api: str, seconds_left: float | None, model: str | None = None
    ) -> DeadlineExceeded | None:
        """DEADLINE_EXCEEDED (counted) if ``model`` (None: every serving model)
        cannot answer in time, else None."""
        verdict = None if seconds_left is None else self._too_late(seconds_left, model)
        if verdict is None or seconds_left is None:
            return None
        fastest, seconds = verdict
        self._on_refused(api, DeadlineExceeded.code.name)
        who = "no model can answer in time: model" if model is None else "model"
        return DeadlineExceeded(
            f"{who} {fastest!r} has about {seconds * 1e3:.0f} ms of work ahead of a new "
            f"request and the deadline is in {seconds_left * 1e3:.0f} ms (refused unparsed)",
            seconds_left=seconds_left,
        )

    @contextlib.contextmanager
    def admitted(
        self, api: str, seconds_left: float | None, model: str | None = None
    ) -> Iterator[None]:
        """For another edge (HTTP): raise the refusal, else hold one unit of the bound."""
        error = self.refusal(api) or self.lateness(api, seconds_left, model)
        if error is not None:
            raise error
        with self._holding():
            yield

    def _refusal(self, method: str, error: TlserveError) -> Any:
        async def refuse(requests: Any, context: _Context) -> NoReturn:
            if self.closing:
                await self._released.wait()
            await context.abort(error.code, str(error), trailing_metadata=error_trailer(error))
            raise AssertionError("unreachable: context.abort raises")

        async def refuse_stream(requests: Any, context: _Context) -> AsyncIterator[Any]:
            await refuse(requests, context)
            yield  # pragma: no cover - makes this an async generator

        # Client-streaming shapes that never read: the refused message is neither
        # copied into Python nor parsed (a unary call's bytes are the same).
        if method.endswith("Stream") or method.endswith("StreamInfer"):
            return grpc.stream_stream_rpc_method_handler(refuse_stream)
        return grpc.stream_unary_rpc_method_handler(refuse)

    def _counted(self, handler: grpc.RpcMethodHandler[Any, Any], api: str) -> Any:
        """The same call, holding one unit of the bound while its behaviour runs.

        A unary call is taken as a client stream of one message (the same bytes
        on the wire), so that it can be refused for its deadline before its
        message is read: unread, a refusal cost the server about half the CPU
        of one refused after parsing (0.25-0.32 against 0.58-0.65 ms a call).
        """
        if handler.unary_unary is not None:
            run: Any = handler.unary_unary

            async def unary(requests: AsyncIterator[Any], context: _Context) -> Any:
                await self._refuse_if_late(api, context, None)
                request = await _only_message(requests, context)
                if isinstance(request, bytes):  # read, not parsed (RequestGuard parses)
                    await self._refuse_if_late(api, context, model_name(request))
                with self._holding():
                    answer = run(request, context)
                    return await answer if inspect.isawaitable(answer) else answer

            return grpc.stream_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        for kind in ("unary_stream", "stream_unary", "stream_stream"):
            behaviour: Any = getattr(handler, kind)
            if behaviour is None:
                continue
            if inspect.isasyncgenfunction(behaviour):

                async def generator(request: Any, context: _Context, run: Any = behaviour) -> Any:
                    with self._holding():
                        async for response in run(request, context):
                            yield response

                return handler._replace(**{kind: generator})  # type: ignore[attr-defined]

            async def coroutine(request: Any, context: _Context, run: Any = behaviour) -> Any:
                with self._holding():
                    answer = run(request, context)
                    return await answer if inspect.isawaitable(answer) else answer

            return handler._replace(**{kind: coroutine})  # type: ignore[attr-defined]
        return handler

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self.bound.update(self.inflight)

    async def _refuse_if_late(self, api: str, context: _Context, model: str | None) -> None:
        error = self.lateness(api, context.time_remaining(), model)
        if error is not None:
            await context.abort(error.code, str(error), trailing_metadata=error_trailer(error))


async def _only_message(requests: AsyncIterator[Any], context: _Context) -> Any:
    """A unary call's one message (gRPC's unary handler would refuse no message the same way)."""
    async for request in requests:
        return request
    error = InvalidInput("a unary call must carry one request message; it carried none")
    await context.abort(error.code, str(error))
    raise AssertionError("unreachable: context.abort raises")
