"""One HTTP exchange on the raw ASGI interface: its headers, its body read within
limits, its multipart parts, and the answer sent back.

The body is bounded before it is read: a ``Content-Length`` over the limit
is refused (413) before one byte of the body is taken, and a chunked body
is counted as it streams and refused as it passes the limit, so a request
never holds more than the limit in memory (uvicorn's own flow control
stops reading the socket while the application is not reading). A body
that trickles in slower than :data:`BODY_SECONDS` (or the request's own
deadline) is answered 408 (504 past the deadline).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from tlserve.contract.errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    TlserveError,
    error_trailer,
)

__all__ = [
    "BODY_SECONDS",
    "BodyTimeout",
    "Exchange",
    "PayloadTooLarge",
    "Receive",
    "Send",
    "multipart_files",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Longest a request body may take to arrive without a deadline of its own.
BODY_SECONDS = 30.0


class PayloadTooLarge(InvalidInput):
    """The body is over the server's message limit (HTTP 413)."""


class BodyTimeout(InvalidInput):
    """The body did not arrive in time (HTTP 408)."""


class ClientGone(Exception):
    """The caller hung up before its request was read."""


@dataclass
class Exchange:
    """One request and the means to answer it."""

    scope: Scope
    receive: Receive
    send: Send
    params: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None  # event-loop time
    headers: dict[str, str] = field(default_factory=dict)
    body_read: bool = False  # the whole body taken: the connection can carry another request

    def __post_init__(self) -> None:
        self.headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.scope["headers"]
        }

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    def query(self, key: str) -> str | None:
        values = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get(key)
        return values[-1] if values else None

    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def body(self, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes; see the module docstring."""
        length = self.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise InvalidInput(f"Content-Length {length[:40]!r} is not a number")
            if int(length) > limit:
                raise PayloadTooLarge(f"the body is {int(length)} bytes; the limit is {limit}")
        loop = asyncio.get_running_loop()
        ends = loop.time() + BODY_SECONDS
        if self.deadline is not None:
            ends = min(ends, self.deadline)
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(self.receive(), max(0.0, ends - loop.time()))
            except TimeoutError:
                if self.deadline is not None and ends >= self.deadline:
                    raise DeadlineExceeded("the deadline passed while the body arrived") from None
                raise BodyTimeout(
                    f"the body took longer than {BODY_SECONDS:.0f} s to arrive"
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        self.body_read = True
        return b"".join(chunks)

    async def answer(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        fields = [("content-type", content_type), ("content-length", str(len(body)))]
        fields += headers or []
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields],
            }
        )
        await self.send({"type": "http.response.body", "body": body})

    async def json(
        self, status: int, document: Any, headers: list[tuple[str, str]] | None = None
    ) -> None:
        body = json.dumps(document, separators=(",", ":")).encode()
        await self.answer(status, body, headers=headers)

    async def error(self, status: int, exc: TlserveError, message: str) -> None:
        """The protocol's error answer, ``{"error": message}``, with its headers."""
        headers: list[tuple[str, str]] = []
        if isinstance(exc, Overloaded) and exc.retry_after is not None:
            headers.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
        headers.extend(error_trailer(exc))  # as gRPC's trailers: retry-after-ms, deadline-left-ms
        if status in (401,):
            headers.append(("www-authenticate", "Bearer"))
        if self.method == "POST" and not self.body_read:
            # Answered before its body was read (refused on arrival, too large, too
            # slow): close rather than read a body nobody wants to find the next request.
            headers.append(("connection", "close"))
        await self.json(status, {"error": message}, headers)


def multipart_files(content_type: str, body: bytes, limit: int) -> list[bytes]:
    """The file parts of a ``multipart/form-data`` body, in order (at most ``limit``)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidInput("multipart/form-data without a boundary")
    files: list[bytes] = []
    current: list[bytes] = []
    is_file = [False]
    header = [b""]

    def on_part_begin() -> None:
        current.clear()
        is_file[0] = False

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] = data[start:end].lower()

    def on_header_value(data: bytes, start: int, end: int) -> None:
        if header[0] == b"content-disposition" and b"filename=" in data[start:end]:
            is_file[0] = True

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.append(data[start:end])

    def on_part_end() -> None:
        if is_file[0]:
            if len(files) >= limit:
                raise InvalidInput(f"more than {limit} images in one request")
            files.append(b"".join(current))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except InvalidInput:
        raise
    except Exception as exc:  # python-multipart's parse errors
        raise InvalidInput(f"the multipart body cannot be read: {exc}") from exc
    return files
