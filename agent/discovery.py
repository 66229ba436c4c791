"""Reading the node's own tables: where a pod's host-side interface is, how an analyzer is
reached (source address, outgoing interface, MTU), which port holds a MAC address.

Works for routed CNIs (a /32 or /128 route to the pod's veth, as Calico does) and bridged
CNIs (pods on a bridge, as flannel does: the port whose veth peer holds the pod's address
in the pod's own network namespace, else the FDB port holding the pod's MAC). A pod's host
side is proven from these tables for the kubelet's addresses; what annotations claim
(trusted namespaces only) is checked against them; interfaces that cannot be a pod's
(cn2mirror's own, the loopback, bridges, uplinks) are never used (issue 11).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass, replace

from . import encap
from . import layout as L
from .netns import NETNS_DIR, iproute, run
from .programmer import ResolvedDestination, destination_mode
from .state import DeliveryMode, Destination, Interface

AF_BRIDGE = 7
IFF_LOOPBACK = 0x8
NUD_PERMANENT = 0x80
VXLAN_DEVICE = "cn2m-vxlan"
AGENT_PREFIX = "cn2m-"  # every interface cn2mirror makes (mirror port, VXLAN device)
POD_INTERFACE_KINDS = ("veth", "netkit")  # what a pod's host side can be
# IPv6 jmirror copies are checksummed in 512-byte chunks, 20 at most (bpf/mirror_port.c).
JMIRROR6_MAX_MTU = 9216


@dataclass(frozen=True)
class Route:
    oif: int
    src: str | None
    gateway: str | None


@dataclass(frozen=True)
class Placement:
    """Where a pod interface's host side is, and how that is known."""

    ifindex: int
    ifname: str
    how: str
    proven: bool  # from the node's own tables for the kubelet's addresses; else a claim
    bridge: int | None = None  # the bridge it is a port of (bridged CNIs)
    mac: str | None = None  # the pod side's MAC, when read from its namespace


def _peer_holding(netns: str, peer_index: int, host_index: int, ip: str) -> str | None:
    """The MAC of interface ``peer_index`` in ``netns`` if it holds ``ip`` and is the veth
    peer of ``host_index``; None otherwise (or if the namespace cannot be read)."""
    try:
        ipr = iproute(netns)
    except OSError:
        return None
    try:
        found = ipr.get_links(peer_index)
        if not found or found[0].get_attr("IFLA_LINK") != host_index:
            return None
        want = ipaddress.ip_address(ip)
        for a in ipr.get_addr(index=peer_index):
            addr = a.get_attr("IFA_ADDRESS")
            if addr and ipaddress.ip_address(addr) == want:
                return found[0].get_attr("IFLA_ADDRESS")
        return None
    except Exception:
        return None
    finally:
        ipr.close()


