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
        if on:
            self.node.apply(cm.state(self.lab, [cm.mirror_all_policy()]))
        else:
            self.node.apply(cm.state(self.lab, interfaces=()))
            cm.ns_sh(self.node_ns, "tc", "qdisc", "del", "dev", self.web.host_ifname,
                     "clsact", check=False)

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
    bulk_rounds = 1 if quick else 6
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
           "machine": cm.machine(), "rounds": [], "rr_pairs": [], "sockperf_pairs": []}
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
            for i in range(sockperf_pairs if b.sockperf else 0):
                pair = {}
                for on in ((False, True) if i % 2 == 0 else (True, False)):
                    b.mode(on)
                    pair["on" if on else "off"] = b.sockperf_pp(1)
                out["sockperf_pairs"].append(pair)
            pp = [p["on"]["median_us"] - p["off"]["median_us"] for p in out["rr_pairs"]]
            log(f"  tcp request/response: ping-pong median RTT on - off: "
                f"{cm.median(pp):+.2f} us over {len(pp)} pairs")
            for r in range(bulk_rounds):
                row = {}
                for on in ((False, True) if r % 2 == 0 else (True, False)):
                    b.mode(on)
                    sink0 = cm.sink_count(b.an.netns)
                    dp0 = cm.datapath_counters(node)
                    m = {"bulk": b.iperf(bulk_s)}
                    time.sleep(0.1)
                    d = cm.counters_delta(cm.datapath_counters(node), dp0)
                    m["copies"] = {"cloned": d["cloned"], "sent": d["packets"],
                                   "truncated": d["truncated"],
                                   "delivered": cm.sink_count(b.an.netns) - sink0,
                                   "drops": {k: v for k, v in d["drops"].items() if v}}
                    row["on" if on else "off"] = m
                out["rounds"].append(row)
                log(f"  tcp bulk round {r + 1}/{bulk_rounds}: "
                    f"{row['off']['bulk']['gbps']:.2f} -> {row['on']['bulk']['gbps']:.2f} Gb/s")
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
    cop = [r["on"]["copies"] for r in rounds]
    s["bulk_copies"] = {k: sum(c[k] for c in cop) for k in ("cloned", "sent", "truncated",
                                                            "delivered")}
    s["bulk_copies"]["drops"] = {}
    for c in cop:
        for k, v in c["drops"].items():
            s["bulk_copies"]["drops"][k] = s["bulk_copies"]["drops"].get(k, 0) + v
    return s
