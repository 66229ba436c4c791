"""Where a copy's cost lands while a pod's TCP bulk transfer is mirrored (issue 12,
"production first"), and what the alternatives to cn2mirror's copy path keep.

Two parts, in one lab (client pod -> web pod, every segment mirrored to the analyzer pod
on the same node, as in benchmarks/tcp_latency.py):

- a profile: `perf record -a -g` while iperf3 runs, with cn2mirror and with tc mirred;
  every sample of the benchmark's own processes (iperf3, the softirq threads, idle) is
  put in one category by its call chain (the clone and what runs inside it: the
  segmentation of the wrapped super-packet, the copies' veth transmits, the wrapper; the
  analyzer's receive; production's own copies and TCP work). Other users' processes on
  this shared machine are left out of the shares.
- alternatives measured side by side (rotating order, every round; ratios to "off" of the
  same round): cn2mirror as shipped (wire-size copies with finished checksums), the same
  with the copies' inner checksums left unfinished (the analyzer's veth keeps checksum
  offload: segments share the super-packet's pages), the wrapped super-packet handed to
  the analyzer whole (its veth keeps tunnel segmentation: one 64 KB copy, as tc mirred
  gives), and tc mirred. The last two break the issue's "wire-size datagrams" and the
  second its "finished checksums": they are here to show what the per-segment delivery
  costs, not as options.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import tempfile
import time

from . import common as cm
from . import tcp_latency as T

VARIANTS = ("off", "cn2m", "cn2m_csum_unfinished", "cn2m_whole", "tc_mirred")
# Processes that are not this benchmark's (other users of the shared machine, tools).
FOREIGN = ("python", "python3", "bash", "sh", "perf", "cat", "kdamond.0", "sleep", "nft",
           "ip", "ethtool", "tc")


def _variant(b: T.TcpBench, name: str) -> None:
    if name in ("off", "tc_mirred"):
        b.scenario(name)
        return
    # Through "off": the agent then sets the analyzer veth's hand-off offloads afresh
    # (it leaves them alone while the destination stays in use).
    b.scenario("off")
    b.scenario("cn2m")
    if name == "cn2m":
        return
    ns, dev = b.node_ns, b.an.host_ifname
    if name == "cn2m_csum_unfinished":
        cm.ns_sh(ns, "ethtool", "-K", dev, "tx", "on")
    elif name == "cn2m_whole":
        cm.ns_sh(ns, "ethtool", "-K", dev, "tx", "on", "tx-udp_tnl-segmentation", "on",
                 "tx-udp_tnl-csum-segmentation", "on")


def categorize(stack: list[str]) -> str:
    """One category for a sample's call chain (leaf first)."""
    if "bpf_clone_redirect" in stack:
        inner = stack[:stack.index("bpf_clone_redirect")]
        if any(f in ("skb_segment", "__skb_gso_segment", "skb_udp_tunnel_segment")
               for f in inner):
            return "copy: segmenting the wrapped super-packet (skb_segment, checksums)"
        if "veth_xmit" in inner:
            return "copy: veth transmit of the copies"
        if "pskb_expand_head" in inner and not any("mirror_wrap" in f for f in inner):
            return "copy: production skb's head made private (bpf_clone_redirect)"
        if any("mirror_wrap" in f for f in inner):
            if any("adjust_room" in f for f in inner):
                return "copy: wrap (adjust_room, with its head copy)"
            if any("fib" in f for f in inner):
                return "copy: FIB lookup"
            if any("store_bytes" in f for f in inner):
                return "copy: writing the headers (bpf_skb_store_bytes)"
            if any(f.startswith(("htab_", "array_map", "percpu_array", "__htab")) for f in inner):
                return "copy: wrapper's map lookups"
            return "copy: wrapper program, other (its own code, counters)"
        if "skb_clone" in inner:
            return "copy: skb_clone"
        return "copy: clone hand-off, other (mirror port transmit)"
    if "tcf_mirred_act" in stack:
        return "copy: tc mirred action (clone and transmit)"
    if any("mirror_wrap" in f for f in stack):
        return "copy: mirror port's far end (copies through the port)"
    if "nft_do_chain_netdev" in stack:
        return "copy: the analyzer's receive (up to its sink; udp64: the web pod's too)"
    if any(f.startswith("bpf_prog_") and "classify" in f for f in stack):
        return "classifier (not the clone)"
    if "packet_sendmsg" in stack or "tpacket_snd" in stack:
        return "production: trafgen's sending and the path to the pod"
    if "_copy_from_iter" in stack:
        return "production: sender's data copy"
    if "_copy_to_iter" in stack:
        return "production: receiver's data copy"
    if "tcp_sendmsg" in stack:
        return "production: sending (TCP, IP, veths, softirqs run by the sender)"
    if "tcp_recvmsg" in stack:
        return "production: receiving (TCP, ACKs)"
    return "other"


