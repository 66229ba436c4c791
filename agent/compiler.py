"""The policy compiler: the cluster's objects (a Snapshot) -> one node's NodeState.

``compile_node(snapshot, node)`` is pure and deterministic: no I/O, no clock, and the
result depends only on the set of objects, not on their order. The rules it applies:

Policies
  Evaluated in this order: GlobalContrailSecurityPolicies by name, then
  ContrailSecurityPolicies by namespace and name. Each policy is evaluated on its own
  (its first matching rule decides for it) and each decision adds its copy, so the order
  fixes only the order of copies and of display. A policy applies to the interfaces (all
  of them, Multus ones too) of the local pods its ``selectors`` pick; no selectors: every
  pod of its namespace (of the cluster for a global policy). A rule without its own
  mirrorTo takes the policy-level one, or none; a rule-less policy with a policy-level
  mirrorTo has one implicit rule 0 matching every flow.

  Left out of the node's state, without error, because they cannot change what is
  mirrored here: policies that select no local pod, policies none of whose rules mirrors,
  and rules that can match no flow (an endpoint set resolving to no address, named ports
  resolving to no number). Kept rules keep their index and mirror id.

Pods
  Finished pods (Succeeded, Failed) are ignored: their addresses may be reused. Pods on
  the host network are never attached to nor endpoints (their address is the node's),
  nor analyzers. Selected pods stand for their status.podIPs, as /32 and /128.

  What a pod's owner writes is not believed where it decides where traffic goes or
  which interface is attached: a pod's network annotations (Multus network-status, the
  cn2mirror.io/mac and cn2mirror.io/host-interface annotations) count only in namespaces
  an admin labelled cn2mirror.io/trusted-network-annotations=true. Elsewhere a pod has
  one interface, its default one, with the kubelet's addresses and no MAC or host
  interface name: the node finds the host side from its own tables (agent/discovery.py).
  Secondary (Multus) interfaces there are not attached, and that is said on the pod.

Destinations
  The analyzer pod is chosen among the live pods labelled core.juniper.net/analyzer-pod
  with the destination's value, in the namespaces an admin allows: those listed on the
  MirrorDestination (spec.analyzerNamespaces in this project's group, or the annotation
  cn2mirror.io/analyzer-namespaces "ns1,ns2" in either group) and those labelled
  cn2mirror.io/analyzer-namespace=true. Labelled pods elsewhere, and hostNetwork pods,
  are never chosen and are named in the destination's errors. Among the allowed ones:
  usable ones first (an address on the receiving interface, and a MAC in L2 mode),
  running ones first among those, then by namespace and name. The choice is recomputed
  from scratch, so it moves when the pod goes away. Its address: the first IPv4 one of
  the receiving interface, else the first IPv6 one; the receiving interface is the
  default one (status.podIPs) unless the pod marks a Multus one and its namespace is
  trusted for network annotations (see Pods).

Flow evaluation (the datapath's, mirrored by agent/explain.py)
  The first packet of a flow is evaluated, on each local interface that sees it, against
  every policy applying to that interface. When no policy mirrors the packet as it
  travels and it is not a TCP SYN, every policy is evaluated again with the packet
  reversed (src/dst and ports swapped): a flow met mid-way (after an agent restart, or a
  reply seen first) is mirrored as its opening packet would have been. A policy that the
  reversed packet matches decides with that match; the others keep their first result.

Mirror and session identifiers
  A mirror id belongs to one policy rule ("csp/<ns>/<name>/rule/<i>",
  "gcsp/<name>/rule/<i>") or one port mirror ("port/<ns>/<pod>/<ifname>/<destination>");
  a session id to one pod interface ("<ns>/<pod>/<ifname>"). An id is a SHA-256 of the
  key, reduced to the id's range. Ids are assigned over every key of the whole cluster
  (not only the node's) so that all nodes agree; on a collision the key that sorts first
  keeps its hash and the others take hash("<key>#1"), hash("<key>#2"), ... in key order,
  skipping taken ids. So an id depends only on the set of keys in the cluster, and
  changes only when its own key collides.

Errors
  An object that is invalid, or that refers to something missing or invalid, becomes an
  ObjectError and is otherwise left out; nothing else changes. A policy whose mirrorTo
  (policy- or rule-level) names an unknown or unusable MirrorDestination is left out
  whole, with an error naming that destination. A port-mirroring annotation that does
  the same is an error on the pod, and that interface is not port-mirrored. Errors on
  pods are reported by the pods' own node; all others by every node.

Named ports
  A named port resolves through the containerPorts of the pods that can be the
  destination: the pods whose addresses are in the rule's dstEP (all pods for ANY). A
  name given different numbers by different pods yields one PortRange per number,
  which also matches those numbers on the other destination pods (an over-approximation:
  the datapath matches addresses and ports independently).
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .model import (
    ANN_ANALYZER_NAMESPACES,
    ANN_HOST_INTERFACE,
    ANN_MAC,
    ANN_MIRROR_DESTINATION,
    ANN_MULTUS_STATUS,
    API_VERSIONS,
    KIND_CSP,
    KIND_GCSP,
    KIND_MD,
    KIND_NAMESPACE,
    KIND_POD,
    LABEL_ANALYZER_NAMESPACE,
    LABEL_ANALYZER_POD,
    LABEL_ANALYZER_SELECTOR,
    LABEL_TRUSTED_NETWORK_ANNOTATIONS,
    MirrorDestination,
    ModelError,
    Namespace,
    Peer,
    Pod,
    PodInterface,
    PolicyPort,
    PolicyRule,
    SecurityPolicy,
    implicit_namespace,
    object_name,
    parse_object,
)
from .snapshot import Snapshot
from .state import (
    ANY,
    MIRROR_ID_MAX,
    SESSION_ID_MAX,
    Cidr,
    DeliveryMode,
    Destination,
    EndpointSet,
    Interface,
    NodeState,
    ObjectError,
    Policy,
    PortMirror,
    PortRange,
    Rule,
    Sampling,
)

# --- Identifiers -------------------------------------------------------------------------


def rule_key(policy: str, index: int) -> str:
    """The mirror-id key of a rule; ``policy`` as in Rule.policy ("ns/name" or "name")."""
    kind = "csp" if "/" in policy else "gcsp"
    return f"{kind}/{policy}/rule/{index}"


def port_key(interface: str, destination: str) -> str:
    """The mirror-id key of a port mirror; ``interface`` as in Interface.key."""
    return f"port/{interface}/{destination}"


def stable_id(key: str, maximum: int, attempt: int = 0) -> int:
    """A hash of ``key`` in 1..maximum; attempt > 0 gives the key's collision fallbacks."""
    text = key if attempt == 0 else f"{key}#{attempt}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") % maximum + 1


