"""The classifier in the kernel, packet by packet (BPF_PROG_TEST_RUN).

Every test runs the real compiled programs on scapy-built packets and checks the verdict
(always TC_ACT_UNSPEC), that the packet comes back bit-identical, the flow entry the
program cached, and the counters.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.sctp import SCTP

from cn2mirror.agent import jmirror
from cn2mirror.agent import layout as L
from cn2mirror.agent.explain import explain
from cn2mirror.agent.netns import entered
from cn2mirror.agent.pinned import PinnedMaps
from cn2mirror.agent.state import DeliveryMode, Destination, Interface
from cn2mirror.agent.statefiles import Names
from cn2mirror.cli.show.collect import collect_flows, collect_rules

from .dp_helpers import (
    ANALYZER,
    TC_ACT_UNSPEC,
    Cidr,
    Direction,
    PacketNode,
    PortMirror,
    PortRange,
    Sampling,
    analyzer,
    blocks,
    ip,
    pod_iface,
    policy,
    rule,
    state,
    tcp_ports,
)

pytestmark = [pytest.mark.bpf]

POD, PEER = "198.18.10.2", "198.18.20.5"
POD6, PEER6 = "2001:2:0:10::2", "2001:2:0:20::5"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


@pytest.fixture(scope="module")
def pn():
    node = PacketNode()
    yield node
    node.close()


@pytest.fixture
def fresh(pn):
    """Clear the flow table and the flow cache between tests (verdicts are per test);
    flow sampling by the default seed."""
    pn.node.writer.set_sampling_seed(0)
    pn.clear_flows()
    return pn


def syn(src=POD, dst=PEER, sport=40000, dport=80):
    return bytes(ETH / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S"))


def ack(src, dst, sport, dport):
    return bytes(ETH / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="A"))


def run_unchanged(pn, pkt: bytes, direction: str = "from") -> None:
    rc, out = (pn.from_pod if direction == "from" else pn.to_pod)(pkt)
    assert rc == TC_ACT_UNSPEC
    assert out == pkt


# ---------------------------------------------------------------------- verdicts
def test_matching_flow_is_mirrored_both_directions_share_the_verdict(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, dst=blocks("198.18.20.0/24"),
                                         ports=[tcp_ports(80)]))))
    slot = pn.rule_slot("demo/p", 0)
    before = pn.counters("rule", slot).cloned
    run_unchanged(pn, syn())
    assert pn.flow_rules(POD, PEER) == [("demo/p", 0)]
    # The reply, into the pod, finds the same entry: mirrored too.
    run_unchanged(pn, ack(PEER, POD, 80, 40000), "to")
    assert len(pn.flows()) == 1
    assert pn.counters("rule", slot).cloned == before + 2
    (key, entry), = pn.flows()
    assert entry.packets == 2 and entry.flags & L.FLOW_INITIATOR_LO


def test_flow_no_rule_selects_is_cached_but_not_mirrored(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)]))))
    slot = pn.rule_slot("demo/p", 0)
    before = pn.counters("rule", slot).cloned
    run_unchanged(pn, syn(dport=443))
    assert pn.flow_rules(POD, PEER) == []
    assert pn.counters("rule", slot).cloned == before


def test_first_matching_rule_of_a_policy_decides(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p",
                          rule("demo/p", 0, ports=[tcp_ports(80)], dest=None),
                          rule("demo/p", 1))))
    run_unchanged(pn, syn(dport=80))
    assert pn.flow_rules(POD, PEER) == []  # rule 0 matched first and mirrors nothing
    run_unchanged(pn, syn(dst="198.18.20.6", dport=81))
    assert pn.flow_rules(POD, "198.18.20.6") == [("demo/p", 1)]


def test_policies_add_up(fresh):
    pn = fresh
    pn.apply(state(policy("a/p", rule("a/p", 0, ports=[tcp_ports(80)])),
                   policy("b/q", rule("b/q", 0, dst=blocks("198.18.20.5/32"), dest="an2")),
                   dests=(analyzer(), analyzer("an2", "198.18.200.11"))))
    run_unchanged(pn, syn())
    assert pn.flow_rules(POD, PEER) == [("a/p", 0), ("b/q", 0)]


def test_cidr_except_and_port_ranges(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule(
        "demo/p", 0, dst=(Cidr("198.18.0.0/16", ("198.18.20.0/24",)),),
        ports=[tcp_ports(8000, 8100)]))))
    run_unchanged(pn, syn(dst="198.18.30.1", dport=8050))
    assert pn.flow_rules(POD, "198.18.30.1") == [("demo/p", 0)]
    run_unchanged(pn, syn(dst="198.18.20.5", dport=8050))  # in the except block
    assert pn.flow_rules(POD, "198.18.20.5") == []
    run_unchanged(pn, syn(dst="198.18.30.2", dport=8101))  # past endPort
    assert pn.flow_rules(POD, "198.18.30.2") == []
    run_unchanged(pn, syn(dst="198.18.30.3", dport=8100))  # endPort itself
    assert pn.flow_rules(POD, "198.18.30.3") == [("demo/p", 0)]


def test_protocols_udp_sctp_icmp(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p",
                          rule("demo/p", 0, ports=[PortRange(17, 53, 53)]),
                          rule("demo/p", 1, ports=[PortRange(132, 9000, 9000)]),
                          rule("demo/p", 2, ports=[PortRange(1)]))))
    run_unchanged(pn, bytes(ETH / IP(src=POD, dst=PEER) / UDP(sport=5000, dport=53)))
    assert pn.flow_rules(POD, PEER) == [("demo/p", 0)]
    run_unchanged(pn, bytes(ETH / IP(src=POD, dst="198.18.20.6") / SCTP(sport=1, dport=9000)))
    assert pn.flow_rules(POD, "198.18.20.6") == [("demo/p", 1)]
    run_unchanged(pn, bytes(ETH / IP(src=POD, dst="198.18.20.7") / ICMP(id=77)))
    assert pn.flow_rules(POD, "198.18.20.7") == [("demo/p", 2)]
    # The echo reply shares the request's flow (the identifier is both "ports").
    run_unchanged(pn, bytes(ETH / IP(src="198.18.20.7", dst=POD) / ICMP(type=0, id=77)), "to")
    assert sum(1 for k, _ in pn.flows() if k.proto == 1) == 1


def test_ipv6_with_extension_headers(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, dst=blocks("2001:2:0:20::/64"),
                                         ports=[tcp_ports(443)]))))
    pkt = bytes(ETH / IPv6(src=POD6, dst=PEER6) / IPv6ExtHdrHopByHop() /
                IPv6ExtHdrRouting(addresses=[]) / TCP(sport=1234, dport=443, flags="S"))
    run_unchanged(pn, pkt)
    assert pn.flow_rules(POD6, PEER6) == [("demo/p", 0)]


def test_vlan_tagged_packets_are_parsed(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)]))))
    pkt = bytes(ETH / Dot1Q(vlan=12) / IP(src=POD, dst=PEER) / TCP(sport=1, dport=80, flags="S"))
    run_unchanged(pn, pkt)
    assert pn.flow_rules(POD, PEER) == [("demo/p", 0)]


def test_non_first_fragments_match_only_rules_without_ports(fresh):
    pn = fresh
    pn.apply(state(policy("a/p", rule("a/p", 0, ports=[tcp_ports(80)])),
                   policy("b/q", rule("b/q", 0, dst=blocks("198.18.20.0/24")))))
    frag = bytes(ETH / IP(src=POD, dst=PEER, proto=6, frag=100) / (b"x" * 40))
    run_unchanged(pn, frag)
    assert pn.flow_rules(POD, PEER) == [("b/q", 0)]
    frag6 = bytes(ETH / IPv6(src=POD6, dst=PEER6) / IPv6ExtHdrFragment(offset=10, nh=6) /
                  (b"y" * 40))
    pn.apply(state(policy("a/p", rule("a/p", 0, ports=[tcp_ports(80)])),
                   policy("b/q", rule("b/q", 0, dst=blocks("2001:2:0:20::/64")))))
    run_unchanged(pn, frag6)
    assert pn.flow_rules(POD6, PEER6) == [("b/q", 0)]


def test_reply_seen_first_is_matched_in_reverse_but_a_syn_is_not(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, src=blocks(f"{POD}/32"),
                                         ports=[tcp_ports(80)]))))
    # Mid-connection: the server's packet towards the pod is the first we see.
    run_unchanged(pn, ack(PEER, POD, 80, 40001), "to")
    assert pn.flow_rules(POD, PEER) == [("demo/p", 0)]
    # A SYN is certainly the first packet: no reverse guess.
    run_unchanged(pn, bytes(ETH / IP(src="198.18.20.9", dst=POD) /
                            TCP(sport=80, dport=40002, flags="S")), "to")
    assert pn.flow_rules(POD, "198.18.20.9") == []


def test_policy_change_applies_to_existing_flows(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)]))))
    run_unchanged(pn, syn())
    assert pn.flow_rules(POD, PEER) == [("demo/p", 0)]
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(8080)]))))
    run_unchanged(pn, ack(POD, PEER, 40000, 80))
    assert pn.flow_rules(POD, PEER) == []
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)]))))
    run_unchanged(pn, ack(POD, PEER, 40000, 80))
    assert pn.flow_rules(POD, PEER) == [("demo/p", 0)]
    (key, entry), = pn.flows()
    assert entry.packets == 2  # the flow's history survives re-evaluation


def test_a_slot_given_to_another_rule_starts_its_counters_again(fresh):
    pn = fresh
    pn.apply(state(policy("a/p", rule("a/p", 0, ports=[tcp_ports(80)], mirror_id=501))))
    slot = pn.rule_slot("a/p", 0)
    run_unchanged(pn, syn())
    assert pn.counters("rule", slot).cloned >= 1
    pn.apply(state(policy("b/q", rule("b/q", 0, ports=[tcp_ports(443)], mirror_id=502))))
    assert pn.rule_slot("b/q", 0) == slot
    assert pn.counters("rule", slot).cloned == 0


def test_reapplying_the_same_state_writes_nothing(fresh):
    pn = fresh
    st_ = state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)])))
    pn.apply(st_)
    assert pn.apply(st_).changes == 0


def test_port_mirroring_follows_direction(fresh):
    pn = fresh
    iface = pod_iface(port_mirrors=[PortMirror("an", Direction.EGRESS, 4242)])
    pn.apply(state(dests=(analyzer(),), iface=iface))
    slot = next(s for s, (o, _) in pn.node.last.plan.rule_slots.items() if o.startswith("port:"))
    before = pn.counters("rule", slot).cloned
    run_unchanged(pn, syn())
    assert pn.counters("rule", slot).cloned == before + 1
    run_unchanged(pn, ack(PEER, POD, 80, 40000), "to")  # into the pod: not selected
    assert pn.counters("rule", slot).cloned == before + 1
    assert pn.flows() == []  # no policy: no flow evaluation at all


def test_port_mirroring_copies_non_ip_frames_too(fresh):
    pn = fresh
    iface = pod_iface(port_mirrors=[PortMirror("an", Direction.BOTH, 4242)])
    pn.apply(state(dests=(analyzer(),), iface=iface))
    slot = next(s for s, (o, _) in pn.node.last.plan.rule_slots.items() if o.startswith("port:"))
    before = pn.counters("rule", slot).cloned
    not_ip = pn.counters("rule", slot).drops["not_ip"]
    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", type=0x0806) / (b"\x00" * 28))
    run_unchanged(pn, arp)
    assert pn.counters("rule", slot).cloned == before + 1
    # jmirror carries IP only: the mirror port drops the copy and says why.
    deadline = time.monotonic() + 2
    while pn.counters("rule", slot).drops["not_ip"] == not_ip and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pn.counters("rule", slot).drops["not_ip"] == not_ip + 1


def _analyzer_capture(pn) -> tuple[socket.socket, str]:
    """A raw socket on the analyzer's end of an0 and its MAC, resolved for the analyzer's
    address (a permanent neighbour), so that copies are routed straight there."""
    link = json.loads(subprocess.run(["ip", "-n", pn.netns, "-j", "link", "show", "an1"],
                                     check=True, capture_output=True, text=True).stdout)
    mac = link[0]["address"]
    with entered(pn.netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        sock.bind(("an1", 0))
    sock.settimeout(0.2)
    ip("-n", pn.netns, "neigh", "replace", ANALYZER, "lladdr", mac, "dev", "an0", "nud",
       "permanent")
    # Copies of earlier tests that waited for the neighbour leave now: not ours.
    try:
        while True:
            sock.recv(2048)
    except TimeoutError:
        pass
    return sock, mac


@pytest.mark.parametrize("mode", ["jmirror", "l2"])
def test_vlan_frames_cut_short_after_the_tag_are_copied_whole(fresh, mode):
    """An 802.1Q (or 802.1ad) frame with fewer than two bytes after its tag: a Linux
    receiver's VLAN untagging (skb_vlan_untag wants the tag and two bytes more) frees it
    before anything sees it. Such clones went on through the mirror port's veth, whose
    far end freed them: cloned, then lost, counted nowhere (issue 14). Each must now
    reach the analyzer: jmirror wraps it on the port's sending end; a raw L2 copy is
    padded to the Ethernet minimum, as a wire would carry it, so a Linux analyzer
    interface keeps it too."""
    pn = fresh
    sock, an_mac = _analyzer_capture(pn)
    dest = analyzer() if mode == "jmirror" else Destination(
        "an", DeliveryMode.L2, analyzer_mac=an_mac, analyzer_ifname="an0")
    iface = pod_iface(port_mirrors=[PortMirror("an", Direction.BOTH, 4242)])
    pn.apply(state(dests=(dest,), iface=iface))
    slot = next(s for s, (o, _) in pn.node.last.plan.rule_slots.items() if o.startswith("port:"))
    before = pn.counters("rule", slot)
    pod_mac = bytes.fromhex("020000000001")
    try:
        sent = []
        for tpid in (0x8100, 0x88A8):
            for tail in (b"", b"\x45"):
                frame = bytes.fromhex("020000000002") + pod_mac + tpid.to_bytes(2, "big") + \
                    bytes.fromhex("00050800") + tail
                for direction in ("from", "to"):
                    for _ in range(5):
                        run_unchanged(pn, frame, direction)
                        sent.append((tpid, tail))
        got = []
        deadline = time.monotonic() + 3
        while len(got) < len(sent) and time.monotonic() < deadline:
            try:
                f = sock.recv(2048)
            except TimeoutError:
                continue
            if mode == "jmirror" and f[12:14] == b"\x08\x00" and f[23] == 17 and \
                    f[36:38] == (30030).to_bytes(2, "big"):
                # Ethernet, IPv4, UDP to the analyzer's port: jmirror, which carries the
                # frame from its IP header on (the byte after the tag, or none).
                mid, _ = jmirror.HEADER.unpack_from(f, 42)
                got.append((mid & jmirror.MIRROR_ID_MAX, f[42 + jmirror.HEADER_LEN:]))
            elif mode == "l2" and f[6:12] == pod_mac:
                # The frame, padded to 60 bytes; an1 took its tag off into metadata.
                got.append((f[:6], f[12:]))
    finally:
        sock.close()
        ip("-n", pn.netns, "neigh", "del", ANALYZER, "dev", "an0")
    after = pn.counters("rule", slot)
    assert after.cloned - before.cloned == len(sent)
    assert after.packets - before.packets == len(sent)
    assert {k: v - before.drops[k] for k, v in after.drops.items() if v != before.drops[k]} == {}
    if mode == "jmirror":
        want = [(4242, tail) for _, tail in sent]
    else:
        want = [(bytes.fromhex(an_mac.replace(":", "")),
                 (b"\x08\x00" + tail).ljust(60 - 12 - 4, b"\0")) for _, tail in sent]
    assert sorted(got) == sorted(want)


def test_copies_and_streams_to_analyzers_are_never_mirrored(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0))))
    slot = pn.rule_slot("demo/p", 0)
    before = pn.counters("rule", slot).cloned
    # A packet carrying the copy mark (one of our copies passing this interface).
    rc, out = pn.from_pod(syn(), mark=L.COPY_MARK)
    assert rc == TC_ACT_UNSPEC and out == syn()
    assert pn.flows() == []
    # A jmirror stream to a known analyzer (a copy from another node).
    to_analyzer = bytes(ETH / IP(src=POD, dst="198.18.200.10") / UDP(sport=30030,
                                                                      dport=30030))
    run_unchanged(pn, to_analyzer)
    # The analyzer's ICMP error about a copy (quoting it) is part of the same stream.
    error = bytes(ETH / IP(src="198.18.200.10", dst=POD) / ICMP(type=3, code=3) /
                  IP(src=POD, dst="198.18.200.10") / UDP(sport=30030, dport=30030))
    run_unchanged(pn, error, "to")
    error6 = bytes(ETH / IPv6(src=PEER6, dst=POD6) / ICMPv6DestUnreach() /
                   IPv6(src=POD6, dst=PEER6) / UDP(sport=1, dport=53))
    assert pn.counters("rule", slot).cloned == before
    # Decided once per flow: cached as never mirrored.
    assert {(k.proto, e.n_rules, e.flags & L.FLOW_NEVER_MIRROR) for k, e in pn.flows()} == {
        (17, 0, L.FLOW_NEVER_MIRROR), (1, 0, L.FLOW_NEVER_MIRROR)}
    # An ICMP error about anything else is ordinary traffic.
    run_unchanged(pn, error6, "to")
    assert pn.counters("rule", slot).cloned == before + 1


def test_flow_destination_limit_counts_overflow():
    pn = PacketNode(max_flow_dests=1)
    try:
        pn.apply(state(policy("a/p", rule("a/p", 0)), policy("b/q", rule("b/q", 0))))
        run_unchanged(pn, syn())
        assert pn.flow_rules(POD, PEER) == [("a/p", 0)]
        ifslot = pn.node.last.plan.ifslots["demo/web/eth0"]
        assert pn.counters("iface", ifslot).drops["flow_limit"] == 1
        (_, entry), = pn.flows()
        assert entry.flags & L.FLOW_OVERFLOW
    finally:
        pn.close()


def test_a_walk_longer_than_the_tail_calls_allow_is_cached_cut_short(fresh):
    """4,000 matching policies that mirror nothing need more steps than 33 runs of the
    walk: the flow is cached with what was found, flagged and counted, not re-walked."""
    pn = fresh
    pn.apply(state(*(policy(f"ns/q{p:04d}", rule(f"ns/q{p:04d}", 0, dest=None,
                                                 mirror_id=p + 1)) for p in range(4000))))
    ifslot = pn.node.last.plan.ifslots["demo/web/eth0"]
    before = pn.counters("iface", ifslot).drops["flow_limit"]
    run_unchanged(pn, syn())
    run_unchanged(pn, syn())
    (_, entry), = pn.flows()
    assert entry.flags & L.FLOW_OVERFLOW and entry.n_rules == 0
    assert pn.counters("iface", ifslot).drops["flow_limit"] == before + 1


def test_thousands_of_rules_first_match_and_continuation(fresh):
    """10,000 rules in 2,500 policies: the walk spans several tail calls and still finds
    exactly the rules a reference evaluation finds."""
    pn = fresh
    policies = []
    for p in range(2500):
        name = f"ns/p{p:04d}"
        rules = [rule(name, 0, dst=blocks(f"198.19.{p // 250}.{p % 250}/32"),
                      ports=[tcp_ports(80)], mirror_id=1 + p * 4),
                 rule(name, 1, dst=blocks("198.19.0.0/16"), ports=[tcp_ports(81)],
                      dest=None if p % 2 else "an", mirror_id=2 + p * 4),
                 rule(name, 2, ports=[tcp_ports(9000, 9100)], dest=None, mirror_id=3 + p * 4),
                 rule(name, 3, src=blocks("198.18.10.0/24"), mirror_id=4 + p * 4)]
        policies.append(policy(name, *rules))
    pn.apply(state(*policies))
    # To the last policy's /32 on port 80: rule 0 of p2499 decides for that policy, and
    # every other policy decides with its rule 3 (src matches): first four mirror.
    run_unchanged(pn, syn(dst="198.19.9.249", dport=80))
    got = pn.flow_rules(POD, "198.19.9.249")
    assert got == [("ns/p0000", 3), ("ns/p0001", 3), ("ns/p0002", 3), ("ns/p0003", 3)]
    # Port 9050: rule 2 (mirrors nothing) decides in every policy: not mirrored at all.
    run_unchanged(pn, syn(dst="198.19.0.1", dport=9050))
    assert pn.flow_rules(POD, "198.19.0.1") == []


# ---------------------------------------------------------------------- flow cache
def udp(src=POD, dst=PEER, sport=5000, dport=53, v6=False):
    ip_ = IPv6(src=POD6 if v6 else src, dst=PEER6 if v6 else dst) if v6 else \
        IP(src=src, dst=dst)
    return bytes(ETH / ip_ / UDP(sport=sport, dport=dport))


@pytest.mark.parametrize("v6", [False, True])
def test_an_established_flow_mirrored_by_nothing_is_cached_where_the_hash_says(fresh, v6):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)]))))
    pkt = udp(v6=v6)
    run_unchanged(pn, pkt)  # first packet: evaluated and inserted, not cached
    assert pn.cached(pkt) is None and pn.cache_entries() == []
    run_unchanged(pn, pkt)  # a flow-table hit with no copies: cached
    e = pn.cached(pkt)  # at the slot and with the tag layout.flow_cache_hash() gives
    assert e is not None and e.port_rule == 0
    assert e.ifslot == pn.node.last.plan.ifslots["demo/web/eth0"]
    assert len(pn.cache_entries()) == 1
    rc, out = pn.repeat("classify_from_pod", pkt, 1000)  # hits
    assert rc == TC_ACT_UNSPEC and out == pkt
    (_, entry), = pn.flows()
    assert entry.n_rules == 0 and entry.packets == 0


def test_a_policy_change_reevaluates_a_cached_flow(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)]))))
    pkt = udp()
    run_unchanged(pn, pkt)
    run_unchanged(pn, pkt)
    assert pn.cached(pkt) is not None
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[PortRange(17, 53, 53)]))))
    slot = pn.rule_slot("demo/p", 0)
    before = pn.counters("rule", slot).cloned
    run_unchanged(pn, pkt)  # the cached slot belongs to the old generation
    assert pn.flow_rules(POD, PEER) == [("demo/p", 0)]
    assert pn.counters("rule", slot).cloned == before + 1
    (_, entry), = pn.flows()
    assert entry.generation == pn.generation() and entry.packets == 1


def test_a_flow_with_copies_is_never_cached_and_every_packet_is_copied(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[PortRange(17, 53, 53)]))))
    slot = pn.rule_slot("demo/p", 0)
    before = pn.counters("rule", slot)
    pkt = udp()
    pn.repeat("classify_from_pod", pkt, 50)
    after = pn.counters("rule", slot)
    assert (after.cloned + after.drops["clone_failed"]) - \
        (before.cloned + before.drops["clone_failed"]) == 50
    assert pn.cache_entries() == []
    (_, entry), = pn.flows()
    assert entry.packets == 50  # show flows: every mirrored packet counted


def test_port_mirroring_copies_every_packet_of_a_cached_flow(fresh):
    pn = fresh
    iface = pod_iface(port_mirrors=[PortMirror("an", Direction.EGRESS, 4242)])
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)])), iface=iface))
    port = next(s for s, (o, _) in pn.node.last.plan.rule_slots.items()
                if o.startswith("port:"))
    pkt = udp()
    run_unchanged(pn, pkt)
    run_unchanged(pn, pkt)
    assert pn.cached(pkt).port_rule == port
    before = pn.counters("rule", port)
    pn.repeat("classify_from_pod", pkt, 40)
    after = pn.counters("rule", port)
    assert (after.cloned + after.drops["clone_failed"]) - \
        (before.cloned + before.drops["clone_failed"]) == 40
    # A copy stream to an analyzer is cached too, and still never copied.
    stream = udp(dst="198.18.200.10", sport=30030, dport=30030)
    run_unchanged(pn, stream)
    run_unchanged(pn, stream)
    assert pn.cached(stream).port_rule == 0
    before = pn.counters("rule", port)
    pn.repeat("classify_from_pod", stream, 40)
    assert pn.counters("rule", port).cloned == before.cloned


def test_packets_without_a_plain_probe_take_the_full_path(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)]))))
    slot = pn.rule_slot("demo/p", 0)
    # A TCP header cut before the flags: the full parse finds no ports (a flow with
    # ports 0, not mirrored); it must not be cached for the flow with the real ports.
    cut = bytes(ETH / IP(src=POD, dst=PEER, proto=6) / bytes.fromhex("9c400050"))
    for _ in range(3):
        run_unchanged(pn, cut)
    assert pn.cache_entries() == []
    before = pn.counters("rule", slot).cloned
    run_unchanged(pn, ack(POD, PEER, 40000, 80))
    assert pn.counters("rule", slot).cloned == before + 1
    for pkt in (bytes(ETH / Dot1Q(vlan=5) / IP(src=POD, dst=PEER) / UDP(sport=1, dport=2)),
                bytes(ETH / IP(src=POD, dst=PEER, options=b"\x01\x01\x01\x00") /
                      UDP(sport=1, dport=2)),
                syn(dport=443)):
        run_unchanged(pn, pkt)
        run_unchanged(pn, pkt)
    assert pn.cache_entries() == []


def test_a_cached_flow_still_refreshes_its_entry_every_jiffy(fresh):
    pn = fresh
    pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(80)]))))
    pkt = udp()
    run_unchanged(pn, pkt)
    run_unchanged(pn, pkt)
    (_, first), = pn.flows()
    for _ in range(3):
        time.sleep(0.03)  # several jiffies at any HZ
        pn.repeat("classify_from_pod", pkt, 100)
    (_, later), = pn.flows()
    assert later.last_seen_ns > first.last_seen_ns
    assert later.first_seen_ns == first.first_seen_ns


# ---------------------------------------------------------------------- any packet
packets = st.one_of(
    st.binary(min_size=0, max_size=200),
    st.builds(lambda ln, b: syn()[:ln] + b, st.integers(0, 60), st.binary(max_size=20)),
    st.builds(lambda ihl, frag, proto, pay: bytes(
        ETH / IP(src=POD, dst=PEER, ihl=ihl, frag=frag, proto=proto) / pay),
        st.integers(0, 15), st.integers(0, 8191), st.integers(0, 255),
        st.binary(max_size=64)),
    st.builds(lambda nh, pay: bytes(ETH / IPv6(src=POD6, dst=PEER6, nh=nh) / pay),
              st.sampled_from([0, 43, 44, 60, 51, 6, 17, 58, 132, 59]),
              st.binary(max_size=64)),
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pkt=packets, to_pod=st.booleans())
def test_any_packet_passes_unchanged(pn, pkt, to_pod):
    pkt = pkt.ljust(14, b"\0")
    # BPF_PROG_TEST_RUN itself refuses frames shorter than an Ethernet header and IP
    # frames whose IP header is cut short (EINVAL before any program runs).
    ethertype = pkt[12:14]
    assume(not (ethertype == b"\x08\x00" and len(pkt) < 34))
    assume(not (ethertype == b"\x86\xdd" and len(pkt) < 54))
    if not pn.node.last or not pn.node.last.plan.rule_slots:
        pn.apply(state(policy("demo/p", rule("demo/p", 0, ports=[tcp_ports(1, 65535)]),
                              rule("demo/p", 1)),
                       iface=pod_iface(port_mirrors=[PortMirror("an", Direction.BOTH, 9)])))
    rc, out = (pn.to_pod if to_pod else pn.from_pod)(pkt)
    assert rc == TC_ACT_UNSPEC
    assert out == pkt


# ---------------------------------------------------------------------- kernel == explain
DIFF_POLICIES = (
    policy("a/web", rule("a/web", 0, dst=blocks("198.18.20.0/24"), ports=[tcp_ports(80, 90)],
                         mirror_id=11),
           rule("a/web", 1, dst=(Cidr("198.18.0.0/16", ("198.18.20.0/25",)),), dest=None,
                mirror_id=12),
           rule("a/web", 2, ports=[PortRange(17, 53, 53)], mirror_id=13)),
    policy("b/back", rule("b/back", 0, src=blocks("198.18.20.0/24"), ports=[tcp_ports(40000,
                                                                                      40010)],
                          mirror_id=21),
           rule("b/back", 1, ports=[PortRange(1)], mirror_id=22)),
    policy("c/v6", rule("c/v6", 0, dst=blocks("2001:2:0:20::/64"), mirror_id=31)),
    policy("d/none", rule("d/none", 0, ports=[tcp_ports(80)], dest=None, mirror_id=41),
           rule("d/none", 1, dst=blocks("198.18.21.0/24"), mirror_id=42)),
)
PEERS = ["198.18.20.5", "198.18.20.200", "198.18.21.7", "198.18.30.1", "203.0.113.1"]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(peer=st.sampled_from(PEERS), proto=st.sampled_from([6, 17, 1]),
       sport=st.sampled_from([53, 80, 85, 40005, 50000]),
       dport=st.sampled_from([53, 80, 85, 40005, 50000]), syn=st.booleans(),
       outbound=st.booleans())
def test_kernel_verdict_equals_explain(fresh, peer, proto, sport, dport, syn, outbound):
    """Random flows through the kernel's classifier decide exactly as explain() says."""
    pn = fresh
    st_ = state(*DIFF_POLICIES, iface=Interface("demo/web", session_id=7, ips=(POD,),
                                                host_ifname="vpod"))
    if pn.node.last is None or pn.node.last.plan.rule_slots.get(1) != ("a/web", 0):
        pn.apply(st_)
    pn.clear_flows()
    src, dst = (POD, peer) if outbound else (peer, POD)
    if proto == 6:
        l4 = TCP(sport=sport, dport=dport, flags="S" if syn else "A")
    elif proto == 17:
        l4 = UDP(sport=sport, dport=dport)
    else:
        l4 = ICMP(id=sport)
    pkt = bytes(ETH / IP(src=src, dst=dst) / l4)
    run_unchanged(pn, pkt, "from" if outbound else "to")
    by_key = {(r.policy, r.index): r.mirror_id for p in DIFF_POLICIES for r in p.rules}
    kernel = sorted(by_key[r] for r in pn.flow_rules(POD, peer) or [])
    ports = {} if proto == 1 else {"dst_port": dport, "src_port": sport}
    want = explain(st_, src, dst, proto, interface_key="demo/web/eth0",
                   tcp_syn=(proto == 6 and syn), **ports)
    assert kernel == sorted(c.mirror_id for c in want.copies)
    # Later packets of the flow (the flow table, then the flow cache when nothing is
    # mirrored) make the same copies: one per rule, every packet.
    later = bytes(ETH / IP(src=src, dst=dst) / (TCP(sport=sport, dport=dport, flags="A")
                                                 if proto == 6 else l4))
    before = copies_made(pn)
    for _ in range(3):
        run_unchanged(pn, later, "from" if outbound else "to")
    assert copies_made(pn) - before == 3 * len(want.copies)


