"""Reading the pinned maps into the rows ``show`` prints and emits as JSON (docs/cli.md):
interfaces, rules, destinations, flows and counters, with names from names.json; what
does not fit the names is recorded as a mismatch."""

from __future__ import annotations

import ipaddress
import socket
import time

from cn2mirror.agent import layout as L
from cn2mirror.agent import protocols
from cn2mirror.agent.pinned import (
    COUNTER_FIELDS,
    CounterTotals,
    NotPinned,
    PinnedMaps,
    sum_counters,
)
from cn2mirror.agent.statefiles import Names

from .decode import address, bit_slots, counters_json, mac, mode_name, nonzero


def copy_json(slot: int, rules: dict[int, L.RuleEntry], names: Names) -> dict:
    """One rule slot as a destination of copies."""
    r = rules.get(slot)
    dest_slot = r.dest if r else 0
    return {"rule_slot": slot, "mirror_id": r.mirror_id if r else None,
            "dest_slot": dest_slot or None, "destination": names.dest_name(dest_slot),
            **names.rule(slot)}


def collect_interfaces(pm: PinnedMaps, names: Names, attachment=None) -> list[dict]:
    """``attachment``: ifindex -> Datapath.attachment_of() dict (how and where in the
    chain the classifier is attached), or None when not asked."""
    rules = dict(pm.rules())
    out = []
    for ifindex, e in sorted(pm.interfaces(), key=lambda x: x[1].ifslot):
        n = names.interface(e.ifslot)
        key = n.get("key")
        if names.available:
            if not n:
                names.mismatch(f"interface slot {e.ifslot} (ifindex {ifindex}) has no name")
            elif n.get("session_id") != e.session_id or n.get("ifindex") not in (None, ifindex):
                names.mismatch(f"interface slot {e.ifslot} is {key} with session id "
                               f"{n.get('session_id')} ifindex {n.get('ifindex')} in names.json,"
                               f" but session id {e.session_id} ifindex {ifindex} in the maps")
        slots = bit_slots(e.bits)
        policies = sorted({p for s in slots if (p := names.rule(s)["policy"])})
        port = {}
        for d in L.Dir:
            slot = e.port_rule[d]
            port[d.name.lower()] = copy_json(slot, rules, names) if slot else None
        out.append({
            "ifindex": ifindex, "ifslot": e.ifslot, "session_id": e.session_id,
            "interface": key, "pod": n.get("pod"),
            "pod_ifname": key.rsplit("/", 1)[1] if key else None,
            "flow_mirroring": bool(e.flags & L.IFACE_HAS_POLICIES),
            "rule_slots": slots, "policies": policies if names.available else None,
            "port_mirror": port,
            "attachment": attachment(ifindex) if attachment else None,
        })
    return out


def attachment_reader(pin_root: str, netns: str | None):
    """ifindex -> how it is attached, read live from the kernel in `netns`."""
    from cn2mirror.agent.datapath import Datapath

    dp = Datapath(pin_root, netns)
    dp.open_pinned_programs()

    def read(ifindex: int) -> dict:
        try:
            return dp.attachment_of(ifindex)
        except Exception as e:  # the rest of the table is still worth showing
            return {"attach": None, "error": str(e)}
    return dp, read


def collect_rules(pm: PinnedMaps, names: Names) -> list[dict]:
    out = []
    own_sampling = pm.rule_sampling()
    for slot, r in sorted(pm.rules()):
        n = names.rule(slot)
        dest = names.dest_name(r.dest)
        if names.available:
            raw = names.rules.get(slot)
            if raw is None:
                names.mismatch(f"rule slot {slot} has no name")
            elif raw.get("mirror_id") not in (None, r.mirror_id):
                names.mismatch(f"rule slot {slot} has mirror id {raw.get('mirror_id')} in "
                               f"names.json but {r.mirror_id} in the maps")
        out.append({
            "slot": slot, "mirror_id": r.mirror_id, "mirrors": bool(r.flags & L.RULE_MIRRORS),
            "dest_slot": r.dest or None, "destination": dest, "policy_end": r.policy_end,
            # The rule's own 1:N (None: its destination's sampling applies).
            "sampling": _sampling_json(own_sampling.get(slot)),
            **n,
        })
    return out


