"""cn2mirror capture: live UDP, pcap input, signals, errors; output checked with tshark.

Only loopback addresses: datagrams go to 127.0.0.1 or ::1, and the mirrored packets
inside them carry 127.0.0.0/8 and ::1 addresses.
"""

import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from decimal import Decimal

import click
import pytest
from click.testing import CliRunner
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, CookedLinux, Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import RawPcapNgReader, RawPcapReader, wrpcap, wrpcapng

from cn2mirror.agent import jmirror
from cn2mirror.agent.jmirror import JMirror, encode
from cn2mirror.agent.pcap import LINKTYPE_RAW
from cn2mirror.agent.state import DEFAULT_JMIRROR_PORT, MIRROR_ID_MAX, SESSION_ID_MAX
from cn2mirror.cli.capture import capture

PY = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")

# (mirror id, session id, inner packet): several pairs, IPv4 and IPv6, ICMP/TCP/UDP.
TRAFFIC = [
    (10, 100, bytes(IP(src="127.0.0.2", dst="127.0.0.3") / ICMP(id=1, seq=1))),
    (10, 100, bytes(IP(src="127.0.0.2", dst="127.0.0.3") / TCP(sport=40000, dport=80,
                                                                flags="S"))),
    (10, 101, bytes(IP(src="127.0.0.4", dst="127.0.0.5") / UDP(sport=5000, dport=5001)
                    / Raw(b"u" * 1400))),
    (20, 100, bytes(IPv6(src="::1", dst="::1") / ICMPv6EchoRequest(id=7))),
    (20, 100, bytes(IPv6(src="::1", dst="::1", fl=0x12345) / TCP(sport=40001, dport=443))),
    (MIRROR_ID_MAX, SESSION_ID_MAX,
     bytes(IP(src="127.0.0.6", dst="127.0.0.7", options=[IPOption_Router_Alert()]) / ICMP())),
    (10, 100, bytes(IP(src="127.0.0.3", dst="127.0.0.2") / ICMP(type=0, id=1, seq=1))),
]
INNER_PROTOCOLS = ["icmp", "tcp", "udp", "icmpv6", "tcp", "icmp", "icmp"]  # as tshark names them

GARBAGE = [  # (datagram, reason)
    (b"", jmirror.TOO_SHORT),
    (b"\x00\x01\x02", jmirror.TOO_SHORT),
    (struct.pack("!II", 1 << 30 | 10, 100) + TRAFFIC[0][2], jmirror.BAD_VERSION),
    (struct.pack("!II", 3 << 30, 0) + TRAFFIC[0][2], jmirror.BAD_VERSION),
    (encode(10, 100, b""), jmirror.NOT_IP),
    (encode(10, 100, b"\x00" * 40), jmirror.NOT_IP),
    (encode(10, 100, b"\xff\x03\x00\x21" + TRAFFIC[0][2]), jmirror.NOT_IP),
]
GARBAGE_COUNTS = {"too_short": 2, "bad_version": 2, "not_ip": 3}

NAMES_YAML = 'mirror:\n  10: "csp demo/web rule 0"\nsession:\n  "100": "demo/web/eth0"\n'
NAMES = {"mirror": {10: "csp demo/web rule 0"}, "session": {100: "demo/web/eth0"}}
NO_NAMES = {"mirror": {}, "session": {}}


def expected_sessions(traffic=TRAFFIC, names=NAMES):
    """The summary's sessions, without the timestamps, for ``traffic``."""
    sessions = {}
    for mid, sid, inner in traffic:
        s = sessions.setdefault((mid, sid), {
            "mirror_id": mid, "session_id": sid,
            "mirror_name": names["mirror"].get(mid), "session_name": names["session"].get(sid),
            "interface": f"mid={mid} sid={sid}", "packets": 0, "bytes": 0})
        s["packets"] += 1
        s["bytes"] += len(inner)
    return [sessions[k] for k in sorted(sessions)]


def without_times(sessions):
    return [{k: v for k, v in s.items() if k not in ("first_seen", "last_seen")}
            for s in sessions]


def read_pcapng(path):
    """[(interface name, link type, packet bytes, ts_ns)] read with scapy's reader."""
    out = []
    with RawPcapNgReader(str(path)) as reader:
        for data, meta in reader:
            ts_ns = ((meta.tshigh << 32) | meta.tslow) * 10**9 // meta.tsresol
            out.append((meta.ifname.decode(), meta.linktype, data, ts_ns))
        interfaces = reader.interfaces
    return out, interfaces


