"""Header templates of the output formats other than jmirror (docs/formats.md).

For a destination in one of these formats the agent writes, in the ``encaps`` map, the
bytes every copy gets in front of the mirrored Ethernet frame: outer IPv4, then UDP or
GRE, then the format's own header. The wrapper (bpf/lib/encap_formats.h) copies the
template and completes it per copy: IPv4 total length and checksum, UDP length, and the
per-copy fields at the offsets agent/layout.py names (ERSPAN session id, index,
direction and timestamp; GENEVE option data; VXLAN VNI from the mirror id).
"""

from __future__ import annotations

import ipaddress
import struct

from . import layout as L
from .state import (
    FORMAT_CONTRAIL,
    FORMAT_ERSPAN2,
    FORMAT_ERSPAN3,
    FORMAT_GENEVE,
    FORMAT_GRE,
    FORMAT_JMIRROR,
    FORMAT_VXLAN,
    GENEVE_PORT,
    VXLAN_STANDARD_PORT,
    Encapsulation,
)

FORMAT_CODES = {FORMAT_ERSPAN2: L.EncapFormat.ERSPAN2, FORMAT_ERSPAN3: L.EncapFormat.ERSPAN3,
                FORMAT_GRE: L.EncapFormat.GRE, FORMAT_GENEVE: L.EncapFormat.GENEVE,
                FORMAT_VXLAN: L.EncapFormat.VXLAN, FORMAT_CONTRAIL: L.EncapFormat.CONTRAIL}
GRE_FORMATS = (FORMAT_ERSPAN2, FORMAT_ERSPAN3, FORMAT_GRE)
INNER_ETH = 14  # every format here carries the Ethernet frame
IPPROTO_UDP, IPPROTO_GRE = 17, 47
GRE_SEQ, GRE_KEY = 0x1000, 0x2000
# ERSPAN type III, word 3: granularity 00 = timestamps in 100-microsecond units (as
# Linux's own ERSPAN sends them); the wrapper sets D (bit 3) for copies going into the pod.
ERSPAN3_DIRECTION_BIT = 1 << 3
# Contrail header TLV types (reference/cn2-mirroring.md).
TLV_CAPTURE_HOST, TLV_ACTION, TLV_SOURCE_NETWORK, TLV_DEST_NETWORK, TLV_END = 1, 2, 3, 4, 255
CONTRAIL_ACTION_PASS = 1  # the flow's action (cn2mirror mirrors flows it lets pass)


def udp_port_of(enc: Encapsulation, udp_port: int) -> int:
    """The destination UDP port of a format's copies (0: not UDP)."""
    if enc.format == FORMAT_GENEVE:
        return GENEVE_PORT
    if enc.format == FORMAT_VXLAN:
        return VXLAN_STANDARD_PORT
    return 0 if enc.format in GRE_FORMATS else udp_port


def contrail_tlvs(capture_host: str, network: str) -> bytes:
    """vRouter's TLV list: capture host, action, source and destination network, end."""
    net = network.encode()
    return (bytes([TLV_CAPTURE_HOST, 4]) + ipaddress.IPv4Address(capture_host).packed
            + bytes([TLV_ACTION, 2]) + struct.pack("!H", CONTRAIL_ACTION_PASS)
            + bytes([TLV_SOURCE_NETWORK, len(net)]) + net
            + bytes([TLV_DEST_NETWORK, len(net)]) + net
            + bytes([TLV_END, 0]))


def template(enc: Encapsulation, src: str, dst: str, udp_port: int) -> L.EncapEntry:
    """The encaps map entry of a destination: outer IPv4 (lengths and checksum left 0),
    then UDP or GRE and the format's header with the per-copy fields left 0."""
    if enc.format == FORMAT_JMIRROR:
        raise ValueError("jmirror destinations have no template")
    gre = enc.format in GRE_FORMATS
    if enc.format == FORMAT_ERSPAN2:
        # GRE with a sequence number (Wireshark: ERSPAN type II); version 1, session id
        # (rule) and index (interface) per copy.
        rest = struct.pack("!HHI", GRE_SEQ, L.ETH_P_ERSPAN2, 0) + struct.pack("!II", 1 << 28, 0)
    elif enc.format == FORMAT_ERSPAN3:
        # Version 2; session id, timestamp and direction per copy.
        rest = struct.pack("!HHI", GRE_SEQ, L.ETH_P_ERSPAN3, 0) + struct.pack("!III", 2 << 28,
                                                                             0, 0)
    elif enc.format == FORMAT_GRE:
        if enc.key is None:
            rest = struct.pack("!HH", 0, L.ETH_P_TEB)
        else:
            rest = struct.pack("!HHI", GRE_KEY, L.ETH_P_TEB, enc.key)
    else:
        port = udp_port_of(enc, udp_port)
        udp = struct.pack("!HHHH", port, port, 0, 0)  # length per copy; checksum 0 (IPv4)
        if enc.format == FORMAT_VXLAN:
            header = struct.pack("!II", 0x08000000, (enc.vni or 0) << 8)
        elif enc.format == FORMAT_GENEVE:
            option = struct.pack("!HBB", L.GENEVE_OPT_CLASS, L.GENEVE_OPT_TYPE, 2) + bytes(8)
            header = struct.pack("!BBHI", len(option) // 4, 0, L.ETH_P_TEB,
                                 (enc.vni or 0) << 8) + option
        else:  # contrail
            header = contrail_tlvs(src, enc.network or "")
        rest = udp + header
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 255,
                     IPPROTO_GRE if gre else IPPROTO_UDP, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    tmpl = ip + rest
    if len(tmpl) > L.ENCAP_TMPL_MAX:
        raise ValueError(f"{enc.format} header of {len(tmpl)} bytes; at most "
                         f"{L.ENCAP_TMPL_MAX}")
    e = L.EncapEntry()
    e.format = int(FORMAT_CODES[enc.format])
    e.flags = (L.ENCAP_GRE if gre else 0) | (
        L.ENCAP_VNI_FROM_MID if enc.format == FORMAT_VXLAN and enc.vni is None else 0)
    e.hdr_len = len(tmpl)
    e.tmpl[:len(tmpl)] = list(tmpl)
    return e


def overhead(entry: L.EncapEntry) -> int:
    """Bytes a copy grows by in front of its IP packet: template and inner Ethernet."""
    return entry.hdr_len + INNER_ETH


def decode_contrail(datagram: bytes) -> tuple[int, int, bytes]:
    """A Contrail-header datagram (UDP payload) as (0, capture host as a number, the
    Ethernet frame), for `cn2mirror capture --encapsulation contrail`: the copies of one
    node are one session. Raises jmirror.NotJMirror (too_short, not_ip) otherwise."""
    from . import jmirror

    off, host = 0, 0
    while True:
        if off + 2 > len(datagram):
            raise jmirror.NotJMirror(jmirror.TOO_SHORT, "the TLV list has no end")
        kind, length = datagram[off], datagram[off + 1]
        value = datagram[off + 2:off + 2 + length]
        if len(value) < length:
            raise jmirror.NotJMirror(jmirror.TOO_SHORT, f"TLV {kind} cut short")
        if kind == TLV_CAPTURE_HOST and length == 4:
            host = int.from_bytes(value, "big")
        off += 2 + length
        if kind == TLV_END:
            break
    frame = datagram[off:]
    if len(frame) < 14 or frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
        raise jmirror.NotJMirror(jmirror.NOT_IP, "no Ethernet frame of IP after the TLVs")
    return 0, host, frame