def _sampling_json(e: L.RuleSampling | None) -> dict | None:
    if e is None:
        return None
    return {"one_in": e.sample_every,
            "by": "flow" if e.sample_by == L.SAMPLE_BY_FLOW else "packet"}


def collect_destinations(pm: PinnedMaps, names: Names) -> list[dict]:
    out = []
    for slot, d in sorted(pm.destinations()):
        mode = L.Mode(d.mode) if d.mode in set(L.Mode) else None
        vtep6 = mode is L.Mode.VXLAN and d.flags & L.DEST_VTEP_IPV6
        family = (L.FAMILY_V6 if mode is L.Mode.JMIRROR6 or vtep6
                  else L.FAMILY_V4 if mode in (L.Mode.JMIRROR4, L.Mode.VXLAN, L.Mode.ENCAP4)
                  else None)
        n = names.destinations.get(slot) or {}
        if names.available and not n:
            names.mismatch(f"destination slot {slot} has no name")
        jm = mode in (L.Mode.JMIRROR4, L.Mode.JMIRROR6, L.Mode.ENCAP4)
        out.append({
            "slot": slot, "name": n.get("name"), "mode": mode_name(d.mode),
            "delivery": n.get("mode"), "analyzer_pod": n.get("analyzer_pod"),
            "address": address(d.dst_addr, family),
            "source_address": address(d.src_addr, family),
            "udp_port": d.udp_port if jm else None,
            "mac": mac(d.mac),
            "vni": d.vni if mode is L.Mode.VXLAN else None,
            "vlan_id": d.vlan_id if mode is L.Mode.VLAN else None,
            "out_ifindex": d.out_ifindex or None,
            "mtu": d.mtu,
        })
    return out


def _endpoint(addr: str | None, port: int, proto: int) -> dict:
    return {"address": addr, "port": port if proto not in protocols.ICMPS else None,
            "echo_id": port if proto in protocols.ICMPS and port else None}


def collect_flows(pm: PinnedMaps, names: Names, now_ns: int | None = None) -> list[dict]:
    """Every flow entry. Ages compare bpf_ktime_get_ns (CLOCK_MONOTONIC) stamps with
    time.monotonic_ns(), the same clock."""
    generation = pm.config().generation
    rules = dict(pm.rules())
    now = time.monotonic_ns() if now_ns is None else now_ns
    out = []
    seen: set[bytes] = set()
    for k, v in pm.flows():
        # Iterating a busy LRU map restarts when the previous key was evicted meanwhile:
        # the same entry can come twice.
        if bytes(k) in seen:
            continue
        seen.add(bytes(k))
        fam = k.family
        proto = k.proto
        lo = _endpoint(address(k.addr_lo, fam) or _zero_addr(fam), socket.ntohs(k.port_lo), proto)
        hi = _endpoint(address(k.addr_hi, fam) or _zero_addr(fam), socket.ntohs(k.port_hi), proto)
        n = min(v.n_rules, len(v.rules))
        iface = names.interface(k.ifslot)
        out.append({
            "ifslot": k.ifslot, "interface": iface.get("key"), "pod": iface.get("pod"),
            "family": fam, "protocol": protocols.name(proto), "protocol_number": proto,
            "lo": lo, "hi": hi,
            "initiator": "lo" if v.flags & L.FLOW_INITIATOR_LO else "hi",
            "age_s": round(max(0, now - v.first_seen_ns) / 1e9, 3),
            "idle_s": round(max(0, now - v.last_seen_ns) / 1e9, 3),
            "first_seen_ns": v.first_seen_ns, "last_seen_ns": v.last_seen_ns,
            "packets": v.packets, "bytes": v.bytes,
            "mirrored": n > 0,
            # A copy whose rule samples by flow and left this flow out: not made, its
            # packets counted as sampled_out.
            "copies": [{**copy_json(int(s) & ~L.FLOW_RULE_SAMPLED_OUT, rules, names),
                        "sampled_out": bool(s & L.FLOW_RULE_SAMPLED_OUT)}
                       for s in list(v.rules)[:n]],
            "generation": v.generation, "stale": v.generation != generation,
            "overflow": bool(v.flags & L.FLOW_OVERFLOW),
            "never_mirror": bool(v.flags & L.FLOW_NEVER_MIRROR),
        })
    out.sort(key=lambda f: (f["ifslot"], f["protocol_number"], _sort_addr(f["lo"]),
                            _sort_addr(f["hi"])))
    return out


