"""The tables ``show`` prints for people (``-o table``), one per kind, from the rows
collect.py gathers; and the labels other outputs (explain, --watch) share."""

from __future__ import annotations

from cn2mirror.agent import protocols
from cn2mirror.cli.output import human_bytes, human_duration, render_table, section

from .common import title


def rule_label(c: dict) -> str:
    if c.get("kind") == "port":
        return f"port mirror {c['port_mirror']} ({c.get('direction') or '?'})"
    if c.get("kind") == "policy":
        return f"{c['policy']} rule {c['rule']}"
    return f"rule slot {c.get('rule_slot', c.get('slot'))}"


def dest_label(name: str | None, slot: int | None) -> str:
    return name or (f"destination slot {slot}" if slot else "-")


def copy_label(c: dict) -> str:
    sampled = ", sampled out" if c.get("sampled_out") else ""
    return f"{dest_label(c['destination'], c['dest_slot'])} " \
           f"(mid {c['mirror_id']}, {rule_label(c)}{sampled})"


def iface_label(row: dict, slot_key: str = "ifslot") -> str:
    return row.get("interface") or f"ifslot {row[slot_key]}"


def chain_text(a: dict | None) -> tuple[str, str]:
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


def table_interfaces(data: dict) -> str:
    rows = []
    for i in data["interfaces"]:
        port = ", ".join(f"{d}: {dest_label(c['destination'], c['dest_slot'])} "
                         f"(mid {c['mirror_id']})"
                         for d, c in i["port_mirror"].items() if c)
        pols = i["policies"]
        policies = ", ".join(pols) if pols else (f"{len(i['rule_slots'])} rules"
                                                 if i["rule_slots"] else "-")
        attach, chain = chain_text(i.get("attachment"))
        rows.append([i["pod"] or "-", i["pod_ifname"] or "-", i["ifindex"], i["ifslot"],
                     i["session_id"], attach, chain, policies, port or "-"])
    text = section(title(data), render_table(
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


def table_rules(data: dict) -> str:
    rows = []
    for r in data["rules"]:
        if r["kind"] == "port":
            owner, what = f"port mirror {r['port_mirror']}", r["direction"] or "-"
        elif r["kind"] == "policy":
            owner, what = r["policy"], r["rule"]
        else:
            owner, what = "-", "-"
        dest = dest_label(r["destination"], r["dest_slot"]) if r["mirrors"] else "(no mirror)"
        own = r.get("sampling")
        sampling = f"1:{own['one_in']} by {own['by']}" if own else "(destination's)"
        rows.append([r["slot"], owner, what, r["mirror_id"], dest,
                     sampling if r["mirrors"] else "-"])
    return section(title(data), render_table(
        ["SLOT", "POLICY", "RULE", "MIRROR-ID", "DESTINATION", "SAMPLING"], rows,
        empty="(no rules configured)"))


def table_destinations(data: dict) -> str:
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
    return section(title(data), render_table(
        ["SLOT", "NAME", "MODE", "ANALYZER", "POD", "SOURCE", "MTU"], rows,
        empty="(no destinations configured)"))


def flow_cell(f: dict) -> str:
    """A collect_flows() row's two ends: "lo <-> hi", an echo's identifier last."""
    lo, hi = f["lo"], f["hi"]
    echo = lo["echo_id"]
    return protocols.flow_text(lo["address"], lo["port"] or None, hi["address"],
                               hi["port"] or None, arrow="<->",
                               detail=f"id {echo}" if echo is not None else "")


def table_flows(data: dict) -> str:
    rows = []
    for f in data["flows"]:
        state = []
        if f["stale"]:
            state.append("stale")
        if f["overflow"]:
            state.append("overflow")
        if f["never_mirror"]:
            state.append("copy-stream")
        copies = "; ".join(copy_label(c) for c in f["copies"]) or "(not mirrored)"
        rows.append([iface_label(f), f["protocol"], flow_cell(f), f["initiator"],
                     human_duration(f["age_s"]), human_duration(f["idle_s"]), f["packets"],
                     f["bytes"], copies, ",".join(state) or "ok"])
    return section(title(data), render_table(
        ["INTERFACE", "PROTO", "FLOW (LO <-> HI)", "INIT", "AGE", "IDLE", "PACKETS",
         "BYTES", "MIRRORED TO", "STATE"], rows, empty="(no flows)"))


def _drops_text(c: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in c["drops"].items() if v) or "-"


# The counter columns of `show stats`: (header, how a counters_json() dict gives the cell).
COUNTER_COLUMNS = (
    ("CLONED", lambda c: c["cloned"]),
    ("COPIES", lambda c: c["packets"]),
    ("BYTES", lambda c: human_bytes(c["bytes"])),
    ("TRUNCATED", lambda c: c["truncated"]),
    ("FRAGMENTED", lambda c: c.get("fragmented", 0)),
    ("SAMPLED-OUT", lambda c: c.get("sampled_out", 0)),
    ("RATE-LIMITED", lambda c: c["drops"].get("rate_limited", 0)),
    ("DROPPED", lambda c: c["dropped"]),
    ("DROPS", lambda c: _drops_text(c)),
)
COUNTER_HEADERS = [header for header, _ in COUNTER_COLUMNS]


def _counter_row(label: str, c: dict) -> list:
    return [label, *(cell(c) for _, cell in COUNTER_COLUMNS)]


def table_stats(data: dict) -> str:
    s = data["stats"]

    def gone(row: dict) -> str:
        return "" if row["configured"] else " (freed)"

    parts = [title(data)]
    parts.append(section("Rules:", render_table(
        ["RULE", *COUNTER_HEADERS],
        [_counter_row(rule_label(r) + (f" mid {r['mirror_id']}" if r["mirror_id"] else "")
                      + gone(r), r["counters"]) for r in s["rules"]], indent="  ")))
    parts.append(section("Interfaces:", render_table(
        ["INTERFACE", *COUNTER_HEADERS],
        [_counter_row(iface_label(i) + gone(i), i["counters"]) for i in s["interfaces"]],
        indent="  ")))
    parts.append(section("Destinations:", render_table(
        ["DESTINATION", *COUNTER_HEADERS],
        [_counter_row(dest_label(d["name"], d["slot"]) + gone(d), d["counters"])
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
    ft = s.get("flow_table")
    if ft:
        parts.append(section("Flow table:", render_table(
            ["ENTRIES", "CAPACITY", "CREATED", "EVICTED"],
            [[ft["entries"], ft["capacity"], ft["created"], ft["evicted"]]], indent="  ")))
    return "\n\n".join(parts)
