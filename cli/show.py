"""``cn2mirror show``, ``explain`` and ``ids``: what the datapath does, and why.

``show`` reads the maps pinned under the pin root (agent/pinned.py) without compiling
anything, so it works while the agent runs and after it died. Numbers in the maps (rule,
destination and interface slots) are turned into names with the names file the agent
writes, ``<state dir>/names.json`` (agent/node.py describe()); without it, numbers only.

``explain`` loads objects from files, compiles one node's state and says which policies
and rules a flow matches and where its copies go (agent/compiler.py explain()); with
``--pin-root`` it also shows what the datapath's flow table holds for that flow.

``ids`` maps mirror and session identifiers (what an analyzer sees in jmirror headers)
back to policy rules, port mirrors and pod interfaces.

The JSON shapes are stable, carry "version": 1 and are documented in docs/cli.md.
Exit codes: 0 success, 1 failure (nothing pinned, no privilege, unknown id), 2 usage.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import click

from cn2mirror.agent import layout as L
from cn2mirror.agent.bpfsys import BpfError
from cn2mirror.agent.datapath import DEFAULT_PIN_ROOT
from cn2mirror.agent.node import DEFAULT_STATE_DIR
from cn2mirror.agent.pinned import CounterTotals, NotPinned, PinnedMaps, sum_counters

from .output import (
    JSON_VERSION,
    emit,
    human_bytes,
    human_duration,
    note,
    output_option,
    render_table,
    section,
)

NAMES_FILE = "names.json"
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
PROTOCOL_NUMBERS = {v: k for k, v in PROTOCOL_NAMES.items()}
ECHO_PROTOCOLS = (1, 58)  # ICMP echo: the identifier stands in both port fields
CAP_SYS_ADMIN, CAP_BPF = 21, 39


# ============================================================================ options
def pin_root_option(f):
    return click.option(
        "--pin-root", metavar="DIR", default=DEFAULT_PIN_ROOT, show_default=True,
        # readable=False: a root-only pin root (0700) gets the "needs root" message
        # below, not a usage error
        envvar="CN2MIRROR_PIN_ROOT", type=click.Path(file_okay=False, readable=False),
        help="Where the agent pinned its maps (the agent's --pin-root). "
             "Env: CN2MIRROR_PIN_ROOT.")(f)


def state_dir_option(f):
    return click.option(
        "--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR, show_default=True,
        envvar="CN2MIRROR_STATE_DIR", type=click.Path(file_okay=False, readable=False),
        help=f"The agent's state directory; names come from <DIR>/{NAMES_FILE}. "
             "Env: CN2MIRROR_STATE_DIR.")(f)


def _common(f):
    return pin_root_option(state_dir_option(output_option(f)))


# ============================================================================ errors
def privileged() -> bool:
    """Whether this process may use bpf() on pinned objects (CAP_BPF or CAP_SYS_ADMIN)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps & (1 << CAP_BPF) or caps & (1 << CAP_SYS_ADMIN))
    except OSError:
        pass
    return os.geteuid() == 0


NEED_ROOT = ("reading the pinned maps needs root (CAP_BPF or CAP_SYS_ADMIN): "
             "run it with sudo")


