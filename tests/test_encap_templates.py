"""The header templates of the output formats (agent/encap.py), read back by scapy's own
dissectors: the fields the agent fixes per destination are where the formats say."""

from __future__ import annotations

import struct

import pytest
from scapy.contrib.erspan import ERSPAN_II, ERSPAN_III
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import GRE, IP, UDP
from scapy.layers.vxlan import VXLAN

from cn2mirror.agent import encap
from cn2mirror.agent import layout as L
from cn2mirror.agent.state import Encapsulation

SRC, DST = "198.18.0.1", "198.18.1.10"


def completed(e: L.EncapEntry) -> bytes:
    """The template with the lengths the wrapper fills in (an empty inner frame)."""
    raw = bytearray(e.tmpl[:e.hdr_len])
    assert raw[2:4] == b"\0\0" and raw[10:12] == b"\0\0"  # left to the wrapper
    raw[2:4] = struct.pack("!H", e.hdr_len)
    if raw[9] == 17:
        assert raw[24:26] == b"\0\0"
        raw[24:26] = struct.pack("!H", e.hdr_len - 20)
    return bytes(raw)


def header(enc: Encapsulation, port: int = 30030) -> bytes:
    return completed(encap.template(enc, SRC, DST, port))


def test_erspan2():
    ip = IP(header(Encapsulation("erspan2")))
    assert (ip.src, ip.dst, ip.proto, ip.flags.DF, ip.ttl) == (SRC, DST, 47, True, 255)
    assert ip[GRE].proto == 0x88BE and ip[GRE].seqnum_present == 1
    assert ip.haslayer(ERSPAN_II) and ip[ERSPAN_II].ver == 1
    assert len(bytes(ip)) == L.ERSPAN_HDR_OFF + 8


def test_erspan3():
    ip = IP(header(Encapsulation("erspan3")))
    assert ip[GRE].proto == 0x22EB and ip.haslayer(ERSPAN_III) and ip[ERSPAN_III].ver == 2
    assert ip[ERSPAN_III].gra == 0  # 100-microsecond timestamps
    assert len(bytes(ip)) == L.ERSPAN_HDR_OFF + 12


@pytest.mark.parametrize("key", [None, 77])
def test_gre(key):
    ip = IP(header(Encapsulation("gre", key=key)))
    assert ip[GRE].proto == 0x6558 and ip[GRE].key_present == (key is not None)
    if key is not None:
        assert ip[GRE].key == key


def test_vxlan():
    e = encap.template(Encapsulation("vxlan", vni=4242), SRC, DST, 30030)
    ip = IP(completed(e))
    assert (ip[UDP].sport, ip[UDP].dport, ip[UDP].chksum) == (4789, 4789, 0)
    assert ip[VXLAN].vni == 4242 and ip[VXLAN].flags == 0x08
    assert not e.flags & L.ENCAP_VNI_FROM_MID
    assert encap.template(Encapsulation("vxlan"), SRC, DST, 1).flags & L.ENCAP_VNI_FROM_MID
    assert struct.unpack_from("!I", bytes(e.tmpl), L.VXLAN_VNI_OFF)[0] == 4242 << 8


def test_geneve():
    ip = IP(header(Encapsulation("geneve", vni=7)))
    g = ip[GENEVE]
    assert ip[UDP].dport == 6081 and g.vni == 7 and g.proto == 0x6558 and g.optionlen == 3
    opt = bytes(g)[8:20]
    assert struct.unpack("!HBB", opt[:4]) == (L.GENEVE_OPT_CLASS, L.GENEVE_OPT_TYPE, 2)
    assert len(bytes(ip)) == L.GENEVE_OPT_DATA_OFF + 8


def test_contrail():
    raw = header(Encapsulation("contrail", network="red"), port=8099)
    ip = IP(raw)
    assert ip[UDP].dport == ip[UDP].sport == 8099
    tlvs = raw[28:]
    assert tlvs == bytes([1, 4, 198, 18, 0, 1, 2, 2, 0, 1, 3, 3]) + b"red" + bytes([4, 3]) + \
        b"red" + bytes([255, 0])
    assert encap.decode_contrail(tlvs + bytes(12) + b"\x08\x00" + bytes(20))[1] == \
        int.from_bytes(bytes([198, 18, 0, 1]), "big")


def test_longest_contrail_header_fits_the_template():
    e = encap.template(Encapsulation("contrail", network="n" * 40), SRC, DST, 8099)
    assert e.hdr_len <= L.ENCAP_TMPL_MAX


def test_udp_ports():
    assert encap.udp_port_of(Encapsulation("gre"), 30030) == 0
    assert encap.udp_port_of(Encapsulation("contrail"), 8099) == 8099
