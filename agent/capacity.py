"""Fair capacity: what to leave out when a node's state does not fit its datapath.

The datapath's tables are shared by every namespace on the node: rule slots
(layout.MAX_RULES), interface slots (layout.MAX_INTERFACES), destination slots, and the
entries of the five match tries (their maps' max_entries). Without this pass one
namespace that asks for too much makes the whole state unplannable, and every other
namespace's changes wait until the offender is removed. Here objects that do not fit are
left out one by one, each named with the reason, and the rest is applied.

The rule (deterministic: the same state on the same node always gives the same result):

1. Per-namespace limits (agent flags ``--max-rules-per-namespace`` and
   ``--max-interfaces-per-namespace``; 0 means no limit). A namespace over its limit
   loses its largest objects first (a policy by its rules; a pod by its interfaces on
   this node), ties broken by name, the name sorting last first, until it is within
   the limit. Cluster-scoped objects (GlobalContrailSecurityPolicy) have no namespace
   and no per-namespace limit.
2. Node capacity. While a table is over capacity (checked in the order rule slots,
   interface slots, src_v4, dst_v4, src_v6, dst_v6, ports), the object using most of
   that table is left out: namespaced objects (a ContrailSecurityPolicy, a pod's
   interfaces) before cluster-scoped ones (only an admin creates those), then the
   largest user, then the name sorting last. MirrorDestinations (cluster-scoped, at most
   255 on a node) beyond the destination slots are left out by name, the last first.

A policy's use of a trie is the number of keys its rules put there (address blocks and
their exceptions, protocol and port blocks); keys several policies share are counted
once against the capacity. ``fit`` is exact: what it keeps, the planner can write.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from . import layout as L
from .model import KIND_CSP, KIND_GCSP, KIND_MD, KIND_POD
from .programmer import TRIES, _endpoint_blocks, _port_blocks, _Trie
from .state import NodeState, Policy

TABLE_ORDER = ("rules", "interfaces", "src_v4", "dst_v4", "src_v6", "dst_v6", "ports")
TABLE_TEXT = {"rules": "rule slots", "interfaces": "interface slots",
              "src_v4": "IPv4 source-address entries", "dst_v4": "IPv4 destination-address entries",
              "src_v6": "IPv6 source-address entries", "dst_v6": "IPv6 destination-address entries",
              "ports": "protocol/port entries"}


@dataclass(frozen=True)
class Limits:
    """What one node may hold. The node capacities default to the layout's; Node passes
    the tries' real max_entries (read from the maps)."""

    max_rules_per_namespace: int = 0  # 0: no limit
    max_interfaces_per_namespace: int = 0
    rules: int = L.MAX_RULES - 1  # slot 0 means "none"
    interfaces: int = L.MAX_INTERFACES - 1
    destinations: int = L.MAX_DESTINATIONS - 1
    tries: dict[str, int] = field(default_factory=lambda: {m: L.LPM_ENTRIES for m in TRIES})

    def capacity(self, table: str) -> int:
        if table in ("rules", "interfaces"):
            return getattr(self, table)
        return self.tries.get(table, L.LPM_ENTRIES)


@dataclass
class _Object:
    kind: str
    name: str
    namespace: str | None  # None: cluster-scoped
    usage: dict[str, int]
    keys: dict[str, set] = field(default_factory=dict)  # trie -> its keys

    @property
    def problem_key(self) -> str:
        return f"{self.kind} {self.name}"


def _policy_kind(p: Policy) -> tuple[str, str | None]:
    if "/" in p.name:
        return KIND_CSP, p.name.split("/", 1)[0]
    return KIND_GCSP, None


def _policy_object(p: Policy, norm: dict[str, _Trie] | None) -> _Object:
    """A policy's use of the tables; without ``norm``, of the rule slots only (cheap)."""
    kind, ns = _policy_kind(p)
    if norm is None:
        return _Object(kind, p.name, ns, {"rules": len(p.rules)})
    keys: dict[str, set] = {m: set() for m in TRIES}
    for rule in p.rules:
        for side, endpoints in (("src", rule.src), ("dst", rule.dst)):
            if endpoints is None:  # ANY: the /0 key in both families
                keys[f"{side}_v4"].add((0, 0))
                keys[f"{side}_v6"].add((0, 0))
                continue
            for version, blocks in _endpoint_blocks(endpoints, norm).items():
                for prefix, excepts in blocks:
                    keys[f"{side}_v{version}"].add(prefix)
                    keys[f"{side}_v{version}"].update(excepts)
        for prefix, _ in _port_blocks(rule.ports):
            keys["ports"].add(prefix)
    usage = {"rules": len(p.rules), **{m: len(k) for m, k in keys.items()}}
    return _Object(kind, p.name, ns, usage, keys)


def namespace_of(pod: str) -> str:
    return pod.split("/", 1)[0]


