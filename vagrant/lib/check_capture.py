#!/usr/bin/env python3
"""Judge what the lab's three analyzers captured; print a PASS/FAIL table.

Inputs (all written by verify.sh):
  --ids FILE        expected_ids.py's JSON: mirror and session ids, resolved destinations
  --pods FILE       ``kubectl get pods -n lab -o json``: the workloads' IPs and nodes
  --capture N=FILE  tshark's fields for analyzer N (same-node, other-node, external), one
                    datagram to UDP 30030 a line, tab-separated, as TSHARK_FIELDS below
  --traffic N=H/P/R what the traffic driver saw: pod N got H HTTP answers and P ping
                    replies in R rounds
  --agent N=RESULT  whether the agent on the mirroring node knows analyzer N's ids
                    (`cn2mirror ids`): agrees, disagrees or unavailable (shown as n/a)

Every datagram must be jmirror, carry the expected mirror and session ids, go to the
expected analyzer address, and hold a packet of the selected flow (between the client and
web, of the selected protocol); both directions of the flow must show up. The bystander
talks to web the same way, in flows no policy selects: its address must not show up
anywhere. Exit status 0 when no check fails, 1 otherwise.

Python 3 standard library only: it runs on the Vagrant host.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

# The tshark fields verify.sh asks for, in order. ip.* come as "outer,inner".
TSHARK_FIELDS = ["jmirror.mid", "jmirror.sid", "ip.src", "ip.dst", "ip.proto",
                 "tcp.srcport", "tcp.dstport"]
NAMESPACE = "lab"
MIN_COPIES = 4


@dataclass(frozen=True)
class Expectation:
    """One analyzer: which policy rule's copies, from which pod interface, of what."""

    capture: str
    destination: str  # MirrorDestination name
    mirror_key: str  # compiler.rule_key of the rule that mirrors
    session_pod: str  # the pod whose interface mirrors
    protocol: str  # "tcp/80" or "icmp"
    placement: str  # "same-node", "other-node" or "external": analyzer vs mirroring pod


EXPECTATIONS = [
    Expectation("same-node", "lab-same-node", "csp/lab/http-to-same-node/rule/0", "web",
                "tcp/80", "same-node"),
    Expectation("other-node", "lab-other-node", "csp/lab/ping-to-other-node/rule/0", "web",
                "icmp", "other-node"),
    Expectation("external", "lab-external", "csp/lab/http-to-external/rule/0", "client",
                "tcp/80", "external"),
]
FLOW = ("client", "web")  # the selected flows are between these two pods
BYSTANDER = "bystander"  # same traffic to web, never selected


@dataclass
class Copy:
    mid: int | None
    sid: int | None
    outer_dst: str | None
    inner_src: str | None
    inner_dst: str | None
    inner_proto: int | None
    sport: int | None
    dport: int | None
    line: str


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text, 0) if text else None


def parse_line(line: str) -> Copy:
    cols = (line.rstrip("\n").split("\t") + [""] * len(TSHARK_FIELDS))[: len(TSHARK_FIELDS)]
    mid, sid, src, dst, proto, sport, dport = cols
    srcs, dsts, protos = src.split(","), dst.split(","), proto.split(",")

    def inner(values: list[str]) -> str | None:
        return values[1] if len(values) > 1 and values[1] else None

    p = inner(protos)
    return Copy(mid=_int(mid), sid=_int(sid), outer_dst=dsts[0] or None,
                inner_src=inner(srcs), inner_dst=inner(dsts),
                inner_proto=int(p) if p else None,
                sport=_int(sport.split(",")[0]), dport=_int(dport.split(",")[0]),
                line=line.rstrip("\n"))


def read_capture(path: str) -> list[Copy]:
    with open(path) as f:
        return [parse_line(line) for line in f if line.strip()]


@dataclass
class Table:
    # ok: True (PASS), False (FAIL) or None (n/a: could not be checked, not a failure)
    rows: list[tuple[str, str, str, str, bool | None]] = field(default_factory=list)

    def add(self, capture: str, check: str, expected: str, observed: str,
            ok: bool | None) -> None:
        self.rows.append((capture, check, expected, observed, ok))

    @property
    def failures(self) -> list[tuple[str, str, str, str, bool | None]]:
        return [r for r in self.rows if r[4] is False]

    def render(self) -> str:
        head = ("analyzer", "check", "expected", "observed", "result")
        result = {True: "PASS", False: "FAIL", None: "n/a"}
        body = [(c, k, e, o, result[ok]) for c, k, e, o, ok in self.rows]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        line = "  ".join("-" * w for w in widths)
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join(r.rstrip() for r in [fmt.format(*head), line,
                                               *(fmt.format(*r) for r in body)])