def profile(seconds: float, tmpdir: str, cpu: int | None = None) -> dict:
    data = os.path.join(tmpdir, "perf.data")
    where = ["-C", str(cpu)] if cpu is not None else ["-a"]
    r = subprocess.run(["perf", "record", "-q", *where, "-g", "-o", data, "--", "sleep",
                        str(seconds)], capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode:
        return {"error": (r.stderr or r.stdout).strip()[-300:]}
    out = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,sym"],
                         capture_output=True, text=True, timeout=300).stdout
    os.unlink(data)
    samples, cur = [], None
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            cur = (line.split()[0], [])
            samples.append(cur)
        elif cur is not None:
            p = line.split()
            if len(p) >= 2:
                cur[1].append(p[1].split("+")[0])
    ours = [s for s in samples if s[0] not in FOREIGN and not s[0].startswith("memfd")]
    idle = sum(1 for _, st in ours if st and st[0] in ("pv_native_safe_halt", "default_idle"))
    busy = len(ours) - idle
    cats = collections.Counter(categorize(st) for _, st in ours
                               if not (st and st[0] in ("pv_native_safe_halt",
                                                        "default_idle")))
    return {"samples": len(samples), "ours": len(ours), "idle": idle, "busy": busy,
            "foreign_share": round(1 - len(ours) / max(1, len(samples)), 3),
            "shares": {k: round(v / max(1, busy), 4) for k, v in cats.most_common()}}


def _profile_bulk(b: T.TcpBench, procs: cm.Procs, name: str, seconds: float) -> dict:
    _variant(b, name)
    p = procs.start(b.client.netns, "iperf3", "-c", b.web.ip, "-p", str(T.IPERF_PORT),
                    "-t", str(seconds + 2))
    try:
        time.sleep(0.7)
        with tempfile.TemporaryDirectory(prefix="cn2mbench") as tmp:
            return profile(seconds, tmp)
    finally:
        procs.stop(p, signal.SIGINT, wait=10)


def _profile_udp64(log) -> dict:
    """The 64-byte UDP mirror-all traffic of benchmarks/throughput.py, profiled with call
    chains on the CPU that sends it (trafgen and the softirqs that carry its packets):
    where each copy's cost lands on the production packet's CPU."""
    from . import throughput as TP

    out = {}
    procs = cm.Procs()
    with tempfile.TemporaryDirectory(prefix="cn2mbench") as tmp, cm.bench_lab() as lab, \
            cm.bench_node(lab) as node:
        b = TP.Bench(lab, node, procs, tmp)
        try:
            for name in ("cn2m_flow_all", "tc_mirred", "none"):
                b.enter(name)
                tg = procs.start(b.client.netns, "trafgen", "--dev", "eth0", "--conf",
                                 b.trafgen_cfg, "--cpus", "1", "--no-sock-mem",
                                 "--notouch-irq", "--no-cpu-stats")
                try:
                    time.sleep(0.3)
                    sender = TP._tree(tg.pid)[-1]
                    with open(f"/proc/{sender}/stat") as f:
                        cpu = int(f.read().rsplit(")", 1)[1].split()[36])
                    out[name] = profile(2.0, tmp, cpu)
                    out[name]["method"] = "perf record -C <trafgen's CPU> -g, 2 s of trafgen"
                finally:
                    procs.stop(tg, signal.SIGINT)
                    b.leave(name)
                log(f"  udp64 profile {name}: " + ", ".join(
                    f"{k} {v * 100:.1f}%" for k, v in list(out[name]["shares"].items())[:4]))
        finally:
            b.cleanup()
            procs.stop_all()
    return out


def run(quick: bool = False, log=print) -> dict:
    rounds = 1 if quick else 5
    bulk_s = 1 if quick else 2
    out = {"method": {"bulk": f"iperf3 -t {bulk_s}, {rounds} rounds, every variant in every "
                      "round in a rotating order",
                      "profile": "perf record -a -g, 3 s of iperf3 per scenario; samples of "
                      "the benchmark's own processes, categorized by call chain"},
           "machine": cm.machine(), "rounds": [], "profiles": {}}
    procs = cm.Procs()
    with cm.sigterm_as_exit(), cm.bench_lab() as lab, cm.bench_node(lab) as node:
        b = T.TcpBench(lab, node, procs, sockperf=False)
        try:
            for r in range(rounds):
                order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
                row = {}
                for name in order:
                    _variant(b, name)
                    row[name] = b.iperf(bulk_s)["gbps"]
                out["rounds"].append(row)
                log(f"  copy cost round {r + 1}: " + ", ".join(
                    f"{n} {row[n]:.2f}" for n in VARIANTS))
            if not quick:
                for name in ("cn2m", "tc_mirred", "off"):
                    out["profiles"][name] = _profile_bulk(b, procs, name, 3.0)
        finally:
            b.stop()
            procs.stop_all()
    if not quick:
        out["profiles_udp64"] = _profile_udp64(log)
    out["summary"] = {n: {"gbps": cm.summary([r[n] for r in out["rounds"]]),
                          "kept": cm.summary([r[n] / r["off"] for r in out["rounds"]
                                              if r["off"]])}
                      for n in VARIANTS}
    return out