def copies_made(pn) -> int:
    """Clones attempted for every rule slot in use (made or failed)."""
    total = 0
    for slot in pn.node.last.plan.rule_slots:
        t = pn.counters("rule", slot)
        total += t.cloned + t.drops["clone_failed"]
    return total


# ---------------------------------------------------------------- sampling by flow, by rule
def sampled(dest: Destination, every: int, mode: str) -> Destination:
    return dataclasses.replace(dest, sampling=every, sampling_mode=mode)


def show_json(pn, collect) -> list[dict]:
    """What `cn2mirror show` reads from the node's pins (no names file)."""
    pm = PinnedMaps(pn.pin_root)
    try:
        return collect(pm, Names("none"))
    finally:
        pm.close()


def doctor_sampling(pn) -> tuple[str, str]:
    """`cn2mirror doctor`'s flow sampling check on the node: (status, detail up to ':')."""
    from cn2mirror.cli.doctor import Doctor

    d = Doctor(pn.pin_root, pn.netns)
    d.sampling()
    [c] = d.checks
    return c.status, c.detail.split(":")[0]


def udp_pair(family: int, n: int) -> tuple[bytes, bytes, L.FlowKey]:
    """Flow n's packet out of the pod, its reply, and the flow table's key for it."""
    sport = 20000 + n
    if family == 4:
        out = ETH / IP(src=POD, dst=PEER) / UDP(sport=sport, dport=53)
        back = ETH / IP(src=PEER, dst=POD) / UDP(sport=53, dport=sport)
        key = L.canonical_flow_key(POD, PEER, sport, 53, 17)
    else:
        out = ETH / IPv6(src=POD6, dst=PEER6) / UDP(sport=sport, dport=53)
        back = ETH / IPv6(src=PEER6, dst=POD6) / UDP(sport=53, dport=sport)
        key = L.canonical_flow_key(POD6, PEER6, sport, 53, 17)
    return bytes(out), bytes(back), key


