"""What the benchmarks share: the namespace lab and the agent's node in it, interleaved
statistics, counters (nft, links, the datapath's own), BPF run-time statistics, and
cleanup that runs even on failure or SIGTERM.

Everything is created inside namespaces the benchmark makes (addresses from the lab's
198.18.0.0/15); the only things outside them are the pins under /sys/fs/bpf/<lab
prefix>, removed on exit, and BPF run-time statistics, enabled through a file
descriptor (BPF_ENABLE_STATS) that the kernel drops when the process exits.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from cn2mirror.agent import layout as L
from cn2mirror.agent.lab import Lab
from cn2mirror.agent.node import Node
from cn2mirror.agent.pinned import sum_counters
from cn2mirror.agent.programmer import CopyBudget
from cn2mirror.agent.state import (
    Cidr,
    DeliveryMode,
    Destination,
    Direction,
    Interface,
    NodeState,
    Policy,
    PortMirror,
    PortRange,
    Rule,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
JMIRROR_PORT = 30030
PROD_PORT = 5001
WEB_KEY = "demo/web/eth0"
CLIENT_KEY = "demo/client/eth0"
ANALYZER = "an1"
NO_COPY_BUDGET = CopyBudget(0, 0)


class BenchError(RuntimeError):
    pass


# ------------------------------------------------------------------ statistics
def median(values) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")


def summary(values) -> dict:
    """Median and spread of per-round values."""
    vals = sorted(float(v) for v in values if v is not None)
    if not vals:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "n": 0}
    q = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else vals * 3
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1],
            "q1": q[0], "q3": q[2], "n": len(vals)}


def ratios(values, baselines) -> list[float]:
    """Per-round ratios value/baseline (rounds paired by index)."""
    return [v / b for v, b in zip(values, baselines, strict=True) if b]


# ------------------------------------------------------------------ processes
def sh(*cmd: str, check: bool = True, timeout: float | None = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise BenchError(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip()}")
    return r


def ns_sh(ns: str, *cmd: str, check: bool = True, timeout: float | None = 60):
    return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)


class Procs:
    """Background processes started by a benchmark; each ends by its own id."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, ns: str | None, *cmd: str, **kw) -> subprocess.Popen:
        argv = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGINT, wait: float = 5.0):
        """Signal one process (the session it leads: `ip netns exec` execs the command,
        so the group is that process alone) and reap it; returns (stdout, stderr)."""
        out = err = ""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        try:
            out, err = p.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        if p in self.procs:
            self.procs.remove(p)
        return (out.decode(errors="replace") if isinstance(out, bytes) else out or "",
                err.decode(errors="replace") if isinstance(err, bytes) else err or "")

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p, signal.SIGKILL, wait=2.0)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so that every `finally` cleans up."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------ lab and node
@contextlib.contextmanager
def bench_lab(pods=("web", "client", "analyzer")) -> Iterator[Lab]:
    """One node (routed, Calico-style) with pods on it: web .2, client .3, analyzer .10."""
    hosts = {"web": 2, "client": 3, "analyzer": 10}
    lab = Lab(prefix="cn2mb" + uuid.uuid4().hex[:5])
    try:
        lab.add_node("node1", 1)
        for name in pods:
            lab.add_pod(name, "node1", hosts[name],
                        namespace="tools" if name == "analyzer" else "demo")
        yield lab
    finally:
        lab.down()


@contextlib.contextmanager
def bench_node(lab: Lab) -> Iterator[Node]:
    """The agent's node in the lab's node1, pinned under a pin root of its own."""
    pin_root = f"/sys/fs/bpf/{lab.prefix}"
    # No copy budget: the benchmarks measure what copying every packet costs (the
    # throughput benchmark's cn2m_flow_all_budget sets the node default for itself).
    node = Node(pin_root, netns=lab.nodes["node1"].netns, copy_budget=NO_COPY_BUDGET)
    try:
        node.start()
        yield node
    finally:
        try:
            node.stop(cleanup=True)
        finally:
            if os.path.isdir(pin_root):
                shutil.rmtree(pin_root, ignore_errors=True)


def pod_interface(lab: Lab, pod: str, session_id: int, port_mirror: Direction | None = None,
                  mirror_id: int = 0) -> Interface:
    p = lab.pods[pod]
    pms = ()
    if port_mirror is not None:
        pms = (PortMirror(ANALYZER, port_mirror, mirror_id),)
    return Interface(f"{p.namespace}/{p.name}", "eth0", session_id, (p.ip, p.ip6), p.mac,
                     p.host_ifname, pms)


