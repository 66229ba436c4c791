"""The desired datapath state of one node: what the compiler produces and the datapath applies.

This is the contract between the policy compiler (Kubernetes objects -> NodeState) and
the datapath programmer (NodeState -> BPF maps). Everything here is plain, immutable
and comparable, so that two states can be diffed and a state can be printed as JSON.

Directions are named from the pod's side, as CN2's ``trafficDirection`` is:
``ingress`` is traffic into the pod, ``egress`` traffic out of it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

# The UDP port Wireshark decodes as jmirror without being told (reference/jmirror.md).
DEFAULT_JMIRROR_PORT = 30030
# CN2's analyzer port: a MirrorDestination in CN2's API group without udpPort uses it.
CN2_DEFAULT_UDP_PORT = 8099
# Mirror identifiers are 30 bits on the wire; session identifiers 32 bits.
MIRROR_ID_MAX = (1 << 30) - 1
SESSION_ID_MAX = (1 << 32) - 1


class DeliveryMode(StrEnum):
    """How a copy reaches its analyzer (one per MirrorDestination)."""

    JMIRROR = "jmirror"  # juniperHeader: true: outer IP/UDP + jmirror header, routed by FIB
    L2 = "l2"  # juniperHeader: false: the frame as-is to the analyzer's MAC
    VXLAN = "vxlan"  # nextHopMode: static: the frame in VXLAN to a fixed VTEP
    VLAN = "vlan"  # nicAssistedMirroring: the frame tagged with a VLAN out of the uplink


class Direction(StrEnum):
    INGRESS = "ingress"  # into the pod
    EGRESS = "egress"  # out of the pod
    BOTH = "both"

    def covers(self, other: Direction) -> bool:
        return self is Direction.BOTH or self is other


# How 1:N sampling chooses (docs/copy-limits.md): each packet at random, or whole flows
# by a hash of the flow's 5-tuple (agent/layout.py flow_sample_hash).
SAMPLING_BY_PACKET = "packet"
SAMPLING_BY_FLOW = "flow"
SAMPLING_MODES = (SAMPLING_BY_PACKET, SAMPLING_BY_FLOW)


@dataclass(frozen=True, order=True)
class Destination:
    """A MirrorDestination resolved to the addresses this node sends copies to."""

    name: str
    mode: DeliveryMode
    # JMIRROR: analyzer address (IPv4 or IPv6) and UDP port.
    analyzer_ip: str | None = None
    udp_port: int = DEFAULT_JMIRROR_PORT
    # L2: the analyzer's MAC; the datapath finds where it lives (or uses analyzer_ifname).
    analyzer_mac: str | None = None
    analyzer_ifname: str | None = None
    # VXLAN: remote VTEP, inner destination MAC, VNI.
    vtep_ip: str | None = None
    vtep_mac: str | None = None
    vni: int | None = None
    # VLAN: the tag and the uplink the tagged copy leaves on.
    vlan_id: int | None = None
    uplink_ifname: str | None = None
    # Which pod was chosen as the analyzer ("namespace/name"), for status and display.
    analyzer_pod: str | None = None
    # jmirror: how copies of GSO super-packets fit the path (SEGMENTS_*), and what
    # happens to a copy too large for it (OVERSIZE_*).
    segments: str = "auto"
    oversize: str = "fragment"
    # jmirror (the default) or another output format for routed copies (issue 15).
    encapsulation: Encapsulation = field(default_factory=lambda: Encapsulation())
    # Copy limits (issue 15): cut to this many bytes after the Ethernet header (0: whole);
    # one packet in `sampling` copied (1: every one); a budget of copies a second and of
    # bits a second (0: none beyond the node's).
    snap_length: int = 0
    sampling: int = 1
    sampling_mode: str = SAMPLING_BY_PACKET  # or SAMPLING_BY_FLOW
    budget_pps: int = 0
    budget_bps: int = 0


@dataclass(frozen=True, order=True)
class Sampling:
    """A policy's or rule's own sampling of its copies (this project's API group), in
    place of its destination's: ``every`` None keeps the destination's N, ``mode`` None
    its mode."""

    every: int | None = None
    mode: str | None = None

    def over(self, every: int, mode: str) -> tuple[int, str]:
        """(N, mode) of the copies: this sampling's own, the rest from (every, mode), the
        destination's."""
        return self.every or every, self.mode or mode


# Output formats of routed copies (docs/formats.md): the wrapper writes the headers.
FORMAT_JMIRROR = "jmirror"  # IP/UDP + 8-byte jmirror header + the IP packet
FORMAT_ERSPAN2 = "erspan2"  # IP/GRE (seq) + ERSPAN type II + the Ethernet frame
FORMAT_ERSPAN3 = "erspan3"  # IP/GRE (seq) + ERSPAN type III (direction, timestamp) + frame
FORMAT_GRE = "gre"  # IP/GRE (0x6558, optional key) + the Ethernet frame
FORMAT_GENEVE = "geneve"  # IP/UDP 6081 + GENEVE (option: mirror and session id) + frame
FORMAT_VXLAN = "vxlan"  # IP/UDP 4789 + VXLAN + the Ethernet frame
FORMAT_CONTRAIL = "contrail"  # IP/UDP + vRouter's TLV list ("Juniper header") + frame
FORMATS = (FORMAT_JMIRROR, FORMAT_ERSPAN2, FORMAT_ERSPAN3, FORMAT_GRE, FORMAT_GENEVE,
           FORMAT_VXLAN, FORMAT_CONTRAIL)
GENEVE_PORT = 6081
VXLAN_STANDARD_PORT = 4789
CONTRAIL_DEFAULT_NETWORK = "default-podnetwork"


@dataclass(frozen=True, order=True)
class Encapsulation:
    """How routed copies are wrapped. ``vni``: VXLAN/GENEVE (None: VXLAN carries the
    rule's mirror id, GENEVE 0); ``key``: GRE key (None: no key); ``network``: the network
    name the Contrail header carries as source and destination network."""

    format: str = FORMAT_JMIRROR
    vni: int | None = None
    key: int | None = None
    network: str | None = None


SEGMENTS_AUTO = "auto"  # exact when the path MTU takes the wire's segments wrapped, else fit
SEGMENTS_EXACT = "exact"  # copies segmented exactly as on the wire
SEGMENTS_FIT = "fit"  # segments made smaller by the overhead: every byte fits the path
SEGMENTS_CHOICES = (SEGMENTS_AUTO, SEGMENTS_EXACT, SEGMENTS_FIT)
OVERSIZE_TRUNCATE = "truncate"  # cut to fit (counted as truncated)
OVERSIZE_FRAGMENT = "fragment"  # sent whole, the outer IPv4 fragmented (counted as fragmented)
OVERSIZE_CHOICES = (OVERSIZE_TRUNCATE, OVERSIZE_FRAGMENT)


@dataclass(frozen=True, order=True)
class Cidr:
    """An address block with exceptions (a NetworkPolicy ipBlock, or a single pod IP)."""

    cidr: str
    excepts: tuple[str, ...] = ()

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.cidr, strict=False)


