"""TCP between two pods on one node, mirroring off and on, rounds alternating (ABAB):

- bulk throughput: iperf3 (client pod -> web pod), a few seconds per measurement;
- request/response latency: sockperf ping-pong (64-byte messages over TCP) when it is
  installed (Debian's `sockperf`; sockperf reports half the round trip, we report the
  round trip), and always a small Python TCP ping-pong (slower, noisier; a fallback
  and a cross-check).

"On" is a policy on the web pod matching every flow, both directions, copies wrapped in
jmirror to the analyzer pod on the same node (whose eth0 counts and drops them in an
nft netdev hook). "Off" is nothing attached. Each "on" measurement is a ratio to the
"off" measurement of the same round.

Side by side (SCENARIOS, every round runs each of them in a rotating order): off,
cn2mirror, `tc` u32 match-all + `mirred egress mirror` to the analyzer's veth, and
nftables `dup to <analyzer>`; bulk throughput and sockperf latency per scenario, as
ratios and differences to "off" of the same round. For each mirroring scenario, a
20 MB transfer once more with a reader at the analyzer (an AF_PACKET socket on its
eth0) that rebuilds the TCP byte stream from what arrives (jmirror payloads or the raw
frames): the share of the bytes sent that the copies carry.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time

from . import common as cm

IPERF_PORT = 5201
SOCKPERF_PORT = 11111
PINGPONG_PORT = 11112
STREAM_PORT = 5202  # the recoverability transfer
STREAM_BYTES = 20 * 1024 * 1024
SCENARIOS = ("off", "cn2m", "tc_mirred", "nft_dup")

# The analyzer's reader: every frame arriving on eth0 (before the sink drops it), the
# transfer's bytes found in them (inside jmirror, or in the raw frame), as a coverage map
# of the stream; prints the share covered, the largest copy and the socket's drops.
STREAM_READER = r"""
import json, os, socket, struct, sys
stop, dst, port, size = sys.argv[1], socket.inet_aton(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)
s.bind(("eth0", 0))
s.settimeout(0.5)
print("ready", flush=True)
frames = []
while True:
    try:
        frames.append(s.recv(1 << 17))
    except socket.timeout:
        if os.path.exists(stop):
            break
drops = struct.unpack("II", s.getsockopt(263, 6, 8))[1]
# Outer IPv4 fragments (a copy too large for the path, sent whole: copyTooLarge fragment)
# are reassembled, as the analyzer's IP stack would.
packets, frags = [], {}
for f in frames:
    if f[12:14] != b"\x08\x00":
        continue
    ip = f[14:]
    fo = struct.unpack("!H", ip[6:8])[0]
    if not fo & 0x3FFF:
        packets.append(ip)
        continue
    ihl = (ip[0] & 15) * 4
    end = struct.unpack("!H", ip[2:4])[0]
    frags.setdefault((ip[12:20], ip[4:6], ip[9]), []).append(
        ((fo & 0x1FFF) * 8, bool(fo & 0x2000), ip[:ihl], ip[ihl:end]))
for parts in frags.values():
    parts.sort(key=lambda p: p[0])
    body, whole = b"", parts[0][0] == 0 and not parts[-1][1]
    for off, _, _, data in parts:
        whole = whole and off == len(body)
        body += data
    if whole:
        hdr = bytearray(parts[0][2])
        hdr[2:4] = struct.pack("!H", len(hdr) + len(body))
        hdr[6:8] = b"\x00\x00"
        packets.append(bytes(hdr) + body)
segs, largest, cut = [], 0, 0
for ip in packets:
    size_read = len(ip)
    if ip[9] == 17 and len(ip) >= 36 and ip[22:24] == struct.pack("!H", 30030):
        ip = ip[36:]
        if not ip or ip[0] >> 4 != 4:
            continue
    if ip[9] != 6 or ip[16:20] != dst:
        continue
    ihl = (ip[0] & 15) * 4
    tcp = ip[ihl:]
    if len(tcp) < 20 or struct.unpack("!H", tcp[2:4])[0] != port:
        continue
    end = struct.unpack("!H", ip[2:4])[0]
    have = min(end, len(ip))  # a copy cut short carries less than its header says
    cut += have < end
    largest = max(largest, size_read)
    seq = struct.unpack("!I", tcp[4:8])[0]
    segs.append((seq, tcp[13], ihl + (tcp[12] >> 4) * 4, have))
isn = next((q for q, fl, _, _ in segs if fl & 0x12 == 0x02), None)
covered = bytearray(size)
if isn is not None:
    for q, _, hdr, have in segs:
        off = (q - isn - 1) % (1 << 32)
        n = have - hdr
        if n > 0 and off < size:
            covered[off:off + n] = b"\x01" * min(n, size - off)