def _pinned_below(directory: str) -> list[str]:
    """Directories right under `directory` that hold a cn2mirror pin set."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names
            if os.path.exists(os.path.join(directory, n, "flows"))]


def open_maps(pin_root: str) -> PinnedMaps:
    """PinnedMaps, or a ClickException (exit 1) saying what is wrong and how to fix it."""
    try:
        pm = PinnedMaps(pin_root)
        pm.config()  # the first bpf() call: privilege problems show here
        return pm
    except NotPinned as e:
        if not privileged():
            raise click.ClickException(NEED_ROOT) from e
        hint = ""
        found = _pinned_below(pin_root)
        if found:
            hint = f"; cn2mirror pins were found in {', '.join(found)}: use --pin-root " \
                   f"{found[0]}"
        elif pin_root.rstrip("/") != DEFAULT_PIN_ROOT:
            hint = f" (the default pin root is {DEFAULT_PIN_ROOT})"
        raise click.ClickException(f"{e}{hint}") from e
    except (BpfError, PermissionError) as e:
        if getattr(e, "errno", None) in (errno.EPERM, errno.EACCES) or not privileged():
            raise click.ClickException(NEED_ROOT) from e
        raise click.ClickException(f"cannot read the maps under {pin_root}: {e}") from e


class _MapErrors:
    """Turns errors while reading maps (after opening them) into clear messages."""

    def __init__(self, pin_root: str):
        self.pin_root = pin_root

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, NotPinned):
            raise click.ClickException(
                f"{exc}: the pin set under {self.pin_root} is incomplete (an agent of "
                "another version, or one being removed)") from exc
        if isinstance(exc, BpfError):
            raise click.ClickException(f"reading the maps under {self.pin_root}: {exc}") \
                from exc
        return False


# ============================================================================ names
@dataclass
class Names:
    """What the numbers in the maps stand for: <state dir>/names.json, when present."""

    path: str
    available: bool = False
    reason: str | None = None
    node: str | None = None
    rules: dict[int, dict] = field(default_factory=dict)
    destinations: dict[int, dict] = field(default_factory=dict)
    interfaces: dict[int, dict] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: str) -> Names:
        path = os.path.join(state_dir, NAMES_FILE)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return cls(path, reason=f"{path} does not exist (the agent writes it; is "
                                    "--state-dir the agent's?)")
        except (OSError, ValueError) as e:
            return cls(path, reason=f"cannot read {path}: {e}")
        if not isinstance(data, dict) or data.get("version") != 1:
            return cls(path, reason=f"{path} is not a version 1 names file")

        def slots(key: str) -> dict[int, dict]:
            out = {}
            for k, v in (data.get(key) or {}).items():
                try:
                    out[int(k)] = v if isinstance(v, dict) else {}
                except ValueError:
                    continue
            return out

        return cls(path, True, None, data.get("node"), slots("rules"), slots("destinations"),
                   slots("interfaces"), dict(data.get("problems") or {}))

    def mismatch(self, text: str) -> None:
        if text not in self.mismatches:
            self.mismatches.append(text)

    def as_json(self) -> dict:
        return {"available": self.available, "path": self.path, "reason": self.reason,
                "node": self.node, "problems": dict(self.problems),
                "mismatches": list(self.mismatches)}

    def rule(self, slot: int) -> dict:
        """The names of a rule slot (all None when unknown)."""
        n = self.rules.get(slot) or {}
        kind = None
        if n:
            kind = "port" if n.get("port_mirror") else "policy"
        return {"kind": kind, "policy": n.get("policy"), "rule": n.get("rule"),
                "port_mirror": n.get("port_mirror"), "direction": n.get("direction")}

    def dest_name(self, slot: int) -> str | None:
        return (self.destinations.get(slot) or {}).get("name") if slot else None

    def interface(self, ifslot: int) -> dict:
        return self.interfaces.get(ifslot) or {}


def _names_notes(names: Names) -> None:
    """Table mode: tell a person when names are missing or do not fit the maps."""
    if not names.available:
        note(f"note: names unavailable ({names.reason}); showing numbers only")
    for obj, why in sorted(names.problems.items()):
        note(f"note: the agent could not apply {obj}: {why}")
    for m in names.mismatches:
        note(f"warning: names.json does not match the maps: {m} (the agent may have "
             "changed the datapath since it wrote the file)")


def _header(pm: PinnedMaps, names: Names) -> dict:
    cfg = pm.config()
    return {"version": JSON_VERSION, "pin_root": pm.pin_root, "generation": cfg.generation,
            "mirror_ifindex": cfg.mirror_ifindex, "names": names.as_json()}


def _title(data: dict) -> str:
    node = data["names"]["node"]
    where = f"node {node}, " if node else ""
    return f"{where}pin root {data['pin_root']}, generation {data['generation']}"


# ============================================================================ decoding
def _addr(words, family: int | None) -> str | None:
    raw = bytes(words)
    if raw == bytes(16):
        return None
    if family == L.FAMILY_V4 or (family is None and raw[4:] == bytes(12)):
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def _mac(raw) -> str | None:
    b = bytes(raw)
    return None if b == bytes(6) else ":".join(f"{x:02x}" for x in b)


def _mode_name(mode: int) -> str:
    try:
        return L.Mode(mode).name.lower()
    except ValueError:
        return f"mode{mode}"


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


def _slots(words) -> list[int]:
    out = []
    for w, v in enumerate(words):
        v = int(v)
        while v:
            low = v & -v
            out.append(w * 64 + low.bit_length() - 1)
            v ^= low
    return out


def _counters(t: CounterTotals) -> dict:
    d = t.as_dict()
    d["dropped"] = sum(d["drops"].values())
    return d


def _nonzero(t: CounterTotals) -> bool:
    return any((t.cloned, t.packets, t.bytes, t.truncated, t.fragmented,
                *(t.drops or {}).values()))


# ============================================================================ collecting
def _copy(slot: int, rules: dict[int, L.RuleEntry], names: Names) -> dict:
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
        slots = _slots(e.bits)
        policies = sorted({p for s in slots if (p := names.rule(s)["policy"])})
        port = {}
        for d in L.Dir:
            slot = e.port_rule[d]
            port[d.name.lower()] = _copy(slot, rules, names) if slot else None
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


def _attachment_reader(pin_root: str, netns: str | None):
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


def _chain_text(a: dict | None) -> tuple[str, str]:
    """(ATTACH, CHAIN) cells: "tcx", "in 1/2 eg 1/1" (our position / programs)."""
    if not a:
        return "-", "-"
    if a.get("error"):
        return "?", a["error"][:40]
    cells = []
    for d, short in (("ingress", "in"), ("egress", "eg"), ("pod ingress", "pod-in")):
        if d not in a:
            continue
        h = a.get(d) or {}
        mark = "!" if h.get("problem") and a["attach"] else ""
        cells.append(f"{short} {h.get('position', 0)}/{h.get('of', 0)}{mark}")
    return a["attach"] or "none", " ".join(cells)


def collect_rules(pm: PinnedMaps, names: Names) -> list[dict]:
    out = []
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
            **n,
        })
    return out


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
            "slot": slot, "name": n.get("name"), "mode": _mode_name(d.mode),
            "delivery": n.get("mode"), "analyzer_pod": n.get("analyzer_pod"),
            "address": _addr(d.dst_addr, family),
            "source_address": _addr(d.src_addr, family),
            "udp_port": d.udp_port if jm else None,
            "mac": _mac(d.mac),
            "vni": d.vni if mode is L.Mode.VXLAN else None,
            "vlan_id": d.vlan_id if mode is L.Mode.VLAN else None,
            "out_ifindex": d.out_ifindex or None,
            "mtu": d.mtu,
        })
    return out


def _endpoint(addr: str | None, port: int, proto: int) -> dict:
    return {"address": addr, "port": port if proto not in ECHO_PROTOCOLS else None,
            "echo_id": port if proto in ECHO_PROTOCOLS and port else None}


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
        lo = _endpoint(_addr(k.addr_lo, fam) or _zero_addr(fam), socket.ntohs(k.port_lo), proto)
        hi = _endpoint(_addr(k.addr_hi, fam) or _zero_addr(fam), socket.ntohs(k.port_hi), proto)
        n = min(v.n_rules, len(v.rules))
        iface = names.interface(k.ifslot)
        out.append({
            "ifslot": k.ifslot, "interface": iface.get("key"), "pod": iface.get("pod"),
            "family": fam, "protocol": protocol_name(proto), "protocol_number": proto,
            "lo": lo, "hi": hi,
            "initiator": "lo" if v.flags & L.FLOW_INITIATOR_LO else "hi",
            "age_s": round(max(0, now - v.first_seen_ns) / 1e9, 3),
            "idle_s": round(max(0, now - v.last_seen_ns) / 1e9, 3),
            "first_seen_ns": v.first_seen_ns, "last_seen_ns": v.last_seen_ns,
            "packets": v.packets, "bytes": v.bytes,
            "mirrored": n > 0,
            "copies": [_copy(int(s), rules, names) for s in list(v.rules)[:n]],
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
            for f in ("cloned", "packets", "bytes", "truncated", "fragmented", "gso_wrapped",
                      "gso_by_segment"):
                setattr(total, f, getattr(total, f) + getattr(t, f))
        for reason, n in (t.drops or {}).items():
            if only is None or reason == only:
                total.drops[reason] += n

    rule_rows = []
    for slot, t in sorted(per_slot("rule").items()):
        add(t)
        if slot in rules or _nonzero(t):
            r = rules.get(slot)
            rule_rows.append({"slot": slot, "configured": slot in rules,
                              "mirror_id": r.mirror_id if r else None,
                              "destination": names.dest_name(r.dest) if r else None,
                              **names.rule(slot), "counters": _counters(t)})
    iface_rows = []
    for slot, t in sorted(per_slot("iface").items()):
        add(t, only=L.Drop.FLOW_LIMIT.name.lower())
        if slot in ifaces or _nonzero(t):
            idx, e = ifaces.get(slot, (None, None))
            n = names.interface(slot)
            iface_rows.append({"ifslot": slot, "configured": slot in ifaces,
                               "interface": n.get("key"), "pod": n.get("pod"),
                               "ifindex": idx, "session_id": e.session_id if e else None,
                               "counters": _counters(t)})
    dest_rows = []
    for slot, t in sorted(per_slot("dest").items()):
        if slot in dests or _nonzero(t):
            dest_rows.append({"slot": slot, "configured": slot in dests,
                              "name": names.dest_name(slot), "counters": _counters(t)})
    node_wide = pm.counters("node", 0)
    add(node_wide)
    return {"rules": rule_rows, "interfaces": iface_rows, "destinations": dest_rows,
            "node": {"counters": _counters(total), "node_wide": _counters(node_wide)}}


# ============================================================================ tables
def _rule_label(c: dict) -> str:
    if c.get("kind") == "port":
        return f"port mirror {c['port_mirror']} ({c.get('direction') or '?'})"
    if c.get("kind") == "policy":
        return f"{c['policy']} rule {c['rule']}"
    return f"rule slot {c.get('rule_slot', c.get('slot'))}"


def _dest_label(name: str | None, slot: int | None) -> str:
    return name or (f"destination slot {slot}" if slot else "-")


def _copy_label(c: dict) -> str:
    return f"{_dest_label(c['destination'], c['dest_slot'])} " \
           f"(mid {c['mirror_id']}, {_rule_label(c)})"


def _iface_label(row: dict, slot_key: str = "ifslot") -> str:
    return row.get("interface") or f"ifslot {row[slot_key]}"


def _table_interfaces(data: dict) -> str:
    rows = []
    for i in data["interfaces"]:
        port = ", ".join(f"{d}: {_dest_label(c['destination'], c['dest_slot'])} "
                         f"(mid {c['mirror_id']})"
                         for d, c in i["port_mirror"].items() if c)
        pols = i["policies"]
        policies = ", ".join(pols) if pols else (f"{len(i['rule_slots'])} rules"
                                                 if i["rule_slots"] else "-")
        attach, chain = _chain_text(i.get("attachment"))
        rows.append([i["pod"] or "-", i["pod_ifname"] or "-", i["ifindex"], i["ifslot"],
                     i["session_id"], attach, chain, policies, port or "-"])
    text = section(_title(data), render_table(
        ["POD", "IFACE", "IFINDEX", "SLOT", "SESSION-ID", "ATTACH", "CHAIN", "POLICIES",
         "PORT-MIRROR"], rows, empty="(no pod interface is attached)"))
    notes = []
    for i in data["interfaces"]:
        a = i.get("attachment") or {}
        for d in ("ingress", "egress", "pod ingress"):
            problem = (a.get(d) or {}).get("problem")
            if problem and a.get("attach"):
                notes.append(f"  {i['interface'] or i['ifindex']} {d}: {problem}")
    if notes:
        text += ("\nCHAIN is our position / the programs in the hook, tcx first; "
                 "problems (the agent's resync repairs what it can):\n" + "\n".join(notes))
    return text


def _table_rules(data: dict) -> str:
    rows = []
    for r in data["rules"]:
        if r["kind"] == "port":
            owner, what = f"port mirror {r['port_mirror']}", r["direction"] or "-"
        elif r["kind"] == "policy":
            owner, what = r["policy"], r["rule"]
        else:
            owner, what = "-", "-"
        dest = _dest_label(r["destination"], r["dest_slot"]) if r["mirrors"] else "(no mirror)"
        rows.append([r["slot"], owner, what, r["mirror_id"], dest])
    return section(_title(data), render_table(
        ["SLOT", "POLICY", "RULE", "MIRROR-ID", "DESTINATION"], rows,
        empty="(no rules configured)"))


def _table_destinations(data: dict) -> str:
    rows = []
    for d in data["destinations"]:
        if d["mode"] in ("jmirror4", "jmirror6"):
            where = f"{d['address']} udp {d['udp_port']}"
        elif d["mode"] == "encap4":  # another output format: its name is in "delivery"
            where = f"{d['address']}" + (f" udp {d['udp_port']}" if d["udp_port"] else " gre")
        elif d["mode"] == "vxlan":
            where = f"vtep {d['address']} vni {d['vni']}" + (f" mac {d['mac']}" if d["mac"]
                                                            else "")
        elif d["mode"] == "vlan":
            where = f"vlan {d['vlan_id']} out ifindex {d['out_ifindex']}"
        elif d["mode"] == "l2":
            where = f"mac {d['mac']} out ifindex {d['out_ifindex']}"
        else:
            where = "-"
        rows.append([d["slot"], d["name"] or "-", d["mode"], where, d["analyzer_pod"] or "-",
                     d["source_address"] or "-", d["mtu"]])
    return section(_title(data), render_table(
        ["SLOT", "NAME", "MODE", "ANALYZER", "POD", "SOURCE", "MTU"], rows,
        empty="(no destinations configured)"))


def _ep_text(ep: dict) -> str:
    a = ep["address"]
    if ep["port"]:
        return f"[{a}]:{ep['port']}" if ":" in a else f"{a}:{ep['port']}"
    return a


def flow_text(f: dict) -> str:
    text = f"{_ep_text(f['lo'])} <-> {_ep_text(f['hi'])}"
    if f["lo"]["echo_id"] is not None:
        text += f" id {f['lo']['echo_id']}"
    return text


def _table_flows(data: dict) -> str:
    rows = []
    for f in data["flows"]:
        state = []
        if f["stale"]:
            state.append("stale")
        if f["overflow"]:
            state.append("overflow")
        if f["never_mirror"]:
            state.append("copy-stream")
        copies = "; ".join(_copy_label(c) for c in f["copies"]) or "(not mirrored)"
        rows.append([_iface_label(f), f["protocol"], flow_text(f), f["initiator"],
                     human_duration(f["age_s"]), human_duration(f["idle_s"]), f["packets"],
                     f["bytes"], copies, ",".join(state) or "ok"])
    return section(_title(data), render_table(
        ["INTERFACE", "PROTO", "FLOW (LO <-> HI)", "INIT", "AGE", "IDLE", "PACKETS",
         "BYTES", "MIRRORED TO", "STATE"], rows, empty="(no flows)"))


def _drops_text(c: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in c["drops"].items() if v) or "-"


def _counter_row(label: str, c: dict) -> list:
    return [label, c["cloned"], c["packets"], human_bytes(c["bytes"]), c["truncated"],
            c.get("fragmented", 0), c["dropped"], _drops_text(c)]


COUNTER_HEADERS = ["CLONED", "COPIES", "BYTES", "TRUNCATED", "FRAGMENTED", "DROPPED", "DROPS"]


def _table_stats(data: dict) -> str:
    s = data["stats"]

    def gone(row: dict) -> str:
        return "" if row["configured"] else " (freed)"

    parts = [_title(data)]
    parts.append(section("Rules:", render_table(
        ["RULE", *COUNTER_HEADERS],
        [_counter_row(_rule_label(r) + (f" mid {r['mirror_id']}" if r["mirror_id"] else "")
                      + gone(r), r["counters"]) for r in s["rules"]], indent="  ")))
    parts.append(section("Interfaces:", render_table(
        ["INTERFACE", *COUNTER_HEADERS],
        [_counter_row(_iface_label(i) + gone(i), i["counters"]) for i in s["interfaces"]],
        indent="  ")))
    parts.append(section("Destinations:", render_table(
        ["DESTINATION", *COUNTER_HEADERS],
        [_counter_row(_dest_label(d["name"], d["slot"]) + gone(d), d["counters"])
         for d in s["destinations"]], indent="  ")))
    node = s["node"]
    parts.append(section("Node:", render_table(
        ["", *COUNTER_HEADERS],
        [_counter_row("total", node["counters"]), _counter_row("node-wide", node["node_wide"])],
        indent="  ")))
    reasons = render_table(["DROP REASON", "TOTAL", "NODE-WIDE"],
                           [[k, v, node["node_wide"]["drops"][k]]
                            for k, v in node["counters"]["drops"].items()], indent="  ")
    parts.append(section("Drops by reason (node):", reasons))
    return "\n\n".join(parts)


# ============================================================================ show
SHOW_EPILOG = """\b
Examples:
  cn2mirror show interfaces
  cn2mirror show flows --pod demo/web
  cn2mirror show stats -o json | jq '.stats.node.counters'
  cn2mirror show rules --pin-root /sys/fs/bpf/cn2mirror --state-dir /run/cn2mirror