def assign_ids(keys: Iterable[str], maximum: int) -> dict[str, int]:
    """Distinct ids in 1..maximum for ``keys``: see the module's documentation."""
    ordered = sorted(set(keys))
    if len(ordered) > maximum:
        raise ValueError(f"{len(ordered)} keys do not fit in ids 1..{maximum}")
    ids: dict[str, int] = {}
    taken: set[int] = set()
    for key in ordered:  # every key whose hash is free keeps it
        natural = stable_id(key, maximum)
        if natural not in taken:
            ids[key] = natural
            taken.add(natural)
    for key in ordered:  # the others probe, after all natural ids are taken
        if key in ids:
            continue
        attempt = 1
        while (candidate := stable_id(key, maximum, attempt)) in taken:
            attempt += 1
        ids[key] = candidate
        taken.add(candidate)
    return ids


def id_table(state: NodeState) -> dict[int, str]:
    """Mirror id -> the key it was derived from (which policy rule or port mirror)."""
    table = {
        r.mirror_id: rule_key(r.policy, r.index)
        for p in state.policies
        for r in p.rules
        if r.destination is not None
    }
    for i in state.interfaces:
        table.update({m.mirror_id: port_key(i.key, m.destination) for m in i.port_mirrors})
    return table


def session_table(state: NodeState) -> dict[int, str]:
    """Session id -> the pod interface ("ns/pod/ifname") it stands for."""
    return {i.session_id: i.key for i in state.interfaces}


# --- Parsing the snapshot ------------------------------------------------------------------

@dataclass
class _World:
    """The snapshot parsed: what every node sees the same."""

    pods: list[Pod] = field(default_factory=list)  # sorted by namespace/name
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    destinations: dict[str, MirrorDestination] = field(default_factory=dict)  # by name
    policies: list[SecurityPolicy] = field(default_factory=list)  # evaluation order
    broken_destinations: dict[str, str] = field(default_factory=dict)  # name -> reason
    errors: list[ObjectError] = field(default_factory=list)

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        return (self.namespaces.get(name) or implicit_namespace(name)).labels

    def trusts_network_annotations(self, namespace: str) -> bool:
        """Whether an admin vouches for the network annotations of this namespace's pods."""
        return self.namespace_labels(namespace).get(LABEL_TRUSTED_NETWORK_ANNOTATIONS) == "true"

    def allows_analyzers(self, md: MirrorDestination, namespace: str) -> bool:
        """Whether an admin allows ``md``'s analyzer pods in ``namespace``."""
        return namespace in md.analyzer_namespaces or \
            self.namespace_labels(namespace).get(LABEL_ANALYZER_NAMESPACE) == "true"


def _believed_interfaces(pod: Pod, world: _World) -> tuple[PodInterface, ...]:
    """The pod's interfaces as far as cn2mirror believes them (see Pods above): all of
    them in a trusted namespace; else the default one with the kubelet's addresses only."""
    if not pod.interfaces or world.trusts_network_annotations(pod.namespace):
        return pod.interfaces
    default = pod.interfaces[0]
    return (replace(default, mac=None, host_ifname=None,
                    ips=() if default.ips_from_annotations else default.ips),)


def _disbelieved(pod: Pod, selected: set[str]) -> list[str]:
    """What of a local pod's own network annotations is ignored and matters, said on it."""
    out = []
    default = pod.interfaces[0] if pod.interfaces else None
    if default is not None and default.host_ifname:
        out.append(f"annotation {ANN_HOST_INTERFACE} ignored: {_untrusted_note(pod)}; "
                   f"the node finds the host interface from its own tables")
    if default is not None and default.ips and default.ips_from_annotations:
        out.append(f"addresses of {default.name} from {ANN_MULTUS_STATUS} ignored until the "
                   f"kubelet reports status.podIPs: {_untrusted_note(pod)}")
    secondary = [i.name for i in pod.interfaces[1:]]
    if secondary and pod.key in selected:
        out.append(f"secondary interfaces {', '.join(secondary)} not mirrored: their "
                   f"addresses come from the pod's own {ANN_MULTUS_STATUS}, and "
                   f"{_untrusted_note(pod)}")
    return out


def _untrusted_note(pod: Pod) -> str:
    return (f"namespace {pod.namespace} is not labelled {LABEL_TRUSTED_NETWORK_ANNOTATIONS}"
            f"=true, so the pod's own network annotations are not believed")