def test_sampling_by_flow_keeps_or_leaves_out_whole_flows_as_the_reference_hash_says(fresh):
    """Destination 1:4 by flow; 300 IPv4 and 300 IPv6 UDP flows, two packets out of the
    pod and one back each: a flow's three packets are all copied or all counted as
    sampled_out, and the flows copied are exactly those layout.flow_sample_hash (the
    Python twin of the datapath's hash) puts in, under the node's seed; the flow table's
    keys are the ones layout.canonical_flow_key builds."""
    pn = fresh
    st_ = state(policy("p", rule("p", 0)), dests=[sampled(analyzer(), 4, "flow")])
    pn.apply(st_)
    slot = pn.rule_slot("p", 0)
    seed = 0xC0FFEE
    generation = pn.generation()
    pn.node.writer.set_sampling_seed(seed)
    assert pn.generation() != generation  # flows sampled before are evaluated again
    keys = [bytes(udp_pair(f, n)[2]) for f in (4, 6) for n in range(300)]
    # The seed matters: it chooses other flows than the default one.
    assert [L.flow_sample_hash(k, seed) % 4 for k in keys] != \
        [L.flow_sample_hash(k) % 4 for k in keys]
    predicted_in = 0
    for family in (4, 6):
        for n in range(300):
            out, back, key = udp_pair(family, n)
            before = pn.counters("rule", slot)
            for pkt, direction in ((out, "from"), (out, "from"), (back, "to")):
                run_unchanged(pn, pkt, direction)
            after = pn.counters("rule", slot)
            made = after.cloned - before.cloned
            left_out = after.sampled_out - before.sampled_out
            wanted = L.flow_sample_hash(bytes(key), seed) % 4 == 0
            predicted_in += wanted
            assert (made, left_out) == ((3, 0) if wanted else (0, 3)), (family, n)
            if n < 40:  # `cn2mirror explain` says the same of the flow
                src, dst = (POD, PEER) if family == 4 else (POD6, PEER6)
                [c] = explain(st_, src, dst, 17, 53, "demo/web/eth0",
                              src_port=20000 + n, sampling_seed=seed).copies
                assert c.sampling.endswith("is copied" if wanted else "sampled_out)"), c
    entries = {bytes(k)[:38]: e for k, e in pn.flows()}
    for family in (4, 6):
        for n in range(300):
            key = bytes(udp_pair(family, n)[2])
            e = entries[key[:38]]  # the interface slot aside
            assert e.n_rules == 1 and e.rules[0] & ~L.FLOW_RULE_SAMPLED_OUT == slot
            assert bool(e.rules[0] & L.FLOW_RULE_SAMPLED_OUT) == \
                (L.flow_sample_hash(key, seed) % 4 != 0)
    # 1 flow in 4, within 5 standard deviations over 600 flows.
    assert abs(predicted_in - 150) <= 5 * (600 * 0.25 * 0.75) ** 0.5, predicted_in
    # `cn2mirror show flows` says which flows sampling left out.
    flows = show_json(pn, collect_flows)
    assert sum(not f["copies"][0]["sampled_out"] for f in flows) == predicted_in
    assert {f["copies"][0]["rule_slot"] for f in flows} == {slot}