def fit(state: NodeState, resolved: set[str], limits: Limits, *, namespaces: bool = True,
        node: bool = True) -> tuple[NodeState, dict[str, str]]:
    """The part of ``state`` that fits, and what was left out: {"Kind name": reason}.

    resolved: keys of the interfaces found on the node (only those take slots).
    namespaces: apply the per-namespace limits (cheap: counts only); node: fit the
    node's capacity (works out every policy's trie keys: call it when a plan did not
    fit)."""
    norm = {m: _Trie(*spec) for m, spec in TRIES.items()} if node else None
    rejected: dict[str, str] = {}
    objects: list[_Object] = [_policy_object(p, norm) for p in state.policies]
    pods: dict[str, _Object] = {}
    for iface in state.interfaces:
        if iface.key not in resolved:
            continue
        o = pods.setdefault(iface.pod, _Object(KIND_POD, iface.pod, namespace_of(iface.pod),
                                               {"rules": 0, "interfaces": 0}))
        o.usage["interfaces"] += 1
        o.usage["rules"] += len(iface.port_mirrors)
    objects += pods.values()
    out = set()  # problem keys left out

    # 1. Per-namespace limits.
    if namespaces:
        for table, limit, flag in (
                ("rules", limits.max_rules_per_namespace, "--max-rules-per-namespace"),
                ("interfaces", limits.max_interfaces_per_namespace,
                 "--max-interfaces-per-namespace")):
            if limit <= 0:
                continue
            by_ns: dict[str, list[_Object]] = {}
            for o in objects:
                if o.namespace is not None and o.usage.get(table, 0):
                    by_ns.setdefault(o.namespace, []).append(o)
            for ns, objs in sorted(by_ns.items()):
                total = sum(o.usage[table] for o in objs)
                for o in sorted(objs, key=lambda o, t=table: (o.usage[t], o.name),
                                reverse=True):
                    if total <= limit:
                        break
                    if o.problem_key in out:
                        continue
                    rejected[o.problem_key] = (
                        f"namespace {ns} may use {limit} {TABLE_TEXT[table]} on a node "
                        f"({flag}) and asks for {total}: this {o.kind} (the largest, "
                        f"{o.usage[table]}) is left out; the rest is applied")
                    out.add(o.problem_key)
                    total -= o.usage[table]

    # 2. Node capacity.
    if not node:
        return _keep(state, out, state.destinations, rejected)
    used = {t: 0 for t in ("rules", "interfaces")}
    refs = {m: Counter() for m in TRIES}
    for o in objects:
        if o.problem_key in out:
            continue
        for t in used:
            used[t] += o.usage.get(t, 0)
        for m, keys in o.keys.items():
            refs[m].update(keys)

    def size(table: str) -> int:
        return used[table] if table in used else len(refs[table])

    while True:
        table = next((t for t in TABLE_ORDER if size(t) > limits.capacity(table=t)), None)
        if table is None:
            break
        wanted = size(table)
        victim = max((o for o in objects if o.problem_key not in out and o.usage.get(table)),
                     key=lambda o, t=table: (o.namespace is not None, o.usage[t], o.name))
        rejected[victim.problem_key] = (
            f"the node's {TABLE_TEXT[table]} are full: {wanted} wanted, "
            f"{limits.capacity(table)} available; this {victim.kind} uses "
            f"{victim.usage[table]} (the largest user) and is left out; the rest is applied")
        out.add(victim.problem_key)
        for t in used:
            used[t] -= victim.usage.get(t, 0)
        for m, keys in victim.keys.items():
            refs[m].subtract(keys)
            refs[m] = +refs[m]  # drop keys no one holds any more

    destinations = tuple(sorted(state.destinations, key=lambda d: d.name))
    if len(destinations) > limits.destinations:
        for d in destinations[limits.destinations:]:
            rejected[f"{KIND_MD} {d.name}"] = (
                f"the node's {limits.destinations} destination slots are full: "
                "MirrorDestinations beyond them (by name, the last first) are left out")
        destinations = destinations[:limits.destinations]

    return _keep(state, out, destinations, rejected)


def _keep(state: NodeState, out: set[str], destinations, rejected: dict[str, str]
          ) -> tuple[NodeState, dict[str, str]]:
    if not rejected:
        return state, {}
    kept_policies = tuple(p for p in state.policies
                          if f"{_policy_kind(p)[0]} {p.name}" not in out)
    kept_ifaces = tuple(i for i in state.interfaces if f"{KIND_POD} {i.pod}" not in out)
    kept_dests = tuple(d for d in state.destinations if d in destinations)
    return dataclasses.replace(state, policies=kept_policies, interfaces=kept_ifaces,
                               destinations=kept_dests), rejected


def has_namespace_limits(limits: Limits) -> bool:
    return limits.max_rules_per_namespace > 0 or limits.max_interfaces_per_namespace > 0
