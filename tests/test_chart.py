"""The Helm chart (charts/cn2mirror), rendered by Helm's own engine (helm-python-sdk
binds Helm's Go SDK: no helm binary needed).

The chart's objects are the kustomize base (charts/cn2mirror/files/ links to manifests/)
with the values applied, so the two cannot drift: with the default values the chart
renders exactly what `kubectl kustomize manifests/deploy` and `manifests/crds` render,
Helm's own labels aside. Every rendered object validates against the Kubernetes schemas.
"""

from __future__ import annotations

import copy
from pathlib import Path

import helm_python as helm  # helm-python-sdk, a test dependency (pyproject.toml)
import kubernetes_validate
import pytest
import yaml

from .test_manifests import KUBE_VERSIONS, kustomize

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "cn2mirror"
NAMESPACE = "cn2mirror-system"
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance")


def render(values: dict | None = None, namespace: str = NAMESPACE) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name="cn2mirror", namespace=namespace)
    docs = []
    for name, text in sorted(out.items()):
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def without_helm(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    labels = doc["metadata"].get("labels") or {}
    for k in HELM_LABELS:
        labels.pop(k, None)
    if not labels:
        doc["metadata"].pop("labels", None)
    if doc["kind"] == "CustomResourceDefinition":
        doc["metadata"].pop("annotations", None)
    return doc


def key(d: dict) -> tuple:
    return d["kind"], d["metadata"]["name"]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (d,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return d


def test_lint():
    """helm lint: no errors and no warnings (Helm's severities: 1 info, 2 warning,
    3 error; the one info is that a chart icon is recommended)."""
    findings = helm.lint(str(CHART))
    assert findings["total_charts_linted"] == 1 and findings["errors"] == [], findings
    assert all(m["severity"] < 2 for m in findings["messages"]), findings


def test_defaults_render_the_kustomize_base():
    chart = sorted(map(without_helm, render()), key=key)
    base = [d for d in kustomize(ROOT / "manifests" / "deploy") if d["kind"] != "Namespace"]
    base += kustomize(ROOT / "manifests" / "crds")
    assert chart == sorted(base, key=key)
    for d in render():
        assert {k: d["metadata"]["labels"][k] for k in HELM_LABELS} == {
            "helm.sh/chart": "cn2mirror-0.1.0", "app.kubernetes.io/managed-by": "Helm",
            "app.kubernetes.io/instance": "cn2mirror"}


VALUES = {
    "image": {"repository": "registry.example/cn2mirror", "tag": "9.9.9",
              "pullPolicy": "Always"},
    "nodeSelector": {"kubernetes.io/os": "linux", "mirror": "yes"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "net",
                     "effect": "NoSchedule"}],
    "pinRoot": "/sys/fs/bpf/mirroring",
    "stateDir": "/run/mirroring",
    "logLevel": "debug",
    "resources": {"requests": {"cpu": "50m", "memory": "300Mi"},
                  "limits": {"cpu": "2", "memory": "1Gi"}},
    "metrics": {"address": "127.0.0.1:9555", "podMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True},
                "grafanaDashboard": {"enabled": True}},
    "crds": {"group": "core.contrail.juniper.net"},
    "namespace": {"create": True},
}


def test_values_apply_everywhere_they_should():
    docs = render(VALUES, namespace="mirroring")
    ds = one(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    images = {c["image"] for c in spec.get("initContainers", []) + spec["containers"]}
    assert images == {"registry.example/cn2mirror:9.9.9"}
    assert {c["imagePullPolicy"] for c in spec["containers"]} == {"Always"}
    assert spec["nodeSelector"] == VALUES["nodeSelector"]
    assert spec["tolerations"] == VALUES["tolerations"]
    (agent,) = [c for c in spec["containers"] if c["name"] == "agent"]
    args = agent["args"]
    for arg in ("--pin-root=/sys/fs/bpf/mirroring", "--state-dir=/run/mirroring",
                "--metrics-address=127.0.0.1:9555", "--log-level=debug"):
        assert arg in args
    assert agent["resources"] == VALUES["resources"]
    # The pin root and state directory move with their mounts and host paths.
    mounts = {m["mountPath"] for c in spec["containers"] + spec.get("initContainers", [])
              for m in c.get("volumeMounts", [])}
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert "/run/mirroring" in mounts and "/run/mirroring" in host_paths
    assert "/run/cn2mirror" not in mounts | host_paths
    assert not any(p.startswith("/sys/fs/bpf/cn2mirror") for p in mounts | host_paths)
    # Everything namespaced is in the release's namespace, the namespace made on request.
    assert one(docs, "Namespace")["metadata"]["name"] == "mirroring"
    for d in docs:
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding",
                             "PriorityClass", "CustomResourceDefinition"):
            assert d["metadata"]["namespace"] == "mirroring", key(d)
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["namespace"] == "mirroring"
    # CN2's API group instead of ours.
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert {c["spec"]["group"] for c in crds} == {"core.contrail.juniper.net"}
    assert len(crds) == 3
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
               for c in crds)
    # Monitoring.
    assert one(docs, "PodMonitor")["metadata"]["namespace"] == "mirroring"
    assert one(docs, "PrometheusRule")["spec"]["groups"]
    dash = one(docs, "ConfigMap", "cn2mirror-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert '"uid": "cn2mirror"' in dash["data"]["cn2mirror.json"]


def test_every_rendered_object_validates():
    for values in ({}, VALUES, {"uninstall": True}):
        for d in render(values):
            if d["apiVersion"].startswith("monitoring.coreos.com"):
                continue  # the Prometheus Operator's kinds: not in the Kubernetes schemas
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(d, version, strict=True)


def test_uninstall_mode_replaces_the_agents_with_the_node_cleaner():
    docs = render({"uninstall": True, "pinRoot": "/sys/fs/bpf/mirroring",
                   "image": {"tag": "1.2.3"}})
    assert [key(d) for d in docs] == [("DaemonSet", "cn2mirror-uninstall")]
    spec = docs[0]["spec"]["template"]["spec"]
    (cleaner,) = spec["initContainers"]
    assert cleaner["args"][0] == "uninstall"
    assert "--pin-root=/sys/fs/bpf/mirroring" in cleaner["args"]
    assert cleaner["image"] == "cn2mirror:1.2.3"
    assert {v["hostPath"]["path"] for v in spec["volumes"]} >= {"/sys/fs/bpf/mirroring"}
    base = kustomize(ROOT / "manifests" / "uninstall")
    assert [key(d) for d in base] == [("DaemonSet", "cn2mirror-uninstall")]


def test_an_unknown_api_group_fails_clearly():
    with pytest.raises(Exception, match="no such API group"):
        render({"crds": {"group": "example.com"}})
