"""``cn2mirror show``: the group and its commands (interfaces, rules, destinations,
flows, stats, problems). Each reads the pins (collect.py) and prints a table (tables.py)
or JSON."""

from __future__ import annotations

import click

from cn2mirror.agent.statefiles import Names, StateFileError, read_status
from cn2mirror.cli.output import emit, output_option, render_table

from .collect import (
    attachment_reader,
    collect_destinations,
    collect_flows,
    collect_interfaces,
    collect_rules,
    collect_stats,
)
from .common import (
    MapErrors,
    common_options,
    header,
    names_notes,
    open_maps,
    parse_protocol,
    state_dir_option,
)
from .tables import (
    dest_label,
    iface_label,
    rule_label,
    table_destinations,
    table_flows,
    table_interfaces,
    table_rules,
    table_stats,
)

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
        with MapErrors(pin_root):
            names = Names.load(state_dir)
            data = header(pm, names)
            data["kind"] = kind
            data[kind] = collect(pm, names)
            data["names"] = names.as_json()  # after collecting: with the mismatches
    finally:
        pm.close()
    if fmt == "table":
        names_notes(names)
    emit(data, fmt, table)


@show.command("interfaces", short_help="Attached pod interfaces: pod, ifindex, session id.",
              epilog="""\b
Example:
  cn2mirror show interfaces -o json | jq '.interfaces[] | {pod, session_id}'
""")
@click.option("--netns", metavar="NAME",
              help="The agent's network namespace (its --netns), where the attachments "
                   "are read [default: this process's].")
@common_options
def show_interfaces(netns, pin_root, state_dir, fmt):
    """Pod interfaces the classifier is attached to: pod, interface, ifindex, session id,
    how it is attached (tcx or legacy clsact) and where it sits in each direction's
    chain, the policies applied and port mirroring."""
    dp, read = attachment_reader(pin_root, netns)
    try:
        _run_show("interfaces", pin_root, state_dir, fmt,
                  lambda pm, names: collect_interfaces(pm, names, read), table_interfaces)
    finally:
        dp.close()


@show.command("rules", short_help="Rule slots: policy, rule, mirror id, destination.", epilog="""\b
Example:
  cn2mirror show rules -o json | jq '.rules[] | select(.mirror_id == 123)'
""")
@common_options
def show_rules(pin_root, state_dir, fmt):
    """Rule slots: policy and rule index (or port mirror), mirror id, destination."""
    _run_show("rules", pin_root, state_dir, fmt, collect_rules, table_rules)


@show.command("destinations", short_help="Analyzers: mode, address/MAC/VNI/VLAN, MTU.", epilog="""\b
Example:
  cn2mirror show destinations
""")
@common_options
def show_destinations(pin_root, state_dir, fmt):
    """Destinations: name, delivery mode, analyzer address/MAC/VNI/VLAN, MTU."""
    _run_show("destinations", pin_root, state_dir, fmt, collect_destinations,
              table_destinations)


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
@common_options
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
    protocol = parse_protocol(protocol_text) if protocol_text is not None else None
    wanted = flow_filter(pod=pod, mirrored=mirrored, rule=rule, mirror_id=mirror_id,
                         destination=destination, protocol=protocol, port=port)

    def collect(pm, names):
        if (pod or rule or destination) and not names.available:
            raise click.ClickException(f"--pod, --rule and --destination need names: "
                                       f"{names.reason}")
        return [f for f in collect_flows(pm, names) if wanted(f)]

    _run_show("flows", pin_root, state_dir, fmt, collect, table_flows)


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
@common_options
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
        _run_show("stats", pin_root, state_dir, fmt, collect_stats, table_stats)
        return
    from cn2mirror.cli.watch import watch_stats

    def read() -> dict:
        pm = open_maps(pin_root)
        try:
            with MapErrors(pin_root):
                return collect_stats(pm, Names.load(state_dir))
        finally:
            pm.close()

    watch_stats(read, fmt, interval, count, labels=(rule_label, iface_label, dest_label))


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
    try:
        status = read_status(state_dir)
    except StateFileError as e:
        raise click.ClickException(str(e)) from None
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
