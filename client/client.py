"""The blocking client: :class:`AsyncClient` on a private event loop.

Every call is written once, in :mod:`tlserve.client.aio`; each method here
submits that coroutine to the client's own loop thread and waits for it.
One channel per client, safe to share between threads. ``timeout=`` is the
gRPC deadline of the call; failures raise the typed errors of
:mod:`tlserve.contract.errors`, chained ``from`` the ``grpc.RpcError``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from tlserve.client.aio import AsyncClient
from tlserve.client.results import ImageInput, StreamResult
from tlserve.client.transport import DEFAULT_TIMEOUT, Credentials, RetryPolicy
from tlserve.contract.predictions import DEFAULT_TOP_K
from tlserve.contract.rules import MAX_MESSAGE_BYTES

__all__ = ["Client"]

P = ParamSpec("P")
T = TypeVar("T")
_END = object()


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    """The sync twin of an AsyncClient method: same arguments, same docstring."""

    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._async, *args, **kwargs))

    return call


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


class Client:
    """A connection to one tlserve server (``host:port``), for blocking code.

    Use as a context manager, or call :meth:`close`::

        with Client("localhost:8001") as client:
            client.wait_until_ready(timeout=30)
            [labels] = client.classify("cat.jpg", model="pets")

    Takes the same options as :class:`AsyncClient` and has the same calls.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: Credentials | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self._closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=_run_loop, args=(self._loop,), name=f"tlserve-client {target}", daemon=True
        )
        self._thread.start()

        async def connect() -> AsyncClient:
            # A grpc.aio channel belongs to the loop it is created in.
            return AsyncClient(
                target, credentials=credentials, retry=retry, timeout=timeout,
                max_message_bytes=max_message_bytes, options=options,
            )  # fmt: skip

        try:
            self._async = self._run(connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coroutine.close()
            raise ValueError(f"the client for {self.target} is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the loop thread; later calls raise ``ValueError``."""
        with self._lock:
            if self._closed:
                return
            self._run(self._async.close())
            self._closed = True
        self._stop_loop()

    @property
    def timeout(self) -> float | None:
        """The default deadline of each call, in seconds."""
        return self._async.timeout

    @property
    def retry(self) -> RetryPolicy:
        return self._async.retry

    classify = _blocking(AsyncClient.classify)
    embed = _blocking(AsyncClient.embed)
    infer = _blocking(AsyncClient.infer)
    model_metadata = _blocking(AsyncClient.model_metadata)
    list_models = _blocking(AsyncClient.list_models)
    server_ready = _blocking(AsyncClient.server_ready)
    health = _blocking(AsyncClient.health)
    wait_until_ready = _blocking(AsyncClient.wait_until_ready)

    def classify_stream(
        self,
        images: Iterable[ImageInput],
        *,
        model: str,
        top_k: int = DEFAULT_TOP_K,
        version: str = "",
        timeout: float | None = None,
    ) -> Iterator[StreamResult]:
        """Classify a flow of images over one stream; results in order, as they come.

        ``images`` may be a generator that blocks (a camera, a queue): it is
        read on a worker thread. See :meth:`AsyncClient.classify_stream`.
        """
        source = iter(images)

        async def pull() -> AsyncIterator[ImageInput]:
            while (item := await asyncio.to_thread(next, source, _END)) is not _END:
                yield item  # type: ignore[misc]

        stream = self._async.classify_stream(
            pull(), model=model, top_k=top_k, version=version, timeout=timeout
        )

        async def next_result() -> StreamResult:
            return await stream.__anext__()

        try:
            while True:
                try:
                    yield self._run(next_result())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._run(stream.aclose())  # type: ignore[attr-defined]
