"""Only admins decide where traffic goes (issue 11), and bridged pods are placed without
the neighbour table (issue 13), in the namespace lab with real traffic.

Each attack is made as a tenant would, with nothing but the right to create, label and
annotate pods in its own namespace: the tenant's objects go through the same compiler
as everything else (a snapshot of objects standing in for the API), the node applies the
result to the real datapath, and the copies that reach each analyzer are counted.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from cn2mirror.agent.compiler import compile_node
from cn2mirror.agent.datapath import MIRROR_RX
from cn2mirror.agent.lab import Lab
from cn2mirror.agent.netns import entered
from cn2mirror.agent.node import Node
from cn2mirror.agent.snapshot import snapshot_from_objects

from .builders import ANALYZER_POD, as_fresh_node, md, mirror_policy, started_node, wait_until
from .test_agent_e2e import Analyzer, flow_of, tc_filters

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

TRUSTED = "cn2mirror.io/trusted-network-annotations"
PACKETS = 200
PORT = 5000


# ---------------------------------------------------------------------------- objects


def destination(name: str, selector: str) -> dict:
    return md(name, selector, juniperHeader=True)


def external(lab: Lab) -> dict:
    return md("external", externalAnalyzer=True, analyzerIP=lab.external_ip)


def csp(name: str, ns: str, mirror_to: str, app: str | None = None) -> dict:
    """Every flow of the namespace's pods (those labelled app=<app>) mirrored."""
    return mirror_policy(name, ns, app, mirror_to)


def pods(lab: Lab, annotations: dict[str, dict] | None = None,
         namespace_labels: dict[str, dict] | None = None) -> list[dict]:
    """The lab's Pods and Namespaces, without the lab's MAC annotations (a tenant's pods
    carry what the tenant writes), plus ``annotations`` by pod name."""
    objs = lab.pod_objects()
    for o in objs:
        meta = o["metadata"]
        if o["kind"] == "Pod":
            meta["annotations"] = dict((annotations or {}).get(meta["name"], {}))
        elif meta["name"] in (namespace_labels or {}):
            meta["labels"].update(namespace_labels[meta["name"]])
    return objs


def state_of(objects: list[dict], node: str):
    snapshot, errors = snapshot_from_objects(objects)
    assert errors == []
    return compile_node(snapshot, node)


# ---------------------------------------------------------------------------- traffic


def udp_burst(src, dst_ip: str, count: int = PACKETS, port: int = PORT) -> tuple:
    """``count`` datagrams from lab pod ``src``'s one socket (one flow); its flow key.
    Unconnected, so the destination's port-unreachable errors do not stop it."""
    with entered(src.netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((src.ip, 0))
        sport = s.getsockname()[1]
        for i in range(count):
            s.sendto(i.to_bytes(4, "big") + b"x" * 60, (dst_ip, port))
            time.sleep(0.001)
        return 17, src.ip, sport, dst_ip, port
    finally:
        s.close()


def copies_of(analyzer: Analyzer, flow: tuple, settle: float = 0.5) -> int:
    time.sleep(settle)
    return sum(1 for c in list(analyzer.copies) if c[3] == flow)


@pytest.fixture(scope="module")
def tenant_lab():
    """The default lab plus a tenant namespace, evil, with a pod on node1 (the tests
    change no link or address of it)."""
    lab = Lab()
    try:
        lab.up_default()
        lab.add_pod("thief", "node1", 20, namespace="evil", labels={"app": "thief"})
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def shared_node1(tenant_lab):
    with started_node(tenant_lab) as node:
        yield node


@pytest.fixture
def node1(tenant_lab, shared_node1):
    with as_fresh_node(tenant_lab, shared_node1) as node:
        yield node


@pytest.fixture
def analyzers(tenant_lab):
    opened = {name: Analyzer(tenant_lab.pods[name].netns) for name in ("analyzer", "thief")}
    opened["external"] = Analyzer(tenant_lab.external)
    try:
        yield opened
    finally:
        for a in opened.values():
            a.close()


# ---------------------------------------------------------------------------- analyzers


def test_analyzer_hijack_by_a_tenant_pod_gets_no_copy(tenant_lab, node1, analyzers):
    # evil/thief carries analyzer1's label; "evil" sorts before "tools", where the real
    # analyzer is. Before: every copy went to the tenant.
    lab = tenant_lab
    objs = pods(lab) + [destination("analyzer1", "analyzer1"), csp("p", "demo", "analyzer1",
                                                                   app="web")]
    for o in objs:
        if o["kind"] == "Pod" and o["metadata"]["name"] == "thief":
            o["metadata"]["labels"][ANALYZER_POD] = "analyzer1"
    state = state_of(objs, "node1")
    assert state.destination("analyzer1").analyzer_pod == "tools/analyzer"
    assert any(e.name == "analyzer1" and "evil/thief" in e.reason for e in state.errors)
    node1.apply(state)
    flow = udp_burst(lab.pods["client"], lab.pods["web"].ip)
    assert copies_of(analyzers["thief"], flow) == 0
    assert copies_of(analyzers["analyzer"], flow, 0) == PACKETS


def test_exfiltration_through_a_self_written_network_status(tenant_lab, node1, analyzers):
    # A pod in the analyzers' namespace (not trusted for annotations) marks a Multus
    # interface as its receiving one, with an address of its choosing (here the external
    # analyzer's, standing for any address). Before: the destination resolved to it.
    lab = tenant_lab
    status = [{"name": "k8s-pod-network", "interface": "eth0", "ips": ["198.18.2.50"],
               "default": True},
              {"name": "tools/tap", "interface": "net1", "ips": [lab.external_ip]}]
    tap = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "a-tap", "namespace": "tools",
                        "labels": {ANALYZER_POD: "analyzer1"},
                        "annotations": {
                            "k8s.v1.cni.cncf.io/networks": json.dumps([{"name": "tap", "cni-args": {
                                "core.juniper.net/analyzer-interface": "true"}}]),
                            "k8s.v1.cni.cncf.io/network-status": json.dumps(status)}},
           "spec": {"nodeName": "node2", "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running", "podIPs": [{"ip": "198.18.2.50"}]}}
    state = state_of(pods(lab) + [tap, destination("analyzer1", "analyzer1"),
                                  csp("p", "demo", "analyzer1", app="web")], "node1")
    assert state.destination("analyzer1").analyzer_ip == lab.pods["analyzer"].ip
    node1.apply(state)
    flow = udp_burst(lab.pods["client"], lab.pods["web"].ip)
    assert copies_of(analyzers["external"], flow) == 0
    assert copies_of(analyzers["analyzer"], flow, 0) == PACKETS


