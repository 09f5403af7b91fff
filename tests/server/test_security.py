"""TLS, mTLS, bearer tokens and request limits, through real connections on loopback."""

from __future__ import annotations

import io
import struct
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from tests.support import ServerThread, png_bytes
from tlserve.protos import grpc_service_pb2 as pb
from tlserve.protos import grpc_service_pb2_grpc as pb_grpc
from tlserve.protos import tlserve_v1_pb2 as v1
from tlserve.protos import tlserve_v1_pb2_grpc as v1_grpc
from tlserve.server.config import ConfigError, ServerConfig
from tlserve.server.edge.security import load_token, server_credentials

TOKEN = "s3cret-token-for-tests"


def _secure(server: ServerThread, certs: Path, *, client_cert: bool = False) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(certs / "client.pem").read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(server.target, creds)


def _ready(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> bool:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return bool(stub.ServerReady(pb.ServerReadyRequest(), timeout=5, metadata=metadata).ready)


def _server(model_repo: Path, **overrides: object) -> Iterator[ServerThread]:
    running = ServerThread(model_repo, **overrides)
    yield running
    running.stop()


@pytest.fixture
def tls_server(model_repo: Path, certs: Path) -> Iterator[ServerThread]:
    yield from _server(
        model_repo, tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key")
    )


@pytest.fixture
def mtls_server(model_repo: Path, certs: Path) -> Iterator[ServerThread]:
    yield from _server(
        model_repo,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"),
    )


@pytest.fixture
def token_server(model_repo: Path) -> Iterator[ServerThread]:
    yield from _server(model_repo, auth_token=TOKEN)


def test_tls_serves_trusting_clients_and_refuses_plaintext(
    tls_server: ServerThread, certs: Path
) -> None:
    with _secure(tls_server, certs) as channel:
        assert _ready(channel)
        reply = v1_grpc.ImageServiceStub(channel).Classify(
            v1.ClassifyRequest(model_name="tiny", images=[png_bytes((250, 5, 5))]), timeout=5
        )
        assert reply.results[0].labels[0].label == "red"
    with grpc.insecure_channel(tls_server.target) as plain, pytest.raises(grpc.RpcError) as info:
        _ready(plain)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate(mtls_server: ServerThread, certs: Path) -> None:
    with _secure(mtls_server, certs, client_cert=True) as channel:
        assert _ready(channel)
    with _secure(mtls_server, certs) as channel, pytest.raises(grpc.RpcError) as info:
        _ready(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_guards_rpcs_but_not_health_or_reflection(
    token_server: ServerThread,
) -> None:
    with grpc.insecure_channel(token_server.target) as channel:
        refused: list[tuple[tuple[tuple[str, str], ...], str]] = [
            ((), "missing credentials"),
            ((("authorization", "Bearer nope"),), "invalid bearer token"),
            ((("authorization", TOKEN),), "invalid"),  # no "Bearer " scheme
        ]
        for metadata, words in refused:
            with pytest.raises(grpc.RpcError) as info:
                _ready(channel, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert words in str(info.value.details())
        assert _ready(channel, (("authorization", f"Bearer {TOKEN}"),))
        # A Kubernetes probe carries no token.
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "inference.GRPCInferenceService" in names
    scrape = urllib.request.urlopen(token_server.metrics_url, timeout=5).read().decode()
    assert 'tlserve_auth_failures_total{reason="missing"} 1.0' in scrape
    assert 'tlserve_auth_failures_total{reason="invalid"} 2.0' in scrape


def test_token_file_tls_settings_and_errors_name_the_key(tmp_path: Path, certs: Path) -> None:
    def config(**values: str) -> ServerConfig:
        return ServerConfig.load({"model_repository": tmp_path, **values}, environ={})

    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    assert load_token(config(auth_token_file=str(tmp_path / "token"))) == TOKEN
    assert load_token(config()) is None
    with pytest.raises(ConfigError, match="TLSERVE_AUTH_TOKEN or TLSERVE_AUTH_TOKEN_FILE"):
        load_token(config(auth_token="a", auth_token_file=str(tmp_path / "token")))
    with pytest.raises(ConfigError, match="TLSERVE_AUTH_TOKEN_FILE"):
        load_token(config(auth_token_file=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="TLSERVE_TLS_CERT and TLSERVE_TLS_KEY"):
        server_credentials(config(tls_key=str(certs / "server.key")))
    with pytest.raises(ConfigError, match="TLSERVE_TLS_CLIENT_CA"):
        server_credentials(
            config(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                   tls_client_ca=str(tmp_path / "nope.pem"))
        )  # fmt: skip
    assert server_credentials(config()) is None


def _noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_ten_mib_request_is_served(server: ServerThread) -> None:
    image = _noise_png(1900)
    assert len(image) > 10 * 1024 * 1024
    with grpc.insecure_channel(server.target) as channel:
        reply = v1_grpc.ImageServiceStub(channel).Classify(
            v1.ClassifyRequest(model_name="tiny", images=[image]), timeout=30
        )
    assert len(reply.results) == 1


def test_limits_give_clear_errors(model_repo: Path) -> None:
    running = ServerThread(
        model_repo, max_message_bytes=1024 * 1024, max_images_per_request=2, max_image_pixels=1000
    )
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = v1_grpc.ImageServiceStub(channel)

            def classify(images: list[bytes]) -> grpc.RpcError:
                with pytest.raises(grpc.RpcError) as info:
                    stub.Classify(v1.ClassifyRequest(model_name="tiny", images=images), timeout=10)
                return info.value

            too_big = classify([b"\0" * (2 * 1024 * 1024)])
            assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in str(too_big.details())
            too_many = classify([png_bytes((1, 2, 3))] * 3)
            assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "limit is 2" in str(too_many.details())
            too_large = classify([png_bytes((1, 2, 3), size=(40, 40))])
            assert too_large.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "40x40 pixels" in str(too_large.details())
            assert "TLSERVE_MAX_IMAGE_PIXELS" in str(too_large.details())
            assert _ready(channel)
    finally:
        running.stop()


def _bomb_png(side: int) -> bytes:
    """A 60-byte PNG whose header claims side x side pixels: never decode it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_decompression_bombs_are_refused_from_their_header(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = v1_grpc.ImageServiceStub(channel)
        for side, words in ((9_000, "9000x9000 pixels"), (30_000, "decompression bomb")):
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(v1.ClassifyRequest(model_name="tiny", images=[_bomb_png(side)]),
                              timeout=10)  # fmt: skip
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in str(info.value.details())
            assert "TLSERVE_MAX_IMAGE_PIXELS" in str(info.value.details())