print(json.dumps({"share": (size - covered.count(0)) / size if isn is not None else 0.0,
                  "frames": len(frames), "cut": cut, "socket_drops": drops,
                  "largest_copy": largest}))
"""

STREAM_SENDER = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.sendall(bytes(range(256)) * (int(sys.argv[3]) // 256))
c.close()
"""

STREAM_SINK = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    n += len(d)
print(n, flush=True)
"""

PINGPONG_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(64)
        if not d:
            break
        c.sendall(d)
    c.close()
"""

PINGPONG_CLIENT = r"""
import json, socket, statistics, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((ip, port))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 64
clock = time.perf_counter_ns
rtts = []
for i in range(n + n // 10):
    t = clock()
    c.sendall(msg)
    got = 0
    while got < 64:
        got += len(c.recv(64 - got))
    if i >= n // 10:  # warm-up left out
        rtts.append(clock() - t)
rtts.sort()
print(json.dumps({"median_us": rtts[len(rtts) // 2] / 1000,
                  "p10_us": rtts[len(rtts) // 10] / 1000,
                  "p99_us": rtts[int(len(rtts) * 0.99)] / 1000,
                  "mean_us": statistics.fmean(rtts) / 1000, "n": len(rtts)}))
"""


def _sockperf_parse(text: str) -> dict:
    """sockperf's numbers are half round trips (usec): return round trips."""
    out = {}
    m = re.search(r"avg-latency=([\d.]+)", text) or re.search(r"avg-rtt=([\d.]+)", text)
    half = "avg-latency" in text
    if m:
        out["mean_us"] = float(m.group(1)) * (2 if half else 1)
    for pct, key in (("50.000", "median_us"), ("99.000", "p99_us")):
        m = re.search(rf"percentile {re.escape(pct)} =\s*([\d.]+)", text)
        if m:
            out[key] = float(m.group(1)) * (2 if half else 1)
    m = re.search(r"SentMessages=(\d+)", text)
    if m:
        out["messages"] = int(m.group(1))
    return out


class TcpBench:
    def __init__(self, lab, node, procs: cm.Procs, sockperf: bool = True):
        self.lab, self.node, self.procs = lab, node, procs
        self.web, self.client, self.an = (lab.pods[n] for n in ("web", "client", "analyzer"))
        self.node_ns = lab.nodes["node1"].netns
        cm.install_sink(self.an.netns)
        self.sockperf = shutil.which("sockperf") if sockperf else None
        self.servers = []
        self.servers.append(procs.start(self.web.netns, "iperf3", "-s", "-p",
                                        str(IPERF_PORT), "-B", self.web.ip))
        p = procs.start(self.web.netns, sys.executable, "-c", PINGPONG_SERVER, self.web.ip,
                        str(PINGPONG_PORT))
        if p.stdout.readline().decode().strip() != "ready":
            raise cm.BenchError("ping-pong server did not start")
        self.servers.append(p)
        if self.sockperf:
            self.servers.append(procs.start(self.web.netns, "sockperf", "sr", "--tcp", "-i",
                                            self.web.ip, "-p", str(SOCKPERF_PORT)))
        time.sleep(0.5)

    def mode(self, on: bool) -> None:
        self.scenario("cn2m" if on else "off")

    def scenario(self, name: str) -> None:
        """Leave whatever mirroring is set up and set up `name` (one of SCENARIOS)."""
        web_if, an_if = self.web.host_ifname, self.an.host_ifname
        cm.nft_dup_stop(self.node_ns)
        if name == "cn2m":
            self.node.apply(cm.state(self.lab, [cm.mirror_all_policy()]))
            return
        self.node.apply(cm.state(self.lab, interfaces=()))
        cm.tc_mirred_stop(self.node_ns, web_if)
        if name == "tc_mirred":
            cm.tc_mirred_start(self.node_ns, web_if, an_if)
        elif name == "nft_dup":
            cm.nft_dup_start(self.node_ns, web_if, self.an.ip, an_if)

    def recoverable(self, size: int = STREAM_BYTES) -> dict:
        """One transfer of `size` bytes under the current scenario, read at the analyzer."""
        import os
        import tempfile

        stop = tempfile.mktemp(prefix="cn2mbench-stop-")
        reader = self.procs.start(self.an.netns, sys.executable, "-c", STREAM_READER, stop,
                                  self.web.ip, str(STREAM_PORT), str(size))
        sink = self.procs.start(self.web.netns, sys.executable, "-c", STREAM_SINK,
                                self.web.ip, str(STREAM_PORT))
        try:
            for p in (reader, sink):
                if p.stdout.readline().decode().strip() != "ready":
                    raise cm.BenchError("stream reader or sink did not start")
            cm.ns_sh(self.client.netns, sys.executable, "-c", STREAM_SENDER, self.web.ip,
                     str(STREAM_PORT), str(size), timeout=120)
            got = int(sink.stdout.readline().decode().strip() or 0)
            open(stop, "w").close()
            out, _ = self.procs.stop(reader, signal.SIGCONT, wait=120)
            res = json.loads(out.strip().splitlines()[-1])
            res["received_by_pod"] = got
            return res
        finally:
            self.procs.stop(sink, signal.SIGKILL, wait=2)
            if reader in self.procs.procs:
                self.procs.stop(reader, signal.SIGKILL, wait=2)
            if os.path.exists(stop):
                os.unlink(stop)

    def iperf(self, seconds: float) -> dict:
        r = cm.ns_sh(self.client.netns, "iperf3", "-c", self.web.ip, "-p", str(IPERF_PORT),
                     "-t", str(seconds), "-J", timeout=seconds + 30)
        j = json.loads(r.stdout)
        return {"gbps": j["end"]["sum_received"]["bits_per_second"] / 1e9,
                "retransmits": j["end"]["sum_sent"].get("retransmits", 0)}

    def sockperf_pp(self, seconds: float) -> dict | None:
        if not self.sockperf:
            return None
        r = cm.ns_sh(self.client.netns, "sockperf", "pp", "--tcp", "-i", self.web.ip, "-p",
                     str(SOCKPERF_PORT), "-t", str(seconds), "-m", "64",
                     timeout=seconds + 30, check=False)
        res = _sockperf_parse(r.stdout + r.stderr)
        return res or None

    def pingpong(self, n: int) -> dict:
        r = cm.ns_sh(self.client.netns, sys.executable, "-c", PINGPONG_CLIENT, self.web.ip,
                     str(PINGPONG_PORT), str(n), timeout=120)
        return json.loads(r.stdout)

    def stop(self) -> None:
        for p in self.servers:
            self.procs.stop(p, signal.SIGKILL, wait=2)
        self.servers.clear()


