"""deploy/kubernetes validated by machine, not by eye.

Core objects (Namespace, RBAC, ConfigMap, DaemonSet, Service) against the Kubernetes
OpenAPI-derived JSON schemas that the PyPI package `kubernetes-validate` ships (strict:
unknown fields are errors), for the oldest and newest Kubernetes versions we claim. The
ServiceMonitor is a CRD those schemas do not have: it is checked against the fields of
the prometheus-operator's monitoring.coreos.com/v1 CRD we use (a schema written here).
The ConfigMap's agentcg.toml is parsed by the daemon's own config parser."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (bash scripts/host.sh setup installs it)")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VERSIONS = ("1.27", "1.34")
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False, "properties": {
            "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
            "namespaceSelector": {"type": "object", "properties": {"matchNames": {"type": "array"}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string"},
                    "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}},
    },
}


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_of_the_daemonset_manifest_is_valid(version):
    docs = _documents("agentcg.yaml")
    assert {d["kind"] for d in docs} == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                         "ConfigMap", "DaemonSet", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_fails_the_schema_check():
    """The check can fail: an unknown field and a wrong type are both caught."""
    daemonset = next(d for d in _documents("agentcg.yaml") if d["kind"] == "DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostPid"] = True                # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[-1], strict=True)
    daemonset = next(d for d in _documents("agentcg.yaml") if d["kind"] == "DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9464"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[-1], strict=True)


def test_the_daemonset_has_what_the_daemon_needs_on_a_node():
    docs = {d["kind"]: d for d in _documents("agentcg.yaml")}
    pod = docs["DaemonSet"]["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostPID"] is True
    daemon = next(c for c in spec["containers"] if c["name"] == "daemon")
    assert daemon["command"][:2] == ["nsenter", "--cgroup=/proc/1/ns/cgroup"]
    assert {"BPF", "PERFMON", "SYS_ADMIN"} <= set(daemon["securityContext"]["capabilities"]["add"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in daemon["volumeMounts"]}
    assert volumes[mounts["/sys/fs/cgroup"]["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert not mounts["/sys/fs/cgroup"].get("readOnly")
    for path in ("/sys/kernel/btf", "/lib/modules", "/sys/kernel/tracing", "/run/agentcg"):
        assert path in mounts, path
    # /metrics: the port the config listens on is the one the scrape annotations name
    config = tomllib.loads(docs["ConfigMap"]["data"]["agentcg.toml"])
    port = int(config["metrics"]["address"].rsplit(":", 1)[1])
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert daemon["ports"][0]["containerPort"] == port
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == daemon["ports"][0]["name"]
    # the adopter selects agent pods by the label the docs name
    adopter = next(c for c in spec["containers"] if c["name"] == "adopter")
    assert "adopt-pods" in adopter["command"] and "agentcg.io/sandbox" in adopter["command"]


def test_the_configmap_is_a_valid_daemon_config():
    from agentcg.controller.daemon.config import parse_config

    config_map = next(d for d in _documents("agentcg.yaml") if d["kind"] == "ConfigMap")
    config = parse_config(tomllib.loads(config_map["data"]["agentcg.toml"]), "deploy/kubernetes ConfigMap")
    assert "exit_codes" in config.ebpf.concerns and config.metrics.address.startswith("0.0.0.0:")


def test_the_service_monitor_matches_the_service():
    import jsonschema

    monitor, = _documents("servicemonitor.yaml")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    broken = {**monitor, "spec": {**monitor["spec"], "endpoint": []}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SERVICE_MONITOR_SCHEMA)
    service = next(d for d in _documents("agentcg.yaml") if d["kind"] == "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
