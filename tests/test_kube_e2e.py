"""The agent on the Kubernetes source, end to end: emulated API in, BPF maps and real
jmirror copies out.

The emulated API server's pods are the lab's network namespaces (Lab.pod_objects()). The
runtime's Agent runs on node1 with KubeSource, and the services of a deployed agent
(status, Events, /metrics) around it. Pings from client to web are mirrored to the
analyzer pod while the policy exists, still mirrored while the API server is away (the
datapath keeps its last state; /readyz says not ready), and no longer once the policy
is deleted through the API.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import subprocess
import sys
import time

import pytest
from kubernetes import client

from cn2mirror.agent import jmirror
from cn2mirror.agent.compiler import compile_node
from cn2mirror.agent.kube import KubeOptions, KubeSource
from cn2mirror.agent.model import GROUP
from cn2mirror.agent.netns import entered
from cn2mirror.agent.node import Node
from cn2mirror.agent.pinned import PinnedMaps
from cn2mirror.agent.runtime import Agent
from cn2mirror.agent.services import start_services

from .builders import http_get, wait_until, write_kubeconfig
from .kube_emulator import KubeEmulator, crd_files
from .test_kube_status import check_exposition

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

V = f"{GROUP}/v1alpha1"


class Analyzer:
    """A UDP socket on the jmirror port in the analyzer pod's namespace."""

    def __init__(self, netns: str, port: int = 30030):
        with entered(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", port))

    def drain(self, seconds: float) -> list[jmirror.Decoded]:
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                out.append(jmirror.decode(self.sock.recv(65535)))
        return out

    def close(self) -> None:
        self.sock.close()


def ping(lab, src: str, dst: str, count: int = 3) -> None:
    r = subprocess.run(["ip", "netns", "exec", lab.pods[src].netns, "ping", "-c", str(count),
                        "-i", "0.1", "-W", "1", lab.pods[dst].ip], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def icmp_between(copies, src_ip: str, dst_ip: str) -> list[jmirror.Decoded]:
    out = []
    for c in copies:
        inner = c.inner
        if inner[0] >> 4 == 4 and inner[9] == 1 and \
                str(ipaddress.ip_address(inner[12:16])) == src_ip and \
                str(ipaddress.ip_address(inner[16:20])) == dst_ip:
            out.append(c)
    return out




def test_pings_mirrored_while_the_policy_exists_in_the_api(lab, pin_root, state_dir):
    emu = KubeEmulator(bookmark_interval=0.5)
    emu.install_crd_files(crd_files(GROUP))
    emu.start()
    api = client.ApiClient(emu.configuration())
    agent = services = analyzer = None
    try:
        for obj in lab.pod_objects():
            emu.apply(obj)
        emu.apply({"apiVersion": V, "kind": "MirrorDestination",
                   "metadata": {"name": "analyzer1", "labels": {
                       "core.juniper.net/analyzer-pod-selector": "analyzer1"}},
                   "spec": {"juniperHeader": True, "udpPort": 30030}})
        emu.apply({"apiVersion": V, "kind": "ContrailSecurityPolicy",
                   "metadata": {"name": "mirror-web", "namespace": "demo"},
                   "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                            "rules": [{"ports": [{"protocol": "ICMP"}],
                                       "secondaryActions": {"mirrorTo": "analyzer1"}}]}})

        source = KubeSource(api, node_name="node1", debounce=0.01, backoff=(0.05, 0.3))
        node = Node(pin_root, netns=lab.nodes["node1"].netns)
        agent = Agent(source, "node1", node, state_dir)
        agent.start()
        options = KubeOptions(namespace="cn2mirror-system", metrics_address="127.0.0.1:0",
                              lease_duration=3, renew_deadline=2, retry_period=0.5,
                              _client=api)
        services = start_services(options, source, "node1", agent=agent, pin_root=pin_root,
                                  state_dir=state_dir, copy_counts_interval=0.3)
        base = f"http://127.0.0.1:{services.server.port}"
        wait_until(agent.ready, 30, what="the agent to apply the API's objects")

        # The maps hold what the compiler made of the API's objects.
        state = compile_node(source.snapshot(), "node1")
        (policy,) = state.policies
        mirror_id = policy.rules[0].mirror_id
        web = state.interface("demo/web/eth0")
        maps = PinnedMaps(pin_root)
        try:
            rules = list(maps.rules())
            assert [r.mirror_id for _, r in rules] == [mirror_id]
            (dest,) = [d for _, d in maps.destinations()]
            assert str(ipaddress.ip_address(bytes(dest.dst_addr)[:4])) == lab.pods[
                "analyzer"].ip and dest.udp_port == 30030
            sessions = {e.session_id for _, e in maps.interfaces()}
            assert sessions == {web.session_id}
        finally:
            maps.close()

        analyzer = Analyzer(lab.pods["analyzer"].netns)
        ping(lab, "client", "web")
        copies = analyzer.drain(0.5)
        requests = icmp_between(copies, lab.pods["client"].ip, lab.pods["web"].ip)
        replies = icmp_between(copies, lab.pods["web"].ip, lab.pods["client"].ip)
        assert len(requests) == 3 and len(replies) == 3, copies
        assert {(c.mirror_id, c.session_id) for c in copies} == {(mirror_id, web.session_id)}

        # /metrics reads the same counters through names.json; status is written.
        code, text = http_get(base + "/metrics")
        values = check_exposition(text)
        key = next(k for k in values if k.startswith("cn2mirror_rule_mirrored_packets_total{")
                   and 'policy="demo/mirror-web"' in k)
        assert values[key] == 6 and f'mirror_id="{mirror_id}"' in key
        assert values['cn2mirror_interface_mirrored_packets_total{interface="demo/web/eth0",'
                      f'pod="demo/web",session_id="{web.session_id}"}}'] == 6
        assert values["cn2mirror_datapath_up"] == 1
        assert values["cn2mirror_syncs_total{result=\"ok\"}"] >= 1
        wait_until(lambda: (emu.read(V, "MirrorDestination", "analyzer1").get("status") or {})
                   .get("analyzerPod") == "tools/analyzer", 10, what="the status")
        # The node's own counts sit beside the leader's status; neither undoes the other.
        wait_until(lambda: ((emu.read(V, "MirrorDestination", "analyzer1").get("status")
                             or {}).get("copies") or {}).get("node1", {}).get("copied") == 6,
                   10, what="the node's copy counts in the status")
        patches = services.writer.counts["patched"]
        time.sleep(1.0)
        md_status = emu.read(V, "MirrorDestination", "analyzer1")["status"]
        assert md_status["analyzerPod"] == "tools/analyzer"
        assert md_status["copies"]["node1"]["rateLimited"] == 0
        assert services.writer.counts["patched"] == patches  # the leader does not loop
        assert http_get(base + "/readyz")[0] == 200

        # The API server goes away: not ready, and mirroring goes on as it was.
        emu.go_down()
        wait_until(lambda: http_get(base + "/readyz")[0] == 503, 10)
        assert http_get(base + "/healthz")[0] == 200
        ping(lab, "client", "web", 2)
        assert len(analyzer.drain(0.4)) == 4
        emu.come_up()
        wait_until(lambda: http_get(base + "/readyz")[0] == 200, 15)

        # The policy is deleted through the API: the maps empty, nothing is mirrored.
        count = agent.reconcile_count
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            GROUP, "v1alpha1", "demo", "contrailsecuritypolicies", "mirror-web")
        wait_until(lambda: agent.reconcile_count > count and not agent.last_state.policies,
                   10, what="the deletion to be applied")
        maps = PinnedMaps(pin_root)
        try:
            assert list(maps.rules()) == []
        finally:
            maps.close()
        analyzer.drain(0.2)
        ping(lab, "client", "web")
        assert analyzer.drain(0.5) == []
    finally:
        if analyzer is not None:
            analyzer.close()
        if services is not None:
            services.stop()
        if agent is not None:
            agent.stop(cleanup=True)
        api.close()
        emu.stop()


