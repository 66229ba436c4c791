"""Snap length, sampling and copy budgets (issue 15), with real traffic in the namespace
lab: trafgen in the client pod sends UDP to the web pod through the node, whose
classifier mirrors every flow of web's interface to the analyzer pod on the same node.
Production packets are counted (and dropped) in an nft netdev ingress hook on web's eth0,
copies the same way on the analyzer's; the datapath's own counters are read from the
pinned maps. Each test runs a few seconds.
"""

from __future__ import annotations

import array
import dataclasses
import ipaddress
import json
import os
import signal
import struct
import subprocess
import tempfile
import time

import pytest

from benchmarks import common as cm
from cn2mirror.agent import layout as L
from cn2mirror.agent.lab import ns_sh
from cn2mirror.agent.pinned import sum_counters
from cn2mirror.agent.programmer import CopyBudget
from cn2mirror.agent.state import NodeState, Sampling
from cn2mirror.agent.status import CopyCountReporter

from .builders import md, started_node, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

UDP_PORT = cm.PROD_PORT  # the traffic web's sink counts
TCP_PORT = 5201


@pytest.fixture(scope="module")
def lab():
    with cm.bench_lab() as lab:
        cm.install_sink(lab.pods["web"].netns, f"udp dport {UDP_PORT}")
        cm.install_sink(lab.pods["analyzer"].netns, f"udp dport {cm.JMIRROR_PORT}")
        yield lab


@pytest.fixture(scope="module")
def node(lab):
    with started_node(lab) as n:
        yield n


def mirror_all(lab, node, budget: CopyBudget = cm.NO_COPY_BUDGET, **limits) -> None:
    """Every flow of web's interface mirrored to the analyzer, with these limits."""
    node.copy_budget = budget
    dest = dataclasses.replace(cm.analyzer_destination(lab), **limits)
    node.apply(NodeState("node1", (cm.pod_interface(lab, "web", 100),),
                         (cm.mirror_all_policy(),), (dest,)))
    assert not node.last.problems, node.last.problems


def dest_counters(node):
    slot = node.last.plan.dest_slots[cm.ANALYZER]
    return sum_counters(node.datapath.maps["stats_dest"].lookup(slot.to_bytes(4, "little")))


def trafgen_conf(lab, frame: int, sport: str = "40000") -> str:
    client, web = lab.pods["client"], lab.pods["web"]
    vmac = json.loads(ns_sh(lab.nodes["node1"].netns, "ip", "-j", "link", "show",
                            client.host_ifname).stdout)[0]["address"]
    path = tempfile.mktemp(prefix="cn2m-trafgen-", suffix=".cfg")
    with open(path, "w") as f:
        f.write(f"{{ eth(da={vmac}, sa={client.mac}), ipv4(saddr={client.ip}, "
                f"daddr={web.ip}, ttl=64), udp(sp={sport}, dp={UDP_PORT}), "
                f"fill(0x41, {frame - 42}) }}\n")
    return path


