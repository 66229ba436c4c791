"""A lab of network namespaces that looks like a small cluster: nodes, pods, analyzers.

Every node is a namespace; pods are namespaces joined to their node by a veth pair,
wired as a routed CNI does it (Calico-style: a /32 and /128 route per pod on the node, the
pod's default route via a link-local gateway on the host-side veth) or bridged (the pods'
host-side veths on a bridge with the node's gateway address, as flannel does). Nodes are
joined by an underlay link; an external analyzer hangs off the first node's uplink.

Addresses come from the benchmarking ranges (198.18.0.0/15, 2001:2::/48). Nothing is
added to the root namespace. ``Lab.down()`` removes every namespace it made.

Labs can also be described by a spec (``Lab.from_spec(dict)``, ``load_spec(file)``; the
format is SPEC_FORMAT below), and recorded (``record()``/``Lab.from_record()``) so that
another process can tear them down.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .model import LABEL_ANALYZER_NAMESPACE, LABEL_ANALYZER_POD


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
    # containerPorts of its container ({"name", "containerPort", "protocol"}), so that
    # policies can name ports.
    ports: list = field(default_factory=list)


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
                labels: dict | None = None, annotations: dict | None = None,
                ports: list | None = None) -> Pod:
        n = self.nodes[node]
        ip, ip6 = f"198.18.{n.index}.{host_index}", f"2001:2:0:{n.index}::{host_index:x}"
        p = Pod(name, namespace, node, ip, ip6, dict(labels or {}), dict(annotations or {}),
                ports=[dict(port) for port in ports or ()])
        p.netns = self.netns(f"pod-{name}")
        p.host_ifname = f"v{name}"[:15]
        self._wire(p)
        self.pods[name] = p
        return p

    def _wire(self, p: Pod) -> None:
        """The pod's veth pair, addresses and routes, as the CNI sets them up."""
        n = self.nodes[p.node]
        ip, ip6 = p.ip, p.ip6
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

    def unplug_pod(self, name: str) -> None:
        """The pod's network goes away as when its sandbox dies: the veth pair, and with
        it the node's routes to the pod. The pod's namespace (and its sockets) stay."""
        p = self.pods[name]
        ns_sh(self.nodes[p.node].netns, "ip", "link", "del", p.host_ifname)

    def replug_pod(self, name: str) -> None:
        """The pod's network comes back as from a restarted sandbox: a new veth pair (new
        interface index, new MAC), the same addresses."""
        self._wire(self.pods[name])

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

    # ------------------------------------------------------------------ specs, records
    def up_spec(self, spec: dict[str, Any]) -> Lab:
        """Build the lab a spec describes (SPEC_FORMAT); torn down again on failure."""
        spec = validate_spec(spec)
        try:
            for index, n in enumerate(spec["nodes"], start=1):
                self.add_node(n["name"], index, bridged=n["bridged"])
            if len(spec["nodes"]) == 2:
                self.link_nodes(spec["nodes"][0]["name"], spec["nodes"][1]["name"])
            if spec["external"]:
                self.add_external(spec["external"])
            for p in spec["pods"]:
                self.add_pod(p["name"], p["node"], p["host"], namespace=p["namespace"],
                             labels=p["labels"], annotations=p["annotations"],
                             ports=p["ports"])
        except BaseException:
            self.down()
            raise
        return self

    @classmethod
    def from_spec(cls, spec: dict[str, Any], prefix: str | None = None) -> Lab:
        """A lab built from a spec (see SPEC_FORMAT)."""
        return cls(prefix=prefix).up_spec(spec)

    def record(self) -> dict[str, Any]:
        """Everything needed to use or remove the lab from another process (JSON-able)."""
        return {"version": 1, "prefix": self.prefix, "namespaces": list(self._made),
                "external_ip": self.external_ip, "external_ip6": self.external_ip6,
                "nodes": {name: asdict(n) for name, n in self.nodes.items()},
                "pods": {name: asdict(p) for name, p in self.pods.items()}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Lab:
        """The Lab a record() describes (built by another process); down() removes it."""
        lab = cls(prefix=record["prefix"])
        lab.nodes = {name: NodeSpec(**n) for name, n in record.get("nodes", {}).items()}
        lab.pods = {name: Pod(**p) for name, p in record.get("pods", {}).items()}
        lab.external_ip = record.get("external_ip", lab.external_ip)
        lab.external_ip6 = record.get("external_ip6", lab.external_ip6)
        lab._made = list(record.get("namespaces", []))
        return lab

    # ------------------------------------------------------------------ objects
    def pod_objects(self) -> list[dict]:
        """Pod and Namespace objects for the agent's file source, as the API has them."""
        objs = []
        for nsname in sorted({p.namespace for p in self.pods.values()}):
            labels = {"kubernetes.io/metadata.name": nsname}
            # As the lab's admin: analyzers are allowed where the lab put its analyzer
            # pods. Pods' network annotations are trusted nowhere: the agent places every
            # pod from the node's own tables (the MAC annotation below goes unused).
            if any(p.namespace == nsname and LABEL_ANALYZER_POD in p.labels
                   for p in self.pods.values()):
                labels[LABEL_ANALYZER_NAMESPACE] = "true"
            objs.append({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": nsname, "labels": labels}})
        for p in self.pods.values():
            container = {"name": "main", "image": "x"}
            if p.ports:
                container["ports"] = [dict(port) for port in p.ports]
            objs.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": dict(p.labels),
                             "annotations": {"cn2mirror.io/mac": p.mac, **p.annotations}},
                "spec": {"nodeName": p.node, "containers": [container]},
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


# ---------------------------------------------------------------------- specs
SPEC_FORMAT = """\
# A lab spec (YAML). Every key but nodes is optional.
nodes:                  # one or two nodes; the Nth node's pods get 198.18.N.x
- name: node1
  bridged: false        # false: routed pods (Calico-like); true: on bridge cni0 (flannel-like)
- name: node2
external: node1         # the node the external analyzer (198.19.1.10) hangs off; omit: none
pods:
- name: web             # unique across the lab
  node: node1
  host: 2               # last octet of the pod's address (2..254): 198.18.1.2
  namespace: demo       # default demo
  labels: {app: web}
  annotations: {}
  ports:                # containerPorts, so that policies can name ports
  - {name: http, containerPort: 80, protocol: TCP}
"""

# The same lab as Lab.up_default(), as a spec.
DEFAULT_SPEC: dict[str, Any] = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "external": "node1",
    "pods": [
        {"name": "web", "node": "node1", "host": 2, "labels": {"app": "web"}},
        {"name": "client", "node": "node1", "host": 3, "labels": {"app": "client"}},
        {"name": "analyzer", "node": "node1", "host": 10, "namespace": "tools",
         "labels": {"core.juniper.net/analyzer-pod": "analyzer1"}},
        {"name": "db", "node": "node2", "host": 2, "labels": {"app": "db"}},
        {"name": "analyzer2", "node": "node2", "host": 10, "namespace": "tools",
         "labels": {"core.juniper.net/analyzer-pod": "analyzer2"}},
    ],
}

# The lab manifests/examples/ are written for (00-demo-workloads.yaml): web with its named
# port http, client, and the analyzer in namespace demo; same addresses as DEFAULT_SPEC.
EXAMPLES_SPEC: dict[str, Any] = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "external": "node1",
    "pods": [
        {"name": "web", "node": "node1", "host": 2, "labels": {"app": "web"},
         "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]},
        {"name": "client", "node": "node1", "host": 3, "labels": {"app": "client"}},
        {"name": "analyzer", "node": "node1", "host": 10,
         "labels": {"core.juniper.net/analyzer-pod": "analyzer1"},
         "annotations": {"core.juniper.net/analyzer-interface": "true"}},
        {"name": "db", "node": "node2", "host": 2, "labels": {"app": "db"}},
        {"name": "analyzer2", "node": "node2", "host": 10, "namespace": "tools",
         "labels": {"core.juniper.net/analyzer-pod": "analyzer2"}},
    ],
}

_SPEC_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class CopyReceiver:
    """An analyzer's end of the copies in a lab: a UDP socket in the analyzer's network
    namespace, read on a thread of its own, each datagram handed to
    ``on_datagram(arrival time (monotonic), datagram)``. The tests keep and decode every
    copy; the soak only counts them."""

    def __init__(self, netns: str, on_datagram: Callable[[float, bytes], None],
                 port: int = 30030, rcvbuf: int = 4 << 20):
        from .netns import entered

        with entered(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("0.0.0.0", port))
        self.on_datagram = on_datagram
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                data = self.sock.recv(65535)
                self.on_datagram(time.monotonic(), data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class LabSpecError(ValueError):
    """A lab spec that cannot be built; the message names the field at fault."""


def _spec_map(value: Any, where: str, keys: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LabSpecError(f"{where}: must be a mapping, not {type(value).__name__}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise LabSpecError(f"{where}: unknown key {unknown[0]!r} "
                           f"(known: {', '.join(sorted(keys))})")
    return value


def _spec_name(value: Any, where: str, max_len: int) -> str:
    if not isinstance(value, str) or not _SPEC_NAME.match(value) or len(value) > max_len:
        raise LabSpecError(f"{where}: {value!r} is not a name (lower-case letters, digits "
                           f"and inner '-', at most {max_len} characters)")
    return value


def _string_dict(value: Any, where: str) -> dict[str, str]:
    value = value or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise LabSpecError(f"{where}: must map strings to strings (quote \"true\")")
    return dict(value)


def validate_spec(spec: Any) -> dict[str, Any]:
    """The spec with defaults filled in, or LabSpecError naming what is wrong."""
    spec = _spec_map(spec, "spec", {"nodes", "external", "pods"})
    nodes_in = spec.get("nodes")
    if not isinstance(nodes_in, list) or not 1 <= len(nodes_in) <= 2:
        raise LabSpecError("nodes: give one or two nodes (the lab links at most two)")
    nodes = []
    for i, n in enumerate(nodes_in):
        where = f"nodes[{i}]"
        n = _spec_map(n, where, {"name", "bridged"})
        name = _spec_name(n.get("name"), f"{where}.name", 20)
        if name == "ext" or name.startswith("pod-"):
            raise LabSpecError(f"{where}.name: {name!r} is reserved")
        if any(other["name"] == name for other in nodes):
            raise LabSpecError(f"{where}.name: node {name!r} given twice")
        bridged = n.get("bridged", False)
        if not isinstance(bridged, bool):
            raise LabSpecError(f"{where}.bridged: must be true or false")
        nodes.append({"name": name, "bridged": bridged})
    names = [n["name"] for n in nodes]
    external = spec.get("external")
    if external is not None and external not in names:
        raise LabSpecError(f"external: {external!r} is not a node of the lab")
    pods: list[dict[str, Any]] = []
    used_hosts: set[tuple[str, int]] = set()
    for i, p in enumerate(spec.get("pods") or []):
        where = f"pods[{i}]"
        p = _spec_map(p, where, {"name", "node", "host", "namespace", "labels",
                                 "annotations", "ports"})
        name = _spec_name(p.get("name"), f"{where}.name", 40)
        if any(other["name"] == name for other in pods):
            raise LabSpecError(f"{where}.name: pod {name!r} given twice (pod names are "
                               "unique across the lab's namespaces)")
        if any(f"v{other['name']}"[:15] == f"v{name}"[:15] for other in pods):
            raise LabSpecError(f"{where}.name: {name!r} and another pod share their first "
                               "14 characters (their interface names would clash)")
        node = p.get("node")
        if node not in names:
            raise LabSpecError(f"{where}.node: {node!r} is not a node of the lab "
                               f"({', '.join(names)})")
        host = p.get("host")
        if host is None:
            host = next(h for h in range(2, 255) if (node, h) not in used_hosts)
        if isinstance(host, bool) or not isinstance(host, int) or not 2 <= host <= 254:
            raise LabSpecError(f"{where}.host: must be a number from 2 to 254")
        if (node, host) in used_hosts:
            raise LabSpecError(f"{where}.host: {node} already has a pod at host {host}")
        used_hosts.add((node, host))
        namespace = _spec_name(p.get("namespace", "demo"), f"{where}.namespace", 63)
        ports = []
        for j, port in enumerate(p.get("ports") or []):
            pw = f"{where}.ports[{j}]"
            port = _spec_map(port, pw, {"name", "containerPort", "protocol"})
            number = port.get("containerPort")
            if isinstance(number, bool) or not isinstance(number, int) or \
                    not 1 <= number <= 65535:
                raise LabSpecError(f"{pw}.containerPort: must be a port number")
            entry: dict[str, Any] = {"containerPort": number,
                                     "protocol": port.get("protocol", "TCP")}
            if entry["protocol"] not in ("TCP", "UDP", "SCTP"):
                raise LabSpecError(f"{pw}.protocol: must be TCP, UDP or SCTP")
            if port.get("name") is not None:
                entry["name"] = _spec_name(port["name"], f"{pw}.name", 15)
            ports.append(entry)
        pods.append({"name": name, "node": node, "host": host, "namespace": namespace,
                     "labels": _string_dict(p.get("labels"), f"{where}.labels"),
                     "annotations": _string_dict(p.get("annotations"),
                                                 f"{where}.annotations"),
                     "ports": ports})
    return {"nodes": nodes, "external": external, "pods": pods}


def load_spec(path: str) -> dict[str, Any]:
    """A spec from a YAML file, validated."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise LabSpecError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LabSpecError(f"{path}: invalid YAML: {e}") from None
    try:
        return validate_spec(data)
    except LabSpecError as e:
        raise LabSpecError(f"{path}: {e}") from None


def lab_namespaces(prefix: str) -> list[str]:
    """Network namespaces named like a lab with this prefix makes them ("<prefix>-...")."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(f"{prefix}-"))


def remove_namespaces(names: list[str]) -> None:
    for ns in names:
        sh("ip", "netns", "del", ns, check=False)


NETNS_DIR = "/var/run/netns"