# ---------------------------------------------------------------------------- attachments


@pytest.mark.parametrize("how", ["host-interface", "network-status"])
def test_tenant_cannot_mirror_another_pods_interface(tenant_lab, node1, analyzers, how):
    # The tenant's policy mirrors its own pods to an admin's destination; its pod claims
    # web's veth, by annotation or by a secondary interface with web's address in a
    # self-written network-status. Before: every packet of web's was copied.
    lab = tenant_lab
    web = lab.pods["web"]
    if how == "host-interface":
        ann = {"cn2mirror.io/host-interface": web.host_ifname}
    else:
        ann = {"k8s.v1.cni.cncf.io/networks": "net",
               "k8s.v1.cni.cncf.io/network-status": json.dumps([
                   {"name": "evil/net", "interface": "net1", "ips": [web.ip]}])}
    state = state_of(pods(lab, {"thief": ann}) + [external(lab), csp("p", "evil", "external")],
                     "node1")
    result = node1.apply(state)
    assert result.ifindexes.get("evil/thief/eth0") == \
        _ifindex(lab.nodes["node1"].netns, lab.pods["thief"].host_ifname)
    assert set(result.ifindexes) == {"evil/thief/eth0"}
    flow = udp_burst(lab.pods["client"], web.ip)
    assert copies_of(analyzers["external"], flow) == 0
    # The tenant's own traffic is still mirrored: the attachment is real.
    own = udp_burst(lab.pods["thief"], lab.pods["client"].ip, count=20)
    assert copies_of(analyzers["external"], own) == 20


@pytest.mark.parametrize("trusted", [False, True])
def test_a_claimed_interface_does_not_silence_its_owner(tenant_lab, node1, analyzers, trusted):
    # web's policy copies to analyzer1; the tenant claims web's veth. Before: the claim
    # replaced web's entry and web's copies went from all to none. Even where an admin
    # trusts the tenant's annotations, the node's route to web's address proves the veth
    # is web's: the claim is refused, and said on the tenant's pod.
    lab = tenant_lab
    web = lab.pods["web"]
    labels = {"evil": {TRUSTED: "true"}} if trusted else {}
    objs = pods(lab, {"thief": {"cn2mirror.io/host-interface": web.host_ifname}}, labels) + [
        destination("analyzer1", "analyzer1"), external(lab),
        csp("p", "demo", "analyzer1", app="web"), csp("p", "evil", "external")]
    state = state_of(objs, "node1")
    result = node1.apply(state)
    vweb = _ifindex(lab.nodes["node1"].netns, web.host_ifname)
    assert result.ifindexes["demo/web/eth0"] == vweb
    assert result.ifindexes.get("evil/thief/eth0") != vweb
    if trusted:
        assert result.problems["Interface evil/thief/eth0"] == (
            f"the node routes {web.ip} to {web.host_ifname}: another pod's interface "
            f"(explicit)")
    flow = udp_burst(lab.pods["client"], web.ip)
    got = [c for c in list(analyzers["analyzer"].copies) if c[3] == flow]
    assert copies_of(analyzers["analyzer"], flow) == PACKETS
    web_sid = state.interface("demo/web/eth0").session_id
    assert {c[2] for c in got} <= {web_sid}
    assert copies_of(analyzers["external"], flow, 0) == 0


