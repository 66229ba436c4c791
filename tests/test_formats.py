"""Output formats end to end (issue 15): ERSPAN II and III, GRE, GENEVE, VXLAN and
Contrail's header, on real traffic from a pod with its offloads on.

One lab for all formats; each case mirrors a TCP transfer (GSO super-packets on the
wire) to the analyzer pod on the same node and reads what reaches the analyzer's eth0.
Every copy is taken apart here (independently of the agent's template code) and by
tshark, untold (the Contrail header: by `cn2mirror capture`), and checked against what
crossed the pod's interface, captured there at the same time:
- exact (analyzer path MTU 9000): each copy's inner frame is a wire frame, or one of the
  segments TSO makes of a wire super-packet, byte for byte (checksums aside);
- fit (1500): the copies carry every byte of the stream; copies of frames that were not
  GSO super-packets (the receiver's ACKs) are those frames, byte for byte.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from cn2mirror.agent import layout as L
from cn2mirror.agent.lab import Lab
from cn2mirror.agent.state import (
    DeliveryMode,
    Destination,
    Encapsulation,
    NodeState,
)
from tests.builders import Frames, started_node
from tests.test_copy_path import (
    dest_counters,
    mirror,
    send_tcp,
    set_analyzer_mtu,
    tcp_checksum_ok,
    tcp_of,
    web_iface,
    wire_segments,
    zero_checksums,
)

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

CN2MIRROR = os.path.join(os.path.dirname(sys.executable), "cn2mirror")

MIRROR_ID = 0x2ABCDE5  # wider than ERSPAN's 10-bit session id and VXLAN's 24-bit VNI
SESSION_ID = 501  # web's interface (tests/test_copy_path.web_iface)
FORMATS = {
    "erspan2": Encapsulation("erspan2"),
    "erspan3": Encapsulation("erspan3"),
    "gre": Encapsulation("gre", key=77),
    "geneve": Encapsulation("geneve", vni=7),
    "vxlan": Encapsulation("vxlan", vni=4242),
    "contrail": Encapsulation("contrail", network="demo-net"),
}
CONTRAIL_PORT = 8099
# What tshark must make of every copy, untold.
TSHARK_LAYERS = {
    "erspan2": "eth:ethertype:ip:gre:erspan:eth:ethertype:ip:tcp",
    "erspan3": "eth:ethertype:ip:gre:erspan:eth:ethertype:ip:tcp",
    "gre": "eth:ethertype:ip:gre:eth:ethertype:ip:tcp",
    "geneve": "eth:ethertype:ip:udp:geneve:eth:ethertype:ip:tcp",
    "vxlan": "eth:ethertype:ip:udp:vxlan:eth:ethertype:ip:tcp",
}


@pytest.fixture(scope="module")
def lab():
    lab = Lab(prefix="cn2f" + uuid.uuid4().hex[:4])
    try:
        lab.up_default()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def node(lab):
    """One node for the module (each load compiles the programs: seconds); each test
    applies its own state, with a destination of its own name, so that counters start
    from zero (a slot's counters restart when it is given to another object)."""
    with started_node(lab) as n:
        yield n


# ---------------------------------------------------------------------- taking copies apart
def decap(frame: bytes, fmt: str) -> tuple[dict, bytes]:
    """The header fields of one copy, and the frame it carries."""
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:]
    assert ip[0] == 0x45
    f: dict = {"src": socket.inet_ntoa(ip[12:16]), "dst": socket.inet_ntoa(ip[16:20]),
               "ip_len": struct.unpack_from("!H", ip, 2)[0]}
    rest = ip[20:]
    if fmt in ("erspan2", "erspan3", "gre"):
        assert ip[9] == 47
        flags, proto = struct.unpack_from("!HH", rest)
        f["gre_flags"], f["gre_proto"] = flags, proto
        off = 4
        if flags & 0x2000:
            f["key"] = struct.unpack_from("!I", rest, off)[0]
            off += 4
        if flags & 0x1000:
            off += 4  # sequence number
        if fmt == "erspan2":
            w1, w2 = struct.unpack_from("!II", rest, off)
            f.update(version=w1 >> 28, session=w1 & 0x3FF, index=w2 & 0xFFFFF)
            off += 8
        elif fmt == "erspan3":
            w1, ts, w3 = struct.unpack_from("!III", rest, off)
            f.update(version=w1 >> 28, session=w1 & 0x3FF, timestamp=ts,
                     direction=(w3 >> 3) & 1, gra=(w3 >> 1) & 3)
            off += 12
        return f, rest[off:]
    assert ip[9] == 17
    sport, dport, ulen, _ = struct.unpack_from("!HHHH", rest)
    f.update(sport=sport, dport=dport, udp_len=ulen)
    body = rest[8:]
    if fmt == "vxlan":
        flags, vni = struct.unpack_from("!II", body)
        f.update(vxlan_flags=flags, vni=vni >> 8)
        return f, body[8:]
    if fmt == "geneve":
        opt_words = body[0] & 0x3F
        f.update(vni=struct.unpack_from("!I", body, 4)[0] >> 8,
                 proto=struct.unpack_from("!H", body, 2)[0])
        opts = body[8:8 + 4 * opt_words]
        cls, typ, length = struct.unpack_from("!HBB", opts)
        f.update(opt=(cls, typ, length & 0x1F), opt_ids=struct.unpack_from("!II", opts, 4))
        return f, body[8 + 4 * opt_words:]
    # contrail: TLVs up to type 255, then the frame
    tlvs, off = {}, 0
    while True:
        t, n = body[off], body[off + 1]
        tlvs[t] = body[off + 2:off + 2 + n]
        off += 2 + n
        if t == 255:
            break
    f["tlvs"] = tlvs
    return f, body[off:]


