"""Metrics wherever the agent runs: the agent CLI in file mode with --metrics-address
serves /metrics, /healthz and /readyz, and exports every series the alerting rules and
the Grafana dashboard (manifests/monitoring) read, with live values from real traffic.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.builders import http_get
from tests.test_agent_e2e import agent_args, md_objects, policy, rule, start_agent, write_yaml
from tests.test_kube_status import check_exposition
from tests.test_monitoring import metric_names_used

pytestmark = [pytest.mark.netns, pytest.mark.bpf]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def test_file_mode_agent_serves_the_metrics_the_dashboards_read(lab, pin_root, state_dir,
                                                               tmp_path):
    objects = tmp_path / "objects"
    objects.mkdir()
    # One destination this node cannot reach (no route to it in the lab): a problem, so
    # that the per-problem series is there too.
    nowhere = {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "MirrorDestination",
               "metadata": {"name": "nowhere"},
               "spec": {"externalAnalyzer": True, "analyzerIP": "198.18.250.250"}}
    write_yaml(objects / "all.yaml", lab.pod_objects() + md_objects(lab) + [nowhere] + [
        policy(rule([{"protocol": "ICMP"}], "analyzer1"),
               rule([{"protocol": "UDP", "port": 9}], "nowhere"))])
    port = free_port()
    agent = start_agent(agent_args(lab, objects, pin_root, state_dir, "--metrics-address",
                                   f"127.0.0.1:{port}"), state_dir)
    try:
        subprocess.run(["ip", "netns", "exec", lab.pods["client"].netns, "ping", "-c", "3",
                        "-i", "0.2", lab.pods["web"].ip], check=True, capture_output=True)
        base = f"http://127.0.0.1:{port}"
        assert http_get(base + "/healthz")[0] == 200
        assert http_get(base + "/readyz")[0] == 200
        code, text = http_get(base + "/metrics")
        assert code == 200
        values = check_exposition(text)
    finally:
        agent.kill()
        agent.wait()
    exported = {k.split("{")[0] for k in values}
    exported |= {n[: -len(suffix)] for n in exported
                 for suffix in ("_bucket", "_sum", "_count") if n.endswith(suffix)}
    missing = metric_names_used() - exported
    assert not missing, f"the dashboards and alerts read series the agent does not export: " \
                        f"{sorted(missing)}"
    assert values["cn2mirror_ready"] == 1 and values["cn2mirror_datapath_up"] == 1
    assert any(k.startswith("cn2mirror_datapath_problem{") and "nowhere" in k
               for k in values)
    copies = [v for k, v in values.items()
              if k.startswith("cn2mirror_rule_mirrored_packets_total{")
              and 'policy="demo/p"' in k and 'rule="0"' in k]
    assert copies == [6]  # 3 echo requests and 3 replies
