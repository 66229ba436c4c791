"""The jmirror wire format: round trips, rejections, and agreement with Wireshark's dissector."""

import shutil
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from cn2mirror.agent import jmirror
from cn2mirror.agent.jmirror import JMirror, NotJMirror, decode, encode
from cn2mirror.agent.state import DEFAULT_JMIRROR_PORT, MIRROR_ID_MAX, SESSION_ID_MAX

mirror_ids = st.integers(0, MIRROR_ID_MAX)
session_ids = st.integers(0, SESSION_ID_MAX)


@st.composite
def ip_packets(draw):
    """Bytes that start with a complete IPv4 (any header length) or IPv6 header."""
    if draw(st.booleans()):
        ihl = draw(st.integers(5, 15))
        first = bytes([0x40 | ihl])
        return first + draw(st.binary(min_size=ihl * 4 - 1, max_size=ihl * 4 + 200))
    first = bytes([0x60 | draw(st.integers(0, 15))])
    return first + draw(st.binary(min_size=39, max_size=300))


@given(mirror_ids, session_ids, ip_packets())
def test_round_trip(mid, sid, inner):
    datagram = encode(mid, sid, inner)
    assert len(datagram) == jmirror.HEADER_LEN + len(inner)
    assert decode(datagram) == (0, mid, sid, inner)
    decoded = decode(datagram)
    assert (decoded.version, decoded.mirror_id, decoded.session_id, decoded.inner) == (
        0, mid, sid, inner)


@given(st.binary(max_size=80))
def test_decode_is_the_exact_inverse_or_rejects(datagram):
    try:
        version, mid, sid, inner = decode(datagram)
    except NotJMirror as e:
        assert e.reason in jmirror.REASONS
    else:
        assert version == 0
        assert encode(mid, sid, inner) == datagram


def test_header_layout_is_big_endian_with_version_in_the_top_bits():
    inner = bytes(IP(src="127.0.0.1", dst="127.0.0.1") / ICMP())
    assert encode(0x123, 0xDEADBEEF, inner)[:8] == bytes.fromhex("00000123deadbeef")
    assert encode(MIRROR_ID_MAX, 0, inner)[:8] == bytes.fromhex("3fffffff00000000")
    assert encode(0, SESSION_ID_MAX, inner)[:8] == bytes.fromhex("00000000ffffffff")
    assert encode(1, 2, inner)[8:] == inner


@pytest.mark.parametrize("mid, sid", [(-1, 0), (MIRROR_ID_MAX + 1, 0), (0, -1),
                                      (0, SESSION_ID_MAX + 1)])
def test_encode_rejects_ids_out_of_range(mid, sid):
    with pytest.raises(ValueError, match="outside"):
        encode(mid, sid, bytes(IP()))


IPV4 = bytes(IP(src="127.0.0.1", dst="127.0.0.1") / ICMP())


@pytest.mark.parametrize("datagram, reason", [
    pytest.param(b"", jmirror.TOO_SHORT, id="empty"),
    pytest.param(b"\x00" * 7, jmirror.TOO_SHORT, id="7-bytes"),
    pytest.param(struct.pack("!II", 1 << 30 | 5, 6) + IPV4, jmirror.BAD_VERSION, id="version-1"),
    pytest.param(struct.pack("!II", 2 << 30, 0) + IPV4, jmirror.BAD_VERSION, id="version-2"),
    pytest.param(struct.pack("!II", 3 << 30 | MIRROR_ID_MAX, 0) + IPV4, jmirror.BAD_VERSION,
                 id="version-3"),
    pytest.param(encode(1, 2, b""), jmirror.NOT_IP, id="header-only"),
    pytest.param(encode(1, 2, b"\x00" * 40), jmirror.NOT_IP, id="zeros"),
    pytest.param(encode(1, 2, b"\x44" + bytes(40)), jmirror.NOT_IP, id="ipv4-ihl-4"),
    pytest.param(encode(1, 2, b"\x4f" + bytes(40)), jmirror.NOT_IP, id="ipv4-ihl-beyond-end"),
    pytest.param(encode(1, 2, IPV4[:19]), jmirror.NOT_IP, id="ipv4-cut"),
    pytest.param(encode(1, 2, bytes(IPv6())[:39]), jmirror.NOT_IP, id="ipv6-cut"),
    pytest.param(encode(1, 2, b"\xff\x03\x00\x21" + IPV4), jmirror.NOT_IP, id="ppp-in-hdlc"),
    pytest.param(encode(1, 2, b"\x55" + bytes(40)), jmirror.NOT_IP, id="version-5"),
])
def test_rejects_datagrams_that_are_not_jmirror(datagram, reason):
    with pytest.raises(NotJMirror) as raised:
        decode(datagram)
    assert raised.value.reason == reason
    assert isinstance(raised.value, ValueError)


@given(st.integers(1, 3), st.integers(0, MIRROR_ID_MAX), session_ids)
def test_any_nonzero_version_is_rejected(version, mid, sid):
    with pytest.raises(NotJMirror) as raised:
        decode(struct.pack("!II", version << 30 | mid, sid) + IPV4)
    assert raised.value.reason == jmirror.BAD_VERSION


def test_strict_takes_only_what_wireshark_decodes():
    with_options = bytes(IP(options=[IPOption_Router_Alert()]) / ICMP())
    assert with_options[0] == 0x46
    assert decode(encode(1, 2, with_options)).inner == with_options
    with pytest.raises(NotJMirror) as raised:
        decode(encode(1, 2, with_options), strict=True)
    assert raised.value.reason == jmirror.NOT_IP
    labelled = bytes(IPv6(fl=0xABCDE, tc=0x12) / TCP())
    assert decode(encode(1, 2, labelled), strict=True).inner == labelled


