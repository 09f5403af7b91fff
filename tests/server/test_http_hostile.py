"""Bad input over HTTP: malformed JSON, wrong shapes and datatypes, huge headers,
huge and slow bodies, hostile multipart, paths that try to leave the version's
folder. Every one is a 4xx with a sentence, never a 5xx; and the token and TLS
settings of the gRPC port hold on this one."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.http_calls import (
    REPORT,
    build_http_repository,
    call,
    infer_json,
    raw_exchange,
)
from tests.support import ServerThread, free_port, png_bytes
from tlserve.server.edge.rest import exchange

IMAGE = np.full((1, 8, 8, 3), 100, np.uint8)
TOKEN = "http-s3cret/with=odd;chars"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("hostile-http") / "models"
    build_http_repository(repo)
    (repo / "secret.png").write_bytes(png_bytes((1, 2, 3)))
    (repo / "watched" / "1" / "escape.png").symlink_to(repo / "secret.png")
    running = ServerThread(repo, http_port=free_port(), max_message_bytes=1_000_000)
    yield running
    running.stop()


def _tensor(**fields: object) -> bytes:
    tensor = {"name": "images", "shape": [1, 8, 8, 3], "datatype": "UINT8",
              "data": IMAGE.ravel().tolist(), **fields}  # fmt: skip
    return json.dumps({"inputs": [tensor]}).encode()


BAD_BODIES = [
    b"", b"{", b"[]", b"null", b'"inputs"', b"{}", b'{"inputs": {}}', b'{"inputs": []}',
    b'{"inputs": [1]}', b'{"inputs": [{"name": "images"}]}', b"[" * 100_000,
    b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1]}]}',
    _tensor(shape=[1, 4, 4, 3]), _tensor(shape=[1, 8, 8]), _tensor(shape=[-1, 8, 8, 3]),
    _tensor(shape=[2**62, 2**62, 8, 3]), _tensor(shape=[2**70]), _tensor(shape="1,8,8,3"),
    _tensor(shape=[1, 8, 8, True]), _tensor(datatype="FP32"), _tensor(datatype="BYTES"),
    _tensor(datatype="NOPE"), _tensor(data=[300] * 192), _tensor(data=[-1] * 192),
    _tensor(data=[1.5] * 192), _tensor(data=["a"] * 192), _tensor(data=[[1, 2], [3]]),
    _tensor(data=[None] * 192), _tensor(data={"a": 1}), _tensor(data=[True] * 192),
    _tensor(name=7), _tensor(parameters={"binary_data_size": 192}),
    _tensor(parameters="x"), _tensor(name="other"),
    json.dumps({"inputs": [json.loads(_tensor())["inputs"][0]] * 2}).encode(),
    json.dumps({"inputs": json.loads(_tensor())["inputs"], "outputs": [{"name": "nope"}]}).encode(),
    json.dumps({"inputs": json.loads(_tensor())["inputs"], "outputs": "x"}).encode(),
    json.dumps({"inputs": json.loads(_tensor())["inputs"], "id": 5}).encode(),
]  # fmt: skip


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_malformed_infer_requests_are_400(server: ServerThread, body: bytes) -> None:
    answer = call(server.running.http_port, "POST", "/v2/models/tiny/infer", body)
    assert answer.status == 400, answer.body[:300]
    assert answer.json()["error"]


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    ),
    st.sampled_from(["inputs", "outputs", "parameters", "id"]),
)
def test_any_json_gets_an_answer_never_a_5xx(server: ServerThread, value: object, key: str) -> None:
    document = json.loads(_tensor())
    document[key] = value
    body = json.dumps(document).encode()
    answer = call(server.running.http_port, "POST", "/v2/models/tiny/infer", body)
    assert answer.status in (200, 400), answer.body[:300]


def test_binary_data_that_does_not_add_up_is_400(server: ServerThread) -> None:
    port = server.running.http_port
    tensor = {"name": "images", "shape": [1, 8, 8, 3], "datatype": "UINT8",
              "parameters": {"binary_data_size": 192}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    raw = IMAGE.tobytes()
    for length, body in (
        (str(len(header)), header + raw[:100]),  # short
        (str(len(header)), header + raw + b"xx"),  # trailing bytes
        (str(len(header) + 10_000), header + raw),  # header past the body
        ("-5", header + raw),
        ("12abc", header + raw),
        (str(len(header) - 3), header + raw),
    ):
        answer = call(port, "POST", "/v2/models/tiny/infer", body,
                      {"Inference-Header-Content-Length": length})  # fmt: skip
        assert answer.status == 400, (length, answer.body[:200])


def test_bodies_over_the_limit_are_refused_before_they_are_read(server: ServerThread) -> None:
    port = server.running.http_port
    # Content-Length says 1 GB; nothing of it is sent, the answer comes anyway.
    head = (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 1000000000\r\n\r\n")  # fmt: skip
    answer = raw_exchange(port, head)
    assert answer.startswith(b"HTTP/1.1 413") and b"the limit is 1000000" in answer
    # Chunked, with no length: refused as it passes the limit.
    chunk = b"[" * 200_000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8)) + b"0\r\n\r\n"
    chunked = (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n") + body  # fmt: skip
    assert raw_exchange(port, chunked).startswith(b"HTTP/1.1 413")


def test_huge_headers_and_garbage_are_4xx(server: ServerThread) -> None:
    port = server.running.http_port
    huge = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw_exchange(port, huge).startswith(b"HTTP/1.1 400")
    many = b"GET /v2/health/ready HTTP/1.1\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n"
    assert raw_exchange(port, many).startswith(b"HTTP/1.1 400")
    long_url = b"GET /v2/models/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert raw_exchange(port, long_url).startswith(b"HTTP/1.1 400")
    for garbage in (b"\x00\x01\x02\r\n\r\n", b"GET\r\n\r\n", b"POST / HTTP/9.9\r\n\r\n"):
        answer = raw_exchange(port, garbage)
        assert not answer or answer[9:10] == b"4", answer[:100]
    # Still serving.
    assert call(port, "GET", "/v2/health/ready").status == 200


def test_slow_bodies_are_cut_off(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    port = server.running.http_port
    head = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
    started = time.monotonic()
    answer = raw_exchange(port, head + b"Timeout: 0.3\r\n\r\n" + b"{", timeout=10)
    assert answer.startswith(b"HTTP/1.1 504") and time.monotonic() - started < 5
    monkeypatch.setattr(exchange, "BODY_SECONDS", 0.3)  # without a deadline: the server's bound
    answer = raw_exchange(port, head + b"\r\n" + b"{", timeout=10)
    assert answer.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n\r\n"),  # no boundary
        ("multipart/form-data; boundary=x", b"garbage with no parts"),
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; "
         b'name="a"\r\n\r\nnot a file\r\n--x--\r\n'),  # no file: no images
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; "
         b'name="a"; filename="a.png"\r\n\r\nnot a png\r\n--x--\r\n'),
        ("image/jpeg", b"\xff\xd8\xff" + b"\x00" * 100),
        ("image/png", b""),
    ],
)  # fmt: skip
def test_bad_classify_bodies_are_400(server: ServerThread, content_type: str, body: bytes) -> None:
    answer = call(server.running.http_port, "POST", "/v2/models/tiny/classify", body,
                  {"Content-Type": content_type})  # fmt: skip
    assert answer.status == 400, answer.body[:200]
    answer = call(server.running.http_port, "POST", "/v2/models/tiny/classify?top_k=-1",
                  png_bytes((1, 2, 3)), {"Content-Type": "image/png"})  # fmt: skip
    assert answer.status == 400


def test_the_report_renders_as_html_and_paths_cannot_leave_its_folder(
    server: ServerThread,
) -> None:
    port = server.running.http_port
    base = "/ui/models/watched/versions/1"
    page = call(port, "GET", base + "/report")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    text = page.body.decode()
    assert "<table>" in text and "<th>precision</th>" in text and "<td>91.0%</td>" in text
    assert '<img alt="confusion" src="files/confusion.png">' in text
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "../../secret.png" in text and 'src="files/../' not in text  # left as text
    figure = call(port, "GET", base + "/files/confusion.png")
    assert figure.status == 200 and figure.headers["content-type"] == "image/png"
    assert figure.body.startswith(b"\x89PNG")
    for path in (
        base + "/files/..%2F..%2Fsecret.png", base + "/files/../../secret.png",
        base + "/files/%2E%2E%2F%2E%2E%2Fsecret.png", base + "/files/escape.png",
        base + "/files/model.onnx", base + "/files/report.md", "/ui/models/tiny/versions/1/report",
        "/ui/models/..%2Fwatched/versions/1/report", "/static/..%2F..%2Froutes.py",
        "/static/page.js%00.png",
    ):  # fmt: skip
        answer = call(port, "GET", path)
        assert answer.status == 404, (path, answer.status)
        assert b"PNG" not in answer.body[:8]
    assert REPORT  # the report as written


def test_the_token_guards_http_but_not_probes_or_the_page_shell(tmp_path: Path) -> None:
    build_http_repository(tmp_path / "models")
    running = ServerThread(tmp_path / "models", http_port=free_port(), auth_token=TOKEN)
    try:
        port = running.running.http_port
        infer = "/v2/models/tiny/infer"
        answer = call(port, "POST", infer, infer_json(IMAGE))
        assert answer.status == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in answer.json()["error"]
        assert call(port, "POST", infer, infer_json(IMAGE),
                    {"Authorization": "Bearer nope"}).status == 401  # fmt: skip
        assert call(port, "POST", infer, infer_json(IMAGE),
                    {"Authorization": f"Bearer {TOKEN}"}).status == 200  # fmt: skip
        for open_path in ("/v2/health/live", "/v2/health/ready", "/", "/static/page.js"):
            assert call(port, "GET", open_path).status == 200, open_path
        for guarded in ("/v2", "/v2/models/tiny", "/ui/models"):
            assert call(port, "GET", guarded).status == 401, guarded
        # The page's links carry the token as a cookie: GETs only, never a POST.
        from urllib.parse import quote

        cookie = {"Cookie": f"tlserve_token={quote(TOKEN)}"}
        assert call(port, "GET", "/ui/models", None, cookie).status == 200
        assert call(port, "POST", infer, infer_json(IMAGE), cookie).status == 401
    finally:
        running.stop()


def test_tls_and_mtls_use_the_grpc_ports_files(tmp_path: Path, certs: Path) -> None:
    build_http_repository(tmp_path / "models")
    running = ServerThread(
        tmp_path / "models", http_port=free_port(), tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem"),
    )  # fmt: skip
    try:
        port = running.running.http_port
        trusting = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            call(port, "GET", "/v2/health/ready", context=trusting)  # no client certificate
        trusting.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
        assert call(port, "GET", "/v2/health/ready", context=trusting).status == 200
        with pytest.raises((ConnectionError, OSError)):
            call(port, "GET", "/v2/health/ready")  # plaintext gets nothing
    finally:
        running.stop()
