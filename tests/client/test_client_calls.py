"""The sync client against a real server on 127.0.0.1:0: what a caller sees."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.server.gates import install_gate
from tests.support import TINY_SIZE, ServerThread, png_bytes
from tlserve.client import (
    Client,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    TlserveError,
    Unavailable,
)

RED, GREEN, BLUE = (250, 10, 10), (10, 240, 10), (5, 5, 255)


def _assert_chained(error: TlserveError) -> None:
    cause = error.__cause__
    assert isinstance(cause, grpc.RpcError)
    assert cause.code() == error.code
    assert str(error).startswith(f"{error.code.name}: ")


def test_typed_errors_are_raised_from_the_rpc_error(server: ServerThread) -> None:
    with Client(server.target) as client:
        assert client.timeout == 30.0  # no call waits forever unless asked to
        with pytest.raises(ModelNotFound) as not_found:
            client.model_metadata("ghost", timeout=5)
        _assert_chained(not_found.value)
        with pytest.raises(InvalidInput, match="cannot decode image") as invalid:
            client.classify(b"not an image", model="tiny", timeout=5)
        _assert_chained(invalid.value)
        with pytest.raises(InvalidInput) as wrong_dtype:
            client.infer("tiny", {"images": np.zeros((1, 8, 8, 3), np.float32)}, timeout=5)
        _assert_chained(wrong_dtype.value)


def test_unreachable_server_is_unavailable(dead_target: str) -> None:
    with Client(dead_target) as client, pytest.raises(Unavailable) as caught:
        client.server_ready(timeout=5)
    _assert_chained(caught.value)


def test_timeout_is_the_call_deadline(server: ServerThread) -> None:
    # gRPC rounds deadlines up to the millisecond, and a tiny request on loopback can be
    # answered within one: send a ~3 MB photo-sized noise image that takes far longer.
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), np.uint8)
    with Client(server.target) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            client.classify(noise, model="tiny", timeout=1e-6)
        _assert_chained(caught.value)
        # The client is still usable afterwards.
        assert client.classify(png_bytes(RED), model="tiny", timeout=5)[0][0].label == "red"


def test_wait_until_ready_gives_up_after_its_timeout(dead_target: str) -> None:
    with Client(dead_target) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"not ready after 1\.0s") as caught:
            client.wait_until_ready(timeout=1.0, interval=0.05)
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 5.0
    assert "UNAVAILABLE" in str(caught.value)  # says why: the last error
    assert isinstance(caught.value.__cause__, Unavailable)


def test_wait_until_ready_returns_promptly_when_ready(server: ServerThread) -> None:
    with Client(server.target) as client:
        started = time.monotonic()
        client.wait_until_ready(timeout=30)
        assert time.monotonic() - started < 5.0


def test_a_full_queue_is_overloaded_and_says_retry(model_repo: Path) -> None:
    running = ServerThread(model_repo, max_queue_size=1)
    try:
        gate = install_gate(running.running)  # the model is busy until the gate opens
        batcher = running.running.core.registry.get("tiny").batcher
        with Client(running.target) as client, ThreadPoolExecutor(2) as pool:
            # More images than the queue holds can never fit: not "retry later".
            with pytest.raises(InvalidInput, match="can never fit"):
                client.classify([png_bytes(RED), png_bytes(BLUE)], model="tiny", timeout=5)
            busy = pool.submit(client.classify, png_bytes(RED), model="tiny", timeout=30)
            gate.wait_entered(1)
            queued = pool.submit(client.classify, png_bytes(GREEN), model="tiny", timeout=30)
            deadline = time.monotonic() + 30
            while batcher.queued_rows < 1:
                assert time.monotonic() < deadline, "the second call never queued"
                time.sleep(0.002)
            with pytest.raises(Overloaded, match="Retry later") as caught:
                client.classify(png_bytes(BLUE), model="tiny", timeout=5)
            _assert_chained(caught.value)
            assert caught.value.retry_after is not None  # the server's hint
            gate.open()
            assert busy.result(timeout=10)[0][0].label == "red"
            assert queued.result(timeout=10)[0][0].label == "green"
            assert client.classify(png_bytes(BLUE), model="tiny", timeout=5)[0][0].label == "blue"
    finally:
        running.stop()


def test_classify_accepts_every_image_form(server: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "green.png"
    path.write_bytes(png_bytes(GREEN))
    red_array = np.zeros((12, 9, 3), np.uint8)
    red_array[..., 0] = 250
    blue_rgba = np.zeros((10, 10, 4), np.uint8)
    blue_rgba[..., 2] = blue_rgba[..., 3] = 255
    flipped = np.ascontiguousarray(red_array[:, ::-1])[::-1, ::-1]  # a strided view
    images = [
        str(path),
        path,
        png_bytes(BLUE),
        Image.new("RGB", (30, 20), RED),
        Image.new("RGB", (30, 20), GREEN).convert("P"),
        red_array,
        flipped,
        blue_rgba,
        np.full((TINY_SIZE, TINY_SIZE), 200, np.uint8),  # grayscale [H, W]
    ]
    with Client(server.target) as client:
        results = client.classify(images, model="tiny", top_k=3, timeout=10)
        assert [r[0].label for r in results[:-1]] == [
            "green", "green", "blue", "red", "green", "red", "red", "blue",
        ]  # fmt: skip
        assert len(results[-1]) == 3  # gray: a tie, but an answer
        assert all(len(r) == 3 for r in results)
        assert client.classify(tuple(images[:2]), model="tiny", timeout=5)[1][0].label == "green"
        for single in images[:6]:
            [one] = client.classify(single, model="tiny", top_k=1, timeout=5)
            assert len(one) == 1


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.int64),
        np.zeros((2, 8, 8, 3), np.uint8),  # a batch is not an image
        np.zeros(8, np.uint8),
        [png_bytes(RED), np.zeros((8, 8, 3), np.float64)],
        [png_bytes(RED), None],
    ],
    ids=["float32", "int64", "4d", "1d", "list-with-bad-array", "list-with-none"],
)
def test_bad_images_are_invalid_input_before_any_call(dead_target: str, bad: object) -> None:
    # Nothing listens at dead_target: reaching the wire would raise Unavailable.
    with Client(dead_target) as client, pytest.raises(InvalidInput):
        client.classify(bad, model="tiny", timeout=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("channels", [1, 5])
def test_an_array_with_the_wrong_channel_count_is_invalid_input(
    dead_target: str, channels: int
) -> None:
    with Client(dead_target) as client, pytest.raises(InvalidInput):
        client.classify(np.zeros((8, 8, channels), np.uint8), model="tiny", timeout=5)


def test_one_client_is_safe_to_share_between_threads(server: ServerThread) -> None:
    colours = {"red": RED, "green": GREEN, "blue": BLUE}
    expected = [list(colours)[i % 3] for i in range(50)]
    encoded = {label: png_bytes(rgb) for label, rgb in colours.items()}
    with Client(server.target) as client:

        def classify(label: str) -> str:
            return client.classify(encoded[label], model="tiny", timeout=30)[0][0].label

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(classify, expected))
    assert got == expected


def test_leaving_the_context_manager_closes_the_channel(server: ServerThread) -> None:
    client = Client(server.target)
    with client as entered:
        assert entered is client
        assert client.server_ready(timeout=5)
    with pytest.raises(ValueError, match="is closed"):
        client.server_ready(timeout=5)

    other = Client(server.target)
    other.close()
    with pytest.raises(ValueError, match="is closed"):
        other.classify(png_bytes(RED), model="tiny", timeout=5)


def test_calls_whose_deadline_passes_on_the_callers_side_say_where_they_waited(
    model_repo: Path,
) -> None:
    # One stream per connection and a model that does not answer yet: of three
    # calls, two wait on the client's side of the connection, where the server
    # can neither see nor refuse them. Their errors say so; a call the server
    # refuses for its deadline says what it still had when it arrived.
    running = ServerThread(model_repo, max_streams_per_connection=1)
    try:
        gate = install_gate(running.running)
        with Client(running.target) as client, ThreadPoolExecutor(3) as pool:
            assert client.server_ready(timeout=10)  # the connection and its limit are up
            calls = [
                pool.submit(client.classify, png_bytes(RED), model="tiny", timeout=1.0)
                for _ in range(3)
            ]
            errors = [call.exception(timeout=30) for call in calls]
            assert all(isinstance(e, DeadlineExceeded) for e in errors)
            for error in errors:
                _assert_chained(error)  # type: ignore[arg-type]
            told = [str(e) for e in errors if "calls of this client out" in str(e)]
            assert told and all("--max-streams-per-connection" in text for text in told)
            gate.open()
            gate = install_gate(running.running)
            busy = pool.submit(client.classify, png_bytes(RED), model="tiny", timeout=30)
            gate.wait_entered(1)
            batcher = running.running.core.registry.get("tiny").batcher
            batcher.speed.measured(1, 1000.0)  # as if a row took 1000 s
            # Its own connection (gRPC shares one between channels unless told not to).
            own = [("grpc.use_local_subchannel_pool", 1)]
            with (
                Client(running.target, options=own) as other,
                pytest.raises(DeadlineExceeded, match="refused unparsed") as refused,
            ):
                other.classify(png_bytes(BLUE), model="tiny", timeout=5)
            left = refused.value.seconds_left
            assert left is not None and 2.5 < left <= 5.1
            gate.open()
            assert busy.result(timeout=30)[0][0].label == "red"
    finally:
        running.stop()
