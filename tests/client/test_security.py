"""TLS, mutual TLS and the bearer token, client against a real server on loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import ServerThread, png_bytes
from tlserve.client import Client, Credentials, RetryPolicy, Unauthenticated, Unavailable

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

NO_RETRY = RetryPolicy(max_attempts=1)


def test_tls_with_the_servers_ca(model_repo: Path, certs: Path) -> None:
    server = ServerThread(model_repo, tls_cert=str(certs / "server.pem"),
                          tls_key=str(certs / "server.key"))  # fmt: skip
    try:
        trusted = Credentials(root_certificates=certs / "ca.pem")
        with Client(server.target, credentials=trusted, timeout=10) as client:
            assert client.classify(png_bytes((250, 0, 0)), model="tiny")[0][0].label == "red"
        # Plaintext to a TLS port, or TLS without trusting its CA, never gets through.
        with Client(server.target, retry=NO_RETRY) as plain, pytest.raises(Unavailable):
            plain.server_ready(timeout=5)
        system_roots = Credentials(tls=True)
        untrusting = Client(server.target, credentials=system_roots, retry=NO_RETRY)
        with untrusting, pytest.raises(Unavailable):
            untrusting.server_ready(timeout=5)
    finally:
        server.stop()


def test_mutual_tls_needs_the_client_certificate(model_repo: Path, certs: Path) -> None:
    server = ServerThread(model_repo, tls_cert=str(certs / "server.pem"),
                          tls_key=str(certs / "server.key"),
                          tls_client_ca=str(certs / "ca.pem"))  # fmt: skip
    try:
        mutual = Credentials(
            root_certificates=(certs / "ca.pem").read_bytes(),
            certificate_chain=certs / "client.pem",
            private_key=certs / "client.key",
        )
        with Client(server.target, credentials=mutual, timeout=10) as client:
            assert client.server_ready()
            assert client.classify(png_bytes((0, 0, 250)), model="tiny")[0][0].label == "blue"
        anonymous = Credentials(root_certificates=certs / "ca.pem")
        client = Client(server.target, credentials=anonymous, retry=NO_RETRY)
        with client, pytest.raises(Unavailable):
            client.server_ready(timeout=5)
    finally:
        server.stop()


def test_half_an_mtls_pair_is_refused(certs: Path) -> None:
    with pytest.raises(ValueError, match="both"):
        Client("127.0.0.1:1", credentials=Credentials(certificate_chain=certs / "client.pem"))


def test_bearer_token(model_repo: Path) -> None:
    server = ServerThread(model_repo, auth_token="s3cret")
    try:
        with Client(server.target, credentials=Credentials(token="s3cret"), timeout=10) as ok:
            assert ok.classify(png_bytes((0, 250, 0)), model="tiny")[0][0].label == "green"
            assert [m.name for m in ok.list_models()] == ["tiny"]
        for token in (None, "wrong"):
            with Client(server.target, credentials=Credentials(token=token)) as client:
                with pytest.raises(Unauthenticated) as caught:
                    client.classify(png_bytes((0, 250, 0)), model="tiny", timeout=5)
                assert caught.value.__cause__ is not None
                # Health stays open: Kubernetes probes carry no token.
                assert client.health(timeout=5) == "SERVING"
    finally:
        server.stop()
