"""Builders of the objects the tests feed cn2mirror (Pods, Namespaces, CN2's
MirrorDestinations and policies, in either API group), of the namespace lab and a node
on it for the datapath tests (default_lab, started_node), and small helpers every kind
of test uses: wait_until, an HTTP GET, a kubeconfig for the emulated API server.

One definition each: a test that needs its own defaults wraps these (tests/test_kube.py
pod(): one address and a MAC annotation, as its API server's pods have).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from cn2mirror.agent.model import CN2_GROUP, GROUP
from cn2mirror.agent.netns import entered

API = f"{GROUP}/v1alpha1"  # this project's group, as most tests write it
CN2_API = f"{CN2_GROUP}/v4"
ANALYZER_SELECTOR = "core.juniper.net/analyzer-pod-selector"  # on a MirrorDestination
ANALYZER_POD = "core.juniper.net/analyzer-pod"  # on the analyzer pods
NODE = "n1"


def namespace(name: str, **labels: str) -> dict:
    """A Namespace with the label the API server gives every namespace."""
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name,
                         "labels": {"kubernetes.io/metadata.name": name, **labels}}}


def pod(name: str, ns: str = "demo", node: str | None = NODE, labels: dict | None = None,
        ips: tuple[str, ...] = (), annotations: dict | None = None, phase: str = "Running",
        ports: tuple[tuple[str, int, str], ...] = (), host_network: bool = False,
        container: str = "c", image: str | None = None) -> dict:
    """A Pod as the kubelet reports it: ``ips`` in status.podIPs (and podIP), ``ports``
    (name, number, protocol) as its container's ports."""
    c: dict[str, Any] = {"name": container, "ports": [
        {"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]}
    if image:
        c["image"] = image
    spec: dict[str, Any] = {"containers": [c]}
    if node:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {"phase": phase, "podIPs": [{"ip": ip} for ip in ips]}
    if ips:
        status["podIP"] = ips[0]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {}),
                     "annotations": dict(annotations or {})},
        "spec": spec,
        "status": status,
    }


def md(name: str, selector: str | None = None, api: str = API, **spec: Any) -> dict:
    """A MirrorDestination; ``selector``: its analyzer-pod-selector label."""
    labels = {ANALYZER_SELECTOR: selector} if selector else {}
    return {"apiVersion": api, "kind": "MirrorDestination",
            "metadata": {"name": name, "labels": labels}, "spec": spec}


def csp(name: str, ns: str = "demo", api: str = API, **spec: Any) -> dict:
    return {"apiVersion": api, "kind": "ContrailSecurityPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def gcsp(name: str, api: str = CN2_API, **spec: Any) -> dict:
    return {"apiVersion": api, "kind": "GlobalContrailSecurityPolicy",
            "metadata": {"name": name}, "spec": spec}


def match_labels(**kv: str) -> dict:
    return {"matchLabels": kv}


def mirror_policy(name: str, ns: str, app: str | None, mirror_to: str | None,
                  api: str = API, rules: list | None = None) -> dict:
    """A ContrailSecurityPolicy on the pods labelled app=<app> (None: every pod of the
    namespace) mirroring to ``mirror_to`` (policy-level; None: only what ``rules`` say)."""
    spec: dict[str, Any] = {}
    if app:
        spec["selectors"] = [{"podSelector": match_labels(app=app)}]
    if mirror_to:
        spec["secondaryActions"] = {"mirrorTo": mirror_to}
    if rules is not None:
        spec["rules"] = rules
    return csp(name, ns, api, **spec)


def wait_until(predicate, timeout: float = 5.0, what: str = "", interval: float = 0.01):
    """Polls ``predicate`` until it returns something true, and returns that; fails the
    test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{what or getattr(predicate, '__name__', 'a condition')}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for the emulated API server at ``server`` (a token, no TLS)."""
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: emu\n"
        f"clusters: [{{name: emu, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: emu, user: {token: x}}]\n"
        "contexts: [{name: emu, context: {cluster: emu, user: emu}}]\n")
    return path


@contextlib.contextmanager
def default_lab(prefix: str):
    """A Lab().up_default() (two nodes, pods, analyzers, an external analyzer) named
    ``prefix`` and a random suffix, always torn down."""
    from cn2mirror.agent.lab import Lab

    lab = Lab(prefix=prefix + uuid.uuid4().hex[:4])
    try:
        lab.up_default()
        yield lab
    finally:
        lab.down()


def set_analyzer_mtu(lab, mtu: int) -> None:
    """The MTU of the path to the analyzer pod (its veth, both ends)."""
    from cn2mirror.agent.lab import ns_sh

    an = lab.pods["analyzer"]
    for ns, dev in ((lab.nodes["node1"].netns, an.host_ifname), (an.netns, "eth0")):
        ns_sh(ns, "ip", "link", "set", dev, "mtu", str(mtu))


@contextlib.contextmanager
def started_node(lab, attach_mode: str | None = None, pin_root: str | None = None,
                 copy_budget=None):
    """A started Node on the lab's node1 with a fresh pin root; stopped and unpinned
    after, and the analyzer's MTU given back (what a test changed does not leak).
    ``copy_budget``: the node's (agent/programmer.py CopyBudget); None: no budget, so
    that tests of what copies carry see every copy (tests/test_copy_limits.py tests
    budgets)."""
    from cn2mirror.agent.node import Node
    from cn2mirror.agent.programmer import CopyBudget

    pin_root = pin_root or f"/sys/fs/bpf/cn2m-test-{uuid.uuid4().hex[:6]}"
    options = {"attach_mode": attach_mode} if attach_mode else {}
    node = Node(pin_root, netns=lab.nodes["node1"].netns,
                copy_budget=copy_budget or CopyBudget(0, 0), **options)
    try:
        node.start()
        yield node
    finally:
        node.stop(cleanup=True)
        set_analyzer_mtu(lab, 1500)
        subprocess.run(["rm", "-rf", pin_root])


@contextlib.contextmanager
def as_fresh_node(lab, node):
    """A module's shared node (each load compiles and verifies the programs: about 9 s
    here) as a fresh one for one test: it starts and ends with nothing applied, so the
    test's slots (given anew) count from zero, and with the analyzer's MTU at 1500."""
    from cn2mirror.agent.state import NodeState

    node.apply(NodeState("node1"))
    set_analyzer_mtu(lab, 1500)
    try:
        yield node
    finally:
        node.apply(NodeState("node1"))
        set_analyzer_mtu(lab, 1500)


class Frames:
    """Every frame crossing an interface in either direction (AF_PACKET), with its
    direction: PACKET_OUTGOING leaves the interface."""

    def __init__(self, netns: str, dev: str):
        with entered(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)
            self.sock.bind((dev, 0))

    def stop(self) -> list[tuple[int, bytes]]:
        """(packet type, frame) of every frame seen, and the socket closed."""
        self.sock.setblocking(False)
        out = []
        while True:
            try:
                data, addr = self.sock.recvfrom(1 << 17)
            except BlockingIOError:
                break
            out.append((addr[2], data))
        self.sock.close()
        return out
