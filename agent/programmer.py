"""From a node's desired state to the contents of the BPF maps, and the diff that writes them.

``plan()`` is pure: a NodeState plus what the node's tables resolved (ifindexes,
addresses, MTUs) gives the exact bytes every managed map must hold, and the slot tables
that map numbers back to names. ``MapWriter`` compares that with what is in the maps and
writes only the difference, then bumps the generation so that cached flow verdicts are
re-evaluated on their next packet.
"""

from __future__ import annotations

import ctypes as C
import functools
import ipaddress
import logging
import socket
from dataclasses import dataclass, field

from . import layout as L
from .state import (
    SAMPLING_BY_FLOW,
    SAMPLING_BY_PACKET,
    Destination,
    Direction,
    EndpointSet,
    NodeState,
    PortRange,
    Sampling,
)

log = logging.getLogger(__name__)

MANAGED_MAPS = ("interfaces", "sessions", "rules", "destinations", "src_v4", "dst_v4",
                "src_v6", "dst_v6", "ports", "analyzers", "encaps", "copy_limits",
                "rule_sampling")
ARRAY_MAPS = ("sessions", "rules", "destinations", "encaps", "copy_limits",
              "rule_sampling")  # zeroed, not deleted
# A slot whose entry changes or goes away starts its counters again at zero, so that the
# numbers under a slot always belong to what the slot holds now.
STATS_OF = {"rules": "stats_rule", "destinations": "stats_dest", "sessions": "stats_iface"}


class PlanError(ValueError):
    """The state does not fit the datapath (too many rules, interfaces, destinations)."""


@dataclass(frozen=True)
class ResolvedDestination:
    """A destination as this node reaches it (from its routes and neighbours)."""

    mode: L.Mode
    dst_addr: str | None = None  # analyzer or VTEP
    src_addr: str | None = None  # this node's address towards it
    udp_port: int = 0
    mtu: int = 1500
    out_ifindex: int = 0
    mac: str | None = None
    vni: int = 0
    vlan_id: int = 0
    problem: str | None = None  # why copies to it cannot be delivered now, if so
    fit_flags: int = 0  # DEST_SEGMENTS_*, DEST_FRAGMENT: see copy_fit_flags()
    encap: bytes = b""  # ENCAP4: the EncapEntry of its output format (agent/encap.py)
    # Snap length, sampling, budget (issue 15): see copy_limits_of().
    snap_length: int = 0
    sampling: int = 1
    sampling_mode: str = SAMPLING_BY_PACKET
    budget_pps: int = 0
    budget_bps: int = 0


@dataclass(frozen=True)
class CopyBudget:
    """The node's copy budget (slot COPY_LIMITS_NODE of copy_limits); 0: no limit."""

    pps: int = field(default_factory=lambda: L.default_node_copy_budget()[0])
    bps: int = field(default_factory=lambda: L.default_node_copy_budget()[1])


def copy_limits_of(d: Destination) -> dict[str, int]:
    """A destination's copy limits, for its ResolvedDestination."""
    return {"snap_length": d.snap_length, "sampling": d.sampling,
            "sampling_mode": d.sampling_mode, "budget_pps": d.budget_pps,
            "budget_bps": d.budget_bps}


SAMPLE_BY = {SAMPLING_BY_PACKET: L.SAMPLE_BY_PACKET, SAMPLING_BY_FLOW: L.SAMPLE_BY_FLOW}


def rule_sampling_entry(own: Sampling, d: ResolvedDestination | None) -> L.RuleSampling:
    """A rule's own sampling as the datapath takes it: whole (N and mode), what the rule
    leaves unset taken from its destination."""
    e = L.RuleSampling()
    every, mode = own.over(d.sampling, d.sampling_mode) if d else \
        own.over(1, SAMPLING_BY_PACKET)
    e.sample_every, e.sample_by = every, SAMPLE_BY[mode]
    return e


def copy_fit_flags(d: Destination) -> int:
    """The datapath's flags for how a destination's copies fit the path."""
    flags = {"exact": L.DEST_SEGMENTS_EXACT, "fit": L.DEST_SEGMENTS_FIT}.get(d.segments, 0)
    return flags | (L.DEST_FRAGMENT if d.oversize == "fragment" else 0)