Reads the maps the agent pinned (default /sys/fs/bpf/cn2mirror): works while the agent
runs and after it stopped. Names come from <state-dir>/names.json; without it, numbers.
Needs root. JSON shapes: docs/cli.md.
"""


@click.group(epilog=SHOW_EPILOG)
def show():
    """Read the pinned maps: interfaces, rules, destinations, flows, counters."""


def _run_show(kind: str, pin_root: str, state_dir: str, fmt: str, collect, table) -> None:
    pm = open_maps(pin_root)
    try:
        with _MapErrors(pin_root):
            names = Names.load(state_dir)
            data = _header(pm, names)
            data["kind"] = kind
            data[kind] = collect(pm, names)
            data["names"] = names.as_json()  # after collecting: with the mismatches
    finally:
        pm.close()
    if fmt == "table":
        _names_notes(names)
    emit(data, fmt, table)


@show.command("interfaces", short_help="Attached pod interfaces: pod, ifindex, session id.",
              epilog="""\b
Example:
  cn2mirror show interfaces -o json | jq '.interfaces[] | {pod, session_id}'
""")
@click.option("--netns", metavar="NAME",
              help="The agent's network namespace (its --netns), where the attachments "
                   "are read [default: this process's].")
@_common
def show_interfaces(netns, pin_root, state_dir, fmt):
    """Pod interfaces the classifier is attached to: pod, interface, ifindex, session id,
    how it is attached (tcx or legacy clsact) and where it sits in each direction's
    chain, the policies applied and port mirroring."""
    dp, read = _attachment_reader(pin_root, netns)
    try:
        _run_show("interfaces", pin_root, state_dir, fmt,
                  lambda pm, names: collect_interfaces(pm, names, read), _table_interfaces)
    finally:
        dp.close()


@show.command("rules", short_help="Rule slots: policy, rule, mirror id, destination.", epilog="""\b
Example:
  cn2mirror show rules -o json | jq '.rules[] | select(.mirror_id == 123)'
