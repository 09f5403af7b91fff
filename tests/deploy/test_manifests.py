"""The Kubernetes manifests: rendered by kustomize, valid against the Kubernetes
schemas (offline, kubernetes-validate), and saying what the server needs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl")
# Custom resources: no schema in kubernetes-validate; checked by hand below.
CRDS = {"ServiceMonitor", "PrometheusRule", "ServingRuntime", "InferenceService"}
METRICS = {
    "tlserve_requests_total", "tlserve_request_duration_seconds", "tlserve_queue_duration_seconds",
    "tlserve_compute_duration_seconds", "tlserve_preprocess_duration_seconds",
    "tlserve_batch_size", "tlserve_queue_depth", "tlserve_model_loaded",
    "tlserve_ood_score_ratio", "tlserve_ood_flagged_images_total",
    "tlserve_shed_requests_total", "tlserve_model_setting", "tlserve_model_variant",
    "tlserve_queue_time_estimate_seconds",
}  # fmt: skip

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (with kustomize v5) is not installed: manifests not rendered"
)


def render(folder: str) -> list[dict[str, Any]]:
    """`kubectl kustomize <folder>`, the command docs/kubernetes.md gives."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind]
    return found


def validate(docs: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for doc in docs:
        if doc["kind"] in CRDS:
            continue
        kubernetes_validate.validate(doc, "1.32.0", strict=True)


@needs_kubectl
@pytest.mark.parametrize("folder", ["deploy/base", "deploy/overlays/gpu", "deploy/monitoring"])
def test_renders_and_is_valid(folder: str) -> None:
    validate(render(folder))


@needs_kubectl
@pytest.mark.parametrize("folder", ["deploy/base", "deploy/overlays/gpu"])
def test_the_deployment_probes_grpc_health_and_drains(folder: str) -> None:
    docs = render(folder)
    assert {d["kind"] for d in docs} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "PersistentVolumeClaim", "ServiceMonitor",
    }  # fmt: skip
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env["TLSERVE_GRPC_PORT"])
    assert port == 8001
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}, probe  # grpc.health.v1, service ""
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env["TLSERVE_DRAIN_DELAY"]) + float(env["TLSERVE_GRACE"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and "/models" in container["args"]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "tlserve")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc" and ports["grpc"]["port"] == port
    assert "metrics" in ports
    monitor = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    pdb = by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert (
        pdb.items() <= by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu == "1") == folder.endswith("gpu")
    if folder.endswith("gpu"):
        assert env["TLSERVE_DEVICE"] == "cuda" and ":serve-gpu" in container["image"]


def test_kserve_runtime_speaks_the_v2_grpc_protocol() -> None:
    runtime = yaml.safe_load((ROOT / "deploy/kserve/servingruntime.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy/kserve/inferenceservice.yaml").read_text())
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["kind"] == "ServingRuntime"
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and "/mnt/models" in container["args"]
    assert container["ports"] == [{"name": "h2c", "containerPort": 8001, "protocol": "TCP"}]
    assert container["readinessProbe"]["grpc"]["port"] == 8001
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    predictor = service["spec"]["predictor"]["model"]
    assert service["kind"] == "InferenceService"
    assert predictor["runtime"] == runtime["metadata"]["name"]
    assert predictor["modelFormat"]["name"] in formats
    assert predictor["protocolVersion"] == "grpc-v2"


def _metric_names(text: str) -> set[str]:
    names = set(re.findall(r"\btlserve_[a-z_]+\b", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_dashboard_and_alerts_use_only_metrics_the_server_exports() -> None:
    dashboard = json.loads((ROOT / "deploy/monitoring/tlserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and _metric_names(" ".join(exprs)) <= METRICS
    rules = (ROOT / "deploy/monitoring/prometheus-rules.yaml").read_text()
    assert _metric_names(rules) <= METRICS
    # Every metric is on the dashboard, and the server still exports it.
    assert _metric_names(" ".join(exprs)) == METRICS
    server = (ROOT / "server/metrics.py").read_text()
    for name in METRICS:
        assert f'"{name.removesuffix("_total")}"' in server, name