class NodeTables:
    """Lookups on one network namespace's links, routes, neighbours and bridge FDB."""

    def __init__(self, ipr, netns: str | None = None):
        self.ipr = ipr
        self.netns = netns  # the namespace ipr is in (named), for `ip netns list-id`

    # --------------------------------------------------------------- links
    def link(self, ifindex: int):
        found = self.ipr.get_links(ifindex)
        return found[0] if found else None

    def ifindex(self, ifname: str) -> int | None:
        found = self.ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    def ifname(self, ifindex: int) -> str | None:
        link = self.link(ifindex)
        return link.get_attr("IFLA_IFNAME") if link else None

    def mtu(self, ifindex: int) -> int:
        link = self.link(ifindex)
        return int(link.get_attr("IFLA_MTU")) if link else 1500

    def kind(self, ifindex: int) -> str | None:
        link = self.link(ifindex)
        if not link:
            return None
        info = link.get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info else None

    # --------------------------------------------------------------- routes, neighbours
    def route(self, dst: str) -> Route | None:
        try:
            found = self.ipr.route("get", dst=dst)
        except Exception:
            return None
        if not found:
            return None
        r = found[0]
        if r["type"] != 1:  # RTN_UNICAST only (not local, unreachable, ...)
            return None
        return Route(r.get_attr("RTA_OIF"), r.get_attr("RTA_PREFSRC"),
                     r.get_attr("RTA_GATEWAY"))

    def source_for(self, route: Route) -> str | None:
        """The copies' source address: the route's, unless that is link-local (a routed
        CNI's gateway address on the pod's veth); then a global address of the node."""
        if route.src and not ipaddress.ip_address(route.src).is_link_local:
            return route.src
        family = socket.AF_INET6 if route.src and ":" in route.src else socket.AF_INET
        for a in sorted(self.ipr.get_addr(family=family), key=lambda a: a["index"]):
            addr = a.get_attr("IFA_ADDRESS")
            if a["scope"] == 0 and addr and not ipaddress.ip_address(addr).is_link_local:
                return addr
        return route.src

    def neighbour_mac(self, ip: str) -> str | None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        for n in self.ipr.get_neighbours(family=family):
            if n.get_attr("NDA_DST") == ip and n.get_attr("NDA_LLADDR"):
                return n.get_attr("NDA_LLADDR")
        return None

    def port_of_mac(self, mac: str) -> int | None:
        """The interface a MAC lives behind: a bridge port (FDB) or a neighbour's link."""
        mac = mac.lower()
        for n in self.ipr.get_neighbours(family=AF_BRIDGE):
            if (n.get_attr("NDA_LLADDR") or "").lower() == mac and n.get_attr("NDA_MASTER"):
                return n["ifindex"]
        for family in (socket.AF_INET, socket.AF_INET6):
            for n in self.ipr.get_neighbours(family=family):
                if (n.get_attr("NDA_LLADDR") or "").lower() == mac:
                    return n["ifindex"]
        return None

    # --------------------------------------------------------------- pods
    def host_interface(self, iface: Interface) -> tuple[int | None, str]:
        """The pod interface's host-side ifindex, and how it was found (or why not)."""
        found = self.place(iface)
        if isinstance(found, str):
            return None, found
        return found.ifindex, found.how

    def place(self, iface: Interface, previous: Placement | None = None) -> Placement | str:
        """Where the pod interface's host side is, proven from the node's own tables (or
        claimed by annotations an admin vouches for), or exactly why it cannot be placed.

        ``previous``: where it was placed last time. A bridged pod stays on that port while
        the port exists unchanged and is still on the bridge, so an expired neighbour or
        FDB entry never detaches it (issue 13)."""
        proven = not iface.from_annotations
        if iface.host_ifname:
            idx = self.ifindex(iface.host_ifname)
            if not idx:
                return f"no interface {iface.host_ifname}"
            return self._checked(Placement(idx, iface.host_ifname, "explicit", False), iface)
        looked: list[str] = []
        for ip in iface.ips:
            route = self.route(ip)
            if not route or route.gateway:
                continue  # no route, or the pod is behind a gateway: not on this node
            if self.kind(route.oif) != "bridge":
                how = f"route to {ip}"
                if previous is not None and (previous.ifindex, previous.how, previous.proven,
                                             previous.bridge) == (route.oif, how, proven, None) \
                        and self._unchanged(previous):
                    return previous  # checked when first placed, and the same one since
                return self._checked(Placement(route.oif, self.ifname(route.oif) or "", how,
                                               proven), iface)
            found = self._bridged(route.oif, ip, iface, previous, looked)
            if found is not None:
                return self._checked(replace(found, proven=proven), iface)
        if looked:
            return "; ".join(looked)
        if not iface.ips:
            return "the pod has no IP address yet"
        return f"no local route to {', '.join(iface.ips)}"

    def _bridged(self, bridge: int, ip: str, iface: Interface, previous: Placement | None,
                 looked: list[str]) -> Placement | None:
        """The port of ``bridge`` that leads to the pod with address ``ip``. In order: the
        port placed last time (while it is unchanged and still on the bridge), the port
        whose veth peer holds ``ip`` in its own network namespace, the FDB port holding the
        pod's MAC (annotated and believed, or the node's neighbour entry for ``ip``)."""
        bridge_name = self.ifname(bridge)
        if previous is not None and previous.bridge == bridge and self._unchanged(previous):
            return previous
        peer = self.veth_peer_holding(bridge, ip)
        if isinstance(peer, Placement):
            return peer
        macs = [(iface.mac, "the pod's annotated MAC")] if iface.mac else []
        neighbour = self.neighbour_mac(ip)
        if neighbour and neighbour != iface.mac:
            macs.append((neighbour, f"the node's neighbour entry for {ip}"))
        for mac, source in macs:
            port = self._bridge_port(bridge, mac)
            if port:
                return Placement(port, self.ifname(port) or "", f"bridge port holding {mac}",
                                 True, bridge=bridge)
            looked.append(f"{ip} is behind bridge {bridge_name}; {source}, {mac}, is not in "
                          f"its FDB")
        if not neighbour:
            looked.append(f"{ip} is behind bridge {bridge_name}; the node has no neighbour "
                          f"entry for it")
        looked.append(peer)
        return None

    def veth_peer_holding(self, bridge: int, ip: str) -> Placement | str:
        """The port of ``bridge`` whose veth peer, in its own network namespace, holds
        ``ip``; the kernel says which namespace each peer is in (IFLA_LINK_NETNSID), and
        ``ip netns list-id`` which named namespace (/var/run/netns) that id is."""
        ports = [link for link in self.ipr.get_links()
                 if link.get_attr("IFLA_MASTER") == bridge
                 and link.get_attr("IFLA_LINK_NETNSID") is not None
                 and link.get_attr("IFLA_LINK") is not None]
        if not ports:
            return f"no port of bridge {self.ifname(bridge)} is a veth into another namespace"
        names = self.netns_names()
        found, unnamed = [], 0
        for link in ports:
            name = names.get(link.get_attr("IFLA_LINK_NETNSID"))
            if name is None:
                unnamed += 1
                continue
            mac = _peer_holding(name, link.get_attr("IFLA_LINK"), link["index"], ip)
            if mac:
                found.append(Placement(link["index"], link.get_attr("IFLA_IFNAME"),
                                       f"veth peer in namespace {name} holds {ip}", True,
                                       bridge=bridge, mac=mac))
        if len(found) == 1:
            return found[0]
        if found:
            return (f"the veth peers of {', '.join(p.ifname for p in found)} all hold {ip}: "
                    f"ambiguous")
        missing = f" ({unnamed} in namespaces not under {NETNS_DIR})" if unnamed else ""
        return f"no veth peer of the {len(ports)} ports of bridge {self.ifname(bridge)} " \
               f"holds {ip}{missing}"

    def netns_names(self) -> dict[int, str]:
        """nsid (as this namespace numbers them) -> name under /var/run/netns."""
        r = run(self.netns, "ip", "-j", "netns", "list-id", check=False)
        try:
            return {e["nsid"]: e["name"] for e in json.loads(r.stdout or "[]")
                    if "name" in e and "nsid" in e}
        except (ValueError, TypeError, KeyError):
            return {}

    def _unchanged(self, placed: Placement) -> bool:
        """Whether the interface of a placement is still there, the same one, where it was."""
        link = self.link(placed.ifindex)
        if link is None or link.get_attr("IFLA_IFNAME") != placed.ifname:
            return False
        return placed.bridge is None or link.get_attr("IFLA_MASTER") == placed.bridge

    def _checked(self, placed: Placement, iface: Interface) -> Placement | str:
        """The placement, unless the interface cannot be a pod's, or (for a claim from
        annotations) the node's tables say it is another pod's."""
        why = self.not_a_pod_interface(placed.ifindex)
        if why:
            return f"{why} ({placed.how})"
        if not placed.proven:
            why = self._contradiction(placed.ifindex, iface)
            if why:
                return f"{why} ({placed.how})"
        return placed

    def not_a_pod_interface(self, ifindex: int) -> str | None:
        """Why an interface cannot be a pod's host side, if it cannot: cn2mirror's own
        (the mirror port, the VXLAN device), the loopback, a bridge, a tunnel, a physical
        device or any other kind than veth/netkit, or one holding the node's addresses or
        its routes through a gateway (an uplink)."""
        link = self.link(ifindex)
        if link is None:
            return f"no interface {ifindex}"
        name = link.get_attr("IFLA_IFNAME") or str(ifindex)
        if name.startswith(AGENT_PREFIX) or name == VXLAN_DEVICE:
            return f"{name} is cn2mirror's own interface"
        if link["flags"] & IFF_LOOPBACK:
            return f"{name} is the loopback"
        kind = self.kind(ifindex)
        if kind not in POD_INTERFACE_KINDS:
            return f"{name} is a {kind or 'physical'} device, not a pod's host-side veth"
        for a in self.ipr.get_addr(index=ifindex):
            addr = a.get_attr("IFA_ADDRESS")
            if addr and a["scope"] == 0 and not ipaddress.ip_address(addr).is_link_local:
                return f"{name} holds the node's address {addr}: not a pod's interface"
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in self.ipr.get_routes(family=family, oif=ifindex):
                if r.get_attr("RTA_GATEWAY"):
                    return f"{name} carries routes through gateway " \
                           f"{r.get_attr('RTA_GATEWAY')}: an uplink, not a pod's interface"
        return None

    def _contradiction(self, ifindex: int, iface: Interface) -> str | None:
        """What in the node's tables says this interface leads to another pod: a host
        route to an address that is not this interface's, or a MAC learned on the port
        that is not its own."""
        name = self.ifname(ifindex)
        own = {ipaddress.ip_address(ip) for ip in iface.ips}
        for family, host in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
            for r in self.ipr.get_routes(family=family, oif=ifindex):
                dst = r.get_attr("RTA_DST")
                if r["type"] != 1 or not dst or r["dst_len"] != host:
                    continue  # unicast host routes only (not the local table's own)
                if ipaddress.ip_address(dst) not in own:
                    return f"the node routes {dst} to {name}: another pod's interface"
        mac = (iface.mac or "").lower()
        for n in self.ipr.get_neighbours(family=AF_BRIDGE, ifindex=ifindex):
            learned = (n.get_attr("NDA_LLADDR") or "").lower()
            if n.get_attr("NDA_MASTER") and not n["state"] & NUD_PERMANENT and learned and \
                    learned != mac:
                return f"bridge port {name} leads to MAC {learned}, not this interface's"
        return None

    def _bridge_port(self, bridge: int, mac: str) -> int | None:
        mac = mac.lower()
        for n in self.ipr.get_neighbours(family=AF_BRIDGE):
            if (n.get_attr("NDA_LLADDR") or "").lower() == mac and \
                    n.get_attr("NDA_MASTER") == bridge:
                return n["ifindex"]
        return None

    # --------------------------------------------------------------- destinations
    def ensure_vxlan_device(self) -> int:
        """A VXLAN device in metadata mode: the wrapper sets VNI and VTEP per copy."""
        idx = self.ifindex(VXLAN_DEVICE)
        if idx:
            return idx
        self.ipr.link("add", ifname=VXLAN_DEVICE, kind="vxlan", vxlan_collect_metadata=1,
                      vxlan_port=L.VXLAN_PORT, vxlan_learning=0)
        idx = self.ifindex(VXLAN_DEVICE)
        self.ipr.link("set", index=idx, state="up")
        return idx

    @staticmethod
    def _resolve_format(d: Destination, src: str | None, mtu: int,
                        oif: int) -> ResolvedDestination:
        """A routed destination in another output format than jmirror (IPv4 outer)."""
        enc = d.encapsulation
        port = encap.udp_port_of(enc, d.udp_port)
        mode = L.Mode.ENCAP4
        if ":" in (d.analyzer_ip or "") or not src or ":" in src:
            return ResolvedDestination(
                mode, d.analyzer_ip, src, port,
                problem=f"format {enc.format} is sent over IPv4 only; analyzer "
                        f"{d.analyzer_ip} is reached over IPv6")
        entry = encap.template(enc, src, d.analyzer_ip, d.udp_port)
        return ResolvedDestination(mode, d.analyzer_ip, src, port, mtu=mtu, out_ifindex=oif,
                                   encap=bytes(entry))

    def resolve_destination(self, d: Destination,
                            uplink: str | None = None) -> ResolvedDestination:
        mode = destination_mode(d)
        if d.mode == DeliveryMode.JMIRROR:
            route = self.route(d.analyzer_ip) if d.analyzer_ip else None
            if not route:
                return ResolvedDestination(mode, d.analyzer_ip, None, d.udp_port,
                                           problem=f"no route to analyzer {d.analyzer_ip}")
            mtu = self.mtu(route.oif)
            if mode == L.Mode.JMIRROR6:
                mtu = min(mtu, JMIRROR6_MAX_MTU)
            src = self.source_for(route)
            if mode == L.Mode.ENCAP4:
                return self._resolve_format(d, src, mtu, route.oif)
            return ResolvedDestination(mode, d.analyzer_ip, src,
                                       d.udp_port, mtu=mtu, out_ifindex=route.oif)
        if d.mode == DeliveryMode.L2:
            idx = self.ifindex(d.analyzer_ifname) if d.analyzer_ifname else None
            if idx and self.not_a_pod_interface(idx):
                idx = None  # never the mirror port, an uplink or a bridge: find it by MAC
            if not idx and d.analyzer_mac:
                idx = self.port_of_mac(d.analyzer_mac)
            if not idx and d.analyzer_ip:
                route = self.route(d.analyzer_ip)
                idx = route.oif if route and not route.gateway else None
            if not idx:
                return ResolvedDestination(mode, mac=d.analyzer_mac,
                                           problem=f"analyzer MAC {d.analyzer_mac} not found "
                                                   "on this node")
            return ResolvedDestination(mode, mac=d.analyzer_mac, mtu=self.mtu(idx),
                                       out_ifindex=idx)
        if d.mode == DeliveryMode.VXLAN:
            idx = self.ensure_vxlan_device()
            route = self.route(d.vtep_ip)
            return ResolvedDestination(
                mode, d.vtep_ip, route.src if route else None, L.VXLAN_PORT,
                mtu=self.mtu(idx), out_ifindex=idx, mac=d.vtep_mac, vni=d.vni or 0,
                problem=None if route else f"no route to VTEP {d.vtep_ip}")
        # VLAN: the tagged copy leaves on the uplink.
        name = d.uplink_ifname or uplink
        idx = self.ifindex(name) if name else None
        if not idx:
            return ResolvedDestination(mode, vlan_id=d.vlan_id or 0,
                                       problem="no uplink interface for NIC-assisted "
                                               "mirroring (agent option --uplink)")
        return ResolvedDestination(mode, vlan_id=d.vlan_id or 0, mtu=self.mtu(idx),
                                   out_ifindex=idx)
