"""The HTTP port in the deployment: the Service and the pod expose it, the image
sets and exposes it, and KServe's REST runtime serves and probes it where KServe
expects an HTTP runtime (http1 on 8080, /v2/health/ready)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load(path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def test_the_service_and_the_pod_expose_the_http_port() -> None:
    [deployment] = _load("deploy/base/deployment.yaml")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env["TLSERVE_HTTP_PORT"])
    assert port == 8000
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in container["ports"]
    for service in _load("deploy/base/service.yaml"):
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["http"]["targetPort"] == "http" and ports["http"]["appProtocol"] == "http"
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("TLSERVE_HTTP_PORT=8000") == 2 and text.count("EXPOSE 8001 8002 8000") == 2


def test_kserve_rest_runtime_serves_and_probes_http_where_kserve_expects_it() -> None:
    [runtime] = _load("deploy/kserve/servingruntime-http.yaml")
    [service] = _load("deploy/kserve/inferenceservice-http.yaml")
    assert runtime["kind"] == "ServingRuntime" and runtime["spec"]["protocolVersions"] == ["v2"]
    [container] = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["name"] == "kserve-container" and "/mnt/models" in container["args"]
    assert container["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert env["TLSERVE_HTTP_PORT"] == "8080"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    predictor = service["spec"]["predictor"]["model"]
    assert predictor["runtime"] == runtime["metadata"]["name"]
    assert predictor["protocolVersion"] == "v2"
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert predictor["modelFormat"]["name"] in formats