def test_claiming_the_mirror_port_leaves_it_alone(tenant_lab, node1, analyzers):
    # In a namespace an admin trusts, a pod names cn2m-rx as its host interface, then goes
    # away. Before: its classifier replaced the mirror port's wrapper, and its deletion
    # removed the wrapper: copies that cross the port (UDP left to the NIC's checksum)
    # were lost, uncounted.
    lab = tenant_lab
    node_ns = lab.nodes["node1"].netns
    base = [destination("analyzer1", "analyzer1"), csp("p", "demo", "analyzer1", app="web"),
            external(lab), csp("p", "evil", "external")]
    claim = pods(lab, {"thief": {"cn2mirror.io/host-interface": MIRROR_RX}},
                 {"evil": {TRUSTED: "true"}})
    before = tc_filters(node_ns, MIRROR_RX)
    result = node1.apply(state_of(claim + base, "node1"))
    assert result.problems["Interface evil/thief/eth0"] == \
        f"{MIRROR_RX} is cn2mirror's own interface (explicit)"
    assert "evil/thief/eth0" not in result.ifindexes
    assert tc_filters(node_ns, MIRROR_RX) == before
    gone = [o for o in claim if o["metadata"]["name"] != "thief"]
    node1.apply(state_of(gone + base[:2], "node1"))
    assert tc_filters(node_ns, MIRROR_RX) == before and "mirror_wrap" in before
    flow = udp_burst(lab.pods["client"], lab.pods["web"].ip)
    assert copies_of(analyzers["analyzer"], flow) == PACKETS


def _ifindex(netns: str, name: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "-j", "link", "show", name], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)[0]["ifindex"]


# ---------------------------------------------------------------------------- bridged


@pytest.fixture
def bridged_lab():
    lab = Lab(bridged_node2=True)
    try:
        lab.up_default()
        yield lab
    finally:
        lab.down()


def test_bridged_pod_stays_mirrored_when_its_neighbour_entry_goes(bridged_lab, pin_root):
    # A flannel-like node, pods without MAC annotations. Before: once the node's
    # neighbour entry for the pod was gone, the next resync detached it and its echoes
    # went unmirrored (5 of 5).
    lab = bridged_lab
    node_ns, db = lab.nodes["node2"].netns, lab.pods["db"]
    objs = pods(lab) + [destination("analyzer2", "analyzer2"),
                        csp("p", "demo", "analyzer2", app="db")]
    state = state_of(objs, "node2")
    an = Analyzer(lab.pods["analyzer2"].netns)
    node = Node(pin_root, netns=node_ns)
    try:
        node.start()
        subprocess.run(["ip", "netns", "exec", db.netns, "ping", "-c", "1", "-W", "2",
                        "198.18.2.1"], check=True, capture_output=True)
        assert node.apply(state).ifindexes["demo/db/eth0"] == _ifindex(node_ns, "vdb")

        def echoes(count: int = 5) -> int:
            """Echo requests db sends to the node that arrive mirrored."""
            t0 = time.monotonic()
            subprocess.run(["ip", "netns", "exec", db.netns, "ping", "-c", str(count), "-i",
                            "0.05", "-W", "2", "198.18.2.1"], check=True, capture_output=True)
            wait_until(lambda: len(requests(t0)) >= count, 3, "the mirrored echoes")
            return len(requests(t0))

        def requests(t0: float) -> list:
            return [c for c in an.between(t0) if flow_of(c[4])[:2] == (1, db.ip)
                    and c[4][(c[4][0] & 0x0F) * 4] == 8]

        assert echoes() == 5
        # The node forgets the pod's MAC (and the bridge too); a resync follows.
        subprocess.run(["ip", "-n", node_ns, "neigh", "del", db.ip, "dev", "cni0"],
                       check=True)
        subprocess.run(["ip", "netns", "exec", node_ns, "bridge", "fdb", "del", db.mac,
                        "dev", "vdb", "master"], capture_output=True)
        result = node.apply(state)
        assert result.ifindexes["demo/db/eth0"] == _ifindex(node_ns, "vdb")
        assert result.detached == []
        assert echoes() == 5
        # An agent started afresh (nothing remembered) finds it from the veth peer.
        node.stop()
        subprocess.run(["ip", "-n", node_ns, "neigh", "flush", "to", db.ip], check=True)
        subprocess.run(["ip", "netns", "exec", node_ns, "bridge", "fdb", "del", db.mac,
                        "dev", "vdb", "master"], capture_output=True)
        node = Node(pin_root, netns=node_ns)
        node.start()
        result = node.apply(state)
        assert result.ifindexes["demo/db/eth0"] == _ifindex(node_ns, "vdb")
        assert result.problems == {}
        assert echoes() == 5
    finally:
        node.stop(cleanup=True)
        an.close()