class _Parsed:
    """One object of a snapshot and what parsing it gave (kept while the object is)."""

    __slots__ = ("obj", "kind", "name", "result", "_preference")

    def __init__(self, kind: str, obj: Mapping[str, Any]):
        self.obj = obj  # held: the cache is keyed by id(obj), which stays unique meanwhile
        self.kind = kind
        # The snapshot's field says the kind; objects from a typed list may not.
        typed = obj if obj.get("kind") == kind else {**obj, "kind": kind}
        self.name = object_name(typed)
        self._preference: tuple[int, str] | None = None
        try:
            self.result: Any = parse_object(typed)
        except ModelError as e:
            self.result = e

    def preference(self) -> tuple[int, str]:
        if self._preference is None:
            self._preference = _preference(self.kind, {**self.obj, "kind": self.kind})
        return self._preference


def _preference(kind: str, obj: Mapping[str, Any]) -> tuple[int, str]:
    """Sort key among copies of one object: preferred apiVersion, then content."""
    versions = API_VERSIONS[kind]
    rank = versions.index(obj["apiVersion"]) if obj.get("apiVersion") in versions else 99
    return rank, json.dumps(obj, sort_keys=True, default=str)


def _parse(snapshot: Snapshot) -> _World:
    """The snapshot parsed, as every node sees it."""
    compiler = Compiler("")
    compiler._parse(snapshot)
    return compiler._world


def _policy_order(p: SecurityPolicy) -> tuple[int, str, str]:
    return (0, "", p.name) if p.kind == KIND_GCSP else (1, p.namespace or "", p.name)


def _sampling_of(rule: PolicyRule, policy: SecurityPolicy) -> Sampling | None:
    """A rule's own sampling (this project's group): each of N and the mode the rule's
    secondaryActions gives, else its policy's; what neither gives is the destination's
    (filled in by the planner)."""
    own, inherited = rule.sampling or Sampling(), policy.sampling or Sampling()
    merged = Sampling(own.every or inherited.every, own.mode or inherited.mode)
    return merged if merged != Sampling() else None


def _effective_rules(policy: SecurityPolicy) -> tuple[PolicyRule, ...]:
    """The rules as evaluated: a rule-less policy that mirrors matches every flow."""
    if not policy.rules and policy.mirror_to:
        return (PolicyRule(),)
    return policy.rules


def _policy_mirror_keys(p: SecurityPolicy) -> Iterable[str]:
    for i, r in enumerate(_effective_rules(p)):
        if r.mirror_to or p.mirror_to:
            yield rule_key(p.key, i)


def _mirror_keys(world: _World) -> Iterable[str]:
    """Every mirror-id key of the cluster, whatever node it is used on."""
    for p in world.policies:
        yield from _policy_mirror_keys(p)
    yield from _pod_mirror_keys(world.pods)


def _pod_mirror_keys(pods: Iterable[Pod]) -> Iterable[str]:
    for pod in _attachable(pods):
        for i in pod.interfaces:
            if i.mirror_to:
                yield port_key(f"{pod.key}/{i.name}", i.mirror_to)


def _attachable(pods: Iterable[Pod]) -> Iterable[Pod]:
    """Pods with interfaces of their own that can be mirrored (live, own network)."""
    return (p for p in pods if not p.terminal and not p.host_network)


# --- Destinations --------------------------------------------------------------------------


def _preferred_ip(ips: tuple[str, ...]) -> str:
    """IPv4 first: jmirror's outer header is IPv4 (reference/jmirror.md)."""
    return next((ip for ip in ips if ipaddress.ip_address(ip).version == 4), ips[0])


def _receiving_interface(pod: Pod, world: _World) -> PodInterface | str:
    """The analyzer pod's receiving interface as believed, or why there is none."""
    marked = pod.analyzer_interface()
    believed = _believed_interfaces(pod, world)
    if not marked.default and marked not in believed:
        return (f"analyzer pod {pod.key} marks {marked.name} as its receiving interface, "
                f"whose addresses come from its own network-status annotation, and "
                f"{_untrusted_note(pod)}")
    return marked if marked in believed else believed[0]


def _analyzer_problem(pod: Pod, mode: DeliveryMode, world: _World) -> str | None:
    iface = _receiving_interface(pod, world)
    if isinstance(iface, str):
        return iface
    if not iface.ips:
        return f"analyzer pod {pod.key} has no IP on {iface.name} yet"
    if mode is DeliveryMode.L2 and iface.mac is None:
        known = pod.analyzer_interface().mac is not None
        return (f"juniperHeader false sends the frame to the analyzer's MAC, and none is known "
                f"for pod {pod.key} interface {iface.name} (annotation {ANN_MAC} or "
                f"{ANN_MULTUS_STATUS}" + (f"; {_untrusted_note(pod)})" if known else ")"))
    return None


def _analyzer_refusal(pod: Pod, md: MirrorDestination, world: _World) -> str | None:
    """Why a pod carrying the analyzer label may not be ``md``'s analyzer, if it may not."""
    if pod.host_network:
        return f"pod {pod.key} is on the host network (never an analyzer)"
    if not world.allows_analyzers(md, pod.namespace):
        return (f"pod {pod.key} is in namespace {pod.namespace}, which no admin allowed "
                f"analyzers in")
    return None


def refused_analyzers(md: MirrorDestination, world: _World) -> list[str]:
    """Pods carrying ``md``'s analyzer label that are never chosen, and why."""
    if md.analyzer_selector is None or md.external_analyzer or \
            md.mode in (DeliveryMode.VXLAN, DeliveryMode.VLAN):
        return []
    return [why for p in world.pods
            if not p.terminal and p.labels.get(LABEL_ANALYZER_POD) == md.analyzer_selector
            and (why := _analyzer_refusal(p, md, world))]