""")
@_common
def show_rules(pin_root, state_dir, fmt):
    """Rule slots: policy and rule index (or port mirror), mirror id, destination."""
    _run_show("rules", pin_root, state_dir, fmt, collect_rules, _table_rules)


@show.command("destinations", short_help="Analyzers: mode, address/MAC/VNI/VLAN, MTU.", epilog="""\b
Example:
  cn2mirror show destinations
""")
@_common
def show_destinations(pin_root, state_dir, fmt):
    """Destinations: name, delivery mode, analyzer address/MAC/VNI/VLAN, MTU."""
    _run_show("destinations", pin_root, state_dir, fmt, collect_destinations,
              _table_destinations)


@show.command("flows", short_help="Flow table: both directions, age, copies, stale.", epilog="""\b
Examples:
  cn2mirror show flows
  cn2mirror show flows --pod demo/web --mirrored
  cn2mirror show flows -o json | jq '.flows[] | select(.stale)'

One line per flow, both directions: the lower (address, port) side <-> the higher one;
INIT says which side sent the first packet. AGE counts from the first packet, IDLE
from the last. A stale flow was decided under an older policy generation: it is
evaluated again on its next packet.
""")
@_common
@click.option("--pod", metavar="NS/NAME", help="Only flows on this pod's interfaces "
              "(needs names.json).")
@click.option("--mirrored", is_flag=True, help="Only flows that are mirrored somewhere.")
@click.option("--rule", metavar="POLICY[#N]", help="Only flows copied by this policy "
              "(namespace/name, or name for a global one), or by its rule N (from 0); "
              "a port mirror by its MirrorDestination name (needs names.json).")
@click.option("--mirror-id", type=click.IntRange(0), help="Only flows copied with this "
              "mirror id.")
@click.option("--destination", metavar="NAME", help="Only flows copied to this "
              "MirrorDestination (needs names.json).")
@click.option("--protocol", "protocol_text", metavar="PROTO",
              help="Only this protocol: tcp, udp, icmp, icmpv6, sctp or a number.")
@click.option("--port", type=click.IntRange(0, 65535), help="Only flows with this port on "
              "either side.")
def show_flows(pin_root, state_dir, fmt, pod, mirrored, rule, mirror_id, destination,
               protocol_text, port):
    """Flow table: both directions in one line, age, packets and bytes mirrored, where
    copies go, stale entries. Filters combine (all must hold)."""
    protocol = _protocol(protocol_text) if protocol_text is not None else None
    wanted = flow_filter(pod=pod, mirrored=mirrored, rule=rule, mirror_id=mirror_id,
                         destination=destination, protocol=protocol, port=port)

    def collect(pm, names):
        if (pod or rule or destination) and not names.available:
            raise click.ClickException(f"--pod, --rule and --destination need names: "
                                       f"{names.reason}")
        return [f for f in collect_flows(pm, names) if wanted(f)]

    _run_show("flows", pin_root, state_dir, fmt, collect, _table_flows)


def _copy_is(c: dict, rule: str) -> bool:
    policy, _, index = rule.partition("#")
    if c.get("kind") == "port":
        return not index and c.get("port_mirror") == policy
    return c.get("policy") == policy and (not index or str(c.get("rule")) == index)


def flow_filter(pod=None, mirrored=False, rule=None, mirror_id=None, destination=None,
                protocol=None, port=None):
    """A predicate over collect_flows() rows: every given filter must hold."""
    def wanted(f: dict) -> bool:
        copies = f["copies"]
        ports = {f["lo"]["port"], f["hi"]["port"]}
        return ((pod is None or f["pod"] == pod)
                and (not mirrored or f["mirrored"])
                and (rule is None or any(_copy_is(c, rule) for c in copies))
                and (mirror_id is None or any(c["mirror_id"] == mirror_id for c in copies))
                and (destination is None or any(c["destination"] == destination
                                                for c in copies))
                and (protocol is None or f["protocol_number"] == protocol)
                and (port is None or port in ports))
    return wanted


@show.command("stats", short_help="Counters per rule/interface/destination/node.", epilog="""\b
Examples:
  cn2mirror show stats
  cn2mirror show stats -o json | jq '.stats.node.counters.drops'

