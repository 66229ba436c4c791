"""The monitoring manifests: PrometheusRule alerts, Pod/ServiceMonitor, Grafana dashboard.

promtool (Debian's `prometheus` package) checks the rule groups and runs unit tests of
the alerts on made-up series; every dashboard query is parsed by promtool too (as a
recording rule, Grafana's variables replaced by values). The metric names the rules and
the dashboard use must be names the agent really exports: tests/test_metrics_e2e.py
scrapes a running agent and checks them against METRIC_NAMES_USED here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "manifests" / "monitoring"
PROMTOOL = shutil.which("promtool") or "promtool"  # make setup installs it (prometheus)


def rule_groups() -> dict:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    return {"groups": doc["spec"]["groups"]}


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    """A dashboard query as Prometheus would receive it from Grafana."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


METRIC = re.compile(r"\b(cn2mirror_[a-z0-9_]+)")


def metric_names_used() -> set[str]:
    """Every cn2mirror_* series the alerts and the dashboard read (histogram suffixes
    taken off: they come with the family)."""
    texts = [r["expr"] for g in rule_groups()["groups"] for r in g["rules"]]
    texts += dashboard_exprs()
    texts += [v["query"]["query"] for v in dashboard()["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    names = set()
    for t in texts:
        for n in METRIC.findall(t):
            names.add(re.sub(r"_(bucket|sum|count)$", "", n))
    return names


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups()))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout


def test_alerts_fire_on_the_series_they_watch(tmp_path):
    """promtool's rule unit tests: drops of copies, an unreachable analyzer, an agent that
    is not ready and a datapath that differs from the desired state each fire their alert
    (and a healthy node fires none)."""
    # Labels are what routes an alert; promtool would compare the annotations' text too,
    # which `check rules` has already validated as templates: they are left out here.
    groups = rule_groups()
    for g in groups["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    node = 'instance="node1"'
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m",
         "input_series": [
             {"series": f'cn2mirror_destination_dropped_packets_total{{{node},'
                        f'destination="ids",reason="no_route"}}', "values": "0+60x30"},
             {"series": f'cn2mirror_destination_dropped_packets_total{{{node},'
                        f'destination="ids",reason="rate_limited"}}', "values": "0+600x30"},
             {"series": f'cn2mirror_ready{{{node}}}', "values": "0x30"},
             {"series": f'cn2mirror_datapath_up{{{node}}}', "values": "1x30"},
             {"series": f'cn2mirror_datapath_problems{{{node}}}', "values": "2x30"},
             {"series": 'cn2mirror_ready{instance="node2"}', "values": "1x30"},
         ],
         "alert_rule_test": [
             {"eval_time": "20m", "alertname": "CN2MirrorCopiesDropped", "exp_alerts": [
                 {"exp_labels": {"severity": "warning", "instance": "node1",
                                 "destination": "ids", "reason": "no_route"}}]},
             {"eval_time": "20m", "alertname": "CN2MirrorCopiesRateLimited", "exp_alerts": [
                 {"exp_labels": {"severity": "info", "instance": "node1",
                                 "destination": "ids"}}]},
             {"eval_time": "20m", "alertname": "CN2MirrorAnalyzerUnreachable", "exp_alerts": [
                 {"exp_labels": {"severity": "critical", "instance": "node1",
                                 "destination": "ids"}}]},
             {"eval_time": "20m", "alertname": "CN2MirrorAgentNotReady", "exp_alerts": [
                 {"exp_labels": {"severity": "critical", "instance": "node1"}}]},
             {"eval_time": "20m", "alertname": "CN2MirrorDatapathMismatch", "exp_alerts": [
                 {"exp_labels": {"severity": "warning", "instance": "node1"}}]},
             # Before "for" has passed, nothing fires.
             {"eval_time": "3m", "alertname": "CN2MirrorCopiesDropped", "exp_alerts": []},
         ]},
    ]}
    for t in tests["tests"]:
        for a in t["alert_rule_test"]:
            for e in a["exp_alerts"]:
                e["exp_labels"]["alertname"] = a["alertname"]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    r = promtool("test", "rules", str(tmp_path / "tests.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_dashboard_query_parses(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    groups = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"cn2mirror:dashboard_query_{i}", "expr": concrete(e)}
        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(groups))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_covers_destinations_rules_pods_and_drop_reasons():
    exprs = dashboard_exprs()
    for scope, label in (("destination", "destination"), ("rule", "policy"),
                         ("interface", "pod")):
        assert any(f"cn2mirror_{scope}_mirrored_packets_total" in e and label in e
                   for e in exprs), scope
        assert any(f"cn2mirror_{scope}_dropped_packets_total" in e and "reason" in e
                   for e in exprs), scope
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_monitors_select_the_agent_pods():
    ds = yaml.safe_load((ROOT / "manifests" / "deploy" / "daemonset.yaml").read_text())
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for c in ds["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    pm = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    svc, sm = yaml.safe_load_all((MONITORING / "servicemonitor.yaml").read_text())
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    # Everything lives in the agent's namespace, where the plugin looks for the agents.
    from cn2mirror.cli.kubectl_plugin import AGENT_LABELS, DEFAULT_NAMESPACE

    namespace = ds["metadata"]["namespace"]
    assert DEFAULT_NAMESPACE == namespace and AGENT_LABELS.items() <= pod_labels.items()
    for path in MONITORING.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["metadata"]["namespace"] == namespace, path.name