def _how_to_allow(md: MirrorDestination) -> str:
    return (f"allow a namespace with `kubectl label namespace <ns> "
            f"{LABEL_ANALYZER_NAMESPACE}=true` or, on this MirrorDestination, "
            f"spec.analyzerNamespaces or the annotation {ANN_ANALYZER_NAMESPACES}")


def _resolve(md: MirrorDestination, world: _World, node: str) -> Destination | str:
    """The destination as this node sends to it, or why it cannot."""
    d = _resolve_target(md, world, node)
    if isinstance(d, str):
        return d
    # The copy limits apply whatever the mode (issue 15).
    return replace(d, snap_length=md.snap_length, sampling=md.sampling,
                   sampling_mode=md.sampling_mode, budget_pps=md.budget_pps,
                   budget_bps=md.budget_bps)


def _resolve_target(md: MirrorDestination, world: _World, node: str) -> Destination | str:
    """Where the destination's copies go from this node, or why they cannot."""
    mode = md.mode
    if mode is DeliveryMode.VXLAN:
        hop = md.static_next_hop
        assert hop is not None  # validated by the model
        return Destination(name=md.name, mode=mode, vtep_ip=hop.vtep_ip, vtep_mac=hop.vtep_mac,
                           vni=hop.vxlan_id)
    if mode is DeliveryMode.VLAN:
        return Destination(name=md.name, mode=mode, vlan_id=md.nic_assisted_vlan_id)
    if md.external_analyzer:
        if mode is DeliveryMode.L2:
            return (f"juniperHeader false sends the frame to the analyzer's MAC, which is not "
                    f"known for external analyzer {md.analyzer_ip}")
        return Destination(name=md.name, mode=mode, analyzer_ip=md.analyzer_ip,
                           udp_port=md.udp_port, segments=md.copy_segments,
                           oversize=md.copy_too_large, encapsulation=md.encapsulation)
    if md.analyzer_selector is None:
        return (f"no analyzer: label the MirrorDestination {LABEL_ANALYZER_SELECTOR}=<value> "
                f"(or set externalAnalyzer and analyzerIP)")
    labelled = [
        p for p in world.pods
        if not p.terminal and p.labels.get(LABEL_ANALYZER_POD) == md.analyzer_selector
    ]
    if not labelled:
        return f"no pod has label {LABEL_ANALYZER_POD}={md.analyzer_selector}"
    # Only admins decide where copies go: pods elsewhere never become the analyzer.
    candidates = [p for p in labelled if _analyzer_refusal(p, md, world) is None]
    if not candidates:
        return (f"no pod labelled {LABEL_ANALYZER_POD}={md.analyzer_selector} may be the "
                f"analyzer ({'; '.join(refused_analyzers(md, world))}): {_how_to_allow(md)}")
    # Usable pods first, running ones first among them, then by namespace/name. The choice
    # is recomputed each time: it moves when the chosen pod goes away (or a better one comes).
    chosen = min(candidates, key=lambda p: (_analyzer_problem(p, mode, world) is not None,
                                            p.phase != "Running", p.namespace, p.name))
    problem = _analyzer_problem(chosen, mode, world)
    if problem:
        return problem
    iface = _receiving_interface(chosen, world)
    assert not isinstance(iface, str)  # no problem above
    destination = Destination(name=md.name, mode=mode, analyzer_ip=_preferred_ip(iface.ips),
                              analyzer_pod=chosen.key)
    if mode is DeliveryMode.JMIRROR:
        return replace(destination, udp_port=md.udp_port, segments=md.copy_segments,
                       oversize=md.copy_too_large, encapsulation=md.encapsulation)
    # L2: analyzer_ip is for display; the host side of a local analyzer, when annotated
    # (and believed), spares the datapath a search by MAC.
    return replace(destination, analyzer_mac=iface.mac,
                   analyzer_ifname=iface.host_ifname if chosen.node == node else None)


# --- Endpoints and ports -------------------------------------------------------------------


def _selects(peer: Peer, scope: str | None, pod: Pod, world: _World) -> bool:
    """Whether a selector entry or endpoint picks ``pod``; scope: the policy's namespace."""
    if peer.namespace_selector is not None:
        if not peer.namespace_selector.matches(world.namespace_labels(pod.namespace)):
            return False
    elif scope is not None and pod.namespace != scope:
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(pod.labels)


def _host_cidr(ip: str) -> Cidr:
    return Cidr(f"{ip}/{32 if ipaddress.ip_address(ip).version == 4 else 128}")


class _Selection:
    """The addresses of the live pods one endpoint (a selector, in a scope) picks.

    Kept up to date from the pods that changed; ``version`` changes with its contents."""

    __slots__ = ("peer", "scope", "members", "version", "_blocks")

    def __init__(self, peer: Peer, scope: str | None, world: _World, version: int):
        self.peer, self.scope, self.version = peer, scope, version
        self.members: dict[str, tuple[Cidr, ...]] = {}  # pod key -> its /32 and /128s
        self._blocks: tuple[Cidr, ...] | None = None
        for pod in _attachable(world.pods):
            if _selects(peer, scope, pod, world):
                self.members[pod.key] = tuple(_host_cidr(ip) for ip in pod.ips)

    def update(self, key: str, pod: Pod | None, world: _World, version: int) -> None:
        """The pod ``key`` changed (``pod`` None: it is gone or unparseable)."""
        if pod is not None and not pod.terminal and not pod.host_network and \
                _selects(self.peer, self.scope, pod, world):
            cidrs = tuple(_host_cidr(ip) for ip in pod.ips)
            if self.members.get(key) == cidrs:
                return
            self.members[key] = cidrs
        elif self.members.pop(key, None) is None:
            return
        self.version, self._blocks = version, None

    def blocks(self) -> tuple[Cidr, ...]:
        if self._blocks is None:
            self._blocks = tuple(sorted({c for cidrs in self.members.values() for c in cidrs}))
        return self._blocks