def test_a_rules_own_sampling_replaces_its_destinations(fresh):
    """Destination 1:2 by packet. Rule 0 of policy p (UDP port 53) samples 1:1 of its
    own: every copy made; rule 0 of policy q (UDP port 80) samples by flow with the
    destination's N: 1:2 whole flows. The planner writes each rule's whole sampling."""
    pn = fresh
    ports53 = (PortRange(17, 53, 53),)
    st_ = state(policy("p", rule("p", 0, ports=ports53, sampling=Sampling(every=1))),
                policy("q", rule("q", 0, ports=(PortRange(17, 80, 80),),
                                 sampling=Sampling(mode="flow"))),
                dests=[sampled(analyzer(), 2, "packet")])
    pn.apply(st_)
    p_slot, q_slot = pn.rule_slot("p", 0), pn.rule_slot("q", 0)
    entries = {int.from_bytes(k, "little"): L.RuleSampling.from_buffer_copy(v)
               for k, v in pn.node.last.plan.maps["rule_sampling"].items()}
    assert {s: (e.sample_every, e.sample_by) for s, e in entries.items()} == {
        p_slot: (1, L.SAMPLE_BY_PACKET), q_slot: (2, L.SAMPLE_BY_FLOW)}
    p0, q0 = pn.counters("rule", p_slot), pn.counters("rule", q_slot)
    flows_in = 0
    for n in range(100):
        out, back, key = udp_pair(4, n)
        for pkt, direction in ((out, "from"), (back, "to")):
            run_unchanged(pn, pkt, direction)
        other = bytes(ETH / IP(src=POD, dst=PEER) / UDP(sport=30000 + n, dport=80))
        for _ in range(2):
            run_unchanged(pn, other, "from")
        flows_in += L.flow_sample_hash(bytes(
            L.canonical_flow_key(POD, PEER, 30000 + n, 80, 17))) % 2 == 0
    p1, q1 = pn.counters("rule", p_slot), pn.counters("rule", q_slot)
    assert {r["slot"]: r["sampling"] for r in show_json(pn, collect_rules)} == {
        p_slot: {"one_in": 1, "by": "packet"}, q_slot: {"one_in": 2, "by": "flow"}}
    # `cn2mirror doctor` warns: q samples by flow under the public default seed.
    assert doctor_sampling(pn) == ("warn", f"rule slot {q_slot} sample(s) by flow under "
                                           "the public default seed")
    pn.node.writer.set_sampling_seed(77)
    assert doctor_sampling(pn) == ("ok", "1 sample(s) by flow, under this node's own seed")
    assert (p1.cloned - p0.cloned, p1.sampled_out - p0.sampled_out) == (200, 0)
    assert (q1.cloned - q0.cloned, q1.sampled_out - q0.sampled_out) == (
        2 * flows_in, 2 * (100 - flows_in))


def test_port_mirroring_samples_by_packet_whatever_the_mode(fresh):
    """Port mirroring has no flows: a destination sampling 1:2 by flow samples its port
    mirror's packets one by one at random (about half of 400 copies of one flow; by flow
    it would be all or none)."""
    pn = fresh
    iface = pod_iface(port_mirrors=[PortMirror("an", Direction.BOTH, 77)])
    pn.apply(state(dests=[sampled(analyzer(), 2, "flow")], iface=iface))
    slot = next(s for s, (name, _) in pn.node.last.plan.rule_slots.items()
                if name.startswith("port:"))
    before = pn.counters("rule", slot)
    pkt = bytes(ETH / IP(src=POD, dst=PEER) / UDP(sport=20000, dport=53))
    for _ in range(400):
        run_unchanged(pn, pkt, "from")
    after = pn.counters("rule", slot)
    made, left_out = after.cloned - before.cloned, after.sampled_out - before.sampled_out
    assert made + left_out == 400
    assert abs(made - 200) <= 5 * (400 * 0.25) ** 0.5, made