# An endpoint set: the union of its blocks. ANY (None) matches every address.
EndpointSet = tuple[Cidr, ...] | None
ANY: EndpointSet = None


@dataclass(frozen=True, order=True)
class PortRange:
    """A protocol and destination-port range. port_lo = port_hi = None: every port."""

    protocol: int  # IP protocol number: 6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6
    port_lo: int | None = None
    port_hi: int | None = None


@dataclass(frozen=True, order=True)
class Rule:
    """One rule of a policy, in the policy's order. The first matching rule decides.

    ``destination`` None: the rule matches (and so ends the policy's evaluation for the
    flow) but mirrors nothing.
    """

    policy: str  # "namespace/name" for a ContrailSecurityPolicy, "name" for a global one
    index: int  # position in the policy's rules
    src: EndpointSet
    dst: EndpointSet
    ports: tuple[PortRange, ...] = ()  # empty: every protocol and port
    destination: str | None = None
    mirror_id: int = 0
    sampling: Sampling | None = None  # its own sampling; None: the destination's


@dataclass(frozen=True, order=True)
class Policy:
    """A policy as this node applies it: ordered rules and the interfaces it applies to."""

    name: str
    rules: tuple[Rule, ...]
    interfaces: frozenset[str] = field(default_factory=frozenset)  # Interface.key values


@dataclass(frozen=True, order=True)
class PortMirror:
    """Port-based mirroring: every packet of an interface in a direction, no flow lookup."""

    destination: str
    direction: Direction
    mirror_id: int


@dataclass(frozen=True, order=True)
class Interface:
    """A local pod interface the datapath attaches to.

    The host-side interface is found from ``host_ifname`` when the compiler knows it
    (explicit override), else from the pod's addresses and MAC in the node's tables.
    """

    pod: str  # "namespace/name"
    pod_ifname: str = "eth0"  # the interface's name inside the pod
    session_id: int = 0
    ips: tuple[str, ...] = ()
    mac: str | None = None
    host_ifname: str | None = None
    port_mirrors: tuple[PortMirror, ...] = ()
    # True when host_ifname or the addresses come from the pod's own annotations (believed
    # because an admin trusts its namespace), not from the kubelet: a placement from them
    # is a claim, which loses an interface to a pod proven to own it (agent/node.py).
    from_annotations: bool = False

    @property
    def key(self) -> str:
        return f"{self.pod}/{self.pod_ifname}"


@dataclass(frozen=True)
class ObjectError:
    """An object the compiler could not apply, and exactly why. Nothing else is affected."""

    kind: str
    name: str
    reason: str


@dataclass(frozen=True)
class NodeState:
    """Everything the datapath of one node must do."""

    node: str
    interfaces: tuple[Interface, ...] = ()
    policies: tuple[Policy, ...] = ()  # in evaluation order
    destinations: tuple[Destination, ...] = ()
    errors: tuple[ObjectError, ...] = ()

    def interface(self, key: str) -> Interface | None:
        return next((i for i in self.interfaces if i.key == key), None)

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)