def in_endpoints(endpoints: EndpointSet, ip: str) -> bool:
    """Whether an address is in an endpoint set (in a block and in none of its excepts)."""
    if endpoints is None:
        return True
    addr = ipaddress.ip_address(ip)
    return any(
        addr in c.network()
        and not any(addr in ipaddress.ip_network(e, strict=False) for e in c.excepts)
        for c in endpoints
    )


def _port_sort_key(p: PortRange) -> tuple[int, int, int]:
    def bound(port: int | None) -> int:
        return -1 if port is None else port

    return p.protocol, bound(p.port_lo), bound(p.port_hi)


def _port_ranges(ports: tuple[PolicyPort, ...], dst: EndpointSet,
                 world: _World) -> tuple[PortRange, ...] | None:
    """The rule's PortRanges; () for every port; None when named ports resolve to nothing."""
    if not ports:
        return ()
    ranges: set[PortRange] = set()
    for pp in ports:
        proto = pp.protocol_number
        if pp.port is None:
            ranges.add(PortRange(proto))
        elif isinstance(pp.port, int):
            ranges.add(PortRange(proto, pp.port, pp.end_port or pp.port))
        else:
            for pod in _attachable(world.pods):
                if any(in_endpoints(dst, ip) for ip in pod.ips):
                    ranges.update(PortRange(proto, cp.number, cp.number)
                                  for cp in pod.container_ports
                                  if cp.name == pp.port and cp.protocol == pp.protocol)
    return tuple(sorted(ranges, key=_port_sort_key)) or None


# --- The node's state ----------------------------------------------------------------------


def _destination_problems(policy: SecurityPolicy, world: _World,
                          resolved: Mapping[str, Destination | str]) -> list[str]:
    names = {policy.mirror_to} | {r.mirror_to for r in policy.rules}
    problems = []
    for name in sorted(n for n in names if n):
        reason = world.broken_destinations.get(name) or resolved.get(name)
        if reason is None:
            problems.append(f"mirrorTo {name}: no MirrorDestination named {name}")
        elif isinstance(reason, str):
            problems.append(f"mirrorTo {name}: MirrorDestination {name} is not usable: {reason}")
    return problems


def compile_node(snapshot: Snapshot, node: str) -> NodeState:
    """What the datapath of ``node`` must do, given every object of the cluster."""
    return Compiler(node).compile(snapshot)


# --- The cluster as every node sees it (object status, the CLI) ----------------------------


@dataclass(frozen=True)
class ObjectView:
    """One MirrorDestination or policy as the compiler reads it."""

    kind: str
    name: str  # object_name(): "<name>" for cluster-scoped kinds, "<namespace>/<name>"
    object: Mapping[str, Any]  # the object used (its "kind" set)
    ignored: tuple[Mapping[str, Any], ...]  # the same object given again: not used
    parsed: Any  # its MirrorDestination or SecurityPolicy; None when invalid
    error: str | None  # why it is invalid


@dataclass(frozen=True)
class DestinationView:
    """A MirrorDestination resolved as every node sees it (the node-independent part)."""

    destination: Destination | None  # None: it cannot be used, ``problem`` says why
    problem: str | None
    refused: tuple[str, ...]  # pods carrying its analyzer label never chosen, and why
    analyzer_interface: PodInterface | None  # the analyzer pod's receiving interface
    analyzer_node: str | None  # the analyzer pod's node


@dataclass(frozen=True)
class RuleMirror:
    rule: int  # the rule's index (0 for a rule-less policy's implicit rule)
    destination: str
    mirror_id: int


@dataclass(frozen=True)
class PolicyView:
    problems: tuple[str, ...]  # its destinations that cannot be used: the policy is left out
    mirrors: tuple[RuleMirror, ...]  # each rule that mirrors, where to, with which id


@dataclass(frozen=True)
class ClusterView:
    """What the compiler makes of the cluster's objects, whatever the node: each
    MirrorDestination's and policy's object (which copy is used, its problems), resolved
    destinations, and mirror ids. The status writer (agent/status.py) reports it."""

    objects: tuple[ObjectView, ...]  # sorted by (kind, name)
    destinations: Mapping[str, DestinationView]  # valid MirrorDestinations, by name
    policies: Mapping[tuple[str, str], PolicyView]  # valid policies, by (kind, key)
    mirror_ids: Mapping[str, int]  # every mirror-id key of the cluster -> id


def cluster_view(snapshot: Snapshot) -> ClusterView:
    """The cluster's objects as the compiler reads them, with the same parsing, choice
    among duplicates, analyzer choice and id assignment as compile()."""
    compiler = Compiler("")
    compiler._parse(snapshot)
    world = compiler._world
    objects = []
    for kind in (KIND_MD, KIND_CSP, KIND_GCSP):
        _, entries, picked, _ = compiler._kinds[kind]
        copies: dict[str, list[_Parsed]] = {}
        for entry in entries.values():
            copies.setdefault(entry.name, []).append(entry)
        for name, used in picked.items():
            ignored = sorted((e for e in copies[name] if e is not used), key=_Parsed.preference)
            invalid = isinstance(used.result, ModelError)
            objects.append(ObjectView(
                kind, name, _typed(kind, used.obj), tuple(_typed(kind, e.obj) for e in ignored),
                None if invalid else used.result, str(used.result) if invalid else None))
    objects.sort(key=lambda o: (o.kind, o.name))

    resolved = {name: _resolve(md, world, "") for name, md in world.destinations.items()}
    pods = {p.key: p for p in world.pods}
    destinations = {}
    for name, r in resolved.items():
        pod = pods.get(r.analyzer_pod) if isinstance(r, Destination) and r.analyzer_pod \
            else None
        iface = _receiving_interface(pod, world) if pod is not None else None
        destinations[name] = DestinationView(
            r if isinstance(r, Destination) else None, r if isinstance(r, str) else None,
            tuple(refused_analyzers(world.destinations[name], world)),
            iface if isinstance(iface, PodInterface) else None,
            pod.node if pod is not None else None)

    mirror_ids = assign_ids(_mirror_keys(world), MIRROR_ID_MAX)
    policies = {}
    for policy in world.policies:
        mirrors = tuple(
            RuleMirror(i, dest, mirror_ids[rule_key(policy.key, i)])
            for i, rule in enumerate(_effective_rules(policy))
            if (dest := rule.mirror_to or policy.mirror_to))
        policies[policy.kind, policy.key] = PolicyView(
            tuple(_destination_problems(policy, world, resolved)), mirrors)
    return ClusterView(tuple(objects), destinations, policies, mirror_ids)