def test_scapy_layer_builds_what_encode_builds():
    inner = IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=1, dport=2) / Raw(b"hello")
    assert bytes(JMirror(mid=77, sid=0xFFFFFFFE) / inner) == encode(77, 0xFFFFFFFE, bytes(inner))
    frame = Ether() / IP() / UDP() / JMirror(mid=1, sid=2) / inner
    assert (frame[UDP].sport, frame[UDP].dport) == (DEFAULT_JMIRROR_PORT, DEFAULT_JMIRROR_PORT)


@pytest.mark.parametrize("inner_layer", [IP, IPv6])
def test_scapy_layer_dissects(inner_layer):
    for ports in ({"sport": 1234, "dport": DEFAULT_JMIRROR_PORT},
                  {"sport": DEFAULT_JMIRROR_PORT, "dport": 1234}):
        inner = inner_layer() / ICMP() if inner_layer is IP else inner_layer() / ICMPv6EchoRequest()
        datagram = encode(MIRROR_ID_MAX, SESSION_ID_MAX, bytes(inner))
        frame = Ether(bytes(Ether() / IP() / UDP(**ports) / Raw(datagram)))
        layer = frame[JMirror]
        assert (layer.version, layer.mid, layer.sid) == (0, MIRROR_ID_MAX, SESSION_ID_MAX)
        assert isinstance(layer.payload, inner_layer)
        assert bytes(layer.payload) == bytes(inner)


# ---------------------------------------------------------------------------- tshark

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")


def tshark_lines(path, *fields):
    args = ["tshark", "-r", str(path), "-T", "fields", "-E", "occurrence=a",
            "-E", "aggregator=,"]
    for field in fields:
        args += ["-e", field]
    done = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60)
    return [line.split("\t") for line in done.stdout.splitlines()]


@needs_tshark
def test_tshark_decodes_the_same_ids_and_inner_packets(tmp_path):
    cases = [  # (mid, sid, inner packet, inner source address)
        (0, 0, IP(src="127.0.0.2", dst="127.0.0.1") / ICMP(), "127.0.0.2"),
        (123, 456, IP(src="127.0.0.3", dst="127.0.0.1") / TCP(), "127.0.0.3"),
        (MIRROR_ID_MAX, SESSION_ID_MAX, IP(src="127.0.0.4", dst="127.0.0.1") / UDP(), "127.0.0.4"),
        (0x2AAAAAAA, 0x55555555, IPv6(src="::1", dst="::1") / ICMPv6EchoRequest(), "::1"),
        (0x01020304, 0x05060708, IPv6(src="::1", dst="::1", fl=0x12345) / TCP(), "::1"),
    ]
    frames, expected = [], []
    for mid, sid, inner, src in cases:
        for outer in (IP(src="127.0.0.1", dst="127.0.0.1"), IPv6(src="::1", dst="::1")):
            frames.append(Ether() / outer / UDP(chksum=0) / JMirror(mid=mid, sid=sid) / inner)
            expected.append((mid, sid, src))
    wrpcap(str(tmp_path / "j.pcap"), frames)

    lines = tshark_lines(tmp_path / "j.pcap", "jmirror.mid", "jmirror.sid", "ip.src", "ipv6.src")
    assert len(lines) == len(frames)
    for frame, want, (mid_text, sid_text, ip_src, ipv6_src) in zip(frames, expected, lines,
                                                                    strict=True):
        mid, sid, src = want
        # The inner packet is the last layer of its family in tshark's list (-E occurrence=a).
        inner_ipv4 = ":" not in src
        tshark_inner_src = (ip_src if inner_ipv4 else ipv6_src).split(",")[-1]
        assert (int(mid_text, 0), int(sid_text, 0), tshark_inner_src) == want
        # Our decoder reads the UDP payload of the same frame the same way.
        _, our_mid, our_sid, inner = decode(bytes(frame[UDP].payload))
        our_src = IP(inner).src if inner_ipv4 else IPv6(inner).src
        assert (our_mid, our_sid, our_src) == want


@needs_tshark
def test_strict_agrees_with_the_dissector_on_which_payloads_it_decodes(tmp_path):
    payloads = [
        bytes(IP() / ICMP()),
        bytes(IP(options=[IPOption_Router_Alert()]) / ICMP()),
        bytes(IPv6() / TCP()),
        bytes(IPv6(tc=0xFF, fl=0xFFFFF) / TCP()),
        bytes(IPv6(fl=1) / UDP()),
        b"\x4f" + bytes(63),
        b"\x00" * 40,
        b"\x55" + bytes(60),
        b"\x7f" + bytes(60),
    ]
    datagrams = [encode(i + 1, 7, p) for i, p in enumerate(payloads)]
    frames = [Ether() / IP(src="127.0.0.1", dst="127.0.0.1")
              / UDP(sport=DEFAULT_JMIRROR_PORT, dport=DEFAULT_JMIRROR_PORT) / Raw(d)
              for d in datagrams]
    wrpcap(str(tmp_path / "s.pcap"), frames)
    tshark_says = [bool(mid) for (mid,) in tshark_lines(tmp_path / "s.pcap", "jmirror.mid")]

    def strict_ok(datagram):
        try:
            decode(datagram, strict=True)
        except NotJMirror:
            return False
        return True

    assert [strict_ok(d) for d in datagrams] == tshark_says
    assert tshark_says == [True, False, True, True, True, False, False, False, False]