CLONED: clones handed to the mirror port; COPIES/BYTES: copies sent to the analyzer (as
sent, wrapped); TRUNCATED: copies cut to the destination's MTU (also in COPIES);
DROPPED: copies not delivered, by reason. The datapath counts cloned and clone_failed
per rule only, flow_limit per interface only, and foreign/rx_blocked per node only.
""")
@_common
@click.option("--watch", "-w", is_flag=True, help="Refresh in place every --interval: "
              "rates per rule, interface and destination (with -o json: one JSON line "
              "per refresh).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              metavar="SECONDS", help="With --watch: time between refreshes.")
@click.option("--count", type=click.IntRange(min=1), metavar="N",
              help="With --watch: stop after N refreshes (default: until Ctrl-C).")
def show_stats(pin_root, state_dir, fmt, watch, interval, count):
    """Counters per rule, interface, destination and node, drops by reason."""
    if not watch:
        _run_show("stats", pin_root, state_dir, fmt, collect_stats, _table_stats)
        return
    from cn2mirror.cli.watch import watch_stats

    def read() -> dict:
        pm = open_maps(pin_root)
        try:
            with _MapErrors(pin_root):
                return collect_stats(pm, Names.load(state_dir))
        finally:
            pm.close()

    watch_stats(read, fmt, interval, count, labels=(_rule_label, _iface_label, _dest_label))


@show.command("problems", short_help="What the agent could not apply, and why.", epilog="""\b
Examples:
  cn2mirror show problems
  cn2mirror show problems -o json | jq '.problems[] | select(.origin == "source")'