def _typed(kind: str, obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The object with its kind set (objects from a typed list may not say it)."""
    return obj if obj.get("kind") == kind else {**obj, "kind": kind}


class _PolicyRecord:
    """What the compiler worked out for one parsed policy, and from what."""

    __slots__ = ("policy", "mirror_keys", "problems", "problems_of", "broken_of", "deps",
                 "compiled")

    def __init__(self, policy: SecurityPolicy):
        self.policy = policy
        self.mirror_keys = tuple(_policy_mirror_keys(policy))
        self.problems: list[str] = []
        self.problems_of: object = None  # the resolved destinations the problems are of
        self.broken_of: object = None  # ...and the broken ones
        self.deps: tuple | None = None  # what `compiled` was computed from (_current)
        self.compiled: Policy | None = None


class Compiler:
    """``compile_node`` for one node, remembering what it worked out, so that a snapshot
    that differs from the last one in a few objects costs about as much as those objects.

    ``compile(snapshot)`` always equals ``compile_node(snapshot, node)`` (which is a fresh
    Compiler's first compile). What is kept, and what makes it be worked out again:

    - each object's parse, for as long as the very same object (the same dict) is in the
      snapshots: sources hand over new dicts for changed objects and never change one in
      place (the Source contract, agent/runtime.py);
    - the analyzer choice, mirror and session ids, the local pods: again when the objects
      they derive from changed (destinations or analyzer pods; policies or pods; pods);
    - the addresses every endpoint selector picks: updated pod by pod for the pods that
      changed, from scratch when a Namespace changed (namespace selectors);
    - each policy's compiled form, with what it was computed from (the local pods, the
      endpoint selections, the mirror ids, all pods for named ports): again when any of
      those changed.
    """

    def __init__(self, node: str):
        self.node = node
        # kind -> (the snapshot's objects, their parses by id, the parse used by name, errors)
        self._kinds: dict[str, tuple[tuple, dict[int, _Parsed], dict[str, _Parsed],
                                     list[ObjectError]]] = {}
        self._chosen: dict[str, dict[str, _Parsed]] = {}
        self._world = _World()
        self._versions = itertools.count(1)
        self._pods_version = 0  # every pod
        self._local_version = 0  # this node's attachable pods
        self._ns_version = 0
        self._pod_keys: tuple[str, ...] = ()
        self._local_pods: list[Pod] = []
        self._node_pods: list[Pod] = []  # this node's live pods, host network ones too
        self._pod_mirror_keys: list[str] = []
        self._mirror_keys: frozenset[str] = frozenset()
        self._mirror_ids: dict[str, int] = {}
        self._session_ids: dict[str, int] = {}
        self._resolved: dict[str, Destination | str] = {}
        self._refused: dict[str, list[str]] = {}  # destination -> labelled pods not allowed
        self._selections: dict[tuple[Peer, str | None], _Selection] = {}
        self._policies: dict[str, _PolicyRecord] = {}  # by policy key
        self._analyzers_changed = False  # a pod labelled as an analyzer changed

    # -- parsing
    def _pick(self, kind: str, objs: tuple[Mapping[str, Any], ...],
              ) -> tuple[dict[str, _Parsed], list[ObjectError]]:
        """The parsed object used for each name of one kind, and the kind's errors."""
        last = self._kinds.get(kind)
        if last is not None and last[0] is objs:  # the very same objects as last time
            return last[2], last[3]
        known = last[1] if last is not None else {}
        entries: dict[int, _Parsed] = {}
        picked: dict[str, _Parsed] = {}
        twice: dict[str, list[_Parsed]] = {}
        for obj in objs:
            entry = known.get(id(obj))
            if entry is None or entry.obj is not obj:
                entry = _Parsed(kind, obj)
            entries[id(obj)] = entry
            first = picked.setdefault(entry.name, entry)
            if first is not entry:
                twice.setdefault(entry.name, [first]).append(entry)
        errors = []
        for name, copies in twice.items():
            # One object given twice (under both API groups, say): one is used, whatever
            # the order they came in.
            copies = sorted(copies, key=_Parsed.preference)
            picked[name] = copies[0]
            for other in copies[1:]:
                errors.append(ObjectError(kind, name, (
                    f"given more than once; the {copies[0].obj.get('apiVersion')} object is "
                    f"used, this {other.obj.get('apiVersion')} one is ignored")))
        errors += [ObjectError(kind, name, str(e.result)) for name, e in picked.items()
                   if isinstance(e.result, ModelError)]
        self._kinds[kind] = (objs, entries, picked, errors)
        return picked, errors

    def _parse(self, snapshot: Snapshot) -> dict[str, set[str]]:
        """Brings the world up to date; returns, by kind, the names that changed."""
        world = self._world
        world.errors = []
        chosen: dict[str, dict[str, _Parsed]] = {}
        changed: dict[str, set[str]] = {}
        for kind, objs in snapshot.by_kind().items():
            picked, errors = self._pick(kind, objs)
            world.errors += errors
            old = self._chosen.get(kind, {})
            if picked is old:
                changed[kind] = set()
            else:
                changed[kind] = {n for n, e in picked.items() if old.get(n) is not e}
                changed[kind].update(n for n in old if n not in picked)
            chosen[kind] = picked
        previous, self._chosen = self._chosen, chosen

        def parsed(kind: str) -> list[Any]:
            return [e.result for _, e in sorted(chosen[kind].items())
                    if not isinstance(e.result, ModelError)]

        if changed[KIND_NAMESPACE]:
            world.namespaces = {ns.name: ns for ns in parsed(KIND_NAMESPACE)}
            self._ns_version = next(self._versions)
            self._selections.clear()  # namespace selectors may pick other pods now
        if changed[KIND_MD]:
            world.destinations = {md.name: md for md in parsed(KIND_MD)}
            world.broken_destinations = {
                name: str(e.result) for name, e in sorted(chosen[KIND_MD].items())
                if isinstance(e.result, ModelError)}
        if changed[KIND_CSP] or changed[KIND_GCSP]:
            world.policies = sorted(parsed(KIND_CSP) + parsed(KIND_GCSP), key=_policy_order)
        if changed[KIND_POD]:
            world.pods = parsed(KIND_POD)
            self._pods_version = next(self._versions)
            self._update_pods(changed[KIND_POD], previous.get(KIND_POD, {}))
        return changed

    def _update_pods(self, names: set[str], before: Mapping[str, _Parsed]) -> None:
        world, node = self._world, self.node
        local = [p for p in _attachable(world.pods) if p.node == node]
        if len(local) != len(self._local_pods) or any(
                a is not b for a, b in zip(local, self._local_pods, strict=True)):
            self._local_version = next(self._versions)
        self._local_pods = local
        self._node_pods = [p for p in world.pods if p.node == node and not p.terminal]
        self._pod_mirror_keys = list(_pod_mirror_keys(world.pods))
        keys = tuple(f"{p.key}/{i.name}" for p in _attachable(world.pods) for i in p.interfaces)
        if keys != self._pod_keys:
            self._pod_keys = keys
            self._session_ids = assign_ids(keys, SESSION_ID_MAX)
        # The selections follow the pods that changed (all over again if namespaces did).
        pods = self._chosen[KIND_POD]
        version = next(self._versions)
        for sel in self._selections.values():
            for name in names:
                entry = pods.get(name)
                pod = None if entry is None or isinstance(entry.result, ModelError) \
                    else entry.result
                sel.update(name, pod, world, version)
        self._analyzers_changed = any(
            e is not None and not isinstance(e.result, ModelError)
            and LABEL_ANALYZER_POD in e.result.labels
            for name in names for e in (before.get(name), pods.get(name)))

    # -- compiling
    def compile(self, snapshot: Snapshot) -> NodeState:
        """What the datapath of this node must do, given every object of the cluster."""
        self._analyzers_changed = False
        first = not self._chosen
        changed = self._parse(snapshot)
        world, node = self._world, self.node
        errors = list(world.errors)

        known = self._policies
        records: dict[str, _PolicyRecord] = {}
        for policy in world.policies:
            record = known.get(policy.key)
            if record is None or record.policy is not policy:
                record = _PolicyRecord(policy)
            records[policy.key] = record
        if first or changed[KIND_CSP] or changed[KIND_GCSP] or changed[KIND_POD]:
            keys = frozenset(itertools.chain(
                *(r.mirror_keys for r in records.values()), self._pod_mirror_keys))
            if keys != self._mirror_keys:
                self._mirror_keys = keys
                self._mirror_ids = assign_ids(keys, MIRROR_ID_MAX)
        mirror_ids = self._mirror_ids

        if first or changed[KIND_MD] or changed[KIND_NAMESPACE] or self._analyzers_changed:
            self._resolved = {name: _resolve(md, world, node)
                              for name, md in sorted(world.destinations.items())}
            # Labelled pods an admin did not allow: said on the destination even when
            # another pod is its analyzer.
            self._refused = {name: refused for name, md in world.destinations.items()
                             if isinstance(self._resolved[name], Destination)
                             and (refused := refused_analyzers(md, world))}
        resolved = self._resolved
        errors += [ObjectError(KIND_MD, name, r) for name, r in resolved.items()
                   if isinstance(r, str)]
        errors += [ObjectError(KIND_MD, name, "not chosen as the analyzer: " + "; ".join(r))
                   for name, r in self._refused.items()]

        policies = []
        used_selections: set[tuple[Peer, str | None]] = set()
        for record in records.values():
            policy = record.policy
            if record.problems_of is not resolved or record.broken_of is not \
                    world.broken_destinations:
                record.problems = _destination_problems(policy, world, resolved)
                record.problems_of, record.broken_of = resolved, world.broken_destinations
            if record.problems:
                errors.append(ObjectError(policy.kind, policy.key, "; ".join(record.problems)))
                continue
            if record.deps is None or not self._current(record.deps):
                deps: list = [self._local_version, self._ns_version]
                record.compiled = self._compile_policy(policy, mirror_ids, deps)
                record.deps = tuple(deps)
            used_selections.update(d[1] for d in record.deps[2:] if d[0] == "selection")
            if record.compiled is not None:
                policies.append(record.compiled)
        self._policies = records
        for key in [k for k in self._selections if k not in used_selections]:
            del self._selections[key]

        port_mirrors: dict[str, PortMirror] = {}
        selected = {key.rsplit("/", 1)[0] for p in policies for key in p.interfaces}
        for pod in self._node_pods:
            problems = list(pod.problems)
            believed = _believed_interfaces(pod, world)
            if not pod.host_network and believed is not pod.interfaces:
                problems += _disbelieved(pod, selected)
            for i in pod.interfaces:
                if not i.mirror_to:
                    continue
                where = f"{ANN_MIRROR_DESTINATION} on {i.name}"
                dest = world.broken_destinations.get(i.mirror_to) or resolved.get(i.mirror_to)
                if pod.host_network:
                    problems.append(f"{where}: a hostNetwork pod has no interface of its own")
                elif not i.default and i not in believed:
                    problems.append(f"{where}: not mirrored: {_untrusted_note(pod)}")
                elif dest is None:
                    problems.append(f"{where}: no MirrorDestination named {i.mirror_to}")
                elif isinstance(dest, str):
                    problems.append(f"{where}: MirrorDestination {i.mirror_to} is not usable: "
                                    f"{dest}")
                else:
                    key = f"{pod.key}/{i.name}"
                    port_mirrors[key] = PortMirror(
                        destination=i.mirror_to,
                        direction=world.destinations[i.mirror_to].traffic_direction,
                        mirror_id=mirror_ids[port_key(key, i.mirror_to)],
                    )
            if problems:
                errors.append(ObjectError(KIND_POD, pod.key, "; ".join(problems)))

        needed = set(port_mirrors).union(*(p.interfaces for p in policies))
        interfaces = tuple(
            Interface(
                pod=pod.key,
                pod_ifname=i.name,
                session_id=self._session_ids[f"{pod.key}/{i.name}"],
                ips=i.ips,
                mac=i.mac,
                host_ifname=i.host_ifname,
                port_mirrors=(port_mirrors[key],) if key in port_mirrors else (),
                from_annotations=bool(i.host_ifname) or i.ips_from_annotations,
            )
            for pod in self._local_pods
            for i in _believed_interfaces(pod, world)
            if (key := f"{pod.key}/{i.name}") in needed
        )
        used = {r.destination for p in policies for r in p.rules if r.destination}
        used |= {m.destination for m in port_mirrors.values()}
        destinations = tuple(resolved[name] for name in sorted(used))

        return NodeState(
            node=node,
            interfaces=tuple(sorted(interfaces, key=lambda i: i.key)),
            policies=tuple(policies),
            destinations=destinations,  # type: ignore[arg-type]  # used ones all resolved
            errors=tuple(sorted(set(errors), key=lambda e: (e.kind, e.name, e.reason))),
        )

    def _current(self, deps: tuple) -> bool:
        """Whether what a cached policy was compiled from is unchanged."""
        if deps[0] != self._local_version or deps[1] != self._ns_version:
            return False
        for dep in deps[2:]:
            what = dep[0]
            if what == "selection":
                sel = self._selections.get(dep[1])
                if sel is None or sel.version != dep[2]:
                    return False
            elif what == "mirror_id":
                if self._mirror_ids.get(dep[1]) != dep[2]:
                    return False
            elif dep[1] != self._pods_version:  # "pods": named ports
                return False
        return True

    def _selection(self, peer: Peer, scope: str | None, deps: list) -> _Selection:
        key = (peer, scope)
        sel = self._selections.get(key)
        if sel is None:
            sel = self._selections[key] = _Selection(peer, scope, self._world,
                                                     next(self._versions))
        deps.append(("selection", key, sel.version))
        return sel

    def _endpoint_set(self, peers: tuple[Peer, ...] | None, policy: SecurityPolicy,
                      deps: list) -> EndpointSet:
        if peers is None:
            return ANY
        parts: list[tuple[Cidr, ...]] = []
        for peer in peers:
            if peer.ip_block is not None:
                parts.append((Cidr(peer.ip_block.cidr, peer.ip_block.excepts),))
            else:
                parts.append(self._selection(peer, policy.namespace, deps).blocks())
        if len(parts) == 1:
            return parts[0]
        return tuple(sorted(set(itertools.chain.from_iterable(parts))))

    def _compile_policy(self, policy: SecurityPolicy, mirror_ids: Mapping[str, int],
                        deps: list) -> Policy | None:
        world = self._world
        selectors = policy.selectors or (Peer(),)
        interfaces = frozenset(
            f"{pod.key}/{i.name}"
            for pod in self._local_pods
            if any(_selects(s, policy.namespace, pod, world) for s in selectors)
            for i in _believed_interfaces(pod, world)
        )
        if not interfaces:
            return None
        rules = []
        for index, rule in enumerate(_effective_rules(policy)):
            src = self._endpoint_set(rule.src, policy, deps)
            dst = self._endpoint_set(rule.dst, policy, deps)
            if any(isinstance(p.port, str) for p in rule.ports):
                deps.append(("pods", self._pods_version))
            ports = _port_ranges(rule.ports, dst, world)
            if src == () or dst == () or ports is None:
                continue  # can match no flow
            destination = rule.mirror_to or policy.mirror_to
            mirror_id = 0
            if destination:
                key = rule_key(policy.key, index)
                mirror_id = mirror_ids[key]
                deps.append(("mirror_id", key, mirror_id))
            rules.append(Rule(
                policy=policy.key,
                index=index,
                src=src,
                dst=dst,
                ports=ports,
                destination=destination,
                mirror_id=mirror_id,
                sampling=_sampling_of(rule, policy) if destination else None,
            ))
        if not any(r.destination for r in rules):
            return None
        return Policy(name=policy.key, rules=tuple(rules), interfaces=interfaces)