def analyzer_destination(lab: Lab) -> Destination:
    return Destination(ANALYZER, DeliveryMode.JMIRROR, analyzer_ip=lab.pods["analyzer"].ip,
                       udp_port=JMIRROR_PORT, analyzer_pod="tools/analyzer")


def state(lab: Lab, policies=(), port_mirror: Direction | None = None,
          interfaces=("web",)) -> NodeState:
    ifaces = tuple(pod_interface(lab, name, 100 + i,
                                 port_mirror if name == "web" else None, 900)
                   for i, name in enumerate(interfaces))
    return NodeState("node1", ifaces, tuple(policies), (analyzer_destination(lab),))


def mirror_all_policy(applies_to=(WEB_KEY,), mirror_id: int = 1) -> Policy:
    """One rule matching every flow, mirroring it (a policy-level mirrorTo)."""
    return Policy("bench/mirror-all", (Rule("bench/mirror-all", 0, None, None, (),
                                            ANALYZER, mirror_id),),
                  frozenset(applies_to))


def match_nothing_policy(applies_to=(WEB_KEY,)) -> Policy:
    """A policy on the interface whose one rule matches no flow of the benchmark (TCP to
    a documentation-range pod that does not exist): every flow is looked up, none copied."""
    return Policy("bench/nothing", (Rule("bench/nothing", 0, None,
                                         (Cidr("198.19.254.254/32"),),
                                         (PortRange(6, 9, 9),), ANALYZER, 2),),
                  frozenset(applies_to))


