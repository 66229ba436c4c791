"""``cn2mirror ids``: mirror and session ids (what an analyzer sees in jmirror headers)
back to policy rules, port mirrors and pod interfaces, from names.json or objects."""

from __future__ import annotations

from collections.abc import Iterable

import click

from cn2mirror.agent.statefiles import Names
from cn2mirror.cli.output import JSON_VERSION, emit, output_option, render_table, section

from .common import state_dir_option

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