@dataclass
class Plan:
    """Exact map contents, plus the names behind every number."""

    maps: dict[str, dict[bytes, bytes]]
    rule_slots: dict[int, tuple[str, int]] = field(default_factory=dict)  # slot -> (owner, i)
    dest_slots: dict[str, int] = field(default_factory=dict)
    ifslots: dict[str, int] = field(default_factory=dict)  # interface key -> slot


# ---------------------------------------------------------------------------- helpers
def _addr_words(addr: str | None) -> bytes:
    """An address as the datapath stores it: 16 bytes, IPv4 in the first four."""
    if not addr:
        return bytes(16)
    ip = ipaddress.ip_address(addr)
    return ip.packed.ljust(16, b"\0")


def _mac_bytes(mac: str | None) -> bytes:
    if not mac:
        return bytes(6)
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6:
        raise PlanError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


@functools.lru_cache(maxsize=4096)
def _bitmap_value(bits: int) -> bytes:
    """MatchBits bytes for a rule bitmap (bit i = rule slot i). Cached: equal bitmaps are
    one bytes object, however many keys of the tries hold them."""
    summary, word, rest = 0, 0, bits
    while rest:
        if rest & 0xFFFFFFFFFFFFFFFF:
            summary |= 1 << word
        rest >>= 64
        word += 1
    return summary.to_bytes(L.SUMMARY_WORDS * 8, "little") + \
        bits.to_bytes(L.RULE_WORDS * 8, "little")


