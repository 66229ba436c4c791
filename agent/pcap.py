"""jmirror at the analyzer, as a library: decode datagrams and count them per (mirror id,
session id) (:class:`Capture`), write pcap/pcapng, read jmirror out of pcap/pcapng
files, and listen on a UDP socket with the kernel's receive times.

``cn2mirror capture`` (cli/capture.py) is its command line; the demo's analyzers
(cli/lab_cmd.py) use it directly, following each packet with ``on_packet``.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

import yaml

from . import jmirror
from .state import DEFAULT_JMIRROR_PORT

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
_RAW_IP_LINKTYPES = (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6, 12, 14)  # 12, 14: old DLT_RAW
_ETHERTYPES_IP = (b"\x08\x00", b"\x86\xdd")
_VLAN_TPIDS = (b"\x81\x00", b"\x88\xa8", b"\x91\x00")
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
# Linux socket options Python does not export: kernel receive times, and drop counts.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY_SPACE = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(4)


class CaptureError(Exception):
    """A problem the user must fix (port in use, unreadable file): reported, exit 1."""


# ---------------------------------------------------------------------------- writers


def _options(*options: tuple[int, bytes]) -> bytes:
    """pcapng options, each padded to 4 bytes, then opt_endofopt."""
    out = b""
    for code, value in options:
        out += struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)
    return out + b"\0\0\0\0"


class PcapngWriter:
    """pcapng, little-endian: a section header, one raw-IP interface per add_interface
    (nanosecond timestamps), then enhanced packet blocks."""

    def __init__(self, f: BinaryIO, flush_each: bool = False):
        self.f, self.flush_each, self.interfaces = f, flush_each, 0
        # byte-order magic, version 1.0, section length unknown (-1), shb_userappl
        self._block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
                    + _options((4, b"cn2mirror capture")))

    def _block(self, kind: int, body: bytes) -> None:
        size = 12 + len(body)
        # One write per block: a stop between writes never leaves half a block behind.
        self.f.write(struct.pack("<II", kind, size) + body + struct.pack("<I", size))

    def add_interface(self, name: str, description: str) -> int:
        # if_name (2), if_description (3), if_tsresol (9) = 10^-9
        options = _options((2, name.encode()), (3, description.encode()), (9, b"\x09"))
        self._block(1, struct.pack("<HHI", LINKTYPE_RAW, 0, 0) + options)
        self.interfaces += 1
        return self.interfaces - 1

    def write(self, interface: int, ts_ns: int, data: bytes, length: int) -> None:
        head = struct.pack("<5I", interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), length)
        self._block(6, head + data + b"\0" * (-len(data) % 4))
        if self.flush_each:
            self.f.flush()

    def flush(self) -> None:
        self.f.flush()


class PcapWriter:
    """Classic pcap with nanosecond timestamps: one link type, so no per-pair interfaces."""

    def __init__(self, f: BinaryIO, flush_each: bool = False):
        self.f, self.flush_each = f, flush_each
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, LINKTYPE_RAW))

    def add_interface(self, name: str, description: str) -> int:
        return 0

    def write(self, interface: int, ts_ns: int, data: bytes, length: int) -> None:
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        self.f.write(struct.pack("<IIII", sec, nsec, len(data), length) + data)
        if self.flush_each:
            self.f.flush()

    def flush(self) -> None:
        self.f.flush()


# ---------------------------------------------------------------------------- the counts


@dataclass
class Session:
    """What arrived for one (mirror id, session id) pair."""

    mirror_id: int
    session_id: int
    mirror_name: str | None
    session_name: str | None
    interface: int  # index of its interface in the output file
    packets: int = 0
    bytes: int = 0
    first_seen_ns: int = 0
    last_seen_ns: int = 0

    @property
    def name(self) -> str:
        return f"mid={self.mirror_id} sid={self.session_id}"

    @property
    def description(self) -> str:
        mirror, sess = f"mirror {self.mirror_id}", f"session {self.session_id}"
        mirror += f" ({self.mirror_name})" if self.mirror_name else ""
        sess += f" ({self.session_name})" if self.session_name else ""
        return f"jmirror {mirror}, {sess}"

    def as_dict(self) -> dict:
        return {
            "mirror_id": self.mirror_id,
            "session_id": self.session_id,
            "mirror_name": self.mirror_name,
            "session_name": self.session_name,
            "interface": self.name,
            "packets": self.packets,
            "bytes": self.bytes,
            "first_seen": round(self.first_seen_ns / 1e9, 6),
            "last_seen": round(self.last_seen_ns / 1e9, 6),
        }


class Names(NamedTuple):
    mirror: dict[int, str]
    session: dict[int, str]


class Capture:
    """Decodes datagrams, keeps the per-pair counts and writes the inner packets."""

    def __init__(self, writer=None, names: Names | None = None, mirror_ids=(), session_ids=(),
                 count: int | None = None,
                 on_packet: Callable[[Session, bytes], None] | None = None):
        """``on_packet(session, inner)`` is called for every packet kept, with the
        mirrored packet (its IP header on), after it was counted and written."""
        self.writer = writer
        self.on_packet = on_packet
        self.names = names or Names({}, {})
        self.mirror_ids, self.session_ids = set(mirror_ids), set(session_ids)
        self.count = count
        self.sessions: dict[tuple[int, int], Session] = {}
        self.packets = self.bytes = self.filtered = 0
        self.dropped = 0  # listening: datagrams the kernel dropped, the socket buffer full
        self.not_jmirror = dict.fromkeys(jmirror.REASONS, 0)

    @property
    def done(self) -> bool:
        return self.count is not None and self.packets >= self.count

    def feed(self, datagram: bytes, ts_ns: int, length: int | None = None) -> Session | None:
        """Take one UDP payload; ``length`` is its size on the wire when it was cut short.

        Returns the session it went to, or None if it was not jmirror or filtered out.
        """
        try:
            _, mid, sid, inner = jmirror.decode(datagram)
        except jmirror.NotJMirror as e:
            self.not_jmirror[e.reason] += 1
            return None
        if (self.mirror_ids and mid not in self.mirror_ids) or (
            self.session_ids and sid not in self.session_ids
        ):
            self.filtered += 1
            return None
        session = self.sessions.get((mid, sid)) or self._new_session(mid, sid, ts_ns)
        size = max(len(inner), (length or 0) - jmirror.HEADER_LEN)
        session.packets += 1
        session.bytes += size
        session.last_seen_ns = ts_ns
        self.packets += 1
        self.bytes += size
        if self.writer:
            self.writer.write(session.interface, ts_ns, inner, size)
        if self.on_packet is not None:
            self.on_packet(session, inner)
        return session

    def _new_session(self, mid: int, sid: int, ts_ns: int) -> Session:
        session = Session(mid, sid, self.names.mirror.get(mid), self.names.session.get(sid),
                          interface=len(self.sessions), first_seen_ns=ts_ns)
        if self.writer:
            session.interface = self.writer.add_interface(session.name, session.description)
        self.sessions[(mid, sid)] = session
        return session

    def sorted_sessions(self) -> list[Session]:
        return [self.sessions[k] for k in sorted(self.sessions)]


def load_names(path: str) -> Names:
    """The --names file: {"mirror": {id: name}, "session": {id: name}}, JSON or YAML."""
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}  # YAML is a superset of JSON
    if not isinstance(doc, dict) or set(doc) - {"mirror", "session"}:
        raise ValueError('expected a mapping with keys "mirror" and/or "session"')
    maps = []
    for kind in ("mirror", "session"):
        entries = doc.get(kind) or {}
        if not isinstance(entries, dict):
            raise ValueError(f'"{kind}" must map ids to names')
        try:
            maps.append({int(k): str(v) for k, v in entries.items()})
        except ValueError:
            raise ValueError(f'"{kind}" keys must be integer ids') from None
    return Names(*maps)


# ---------------------------------------------------------------------------- file input


class Frame(NamedTuple):
    linktype: int
    ts_ns: int
    data: bytes
    length: int  # on the wire; more than len(data) if the capture cut it


class TruncatedFile(CaptureError):
    pass


def read_frames(f: BinaryIO) -> Iterator[Frame]:
    """The frames of a pcap or pcapng file. Raises CaptureError at once if it is neither;
    the iterator raises TruncatedFile if the file ends inside a record."""
    magic = f.read(4)
    if magic == _PCAPNG_SHB:
        return _pcapng_frames(f)
    for endian in "<>":
        if len(magic) == 4:
            value = struct.unpack(endian + "I", magic)[0]
            if value in (0xA1B2C3D4, 0xA1B23C4D):
                return _pcap_frames(f, endian, nano=value == 0xA1B23C4D)
    raise CaptureError("not a pcap or pcapng file")


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise TruncatedFile("the file ends inside a record")
    return data


def _pcap_frames(f: BinaryIO, endian: str, nano: bool) -> Iterator[Frame]:
    linktype = struct.unpack(endian + "HHiIII", _read(f, 20))[5] & 0xFFFF
    while head := f.read(16):
        sec, frac, caplen, length = struct.unpack(endian + "IIII", head + _read(f, 16 - len(head)))
        ts_ns = sec * 1_000_000_000 + frac * (1 if nano else 1000)
        yield Frame(linktype, ts_ns, _read(f, caplen), length)


def _pcapng_frames(f: BinaryIO) -> Iterator[Frame]:
    endian = "<"
    interfaces: list[tuple[int, int]] = []  # (link type, timestamp units per second)
    kind = _PCAPNG_SHB
    while kind:
        if len(kind) < 4:
            raise TruncatedFile("the file ends inside a block")
        size_raw = _read(f, 4)
        body = b""
        if kind == _PCAPNG_SHB:  # a new section; its byte-order mark sets the endianness
            body = _read(f, 4)
            endian = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}.get(body, "")
            if not endian:
                raise CaptureError("corrupt pcapng section header")
            interfaces = []
        size = struct.unpack(endian + "I", size_raw)[0]
        if size < 12 + len(body) or size % 4:
            raise CaptureError(f"corrupt pcapng block (length {size})")
        body += _read(f, size - 12 - len(body))
        _read(f, 4)  # trailing copy of the length
        block = struct.unpack(endian + "I", kind)[0]
        if block == 1:  # interface description
            linktype = struct.unpack(endian + "H", body[:2])[0]
            tsresol = _pcapng_option(body[8:], 9, endian) or b"\x06"
            units = 2 ** (tsresol[0] & 0x7F) if tsresol[0] & 0x80 else 10 ** tsresol[0]
            interfaces.append((linktype, units))
        elif block == 6:  # enhanced packet
            ifid, high, low, caplen, length = struct.unpack(endian + "5I", body[:20])
            if ifid >= len(interfaces):
                raise CaptureError(f"pcapng packet on undeclared interface {ifid}")
            linktype, units = interfaces[ifid]
            ts_ns = ((high << 32) | low) * 1_000_000_000 // units
            yield Frame(linktype, ts_ns, body[20:20 + caplen], length)
        kind = f.read(4)


def _pcapng_option(options: bytes, wanted: int, endian: str) -> bytes | None:
    at = 0
    while at + 4 <= len(options):
        code, size = struct.unpack(endian + "HH", options[at:at + 4])
        if code == 0:
            break
        if code == wanted:
            return options[at + 4:at + 4 + size]
        at += 4 + size + (-size % 4)
    return None


def _ip_packet(linktype: int, frame: bytes) -> bytes | None:
    """The frame from its IP header on, for the link types analyzers capture with."""
    if linktype in _RAW_IP_LINKTYPES:
        return frame
    if linktype == LINKTYPE_LINUX_SLL2:
        ethertype, at = frame[0:2], 20
    elif linktype in (LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL):
        at = 12 if linktype == LINKTYPE_ETHERNET else 14  # where the EtherType is
        while frame[at:at + 2] in _VLAN_TPIDS:  # skip 802.1Q/802.1ad tags
            at += 4
        ethertype, at = frame[at:at + 2], at + 2
    else:
        return None
    return frame[at:] if ethertype in _ETHERTYPES_IP else None


FRAGMENT = "fragment"


def udp_payload(ip: bytes, port: int) -> tuple[bytes, int] | str | None:
    """(payload, length on the wire) of a UDP datagram to ``port`` in an IP packet;
    FRAGMENT for the first fragment of one (not reassembled); None for anything else."""
    if len(ip) >= 20 and ip[0] >> 4 == 4:
        frag = int.from_bytes(ip[6:8], "big")
        if ip[9] != 17 or frag & 0x1FFF:  # not UDP, or a later fragment
            return None
        fragmented, udp = bool(frag & 0x2000), ip[(ip[0] & 0x0F) * 4:]
    elif len(ip) >= 40 and ip[0] >> 4 == 6:
        next_header, at, fragmented = ip[6], 40, False
        while next_header in (0, 43, 44, 60) and len(ip) >= at + 8:  # extension headers
            if next_header == 44:  # fragment header
                if int.from_bytes(ip[at + 2:at + 4], "big") & 0xFFF8:
                    return None
                fragmented = bool(ip[at + 3] & 1)
                next_header, at = ip[at], at + 8
            else:
                next_header, at = ip[at], at + (ip[at + 1] + 1) * 8
        if next_header != 17:
            return None
        udp = ip[at:]
    else:
        return None
    if len(udp) < 8 or int.from_bytes(udp[2:4], "big") != port:
        return None
    if fragmented:
        return FRAGMENT
    length = int.from_bytes(udp[4:6], "big")
    return (udp[8:length], length - 8) if length >= 8 else None


class FileSource:
    """The UDP payloads to ``port`` in a capture file: iterate for (ts_ns, payload, length).

    Counts what it skips in ``other_frames`` and ``fragments``. Iteration ends early once
    ``stopper`` is stopped.
    """

    def __init__(self, f: BinaryIO, port: int = DEFAULT_JMIRROR_PORT, stopper=None):
        self.frames = read_frames(f)
        self.port, self.stopper = port, stopper
        self.other_frames = self.fragments = 0

    def __iter__(self) -> Iterator[tuple[int, bytes, int]]:
        for frame in self.frames:
            if self.stopper is not None and self.stopper.stopped:
                return
            ip = _ip_packet(frame.linktype, frame.data)
            found = udp_payload(ip, self.port) if ip else None
            if found is None:
                self.other_frames += 1
            elif found == FRAGMENT:
                self.fragments += 1
            else:
                yield frame.ts_ns, *found


# ---------------------------------------------------------------------------- live input


class Stopper:
    """Ends a capture from a signal handler or another thread; select() wakes on it."""

    def __init__(self):
        self._r, self._w = socket.socketpair()
        self._w.setblocking(False)  # a flood of signals must not block the handler
        self.stopped = False

    def stop(self, *_args) -> None:
        self.stopped = True
        try:
            self._w.send(b"\0")
        except OSError:
            pass

    def fileno(self) -> int:
        return self._r.fileno()

    def close(self) -> None:
        self._r.close()
        self._w.close()


def open_socket(bind: str, port: int, ipv6: bool = False) -> socket.socket:
    """A UDP socket bound for jmirror, or CaptureError saying why it cannot be."""
    family = socket.AF_INET6 if ipv6 or ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    where = f"[{bind}]:{port}" if family == socket.AF_INET6 else f"{bind}:{port}"
    try:
        if family == socket.AF_INET6 and bind == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 senders too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)  # absorb bursts
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        sock.bind((bind, port))
    except OSError as e:
        sock.close()
        reason = {
            errno.EADDRINUSE: f"UDP port {port} is already in use",
            errno.EACCES: "permission denied (low ports need root or CAP_NET_BIND_SERVICE)",
            errno.EADDRNOTAVAIL: f"{bind} is not an address of this host",
        }.get(e.errno, e.strerror or str(e))
        raise CaptureError(f"cannot listen on {where}: {reason}") from None
    return sock


def _receive(sock: socket.socket) -> tuple[bytes, int, int | None]:
    """(datagram, receive time, datagrams the socket dropped so far if the kernel says)."""
    data, ancillary, _, _ = sock.recvmsg(65535, _ANCILLARY_SPACE)
    ts_ns = dropped = None
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) == _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack(value)
            ts_ns = sec * 1_000_000_000 + nsec
        elif level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) == 4:
            dropped = struct.unpack("@I", value)[0]
    return data, ts_ns or time.time_ns(), dropped


def listen(capture: Capture, sock: socket.socket, stopper: Stopper, timeout: float | None = None,
           interval: float | None = None, on_tick=None) -> str:
    """Feed datagrams from ``sock`` to ``capture`` until count, timeout or stop.

    Calls ``on_tick`` every ``interval`` seconds. Returns why it stopped (see JSON shape).
    """
    sock.setblocking(False)
    start = time.monotonic()
    deadline = start + timeout if timeout else None
    next_tick = start + interval if interval else None
    while not capture.done:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return "timeout"
        if next_tick is not None and now >= next_tick:
            on_tick()
            next_tick = now + interval
        wait = min((t - now for t in (deadline, next_tick) if t is not None), default=None)
        readable, _, _ = select.select([sock, stopper], [], [], wait)
        if stopper.stopped:
            return "signal"
        if sock in readable:
            for _ in range(1000):  # drain a burst, but still tick and check the deadline
                try:
                    data, ts_ns, dropped = _receive(sock)
                except BlockingIOError:
                    break
                if dropped is not None:  # a running total, sent only once it is not 0
                    capture.dropped = max(capture.dropped, dropped)
                capture.feed(data, ts_ns)
                if capture.done:
                    break
    return "count"


def read_file(capture: Capture, source: FileSource) -> str:
    """Feed the datagrams of a capture file to ``capture``; returns why it stopped."""
    for ts_ns, data, length in source:
        capture.feed(data, ts_ns, length)
        if capture.done:
            return "count"
    return "signal" if source.stopper is not None and source.stopper.stopped else "end_of_file"