def run(quick: bool = False, log=print) -> dict:
    bulk_rounds = 1 if quick else 5
    rr_pairs = 1 if quick else 24
    sockperf_pairs = 0 if quick else 6
    bulk_s = 1 if quick else 2
    pp_n = 500 if quick else 1500
    out = {"method": {"bulk": f"iperf3 -t {bulk_s}, {bulk_rounds} rounds off/on alternating",
                      "rr": f"sockperf pp --tcp -m 64 -t 1, {sockperf_pairs} off/on pairs "
                      "(round trips)",
                      "pingpong": f"python TCP ping-pong, 64 B, {pp_n} exchanges per "
                      f"measurement, {rr_pairs} off/on pairs",
                      "mirroring_on": "a policy matching every flow on the web pod, jmirror "
                      "to the analyzer pod (same node)"},
           "machine": cm.machine(), "rounds": [], "rr_pairs": [], "sockperf_pairs": [],
           "scenario_rounds": [], "recoverable": {}}
    procs = cm.Procs()
    with cm.sigterm_as_exit(), cm.bench_lab() as lab, cm.bench_node(lab) as node:
        b = TcpBench(lab, node, procs, sockperf=sockperf_pairs > 0)
        out["lab_prefix"] = lab.prefix
        out["method"]["sockperf"] = bool(b.sockperf)
        try:
            # Request/response: many short measurements, off and on alternating, so that
            # the machine's load drifts as little as possible within a pair.
            for i in range(rr_pairs):
                pair = {}
                for on in ((False, True) if i % 2 == 0 else (True, False)):
                    b.mode(on)
                    pair["on" if on else "off"] = b.pingpong(pp_n)
                out["rr_pairs"].append(pair)
            # Side by side: every round runs each scenario, in a rotating order; ratios
            # and differences are to "off" of the same round.
            for r in range(max(bulk_rounds, sockperf_pairs)):
                order = SCENARIOS[r % len(SCENARIOS):] + SCENARIOS[:r % len(SCENARIOS)]
                row = {}
                for name in order:
                    b.scenario(name)
                    m = {}
                    if r < sockperf_pairs and b.sockperf:
                        m["sockperf"] = b.sockperf_pp(1)
                    if r < bulk_rounds:
                        sink0 = cm.sink_count(b.an.netns)
                        dp0 = cm.datapath_counters(node)
                        m["bulk"] = b.iperf(bulk_s)
                        time.sleep(0.1)
                        d = cm.counters_delta(cm.datapath_counters(node), dp0)
                        m["copies"] = {"cloned": d["cloned"], "sent": d["packets"],
                                       "truncated": d["truncated"],
                                       "gso_wrapped": d.get("gso_wrapped", 0),
                                       "gso_by_segment": d.get("gso_by_segment", 0),
                                       "delivered": cm.sink_count(b.an.netns) - sink0,
                                       "drops": {k: v for k, v in d["drops"].items() if v}}
                    row[name] = m
                out["scenario_rounds"].append(row)
                if r < sockperf_pairs and b.sockperf:
                    out["sockperf_pairs"].append({"off": row["off"].get("sockperf"),
                                                  "on": row["cn2m"].get("sockperf")})
                if r < bulk_rounds:
                    out["rounds"].append({"off": row["off"], "on": row["cn2m"]})
                    log(f"  tcp round {r + 1}: bulk Gb/s " + ", ".join(
                        f"{n} {row[n]['bulk']['gbps']:.2f}" for n in SCENARIOS))
            for name in SCENARIOS[1:]:
                b.scenario(name)
                out["recoverable"][name] = b.recoverable(
                    STREAM_BYTES // 10 if quick else STREAM_BYTES)
                log(f"  {name}: {out['recoverable'][name]['share'] * 100:.2f}% of the TCP "
                    "byte stream recoverable at the analyzer")
            if not quick:
                out["perf_bulk_on"] = _profile_bulk(b, procs)
        finally:
            b.stop()
            procs.stop_all()
    out["machine"]["cpu_busy_after"] = round(cm.cpu_busy(), 3)
    out["summary"] = summarize(out)
    return out


def _profile_bulk(b: TcpBench, procs: cm.Procs) -> dict | None:
    """perf on all CPUs during a bulk run with mirroring on (others' work included)."""
    import tempfile

    b.mode(True)
    p = procs.start(b.client.netns, "iperf3", "-c", b.web.ip, "-p", str(IPERF_PORT), "-t",
                    "4")
    try:
        time.sleep(0.5)
        with tempfile.TemporaryDirectory(prefix="cn2mbench") as tmp:
            return cm.perf_profile(2.0, None, tmp)
    finally:
        procs.stop(p, signal.SIGINT, wait=10)


def summarize(out: dict) -> dict:
    rounds = out["rounds"]
    s = {}
    off = [r["off"]["bulk"]["gbps"] for r in rounds]
    on = [r["on"]["bulk"]["gbps"] for r in rounds]
    s["bulk_gbps_off"], s["bulk_gbps_on"] = cm.summary(off), cm.summary(on)
    s["bulk_ratio"] = cm.summary(cm.ratios(on, off))
    for tool, pairs in (("pingpong", out["rr_pairs"]), ("sockperf", out["sockperf_pairs"])):
        pairs = [p for p in pairs if p.get("off") and p.get("on")]
        for stat in ("median_us", "p10_us", "p99_us"):
            a = [p["off"].get(stat) for p in pairs]
            b = [p["on"].get(stat) for p in pairs]
            if not pairs or None in a or None in b:
                continue
            s[f"{tool}_{stat}_off"] = cm.summary(a)
            s[f"{tool}_{stat}_on"] = cm.summary(b)
            s[f"{tool}_{stat}_delta"] = cm.summary([y - x for x, y in zip(a, b, strict=True)])
            s[f"{tool}_{stat}_ratio"] = cm.summary(cm.ratios(b, a))
    # Side by side: per scenario, bulk ratio and sockperf median difference to "off".
    side = {}
    srounds = out.get("scenario_rounds") or []
    for name in SCENARIOS:
        e = {}
        bulk = [(r[name]["bulk"]["gbps"], r["off"]["bulk"]["gbps"]) for r in srounds
                if "bulk" in r.get(name, {})]
        if bulk:
            e["bulk_gbps"] = cm.summary([x for x, _ in bulk])
            e["bulk_ratio"] = cm.summary([x / y for x, y in bulk if y])
        sp = [(r[name]["sockperf"], r["off"]["sockperf"]) for r in srounds
              if (r.get(name) or {}).get("sockperf") and (r.get("off") or {}).get("sockperf")]
        sp = [(x["median_us"], y["median_us"]) for x, y in sp
              if "median_us" in x and "median_us" in y]
        if sp:
            e["sockperf_median_us"] = cm.summary([x for x, _ in sp])
            e["sockperf_median_delta_us"] = cm.summary([x - y for x, y in sp])
        if name in (out.get("recoverable") or {}):
            e["recoverable"] = out["recoverable"][name]
        side[name] = e
    s["side_by_side"] = side
    cop = [r["on"]["copies"] for r in rounds]
    s["bulk_copies"] = {k: sum(c.get(k, 0) for c in cop)
                        for k in ("cloned", "sent", "truncated", "delivered", "gso_wrapped",
                                  "gso_by_segment")}
    s["bulk_copies"]["drops"] = {}
    for c in cop:
        for k, v in c["drops"].items():
            s["bulk_copies"]["drops"][k] = s["bulk_copies"]["drops"].get(k, 0) + v
    return s