def port_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """The fewest (value, prefix length) blocks of the 16-bit port space covering lo..hi."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


Prefix = tuple[int, int]  # (value with the host bits cleared, prefix length)
Block = tuple[Prefix, tuple[Prefix, ...]]  # a prefix and its exceptions


class _Trie:
    """One LPM trie's contents, kept from plan to plan: which rules' blocks are where, and
    the value of every key. Over `width` bits.

    A rule covers a key prefix when one of its blocks contains the key and none of that
    block's exceptions does. Every block and exception becomes a key; the longest-prefix
    match then gives, for any address, exactly the rules whose sets contain it. When the
    blocks of a few rules change, only the keys under what changed are worked out again.
    """

    def __init__(self, width: int, cls: type, nbytes: int):
        self.width, self.cls, self.nbytes = width, cls, nbytes
        self.slots: dict[int, tuple[Block, ...]] = {}  # rule slot -> its blocks
        self.at: dict[Prefix, list[tuple[int, tuple[Prefix, ...]]]] = {}  # -> (slot, excepts)
        self.refs: dict[Prefix, int] = {}  # key -> blocks and exceptions naming it
        self.entries: dict[bytes, bytes] = {}  # the map: LPM key -> MatchBits
        self._contents: dict[bytes, bytes] | None = None  # a copy, while entries are unchanged

    def norm(self, value: int, plen: int) -> Prefix:
        shift = self.width - plen
        return (value >> shift << shift, plen)

    def contents(self) -> dict[bytes, bytes]:
        """The map's entries, as a dict of their own: the same dict from one plan to the
        next while they do not change (the MapWriter then skips the map at once)."""
        if self._contents is None:
            self._contents = dict(self.entries)
        return self._contents

    def update(self, wanted: dict[int, tuple[Block, ...]]) -> None:
        """Make the trie hold exactly `wanted` (rule slot -> its blocks)."""
        touched: set[Prefix] = set()
        at, refs = self.at, self.refs
        for slot in [s for s, blocks in self.slots.items() if wanted.get(s) != blocks]:
            for prefix, excepts in self.slots.pop(slot):
                left = [x for x in at.get(prefix, ()) if x[0] != slot]
                if left:
                    at[prefix] = left
                else:
                    at.pop(prefix, None)
                for key in (prefix, *excepts):
                    touched.add(key)
                    n = refs[key] - 1
                    if n:
                        refs[key] = n
                    else:
                        del refs[key]
        for slot, blocks in wanted.items():
            if slot in self.slots:
                continue
            self.slots[slot] = blocks
            for prefix, excepts in blocks:
                found = at.get(prefix)
                if found is None:
                    at[prefix] = [(slot, excepts)]
                else:
                    found.append((slot, excepts))
                for key in (prefix, *excepts):
                    touched.add(key)
                    refs[key] = refs.get(key, 0) + 1
        if not touched:
            return
        self._contents = None
        width, nbytes = self.width, self.nbytes
        # The keys under a changed prefix may change: just those keys when only host
        # prefixes changed, else every key.
        if any(plen < width for _, plen in touched):
            affected = touched | set(refs)
        else:
            affected = touched
        levels = [(length, width - length) for length in sorted({plen for _, plen in at})]
        pad = bytes(C.sizeof(self.cls) - 4 - nbytes)
        entries = self.entries
        for key in affected:
            value, plen = key
            lpm = _PLEN_BYTES[plen] + value.to_bytes(nbytes, "big") + pad
            if key in refs:
                entries[lpm] = _bitmap_value(self._bits(key, levels))
            else:
                entries.pop(lpm, None)

    def _bits(self, key: Prefix, levels: list[tuple[int, int]]) -> int:
        """The rules covering `key`; levels: (prefix length, shift) where blocks are."""
        value, plen = key
        width, get, bits = self.width, self.at.get, 0
        for length, shift in levels:
            if length > plen:
                break
            found = get((value >> shift << shift, length))
            if found:
                for slot, excepts in found:
                    if not excepts or not any(_contains(e, key, width) for e in excepts):
                        bits |= 1 << slot
        return bits


_PLEN_BYTES = [plen.to_bytes(4, "little") for plen in range(129)]


def _contains(outer: Prefix, inner: Prefix, width: int) -> bool:
    (ov, op), (iv, ip) = outer, inner
    return op <= ip and (iv >> (width - op) if op else 0) == (ov >> (width - op) if op else 0)


def _lpm_key(cls, plen: int, value: int, nbytes: int) -> bytes:
    """The key of an LPM trie: prefix length (host order), then the bytes (network order)."""
    raw = plen.to_bytes(4, "little") + value.to_bytes(nbytes, "big")
    return raw.ljust(C.sizeof(cls), b"\0")


TRIES = {"src_v4": (32, L.LpmV4Key, 4), "dst_v4": (32, L.LpmV4Key, 4),
         "src_v6": (128, L.LpmV6Key, 16), "dst_v6": (128, L.LpmV6Key, 16),
         "ports": (24, L.LpmPortKey, 3)}


# ---------------------------------------------------------------------------- plan
def plan(state: NodeState, ifindexes: dict[str, int],
         destinations: dict[str, ResolvedDestination], ifslots: dict[str, int],
         node_budget: CopyBudget | None = None) -> Plan:
    """The maps' contents for `state` (a Planner's first plan).

    ifindexes: interface key -> host-side ifindex (interfaces without one are skipped);
    destinations: name -> how this node reaches it; ifslots: interface key -> slot, the
    allocation to keep (new interfaces get free slots).
    """
    return Planner().plan(state, ifindexes, destinations, ifslots, node_budget)


class Planner:
    """``plan()`` that keeps the tries' contents from one plan to the next, so that the
    cost of a plan follows what changed: the keys of the rules whose address or port sets
    changed. ``Planner().plan(...)`` is ``plan(...)``; a Planner's later plans equal a
    fresh plan of the same arguments."""

    def __init__(self) -> None:
        self.tries = {name: _Trie(*spec) for name, spec in TRIES.items()}
        # Endpoint sets (the compiler hands the same tuple while a set is unchanged) as
        # blocks by IP version, for the plan just made.
        self._endpoints: dict[int, tuple[EndpointSet, dict[int, tuple[Block, ...]]]] = {}

    def _endpoint_blocks(self, endpoints: EndpointSet, seen: dict) -> dict[int, tuple]:
        if endpoints is None:  # ANY
            return {4: (((0, 0), ()),), 6: (((0, 0), ()),)}
        hit = self._endpoints.get(id(endpoints))
        if hit is None or hit[0] is not endpoints:
            hit = (endpoints, _endpoint_blocks(endpoints, self.tries))
        seen[id(endpoints)] = hit
        return hit[1]

    def plan(self, state: NodeState, ifindexes: dict[str, int],
             destinations: dict[str, ResolvedDestination], ifslots: dict[str, int],
             node_budget: CopyBudget | None = None) -> Plan:
        maps: dict[str, dict[bytes, bytes]] = {m: {} for m in MANAGED_MAPS}
        result = Plan(maps)
        # The node's copy budget (None: none), in the slot no destination has.
        if node_budget and (node_budget.pps or node_budget.bps):
            maps["copy_limits"][_u32(L.COPY_LIMITS_NODE)] = bytes(
                L.copy_limits_entry(pps=node_budget.pps, bps=node_budget.bps))

        # Destination slots: 1.. by name (0 means none).
        names = sorted(destinations)
        if len(names) >= L.MAX_DESTINATIONS:
            raise PlanError(f"{len(names)} destinations; the datapath holds "
                            f"{L.MAX_DESTINATIONS - 1}")
        for slot, name in enumerate(names, start=1):
            d = destinations[name]
            result.dest_slots[name] = slot
            e = L.DestEntry()
            e.mode = int(d.mode)  # even with a problem: its copies are then counted as drops
            e.udp_port = d.udp_port
            e.vlan_id = d.vlan_id
            e.vni = d.vni
            e.out_ifindex = d.out_ifindex
            e.mtu = d.mtu
            C.memmove(C.addressof(e) + L.DestEntry.src_addr.offset, _addr_words(d.src_addr),
                      16)
            C.memmove(C.addressof(e) + L.DestEntry.dst_addr.offset, _addr_words(d.dst_addr),
                      16)
            C.memmove(C.addressof(e) + L.DestEntry.mac.offset, _mac_bytes(d.mac), 6)
            if d.mode == L.Mode.VXLAN and d.dst_addr and ":" in d.dst_addr:
                e.flags = L.DEST_VTEP_IPV6
            e.flags |= d.fit_flags
            maps["destinations"][_u32(slot)] = bytes(e)
            if d.mode == L.Mode.ENCAP4 and d.encap:
                maps["encaps"][_u32(slot)] = d.encap
            limits = L.copy_limits_entry(d.sampling, d.snap_length, d.budget_pps,
                                         d.budget_bps, SAMPLE_BY[d.sampling_mode])
            if any(bytes(limits)):
                maps["copy_limits"][_u32(slot)] = bytes(limits)
            # Traffic to the analyzer is a stream of copies: never mirror it. (GRE formats
            # have no port: their copies carry COPY_MARK on this node, like every copy.)
            if d.dst_addr and (d.mode in (L.Mode.JMIRROR4, L.Mode.JMIRROR6, L.Mode.VXLAN) or
                               (d.mode == L.Mode.ENCAP4 and d.udp_port)):
                ak = L.AnalyzerKey()
                C.memmove(C.addressof(ak), _addr_words(d.dst_addr), 16)
                port = d.udp_port if d.mode != L.Mode.VXLAN else L.VXLAN_PORT
                ak.port = int.from_bytes(port.to_bytes(2, "big"), "little")
                ak.family = L.FAMILY_V6 if ":" in d.dst_addr else L.FAMILY_V4
                maps["analyzers"][bytes(ak)] = b"\x01"

        # Rule slots: 1.. in policy order, rule order; then port mirrors.
        wanted: dict[str, dict[int, tuple[Block, ...]]] = {name: {} for name in TRIES}
        seen: dict = {}
        iface_bits: dict[str, int] = {}
        slot = 1
        for policy in state.policies:
            first = slot
            for rule in policy.rules:
                if slot >= L.MAX_RULES:
                    raise PlanError(f"more than {L.MAX_RULES - 1} rules on this node")
                result.rule_slots[slot] = (policy.name, rule.index)
                for side, endpoints in (("src", rule.src), ("dst", rule.dst)):
                    for version, blocks in self._endpoint_blocks(endpoints, seen).items():
                        wanted[f"{side}_v{version}"][slot] = blocks
                wanted["ports"][slot] = _port_blocks(rule.ports)
                slot += 1
            end = slot
            for s in range(first, end):
                rule = policy.rules[s - first]
                r = L.RuleEntry()
                r.mirror_id = rule.mirror_id
                r.policy_end = end
                dslot = result.dest_slots.get(rule.destination or "", 0)
                if dslot:
                    r.dest = dslot
                    r.flags = L.RULE_MIRRORS
                    if rule.sampling:
                        r.flags |= L.RULE_OWN_SAMPLING
                        maps["rule_sampling"][_u32(s)] = bytes(rule_sampling_entry(
                            rule.sampling, destinations.get(rule.destination)))
                maps["rules"][_u32(s)] = bytes(r)
            bits = ((1 << end) - 1) ^ ((1 << first) - 1)
            for key in policy.interfaces:
                iface_bits[key] = iface_bits.get(key, 0) | bits
        self._endpoints = seen
        for name, trie in self.tries.items():
            trie.update(wanted[name])
            maps[name] = trie.contents()

        # Interfaces: keep their slots, give new ones the lowest free.
        used = {s for k, s in ifslots.items() if k in ifindexes}
        for iface in sorted(state.interfaces, key=lambda i: i.key):
            if iface.key not in ifindexes:
                continue
            islot = ifslots.get(iface.key)
            if not islot:
                islot = next(s for s in range(1, L.MAX_INTERFACES + 1) if s not in used)
                if islot >= L.MAX_INTERFACES:
                    raise PlanError(f"more than {L.MAX_INTERFACES - 1} interfaces on this "
                                    "node")
                used.add(islot)
            result.ifslots[iface.key] = islot
            e = L.InterfaceEntry()
            e.ifslot = islot
            e.session_id = iface.session_id
            for pm in iface.port_mirrors:
                if slot >= L.MAX_RULES:
                    raise PlanError(f"more than {L.MAX_RULES - 1} rules on this node")
                dslot = result.dest_slots.get(pm.destination, 0)
                r = L.RuleEntry(mirror_id=pm.mirror_id, dest=dslot, policy_end=slot + 1,
                                flags=L.RULE_MIRRORS if dslot else 0)
                maps["rules"][_u32(slot)] = bytes(r)
                result.rule_slots[slot] = (f"port:{iface.key}:{pm.destination}", 0)
                for d in (L.Dir.EGRESS, L.Dir.INGRESS):
                    want = Direction.EGRESS if d == L.Dir.EGRESS else Direction.INGRESS
                    if pm.direction.covers(want) and not e.port_rule[d]:
                        e.port_rule[d] = slot
                slot += 1
            bits = iface_bits.get(iface.key, 0)
            if bits:
                e.flags |= L.IFACE_HAS_POLICIES
                raw = _bitmap_value(bits)
                C.memmove(C.addressof(e) + L.InterfaceEntry.summary.offset, raw, len(raw))
            maps["interfaces"][_u32(ifindexes[iface.key])] = bytes(e)
            maps["sessions"][_u32(islot)] = _u32(iface.session_id)
        return result


def _u32(v: int) -> bytes:
    return int(v).to_bytes(4, "little")


def _prefix(cidr: str) -> tuple[int, int, int]:
    """(IP version, value, prefix length) of a CIDR (host bits may be set)."""
    addr, _, plen = cidr.partition("/")
    if ":" in addr:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, addr), "big"), \
            int(plen or 128)
    return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big"), int(plen or 32)


def _endpoint_blocks(endpoints: tuple, tries: dict[str, _Trie]) -> dict[int, tuple]:
    """An endpoint set's blocks, by IP version (4, 6), each block's exceptions of its own
    version only."""
    out: dict[int, list[Block]] = {}
    for block in endpoints:
        version, value, plen = _prefix(block.cidr)
        trie = tries[f"src_v{version}"]
        excepts = []
        for e in block.excepts:
            ev, evalue, eplen = _prefix(e)
            if ev == version:
                excepts.append(trie.norm(evalue, eplen))
        out.setdefault(version, []).append((trie.norm(value, plen), tuple(excepts)))
    return {version: tuple(blocks) for version, blocks in out.items()}


@functools.lru_cache(maxsize=1024)
def _port_blocks(ports: tuple[PortRange, ...]) -> tuple[Block, ...]:
    """The (protocol, port) trie's blocks for a rule's ports: 8 bits of protocol, then 16
    of port."""
    if not ports:
        return (((0, 0), ()),)  # every protocol, every port
    out = []
    for pr in ports:
        if pr.port_lo is None:
            out.append(((pr.protocol << 16, 8), ()))
            continue
        hi = pr.port_hi if pr.port_hi is not None else pr.port_lo
        for value, plen in port_prefixes(pr.port_lo, hi):
            shift = 16 - plen
            out.append((((pr.protocol << 16) | (value >> shift << shift), 8 + plen), ()))
    return tuple(out)


# ---------------------------------------------------------------------------- writing
class CapacityError(PlanError):
    """A plan holds more entries than a map can: found before anything is written."""


class MapWriteError(RuntimeError):
    """A write failed part-way. ``restored``: every entry written before the failure was
    put back, so the maps hold exactly what they held before (and the generation was
    bumped so that no verdict taken meanwhile survives); else ``unrestored`` entries
    could not be put back and the maps hold part of the new plan."""

    def __init__(self, message: str, restored: bool, unrestored: int = 0):
        super().__init__(message)
        self.restored = restored
        self.unrestored = unrestored


# The order new and changed entries are written in, so that nothing referenced is
# missing (interfaces last: they make the rest reachable); removals go the other way.
WRITE_ORDER = ("encaps", "copy_limits", "destinations", "rule_sampling", "rules", "src_v4",
               "dst_v4", "src_v6", "dst_v6", "ports", "analyzers", "sessions", "interfaces")


class MapWriter:
    """Writes plans into the maps, touching only entries that differ; all or nothing.

    Before anything is written, every map's capacity is checked against the plan (a
    plan that does not fit is refused whole: CapacityError). Every write then goes into
    a journal of what the entry held before; if one fails (the kernel ran out of memory,
    say), the journal is played back in reverse, the counters zeroed on the way are put
    back, and the generation is bumped: flows evaluated while the maps were half written
    are evaluated again, against the previous state, which the maps hold again whole.
    """

    def __init__(self, maps: dict, adopt: bool = True,
                 capacities: dict[str, int] | None = None):
        self.maps = maps
        self.written: dict[str, dict[bytes, bytes]] = {m: {} for m in MANAGED_MAPS}
        # map -> the plan's dict last written in full (a plan may hand the same dict again)
        self._applied: dict[str, dict[bytes, bytes]] = {}
        # map -> most entries it takes (from the kernel's map info unless given)
        self.capacities = dict(capacities) if capacities is not None else \
            map_capacities(maps)
        # map -> slot key -> the object the slot holds (a rule, a destination's name, an
        # interface), from the last plan written; unknown for adopted slots. A slot's
        # counters restart only when it is given to another object: a destination
        # re-resolved (its MTU, next hop or reachability changed) keeps its counters.
        self.owners: dict[str, dict[bytes, object]] = {}
        if adopt:
            for m in MANAGED_MAPS:
                zero = bytes(maps[m].value_size)
                values: dict[bytes, bytes] = {}  # equal values held once (tries repeat them)
                self.written[m] = {k: values.setdefault(v, v) for k, v in maps[m].items()
                                   if v != zero}

    def current_ifslots(self) -> dict[int, int]:
        """ifindex -> interface slot, as found in the maps (for adoption after restart)."""
        out = {}
        for k, v in self.written["interfaces"].items():
            e = L.InterfaceEntry.from_buffer_copy(v)
            out[int.from_bytes(k, "little")] = e.ifslot
        return out

    def check_capacity(self, p: Plan) -> None:
        """Raise CapacityError when a map cannot hold what the plan puts in it."""
        for m in MANAGED_MAPS:
            cap = self.capacities.get(m)
            if cap is None:
                continue
            want = p.maps[m]
            if m in ARRAY_MAPS:
                top = max((int.from_bytes(k, "little") for k in want), default=-1)
                if top >= cap:
                    raise CapacityError(f"map {m} has {cap} slots; the plan needs slot {top}")
            elif len(want) > cap:
                raise CapacityError(f"map {m} holds {cap} entries; the plan needs "
                                    f"{len(want)}")

    def apply(self, p: Plan) -> int:
        """Write the plan; returns the number of entries written or removed. Raises
        CapacityError (nothing written) or MapWriteError (see the class)."""
        self.check_capacity(p)
        applied, self._applied = self._applied, {}
        journal: list[tuple[str, bytes, bytes | None]] = []  # (map, key, value before)
        stats: list[tuple[str, bytes, list[bytes]]] = []  # counters zeroed, as they were
        owners = slot_owners(p)
        try:
            changes = self._write(p, applied, journal, stats, owners)
        except Exception as e:
            raise self._undo(journal, stats, e) from e
        if changes:
            self.bump_generation()
        self._applied = dict(p.maps)  # all written: the next plan may skip what it shares
        self.owners = owners
        return changes

    def _write(self, p: Plan, applied: dict, journal: list, stats: list,
               owners: dict[str, dict[bytes, object]]) -> int:
        changes = 0

        def counters_restart(m: str, k: bytes, entry_changed: bool) -> bool:
            """A slot's counters restart when it is given to another object, even with
            the very same entry (two destinations to one analyzer, one after the other).
            A slot whose object is not known (new, or adopted after a restart) restarts
            only when its entry changes: an adopted slot keeps its counters."""
            before = self.owners.get(m, {}).get(k)
            if before is None:
                return entry_changed
            return before != owners.get(m, {}).get(k)

        def remove_stale(m: str) -> int:
            want, have = p.maps[m], self.written[m]
            n = 0
            for k in [k for k in have if k not in want]:
                journal.append((m, k, have[k]))
                if m in ARRAY_MAPS:
                    self._reset_stats(m, k, stats)
                    self.maps[m].update(k, bytes(self.maps[m].value_size))
                else:
                    self.maps[m].delete(k)
                del have[k]
                n += 1
            return n

        # New and changed entries first, so that nothing referenced is missing...
        for m in WRITE_ORDER:
            want, have = p.maps[m], self.written[m]
            if want is applied.get(m):  # the very contents written last time: no change
                continue
            cap = self.capacities.get(m)
            if m not in ARRAY_MAPS and cap is not None and \
                    len(have) + sum(1 for k in want if k not in have) > cap:
                # Old and new entries together would not fit: this map's stale entries
                # go first (still journaled, so a failure puts them back).
                changes += remove_stale(m)
            for k, v in want.items():
                old = have.get(k)
                if counters_restart(m, k, old != v):
                    self._reset_stats(m, k, stats)
                if old != v:
                    journal.append((m, k, old))
                    self.maps[m].update(k, v)
                    have[k] = v
                    changes += 1
        # ...then what is no longer wanted, interfaces first (they reference the rest).
        for m in reversed(WRITE_ORDER):
            if p.maps[m] is applied.get(m):
                continue
            changes += remove_stale(m)
        return changes

    def _undo(self, journal: list, stats: list, cause: Exception) -> MapWriteError:
        """Put back every journaled entry (newest first); the error to raise."""
        failed = 0
        # The first value journaled for a key is what it held before this write. Entries
        # that were added go first (freeing what they took), then the rest is put back.
        first: dict[tuple[str, bytes], bytes | None] = {}
        for m, k, old in journal:
            first.setdefault((m, k), old)
        undo = sorted(first.items(), key=lambda item: item[1] is not None)
        for (m, k), old in undo:
            have = self.written[m]
            try:
                if old is None and m in ARRAY_MAPS:  # an array slot that was empty
                    self.maps[m].update(k, bytes(self.maps[m].value_size))
                    have.pop(k, None)
                elif old is None:
                    self.maps[m].delete(k)
                    have.pop(k, None)
                else:
                    self.maps[m].update(k, old)
                    have[k] = old
            except Exception as e:  # noqa: BLE001 - counted and said below
                failed += 1
                log.error("could not put back %s entry %s: %s", m, k.hex(), e)
        for name, k, per_cpu in reversed(stats):
            try:
                self.maps[name].update_percpu(k, per_cpu)
            except Exception as e:  # counters only: the verdicts are whole
                log.warning("could not put back counters %s[%s]: %s", name, k.hex(), e)
        try:
            self.bump_generation()  # verdicts taken while the maps were half written
        except Exception as e:
            failed += 1
            log.error("could not bump the generation after a failed write: %s", e)
        what = f"{len(first)} entries written before the failure"
        if failed:
            return MapWriteError(
                f"writing the maps failed ({cause}); {failed} of the {what} could not be "
                "put back: the datapath holds part of the new state until the next "
                "reconcile writes it whole", restored=False, unrestored=failed)
        return MapWriteError(f"writing the maps failed ({cause}); the {what} were put "
                             "back: the datapath holds the previous state whole",
                             restored=True)

    def _reset_stats(self, m: str, key: bytes, saved: list | None = None) -> None:
        stats = STATS_OF.get(m)
        if stats and stats in self.maps:
            if saved is not None:
                before = self.maps[stats].lookup(key)
                if before is not None:
                    saved.append((stats, key, before))
            self.maps[stats].update(key, bytes(self.maps[stats].value_size))

    def bump_generation(self) -> None:
        cfg = self.config()
        cfg.generation = (cfg.generation + 1) & 0xFFFFFFFF
        self.maps["config"].update(_u32(0), bytes(cfg))

    def config(self) -> L.Config:
        raw = self.maps["config"].lookup(_u32(0))
        return L.Config.from_buffer_copy(raw)

    def set_sampling_seed(self, seed: int) -> None:
        """Flow sampling's hash seed (0: the default); a change re-evaluates every flow
        (the generation), so each is sampled by the new seed."""
        cfg = self.config()
        if cfg.sample_seed != seed:
            cfg.sample_seed = seed
            cfg.generation = (cfg.generation + 1) & 0xFFFFFFFF
            self.maps["config"].update(_u32(0), bytes(cfg))

    def set_mirror_port(self, ifindex: int) -> None:
        cfg = self.config()
        if cfg.mirror_ifindex != ifindex:
            cfg.mirror_ifindex = ifindex
            self.maps["config"].update(_u32(0), bytes(cfg))


def slot_owners(p: Plan) -> dict[str, dict[bytes, object]]:
    """What each counted slot of a plan holds: rule slots their (policy or port mirror,
    index), destination slots their name, interface slots their interface."""
    return {"rules": {_u32(s): owner for s, owner in p.rule_slots.items()},
            "destinations": {_u32(s): name for name, s in p.dest_slots.items()},
            "sessions": {_u32(s): key for key, s in p.ifslots.items()}}


def map_capacities(maps: dict) -> dict[str, int]:
    """Most entries each managed map takes, as the kernel created it (its map info);
    maps without an fd (test doubles) are left out and not checked."""
    from .bpfsys import map_info

    out = {}
    for m in MANAGED_MAPS:
        fd = getattr(maps.get(m), "fd", None)
        if isinstance(fd, int):
            out[m] = map_info(fd).max_entries
    return out


def destination_mode(d: Destination) -> L.Mode:
    from .state import DeliveryMode

    if d.mode == DeliveryMode.JMIRROR:
        if d.encapsulation.format != "jmirror":
            return L.Mode.ENCAP4  # other formats: IPv4 outer only (resolve_destination)
        ip = ipaddress.ip_address(d.analyzer_ip) if d.analyzer_ip else None
        return L.Mode.JMIRROR6 if ip and ip.version == 6 else L.Mode.JMIRROR4
    return {DeliveryMode.L2: L.Mode.L2, DeliveryMode.VXLAN: L.Mode.VXLAN,
            DeliveryMode.VLAN: L.Mode.VLAN}[d.mode]
