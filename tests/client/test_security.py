"""TLS, mutual TLS and the bearer token, client against a real server on loopback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ServerThread, png_bytes
from tlserve.client import Client, Credentials, RetryPolicy, Unauthenticated, Unavailable

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

NO_RETRY = RetryPolicy(max_attempts=1)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _signed(folder: Path, name: str, subject: str, ca: Path, ca_key: Path, ext: str) -> Path:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", subject)  # fmt: skip
    extfile = folder / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-sha256", "-extfile", extfile)  # fmt: skip
    return cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / "ca.key",
             "-out", folder / "ca.pem", "-days", "2", "-subj", "/CN=tlserve test CA")  # fmt: skip
    _signed(folder, "server", "/CN=127.0.0.1", folder / "ca.pem", folder / "ca.key",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    _signed(folder, "client", "/CN=caller", folder / "ca.pem", folder / "ca.key",
            "extendedKeyUsage=clientAuth\n")  # fmt: skip
    return folder


def test_tls_with_the_servers_ca(model_repo: Path, pki: Path) -> None:
    server = ServerThread(model_repo, tls_cert=str(pki / "server.pem"),
                          tls_key=str(pki / "server.key"))  # fmt: skip
    try:
        trusted = Credentials(root_certificates=pki / "ca.pem")
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


def test_mutual_tls_needs_the_client_certificate(model_repo: Path, pki: Path) -> None:
    server = ServerThread(model_repo, tls_cert=str(pki / "server.pem"),
                          tls_key=str(pki / "server.key"),
                          tls_client_ca=str(pki / "ca.pem"))  # fmt: skip
    try:
        mutual = Credentials(
            root_certificates=(pki / "ca.pem").read_bytes(),
            certificate_chain=pki / "client.pem",
            private_key=pki / "client.key",
        )
        with Client(server.target, credentials=mutual, timeout=10) as client:
            assert client.server_ready()
            assert client.classify(png_bytes((0, 0, 250)), model="tiny")[0][0].label == "blue"
        anonymous = Credentials(root_certificates=pki / "ca.pem")
        client = Client(server.target, credentials=anonymous, retry=NO_RETRY)
        with client, pytest.raises(Unavailable):
            client.server_ready(timeout=5)
    finally:
        server.stop()


def test_half_an_mtls_pair_is_refused(pki: Path) -> None:
    with pytest.raises(ValueError, match="both"):
        Client("127.0.0.1:1", credentials=Credentials(certificate_chain=pki / "client.pem"))


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
