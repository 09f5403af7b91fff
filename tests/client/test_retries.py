"""Retries: only Overloaded and Unavailable, jittered, honouring the server's hint,
bounded by the deadline and max_attempts. Against a real gRPC server on loopback
that answers RESOURCE_EXHAUSTED (with ``retry-after-ms``) a set number of times."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tlserve.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    RetryPolicy,
    Unavailable,
)
from tlserve.client.transport import call_with_retries
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc


class FlakyImages(v1_grpc.ImageServiceServicer):
    """Fails the first ``failures`` Classify calls with ``code``, then answers."""

    def __init__(self) -> None:
        self.failures = 0
        self.code = grpc.StatusCode.RESOURCE_EXHAUSTED
        self.retry_after_ms: int | None = None
        self.calls: list[float] = []

    async def Classify(self, request: v1.ClassifyRequest, context: Any) -> v1.ClassifyResponse:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            if self.retry_after_ms is not None:
                context.set_trailing_metadata((("retry-after-ms", str(self.retry_after_ms)),))
            await context.abort(self.code, "queue full. Retry later")
        label = v1.ScoredLabel(label="ok", index=0, score=1.0)
        return v1.ClassifyResponse(results=[v1.Classification(labels=[label])])


@pytest.fixture
def flaky() -> Iterator[tuple[str, FlakyImages]]:
    servicer = FlakyImages()
    loop = asyncio.new_event_loop()
    ready: list[tuple[grpc.aio.Server, int]] = []

    async def start() -> None:
        server = grpc.aio.server()
        v1_grpc.add_ImageServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.append((server, port))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    server, port = ready[0]
    yield f"127.0.0.1:{port}", servicer
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


def test_overloaded_is_retried_until_it_succeeds(flaky: tuple[str, FlakyImages]) -> None:
    target, servicer = flaky
    servicer.failures = 2
    with Client(target, retry=FAST) as client:
        [labels] = client.classify(b"x", model="m", timeout=5)
    assert labels[0].label == "ok" and len(servicer.calls) == 3


def test_the_servers_retry_hint_is_honoured(flaky: tuple[str, FlakyImages]) -> None:
    target, servicer = flaky
    servicer.failures, servicer.retry_after_ms = 1, 300
    with Client(target, retry=FAST) as client:
        client.classify(b"x", model="m", timeout=5)
    assert servicer.calls[1] - servicer.calls[0] >= 0.29  # not FAST's 50 ms


def test_the_hint_is_on_the_error_when_retries_run_out(flaky: tuple[str, FlakyImages]) -> None:
    target, servicer = flaky
    servicer.failures, servicer.retry_after_ms = 10, 20
    with Client(target, retry=FAST) as client, pytest.raises(Overloaded) as caught:
        client.classify(b"x", model="m", timeout=5)
    assert caught.value.retry_after == pytest.approx(0.02)
    assert isinstance(caught.value.__cause__, grpc.RpcError)
    assert len(servicer.calls) == FAST.max_attempts


def test_retries_stop_at_the_deadline(flaky: tuple[str, FlakyImages]) -> None:
    target, servicer = flaky
    servicer.failures, servicer.retry_after_ms = 10, 5_000  # a wait past the deadline
    with Client(target, retry=FAST) as client:
        started = time.monotonic()
        with pytest.raises(Overloaded):
            client.classify(b"x", model="m", timeout=0.5)
    assert time.monotonic() - started < 0.5 and len(servicer.calls) == 1


@pytest.mark.parametrize(
    ("code", "error", "retried"),
    [
        (grpc.StatusCode.UNAVAILABLE, Unavailable, True),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidInput, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, False),
    ],
)
async def test_only_overloaded_and_unavailable_are_retried(
    flaky: tuple[str, FlakyImages], code: grpc.StatusCode, error: type[Exception], retried: bool
) -> None:
    target, servicer = flaky
    servicer.failures, servicer.code = 1, code
    async with AsyncClient(target, retry=FAST, timeout=5) as client:
        if retried:
            assert (await client.classify(b"x", model="m"))[0][0].label == "ok"
        else:
            with pytest.raises(error):
                await client.classify(b"x", model="m")
    assert len(servicer.calls) == (2 if retried else 1)


def test_max_attempts_one_turns_retries_off(flaky: tuple[str, FlakyImages]) -> None:
    target, servicer = flaky
    servicer.failures = 1
    with Client(target, retry=RetryPolicy(max_attempts=1)) as client, pytest.raises(Overloaded):
        client.classify(b"x", model="m", timeout=5)
    assert len(servicer.calls) == 1


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.3, multiplier=2.0)
    waits = {n: [policy.backoff(n, Unavailable("x")) for _ in range(200)] for n in (1, 2, 3, 4)}
    for n, ceiling in ((1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3)):
        assert min(waits[n]) >= 0.0 and max(waits[n]) <= ceiling
        assert max(waits[n]) > ceiling * 0.8 and len(set(waits[n])) > 150  # spread: jitter
    assert policy.backoff(1, Overloaded("x", retry_after=1.5)) == 1.5


@pytest.mark.parametrize(
    "kwargs", [{"max_attempts": 0}, {"initial_backoff": -1}, {"multiplier": 0.5}]
)
def test_a_bad_retry_policy_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


async def test_call_with_retries_without_a_deadline_is_bounded_by_attempts() -> None:
    attempts: list[float | None] = []

    async def attempt(remaining: float | None) -> int:
        attempts.append(remaining)
        raise Unavailable("down")

    with pytest.raises(Unavailable):
        await call_with_retries(attempt, timeout=None, policy=FAST)
    assert attempts == [None] * FAST.max_attempts
