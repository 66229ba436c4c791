"""agent/discovery.py on real namespaces: node1 routed (Calico-like), node2 bridged
(flannel-like), from one Lab(bridged_node2=True)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest

from cn2mirror.agent import layout as L
from cn2mirror.agent.discovery import VXLAN_DEVICE, NodeTables
from cn2mirror.agent.lab import Lab
from cn2mirror.agent.netns import iproute
from cn2mirror.agent.state import DeliveryMode, Destination, Interface

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def blab():
    lab = Lab(bridged_node2=True)
    try:
        lab.up_default()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def tables(blab):
    opened = []

    def get(node: str) -> NodeTables:
        ipr = iproute(blab.nodes[node].netns)
        opened.append(ipr)
        return NodeTables(ipr, blab.nodes[node].netns)

    yield get
    for ipr in opened:
        ipr.close()


def ns(*cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", *cmd], check=True, capture_output=True,
                          text=True).stdout


def link(lab: Lab, node: str, name: str) -> dict:
    return json.loads(ns(lab.nodes[node].netns, "ip", "-d", "-j", "link", "show", name))[0]


def ifindex(lab: Lab, node: str, name: str) -> int:
    return link(lab, node, name)["ifindex"]


def pod_iface(lab: Lab, name: str, **kw) -> Interface:
    p = lab.pods[name]
    return Interface(pod=f"{p.namespace}/{p.name}", **kw)


# ---------------------------------------------------------------------------- pods


def test_routed_pod_found_by_its_host_route(blab, tables):
    t = tables("node1")
    web = blab.pods["web"]
    vweb = ifindex(blab, "node1", "vweb")
    assert t.host_interface(pod_iface(blab, "web", ips=(web.ip, web.ip6))) == \
        (vweb, f"route to {web.ip}")
    assert t.host_interface(pod_iface(blab, "web", ips=(web.ip6,))) == \
        (vweb, f"route to {web.ip6}")
    # The MAC does not matter on a routed node.
    assert t.host_interface(pod_iface(blab, "web", ips=(web.ip,), mac="02:00:00:00:00:01"))[0] \
        == vweb


def test_pods_not_on_this_node(blab, tables):
    t = tables("node1")
    db = blab.pods["db"]
    # node1 reaches db through node2 (a gateway): not a local pod.
    assert t.host_interface(pod_iface(blab, "db", ips=(db.ip, db.ip6))) == \
        (None, f"no local route to {db.ip}, {db.ip6}")
    assert t.host_interface(pod_iface(blab, "web", ips=("198.18.1.99",))) == \
        (None, "no local route to 198.18.1.99")
    assert t.host_interface(pod_iface(blab, "web")) == (None, "the pod has no IP address yet")


def forget_fdb(node_ns: str, port: str, mac: str) -> None:
    """The bridge forgets a learned MAC (as when its entry ages out)."""
    subprocess.run(["ip", "netns", "exec", node_ns, "bridge", "fdb", "del", mac, "dev", port,
                    "master"], capture_output=True)


def hide_namespaces(t: NodeTables) -> NodeTables:
    """As on a node whose pod namespaces the agent cannot see (no /var/run/netns)."""
    t.netns_names = dict  # type: ignore[method-assign]
    return t


def test_bridged_pod_found_from_its_veth_peer_without_neighbour_or_fdb(blab, tables):
    # The node has no neighbour entry for the pod and the bridge has forgotten its MAC:
    # the pod's veth peer, in the pod's own namespace, holds its address (issue 13).
    db = blab.pods["db"]
    node2 = blab.nodes["node2"].netns
    ns(node2, "ip", "neigh", "flush", "to", db.ip)
    forget_fdb(node2, "vdb", db.mac)
    t = tables("node2")
    found = t.place(pod_iface(blab, "db", ips=(db.ip, db.ip6)))
    assert (found.ifindex, found.ifname, found.proven, found.mac) == (
        ifindex(blab, "node2", "vdb"), "vdb", True, db.mac)
    assert found.how == f"veth peer in namespace {db.netns} holds {db.ip}"


def test_bridged_pod_found_by_its_mac_in_the_fdb(blab, tables):
    db = blab.pods["db"]
    ns(db.netns, "ping", "-c", "1", "-W", "2", "198.18.2.1")  # the bridge learns its MAC
    t = hide_namespaces(tables("node2"))
    vdb = ifindex(blab, "node2", "vdb")
    assert t.host_interface(pod_iface(blab, "db", ips=(db.ip,), mac=db.mac)) == \
        (vdb, f"bridge port holding {db.mac}")
    assert t.host_interface(pod_iface(blab, "db", ips=(db.ip,), mac=db.mac.upper()))[0] == vdb


def test_bridged_pod_that_cannot_be_placed_says_what_was_looked_up(blab, tables):
    db = blab.pods["db"]
    node2 = blab.nodes["node2"].netns
    ns(node2, "ip", "neigh", "flush", "to", db.ip)
    t = hide_namespaces(tables("node2"))
    missing = "02:00:00:00:00:99"
    assert t.host_interface(pod_iface(blab, "db", ips=(db.ip,), mac=missing)) == (None, (
        f"{db.ip} is behind bridge cni0; the pod's annotated MAC, {missing}, is not in its "
        f"FDB; {db.ip} is behind bridge cni0; the node has no neighbour entry for it; no "
        f"veth peer of the 2 ports of bridge cni0 holds {db.ip} (2 in namespaces not under "
        f"/var/run/netns)"))


def test_bridged_pod_without_mac_uses_the_neighbour_table(blab, tables):
    db = blab.pods["db"]
    node2 = blab.nodes["node2"].netns
    ns(node2, "ping", "-c", "1", "-W", "2", db.ip)  # the node resolves the pod's MAC
    t = hide_namespaces(tables("node2"))
    assert t.neighbour_mac(db.ip) == db.mac
    assert t.host_interface(pod_iface(blab, "db", ips=(db.ip,))) == \
        (ifindex(blab, "node2", "vdb"), f"bridge port holding {db.mac}")


def test_a_placed_pod_is_kept_while_its_interface_exists(blab, tables):
    db = blab.pods["db"]
    node2 = blab.nodes["node2"].netns
    t = tables("node2")
    iface = pod_iface(blab, "db", ips=(db.ip,))
    first = t.place(iface)
    vdb = ifindex(blab, "node2", "vdb")
    assert first.ifindex == vdb and first.bridge == ifindex(blab, "node2", "cni0")
    # Nothing would place it now (no neighbour, no FDB entry, namespaces out of sight):
    # the port it had is still there, on the bridge, so it stays.
    ns(node2, "ip", "neigh", "flush", "to", db.ip)
    forget_fdb(node2, "vdb", db.mac)
    hidden = hide_namespaces(tables("node2"))
    assert hidden.place(iface, first) == first
    # Another interface under its number, or one taken off the bridge, is looked up again.
    renamed = replace(first, ifname="vweb")
    assert hidden.place(iface, renamed) == hidden.place(iface) == (
        f"{db.ip} is behind bridge cni0; the node has no neighbour entry for it; no veth "
        f"peer of the 2 ports of bridge cni0 holds {db.ip} (2 in namespaces not under "
        f"/var/run/netns)")
    ns(node2, "ip", "link", "set", "vdb", "nomaster")
    try:
        assert isinstance(hidden.place(iface, first), str)
    finally:
        ns(node2, "ip", "link", "set", "vdb", "master", "cni0")


@pytest.mark.parametrize("claimed, reason", [
    ("cn2m-rx", "cn2m-rx is cn2mirror's own interface"),
    ("cni0", "cni0 is a bridge device, not a pod's host-side veth"),
    ("lo", "lo is the loopback"),
    ("ul0", "ul0 holds the node's address 198.19.0.2: not a pod's interface"),
])
def test_explicit_host_interface_never_an_interface_that_is_not_a_pods(blab, tables, claimed,
                                                                       reason):
    node2 = blab.nodes["node2"].netns
    ns(node2, "ip", "link", "add", "cn2m-rx", "type", "veth", "peer", "name", "cn2m-tx")
    try:
        t = tables("node2")
        db = blab.pods["db"]
        assert t.host_interface(pod_iface(blab, "db", ips=(db.ip,), host_ifname=claimed,
                                          from_annotations=True)) == \
            (None, f"{reason} (explicit)")
    finally:
        ns(node2, "ip", "link", "del", "cn2m-rx")


def test_explicit_host_interface_refused_where_the_node_says_another_pod_is(blab, tables):
    db, web = blab.pods["db"], blab.pods["web"]
    ns(db.netns, "ping", "-c", "1", "-W", "2", "198.18.2.1")  # the bridge learns db's MAC
    # Bridged: the port leads to another MAC than the claimant's.
    claim = pod_iface(blab, "db", ips=("198.18.9.9",), mac="02:00:00:00:00:42",
                      host_ifname="vdb", from_annotations=True)
    assert tables("node2").host_interface(claim) == (
        None, f"bridge port vdb leads to MAC {db.mac}, not this interface's (explicit)")
    # Routed: the node routes another address there.
    claim = pod_iface(blab, "web", ips=("198.18.9.9",), host_ifname="vweb",
                      from_annotations=True)
    assert tables("node1").host_interface(claim) == (
        None, f"the node routes {web.ip} to vweb: another pod's interface (explicit)")
    # The pod's own interface, as an admin-trusted annotation names it: accepted.
    own = pod_iface(blab, "web", ips=(web.ip, web.ip6), host_ifname="vweb",
                    from_annotations=True)
    assert tables("node1").host_interface(own) == (ifindex(blab, "node1", "vweb"), "explicit")
    assert tables("node1").host_interface(pod_iface(blab, "db", ips=(db.ip,),
                                                    host_ifname="nope0")) == \
        (None, "no interface nope0")


# ---------------------------------------------------------------------------- destinations


def jm(ip: str, port: int = 30030) -> Destination:
    return Destination("an", DeliveryMode.JMIRROR, analyzer_ip=ip, udp_port=port)


def test_jmirror_to_a_local_analyzer_pod(blab, tables):
    t = tables("node1")
    r = t.resolve_destination(jm(blab.pods["analyzer"].ip, 8099))
    assert r.problem is None
    assert r.mode == L.Mode.JMIRROR4
    assert (r.dst_addr, r.udp_port, r.mtu) == (blab.pods["analyzer"].ip, 8099, 1500)
    assert r.out_ifindex == ifindex(blab, "node1", "vanalyzer")
    # The node's source address towards the pod's veth (the routed lab's gateway address).
    assert r.src_addr == "198.19.0.1"  # a node address, not the link-local gateway


def test_jmirror_routes_src_and_mtu(blab, tables):
    t = tables("node1")
    # Through the other node: the underlay's source address.
    r = t.resolve_destination(jm(blab.pods["analyzer2"].ip))
    assert (r.src_addr, r.out_ifindex) == ("198.19.0.1", ifindex(blab, "node1", "ul0"))
    # The external analyzer, behind the uplink with jumbo frames: the MTU follows the
    # route, and IPv6 copies are capped where the wrapper can checksum them.
    node1 = blab.nodes["node1"].netns
    ns(node1, "ip", "link", "set", "up0", "mtu", "9500")
    try:
        r4 = t.resolve_destination(jm(blab.external_ip))
        assert (r4.mode, r4.src_addr, r4.mtu) == (L.Mode.JMIRROR4, "198.19.1.1", 9500)
        assert r4.out_ifindex == ifindex(blab, "node1", "up0")
        r6 = t.resolve_destination(jm(blab.external_ip6))
        assert (r6.mode, r6.src_addr, r6.mtu) == (L.Mode.JMIRROR6, "2001:2:0:ff01::1", 9216)
    finally:
        ns(node1, "ip", "link", "set", "up0", "mtu", "1500")


def test_jmirror_without_route(blab, tables):
    r = tables("node1").resolve_destination(jm("198.18.99.1"))
    assert r.problem == "no route to analyzer 198.18.99.1"
    assert r.mode == L.Mode.JMIRROR4 and r.dst_addr == "198.18.99.1"


def test_l2_destination_by_fdb_neighbour_interface_or_route(blab, tables):
    a2 = blab.pods["analyzer2"]
    ns(a2.netns, "ping", "-c", "1", "-W", "2", "198.18.2.1")
    r = tables("node2").resolve_destination(
        Destination("l2", DeliveryMode.L2, analyzer_mac=a2.mac))
    assert r.problem is None and r.mode == L.Mode.L2
    assert (r.out_ifindex, r.mac, r.mtu) == (ifindex(blab, "node2", "vanalyzer2"), a2.mac, 1500)

    an = blab.pods["analyzer"]
    ns(blab.nodes["node1"].netns, "ping", "-c", "1", "-W", "2", an.ip)  # a neighbour entry
    t1 = tables("node1")
    vanalyzer = ifindex(blab, "node1", "vanalyzer")
    assert t1.resolve_destination(
        Destination("l2", DeliveryMode.L2, analyzer_mac=an.mac)).out_ifindex == vanalyzer
    assert t1.resolve_destination(Destination(
        "l2", DeliveryMode.L2, analyzer_mac="02:00:00:00:00:97",
        analyzer_ifname="vanalyzer")).out_ifindex == vanalyzer
    # MAC unknown here, but the analyzer's address routes to a local interface.
    assert t1.resolve_destination(Destination(
        "l2", DeliveryMode.L2, analyzer_mac="02:00:00:00:00:97",
        analyzer_ip=an.ip)).out_ifindex == vanalyzer


def test_l2_destination_not_found(blab, tables):
    r = tables("node1").resolve_destination(
        Destination("l2", DeliveryMode.L2, analyzer_mac="02:00:00:00:00:98"))
    assert r.problem == "analyzer MAC 02:00:00:00:00:98 not found on this node"
    assert r.mode == L.Mode.L2


def test_vxlan_device_is_created_once(blab, tables):
    t = tables("node1")
    d = Destination("vx", DeliveryMode.VXLAN, vtep_ip="198.19.0.2",
                    vtep_mac="02:00:c6:13:00:14", vni=5001)
    r = t.resolve_destination(d)
    dev = link(blab, "node1", VXLAN_DEVICE)
    data = dev["linkinfo"]["info_data"]
    assert dev["linkinfo"]["info_kind"] == "vxlan" and data.get("external") is True
    assert data["port"] == L.VXLAN_PORT and "UP" in dev["flags"]
    assert r.problem is None and r.mode == L.Mode.VXLAN
    assert (r.dst_addr, r.src_addr, r.udp_port) == ("198.19.0.2", "198.19.0.1", L.VXLAN_PORT)
    assert (r.out_ifindex, r.vni, r.mac) == (dev["ifindex"], 5001, "02:00:c6:13:00:14")
    assert t.resolve_destination(d).out_ifindex == dev["ifindex"]  # adopted, not re-made
    # A VTEP this node cannot reach: the device is still there, the problem is reported.
    r = t.resolve_destination(Destination("vx", DeliveryMode.VXLAN, vtep_ip="198.18.99.5",
                                          vni=7))
    assert r.problem == "no route to VTEP 198.18.99.5"
    assert r.out_ifindex == dev["ifindex"]


def test_vlan_needs_an_uplink(blab, tables):
    t = tables("node1")
    d = Destination("nic", DeliveryMode.VLAN, vlan_id=100)
    r = t.resolve_destination(d)
    assert r.problem == ("no uplink interface for NIC-assisted mirroring "
                         "(agent option --uplink)")
    assert r.mode == L.Mode.VLAN and r.vlan_id == 100
    assert t.resolve_destination(d, uplink="nope0").problem == r.problem
    up0 = ifindex(blab, "node1", "up0")
    r = t.resolve_destination(d, uplink="up0")
    assert r.problem is None and (r.out_ifindex, r.vlan_id) == (up0, 100)
    # The destination's own uplink wins over the agent's.
    d2 = Destination("nic", DeliveryMode.VLAN, vlan_id=7, uplink_ifname="ul0")
    assert t.resolve_destination(d2, uplink="up0").out_ifindex == \
        ifindex(blab, "node1", "ul0")