def _short(values: set, limit: int = 3) -> str:
    items = sorted(str(v) for v in values)
    more = f" (+{len(items) - limit})" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else "none"


def pod_index(pods_json: dict) -> dict[str, dict]:
    """name -> {"ips": [...], "node": ...} for the lab's pods."""
    out = {}
    for p in pods_json.get("items", []):
        status = p.get("status") or {}
        ips = [i["ip"] for i in status.get("podIPs") or [] if i.get("ip")]
        if not ips and status.get("podIP"):
            ips = [status["podIP"]]
        out[p["metadata"]["name"]] = {"ips": ips, "node": (p.get("spec") or {}).get("nodeName")}
    return out


def expected_pairs(ids: dict, pods: dict[str, dict]) -> list[tuple[str, str, int, int]]:
    """(capture, node of the mirroring pod, mirror id, session id) for each analyzer."""
    out = []
    for x in EXPECTATIONS:
        mid = ids.get("mirror", {}).get(x.mirror_key)
        sid = next((v for k, v in ids.get("session", {}).items()
                    if k.startswith(f"{NAMESPACE}/{x.session_pod}/")), None)
        node = pods.get(x.session_pod, {}).get("node")
        if mid is not None and sid is not None and node:
            out.append((x.capture, node, mid, sid))
    return out


AGENT_RESULTS = {"agrees": True, "disagrees": False, "unavailable": None}


