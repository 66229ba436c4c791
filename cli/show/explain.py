"""``cn2mirror explain``: which policies and rules a flow matches, in order, and where
its copies go, from objects in files (agent/explain.py); with ``--pin-root``, compared
with the datapath's flow entry for that flow."""

from __future__ import annotations

import ipaddress

import click

from cn2mirror.agent import layout as L
from cn2mirror.agent import protocols
from cn2mirror.agent.statefiles import Names
from cn2mirror.cli.output import JSON_VERSION, emit, output_option

from .collect import collect_flows
from .common import MapErrors, complete_protocol, open_maps, parse_protocol, state_dir_option
from .tables import copy_label, flow_cell, iface_label

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
    from cn2mirror.agent.explain import REVERSE

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
    if proto in protocols.WITH_PORTS and exp.dst_port is None:
        notes.append("No --dport: only rules without port restrictions can match.")
    notes.append("The first packet's verdict is cached for the flow: both directions of "
                 "the flow are mirrored to the same copies (port mirrors: per packet, by "
                 "direction).")
    if not exp.interfaces:
        notes.append(f"Neither {exp.src_ip} nor {exp.dst_ip} is an address of a pod "
                     f"interface that node {state.node} mirrors: nothing is mirrored here.")
    return {"interfaces": interfaces, "copies": [_copy_json(c) for c in exp.copies],
            "notes": notes}


def _sampling_seed(pin_root: str) -> int | None:
    """The node's flow sampling seed, from its pinned config (None: not readable here;
    the datapath comparison then says why)."""
    try:
        pm = open_maps(pin_root)
    except (click.ClickException, OSError):
        return None
    try:
        raw = pm.map("config").lookup(bytes(4))
        return L.Config.from_buffer_copy(raw).sample_seed if raw else None
    except OSError:
        return None
    finally:
        pm.close()


def _copy_json(c) -> dict:
    return {"destination": c.destination, "mirror_id": c.mirror_id,
            "session_id": c.session_id, "interface": c.interface, "cause": c.cause,
            "sampling": c.sampling}


def _same_flow(f: dict, src: str, dst: str, proto: int, sport: int | None,
               dport: int | None) -> bool:
    if f["protocol_number"] != proto:
        return False
    lo, hi = f["lo"], f["hi"]
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    for x, y, px, py in ((lo, hi, sport, dport), (hi, lo, sport, dport)):
        if ipaddress.ip_address(x["address"]) != a or ipaddress.ip_address(y["address"]) != b:
            continue
        if proto in protocols.ICMPS:
            return True
        if (px is None or x["port"] == px) and (py is None or y["port"] == py):
            return True
    return False


def _compare(pin_root: str, state_dir: str, src: str, dst: str, proto: int,
             sport: int | None, dport: int | None, explained: dict) -> dict:
    pm = open_maps(pin_root)
    try:
        with MapErrors(pin_root):
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
        if f["protocol_number"] in protocols.ICMPS and port is None:
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
            copies = "; ".join(copy_label(c) for c in fl["copies"]) or "not mirrored"
            verdict = "agrees" if fl["agrees"] else "DIFFERS"
            out.append(f"  {iface_label(fl)}: {flow_cell(fl)} init {fl['initiator']}, "
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
              shell_complete=complete_protocol,
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
    from cn2mirror.agent.explain import explain as explain_flow
    from cn2mirror.agent.snapshot import load_paths

    if bool(pod) == bool(src):
        raise click.UsageError("give exactly one of --pod NS/NAME or --src IP")
    if src and not _is_ip(src):
        raise click.BadParameter(f"{src!r} is not an IP address", param_hint="--src")
    proto = parse_protocol(protocol_text)
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
    exp = explain_flow(state, src, dst, proto, dport, src_port=sport,
                       tcp_syn=False if established else None,
                       sampling_seed=_sampling_seed(pin_root) if pin_root else None)
    data = {"version": JSON_VERSION, "node": node,
            "flow": {"src_ip": exp.src_ip, "dst_ip": exp.dst_ip,
                     "protocol": protocols.name(proto), "protocol_number": proto,
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