def _zero_addr(family: int) -> str:
    return "0.0.0.0" if family == L.FAMILY_V4 else "::"


def _sort_addr(ep: dict) -> tuple:
    a = ipaddress.ip_address(ep["address"])
    return (a.version, int(a), ep["port"] or ep["echo_id"] or 0)


def collect_stats(pm: PinnedMaps, names: Names) -> dict:
    """Counters per rule, interface and destination slot, and for the node.

    Slots are listed when configured or when their counters are not zero (a slot that
    was freed keeps its counters: "configured": false). The node's totals add up every
    rule slot (each copy is counted under exactly one), the flow_limit drops (counted
    per interface only) and the node-wide drops (stats_node).
    """
    rules = dict(pm.rules())
    ifaces = {e.ifslot: (idx, e) for idx, e in pm.interfaces()}
    dests = dict(pm.destinations())

    def per_slot(kind: str) -> dict[int, CounterTotals]:
        return {int.from_bytes(k, "little"): sum_counters(v)
                for k, v in pm.map(f"stats_{kind}").items()}

    total = CounterTotals(drops={d.name.lower(): 0 for d in L.Drop})

    def add(t: CounterTotals, only: str | None = None) -> None:
        if only is None:
            for f in COUNTER_FIELDS:
                setattr(total, f, getattr(total, f) + getattr(t, f))
        for reason, n in (t.drops or {}).items():
            if only is None or reason == only:
                total.drops[reason] += n

    rule_rows = []
    for slot, t in sorted(per_slot("rule").items()):
        add(t)
        if slot in rules or nonzero(t):
            r = rules.get(slot)
            rule_rows.append({"slot": slot, "configured": slot in rules,
                              "mirror_id": r.mirror_id if r else None,
                              "destination": names.dest_name(r.dest) if r else None,
                              **names.rule(slot), "counters": counters_json(t)})
    iface_rows = []
    for slot, t in sorted(per_slot("iface").items()):
        add(t, only=L.Drop.FLOW_LIMIT.name.lower())
        if slot in ifaces or nonzero(t):
            idx, e = ifaces.get(slot, (None, None))
            n = names.interface(slot)
            iface_rows.append({"ifslot": slot, "configured": slot in ifaces,
                               "interface": n.get("key"), "pod": n.get("pod"),
                               "ifindex": idx, "session_id": e.session_id if e else None,
                               "counters": counters_json(t)})
    dest_rows = []
    for slot, t in sorted(per_slot("dest").items()):
        if slot in dests or nonzero(t):
            dest_rows.append({"slot": slot, "configured": slot in dests,
                              "name": names.dest_name(slot), "counters": counters_json(t)})
    node_wide = pm.counters("node", 0)
    add(node_wide)
    try:
        flow_table = pm.flow_table().as_dict()
    except NotPinned:  # pinned by a version without the flow table's counter
        flow_table = None
    return {"rules": rule_rows, "interfaces": iface_rows, "destinations": dest_rows,
            "node": {"counters": counters_json(total), "node_wide": counters_json(node_wide)},
            "flow_table": flow_table}
