"""``cn2mirror show stats --watch``: counter rates on a node, refreshed in place.

Each refresh reads the pinned counters (cli/show/collect.py collect_stats) and divides what
changed since the last read by the time between the two reads. A slot whose counters
went down was given to another object meanwhile (the map writer zeroes a slot's counters
when it changes hands): its rate restarts from the new counters, never goes negative.

Table mode redraws the screen; JSON mode prints one line per refresh (JSON lines), each
a complete document, so it can be piped to jq or a file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import click

from cn2mirror.cli.output import human_bytes, render_table

RATE_FIELDS = ("cloned", "packets", "bytes", "truncated", "dropped")
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def _key(scope: str, row: dict) -> tuple:
    return (scope, row.get("slot", row.get("ifslot")))


def _rate(now: dict, before: dict | None, seconds: float) -> dict:
    """Per-second rates of the counters (and of each drop reason) between two reads."""
    out = {}
    for f in RATE_FIELDS:
        delta = now[f] - (before[f] if before else 0)
        out[f] = round((delta if delta >= 0 else now[f]) / seconds, 2)
    drops = {}
    for reason, n in now["drops"].items():
        delta = n - ((before or {}).get("drops", {}).get(reason, 0))
        rate = (delta if delta >= 0 else n) / seconds
        if rate:
            drops[reason] = round(rate, 2)
    out["drops"] = drops
    return out


def rates(now: dict, before: dict | None, seconds: float) -> dict:
    """Rates per rule, interface and destination, and for the node, from two
    collect_stats() results ``seconds`` apart (``before`` None: since the counters
    started, over ``seconds``)."""
    old = {}
    if before:
        for scope in ("rules", "interfaces", "destinations"):
            for row in before[scope]:
                old[_key(scope, row)] = row["counters"]
    out: dict = {"interval_s": round(seconds, 3)}
    for scope in ("rules", "interfaces", "destinations"):
        out[scope] = [{**{k: v for k, v in row.items() if k != "counters"},
                       "rates": _rate(row["counters"], old.get(_key(scope, row)), seconds)}
                      for row in now[scope] if row["configured"]]
    out["node"] = {"rates": _rate(now["node"]["counters"],
                                  before["node"]["counters"] if before else None, seconds)}
    return out


def _rate_row(label: str, r: dict) -> list:
    drops = " ".join(f"{k}={v:g}/s" for k, v in r["drops"].items()) or "-"
    return [label, f"{r['packets']:g}", human_bytes(r["bytes"]) + "/s", f"{r['cloned']:g}",
            f"{r['truncated']:g}", f"{r['dropped']:g}", drops]


HEADERS = ["COPIES/S", "BYTES/S", "CLONED/S", "TRUNCATED/S", "DROPPED/S", "DROPS"]


def rates_table(data: dict, labels: tuple[Callable, Callable, Callable]) -> str:
    rule_label, iface_label, dest_label = labels
    node = data["node"]["rates"]
    parts = [f"cn2mirror: rates over the last {data['interval_s']:g} s "
             f"(node: {node['packets']:g} copies/s, {node['dropped']:g} dropped/s)"]
    for title, scope, label in (("RULE", "rules", rule_label),
                                ("INTERFACE", "interfaces", iface_label),
                                ("DESTINATION", "destinations",
                                 lambda r: dest_label(r["name"], r["slot"]))):
        parts.append(render_table([title, *HEADERS],
                                  [_rate_row(label(r), r["rates"]) for r in data[scope]]))
    return "\n\n".join(parts)


def watch_stats(read: Callable[[], dict], fmt: str, interval: float, count: int | None,
                labels: tuple[Callable, Callable, Callable]) -> None:
    """Print rates every ``interval`` seconds, ``count`` times (None: until Ctrl-C)."""
    before, t_before = read(), time.monotonic()
    shown = 0
    try:
        while count is None or shown < count:
            time.sleep(interval)
            now, t_now = read(), time.monotonic()
            data = rates(now, before, t_now - t_before)
            data["time"] = time.time()
            if fmt == "json":
                click.echo(json.dumps(data, separators=(",", ":"), default=str))
            else:
                click.echo(CLEAR + rates_table(data, labels))
            sys.stdout.flush()
            before, t_before = now, t_now
            shown += 1
    except KeyboardInterrupt:
        pass
