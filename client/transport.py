"""The channel a client talks over, and how a call is retried.

A call is retried only when the server said *later* (``Overloaded``, with
its ``retry_after`` hint) or could not be reached (``Unavailable``); every
tlserve call is idempotent, so repeating it is safe. Retries stop at the
call's deadline and after ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from tlserve.contract.errors import (
    DeadlineExceeded,
    Overloaded,
    TlserveError,
    Unavailable,
    from_rpc_error,
)
from tlserve.contract.rules import MAX_MESSAGE_BYTES

__all__ = [
    "DEFAULT_TIMEOUT",
    "Credentials",
    "OutstandingCalls",
    "RetryPolicy",
    "call_with_retries",
    "channel_options",
    "open_channel",
]

T = TypeVar("T")

#: A call's deadline when none is given: a stuck call fails, it never hangs.
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff for ``Overloaded`` and ``Unavailable``.

    Attempt ``n`` (from 1) waits a uniform random time in
    ``[0, min(max_backoff, initial_backoff * multiplier ** (n - 1))]``, or the
    server's ``retry_after`` hint when it sent one. ``max_attempts=1`` turns
    retries off.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must not be negative and multiplier must be >= 1")

    def backoff(self, attempt: int, error: TlserveError) -> float:
        """Seconds to wait after failed attempt ``attempt`` (from 1)."""
        if isinstance(error, Overloaded) and error.retry_after is not None:
            return error.retry_after
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, ceiling)


@dataclass(frozen=True)
class Credentials:
    """TLS (``root_certificates``), mTLS (plus ``certificate_chain`` and
    ``private_key``) and a bearer token. PEM bytes, or paths to PEM files.

    ``tls=True`` with no root certificates trusts the system's roots. The
    token travels as ``authorization: Bearer <token>`` metadata on every
    call; send it over TLS outside a trusted network.
    """

    tls: bool = False
    root_certificates: bytes | str | Path | None = None
    certificate_chain: bytes | str | Path | None = None
    private_key: bytes | str | Path | None = None
    token: str | None = None

    @property
    def secure(self) -> bool:
        return self.tls or any(
            x is not None
            for x in (self.root_certificates, self.certificate_chain, self.private_key)
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mTLS needs both a client certificate chain and its private key")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.private_key),
            certificate_chain=_pem(self.certificate_chain),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_options(
    max_message_bytes: int = MAX_MESSAGE_BYTES, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """Message limits and keepalive that survive idle load balancers; ``extra`` wins."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 0),
        *extra,
    ]


def open_channel(
    target: str, credentials: Credentials, options: Sequence[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel; create it inside the event loop that will use it."""
    if credentials.secure:
        return grpc.aio.secure_channel(target, credentials.channel_credentials(), options=options)
    return grpc.aio.insecure_channel(target, options=options)


async def call_with_retries(
    attempt: Callable[[float | None], Awaitable[T]],
    *,
    timeout: float | None,
    policy: RetryPolicy,
) -> T:
    """Run ``attempt(remaining_seconds)`` until it succeeds, retrying as the policy says.

    The wait before a retry never runs past the deadline: when it would, the
    last error is raised at once.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    number = 1
    while True:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            return await attempt(remaining)
        except (Overloaded, Unavailable) as error:
            if number >= policy.max_attempts:
                raise
            wait = policy.backoff(number, error)
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise
            await asyncio.sleep(wait)
            number += 1


#: What gRPC says when a deadline passes with no answer from the server's code.
_NO_ANSWER = "DEADLINE_EXCEEDED: Deadline Exceeded"


def _unanswered(error: TlserveError, inflight: int) -> TlserveError:
    """A deadline that passed with no answer says where the time may have gone.

    A server refusing a call it cannot answer in time says so at once (its
    message; ``seconds_left``). gRPC's bare "Deadline Exceeded" means nothing
    answered: with many calls out, most likely they waited on this side of the
    connection, past the streams the server takes from one connection at once,
    where no server can see them or refuse them early.
    """
    if not isinstance(error, DeadlineExceeded) or str(error) != _NO_ANSWER or inflight < 2:
        return error
    return DeadlineExceeded(
        f"{error}: no answer before the deadline, with {inflight} calls of this client out "
        "on its connection; a server takes a limited number of calls from one connection at "
        "a time (tlserve: --max-streams-per-connection) and the rest wait on the caller's "
        "side, unseen by the server, until a stream frees or their deadline passes"
    )


class OutstandingCalls:
    """Runs a client's calls as typed errors, counting those out on its channel."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self, call: Awaitable[T]) -> T:
        self.count += 1
        try:
            return await call
        except grpc.RpcError as exc:
            raise _unanswered(from_rpc_error(exc), self.count) from exc
        finally:
            self.count -= 1