def tshark(path, *fields):
    args = ["tshark", "-r", str(path), "-T", "fields", "-E", "occurrence=a",
            "-E", "aggregator=,"]
    for field in fields:
        args += ["-e", field]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "cut short" not in done.stderr and "appears to be damaged" not in done.stderr
    return [line.split("\t") for line in done.stdout.splitlines()]


# ---------------------------------------------------------------------------- live UDP


class LiveCapture:
    """``python -m cn2mirror.cli.capture`` in a subprocess, listening on a free port.

    A thread collects its stderr (live tables) so that tests can wait for a line.
    """

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [PY, "-m", "cn2mirror.cli.capture", "--port", "0", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        self.stderr = []
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()
        line = self.wait_for_line(lambda line: "listening for jmirror" in line)
        host, port = line.rsplit(" ", 1)[1].rsplit(":", 1)
        self.address = (host.strip("[]"), int(port))

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def wait_for_line(self, wanted, timeout=20):
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if wanted(line):
                return line.strip()
        self.proc.kill()
        raise AssertionError(f"capture did not print the expected line: {self.stderr}")

    def send(self, datagrams):
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            for datagram in datagrams:
                sock.sendto(datagram, self.address)

    def finish(self, timeout=30):
        try:
            self.proc.wait(timeout=timeout)  # the summary is far smaller than a pipe's buffer
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        out = self.proc.stdout.read()
        self.reader.join(timeout=timeout)
        return self.proc.returncode, out, "".join(self.stderr)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One live capture: garbage, then TRAFFIC, stopped by --count."""
    tmp = tmp_path_factory.mktemp("live")
    (tmp / "names.yaml").write_text(NAMES_YAML)
    out = tmp / "out.pcapng"
    run = LiveCapture("--bind", "127.0.0.1", "--write", str(out), "--count", str(len(TRAFFIC)),
                      "--timeout", "30", "--names", str(tmp / "names.yaml"), "-o", "json",
                      "--interval", "0")
    before = time.time_ns()
    run.send([g for g, _ in GARBAGE])
    run.send([encode(mid, sid, inner) for mid, sid, inner in TRAFFIC])
    code, stdout, stderr = run.finish()
    after = time.time_ns()
    assert code == 0, stderr
    return {"summary": json.loads(stdout), "path": out, "before": before, "after": after,
            "port": run.address[1]}


def test_live_summary(live):
    summary = live["summary"]
    assert list(summary) == ["source", "output", "stopped_by", "elapsed_s", "packets", "bytes",
                             "sessions", "filtered", "dropped", "not_jmirror", "other_frames",
                             "fragments"]
    assert summary["source"] == {"kind": "udp", "address": "127.0.0.1", "port": live["port"]}
    assert summary["output"] == {"path": str(live["path"]), "format": "pcapng"}
    assert summary["stopped_by"] == "count"
    assert summary["packets"] == len(TRAFFIC)
    assert summary["bytes"] == sum(len(inner) for _, _, inner in TRAFFIC)
    assert without_times(summary["sessions"]) == expected_sessions()
    assert summary["not_jmirror"] == GARBAGE_COUNTS
    assert [summary[k] for k in ("filtered", "dropped", "other_frames", "fragments")] == [0] * 4
    for s in summary["sessions"]:
        assert live["before"] / 1e9 - 1e-6 <= s["first_seen"] <= s["last_seen"]
        assert s["last_seen"] <= live["after"] / 1e9 + 1e-6


def test_live_pcapng_has_one_named_interface_per_pair_and_the_exact_packets(live):
    packets, interfaces = read_pcapng(live["path"])
    assert [(name, data) for name, _, data, _ in packets] == [
        (f"mid={mid} sid={sid}", inner) for mid, sid, inner in TRAFFIC]
    assert {linktype for _, linktype, _, _ in packets} == {LINKTYPE_RAW}
    pairs = sorted({(mid, sid) for mid, sid, _ in TRAFFIC})
    assert sorted(i[2]["name"].decode() for i in interfaces) == sorted(
        f"mid={m} sid={s}" for m, s in pairs)
    times = [ts for _, _, _, ts in packets]
    assert times == sorted(times)
    assert live["before"] <= times[0] and times[-1] <= live["after"]


@needs_tshark
def test_tshark_sees_the_inner_protocols_on_the_named_interfaces(live):
    rows = tshark(live["path"], "frame.interface_name", "frame.interface_description",
                  "frame.protocols", "ip.src", "ipv6.src")
    assert len(rows) == len(TRAFFIC)
    for (mid, sid, inner), protocol, (name, description, protocols, ip_src, ipv6_src) in zip(
            TRAFFIC, INNER_PROTOCOLS, rows, strict=True):
        assert name == f"mid={mid} sid={sid}"
        assert protocols.split(":")[:3] == ["raw", "ip" if inner[0] >> 4 == 4 else "ipv6",
                                            protocol]
        if inner[0] >> 4 == 4:
            assert ip_src == IP(inner).src
        else:
            assert ipv6_src == "::1"
        if (mid, sid) == (10, 100):
            assert description == "jmirror mirror 10 (csp demo/web rule 0), session 100" \
                                  " (demo/web/eth0)"
        elif (mid, sid) == (20, 100):
            assert description == "jmirror mirror 20, session 100 (demo/web/eth0)"


def test_live_ipv6_listener_and_pcap_format(tmp_path):
    out = tmp_path / "out.pcap"
    run = LiveCapture("--bind", "::1", "--write", str(out), "--format", "pcap", "--count", "3",
                      "--timeout", "30", "-o", "json", "--interval", "0")
    assert run.address[0] == "::1"
    run.send([b"xx"] + [encode(mid, sid, inner) for mid, sid, inner in TRAFFIC[2:5]])
    code, stdout, stderr = run.finish()
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["source"]["address"] == "::1"
    assert summary["not_jmirror"] == {"too_short": 1, "bad_version": 0, "not_ip": 0}
    assert without_times(summary["sessions"]) == expected_sessions(TRAFFIC[2:5], NO_NAMES)
    with RawPcapReader(str(out)) as reader:
        assert reader.linktype == LINKTYPE_RAW
        assert [data for data, _ in reader] == [inner for _, _, inner in TRAFFIC[2:5]]
    if shutil.which("tshark"):
        assert [r[0] for r in tshark(out, "frame.protocols")] == [
            "raw:ip:udp:data", "raw:ipv6:icmpv6", "raw:ipv6:tcp"]


def test_live_filters_by_ids_and_stops_on_timeout(tmp_path):
    out = tmp_path / "out.pcapng"
    run = LiveCapture("--bind", "127.0.0.1", "--write", str(out), "--mirror-id", "10",
                      "--mirror-id", "20", "--session-id", "100", "--timeout", "1.5",
                      "-o", "json", "--interval", "0")
    started = time.monotonic()
    run.send([encode(mid, sid, inner) for mid, sid, inner in TRAFFIC])
    code, stdout, stderr = run.finish()
    assert code == 0, stderr
    assert time.monotonic() - started >= 1.0
    summary = json.loads(stdout)
    kept = [t for t in TRAFFIC if t[0] in (10, 20) and t[1] == 100]
    assert summary["stopped_by"] == "timeout"
    assert summary["filtered"] == len(TRAFFIC) - len(kept)
    assert without_times(summary["sessions"]) == expected_sessions(kept, NO_NAMES)
    packets, _ = read_pcapng(out)
    assert [data for _, _, data, _ in packets] == [inner for _, _, inner in kept]


def test_live_counts_what_the_kernel_dropped(tmp_path):
    run = LiveCapture("--bind", "127.0.0.1", "--timeout", "3", "-o", "json", "--interval", "0")
    datagram = encode(1, 2, TRAFFIC[2][2])  # 1436 bytes
    sent = 20000  # about 40 MB of socket buffer: far more than the kernel allows
    run.proc.send_signal(signal.SIGSTOP)  # the capture cannot read while they arrive
    try:
        run.send([datagram] * sent)
    finally:
        run.proc.send_signal(signal.SIGCONT)
    time.sleep(0.5)
    run.send([datagram])  # the drop count rides on datagrams queued after the drops
    code, stdout, stderr = run.finish()
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["dropped"] > 0
    assert summary["packets"] + summary["dropped"] == sent + 1


# ---------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_leaves_a_valid_file(tmp_path, signum):
    out = tmp_path / "out.pcapng"
    (tmp_path / "names.json").write_text(json.dumps(
        {"mirror": {"10": "csp demo/web rule 0"}, "session": {"100": "demo/web/eth0"}}))
    run = LiveCapture("--bind", "127.0.0.1", "--write", str(out), "--interval", "0.1",
                      "--names", str(tmp_path / "names.json"), "-o", "json")
    run.send([encode(mid, sid, inner) for mid, sid, inner in TRAFFIC[:3]])
    # The live table says when all three have arrived (and the file was flushed with it).
    run.wait_for_line(lambda line: line.startswith("3 packets"))
    run.proc.send_signal(signum)
    code, stdout, stderr = run.finish()
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["stopped_by"] == "signal"
    assert summary["packets"] == 3
    packets, _ = read_pcapng(out)
    assert [data for _, _, data, _ in packets] == [inner for _, _, inner in TRAFFIC[:3]]
    if shutil.which("tshark"):
        rows = tshark(out, "frame.interface_name", "frame.protocols")
        assert rows == [["mid=10 sid=100", "raw:ip:icmp"], ["mid=10 sid=100", "raw:ip:tcp"],
                        ["mid=10 sid=101", "raw:ip:udp:data"]]
    assert "csp demo/web rule 0" in stderr  # the live table shows the names


@needs_tshark
def test_signal_before_any_packet_leaves_a_valid_empty_file(tmp_path):
    out = tmp_path / "out.pcapng"
    run = LiveCapture("--bind", "127.0.0.1", "--write", str(out), "--interval", "0")
    run.proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = run.finish()
    assert code == 0, stderr
    assert "0 packets" in stdout
    assert tshark(out, "frame.number") == []


# ---------------------------------------------------------------------------- pcap input

T0 = 1_700_000_000


def jmirror_frames():
    """Ethernet frames: TRAFFIC as jmirror (several outer shapes), garbage and other traffic.

    Returns (frames, expected other_frames, expected fragments).
    """
    lo4 = {"src": "127.0.0.1", "dst": "127.0.0.1"}
    lo6 = {"src": "::1", "dst": "::1"}
    port = {"sport": DEFAULT_JMIRROR_PORT, "dport": DEFAULT_JMIRROR_PORT}
    frames = []
    for i, (mid, sid, inner) in enumerate(TRAFFIC):
        outer = [IP(**lo4), IPv6(**lo6)][i % 2]
        frames.append(Ether() / outer / UDP(chksum=0, **port) / JMirror(mid=mid, sid=sid)
                      / Raw(inner))
    frames[2] = Ether() / Dot1Q(vlan=5) / frames[2][IP]  # VLAN-tagged
    for datagram, _ in GARBAGE:
        frames.append(Ether() / IP(**lo4) / UDP(**port) / Raw(datagram))
    other = [
        Ether() / ARP(),
        Ether() / IP(**lo4) / TCP(dport=DEFAULT_JMIRROR_PORT),
        Ether() / IP(**lo4) / UDP(sport=DEFAULT_JMIRROR_PORT, dport=53) / Raw(b"q" * 20),
        Ether() / IPv6(**lo6) / ICMPv6EchoRequest(),
        Ether() / IP(**lo4, frag=10) / Raw(b"later fragment"),
    ]
    fragment = Ether() / IP(**lo4, flags="MF") / UDP(**port) / Raw(encode(1, 1, TRAFFIC[0][2]))
    frames += other + [fragment]
    for i, frame in enumerate(frames):
        frame.time = Decimal(T0) + Decimal(i) / 4  # exact in microseconds and in binary
    return frames, len(other), 1


def jmirror_timestamps():
    return [(T0 * 4 + i) * 250_000_000 for i in range(len(TRAFFIC))]


def write_input(kind, path):
    frames, others, fragments = jmirror_frames()
    if kind == "pcap":
        wrpcap(str(path), frames)
    elif kind == "pcapng":
        wrpcapng(str(path), frames)
    elif kind == "cooked":  # Linux cooked capture (tcpdump -i any)
        cooked = []
        for frame in frames:
            c = CookedLinux(proto=frame[Ether].type) / frame[Ether].payload
            c.time = frame.time
            cooked.append(c)
        wrpcap(str(path), cooked)
    elif kind == "raw":  # raw IP: frames without IP (ARP) cannot be there
        raw = []
        for frame in frames:
            if IP in frame or IPv6 in frame:
                r = frame[IP] if IP in frame else frame[IPv6]
                r.time = frame.time
                raw.append(r)
        others -= 1
        wrpcap(str(path), raw, linktype=LINKTYPE_RAW)
    return others, fragments


def run_cli(*args):
    return CliRunner().invoke(capture, [str(a) for a in args])


@pytest.mark.parametrize("kind", ["pcap", "pcapng", "cooked", "raw"])
def test_reads_jmirror_from_a_capture_file(tmp_path, kind):
    others, fragments = write_input(kind, tmp_path / "in")
    (tmp_path / "names.yaml").write_text(NAMES_YAML)
    out = tmp_path / "out.pcapng"
    result = run_cli("--read", tmp_path / "in", "--write", out, "-o", "json",
                     "--names", tmp_path / "names.yaml")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["source"] == {"kind": "file", "path": str(tmp_path / "in"),
                                 "port": DEFAULT_JMIRROR_PORT}
    assert summary["stopped_by"] == "end_of_file"
    assert without_times(summary["sessions"]) == expected_sessions()
    assert summary["not_jmirror"] == GARBAGE_COUNTS
    assert (summary["other_frames"], summary["fragments"]) == (others, fragments)
    packets, _ = read_pcapng(out)
    assert [(name, data, ts) for name, _, data, ts in packets] == [
        (f"mid={mid} sid={sid}", inner, ts)
        for (mid, sid, inner), ts in zip(TRAFFIC, jmirror_timestamps(), strict=True)]
    first = summary["sessions"][0]  # (10, 100): packets 0, 1 and 6
    assert (first["first_seen"], first["last_seen"]) == (T0, T0 + 6 / 4)


def test_ethernet_padding_is_not_part_of_the_packet(tmp_path):
    inner = bytes(IP(src="127.0.0.2", dst="127.0.0.3") / ICMP())
    frame = Ether(bytes(Ether() / IP(src="127.0.0.1", dst="127.0.0.1") / UDP()
                        / JMirror(mid=1, sid=2) / Raw(inner)) + b"\x00" * 12)
    wrpcap(str(tmp_path / "in.pcap"), [frame])
    result = run_cli("--read", tmp_path / "in.pcap", "--write", tmp_path / "out.pcapng")
    assert result.exit_code == 0, result.output
    packets, _ = read_pcapng(tmp_path / "out.pcapng")
    assert [data for _, _, data, _ in packets] == [inner]


def test_file_input_with_filters_count_other_port_and_pcap_output(tmp_path):
    write_input("pcap", tmp_path / "in.pcap")
    out = tmp_path / "out.pcap"
    result = run_cli("--read", tmp_path / "in.pcap", "--write", out, "--format", "pcap",
                     "--mirror-id", "10", "--count", "2", "-o", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["stopped_by"] == "count"
    assert summary["filtered"] == 0  # stopped at the 2nd kept packet, before any other id
    assert [(s["mirror_id"], s["session_id"], s["packets"]) for s in summary["sessions"]] == [
        (10, 100, 2)]
    with RawPcapReader(str(out)) as reader:
        assert reader.linktype == LINKTYPE_RAW
        assert [data for data, _ in reader] == [TRAFFIC[0][2], TRAFFIC[1][2]]

    result = run_cli("--read", tmp_path / "in.pcap", "--session-id", "101", "-o", "json")
    summary = json.loads(result.stdout)
    assert summary["output"] is None
    assert summary["filtered"] == len(TRAFFIC) - 1
    assert [(s["mirror_id"], s["session_id"]) for s in summary["sessions"]] == [(10, 101)]

    # Another port: nothing on 30030 counts, everything is "other".
    result = run_cli("--read", tmp_path / "in.pcap", "--port", "4789", "-o", "json")
    summary = json.loads(result.stdout)
    assert summary["packets"] == 0 and summary["sessions"] == []


def test_write_to_stdout_for_a_pipe(tmp_path):
    write_input("pcap", tmp_path / "in.pcap")
    result = run_cli("--read", tmp_path / "in.pcap", "--write", "-", "-o", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stderr)["packets"] == len(TRAFFIC)  # people's output: stderr
    (tmp_path / "piped.pcapng").write_bytes(result.stdout_bytes)
    packets, _ = read_pcapng(tmp_path / "piped.pcapng")
    assert [data for _, _, data, _ in packets] == [inner for _, _, inner in TRAFFIC]


def test_truncated_input_is_read_up_to_the_cut(tmp_path):
    frames = [Ether() / IP(src="127.0.0.1", dst="127.0.0.1") / UDP() / JMirror(mid=mid, sid=sid)
              / Raw(inner) for mid, sid, inner in TRAFFIC[:3]]
    wrpcap(str(tmp_path / "in.pcap"), frames)
    data = (tmp_path / "in.pcap").read_bytes()
    (tmp_path / "in.pcap").write_bytes(data[:-10])
    result = run_cli("--read", tmp_path / "in.pcap", "-o", "json")
    assert result.exit_code == 0, result.output
    assert "ends inside a record" in result.stderr
    assert json.loads(result.stdout)["packets"] == 2


def test_table_summary(tmp_path):
    write_input("pcap", tmp_path / "in.pcap")
    (tmp_path / "names.yaml").write_text(NAMES_YAML)
    result = run_cli("--read", tmp_path / "in.pcap", "--names", tmp_path / "names.yaml")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["MID", "SID", "MIRROR", "SESSION", "PACKETS", "BYTES", "LAST",
                                "SEEN"]
    row = lines[1].split()
    assert row[:2] == ["10", "100"] and row[-4:-2] == ["3", str(sum(
        len(i) for m, s, i in TRAFFIC if (m, s) == (10, 100)))]
    assert "csp demo/web rule 0" in lines[1] and "demo/web/eth0" in lines[1]
    assert "not jmirror: too_short=2 bad_version=2 not_ip=3" in result.stdout


# ---------------------------------------------------------------------------- errors


def test_capture_is_a_click_command():
    assert isinstance(capture, click.Command) and capture.name == "capture"


def test_port_in_use_is_a_clear_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_cli("--bind", "127.0.0.1", "--port", port, "--timeout", "1")
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}: UDP port {port} is already in use" \
        in result.output


def test_permission_denied_is_a_clear_error():
    # Ports below 1024 need privileges; as root, drop them for the child.
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        if int(f.read()) <= 80:
            pytest.skip("unprivileged processes may bind port 80 here")
    user = {"user": 65534, "group": 65534} if os.geteuid() == 0 else {}
    done = subprocess.run([PY, "-m", "cn2mirror.cli.capture", "--bind", "127.0.0.1",
                           "--port", "80", "--timeout", "1"], cwd="/", capture_output=True,
                          text=True, timeout=30, **user)
    assert done.returncode == 1, done.stderr
    assert "cannot listen on 127.0.0.1:80: permission denied" in done.stderr


def test_unreadable_capture_files_are_clear_errors(tmp_path):
    result = run_cli("--read", tmp_path / "missing.pcap")
    assert result.exit_code == 1
    assert "cannot read" in result.output and "No such file" in result.output
    (tmp_path / "junk").write_bytes(b"this is not a capture file")
    result = run_cli("--read", tmp_path / "junk")
    assert result.exit_code == 1
    assert "not a pcap or pcapng file" in result.output
    result = run_cli("--read", tmp_path)
    assert result.exit_code == 1 and "cannot read" in result.output


def test_unwritable_output_is_a_clear_error(tmp_path):
    wrpcap(str(tmp_path / "in.pcap"), [Ether() / ARP()])
    result = run_cli("--read", tmp_path / "in.pcap", "--write", tmp_path / "no" / "out.pcapng")
    assert result.exit_code == 1
    assert "cannot write" in result.output


@pytest.mark.parametrize("args", [
    ["--read", "x.pcap", "--bind", "127.0.0.1"],
    ["--read", "x.pcap", "--port", "0"],
    ["--mirror-id", str(MIRROR_ID_MAX + 1)],
    ["--session-id", str(SESSION_ID_MAX + 1)],
    ["--count", "0"],
    ["--format", "erf"],
    ["--port", "70000"],
])
def test_usage_errors_exit_2(args):
    assert run_cli(*args).exit_code == 2


def test_bad_names_file_is_a_usage_error(tmp_path):
    (tmp_path / "names.yaml").write_text("mirror:\n  web: rule\n")
    result = run_cli("--read", "x.pcap", "--names", tmp_path / "names.yaml")
    assert result.exit_code == 2
    assert "integer ids" in result.output