def check(ids: dict, pods: dict[str, dict], captures: dict[str, list[Copy]],
          traffic: dict[str, tuple[int, int, int]],
          agent: dict[str, str] | None = None) -> Table:
    t = Table()
    for name, (http, ping, rounds) in sorted(traffic.items()):
        t.add("-", f"traffic from {name}", f"answers in {rounds} rounds",
              f"{http} HTTP, {ping} ping", http > 0 and ping > 0)
    for pod in (*FLOW, BYSTANDER):
        ips = set(pods.get(pod, {}).get("ips", []))
        t.add("-", f"pod {pod}", "running with an IP", _short(ips), bool(ips))
    for e in ids.get("errors", []):
        if e["name"].startswith((f"{NAMESPACE}/", f"{NAMESPACE}-")):
            t.add("-", f"{e['kind']} {e['name']}", "no compiler error", e["reason"], False)
    flow_ips = {ip for pod in FLOW for ip in pods.get(pod, {}).get("ips", [])}
    bystander_ips = set(pods.get(BYSTANDER, {}).get("ips", []))

    for x in EXPECTATIONS:
        copies = captures.get(x.capture)
        if copies is None:
            t.add(x.capture, "capture", "a capture file", "none given", False)
            continue
        mid = ids.get("mirror", {}).get(x.mirror_key)
        sid = next((v for k, v in ids.get("session", {}).items()
                    if k.startswith(f"{NAMESPACE}/{x.session_pod}/")), None)
        dest = ids.get("destinations", {}).get(x.destination) or {}
        analyzer_ip = dest.get("analyzer_ip")

        # The scenario is what it says: where the analyzer is relative to the mirroring pod.
        mirroring_node = pods.get(x.session_pod, {}).get("node")
        analyzer_pod = (dest.get("analyzer_pod") or "/").split("/", 1)[1]
        analyzer_node = pods.get(analyzer_pod, {}).get("node") if analyzer_pod else None
        if x.placement == "external":
            pod_ips = {ip for p in pods.values() for ip in p["ips"]}
            where = f"{analyzer_ip}, no pod"
            ok = bool(analyzer_ip) and not dest.get("analyzer_pod") and analyzer_ip not in pod_ips
        else:
            same = analyzer_node is not None and analyzer_node == mirroring_node
            where = f"{analyzer_pod}@{analyzer_node} vs {x.session_pod}@{mirroring_node}"
            ok = analyzer_node is not None and same == (x.placement == "same-node")
        t.add(x.capture, "placement", x.placement, where, ok)
        t.add(x.capture, "expected ids known", f"{x.mirror_key}, {x.session_pod}",
              f"mid {mid}, sid {sid}", mid is not None and sid is not None)
        if agent is not None:
            said = agent.get(x.capture, "unavailable")
            t.add(x.capture, "agent's own ids", f"{mirroring_node} agent knows mid and sid",
                  said, AGENT_RESULTS.get(said, False))

        t.add(x.capture, "copies received", f">= {MIN_COPIES}", str(len(copies)),
              len(copies) >= MIN_COPIES)
        not_jm = [c for c in copies if c.mid is None or c.sid is None]
        t.add(x.capture, "all jmirror", "every datagram", f"{len(not_jm)} not jmirror",
              not not_jm)
        jm = [c for c in copies if c.mid is not None and c.sid is not None]
        mids, sids = {c.mid for c in jm}, {c.sid for c in jm}
        t.add(x.capture, "mirror id", str(mid), _short(mids), bool(jm) and mids == {mid})
        t.add(x.capture, "session id", str(sid), _short(sids), bool(jm) and sids == {sid})
        dsts = {c.outer_dst for c in jm}
        t.add(x.capture, "outer destination", str(analyzer_ip), _short(dsts),
              bool(jm) and dsts == {analyzer_ip})

        pairs = {(c.inner_src, c.inner_dst) for c in jm}
        stray = {p for p in pairs if not (set(p) <= flow_ips and p[0] != p[1])}
        t.add(x.capture, "only the selected flow", "client <-> web",
              f"{len(stray)} other pairs: {_short(stray)}" if stray else "client <-> web",
              bool(jm) and not stray)
        forward, backward = f"{FLOW[0]}->{FLOW[1]}", f"{FLOW[1]}->{FLOW[0]}"
        directions = {forward if p[0] in pods.get(FLOW[0], {}).get("ips", []) else backward
                      for p in pairs - stray}
        t.add(x.capture, "both directions", f"{forward}, {backward}",
              _short(directions), directions == {forward, backward})

        if x.protocol == "icmp":
            wrong = [c for c in jm if c.inner_proto != 1]
        else:
            port = int(x.protocol.split("/")[1])
            wrong = [c for c in jm if c.inner_proto != 6 or port not in (c.sport, c.dport)]
        t.add(x.capture, "protocol", x.protocol,
              f"{len(wrong)} other packets" if wrong else x.protocol, bool(jm) and not wrong)

        seen = {ip for c in copies for ip in (c.inner_src, c.inner_dst)} & bystander_ips
        t.add(x.capture, "no bystander copies", "none", _short(seen) if seen else "none",
              bool(bystander_ips) and not seen)
    return t


def _named(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep:
            raise SystemExit(f"check_capture: {what} must be NAME=VALUE, not {v!r}")
        out[name] = rest
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", required=True)
    parser.add_argument("--pods", required=True)
    parser.add_argument("--capture", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--traffic", action="append", default=[], metavar="NAME=H/P/R")
    parser.add_argument("--agent", action="append", default=[], metavar="NAME=RESULT",
                        help="what `cn2mirror ids --mirror-id M --session-id S` said in the "
                             "agent pod on the mirroring node: agrees, disagrees, unavailable")
    parser.add_argument("--expected", action="store_true",
                        help="only print 'capture node mid sid' per analyzer, for verify.sh")
    args = parser.parse_args(argv)
    with open(args.ids) as f:
        ids = json.load(f)
    with open(args.pods) as f:
        pods = pod_index(json.load(f))
    if args.expected:
        for row in expected_pairs(ids, pods):
            print(*row)
        return 0
    captures = {n: read_capture(p) for n, p in _named(args.capture, "--capture").items()}
    traffic = {n: tuple(int(x) for x in v.split("/")) for n, v in
               _named(args.traffic, "--traffic").items()}
    agent = _named(args.agent, "--agent") if args.agent else None
    table = check(ids, pods, captures, traffic, agent)  # type: ignore[arg-type]
    print(table.render())
    failures = table.failures
    if failures:
        print(f"\nFAIL: {len(failures)} of {len(table.rows)} checks failed:", file=sys.stderr)
        for c, k, e, o, _ in failures:
            print(f"  [{c}] {k}: expected {e}, observed {o}", file=sys.stderr)
        return 1
    print(f"\nPASS: all {len(table.rows)} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