Read from <state-dir>/status.json, which the agent rewrites after every reconcile: objects
refused by the source (a file's YAML, an object the API server would refuse) with what
stays in use instead, objects the compiler rejected (capacity, references, selectors),
interfaces and destinations the datapath could not place, and failed reconciles. ORIGIN:
source, compiler, datapath or agent. Needs no root and no pins.
""")
@state_dir_option
@output_option
def show_problems(state_dir, fmt):
    """Objects, interfaces and destinations the agent could not apply, and why."""
    from cn2mirror.agent.runtime import STATUS_FILE

    path = os.path.join(state_dir, STATUS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
    except FileNotFoundError:
        raise click.ClickException(f"{path} does not exist: is an agent running with "
                                   f"--state-dir {state_dir}?") from None
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read {path}: {e}") from None
    data = {"version": 1, "kind": "problems", "node": status.get("node"),
            "ready": status.get("ready"), "reconciles": status.get("reconciles"),
            "problems": status.get("errors") or []}

    def table(d: dict) -> str:
        head = (f"node {d['node']}: {'ready' if d['ready'] else 'NOT ready'}, "
                f"{d['reconciles']} reconciles, {len(d['problems'])} problems")
        if not d["problems"]:
            return head
        return head + "\n\n" + render_table(
            ["ORIGIN", "OBJECT", "REASON"],
            [[p["origin"], f"{p['kind']} {p['name']}".strip(), p["reason"]]
             for p in d["problems"]])

    emit(data, fmt, table)


# ============================================================================ explain
EXPLAIN_EPILOG = """\b
Examples:
  kubectl get namespaces,pods,mirrordestinations,csp,gcsp -A -o yaml > cluster.yaml
  cn2mirror explain --source cluster.yaml --node node1 \\
      --pod demo/client --dst 198.18.1.2 --protocol tcp --dport 80
  cn2mirror explain --source cluster.yaml --pod demo/client --dst demo/web --protocol tcp \\
      --sport 80 --direction ingress --established       # the reply, mid-flow
  cn2mirror explain --source cluster.yaml --pod demo/web --dst demo/client --protocol icmp
  cn2mirror explain --source cluster.yaml --node node1 --src 198.18.1.3 --dst 198.18.1.2 \\
      --protocol udp --dport 53 --established --pin-root /sys/fs/bpf/cn2mirror

The packet asked about goes from --pod/--src to --dst (--direction ingress: the other
way). A TCP packet is taken to be the SYN that opens the flow; --established asks about
a packet met mid-flow (after an agent restart), for which a policy that matches nothing
is tried again with the packet reversed. With --pin-root, the datapath's flow table
entry for this flow (if any) is shown and compared with the explanation.
"""


def _protocol(value: str) -> int:
    if value.isdigit():
        n = int(value)
        if 0 <= n <= 255:
            return n
    n = PROTOCOL_NUMBERS.get(value.lower())
    if n is None:
        raise click.BadParameter(
            f"{value!r}: use one of {', '.join(sorted(PROTOCOL_NUMBERS))} or a number 0-255",
            param_hint="--protocol")
    return n


def _protocol_complete(ctx, param, incomplete):
    return [p for p in sorted(PROTOCOL_NUMBERS) if p.startswith(incomplete.lower())]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _find_pod(snapshot, key: str, option: str):
    from cn2mirror.agent.model import ModelError, parse_pod

    ns, _, name = key.partition("/")
    if not ns or not name:
        raise click.BadParameter(f"{key!r}: give the pod as NAMESPACE/NAME", param_hint=option)
    for obj in snapshot.pods:
        meta = obj.get("metadata") or {}
        if meta.get("namespace") == ns and meta.get("name") == name:
            try:
                return parse_pod(obj)
            except ModelError as e:
                raise click.ClickException(f"pod {key} is invalid: {e}") from e
    raise click.BadParameter(f"no pod {key} in the objects loaded", param_hint=option)


def _pod_ip(pod, option: str, version: int | None) -> str:
    ips = [ip for i in pod.interfaces for ip in i.ips]
    if not ips:
        raise click.BadParameter(f"pod {pod.key} has no IP address (status.podIPs)",
                                 param_hint=option)
    if version is not None:
        same = [ip for ip in ips if ipaddress.ip_address(ip).version == version]
        if not same:
            raise click.BadParameter(f"pod {pod.key} has no IPv{version} address",
                                     param_hint=option)
        return same[0]
    return next((ip for ip in ips if ipaddress.ip_address(ip).version == 4), ips[0])


def _explanation_json(state, exp, established: bool) -> dict:
    from cn2mirror.agent.compiler import REVERSE

    by_key = {i.key: i for i in state.interfaces}
    interfaces = []
    for ie in exp.interfaces:
        iface = by_key.get(ie.interface)
        matched = {m.policy: m for m in ie.matches}
        policies = []
        for p in state.policies:
            if ie.interface not in p.interfaces:
                continue
            m = matched.get(p.name)
            rules = {r.index: r for r in p.rules}
            policies.append({
                "policy": p.name, "matched": m is not None,
                "orientation": m.orientation if m else None,
                "matching_rules": list(m.matching_rules) if m else [],
                "deciding_rule": m.deciding_rule if m else None,
                "destination": m.destination if m else None,
                "mirror_id": (m.mirror_id or None) if m else None,
                "rules": [{"rule": r.index, "destination": r.destination,
                           "mirror_id": r.mirror_id or None,
                           "matches": m is not None and r.index in m.matching_rules}
                          for r in rules.values()],
            })
        interfaces.append({
            "interface": ie.interface, "pod": iface.pod if iface else None,
            "session_id": iface.session_id if iface else None,
            "direction": ie.direction.value if ie.direction else "transit",
            "policies": policies,
            "port_mirrors": [{"destination": pm.destination, "direction": pm.direction.value,
                              "mirror_id": pm.mirror_id}
                             for pm in (iface.port_mirrors if iface else ())],
            "copies": [_copy_json(c) for c in ie.copies],
        })
    notes = []
    proto = exp.protocol
    if proto == 6 and not established:
        notes.append("A TCP packet is taken to be the SYN that opens the flow: a policy "
                     "that matches nothing is not tried reversed (use --established for a "
                     "packet met mid-flow, e.g. after an agent restart).")
    else:
        notes.append("Reverse-orientation fallback: a policy none of whose rules matches the "
                     "packet as it goes is evaluated again with the packet reversed (source "
                     "and destination, and ports, swapped), so that a flow met mid-way is "
                     "mirrored as its opening packet would have been.")
    for ie in exp.interfaces:
        for m in ie.matches:
            if m.orientation == REVERSE:
                notes.append(f"On {ie.interface}, policy {m.policy} matches only with the "
                             f"packet reversed (the fallback): rule {m.deciding_rule} decides.")
    if proto in (6, 17, 132) and exp.dst_port is None:
        notes.append("No --dport: only rules without port restrictions can match.")
    notes.append("The first packet's verdict is cached for the flow: both directions of "
                 "the flow are mirrored to the same copies (port mirrors: per packet, by "
                 "direction).")
    if not exp.interfaces:
        notes.append(f"Neither {exp.src_ip} nor {exp.dst_ip} is an address of a pod "
                     f"interface that node {state.node} mirrors: nothing is mirrored here.")
    return {"interfaces": interfaces, "copies": [_copy_json(c) for c in exp.copies],
            "notes": notes}


def _copy_json(c) -> dict:
    return {"destination": c.destination, "mirror_id": c.mirror_id,
            "session_id": c.session_id, "interface": c.interface, "cause": c.cause}


def _same_flow(f: dict, src: str, dst: str, proto: int, sport: int | None,
               dport: int | None) -> bool:
    if f["protocol_number"] != proto:
        return False
    lo, hi = f["lo"], f["hi"]
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    for x, y, px, py in ((lo, hi, sport, dport), (hi, lo, sport, dport)):
        if ipaddress.ip_address(x["address"]) != a or ipaddress.ip_address(y["address"]) != b:
            continue
        if proto in ECHO_PROTOCOLS:
            return True
        if (px is None or x["port"] == px) and (py is None or y["port"] == py):
            return True
    return False


def _compare(pin_root: str, state_dir: str, src: str, dst: str, proto: int,
             sport: int | None, dport: int | None, explained: dict) -> dict:
    pm = open_maps(pin_root)
    try:
        with _MapErrors(pin_root):
            names = Names.load(state_dir)
            generation = pm.config().generation
            flows = [f for f in collect_flows(pm, names)
                     if _same_flow(f, src, dst, proto, sport, dport)]
    finally:
        pm.close()
    expected_by_iface = {
        i["interface"]: sorted(c["mirror_id"] for c in i["copies"]
                               if c["cause"].startswith("policy"))
        for i in explained["interfaces"]}
    notes = []
    for f in flows:
        actual = sorted(c["mirror_id"] for c in f["copies"] if c["mirror_id"] is not None)
        if f["interface"] is not None:
            expected = expected_by_iface.get(f["interface"], [])
        else:
            expected = sorted({m for v in expected_by_iface.values() for m in v})
        f["expected_mirror_ids"] = expected
        f["agrees"] = actual == expected
        where = f["interface"] or f"interface slot {f['ifslot']}"
        if f["stale"]:
            notes.append(f"{where}: the entry is stale (generation {f['generation']}, config "
                         f"{generation}): its next packet is evaluated again.")
        init = f[f["initiator"]]["address"]
        if ipaddress.ip_address(init) != ipaddress.ip_address(src):
            notes.append(f"{where}: the datapath decided this flow on a first packet from "
                         f"{init}; the explanation is for a first packet from {src}.")
        if not f["agrees"]:
            notes.append(f"{where}: the datapath mirrors to mirror ids {actual or 'none'}, the "
                         f"objects say {expected or 'none'}.")
    if not flows:
        notes.append("No flow entry: the datapath has not seen this flow since its policies "
                     "last changed on an attached interface (or the entry was evicted).")
    return {"pin_root": pin_root, "generation": generation, "names": names.as_json(),
            "found": bool(flows), "agrees": all(f["agrees"] for f in flows) if flows else None,
            "flows": flows, "notes": notes}


def _table_explain(data: dict) -> str:
    f = data["flow"]

    def end(ip: str, port: int | None) -> str:
        if f["protocol_number"] in ECHO_PROTOCOLS and port is None:
            return ip
        where = f"[{ip}]" if ":" in ip else ip
        return f"{where}:{port if port is not None else '*'}"

    out = [f"node {data['node']}: {f['protocol']} {end(f['src_ip'], f['src_port'])} -> "
           f"{end(f['dst_ip'], f['dst_port'])}"
           + (" (established)" if f["established"] else "")]
    if not data["interfaces"]:
        out.append("  no local interface sees this flow")
    for i in data["interfaces"]:
        out.append(f"  interface {i['interface']} ({i['direction']}, session id "
                   f"{i['session_id']})")
        if not i["policies"]:
            out.append("    no policy applies to this interface")
        for n, p in enumerate(i["policies"], start=1):
            if not p["matched"]:
                out.append(f"    {n}. policy {p['policy']}: no rule matches")
                continue
            how = " (reversed: fallback)" if p["orientation"] == "reverse" else ""
            dest = (f"mirror to {p['destination']} (mirror id {p['mirror_id']})"
                    if p["destination"] else "no mirror (the rule ends the policy)")
            rules = p["matching_rules"]
            which = (f"rule {rules[0]} matches" if len(rules) == 1 else
                     f"rules {', '.join(map(str, rules))} match")
            out.append(f"    {n}. policy {p['policy']}{how}: {which}; rule "
                       f"{p['deciding_rule']} decides: {dest}")
        for c in i["copies"]:
            out.append(f"    copy -> {c['destination']} mirror id {c['mirror_id']} session id "
                       f"{c['session_id']} ({c['cause']})")
    if data["copies"]:
        out.append(f"copies: {len(data['copies'])}: " + "; ".join(
            f"{c['destination']} (mid {c['mirror_id']})" for c in data["copies"]))
    else:
        out.append("copies: none: this flow is not mirrored on this node")
    for e in data["object_errors"]:
        out.append(f"note: {e['kind']} {e['name']} is left out: {e['reason']}")
    for e in data["load_errors"]:
        out.append(f"note: {e}")
    out += [f"note: {n}" for n in data["notes"]]
    dp = data.get("datapath")
    if dp is not None:
        out.append(f"datapath ({dp['pin_root']}, generation {dp['generation']}):")
        if not dp["names"]["available"]:
            out.append(f"  names unavailable ({dp['names']['reason']})")
        for fl in dp["flows"]:
            copies = "; ".join(_copy_label(c) for c in fl["copies"]) or "not mirrored"
            verdict = "agrees" if fl["agrees"] else "DIFFERS"
            out.append(f"  {_iface_label(fl)}: {flow_text(fl)} init {fl['initiator']}, "
                       f"{fl['packets']} packets mirrored, {copies}"
                       f"{', stale' if fl['stale'] else ''}: {verdict}")
        out += [f"  note: {n}" for n in dp["notes"]]
    return "\n".join(out)


@click.command(epilog=EXPLAIN_EPILOG)
@click.option("--source", "sources", multiple=True, required=True, metavar="PATH",
              type=click.Path(exists=True),
              help="YAML file or directory of objects (pods, namespaces, policies, "
                   "MirrorDestinations); repeatable.")
@click.option("--node", metavar="NAME",
              help="The node to explain for (default: the --pod's node).")
@click.option("--pod", metavar="NS/NAME", help="The pod that sends the packet (its address "
              "is the source; --direction ingress: the destination).")
@click.option("--src", metavar="IP", help="The packet's source address (instead of --pod).")
@click.option("--dst", required=True, metavar="IP|NS/NAME",
              help="The other end: an address, or a pod as NAMESPACE/NAME.")
@click.option("--protocol", "protocol_text", required=True, metavar="PROTO",
              shell_complete=_protocol_complete,
              help="tcp, udp, sctp, icmp, icmpv6 or a protocol number.")
@click.option("--dport", type=click.IntRange(0, 65535), help="Destination port.")
@click.option("--sport", type=click.IntRange(0, 65535), help="Source port.")
@click.option("--direction", type=click.Choice(["egress", "ingress"]), default="egress",
              show_default=True,
              help="egress: from --pod/--src to --dst; ingress: from --dst to --pod/--src.")
@click.option("--established", is_flag=True,
              help="The packet is met mid-flow (not a TCP SYN): enables the reverse fallback.")
@click.option("--pin-root", metavar="DIR", type=click.Path(file_okay=False),
              help="Also show the datapath's flow entry for this flow, and compare.")
@state_dir_option
@output_option
def explain(sources, node, pod, src, dst, protocol_text, dport, sport, direction, established,
            pin_root, state_dir, fmt):
    """Which policies and rules a flow matches, in order, and where its copies go."""
    from cn2mirror.agent.compiler import compile_node
    from cn2mirror.agent.compiler import explain as compiler_explain
    from cn2mirror.agent.snapshot import load_paths

    if bool(pod) == bool(src):
        raise click.UsageError("give exactly one of --pod NS/NAME or --src IP")
    if src and not _is_ip(src):
        raise click.BadParameter(f"{src!r} is not an IP address", param_hint="--src")
    proto = _protocol(protocol_text)
    snapshot, load_errors = load_paths(sources)
    if not snapshot.objects():
        raise click.ClickException("no objects were loaded from " + ", ".join(sources) +
                                   "".join(f"\n  {e}" for e in load_errors))
    dst_pod = None
    if not _is_ip(dst):
        if "/" not in dst:
            raise click.BadParameter(f"{dst!r} is neither an IP address nor NAMESPACE/NAME",
                                     param_hint="--dst")
        dst_pod = _find_pod(snapshot, dst, "--dst")
    src_pod = _find_pod(snapshot, pod, "--pod") if pod else None
    if src_pod is not None:
        version = ipaddress.ip_address(dst).version if dst_pod is None else None
        src = _pod_ip(src_pod, "--pod", version)
    if dst_pod is not None:
        dst = _pod_ip(dst_pod, "--dst", ipaddress.ip_address(src).version)
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise click.BadParameter("source and destination are of different IP versions",
                                 param_hint="--dst")
    if node is None:
        node = src_pod.node if src_pod is not None else None
        if node is None:
            raise click.UsageError("give --node NAME (it defaults to the --pod's node)")
    nodes = sorted({p.get("spec", {}).get("nodeName") for p in snapshot.pods
                    if isinstance(p.get("spec"), dict) and p["spec"].get("nodeName")})
    if node not in nodes:
        raise click.BadParameter(
            f"no pod of the objects runs on node {node!r}"
            + (f" (nodes: {', '.join(nodes)})" if nodes else ""), param_hint="--node")
    if direction == "ingress":  # the addresses swap; the ports are the packet's own
        src, dst = dst, src

    state = compile_node(snapshot, node)
    exp = compiler_explain(state, src, dst, proto, dport, src_port=sport,
                           tcp_syn=False if established else None)
    data = {"version": JSON_VERSION, "node": node,
            "flow": {"src_ip": exp.src_ip, "dst_ip": exp.dst_ip,
                     "protocol": protocol_name(proto), "protocol_number": proto,
                     "src_port": sport, "dst_port": dport, "established": established},
            "load_errors": [str(e) for e in load_errors],
            "object_errors": [{"kind": e.kind, "name": e.name, "reason": e.reason}
                              for e in state.errors],
            **_explanation_json(state, exp, established),
            "datapath": None}
    if pin_root:
        data["datapath"] = _compare(pin_root, state_dir, exp.src_ip, exp.dst_ip, proto, sport,
                                    dport, data)
    emit(data, fmt, _table_explain)


# ============================================================================ ids
IDS_EPILOG = """\b
Examples:
  cn2mirror ids                                   # from /run/cn2mirror/names.json
  cn2mirror ids --mirror-id 496149920
  cn2mirror ids --source cluster.yaml --session-id 2861746051 -o json
  cn2mirror ids --source cluster.yaml --node node1

Mirror ids (jmirror.mid) stand for one policy rule or port mirror and are the same on
every node; session ids (jmirror.sid) for one pod interface. Without --source the names
file the agent wrote is read; with it, ids are computed from the objects (all nodes of
their pods, or --node; a policy that selects no scheduled pod has no ids there).
"""


def _key_parts(key: str) -> dict:
    """What a mirror-id key names: "csp/<ns>/<name>/rule/<i>", "gcsp/<name>/rule/<i>",
    "port/<ns>/<pod>/<ifname>/<destination>"."""
    parts = key.split("/")
    if parts[0] == "port" and len(parts) >= 5:
        return {"kind": "port", "policy": None, "rule": None,
                "interface": "/".join(parts[1:4]), "pod": "/".join(parts[1:3])}
    if parts[0] in ("csp", "gcsp") and len(parts) >= 4 and parts[-2] == "rule":
        return {"kind": "rule", "policy": "/".join(parts[1:-2]), "rule": int(parts[-1]),
                "interface": None, "pod": None}
    return {"kind": None, "policy": None, "rule": None, "interface": None, "pod": None}


def _ids_from_objects(sources: Iterable[str], node: str | None) -> tuple[dict, dict, list]:
    from cn2mirror.agent.compiler import compile_node, id_table, port_key, rule_key, session_table
    from cn2mirror.agent.snapshot import load_paths

    snapshot, load_errors = load_paths(sources)
    if not snapshot.objects():
        raise click.ClickException("no objects were loaded from " + ", ".join(sources))
    nodes = sorted({p["spec"]["nodeName"] for p in snapshot.pods
                    if isinstance(p.get("spec"), dict) and p["spec"].get("nodeName")})
    if node is not None:
        if node not in nodes:
            raise click.BadParameter(f"no pod of the objects runs on node {node!r}"
                                     + (f" (nodes: {', '.join(nodes)})" if nodes else ""),
                                     param_hint="--node")
        nodes = [node]
    mirrors: dict[int, dict] = {}
    sessions: dict[int, dict] = {}
    for n in nodes:
        state = compile_node(snapshot, n)
        keys = id_table(state)
        dests = {rule_key(r.policy, r.index): r.destination
                 for p in state.policies for r in p.rules}
        dests.update({port_key(i.key, m.destination): m.destination
                      for i in state.interfaces for m in i.port_mirrors})
        for mid, key in keys.items():
            entry = mirrors.setdefault(mid, {"mirror_id": mid, "key": key, **_key_parts(key),
                                             "destination": dests.get(key), "nodes": []})
            entry["nodes"].append(n)
        for sid, key in session_table(state).items():
            entry = sessions.setdefault(sid, {"session_id": sid, "interface": key,
                                              "pod": key.rsplit("/", 1)[0],
                                              "ifname": key.rsplit("/", 1)[1], "nodes": []})
            entry["nodes"].append(n)
    return mirrors, sessions, [str(e) for e in load_errors]


def _ids_from_names(names: Names) -> tuple[dict, dict]:
    from cn2mirror.agent.compiler import port_key, rule_key

    mirrors: dict[int, dict] = {}
    for _slot, r in sorted(names.rules.items()):
        mid = r.get("mirror_id")
        if not mid:
            continue
        if r.get("port_mirror"):
            key = port_key(r["port_mirror"], r.get("destination") or "")
        else:
            key = rule_key(r.get("policy") or "", r.get("rule") or 0)
        mirrors.setdefault(mid, {"mirror_id": mid, "key": key, **_key_parts(key),
                                 "destination": r.get("destination"),
                                 "nodes": [names.node] if names.node else []})
    sessions: dict[int, dict] = {}
    for _slot, i in sorted(names.interfaces.items()):
        sid, key = i.get("session_id"), i.get("key")
        if sid is None or not key:
            continue
        sessions.setdefault(sid, {"session_id": sid, "interface": key,
                                  "pod": i.get("pod") or key.rsplit("/", 1)[0],
                                  "ifname": key.rsplit("/", 1)[1],
                                  "nodes": [names.node] if names.node else []})
    return mirrors, sessions


def _table_ids(data: dict) -> str:
    parts = []
    rows = []
    for m in data["mirror_ids"]:
        what = (f"port mirror {m['interface']}" if m["kind"] == "port"
                else f"{m['policy']} rule {m['rule']}" if m["kind"] == "rule" else m["key"])
        rows.append([m["mirror_id"], what, m["destination"] or "-",
                     ",".join(m["nodes"]) or "-"])
    parts.append(section("Mirror ids:", render_table(
        ["MIRROR-ID", "MIRRORS", "DESTINATION", "NODES"], rows, indent="  ")))
    rows = [[s["session_id"], s["pod"], s["ifname"], ",".join(s["nodes"]) or "-"]
            for s in data["session_ids"]]
    parts.append(section("Session ids:", render_table(
        ["SESSION-ID", "POD", "IFACE", "NODES"], rows, indent="  ")))
    for e in data["load_errors"]:
        parts.append(f"note: {e}")
    return "\n\n".join(parts)


@click.command(epilog=IDS_EPILOG)
@click.option("--source", "sources", multiple=True, metavar="PATH",
              type=click.Path(exists=True),
              help="Compute the ids from these YAML files/directories instead of names.json.")
@click.option("--node", metavar="NAME", help="With --source: only this node's ids.")
@click.option("--mirror-id", type=click.IntRange(0, (1 << 30) - 1),
              help="Only this mirror id (jmirror.mid).")
@click.option("--session-id", type=click.IntRange(0, (1 << 32) - 1),
              help="Only this session id (jmirror.sid).")
@state_dir_option
@output_option
def ids(sources, node, mirror_id, session_id, state_dir, fmt):
    """Map mirror and session ids back to policies, rules and pods."""
    if node and not sources:
        raise click.UsageError("--node goes with --source (names.json is one node's)")
    load_errors: list[str] = []
    if sources:
        mirrors, sessions, load_errors = _ids_from_objects(sources, node)
        origin = {"kind": "objects", "paths": list(sources)}
    else:
        names = Names.load(state_dir)
        if not names.available:
            raise click.ClickException(
                f"names unavailable: {names.reason}. Give --source PATH (and --node) to "
                "compute the ids from the objects")
        mirrors, sessions = _ids_from_names(names)
        origin = {"kind": "names", "path": names.path}
    if mirror_id is not None:
        mirrors = {k: v for k, v in mirrors.items() if k == mirror_id}
        if session_id is None:
            sessions = {}
    if session_id is not None:
        sessions = {k: v for k, v in sessions.items() if k == session_id}
        if mirror_id is None:
            mirrors = {}
    data = {"version": JSON_VERSION, "source": origin,
            "mirror_ids": [mirrors[k] for k in sorted(mirrors)],
            "session_ids": [sessions[k] for k in sorted(sessions)],
            "load_errors": load_errors}
    emit(data, fmt, _table_ids)
    missing = []
    if mirror_id is not None and not mirrors:
        missing.append(f"mirror id {mirror_id}")
    if session_id is not None and not sessions:
        missing.append(f"session id {session_id}")
    if missing:
        raise click.ClickException(f"{' and '.join(missing)} not known ({origin['kind']})")