def run_trafgen(lab, conf: str, rate: int, count: int) -> int:
    """Send `count` frames at `rate` a second; the number trafgen says it sent."""
    r = subprocess.run(["ip", "netns", "exec", lab.pods["client"].netns, "trafgen", "--dev",
                        "eth0", "--conf", conf, "-n", str(count), "-b", f"{rate}pps",
                        "--cpus", "1", "--no-sock-mem", "--notouch-irq"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    sent = next((int(line.split()[0]) for line in (r.stdout + r.stderr).splitlines()
                 if "packets outgoing" in line), count)
    return sent


# The policy mirrors all of web's traffic, and web's own background packets (ARP, IPv6
# neighbour and multicast-listener messages: not in web's UDP sink) may add a decision
# or two to the counters during a run; a packet neither copied nor counted would show as
# fewer decisions than packets, which is never allowed.
BACKGROUND = 4


def sinks(lab) -> tuple[int, int]:
    return (cm.sink_count(lab.pods["web"].netns), cm.sink_count(lab.pods["analyzer"].netns))


# ------------------------------------------------------------------------- sampling
def check_sampled_run(lab, node, count: int, one_in: int) -> tuple[int, int]:
    """Send `count` UDP packets of one flow; check that production got them, that each
    was copied or counted as sampled_out, that the copies made are within 5 standard
    deviations of the binomial expectation of 1 in `one_in`, and that every copy made
    reached the analyzer. (copies made, packets seen by web)"""
    conf = trafgen_conf(lab, 64)
    try:
        c0, (w0, a0) = dest_counters(node), sinks(lab)
        run_trafgen(lab, conf, 50_000, count)
        time.sleep(0.3)
        c1, (w1, a1) = dest_counters(node), sinks(lab)
    finally:
        os.unlink(conf)
    seen, made = w1 - w0, c1.packets - c0.packets
    assert seen >= 0.975 * count, f"production lost packets: {seen} of {count} reached web"
    assert 0 <= made + c1.sampled_out - c0.sampled_out - seen <= BACKGROUND
    p = 1 / one_in
    tolerance = 5 * (seen * p * (1 - p)) ** 0.5 + BACKGROUND
    assert abs(made - seen * p) <= tolerance, (made, seen * p, tolerance)
    assert a1 - a0 == made, "copies made but not delivered"
    assert sum(c1.drops.values()) == sum(c0.drops.values())
    return made, seen


@pytest.mark.parametrize("one_in", [4, 25])
def test_sampling_copies_one_packet_in_n_and_counts_the_rest(lab, node, one_in):
    """40,000 UDP packets of one flow; sampling 1:N per packet: the copies made are
    within 5 standard deviations of the binomial expectation (about +-4% at 1:4, +-12% at
    1:25), every packet is either copied or counted as sampled_out, and every copy made
    reaches the analyzer."""
    mirror_all(lab, node, sampling=one_in)
    made, seen = check_sampled_run(lab, node, 40_000, one_in)
    print(f"sampling 1:{one_in}: {made} copies of {seen} packets = 1:{seen / made:.2f}")


@pytest.mark.parametrize("own", [1, 8])
def test_a_rules_own_sampling_replaces_its_destinations_on_real_traffic(lab, node, own):
    """The destination samples 1:2 per packet; the one rule's own sampling (1:1, 1:8)
    decides instead: 12,000 UDP packets, checked as above against 1 in `own` (all of
    them at 1:1)."""
    node.copy_budget = cm.NO_COPY_BUDGET
    dest = dataclasses.replace(cm.analyzer_destination(lab), sampling=2)
    policy = cm.mirror_all_policy()
    rule = dataclasses.replace(policy.rules[0], sampling=Sampling(every=own))
    node.apply(NodeState("node1", (cm.pod_interface(lab, "web", 100),),
                         (dataclasses.replace(policy, rules=(rule,)),), (dest,)))
    assert not node.last.problems, node.last.problems
    made, seen = check_sampled_run(lab, node, 12_000, own)
    print(f"rule's own 1:{own} over a 1:2 destination: {made} copies of {seen} packets")


# ------------------------------------------------------------------------- budgets
BUDGETS = {
    # name: (node budget, destination limits, frame size)
    "destination-pps": (CopyBudget(0, 0), {"budget_pps": 4_000}, 64),
    "destination-bps": (CopyBudget(0, 0), {"budget_bps": 16_000_000}, 500),
    "node-pps": (CopyBudget(4_000, 0), {}, 64),
    "node-bps": (CopyBudget(0, 16_000_000), {}, 500),
}
# Steady traffic: one frame every 33 us asked for; trafgen's sleeps make that 11,000 to
# 15,000 frames/s on this 2-core machine (measured: 14,500/s alone, 11,000/s in the suite;
# budgets of 8,000/s were not exceeded by half there), so the budgets are 4,000/s, a
# third or less of the traffic. Not trafgen's -b: its rate comes from a TX ring flushed
# in bursts (5,000 frames every 166 ms at -b 30000pps), and a budget is a policer, whose
# saved-up allowance (100 ms of budget) is smaller than such a gap: it would rightly
# admit less.
TRAFGEN_GAP = "33us"


@pytest.mark.parametrize("case", sorted(BUDGETS))
def test_copy_budget_holds_copies_to_the_limit_and_production_goes_on(lab, node, case):
    """Steady traffic at several times the budget: over a 2 s window the copies
    delivered a second are within 10% of the budget (bits: the mirrored frames' bits);
    over the whole run every packet was copied or counted as rate_limited; production
    was not held back (every packet trafgen sent reached web)."""
    budget, limits, frame = BUDGETS[case]
    mirror_all(lab, node, budget, **limits)
    limit_pps = limits.get("budget_pps") or budget.pps or \
        (limits.get("budget_bps") or budget.bps) / (8 * frame)
    conf = trafgen_conf(lab, frame)
    procs = cm.Procs()
    try:
        c0, (w0, a0) = dest_counters(node), sinks(lab)
        tg = procs.start(lab.pods["client"].netns, "trafgen", "--dev", "eth0", "--conf", conf,
                         "-t", TRAFGEN_GAP, "--cpus", "1", "--no-sock-mem", "--notouch-irq")
        time.sleep(0.5)
        assert tg.poll() is None, "trafgen exited"
        t0, (ww0, aa0) = time.monotonic(), sinks(lab)
        time.sleep(2.0)
        t1, (ww1, aa1) = time.monotonic(), sinks(lab)
        out, err = procs.stop(tg, signal.SIGINT)
        time.sleep(0.3)
        c1, (w1, a1) = dest_counters(node), sinks(lab)
    finally:
        procs.stop_all()
        os.unlink(conf)
    copy_pps = (aa1 - aa0) / (t1 - t0)
    prod_pps = (ww1 - ww0) / (t1 - t0)
    sent = next((int(line.split()[0]) for line in (out + err).splitlines()
                 if "packets outgoing" in line), None)
    made = c1.packets - c0.packets
    limited = c1.drops["rate_limited"] - c0.drops["rate_limited"]
    print(f"{case}: copies {copy_pps:,.0f}/s for a budget of {limit_pps:,.0f}/s; "
          f"production {prod_pps:,.0f}/s; {made} made, {limited} "
          f"rate_limited of {w1 - w0}")
    assert abs(copy_pps - limit_pps) <= 0.10 * limit_pps
    assert prod_pps >= 1.5 * limit_pps, "the traffic did not exceed the budget"
    assert sent is None or w1 - w0 >= sent - 10, f"web got {w1 - w0} of {sent}"
    assert 0 <= made + limited - (w1 - w0) <= BACKGROUND, "a packet neither copied nor counted"
    assert a1 - a0 == made
    assert limited > 0.25 * (made + limited)  # the budget did bite


def test_rate_limited_copies_reach_the_destinations_status(lab, node, emu):
    """The node's counts of a destination's copies, rate_limited among them, land in
    the MirrorDestination's status.copies.<node> through the real client against the
    emulated API server; written again only when they change; the key goes when the
    node no longer sends there."""
    from kubernetes import client

    from cn2mirror.agent.kube import KubeSource

    mirror_all(lab, node, budget_pps=2_000)
    conf = trafgen_conf(lab, 64)
    try:
        run_trafgen(lab, conf, 20_000, 10_000)
        time.sleep(0.3)
    finally:
        os.unlink(conf)
    counts = dest_counters(node)
    assert counts.drops["rate_limited"] > 0 and counts.packets > 0
    emu.apply(md(cm.ANALYZER, externalAnalyzer=True, analyzerIP="198.18.9.9"))
    api = client.ApiClient(emu.configuration())
    src = KubeSource(api, node_name="node1", debounce=0.01, backoff=(0.05, 0.3))
    src.start(lambda s: None)
    try:
        wait_until(src.ready, 10, what="the source")
        sent_to = {cm.ANALYZER: counts}
        reporter = CopyCountReporter(api, src, "node1", lambda: sent_to)
        assert reporter.report(src.snapshot()) == 1
        status = emu.read(md(cm.ANALYZER)["apiVersion"], "MirrorDestination",
                          cm.ANALYZER).get("status") or {}
        got = status["copies"]["node1"]
        assert (got["copied"], got["rateLimited"], got["sampledOut"]) == (
            counts.packets, counts.drops["rate_limited"], counts.sampled_out)
        wait_until(lambda: "node1" in ((src.snapshot().destinations[0].get("status") or {})
                                       .get("copies") or {}), 5, what="the watch")
        assert reporter.report(src.snapshot()) == 0  # unchanged: not written again
        counts.packets += 1  # one more copy: written again
        assert reporter.report(src.snapshot()) == 1
        sent_to.clear()  # the node no longer sends there
        wait_until(lambda: (((src.snapshot().destinations[0].get("status") or {})
                             .get("copies") or {}).get("node1") or {}).get("copied")
                   == counts.packets, 5, what="the watch")
        assert reporter.report(src.snapshot()) == 1
        status = emu.read(md(cm.ANALYZER)["apiVersion"], "MirrorDestination",
                          cm.ANALYZER).get("status") or {}
        assert "node1" not in (status.get("copies") or {})
    finally:
        src.stop()
        api.close()


def test_no_budget_copies_everything(lab, node):
    """The control of the budget tests: the same traffic with no budget is copied whole."""
    mirror_all(lab, node)
    conf = trafgen_conf(lab, 64)
    try:
        c0, (w0, a0) = dest_counters(node), sinks(lab)
        run_trafgen(lab, conf, 30_000, 20_000)
        time.sleep(0.3)
        c1, (w1, a1) = dest_counters(node), sinks(lab)
    finally:
        os.unlink(conf)
    assert c1.packets - c0.packets == w1 - w0 == a1 - a0
    assert c1.drops["rate_limited"] == c0.drops["rate_limited"]


# ------------------------------------------------------------------------- snap length
class Capture:
    """tshark on the analyzer's eth0 (before the nft sink: AF_PACKET taps come first)."""

    def __init__(self, netns: str):
        self.path = tempfile.mktemp(prefix="cn2m-snap-", suffix=".pcap")
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, "tshark", "-q", "-i",
                                      "eth0", "-F", "pcap", "-w", self.path, "-f",
                                      f"udp port {cm.JMIRROR_PORT}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 15
        while not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            assert time.time() < deadline and self.proc.poll() is None, "tshark not ready"
            time.sleep(0.1)
        time.sleep(0.5)

    def stop(self) -> str:
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=15)
        return self.path

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        if os.path.exists(self.path):
            os.unlink(self.path)


def inner_packets(pcap: str) -> list[bytes]:
    """The mirrored packets (from their IP header on) of the jmirror copies in a pcap."""
    from scapy.utils import rdpcap

    out = []
    for p in rdpcap(pcap):
        raw = bytes(p)
        udp = 14 + (raw[14] & 0xF) * 4
        out.append(raw[udp + 8 + L.JMIRROR_HEADER_LEN:])
    return out


def l4_checksum_verifies(inner: bytes) -> bool:
    """The TCP or UDP checksum in the packet is right for the bytes carried (IPv4)."""
    ihl, proto = (inner[0] & 0xF) * 4, inner[9]
    seg = bytearray(inner[ihl:])
    pseudo = inner[12:20] + struct.pack("!HH", proto, len(seg))
    data = pseudo + bytes(seg) + b"\0" * (len(seg) % 2)
    total = sum(array.array("H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def send_udp(lab, n: int, size: int) -> None:
    web, client = lab.pods["web"], lab.pods["client"]
    ns_sh(client.netns, "python3", "-c",
          f"import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
          f"for i in range({n}):\n s.sendto(bytes([i%256])*{size},('{web.ip}',{UDP_PORT}))\n"
          f" time.sleep(0.01)")


def send_tcp(lab, size: int) -> None:
    """`size` bytes over one TCP connection from client to web (GSO super-packets)."""
    web, client = lab.pods["web"], lab.pods["client"]
    server = subprocess.Popen(
        ["ip", "netns", "exec", web.netns, "python3", "-c",
         f"import socket;s=socket.socket();s.setsockopt(1,2,1);s.bind(('{web.ip}',{TCP_PORT}));"
         "s.listen();c,_=s.accept();n=0\nwhile True:\n d=c.recv(1<<20)\n if not d: break\n"
         " n+=len(d)\nprint(n)"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        ns_sh(client.netns, "python3", "-c",
              f"import socket;s=socket.socket();s.connect(('{web.ip}',{TCP_PORT}));"
              f"s.sendall(b'x'*{size});s.close()")
        assert int(server.communicate(timeout=60)[0]) == size
    finally:
        server.kill()


SNAP = 100


def test_snap_length_cuts_copies_and_their_checksums_do_not_verify(lab, node):
    """Copies cut to 100 bytes after the Ethernet header: UDP datagrams of 1,000 bytes and
    a bulk TCP transfer (GSO super-packets: each wire segment cut, none cut whole). Each
    copy carries exactly 100 bytes of the packet, its IP header still says how long the
    packet was, and its TCP/UDP checksum does not verify: neither by our own sum over the
    bytes carried nor by tshark with checksum validation on. Counted as truncated."""
    mirror_all(lab, node, snap_length=SNAP)
    cap = Capture(lab.pods["analyzer"].netns)
    try:
        c0 = dest_counters(node)
        send_udp(lab, 20, 1000)
        send_tcp(lab, 2_000_000)
        pcap = cap.stop()
        c1 = dest_counters(node)
        copies = inner_packets(pcap)
        tshark = subprocess.run(
            ["tshark", "-r", pcap, "-o", "tcp.check_checksum:TRUE", "-o",
             "udp.check_checksum:TRUE", "-T", "fields", "-e", "ip.proto", "-e", "ip.len",
             "-e", "tcp.checksum.status", "-e", "udp.checksum.status", "-Y",
             f"jmirror && (tcp.dstport == {TCP_PORT} || udp.dstport == {UDP_PORT})"],
            capture_output=True, text=True, timeout=60)
    finally:
        cap.close()
    assert tshark.returncode == 0, tshark.stderr
    udp = [p for p in copies if p[9] == 17 and struct.unpack_from("!H", p, 22)[0] == UDP_PORT]
    tcp_data = [p for p in copies if p[9] == 6 and struct.unpack_from("!H", p, 22)[0] ==
                TCP_PORT and struct.unpack_from("!H", p, 2)[0] > SNAP]
    assert len(udp) == 20
    assert len(tcp_data) >= 2_000_000 // 65536, "too few TCP copies"
    # One copy per wire segment (at most an MSS of payload each), never a whole
    # super-packet cut once.
    assert sum(struct.unpack_from("!H", p, 2)[0] - 52 for p in tcp_data) >= 2_000_000
    for p in udp + tcp_data:
        assert len(p) == SNAP, "a copy not cut to the snap length"
        assert struct.unpack_from("!H", p, 2)[0] > SNAP  # the original length is kept
        assert not l4_checksum_verifies(p)
    # Fields of the outer and the inner headers come comma-separated, outer first: the
    # last value is the mirrored packet's.
    rows = [[f.split(",")[-1] for f in line.split("\t")] for line in tshark.stdout.splitlines()]
    assert len(rows) >= len(udp) + len(tcp_data)
    # checksum.status: 0 bad, 1 good, 2 unverified; never good for a cut copy.
    statuses = {r[2] or r[3] for r in rows if int(r[1]) > SNAP}
    assert statuses and "1" not in statuses, statuses
    cut = c1.truncated - c0.truncated
    assert cut >= len(udp) + len(tcp_data)
    assert c1.gso_by_segment > c0.gso_by_segment, "super-packets not segmented first"
    print(f"snap length {SNAP}: {len(udp)} UDP and {len(tcp_data)} TCP copies cut, "
          f"{cut} counted truncated, tshark checksum statuses {sorted(statuses)}")


def test_a_copy_shorter_than_the_snap_length_is_whole(lab, node):
    mirror_all(lab, node, snap_length=SNAP)
    cap = Capture(lab.pods["analyzer"].netns)
    try:
        c0 = dest_counters(node)
        send_udp(lab, 5, 40)
        copies = [p for p in inner_packets(cap.stop()) if p[9] == 17]
        c1 = dest_counters(node)
    finally:
        cap.close()
    assert len(copies) == 5
    for p in copies:
        assert len(p) == struct.unpack_from("!H", p, 2)[0] == 20 + 8 + 40
        assert l4_checksum_verifies(p)
    assert c1.truncated == c0.truncated


def test_the_copies_analyzer_sees_are_what_socket_sends(lab, node):
    """Sanity of the capture helper: without a snap length, UDP copies are whole and their
    checksums verify (so the check above can fail)."""
    mirror_all(lab, node)
    cap = Capture(lab.pods["analyzer"].netns)
    try:
        send_udp(lab, 5, 1000)
        copies = [p for p in inner_packets(cap.stop()) if p[9] == 17]
    finally:
        cap.close()
    assert len(copies) == 5
    assert all(len(p) == 1028 and l4_checksum_verifies(p) for p in copies)



# ------------------------------------------------------------------- sampling by flow
FLOWS_PER_FAMILY = 5_000
FLOW_SPORT = 20_000  # flow n: client port FLOW_SPORT + n <-> web's UDP_PORT


def flows_conf(lab, family: int, reverse: bool) -> str:
    """trafgen: one packet of each of the FLOWS_PER_FAMILY flows in turn (the client's
    port counts up), from the client to web, or (reverse) web's replies to the client."""
    client, web = lab.pods["client"], lab.pods["web"]
    src, dst = (web, client) if reverse else (client, web)
    vmac = json.loads(ns_sh(lab.nodes["node1"].netns, "ip", "-j", "link", "show",
                            src.host_ifname).stdout)[0]["address"]
    counting = f"dinc({FLOW_SPORT}, {FLOW_SPORT + FLOWS_PER_FAMILY - 1}, 1)"
    ports = f"sp={UDP_PORT}, dp={counting}" if reverse else f"sp={counting}, dp={UDP_PORT}"
    ip = f"ipv4(saddr={src.ip}, daddr={dst.ip}, ttl=64)" if family == 4 else \
        f"ipv6(saddr={src.ip6}, daddr={dst.ip6}, hl=64)"
    path = tempfile.mktemp(prefix="cn2m-trafgen-", suffix=".cfg")
    with open(path, "w") as f:
        f.write(f"{{ eth(da={vmac}, sa={src.mac}), {ip}, udp({ports}), fill(0x41, 18) }}\n")
    return path


def run_trafgen_from(lab, pod: str, conf: str, count: int) -> None:
    r = subprocess.run(["ip", "netns", "exec", lab.pods[pod].netns, "trafgen", "--dev",
                        "eth0", "--conf", conf, "-n", str(count), "-t", "50us", "--cpus", "1",
                        "--no-sock-mem", "--notouch-irq"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]


def copied_flows(pcap: str) -> dict[bytes, int]:
    """Copies in a capture, by the canonical key of the flow they are a copy of."""
    out: dict[bytes, int] = {}
    for inner in inner_packets(pcap):
        if inner[0] >> 4 == 4:
            ihl = (inner[0] & 0xF) * 4
            src, dst = (str(ipaddress.ip_address(inner[a:a + 4])) for a in (12, 16))
            proto, l4 = inner[9], inner[ihl:]
        else:
            src, dst = (str(ipaddress.ip_address(inner[a:a + 16])) for a in (8, 24))
            proto, l4 = inner[6], inner[40:]
        sport, dport = struct.unpack("!HH", l4[:4])
        key = bytes(L.canonical_flow_key(src, dst, sport, dport, proto))
        out[key] = out.get(key, 0) + 1
    return out


def test_sampling_by_flow_copies_whole_flows_both_ways_as_the_hash_chooses(lab, node):
    """Destination 1:8 by flow; 10,000 UDP flows (5,000 IPv4, 5,000 IPv6), each two
    packets from the client to web and one reply: every flow's three packets are copied
    (both directions) or none is, the flows copied are exactly those
    layout.flow_sample_hash chooses (1 in 8 of them, within 5 standard deviations), and
    every other packet is counted as sampled_out. Copies are read by tshark at the
    analyzer."""
    mirror_all(lab, node, sampling=8, sampling_mode="flow")
    client = lab.pods["client"]
    # The replies end in a sink on the client (no port unreachable errors).
    cm.install_sink(client.netns, f"udp sport {UDP_PORT}")
    keys = {}
    for attr in ("ip", "ip6"):
        for n in range(FLOWS_PER_FAMILY):
            k = bytes(L.canonical_flow_key(getattr(client, attr),
                                           getattr(lab.pods["web"], attr),
                                           FLOW_SPORT + n, UDP_PORT, 17))
            keys[k] = L.flow_sample_hash(k) % 8 == 0
    chosen = {k for k, v in keys.items() if v}
    # (sender, its trafgen configuration, packets): two rounds of the flows, one of replies
    runs = [(pod, flows_conf(lab, family, pod == "web"), FLOWS_PER_FAMILY * rounds)
            for family in (4, 6) for pod, rounds in (("client", 2), ("web", 1))]
    cap = Capture(lab.pods["analyzer"].netns)
    try:
        c0, w0 = dest_counters(node), sinks(lab)[0]
        for pod, conf, count in runs:
            run_trafgen_from(lab, pod, conf, count)
        time.sleep(0.5)
        c1, w1 = dest_counters(node), sinks(lab)[0]
        seen = copied_flows(cap.stop())
    finally:
        cap.close()
        for _, conf, _ in runs:
            os.unlink(conf)
        ns_sh(client.netns, "nft", "delete", "table", "netdev", "cn2mbench")
    assert w1 - w0 >= 0.99 * 2 * 2 * FLOWS_PER_FAMILY, "production lost packets"
    ours = {k: n for k, n in seen.items() if k in keys}
    assert set(ours) == chosen, (len(set(ours) - chosen), len(chosen - set(ours)))
    assert all(n == 3 for n in ours.values()), sorted(set(ours.values()))
    flows = len(keys)
    assert abs(len(chosen) - flows / 8) <= 5 * (flows / 8 * 7 / 8) ** 0.5, len(chosen)
    made, left_out = c1.packets - c0.packets, c1.sampled_out - c0.sampled_out
    assert 0 <= made - 3 * len(chosen) <= BACKGROUND
    assert 0 <= left_out - 3 * (flows - len(chosen)) <= BACKGROUND
    print(f"sampling 1:8 by flow: {len(chosen)} of {flows} flows copied whole "
          f"(1:{flows / len(chosen):.2f}), {made} copies, {left_out} sampled_out")