# ------------------------------------------------------------------ counters
def nft(ns: str, script: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script,
                       capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise BenchError(f"nft in {ns}: {r.stderr.strip()}\n{script}")


# --- The baselines: tc mirred and nft dup copying a pod's traffic to the analyzer ----------
NFT_DUP_TABLE = "cn2mbenchdup"


def tc_mirred_start(node_ns: str, pod_if: str, analyzer_if: str) -> None:
    """Both directions of ``pod_if`` mirrored by tc (clsact, u32 match-all, mirred) out of
    the analyzer's host-side veth: copies of the frames, unwrapped."""
    ns_sh(node_ns, "tc", "qdisc", "add", "dev", pod_if, "clsact")
    for d in ("ingress", "egress"):
        ns_sh(node_ns, "tc", "filter", "add", "dev", pod_if, d, "protocol", "all", "prio", "1",
              "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev",
              analyzer_if)


def tc_mirred_stop(node_ns: str, *pod_ifs: str) -> None:
    for ifname in pod_ifs:
        ns_sh(node_ns, "tc", "qdisc", "del", "dev", ifname, "clsact", check=False)


def nft_dup_start(node_ns: str, pod_if: str, analyzer_ip: str, analyzer_if: str) -> None:
    """Both directions of ``pod_if`` duplicated by nftables (dup to) to the analyzer."""
    nft(node_ns, f"""
table ip {NFT_DUP_TABLE} {{
  chain post {{ type filter hook postrouting priority 0;
    oifname "{pod_if}" dup to {analyzer_ip} device "{analyzer_if}"; }}
  chain pre {{ type filter hook prerouting priority 0;
    iifname "{pod_if}" dup to {analyzer_ip} device "{analyzer_if}"; }}
}}""")


def nft_dup_stop(node_ns: str) -> None:
    ns_sh(node_ns, "nft", "delete", "table", "ip", NFT_DUP_TABLE, check=False)


def install_sink(ns: str, what: str = "meta l4proto udp", drop: bool = True) -> None:
    """A named counter on the pod's eth0 ingress (netdev hook, before IP), counting (and by
    default dropping) what matches: the cheapest possible receiver, the same in every
    scenario."""
    verdict = "drop" if drop else "accept"
    nft(ns, f"""
table netdev cn2mbench {{
  counter seen {{ }}
  chain in {{
    type filter hook ingress device "eth0" priority -500;
    {what} counter name "seen" {verdict}
  }}
}}
""")


def sink_count(ns: str) -> int:
    r = ns_sh(ns, "nft", "-j", "list", "counter", "netdev", "cn2mbench", "seen")
    for item in json.loads(r.stdout)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    raise BenchError(f"no sink counter in {ns}")


def link_stats(ns: str, ifname: str) -> dict:
    r = ns_sh(ns, "ip", "-j", "-s", "link", "show", "dev", ifname)
    s = json.loads(r.stdout)[0]["stats64"]
    return {"rx_packets": s["rx"]["packets"], "rx_dropped": s["rx"]["dropped"],
            "tx_packets": s["tx"]["packets"], "tx_dropped": s["tx"]["dropped"]}


def datapath_counters(node: Node) -> dict:
    """Node-wide totals of the datapath's own counters (rules, interfaces, node)."""
    maps = node.datapath.maps
    total = {"cloned": 0, "packets": 0, "truncated": 0, "fragmented": 0, "gso_wrapped": 0,
             "gso_by_segment": 0, "drops": {d.name.lower(): 0 for d in L.Drop}}
    for _k, v in maps["stats_rule"].items():
        t = sum_counters(v)
        for f in ("cloned", "packets", "truncated", "fragmented", "gso_wrapped",
                  "gso_by_segment"):
            total[f] += getattr(t, f)
        for d, n in t.drops.items():
            total["drops"][d] += n
    node_t = sum_counters(maps["stats_node"].lookup(bytes(4)) or [])
    for d, n in node_t.drops.items():
        total["drops"][d] += n
    # FLOW_LIMIT is counted per interface, not per rule.
    for _k, v in maps["stats_iface"].items():
        total["drops"]["flow_limit"] += sum_counters(v).drops["flow_limit"]
    return total


def counters_delta(after: dict, before: dict) -> dict:
    out = {k: after[k] - before[k] for k in ("cloned", "packets", "truncated", "fragmented",
                                             "gso_wrapped", "gso_by_segment")}
    out["drops"] = {k: after["drops"][k] - before["drops"][k] for k in after["drops"]}
    return out


# ------------------------------------------------------------------ BPF run-time stats
@contextlib.contextmanager
def bpf_run_stats() -> Iterator[None]:
    """Kernel BPF run-time statistics (run_time_ns, run_cnt per program) while the block
    runs: BPF_ENABLE_STATS gives a file descriptor, and closing it turns them off again
    (the kernel closes it if we die), so kernel.bpf_stats_enabled is never left on."""
    from cn2mirror.agent.bpfsys import lib

    fn = lib().bpf_enable_stats
    fn.argtypes = [C.c_int]
    fd = fn(0)  # BPF_STATS_RUN_TIME
    if fd < 0:
        raise BenchError(f"BPF_ENABLE_STATS failed: {os.strerror(C.get_errno() or -fd)}")
    try:
        yield
    finally:
        os.close(fd)


def prog_stats(pin_path: str) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of a pinned program."""
    r = sh("bpftool", "-j", "prog", "show", "pinned", pin_path)
    info = json.loads(r.stdout)
    return int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0))


# ------------------------------------------------------------------ profiles
def perf_profile(seconds: float, cpu: int | None, tmpdir: str, top: int = 30) -> dict | None:
    """A flat `perf` profile (cpu-clock samples) of one CPU, or all: top symbols, and the
    shares of the BPF programs and of the BPF map code. None when perf is missing."""
    if not shutil.which("perf"):
        return None
    data = os.path.join(tmpdir, "perf.data")
    where = ["-C", str(cpu)] if cpu is not None else ["-a"]
    r = subprocess.run(["perf", "record", "-q", *where, "-o", data, "--", "sleep",
                        str(seconds)], capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode:
        return {"error": (r.stderr or r.stdout).strip()[-300:]}
    r = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "symbol",
                        "--stdio", "--percent-limit", "0.2"], capture_output=True, text=True,
                       timeout=120)
    os.unlink(data)
    rows = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and parts[1].startswith("["):
            try:
                rows.append((float(parts[0].rstrip("%")), parts[2]))
            except ValueError:
                continue
    bpf_prog = sum(p for p, s in rows if s.startswith("bpf_prog_"))
    maps = sum(p for p, s in rows if s.startswith(("htab_", "__htab", "lookup_nulls_elem",
                                                   "trie_lookup", "bpf_lru", "__bpf_lru",
                                                   "bpf_map", "array_map", "percpu_array")))
    return {"cpu": cpu, "seconds": seconds, "top": rows[:top],
            "bpf_programs_pct": round(bpf_prog, 2), "bpf_maps_pct": round(maps, 2)}


# ------------------------------------------------------------------ machine
def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over `interval` (everyone's work: a noise indicator)."""

    def read():
        f = open("/proc/stat").readline().split()[1:]
        vals = [int(x) for x in f]
        idle = vals[3] + vals[4]
        return sum(vals), idle

    t0, i0 = read()
    time.sleep(interval)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def machine() -> dict:
    return {"kernel": os.uname().release, "cpus": os.cpu_count(),
            "loadavg": open("/proc/loadavg").read().split()[:3],
            "cpu_busy_before": round(cpu_busy(), 3)}
