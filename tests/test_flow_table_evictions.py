"""Flow-table evictions are counted (issue 14, "blind spots"). The flow table is an LRU
hash: it evicts the least recently used flow to make room for a new one, silently. The
classifier counts every entry it creates (flow_table_stats); nothing but the LRU removes
entries, so evicted = created - present. Real classifier runs (BPF_PROG_TEST_RUN) on
distinct UDP flows overflow a flow table made 64 entries small; the count must be the
arithmetic, in PinnedMaps, in `cn2mirror show stats` and in the Prometheus metrics."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from cn2mirror.agent.metrics import DatapathCollector, render
from cn2mirror.agent.pinned import PinnedMaps
from cn2mirror.cli.main import main

from .dp_helpers import TC_ACT_UNSPEC, PacketNode, policy, rule, state

pytestmark = [pytest.mark.bpf]

TABLE = 64
FLOWS = 300  # distinct flows, each a first packet: each one creates an entry
POD, PEER = "198.18.10.2", "198.18.20.5"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def udp(sport: int) -> bytes:
    return bytes(ETH / IP(src=POD, dst=PEER) / UDP(sport=sport, dport=7000) / b"x")


@pytest.fixture(scope="module")
def pn():
    node = PacketNode(flow_table_size=TABLE)
    yield node
    node.close()


def flow_table(pn):
    pm = PinnedMaps(pn.pin_root)
    try:
        return pm.flow_table()
    finally:
        pm.close()


def sports_present(pn) -> set[int]:
    """The pod's ports of the flows in the table."""
    pod = bytes(int(x) for x in POD.split("."))
    out = set()
    for key, _ in pn.flows():
        port = key.port_lo if bytes(key.addr_lo)[:4] == pod else key.port_hi
        out.add(int.from_bytes(port.to_bytes(2, "little"), "big"))  # network order
    return out


def test_flows_beyond_the_table_are_counted_as_evicted(pn, tmp_path):
    pn.clear_flows()
    # A rule for every packet of the pod: every flow is evaluated and stored.
    pn.apply(state(policy("demo/p", rule("demo/p", 0))))
    assert flow_table(pn).created == 0
    for sport in range(20000, 20000 + FLOWS):
        rc, _ = pn.from_pod(udp(sport))
        assert rc == TC_ACT_UNSPEC
    ft = flow_table(pn)
    present = pn.flows()  # read independently (get_next_key) of the batch count
    assert ft.capacity == TABLE
    assert ft.entries == len(present) <= TABLE
    assert ft.created == FLOWS  # one entry per distinct flow, none counted twice
    assert ft.evicted == FLOWS - len(present) >= FLOWS - TABLE

    # A flow still in the table: its next packet creates nothing.
    kept = sorted(sports_present(pn))
    pn.from_pod(udp(kept[0]))
    assert flow_table(pn).created == FLOWS
    # An evicted flow's next packet creates its entry again: one more created, and the
    # entry it displaced (if the table was full) one more evicted.
    gone = next(p for p in range(20000, 20000 + FLOWS) if p not in set(kept))
    pn.from_pod(udp(gone))
    ft = flow_table(pn)
    assert gone in sports_present(pn)
    assert ft.created == FLOWS + 1
    assert ft.evicted == FLOWS + 1 - len(pn.flows())
    # A policy change re-evaluates a present flow in place: not a new entry.
    gen = pn.generation()
    pn.apply(state(policy("demo/p", rule("demo/p", 0, mirror_id=77))))
    assert pn.generation() != gen
    pn.from_pod(udp(gone))
    assert flow_table(pn).created == FLOWS + 1

    # What the CLI shows and the metrics export.
    ft = flow_table(pn)
    argv = ["show", "stats", "--pin-root", pn.pin_root, "--state-dir", str(tmp_path)]
    r = CliRunner().invoke(main, [*argv, "-o", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stats"]["flow_table"] == ft.as_dict()
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    section = r.stdout.split("Flow table:")[1].split()
    assert section[:8] == ["ENTRIES", "CAPACITY", "CREATED", "EVICTED",
                           str(ft.entries), str(TABLE), str(ft.created), str(ft.evicted)]
    text = render(DatapathCollector(pn.pin_root, str(tmp_path)).collect())
    assert f"cn2mirror_flow_table_evicted_total {ft.evicted}" in text
    assert f"cn2mirror_flow_table_created_total {ft.created}" in text
    assert f"cn2mirror_flow_table_entries {ft.entries}" in text
    assert f"cn2mirror_flow_table_capacity {TABLE}" in text


def test_the_count_survives_a_reload_and_an_upgrade_starts_it_at_the_present_entries(pn):
    """The counter is pinned like the flow table, so a restarted agent (whose loader
    adopts the pins) keeps counting from where it was. A node upgraded from a version
    without it gets it created next to a full table: it starts at the entries present,
    none of which was evicted."""
    pn.clear_flows()
    pn.apply(state(policy("demo/p", rule("demo/p", 0))))
    for sport in range(30000, 30000 + 100):
        pn.from_pod(udp(sport))
    before = flow_table(pn)
    assert before.created == 100 and before.evicted == 100 - before.entries > 0
    pn.node.datapath.load()  # what a restarted agent's loader does: the pins adopted
    assert flow_table(pn) == before
    os.unlink(f"{pn.pin_root}/flow_table_stats")  # as a version without it left them
    pn.node.datapath.load()
    after = flow_table(pn)
    assert after.entries == before.entries
    assert (after.created, after.evicted) == (before.entries, 0)
    pn.from_pod(udp(40000))  # and counting goes on from there
    assert flow_table(pn).created == before.entries + 1
