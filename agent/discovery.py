"""Reading the node's own tables: where a pod's host-side interface is, how an analyzer is
reached (source address, outgoing interface, MTU), which port holds a MAC address.

Works for routed CNIs (a /32 or /128 route to the pod's veth, as Calico does) and bridged
CNIs (pods on a bridge, as flannel does: the bridge port that holds the pod's MAC).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from . import layout as L
from .programmer import ResolvedDestination, destination_mode
from .state import DeliveryMode, Destination, Interface

AF_BRIDGE = 7
VXLAN_DEVICE = "cn2m-vxlan"
# IPv6 jmirror copies are checksummed in 512-byte chunks, 20 at most (bpf/mirror_port.c).
JMIRROR6_MAX_MTU = 9216


@dataclass(frozen=True)
class Route:
    oif: int
    src: str | None
    gateway: str | None


class NodeTables:
    """Lookups on one network namespace's links, routes, neighbours and bridge FDB."""

    def __init__(self, ipr):
        self.ipr = ipr

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
        if iface.host_ifname:
            idx = self.ifindex(iface.host_ifname)
            return (idx, "explicit") if idx else (None, f"no interface {iface.host_ifname}")
        for ip in iface.ips:
            route = self.route(ip)
            if not route or route.gateway:
                continue  # no route, or the pod is behind a gateway: not on this node
            if self.kind(route.oif) != "bridge":
                return route.oif, f"route to {ip}"
            mac = iface.mac or self.neighbour_mac(ip)
            if mac:
                port = self._bridge_port(route.oif, mac)
                if port:
                    return port, f"bridge port holding {mac}"
            return None, f"{ip} is behind bridge {self.ifname(route.oif)} but its MAC is " \
                         "not in the bridge's FDB yet"
        if not iface.ips:
            return None, "the pod has no IP address yet"
        return None, f"no local route to {', '.join(iface.ips)}"

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
            return ResolvedDestination(mode, d.analyzer_ip, self.source_for(route),
                                       d.udp_port, mtu=mtu, out_ifindex=route.oif)
        if d.mode == DeliveryMode.L2:
            idx = self.ifindex(d.analyzer_ifname) if d.analyzer_ifname else None
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