def test_agent_command_line_with_kubernetes(lab, pin_root, state_dir, tmp_path):
    """`cn2mirror agent --kubernetes --once` against the emulated API server, as the
    DaemonSet runs it, programs the node's maps from the API's objects."""
    emu = KubeEmulator()
    emu.install_crd_files(crd_files(GROUP))
    emu.start()
    try:
        for obj in lab.pod_objects():
            emu.apply(obj)
        emu.apply({"apiVersion": V, "kind": "MirrorDestination",
                   "metadata": {"name": "analyzer1", "labels": {
                       "core.juniper.net/analyzer-pod-selector": "analyzer1"}},
                   "spec": {"juniperHeader": True}})
        emu.apply({"apiVersion": V, "kind": "ContrailSecurityPolicy",
                   "metadata": {"name": "mirror-web", "namespace": "demo"},
                   "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                            "secondaryActions": {"mirrorTo": "analyzer1"}}})
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emu.url)
        cli = os.path.join(os.path.dirname(sys.executable), "cn2mirror")
        done = subprocess.run(
            [cli, "agent", "--kubernetes", "--kubeconfig", str(kubeconfig), "--no-status",
             "--node", "node1", "--netns", lab.nodes["node1"].netns, "--pin-root", pin_root,
             "--state-dir", state_dir, "--once"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        maps = PinnedMaps(pin_root)
        try:
            assert len(list(maps.rules())) == 1
            assert len(list(maps.interfaces())) == 1
        finally:
            maps.close()
    finally:
        emu.stop()