def ip_of(frame: bytes) -> bytes:
    """The IP packet of an Ethernet frame, as long as its header says."""
    ip = frame[14:]
    return ip[:struct.unpack_from("!H", ip, 2)[0]] if ip[0] >> 4 == 4 else ip


def dest_name(fmt: str, mtu: int) -> str:
    return f"{fmt}-{mtu}"


def run_format(lab, node, fmt: str, mtu: int, size: int):
    """Mirror a `size`-byte transfer to the local analyzer in `fmt` over a path of
    `mtu`; returns (copies as (fields, inner frame), wire frames, raw copies, data)."""
    an, web = lab.pods["analyzer"], lab.pods["web"]
    set_analyzer_mtu(lab, mtu)
    name = dest_name(fmt, mtu)
    dest = Destination(name, DeliveryMode.JMIRROR, analyzer_ip=an.ip,
                       udp_port=CONTRAIL_PORT if fmt == "contrail" else 30030,
                       encapsulation=FORMATS[fmt])
    node.apply(NodeState("node1", interfaces=(web_iface(lab),),
                         policies=(mirror("demo/p", name, MIRROR_ID),), destinations=(dest,)))
    assert not node.last.problems, node.last.problems
    data = os.urandom(size)
    path = tempfile.mktemp(prefix="cn2m-payload-")
    with open(path, "wb") as f:
        f.write(data)
    wire = Frames(lab.nodes["node1"].netns, web.host_ifname)
    at_analyzer = Frames(an.netns, "eth0")
    try:
        send_tcp(lab, web.ip, path, size)
        time.sleep(0.5)
        crossed = wire.stop()
        received = [d for kind, d in at_analyzer.stop() if kind != socket.PACKET_OUTGOING]
    finally:
        os.unlink(path)
    raw = [d for d in received if len(d) > 34 and d[12:14] == b"\x08\x00" and (
        d[23] == 47 or (d[23] == 17 and struct.unpack_from("!H", d, 36)[0] in (
            CONTRAIL_PORT, L.GENEVE_PORT, L.VXLAN_PORT)))]
    copies = [decap(d, fmt) for d in raw]
    return copies, crossed, raw, data


