"""A lab of network namespaces that looks like a small cluster: nodes, pods, analyzers.

Every node is a namespace; pods are namespaces joined to their node by a veth pair,
wired as a routed CNI does it (Calico-style: a /32 and /128 route per pod on the node, the
pod's default route via a link-local gateway on the host-side veth) or bridged (the pods'
host-side veths on a bridge with the node's gateway address, as flannel does). Nodes are
joined by an underlay link; an external analyzer hangs off the first node's uplink.

Addresses come from the benchmarking ranges (198.18.0.0/15, 2001:2::/48). Nothing is
added to the root namespace. ``Lab.down()`` removes every namespace it made.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass, field


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def ns_sh(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


@dataclass
class Pod:
    name: str
    namespace: str
    node: str
    ip: str
    ip6: str
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    netns: str = ""  # the lab's namespace for the pod
    host_ifname: str = ""  # its veth on the node side
    mac: str = ""


@dataclass
class NodeSpec:
    name: str
    index: int  # 1, 2, ...: pods get 198.18.<index>.x
    bridged: bool = False
    netns: str = ""
    underlay_ip: str = ""
    underlay_ip6: str = ""


class Lab:
    """Build with up(), tear down with down() (also from a `with` block)."""

    def __init__(self, prefix: str | None = None, bridged_node2: bool = False):
        self.prefix = prefix or "cn2m" + uuid.uuid4().hex[:6]
        self.nodes: dict[str, NodeSpec] = {}
        self.pods: dict[str, Pod] = {}
        self.external: str = f"{self.prefix}-ext"
        self.external_ip = "198.19.1.10"
        self.external_ip6 = "2001:2:0:ff01::10"
        self.bridged_node2 = bridged_node2
        self._made: list[str] = []

    # ------------------------------------------------------------------ building
    def netns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", ns)
        self._made.append(ns)
        ns_sh(ns, "ip", "link", "set", "lo", "up")
        return ns

    def add_node(self, name: str, index: int, bridged: bool = False) -> NodeSpec:
        n = NodeSpec(name, index, bridged, self.netns(name))
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            ns_sh(n.netns, "sysctl", "-qw", f"{key}=1")
        if bridged:
            ns_sh(n.netns, "ip", "link", "add", "cni0", "type", "bridge")
            ns_sh(n.netns, "ip", "addr", "add", f"198.18.{index}.1/24", "dev", "cni0")
            ns_sh(n.netns, "ip", "addr", "add", f"2001:2:0:{index}::1/64", "dev", "cni0",
                  "nodad")
            ns_sh(n.netns, "ip", "link", "set", "cni0", "up")
        self.nodes[name] = n
        return n

    def add_pod(self, name: str, node: str, host_index: int, namespace: str = "demo",
                labels: dict | None = None, annotations: dict | None = None) -> Pod:
        n = self.nodes[node]
        ip, ip6 = f"198.18.{n.index}.{host_index}", f"2001:2:0:{n.index}::{host_index:x}"
        p = Pod(name, namespace, node, ip, ip6, dict(labels or {}), dict(annotations or {}))
        p.netns = self.netns(f"pod-{name}")
        p.host_ifname = f"v{name}"[:15]
        ns_sh(n.netns, "ip", "link", "add", p.host_ifname, "type", "veth", "peer", "name",
              "eth0", "netns", p.netns)
        ns_sh(p.netns, "ip", "link", "set", "eth0", "up")
        ns_sh(n.netns, "ip", "link", "set", p.host_ifname, "up")
        if n.bridged:
            ns_sh(n.netns, "ip", "link", "set", p.host_ifname, "master", "cni0")
            ns_sh(p.netns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            ns_sh(p.netns, "ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
            ns_sh(p.netns, "ip", "route", "add", "default", "via", f"198.18.{n.index}.1")
            ns_sh(p.netns, "ip", "-6", "route", "add", "default", "via",
                  f"2001:2:0:{n.index}::1")
        else:
            # Calico-style routed pod: /32 on the pod, a host route to it on the node.
            ns_sh(p.netns, "ip", "addr", "add", f"{ip}/32", "dev", "eth0")
            ns_sh(p.netns, "ip", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad")
            ns_sh(p.netns, "ip", "route", "add", "169.254.1.1", "dev", "eth0",
                  "scope", "link")
            ns_sh(p.netns, "ip", "route", "add", "default", "via", "169.254.1.1")
            ns_sh(n.netns, "ip", "addr", "add", "fe80::1/64", "dev", p.host_ifname, "nodad")
            ns_sh(p.netns, "ip", "-6", "route", "add", "default", "via", "fe80::1",
                  "dev", "eth0")
            # The link-local gateway lives on every host-side veth (Calico answers it
            # with proxy ARP; an address does the same here without a default route).
            ns_sh(n.netns, "ip", "addr", "add", "169.254.1.1/32", "dev", p.host_ifname)
            ns_sh(n.netns, "ip", "route", "add", f"{ip}/32", "dev", p.host_ifname)
            ns_sh(n.netns, "ip", "-6", "route", "add", f"{ip6}/128", "dev", p.host_ifname)
        p.mac = json.loads(ns_sh(p.netns, "ip", "-j", "link", "show", "eth0").stdout)[0][
            "address"]
        self.pods[name] = p
        return p

    def link_nodes(self, a: str, b: str) -> None:
        """An underlay link between two nodes, with routes to each other's pods."""
        na, nb = self.nodes[a], self.nodes[b]
        ns_sh(na.netns, "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul0",
              "netns", nb.netns)
        for n, host in ((na, 1), (nb, 2)):
            n.underlay_ip, n.underlay_ip6 = f"198.19.0.{host}", f"2001:2:0:ff00::{host}"
            ns_sh(n.netns, "ip", "addr", "add", f"{n.underlay_ip}/24", "dev", "ul0")
            ns_sh(n.netns, "ip", "addr", "add", f"{n.underlay_ip6}/64", "dev", "ul0",
                  "nodad")
            ns_sh(n.netns, "ip", "link", "set", "ul0", "up")
        for n, other in ((na, nb), (nb, na)):
            ns_sh(n.netns, "ip", "route", "add", f"198.18.{other.index}.0/24", "via",
                  other.underlay_ip)
            ns_sh(n.netns, "ip", "-6", "route", "add", f"2001:2:0:{other.index}::/64",
                  "via", other.underlay_ip6)

    def add_external(self, node: str) -> None:
        """An analyzer outside the cluster, reached through the node's uplink."""
        n = self.nodes[node]
        ns = self.netns("ext")
        ns_sh(n.netns, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0",
              "netns", ns)
        ns_sh(n.netns, "ip", "addr", "add", "198.19.1.1/24", "dev", "up0")
        ns_sh(n.netns, "ip", "addr", "add", "2001:2:0:ff01::1/64", "dev", "up0", "nodad")
        ns_sh(n.netns, "ip", "link", "set", "up0", "up")
        ns_sh(ns, "ip", "addr", "add", f"{self.external_ip}/24", "dev", "eth0")
        ns_sh(ns, "ip", "addr", "add", f"{self.external_ip6}/64", "dev", "eth0", "nodad")
        ns_sh(ns, "ip", "link", "set", "eth0", "up")
        ns_sh(ns, "ip", "route", "add", "default", "via", "198.19.1.1")
        ns_sh(ns, "ip", "-6", "route", "add", "default", "via", "2001:2:0:ff01::1")
        # The other node reaches the external network through this one.
        for other in self.nodes.values():
            if other is not n and other.underlay_ip:
                ns_sh(other.netns, "ip", "route", "add", "198.19.1.0/24", "via",
                      n.underlay_ip)
                ns_sh(other.netns, "ip", "-6", "route", "add", "2001:2:0:ff01::/64", "via",
                      n.underlay_ip6)

    def up_default(self) -> Lab:
        """Two nodes, pods on each, an analyzer pod on each, an external analyzer."""
        self.add_node("node1", 1)
        self.add_node("node2", 2, bridged=self.bridged_node2)
        self.link_nodes("node1", "node2")
        self.add_external("node1")
        self.add_pod("web", "node1", 2, labels={"app": "web"})
        self.add_pod("client", "node1", 3, labels={"app": "client"})
        self.add_pod("analyzer", "node1", 10, namespace="tools",
                     labels={"core.juniper.net/analyzer-pod": "analyzer1"})
        self.add_pod("db", "node2", 2, labels={"app": "db"})
        self.add_pod("analyzer2", "node2", 10, namespace="tools",
                     labels={"core.juniper.net/analyzer-pod": "analyzer2"})
        return self

    # ------------------------------------------------------------------ objects
    def pod_objects(self) -> list[dict]:
        """Pod and Namespace objects for the agent's file source, as the API has them."""
        objs = []
        for nsname in sorted({p.namespace for p in self.pods.values()}):
            objs.append({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": nsname,
                                      "labels": {"kubernetes.io/metadata.name": nsname}}})
        for p in self.pods.values():
            objs.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels,
                             "annotations": {"cn2mirror.io/mac": p.mac, **p.annotations}},
                "spec": {"nodeName": p.node, "containers": [{"name": "main", "image": "x"}]},
                "status": {"phase": "Running", "podIP": p.ip,
                           "podIPs": [{"ip": p.ip}, {"ip": p.ip6}]},
            })
        return objs

    # ------------------------------------------------------------------ teardown
    def down(self) -> None:
        for ns in reversed(self._made):
            sh("ip", "netns", "del", ns, check=False)
        self._made.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.down()
