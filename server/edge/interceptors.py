"""Requests that never reach a servicer: bytes that do not parse, methods that do not exist.

gRPC parses a request with the method's deserializer before the servicer
runs, and a parse error becomes UNKNOWN "Unexpected DecodeError" with an
ERROR traceback in the log, in no metric. :class:`RequestGuard` registers
every method with a pass-through deserializer instead and parses the bytes
itself, so that:

- a unary request that does not parse (random bytes, a string field that
  is not UTF-8, a length prefix past the end) is INVALID_ARGUMENT saying so;
- on ``ModelStreamInfer`` and ``ClassifyStream`` such a message is answered
  on the stream like any failed request (``streams.Undecodable``) and the
  stream goes on; on other streams it ends the call with INVALID_ARGUMENT;
- an unknown method is UNIMPLEMENTED, as gRPC would answer;

and each of them is counted in ``tlserve_requests_total`` (model
``unknown``; api: the method's name, or ``unknown`` for a method that does
not exist, so callers cannot mint label values) and logged as one
rate-limited WARNING line. The wire format is unchanged: tritonclient and
every other client see the same messages.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc

from tlserve.contract.errors import InvalidInput
from tlserve.contract.rules import shown
from tlserve.protos import grpc_service_pb2, tlserve_v1_pb2
from tlserve.server.edge.handling import refused
from tlserve.server.edge.streams import Undecodable

__all__ = ["PER_MESSAGE_ERRORS", "RequestGuard"]

#: Streams whose messages fail one by one (an error answer, the stream goes on).
PER_MESSAGE_ERRORS = frozenset(
    {
        "/" + grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
        + "/ModelStreamInfer",
        "/" + tlserve_v1_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
        + "/ClassifyStream",
    }
)  # fmt: skip

if TYPE_CHECKING:  # grpc's classes are generic only in its stubs
    _Continuation: TypeAlias = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]
    _Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

#: Called with (api, outcome) for each call the servicers never saw.
Outcome = Callable[[str, str], None]

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


class _Parser:
    """One method's deserializer, with an error message a caller can act on."""

    def __init__(self, method: str, parse: Callable[[bytes], Any], on_outcome: Outcome) -> None:
        self.api = method.rsplit("/", 1)[-1]
        self._parse = parse
        self._on_outcome = on_outcome
        message_class = getattr(parse, "__self__", None)
        descriptor = getattr(message_class, "DESCRIPTOR", None)
        self.type_name = getattr(descriptor, "full_name", "request")
        self.message_class = message_class

    def __call__(self, raw: bytes) -> Any:
        try:
            return self._parse(raw)
        except Exception as exc:
            error = InvalidInput(
                f"the request ({len(raw)} bytes) is not a valid {self.type_name} message: "
                "it is truncated, a field has the wrong type, or a string is not UTF-8"
            )
            self._on_outcome(self.api, _INVALID.name)
            refused(self.api, _INVALID, str(error))
            raise error from exc


async def _abort(context: _Context, error: InvalidInput) -> NoReturn:
    await context.abort(error.code, str(error))
    raise AssertionError("unreachable: context.abort raises")


def _guard_unary(handler: grpc.RpcMethodHandler[Any, Any], parse: _Parser) -> Any:
    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        # grpc's stubs type behaviours as sync; on a grpc.aio server they are coroutines.
        behaviour: Any = handler.unary_unary

        async def unary(raw: bytes, context: _Context) -> Any:
            try:
                request = parse(raw)
            except InvalidInput as error:
                await _abort(context, error)
            answer = behaviour(request, context)
            return await answer if inspect.isawaitable(answer) else answer

        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    streaming: Any = handler.unary_stream
    if inspect.isasyncgenfunction(streaming):

        async def unary_stream(raw: bytes, context: _Context) -> AsyncIterator[Any]:
            try:
                request = parse(raw)
            except InvalidInput as error:
                await _abort(context, error)
            async for response in streaming(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if inspect.iscoroutinefunction(streaming):  # writes with context.write (health's Watch)

        async def unary_writer(raw: bytes, context: _Context) -> None:
            try:
                request = parse(raw)
            except InvalidInput as error:
                await _abort(context, error)
            await streaming(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_writer, **kwargs)
    return handler  # a sync generator: left to gRPC's own parsing


def _guard_stream(
    handler: grpc.RpcMethodHandler[Any, Any], parse: _Parser, per_message: bool
) -> Any:
    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    behaviour: Any = handler.stream_unary or handler.stream_stream
    iterates = (
        inspect.iscoroutinefunction(behaviour)
        if handler.stream_unary is not None
        else inspect.isasyncgenfunction(behaviour)
    )
    if not iterates:
        # It may read with context.read() (or run sync): it must get parsed messages.
        return handler

    async def requests(raws: AsyncIterator[bytes], context: _Context) -> AsyncIterator[Any]:
        async for raw in raws:
            try:
                yield parse(raw)
            except InvalidInput as error:
                if not per_message or parse.message_class is None:
                    await _abort(context, error)
                yield Undecodable(error, parse.message_class())

    if handler.stream_unary is not None:

        async def stream_unary(raws: AsyncIterator[bytes], context: _Context) -> Any:
            return await behaviour(requests(raws, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

    async def stream_stream(raws: AsyncIterator[bytes], context: _Context) -> AsyncIterator[Any]:
        async for response in behaviour(requests(raws, context), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


def _unimplemented(method: str, on_outcome: Outcome) -> Any:
    """What gRPC answers for an unknown method, counted; streaming fits every call shape."""

    async def answer(raws: AsyncIterator[bytes], context: _Context) -> AsyncIterator[Any]:
        message = f"no method {shown(method)} on this server"
        on_outcome("unknown", grpc.StatusCode.UNIMPLEMENTED.name)
        refused("unknown", grpc.StatusCode.UNIMPLEMENTED, message)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(answer)


class RequestGuard(grpc.aio.ServerInterceptor):
    """Parses every request itself: see the module docstring.

    ``on_outcome(api, outcome)`` counts a call that never reached a servicer.
    Install it last, so that it wraps the servicers' own handlers.
    """

    def __init__(self, on_outcome: Outcome) -> None:
        self._on_outcome = on_outcome
        self._guarded: dict[str, Any] = {}

    async def intercept_service(
        self, continuation: _Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method
        handler = await continuation(details)
        if handler is None:
            return _unimplemented(method, self._on_outcome)  # type: ignore[no-any-return]
        parse = handler.request_deserializer
        if parse is None:  # already takes bytes
            return handler
        # Known methods map to the same handler object each call; wrap it once.
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]  # type: ignore[no-any-return]
        parser = _Parser(method, parse, self._on_outcome)
        if handler.unary_unary is not None or handler.unary_stream is not None:
            guarded = _guard_unary(handler, parser)
        else:
            guarded = _guard_stream(handler, parser, method in PER_MESSAGE_ERRORS)
        self._guarded[method] = (handler, guarded)
        return guarded  # type: ignore[no-any-return]