def tshark_rows(raw: list[bytes], fields: list[str]) -> list[list[str]]:
    pcap = tempfile.mktemp(prefix="cn2m-", suffix=".pcap")
    try:
        wrpcap(pcap, [Ether(d) for d in raw])
        out = subprocess.run(["tshark", "-r", pcap, "-T", "fields", "-E", "occurrence=f",
                              "-e", "frame.protocols", *sum((["-e", f] for f in fields), [])],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(pcap)
    return [r.split("\t") for r in out.stdout.splitlines()]


def check_headers(lab, node, fmt: str, copies, raw) -> None:
    """Ids, keys and VNIs as configured, in our reading and in tshark's."""
    an, web = lab.pods["analyzer"], lab.pods["web"]
    enc = FORMATS[fmt]
    for f, inner in copies:
        assert f["dst"] == an.ip
        if fmt == "erspan2":
            assert (f["gre_flags"], f["gre_proto"]) == (0x1000, 0x88BE)
            assert (f["version"], f["session"], f["index"]) == (1, MIRROR_ID & 0x3FF,
                                                                SESSION_ID)
        elif fmt == "erspan3":
            assert (f["gre_flags"], f["gre_proto"]) == (0x1000, 0x22EB)
            assert (f["version"], f["session"], f["gra"]) == (2, MIRROR_ID & 0x3FF, 0)
            into_pod = socket.inet_ntoa(ip_of(inner)[16:20]) == web.ip
            assert f["direction"] == into_pod
        elif fmt == "gre":
            assert (f["gre_flags"], f["gre_proto"], f["key"]) == (0x2000, 0x6558, enc.key)
        elif fmt == "vxlan":
            assert f["dport"] == 4789 and f["vxlan_flags"] == 0x08000000
            assert f["vni"] == enc.vni
        elif fmt == "geneve":
            assert f["dport"] == 6081 and f["proto"] == 0x6558 and f["vni"] == enc.vni
            assert f["opt"] == (L.GENEVE_OPT_CLASS, L.GENEVE_OPT_TYPE, 2)
            assert f["opt_ids"] == (MIRROR_ID, SESSION_ID)
        else:
            assert f["dport"] == CONTRAIL_PORT
            assert socket.inet_ntoa(f["tlvs"][1]) == f["src"]  # capture host: this node
            assert f["tlvs"][2] == b"\x00\x01"
            assert f["tlvs"][3] == f["tlvs"][4] == b"demo-net"
        if "udp_len" in f:
            assert f["udp_len"] == f["ip_len"] - 20
    if fmt == "contrail":
        check_capture_decodes_contrail(raw)
        return
    fields = {"erspan2": ["erspan.spanid", "erspan.index"],
              "erspan3": ["erspan.spanid", "erspan.direction"],
              "gre": ["gre.key"], "vxlan": ["vxlan.vni"],
              "geneve": ["geneve.vni", "geneve.option.class"]}[fmt]
    rows = tshark_rows(raw, fields)
    assert len(rows) == len(raw)
    # Through the inner TCP header; tshark may guess at the random payload after it.
    layers = TSHARK_LAYERS[fmt]
    assert all(r[0] == layers or r[0].startswith(layers + ":") for r in rows), \
        {r[0] for r in rows}
    want = {"erspan2": [str(MIRROR_ID & 0x3FF), str(SESSION_ID)],
            "gre": [str(enc.key)], "vxlan": [str(enc.vni)],
            "geneve": [str(enc.vni), str(L.GENEVE_OPT_CLASS)]}.get(fmt)
    for r in rows:
        if want:
            assert [int(v, 0) for v in r[1:]] == [int(v) for v in want], r
        else:
            assert int(r[1], 0) == MIRROR_ID & 0x3FF and r[2] in ("0", "1", "True", "False")


def check_capture_decodes_contrail(raw: list[bytes]) -> None:
    """tshark has no dissector for Contrail's header: `cn2mirror capture` takes it off
    and writes the frames, which tshark then decodes untold."""
    src = tempfile.mktemp(prefix="cn2m-", suffix=".pcap")
    out = tempfile.mktemp(prefix="cn2m-", suffix=".pcapng")
    try:
        wrpcap(src, [Ether(d) for d in raw])
        r = subprocess.run([CN2MIRROR, "capture", "--read", src, "--port", str(CONTRAIL_PORT),
                            "--encapsulation", "contrail", "--write", out, "-o", "json"],
                           capture_output=True, text=True, check=True)
        summary = json.loads(r.stdout)
        assert summary["packets"] == len(raw)
        assert [s["session_id"] for s in summary["sessions"]] == [
            int.from_bytes(socket.inet_aton(decap(raw[0], "contrail")[0]["src"]), "big")]
        rows = subprocess.run(["tshark", "-r", out, "-T", "fields", "-e", "frame.protocols"],
                              capture_output=True, text=True, check=True).stdout.split()
    finally:
        for p in (src, out):
            if os.path.exists(p):
                os.unlink(p)
    assert len(rows) == len(raw)
    assert all(r == "eth:ethertype:ip:tcp" or r.startswith("eth:ethertype:ip:tcp:")
               for r in rows), set(rows)


def stream_of(copies, dst: str, size: int) -> bytes:
    segs = [t for _, inner in copies if (t := tcp_of(ip_of(inner))) and t[1] == dst]
    isn = next(s[2] for s in segs if s[3] & 0x12 == 0x02)
    stream, got = bytearray(size), bytearray(size)
    for _, _, seq, _, payload, _ in segs:
        off = (seq - isn - 1) % (1 << 32)
        if payload and off < size:
            stream[off:off + len(payload)] = payload
            got[off:off + len(payload)] = b"\x01" * len(payload)
    assert got.count(0) == 0, f"{got.count(0)} bytes of the stream never arrived in a copy"
    return bytes(stream)


def tcp_frames(frames: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [(k, d) for k, d in frames if d[12:14] in (b"\x08\x00",) and tcp_of(ip_of(d))
            and 5201 in struct.unpack_from("!HH", ip_of(d), (ip_of(d)[0] & 0xF) * 4)]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_exact_copies_are_the_wire_frames(lab, node, fmt):
    """Path MTU 9000: super-packets wrapped once with the wire's segment size (exact);
    each copy carries a frame that crossed the pod's interface, or one TSO segment of
    it, byte for byte (checksums aside), with the Ethernet header as it crossed."""
    copies, crossed, raw, data = run_format(lab, node, fmt, 9000, 2 * 1024 * 1024)
    web = lab.pods["web"]
    wire = tcp_frames(crossed)
    assert any(len(d) > 9000 for _, d in wire)  # super-packets crossed the interface
    inner_tcp = [inner for _, inner in copies if tcp_of(ip_of(inner))]
    assert len(inner_tcp) == len(copies)
    mss = max(len(tcp_of(ip_of(c))[4]) for c in inner_tcp)
    expected = sorted((d[:14], s) for _, d in wire
                      for s in (wire_segments(ip_of(d), mss) if len(d) > 1514
                                else [zero_checksums(ip_of(d))]))
    got = sorted((c[:14], zero_checksums(ip_of(c))) for c in inner_tcp)
    assert got == expected
    assert all(tcp_checksum_ok(ip_of(c)) for c in inner_tcp)  # finished on the way
    assert stream_of(copies, web.ip, len(data)) == data
    check_headers(lab, node, fmt, copies, raw)
    c = dest_counters(node, dest_name(fmt, 9000))
    assert c.gso_wrapped > 0 and c.gso_by_segment == 0
    assert c.truncated == 0 and c.fragmented == 0 and sum(c.drops.values()) == 0
    assert c.packets == len(copies)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fit_copies_carry_the_whole_stream_on_a_1500_path(lab, node, fmt):
    """Path MTU 1500: segments made smaller by the format's overhead (fit), each copy
    fits the path, every byte of the stream arrives, and the frames that crossed whole
    (the receiver's ACKs) arrive byte for byte."""
    copies, crossed, raw, data = run_format(lab, node, fmt, 1500, 2 * 1024 * 1024)
    web = lab.pods["web"]
    assert max(len(d) for d in raw) <= 1514
    assert stream_of(copies, web.ip, len(data)) == data
    acks = sorted((d[:14], zero_checksums(ip_of(d))) for k, d in tcp_frames(crossed)
                  if k != socket.PACKET_OUTGOING)  # out of the pod: web's ACKs
    got = sorted((c[:14], zero_checksums(ip_of(c))) for _, c in copies
                 if socket.inet_ntoa(ip_of(c)[12:16]) == web.ip)
    assert acks and got == acks
    check_headers(lab, node, fmt, copies, raw)
    c = dest_counters(node, dest_name(fmt, 1500))
    assert c.gso_wrapped > 0 and c.gso_by_segment == 0
    assert c.truncated == 0 and sum(c.drops.values()) == 0
    assert c.packets == len(copies)
