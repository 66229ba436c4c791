"""The jmirror wire format (Juniper packet mirror), the one Python definition of it.

A jmirror datagram is the UDP payload the analyzer receives (reference/jmirror.md)::

    word 1   2 bits header version (0) | 30 bits mirror id
    word 2   32 bits session id
    payload  the mirrored packet from its IP header on

Everything is big-endian. ``encode``/``decode`` work on that UDP payload; ``JMirror`` is
the same header as a scapy layer, for building and dissecting test packets.

Which payloads count as IP: ``decode`` accepts any complete IPv4 or IPv6 header.
Wireshark's dissector (Debian 12's tshark 4.0, checked by tests/test_jmirror.py) takes
IPv4 only with a 20-byte header (first byte 0x45) and shows other payloads as data;
``decode(..., strict=True)`` applies that rule too, for checks that copies will decode
there. The analyzer keeps IPv4 with options (IGMP's router alert, for one) by default.
reference/jmirror.md also describes a zero-flow-label test for IPv6; that comes from an
older dissector and tshark 4.0 does not apply it, so neither mode does (Linux labels most
IPv6 flows, net.ipv6.auto_flowlabels).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from scapy.fields import BitField, IntField
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw, bind_bottom_up, bind_top_down

from cn2mirror.agent.state import DEFAULT_JMIRROR_PORT, MIRROR_ID_MAX, SESSION_ID_MAX

VERSION = 0
HEADER = struct.Struct("!II")
HEADER_LEN = HEADER.size  # 8

# Why a datagram is not jmirror (NotJMirror.reason); also the keys of capture's counters.
TOO_SHORT = "too_short"  # shorter than the 8-byte header
BAD_VERSION = "bad_version"  # header version is not 0
NOT_IP = "not_ip"  # the payload is not an IPv4 or IPv6 packet
REASONS = (TOO_SHORT, BAD_VERSION, NOT_IP)


class NotJMirror(ValueError):
    """A datagram that is not jmirror; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"not jmirror ({reason}): {detail}")
        self.reason = reason


class Decoded(NamedTuple):
    version: int
    mirror_id: int
    session_id: int
    inner: bytes


def encode(mirror_id: int, session_id: int, inner: bytes) -> bytes:
    """The jmirror datagram (UDP payload) carrying ``inner``, an IP packet."""
    if not 0 <= mirror_id <= MIRROR_ID_MAX:
        raise ValueError(f"mirror id {mirror_id} outside 0..{MIRROR_ID_MAX}")
    if not 0 <= session_id <= SESSION_ID_MAX:
        raise ValueError(f"session id {session_id} outside 0..{SESSION_ID_MAX}")
    return HEADER.pack(VERSION << 30 | mirror_id, session_id) + bytes(inner)


def ip_version(packet: bytes, *, strict: bool = False) -> int | None:
    """4 or 6 if ``packet`` starts with a complete IPv4/IPv6 header, else None.

    ``strict``: only what Wireshark's jmirror dissector decodes too (see module doc).
    """
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        ihl = packet[0] & 0x0F
        if ihl >= 5 and len(packet) >= ihl * 4 and (not strict or ihl == 5):
            return 4
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return 6
    return None


def decode(datagram: bytes, *, strict: bool = False) -> Decoded:
    """Split a jmirror datagram into its header fields and the inner packet.

    Raises NotJMirror (with the reason) for anything else.
    """
    if len(datagram) < HEADER_LEN:
        raise NotJMirror(TOO_SHORT, f"{len(datagram)} bytes, the header alone is {HEADER_LEN}")
    word1, session_id = HEADER.unpack_from(datagram)
    version = word1 >> 30
    if version != VERSION:
        raise NotJMirror(BAD_VERSION, f"header version {version}")
    inner = bytes(datagram[HEADER_LEN:])
    if ip_version(inner, strict=strict) is None:
        raise NotJMirror(NOT_IP, f"payload starts {inner[:4].hex() or 'empty'}")
    return Decoded(version, word1 & MIRROR_ID_MAX, session_id, inner)


class JMirror(Packet):
    """The jmirror header as a scapy layer: ``UDP()/JMirror(mid=1, sid=2)/IP()/...``."""

    name = "Juniper Packet Mirror"
    fields_desc = [
        BitField("version", VERSION, 2),
        BitField("mid", 0, 30),
        IntField("sid", 0),
    ]

    def guess_payload_class(self, payload: bytes):
        version = payload[0] >> 4 if payload else None
        return {4: IP, 6: IPv6}.get(version, Raw)

    def mysummary(self):
        return self.sprintf("JMirror mid=%JMirror.mid% sid=%JMirror.sid%")


# Dissect UDP to or from the port as jmirror; build UDP()/JMirror() with both ports set,
# as senders do (reference/jmirror.md: source port = destination port).
bind_bottom_up(UDP, JMirror, dport=DEFAULT_JMIRROR_PORT)
bind_bottom_up(UDP, JMirror, sport=DEFAULT_JMIRROR_PORT)
bind_top_down(UDP, JMirror, sport=DEFAULT_JMIRROR_PORT, dport=DEFAULT_JMIRROR_PORT)
