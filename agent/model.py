"""The Kubernetes objects cn2mirror reads, parsed and validated into typed Python.

Every ``parse_*`` function takes one object as a plain dict (as YAML or the API gives it)
and returns an immutable dataclass, or raises :class:`ModelError` naming the field at
fault (``spec.rules[1].ports[0].endPort: ...``). Parsing applies the CRDs' defaults, so
an object read from a file means the same as one the API server has defaulted, and it
checks everything the CRDs' schemas and CEL rules check (manifests/crds/generate.py
builds those schemas from the constants below).

Field names are CN2's; the objects are accepted under this project's API group and under
CN2's own (``core.contrail.juniper.net``, versions ``v1alpha1`` and ``v4``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .layout import (
    BUDGET_BPS_MAX,
    BUDGET_BPS_MIN,
    BUDGET_PPS_MAX,
    SAMPLING_MAX,
    SNAP_LENGTH_MAX,
    SNAP_LENGTH_MIN,
)
from .protocols import API_NUMBERS
from .state import (
    CN2_DEFAULT_UDP_PORT,
    CONTRAIL_DEFAULT_NETWORK,
    DEFAULT_JMIRROR_PORT,
    FORMAT_CONTRAIL,
    FORMAT_GENEVE,
    FORMAT_GRE,
    FORMAT_JMIRROR,
    FORMAT_VXLAN,
    FORMATS,
    OVERSIZE_CHOICES,
    OVERSIZE_FRAGMENT,
    SAMPLING_BY_PACKET,
    SAMPLING_MODES,
    SEGMENTS_AUTO,
    SEGMENTS_CHOICES,
    DeliveryMode,
    Direction,
    Encapsulation,
    Sampling,
)

# --- API groups and kinds -------------------------------------------------------------

GROUP = "mirror.cn2mirror.io"
CN2_GROUP = "core.contrail.juniper.net"
GROUP_VERSIONS = {GROUP: ("v1alpha1",), CN2_GROUP: ("v1alpha1", "v4")}

KIND_MD = "MirrorDestination"
KIND_CSP = "ContrailSecurityPolicy"
KIND_GCSP = "GlobalContrailSecurityPolicy"
KIND_POD = "Pod"
KIND_NAMESPACE = "Namespace"
MIRROR_KINDS = (KIND_MD, KIND_CSP, KIND_GCSP)
NAMESPACED_KINDS = frozenset({KIND_CSP, KIND_POD})

# apiVersions accepted per kind, in order of preference when one object is given under
# several (this project's group first, then CN2's storage version).
API_VERSIONS: dict[str, tuple[str, ...]] = {
    KIND_POD: ("v1",),
    KIND_NAMESPACE: ("v1",),
    **{
        kind: tuple(f"{g}/{v}" for g in (GROUP, CN2_GROUP) for v in reversed(GROUP_VERSIONS[g]))
        for kind in MIRROR_KINDS
    },
}

# --- CN2's labels and annotations, and this project's own --------------------------------

LABEL_ANALYZER_SELECTOR = "core.juniper.net/analyzer-pod-selector"  # on a MirrorDestination
LABEL_ANALYZER_POD = "core.juniper.net/analyzer-pod"  # on analyzer pods
ANN_ANALYZER_INTERFACE = "core.juniper.net/analyzer-interface"  # pod annotation or cni-args
ANN_MIRROR_DESTINATION = "core.juniper.net/mirror-destination"  # pod annotation or cni-args
ANN_MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"
ANN_MULTUS_STATUS = "k8s.v1.cni.cncf.io/network-status"
ANN_MAC = "cn2mirror.io/mac"  # the default interface's MAC, when no network-status gives it
ANN_HOST_INTERFACE = "cn2mirror.io/host-interface"  # host side of the default interface
# How jmirror copies fit the path to the analyzer: fields of this project's
# MirrorDestination (spec.copySegments, spec.copyTooLarge); for CN2's group, whose fields
# stay CN2's, these annotations on the MirrorDestination.
ANN_COPY_SEGMENTS = "cn2mirror.io/copy-segments"
ANN_COPY_TOO_LARGE = "cn2mirror.io/copy-too-large"
# The output format of routed copies: spec.encapsulation in this project's group; in
# CN2's, this annotation: a format name ("erspan3") or the same object as JSON
# ('{"format": "geneve", "vni": 7}').
ANN_ENCAPSULATION = "cn2mirror.io/encapsulation"
# Copy limits (issue 15): spec.snapLength, spec.sampling, spec.copyBudget
# {packetsPerSecond, bitsPerSecond} in this project's group; these annotations in CN2's.
ANN_SNAP_LENGTH = "cn2mirror.io/snap-length"
ANN_SAMPLING = "cn2mirror.io/sampling"
ANN_SAMPLING_MODE = "cn2mirror.io/sampling-mode"  # packet (the default) or flow
ANN_BUDGET_PPS = "cn2mirror.io/copy-budget-pps"
ANN_BUDGET_BPS = "cn2mirror.io/copy-budget-bps"
LABEL_NAMESPACE_NAME = "kubernetes.io/metadata.name"  # set on every namespace by Kubernetes
# Who decides where copies go (issue 11). Namespaces and MirrorDestinations are
# cluster-scoped, so only cluster admins write these; a pod's owner writes its pods'
# labels and annotations, which cn2mirror therefore never trusts for these decisions.
# A namespace whose pods may be analyzers of every MirrorDestination:
LABEL_ANALYZER_NAMESPACE = "cn2mirror.io/analyzer-namespace"
# On a MirrorDestination (either API group): "ns1,ns2", namespaces whose pods may be its
# analyzer (CN2's group has no spec field for it; ours also has spec.analyzerNamespaces).
ANN_ANALYZER_NAMESPACES = "cn2mirror.io/analyzer-namespaces"
# A namespace whose pods' own network annotations (Multus network-status, cn2mirror.io/mac,
# cn2mirror.io/host-interface) are believed as if the node had reported them:
LABEL_TRUSTED_NETWORK_ANNOTATIONS = "cn2mirror.io/trusted-network-annotations"
NAMESPACE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # DNS-1123 label
NAMESPACE_NAME_MAX_LENGTH = 63
ANALYZER_NAMESPACES_MAX = 64

# --- Enumerations, defaults and ranges (the CRDs use these) ------------------------------

PROTOCOLS = API_NUMBERS  # "TCP" -> 6 (agent/protocols.py: the one table)
PORTLESS_PROTOCOLS = frozenset({"ICMP", "ICMPv6"})  # an extension: NetworkPolicy has neither
DEFAULT_PROTOCOL = "TCP"
ACTIONS = ("pass", "deny")  # accepted for CN2 compatibility; cn2mirror only mirrors
DEFAULT_ACTION = "pass"
NEXT_HOP_DYNAMIC = "dynamic"
NEXT_HOP_STATIC = "static"
NEXT_HOP_MODES = (NEXT_HOP_DYNAMIC, NEXT_HOP_STATIC)
DIRECTIONS = tuple(d.value for d in Direction)
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

DEFAULT_JUNIPER_HEADER = True
DEFAULT_UDP_PORT = DEFAULT_JMIRROR_PORT  # this project's group: Wireshark's jmirror port
CN2_UDP_PORT = CN2_DEFAULT_UDP_PORT  # CN2's group (and the contrail format): CN2's 8099
ENCAP_FORMATS = FORMATS
GRE_KEY_MIN, GRE_KEY_MAX = 0, (1 << 32) - 1
# The Contrail header's network names: printable ASCII, short enough for one TLV each
# within the header the datapath writes (agent/layout.py CONTRAIL_TLV_MAX).
CONTRAIL_NETWORK_PATTERN = r"^[!-~]{1,40}$"
DEFAULT_DIRECTION = Direction.BOTH
DEFAULT_NEXT_HOP_MODE = NEXT_HOP_DYNAMIC

PORT_MIN, PORT_MAX = 1, 65535
VXLAN_ID_MIN, VXLAN_ID_MAX = 0, (1 << 24) - 1
VLAN_ID_MIN, VLAN_ID_MAX = 1, 4094

# DNS-1123 subdomain: the names of MirrorDestinations (and of every Kubernetes object).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
NAME_MAX_LENGTH = 253
# IANA service name, as a named container port: lower-case letters, digits and inner
# hyphens, at least one letter (written without look-ahead, which the API server's RE2
# lacks). The rule against two hyphens in a row is checked in Python only.
PORT_NAME_PATTERN = r"^([0-9][-0-9]*)?[a-z]([-a-z0-9]*[a-z0-9])?$"
PORT_NAME_MAX_LENGTH = 15
MAC_PATTERN = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"


class ModelError(ValueError):
    """An object that cannot be parsed; the message starts with the offending field."""


# --- Parsed objects ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaticNextHop:
    vtep_ip: str
    vxlan_id: int
    vtep_mac: str | None = None


@dataclass(frozen=True, slots=True)
class MirrorDestination:
    name: str
    api_version: str = API_VERSIONS[KIND_MD][0]
    analyzer_selector: str | None = None  # value of the analyzer-pod-selector label
    juniper_header: bool = DEFAULT_JUNIPER_HEADER
    udp_port: int = DEFAULT_UDP_PORT
    traffic_direction: Direction = DEFAULT_DIRECTION
    next_hop_mode: str = DEFAULT_NEXT_HOP_MODE
    static_next_hop: StaticNextHop | None = None
    nic_assisted_mirroring: bool = False
    nic_assisted_vlan_id: int | None = None
    external_analyzer: bool = False
    analyzer_ip: str | None = None
    # Namespaces an admin allows this destination's analyzer pods in (spec field of this
    # project's group, or the ANN_ANALYZER_NAMESPACES annotation), sorted.
    analyzer_namespaces: tuple[str, ...] = ()
    copy_segments: str = SEGMENTS_AUTO  # GSO copies: auto, exact or fit (agent/state.py)
    copy_too_large: str = OVERSIZE_FRAGMENT  # a copy too large for the path: fragment, truncate
    # The output format of routed copies (spec.encapsulation or ANN_ENCAPSULATION).
    encapsulation: Encapsulation = field(default_factory=Encapsulation)
    snap_length: int = 0  # copies cut to this many bytes after the Ethernet header; 0: whole
    sampling: int = 1  # one packet (or flow) in N copied
    sampling_mode: str = SAMPLING_BY_PACKET  # at random per packet, or whole flows by hash
    budget_pps: int = 0  # copies a second to this destination; 0: only the node's budget
    budget_bps: int = 0  # bits a second of mirrored packets; 0: only the node's budget

    @property
    def mode(self) -> DeliveryMode:
        # Validation leaves at most one of NIC assistance and a static next hop set.
        if self.nic_assisted_mirroring:
            return DeliveryMode.VLAN
        if self.next_hop_mode == NEXT_HOP_STATIC:
            return DeliveryMode.VXLAN
        return DeliveryMode.JMIRROR if self.juniper_header else DeliveryMode.L2


@dataclass(frozen=True, slots=True)
class Requirement:
    """One matchExpressions entry of a label selector."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values  # NotIn


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes label selector; the empty selector matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )


@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: str  # normalized (host bits cleared)
    excepts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Peer:
    """A selector entry (``selectors``) or an endpoint (``endPoints``).

    A missing pod selector means every pod of the scope; a missing namespace selector
    means the policy's own namespace for a ContrailSecurityPolicy and every namespace
    for a GlobalContrailSecurityPolicy. ``ip_block`` is never combined with selectors.
    """

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True, slots=True)
class PolicyPort:
    """A Kubernetes NetworkPolicyPort; ``port`` is a number, a port name or None (all)."""

    protocol: str = DEFAULT_PROTOCOL
    port: int | str | None = None
    end_port: int | None = None

    @property
    def protocol_number(self) -> int:
        return PROTOCOLS[self.protocol]


@dataclass(frozen=True, slots=True)
class PolicyRule:
    src: tuple[Peer, ...] | None = None  # None: any address
    dst: tuple[Peer, ...] | None = None
    ports: tuple[PolicyPort, ...] = ()  # empty: every protocol and port
    mirror_to: str | None = None  # rule-level secondaryActions.mirrorTo
    action: str | None = None
    # secondaryActions.sampling and .samplingMode (this project's group): the rule's own
    # sampling of the copies its mirrorTo makes, in place of the destination's.
    sampling: Sampling | None = None


@dataclass(frozen=True, slots=True)
class SecurityPolicy:
    """A ContrailSecurityPolicy (namespace set) or GlobalContrailSecurityPolicy (None)."""

    kind: str
    name: str
    namespace: str | None = None
    api_version: str = ""
    selectors: tuple[Peer, ...] = ()  # empty: every pod of the scope
    action: str = DEFAULT_ACTION
    mirror_to: str | None = None  # policy-level secondaryActions.mirrorTo
    rules: tuple[PolicyRule, ...] = ()
    sampling: Sampling | None = None  # policy-level secondaryActions.sampling(Mode)

    @property
    def key(self) -> str:
        """The name NodeState uses: "namespace/name", or "name" for a global policy."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str
    protocol: str
    number: int


@dataclass(frozen=True, slots=True)
class PodInterface:
    name: str  # the name inside the pod
    default: bool = True  # the cluster network's interface (else a Multus one)
    ips: tuple[str, ...] = ()
    mac: str | None = None
    network: str | None = None  # the Multus network "namespace/name" of a secondary one
    mirror_to: str | None = None  # port mirroring to this MirrorDestination
    analyzer: bool = False  # marked as the analyzer's receiving interface
    host_ifname: str | None = None
    # Whether ips come only from the pod's own network-status annotation rather than from
    # the kubelet (status.podIPs). Such addresses, like mac and host_ifname (always from
    # annotations), are believed only in a namespace labelled
    # LABEL_TRUSTED_NETWORK_ANNOTATIONS.
    ips_from_annotations: bool = False


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    node: str | None = None
    phase: str | None = None
    host_network: bool = False
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    interfaces: tuple[PodInterface, ...] = ()  # the default one first, then Multus order
    container_ports: tuple[ContainerPort, ...] = ()
    # Annotation problems: reported as errors on the pod, the rest of it is still used.
    problems: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def terminal(self) -> bool:
        """A finished pod: its addresses may already belong to another pod."""
        return self.phase in ("Succeeded", "Failed")

    @property
    def ips(self) -> tuple[str, ...]:
        """status.podIPs: the addresses of the default interface."""
        return self.interfaces[0].ips if self.interfaces else ()

    def analyzer_interface(self) -> PodInterface:
        """The interface marked with core.juniper.net/analyzer-interface, else the default."""
        return next((i for i in self.interfaces if i.analyzer), self.interfaces[0])


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)


# --- Field access helpers ----------------------------------------------------------------


def _fail(path: str, message: str) -> ModelError:
    return ModelError(f"{path}: {message}" if path else message)


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(path, f"must be a mapping, not {type(value).__name__}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(path, f"must be a list, not {type(value).__name__}")
    return value


def _typed(m: Mapping[str, Any], key: str, path: str, kind: type, default: Any = None) -> Any:
    """m[key] checked to be of ``kind`` (bool is not an int here), or default if absent."""
    value = m.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(_join(path, key), f"must be {kind.__name__}, not {type(value).__name__}")
    return value


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _in_range(value: int | None, lo: int, hi: int, path: str) -> int | None:
    if value is not None and not lo <= value <= hi:
        raise _fail(path, f"must be between {lo} and {hi}, not {value}")
    return value


def _enum(value: str | None, allowed: tuple[str, ...], path: str) -> str | None:
    if value is not None and value not in allowed:
        raise _fail(path, f"must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _ip(value: str | None, path: str) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _fail(path, f"{value!r} is not an IPv4 or IPv6 address") from None


def _cidr(value: str, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _fail(path, f"{value!r} is not a CIDR") from None


def _mac(value: str | None, path: str) -> str | None:
    if value is None:
        return None
    if not re.match(MAC_PATTERN, value):
        raise _fail(path, f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return value.lower()


def _name(value: str | None, path: str) -> str | None:
    if value is not None and (len(value) > NAME_MAX_LENGTH or not re.match(NAME_PATTERN, value)):
        raise _fail(path, f"{value!r} is not a valid object name")
    return value


def _metadata(obj: Mapping[str, Any], kind: str) -> tuple[str, str | None, Mapping[str, Any]]:
    """(name, namespace, metadata); namespace "default" when a namespaced object has none."""
    meta = _mapping(obj.get("metadata"), "metadata")
    name = _typed(meta, "name", "metadata", str)
    if not name:
        raise _fail("metadata.name", "is required")
    namespace = None
    if kind in NAMESPACED_KINDS:
        namespace = _typed(meta, "namespace", "metadata", str) or "default"
    return name, namespace, meta


def _api_version(obj: Mapping[str, Any], kind: str) -> str:
    version = obj.get("apiVersion")
    if version not in API_VERSIONS[kind]:
        raise _fail("apiVersion", f"{kind} is served as {', '.join(API_VERSIONS[kind])}, "
                    f"not {version!r}")
    return version


def _string_map(value: Any, path: str) -> dict[str, str]:
    m = _mapping(value, path)
    for k, v in m.items():
        if not isinstance(v, str):
            raise _fail(_join(path, str(k)), f"must be a string, not {type(v).__name__}")
    return {str(k): v for k, v in m.items()}


# --- MirrorDestination -------------------------------------------------------------------


def parse_mirror_destination(obj: Mapping[str, Any]) -> MirrorDestination:
    name, _, meta = _metadata(obj, KIND_MD)
    api_version = _api_version(obj, KIND_MD)
    labels = _string_map(meta.get("labels"), "metadata.labels")
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    spec = _mapping(obj.get("spec"), "spec")
    p = "spec"

    juniper_header = _typed(spec, "juniperHeader", p, bool, DEFAULT_JUNIPER_HEADER)
    own_group = api_version.startswith(GROUP + "/")
    if own_group:
        encap = _encapsulation(spec.get("encapsulation"), "spec.encapsulation")
    else:
        encap = _annotated_encapsulation(annotations.get(ANN_ENCAPSULATION))
    # CN2's group without udpPort reaches the analyzer as CN2 would (8099); this
    # project's group keeps 30030 (both are the CRDs' defaults).
    udp_port = _typed(spec, "udpPort", p, int, DEFAULT_UDP_PORT if own_group else CN2_UDP_PORT)
    _in_range(udp_port, PORT_MIN, PORT_MAX, "spec.udpPort")
    direction = _typed(spec, "trafficDirection", p, str, DEFAULT_DIRECTION.value)
    _enum(direction, DIRECTIONS, "spec.trafficDirection")
    mode = _typed(spec, "nextHopMode", p, str, DEFAULT_NEXT_HOP_MODE)
    _enum(mode, NEXT_HOP_MODES, "spec.nextHopMode")
    nic = _typed(spec, "nicAssistedMirroring", p, bool, False)
    vlan = _typed(spec, "nicAssistedVlanID", p, int)
    _in_range(vlan, VLAN_ID_MIN, VLAN_ID_MAX, "spec.nicAssistedVlanID")
    external = _typed(spec, "externalAnalyzer", p, bool, False)
    analyzer_ip = _ip(_typed(spec, "analyzerIP", p, str), "spec.analyzerIP")

    namespaces = [
        _namespace_name(n, f"spec.analyzerNamespaces[{i}]")
        for i, n in enumerate(_list(spec.get("analyzerNamespaces"), "spec.analyzerNamespaces"))]
    annotated = annotations.get(ANN_ANALYZER_NAMESPACES)
    if annotated is not None:
        where = f"metadata.annotations.{ANN_ANALYZER_NAMESPACES}"
        if not isinstance(annotated, str):
            raise _fail(where, "must be a comma-separated string of namespace names")
        namespaces += [_namespace_name(n.strip(), where) for n in annotated.split(",")
                       if n.strip()]
    if len(set(namespaces)) > ANALYZER_NAMESPACES_MAX:
        raise _fail("spec.analyzerNamespaces", f"at most {ANALYZER_NAMESPACES_MAX} namespaces")
    # How copies fit the path: fields in this project's group, annotations in CN2's.
    if api_version.startswith(GROUP + "/"):
        segments = _typed(spec, "copySegments", p, str, SEGMENTS_AUTO)
        _enum(segments, SEGMENTS_CHOICES, "spec.copySegments")
        too_large = _typed(spec, "copyTooLarge", p, str, OVERSIZE_FRAGMENT)
        _enum(too_large, OVERSIZE_CHOICES, "spec.copyTooLarge")
    else:
        notes = _string_map(meta.get("annotations"), "metadata.annotations")
        segments = notes.get(ANN_COPY_SEGMENTS, SEGMENTS_AUTO)
        _enum(segments, SEGMENTS_CHOICES, f"metadata.annotations[{ANN_COPY_SEGMENTS}]")
        too_large = notes.get(ANN_COPY_TOO_LARGE, OVERSIZE_FRAGMENT)
        _enum(too_large, OVERSIZE_CHOICES, f"metadata.annotations[{ANN_COPY_TOO_LARGE}]")
    limits = _copy_limits(spec, meta, api_version.startswith(GROUP + "/"))

    static = None
    if "staticNextHopHeader" in spec:
        static = _static_next_hop(spec["staticNextHopHeader"], "spec.staticNextHopHeader")

    # The same rules as the CRD's x-kubernetes-validations (manifests/crds/generate.py).
    if mode == NEXT_HOP_STATIC:
        if static is None:
            raise _fail(p, "nextHopMode static requires staticNextHopHeader")
        if juniper_header:
            raise _fail(p, "nextHopMode static carries the raw frame in VXLAN: "
                        "it requires juniperHeader false")
    if external and analyzer_ip is None:
        raise _fail(p, "externalAnalyzer requires analyzerIP")
    if nic and vlan is None:
        raise _fail(p, "nicAssistedMirroring requires nicAssistedVlanID")
    if nic and mode == NEXT_HOP_STATIC:
        raise _fail(p, "nicAssistedMirroring and nextHopMode static are exclusive")
    if external and (nic or mode == NEXT_HOP_STATIC):
        raise _fail(p, "externalAnalyzer cannot be combined with nextHopMode static "
                    "or nicAssistedMirroring")
    if encap.format != FORMAT_JMIRROR and (not juniper_header or mode == NEXT_HOP_STATIC
                                           or nic):
        where = "spec.encapsulation" if own_group else \
            f"metadata.annotations[{ANN_ENCAPSULATION}]"
        raise _fail(where, f"format {encap.format} wraps copies routed to the analyzer's IP: "
                    "it needs juniperHeader true, nextHopMode dynamic and no "
                    "nicAssistedMirroring")

    return MirrorDestination(
        name=name,
        api_version=api_version,
        analyzer_selector=labels.get(LABEL_ANALYZER_SELECTOR),
        juniper_header=juniper_header,
        udp_port=udp_port,
        traffic_direction=Direction(direction),
        next_hop_mode=mode,
        static_next_hop=static if mode == NEXT_HOP_STATIC else None,
        nic_assisted_mirroring=nic,
        nic_assisted_vlan_id=vlan,
        external_analyzer=external,
        analyzer_ip=analyzer_ip,
        analyzer_namespaces=tuple(sorted(set(namespaces))),
        copy_segments=segments,
        copy_too_large=too_large,
        encapsulation=encap,
        **limits,
    )


def _encapsulation(value: Any, path: str) -> Encapsulation:
    """spec.encapsulation (or the annotation's JSON object): format and its sub-fields."""
    if value is None:
        return Encapsulation()
    m = _mapping(value, path)
    unknown = sorted(set(m) - {"format", "vni", "greKey", "network"})
    if unknown:
        raise _fail(_join(path, unknown[0]), "unknown field")
    fmt = _typed(m, "format", path, str, FORMAT_JMIRROR)
    _enum(fmt, ENCAP_FORMATS, _join(path, "format"))
    vni = _in_range(_typed(m, "vni", path, int), VXLAN_ID_MIN, VXLAN_ID_MAX, _join(path, "vni"))
    key = _in_range(_typed(m, "greKey", path, int), GRE_KEY_MIN, GRE_KEY_MAX,
                    _join(path, "greKey"))
    network = _typed(m, "network", path, str)
    if network is not None and not re.match(CONTRAIL_NETWORK_PATTERN, network):
        raise _fail(_join(path, "network"), f"{network!r}: 1 to 40 printable ASCII characters")
    # Sub-fields only where the format has them (the CRD's CEL rules say the same).
    if vni is not None and fmt not in (FORMAT_VXLAN, FORMAT_GENEVE):
        raise _fail(_join(path, "vni"), "only with format vxlan or geneve")
    if key is not None and fmt != FORMAT_GRE:
        raise _fail(_join(path, "greKey"), "only with format gre")
    if network is not None and fmt != FORMAT_CONTRAIL:
        raise _fail(_join(path, "network"), "only with format contrail")
    if fmt == FORMAT_CONTRAIL and network is None:
        network = CONTRAIL_DEFAULT_NETWORK
    return Encapsulation(format=fmt, vni=vni, key=key, network=network)


def _annotated_encapsulation(value: Any) -> Encapsulation:
    """CN2's group: the annotation, a format name or a JSON object like spec.encapsulation."""
    where = f"metadata.annotations[{ANN_ENCAPSULATION}]"
    if value is None:
        return Encapsulation()
    if not isinstance(value, str):
        raise _fail(where, "must be a format name or a JSON object")
    text = value.strip()
    if not text.startswith("{"):
        return _encapsulation({"format": text}, where)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise _fail(where, f"invalid JSON: {e}") from None
    return _encapsulation(data, where)


def _copy_limits(spec: Mapping[str, Any], meta: Mapping[str, Any], own_group: bool
                 ) -> dict[str, Any]:
    """Snap length, sampling and copy budget (issue 15): fields of this project's group,
    annotations (decimal integers) of CN2's, whose own fields stay CN2's."""
    if own_group:
        p = "spec"
        budget = _mapping(spec.get("copyBudget"), "spec.copyBudget")
        values = {
            "snap_length": (_typed(spec, "snapLength", p, int, 0), "spec.snapLength"),
            "sampling": (_typed(spec, "sampling", p, int, 1), "spec.sampling"),
            "sampling_mode": (_typed(spec, "samplingMode", p, str, SAMPLING_BY_PACKET),
                              "spec.samplingMode"),
            "budget_pps": (_typed(budget, "packetsPerSecond", "spec.copyBudget", int, 0),
                           "spec.copyBudget.packetsPerSecond"),
            "budget_bps": (_typed(budget, "bitsPerSecond", "spec.copyBudget", int, 0),
                           "spec.copyBudget.bitsPerSecond"),
        }
    else:
        notes = _string_map(meta.get("annotations"), "metadata.annotations")
        values = {}
        for attr, ann, default in (("snap_length", ANN_SNAP_LENGTH, 0),
                                   ("sampling", ANN_SAMPLING, 1),
                                   ("budget_pps", ANN_BUDGET_PPS, 0),
                                   ("budget_bps", ANN_BUDGET_BPS, 0)):
            where = f"metadata.annotations[{ann}]"
            raw = notes.get(ann)
            if raw is None:
                values[attr] = (default, where)
            elif not re.fullmatch(r"[0-9]{1,20}", raw.strip()):
                raise _fail(where, f"must be a decimal integer, not {raw!r}")
            else:
                values[attr] = (int(raw.strip()), where)
        where = f"metadata.annotations[{ANN_SAMPLING_MODE}]"
        values["sampling_mode"] = (notes.get(ANN_SAMPLING_MODE, SAMPLING_BY_PACKET), where)
    _enum(values["sampling_mode"][0], SAMPLING_MODES, values["sampling_mode"][1])
    snap, where = values["snap_length"]
    if snap:
        _in_range(snap, SNAP_LENGTH_MIN, SNAP_LENGTH_MAX, where)
    _in_range(values["sampling"][0], 1, SAMPLING_MAX, values["sampling"][1])
    pps, where = values["budget_pps"]
    _in_range(pps, 0, BUDGET_PPS_MAX, where)
    bps, where = values["budget_bps"]
    if bps:
        _in_range(bps, BUDGET_BPS_MIN, BUDGET_BPS_MAX, where)
    return {k: v for k, (v, _) in values.items()}


def _namespace_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or len(value) > NAMESPACE_NAME_MAX_LENGTH or \
            not re.match(NAMESPACE_NAME_PATTERN, value):
        raise _fail(path, f"{value!r} is not a namespace name")
    return value


def _static_next_hop(value: Any, path: str) -> StaticNextHop:
    m = _mapping(value, path)
    vtep_ip = _ip(_typed(m, "vTEPDestinationIP", path, str), _join(path, "vTEPDestinationIP"))
    vxlan_id = _typed(m, "vxlanID", path, int)
    if vtep_ip is None:
        raise _fail(_join(path, "vTEPDestinationIP"), "is required")
    if vxlan_id is None:
        raise _fail(_join(path, "vxlanID"), "is required")
    _in_range(vxlan_id, VXLAN_ID_MIN, VXLAN_ID_MAX, _join(path, "vxlanID"))
    vtep_mac = _mac(_typed(m, "vTEPDestinationMac", path, str), _join(path, "vTEPDestinationMac"))
    return StaticNextHop(vtep_ip=vtep_ip, vxlan_id=vxlan_id, vtep_mac=vtep_mac)


# --- Policies ----------------------------------------------------------------------------


def parse_policy(obj: Mapping[str, Any]) -> SecurityPolicy:
    """A ContrailSecurityPolicy or GlobalContrailSecurityPolicy, by ``obj["kind"]``."""
    kind = obj.get("kind")
    if kind not in (KIND_CSP, KIND_GCSP):
        raise _fail("kind", f"must be {KIND_CSP} or {KIND_GCSP}, not {kind!r}")
    name, namespace, _ = _metadata(obj, kind)
    api_version = _api_version(obj, kind)
    spec = _mapping(obj.get("spec"), "spec")

    selectors = []
    for i, entry in enumerate(_list(spec.get("selectors"), "spec.selectors")):
        path = f"spec.selectors[{i}]"
        entry = _mapping(entry, path)
        if "ipBlock" in entry:
            raise _fail(_join(path, "ipBlock"), "selectors pick pods: ipBlock is not allowed")
        if kind == KIND_CSP and entry.get("namespaceSelector") is not None:
            raise _fail(_join(path, "namespaceSelector"),
                        "only a GlobalContrailSecurityPolicy selects pods in other namespaces")
        selectors.append(_peer(entry, path, allow_empty=True))

    own_group = api_version.startswith(GROUP + "/")
    rules = tuple(
        _rule(r, f"spec.rules[{i}]", own_group)
        for i, r in enumerate(_list(spec.get("rules"), "spec.rules"))
    )
    return SecurityPolicy(
        kind=kind,
        name=name,
        namespace=namespace,
        api_version=api_version,
        selectors=tuple(selectors),
        action=_enum(_typed(spec, "action", "spec", str, DEFAULT_ACTION), ACTIONS, "spec.action"),
        mirror_to=_mirror_to(spec, "spec"),
        rules=rules,
        sampling=_mirror_sampling(spec, "spec") if own_group else None,
    )


def _mirror_to(m: Mapping[str, Any], path: str) -> str | None:
    path = _join(path, "secondaryActions")
    actions = _mapping(m.get("secondaryActions"), path)
    return _name(_typed(actions, "mirrorTo", path, str), _join(path, "mirrorTo"))


def _mirror_sampling(m: Mapping[str, Any], path: str) -> Sampling | None:
    """secondaryActions.sampling and .samplingMode (this project's group only; CN2's
    schema has neither)."""
    path = _join(path, "secondaryActions")
    actions = _mapping(m.get("secondaryActions"), path)
    every = _typed(actions, "sampling", path, int)
    _in_range(every, 1, SAMPLING_MAX, _join(path, "sampling"))
    mode = _enum(_typed(actions, "samplingMode", path, str), SAMPLING_MODES,
                 _join(path, "samplingMode"))
    if every is None and mode is None:
        return None
    return Sampling(every=every, mode=mode)


def _rule(value: Any, path: str, own_group: bool = False) -> PolicyRule:
    m = _mapping(value, path)
    ports = tuple(
        _port(p, f"{path}.ports[{i}]") for i, p in enumerate(_list(m.get("ports"), f"{path}.ports"))
    )
    return PolicyRule(
        src=_endpoints(m.get("srcEP"), _join(path, "srcEP")),
        dst=_endpoints(m.get("dstEP"), _join(path, "dstEP")),
        ports=ports,
        mirror_to=_mirror_to(m, path),
        action=_enum(_typed(m, "action", path, str), ACTIONS, _join(path, "action")),
        sampling=_mirror_sampling(m, path) if own_group else None,
    )


def _endpoints(value: Any, path: str) -> tuple[Peer, ...] | None:
    """A missing endpoint set, or one with no endPoints, is ANY (None)."""
    m = _mapping(value, path)
    path = _join(path, "endPoints")
    peers = tuple(_peer(e, f"{path}[{i}]") for i, e in enumerate(_list(m.get("endPoints"), path)))
    return peers or None


def _peer(value: Any, path: str, allow_empty: bool = False) -> Peer:
    m = _mapping(value, path)
    pods = _selector(m.get("podSelector"), _join(path, "podSelector"))
    namespaces = _selector(m.get("namespaceSelector"), _join(path, "namespaceSelector"))
    block = None
    if m.get("ipBlock") is not None:
        if pods is not None or namespaces is not None:
            raise _fail(path, "ipBlock cannot be combined with podSelector or namespaceSelector")
        block = _ip_block(m["ipBlock"], _join(path, "ipBlock"))
    elif pods is None and namespaces is None and not allow_empty:
        raise _fail(path, "an endpoint needs podSelector, namespaceSelector or ipBlock")
    return Peer(pod_selector=pods, namespace_selector=namespaces, ip_block=block)


def _selector(value: Any, path: str) -> LabelSelector | None:
    if value is None:
        return None
    m = _mapping(value, path)
    labels = _string_map(m.get("matchLabels"), _join(path, "matchLabels"))
    expressions = []
    for i, e in enumerate(_list(m.get("matchExpressions"), _join(path, "matchExpressions"))):
        epath = f"{path}.matchExpressions[{i}]"
        e = _mapping(e, epath)
        key = _typed(e, "key", epath, str)
        if not key:
            raise _fail(_join(epath, "key"), "is required")
        op = _typed(e, "operator", epath, str)
        if op is None:
            raise _fail(_join(epath, "operator"), "is required")
        _enum(op, SELECTOR_OPERATORS, _join(epath, "operator"))
        values = _list(e.get("values"), _join(epath, "values"))
        if any(not isinstance(v, str) for v in values):
            raise _fail(_join(epath, "values"), "must be strings")
        if op in ("In", "NotIn") and not values:
            raise _fail(epath, f"operator {op} needs values")
        if op in ("Exists", "DoesNotExist") and values:
            raise _fail(epath, f"operator {op} takes no values")
        expressions.append(Requirement(key=key, operator=op, values=tuple(values)))
    return LabelSelector(match_labels=tuple(sorted(labels.items())),
                         match_expressions=tuple(expressions))


def _ip_block(value: Any, path: str) -> IPBlock:
    m = _mapping(value, path)
    cidr = _typed(m, "cidr", path, str)
    if cidr is None:
        raise _fail(_join(path, "cidr"), "is required")
    net = _cidr(cidr, _join(path, "cidr"))
    excepts = []
    for i, e in enumerate(_list(m.get("except"), _join(path, "except"))):
        epath = f"{path}.except[{i}]"
        if not isinstance(e, str):
            raise _fail(epath, f"must be a string, not {type(e).__name__}")
        sub = _cidr(e, epath)
        if sub.version != net.version or not sub.subnet_of(net):
            raise _fail(epath, f"{e} is not inside {cidr}")
        excepts.append(str(sub))
    return IPBlock(cidr=str(net), excepts=tuple(sorted(set(excepts))))


def _port(value: Any, path: str) -> PolicyPort:
    m = _mapping(value, path)
    protocol = _typed(m, "protocol", path, str, DEFAULT_PROTOCOL)
    _enum(protocol, tuple(PROTOCOLS), _join(path, "protocol"))
    port = m.get("port")
    end_port = _typed(m, "endPort", path, int)
    _in_range(end_port, PORT_MIN, PORT_MAX, _join(path, "endPort"))
    if isinstance(port, bool) or not isinstance(port, int | str | None):
        raise _fail(_join(path, "port"), f"must be a number or a name, not {type(port).__name__}")
    if isinstance(port, int):
        _in_range(port, PORT_MIN, PORT_MAX, _join(path, "port"))
    if isinstance(port, str):
        bad = (len(port) > PORT_NAME_MAX_LENGTH or "--" in port
               or not re.match(PORT_NAME_PATTERN, port))
        if bad:
            raise _fail(_join(path, "port"), f"{port!r} is not a port number or port name")
    if protocol in PORTLESS_PROTOCOLS and port is not None:
        raise _fail(path, f"{protocol} takes no port")
    if end_port is not None:
        if not isinstance(port, int):
            raise _fail(_join(path, "endPort"), "needs a numeric port")
        if end_port < port:
            raise _fail(_join(path, "endPort"), f"must not be below port ({port})")
    return PolicyPort(protocol=protocol, port=port, end_port=end_port)


# --- Pods and namespaces -----------------------------------------------------------------


def parse_namespace(obj: Mapping[str, Any]) -> Namespace:
    name, _, meta = _metadata(obj, KIND_NAMESPACE)
    labels = _string_map(meta.get("labels"), "metadata.labels")
    # Kubernetes sets this label itself; a namespace read from a file may lack it.
    labels.setdefault(LABEL_NAMESPACE_NAME, name)
    return Namespace(name=name, labels=labels)


def implicit_namespace(name: str) -> Namespace:
    """A namespace that pods live in but that no Namespace object describes."""
    return Namespace(name=name, labels={LABEL_NAMESPACE_NAME: name})


def parse_pod(obj: Mapping[str, Any]) -> Pod:
    """A pod; malformed annotations become ``problems``, not a failure."""
    name, namespace, meta = _metadata(obj, KIND_POD)
    problems: list[str] = []
    given = _mapping(meta.get("labels"), "metadata.labels")
    if all(isinstance(k, str) and isinstance(v, str) for k, v in given.items()):
        labels = given  # read only: shared with the object (10,000 pods, one copy each)
    else:
        labels = {}
        for k, v in given.items():
            if isinstance(v, str):
                labels[str(k)] = v
            else:
                problems.append(f"label {k}: value must be a string")
    annotations = {
        str(k): v for k, v in _mapping(meta.get("annotations"), "metadata.annotations").items()
    }
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")

    statuses = _network_status(annotations.get(ANN_MULTUS_STATUS), problems)
    default_status = next((s for s in statuses if s.get("default") is True), {})
    kubelet_ips = _kubelet_ips(status, problems)
    default = PodInterface(
        name=default_status.get("interface") or "eth0",
        default=True,
        ips=kubelet_ips or _status_ips(default_status, problems),
        ips_from_annotations=not kubelet_ips,
        mac=_annotated_mac(annotations, problems) or _status_mac(default_status, problems),
        mirror_to=_annotated_name(annotations, ANN_MIRROR_DESTINATION, "annotation", problems),
        analyzer=_is_true(annotations.get(ANN_ANALYZER_INTERFACE)),
        host_ifname=_opt_str(annotations.get(ANN_HOST_INTERFACE)),
    )
    interfaces = [default]
    for i, entry in _networks(annotations.get(ANN_MULTUS_NETWORKS), problems):
        # Multus names an interface it was not told about after its position in the list.
        ifname = _opt_str(entry.get("interface")) or f"net{i + 1}"
        if any(x.name == ifname for x in interfaces):
            problems.append(f"{ANN_MULTUS_NETWORKS}: interface {ifname} appears twice")
            continue
        st = next((s for s in statuses if s.get("interface") == ifname), {})
        args = entry.get("cni-args") if isinstance(entry.get("cni-args"), Mapping) else {}
        where = f"{ANN_MULTUS_NETWORKS} entry {i} cni-args"
        interfaces.append(PodInterface(
            name=ifname,
            default=False,
            ips=_status_ips(st, problems),
            mac=_status_mac(st, problems),
            network=f"{entry.get('namespace') or namespace}/{entry['name']}",
            mirror_to=_annotated_name(args, ANN_MIRROR_DESTINATION, where, problems),
            analyzer=_is_true(args.get(ANN_ANALYZER_INTERFACE)),
            ips_from_annotations=True,
        ))
    marked = [i.name for i in interfaces if i.analyzer]
    if len(marked) > 1:
        problems.append(f"several interfaces are marked {ANN_ANALYZER_INTERFACE}: "
                        f"{', '.join(marked)}; {marked[0]} receives")

    return Pod(
        namespace=namespace,
        name=name,
        node=_opt_str(spec.get("nodeName")),
        phase=_opt_str(status.get("phase")),
        host_network=spec.get("hostNetwork") is True,
        labels=labels,
        interfaces=tuple(interfaces),
        container_ports=_container_ports(spec),
        problems=tuple(problems),
    )


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _annotated_name(m: Mapping[str, Any], key: str, where: str, problems: list[str]) -> str | None:
    value = m.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not re.match(NAME_PATTERN, value):
        problems.append(f"{where} {key}: {value!r} is not a MirrorDestination name")
        return None
    return value


def _annotated_mac(annotations: Mapping[str, Any], problems: list[str]) -> str | None:
    value = annotations.get(ANN_MAC)
    if value is None:
        return None
    try:
        return _mac(str(value), f"annotation {ANN_MAC}")
    except ModelError as e:
        problems.append(str(e))
        return None


def _status_mac(entry: Mapping[str, Any], problems: list[str]) -> str | None:
    value = entry.get("mac")
    if not value:
        return None
    try:
        return _mac(str(value), f"{ANN_MULTUS_STATUS} interface {entry.get('interface')} mac")
    except ModelError as e:
        problems.append(str(e))
        return None


def _valid_ips(values: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    ips: list[str] = []
    for v in values if isinstance(values, list) else []:
        try:
            ip = str(ipaddress.ip_address(v))
        except ValueError:
            problems.append(f"{where}: {v!r} is not an IP address")
            continue
        if ip not in ips:
            ips.append(ip)
    return tuple(ips)


def _kubelet_ips(status: Mapping[str, Any], problems: list[str]) -> tuple[str, ...]:
    """status.podIPs (both families), else status.podIP: what the kubelet reports. (Without
    them the default interface's addresses come from the network-status annotation.)"""
    entries = status.get("podIPs")
    if isinstance(entries, list) and entries:
        values = [e.get("ip") if isinstance(e, Mapping) else e for e in entries]
        return _valid_ips(values, "status.podIPs", problems)
    if status.get("podIP"):
        return _valid_ips([status["podIP"]], "status.podIP", problems)
    return ()


def _status_ips(entry: Mapping[str, Any], problems: list[str]) -> tuple[str, ...]:
    where = f"{ANN_MULTUS_STATUS} interface {entry.get('interface')} ips"
    return _valid_ips(entry.get("ips"), where, problems)


def _json_list(value: Any, key: str, problems: list[str]) -> list[Mapping[str, Any]] | None:
    try:
        data = json.loads(value)
    except (TypeError, ValueError) as e:
        problems.append(f"annotation {key}: invalid JSON: {e}")
        return None
    if not isinstance(data, list) or not all(isinstance(x, Mapping) for x in data):
        problems.append(f"annotation {key}: must be a JSON list of objects")
        return None
    return data


def _network_status(value: Any, problems: list[str]) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    return _json_list(value, ANN_MULTUS_STATUS, problems) or []


def _networks(value: Any, problems: list[str]) -> list[tuple[int, Mapping[str, Any]]]:
    """Multus network selections with their positions: a JSON list, or "a, ns/b@net5"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
        entries = []
        for part in value.split(","):
            ref, _, ifname = part.strip().partition("@")
            ns, _, name = ref.rpartition("/")
            if not re.match(NAME_PATTERN, name) or (ns and not re.match(NAME_PATTERN, ns)):
                problems.append(f"annotation {ANN_MULTUS_NETWORKS}: {part.strip()!r} is not "
                                f"a network name")
                name = ""  # reported; left out below, keeping the others' positions
            entries.append({"name": name, "namespace": ns or None, "interface": ifname or None})
        data: list[Mapping[str, Any]] = entries
    else:
        data = _json_list(value, ANN_MULTUS_NETWORKS, problems) or []
    valid = []
    for i, entry in enumerate(data):
        if isinstance(entry.get("name"), str) and entry["name"]:
            valid.append((i, entry))
        elif isinstance(value, str) and value.lstrip().startswith("["):
            problems.append(f"annotation {ANN_MULTUS_NETWORKS}: entry {i} has no name")
    return valid


def _container_ports(spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    ports = set()
    for c in spec.get("containers") or []:
        for p in (c.get("ports") or []) if isinstance(c, Mapping) else []:
            if not isinstance(p, Mapping):
                continue
            name, number = p.get("name"), p.get("containerPort")
            if isinstance(name, str) and isinstance(number, int) and not isinstance(number, bool):
                ports.add(ContainerPort(name, p.get("protocol") or DEFAULT_PROTOCOL, number))
    return tuple(sorted(ports, key=lambda p: (p.name, p.protocol, p.number)))


# --- Dispatch ----------------------------------------------------------------------------


def object_name(obj: Mapping[str, Any]) -> str:
    """"namespace/name" or "name" for error reports; never fails."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) else "<unnamed>"
    if obj.get("kind") in NAMESPACED_KINDS:
        ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else "default"
        return f"{ns}/{name}"
    return name


def parse_object(obj: Mapping[str, Any]) -> MirrorDestination | SecurityPolicy | Pod | Namespace:
    kind = obj.get("kind")
    if kind == KIND_MD:
        return parse_mirror_destination(obj)
    if kind in (KIND_CSP, KIND_GCSP):
        return parse_policy(obj)
    if kind == KIND_POD:
        return parse_pod(obj)
    if kind == KIND_NAMESPACE:
        return parse_namespace(obj)
    raise _fail("kind", f"{kind!r} is not a kind cn2mirror reads")
