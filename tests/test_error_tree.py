"""Every error of the tree, end to end: server → wire → client class, and error → CLI exit.

The server side is the real ``handled`` decorator on a real ``grpc.aio``
server bound to 127.0.0.1:0; the client side is the real SDK.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tlserve.cli.main import main
from tlserve.client import AsyncClient, RetryPolicy
from tlserve.contract import errors
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc
from tlserve.server.edge.handling import handled

TREE = sorted(
    (
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, errors.TlserveError)
        and cls is not errors.TlserveError
    ),
    key=lambda cls: cls.__name__,
)
# The class a caller gets for each error: its own, or for a subclass that has no
# status code of its own, the class of that code.
WIRE_CLASS = {cls: errors.from_status_message(f"{cls.code.name}: x").__class__ for cls in TREE}


class _Raising(v1_grpc.ImageServiceServicer):
    def __init__(self) -> None:
        self.error: errors.TlserveError = errors.ServerError("unset")

    @handled()
    async def Classify(self, request: v1.ClassifyRequest, context: Any) -> v1.ClassifyResponse:
        raise self.error


@pytest.fixture
async def raising() -> AsyncIterator[tuple[_Raising, str]]:
    server = grpc.aio.server()
    servicer = _Raising()
    v1_grpc.add_ImageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.mark.parametrize("cls", TREE, ids=lambda cls: cls.__name__)
async def test_each_error_arrives_as_its_typed_class(
    raising: tuple[_Raising, str], cls: type[errors.TlserveError]
) -> None:
    servicer, target = raising
    servicer.error = (
        errors.Overloaded("busy", retry_after=0.25) if cls is errors.Overloaded else cls("boom")
    )
    async with AsyncClient(target, retry=RetryPolicy(max_attempts=1), timeout=5) as client:
        with pytest.raises(errors.TlserveError) as caught:
            await client.classify(b"\x89PNG", model="m")
    assert type(caught.value) is WIRE_CLASS[cls]
    assert caught.value.code == cls.code
    assert isinstance(caught.value.__cause__, grpc.RpcError)  # raised from, never from None
    if cls is errors.Overloaded:
        assert isinstance(caught.value, errors.Overloaded)
        assert caught.value.retry_after == pytest.approx(0.25)


def test_every_status_code_of_the_tree_has_its_own_client_class() -> None:
    for cls in TREE:
        if cls.__bases__ == (errors.TlserveError,):
            assert WIRE_CLASS[cls] is cls


@pytest.mark.parametrize("cls", TREE, ids=lambda cls: cls.__name__)
def test_the_cli_reports_each_error_in_one_line(
    cls: type[errors.TlserveError], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    def fails(args: object) -> int:
        raise cls("what went wrong")

    monkeypatch.setattr("tlserve.cli.main._inspect", fails)
    code = main(["inspect", "somewhere"])
    err = capsys.readouterr().err
    assert err == "tlserve inspect: what went wrong\n"
    expected = {errors.Unavailable: 3, errors.Overloaded: 3, errors.DeadlineExceeded: 3,
                errors.Unauthenticated: 4, errors.ConfigError: 2}  # fmt: skip
    assert code == expected.get(cls, 1)


def test_a_closed_pipe_ends_quietly() -> None:
    # `tlserve ... | head -1`: the reader goes away while the command still prints.
    code = (
        "import sys\n"
        "from tlserve.cli import main as cli\n"
        "def talk(args):\n"
        "    for i in range(200_000):\n"
        "        print('line', i)\n"
        "    return 0\n"
        "cli._inspect = talk\n"
        "sys.exit(cli.main(['inspect', 'x']))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline() == b"line 0\n"
    process.stdout.close()
    assert process.wait(timeout=60) == 141
    assert process.stderr.read() == b""
    process.stderr.close()


def test_the_retry_hint_has_one_unit() -> None:
    assert errors.error_trailer(errors.Overloaded("x", retry_after=0.0123)) == (
        (errors.RETRY_AFTER_KEY, "13"),
    )
    assert errors.error_trailer(errors.InvalidInput("x")) == ()


def test_a_deadline_refusal_says_how_much_time_the_call_still_had() -> None:
    refused = errors.DeadlineExceeded("x", seconds_left=0.0404)
    assert errors.error_trailer(refused) == ((errors.DEADLINE_LEFT_KEY, "40"),)
    assert errors.error_trailer(errors.DeadlineExceeded("expired queued")) == ()
