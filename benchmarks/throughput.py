"""Packets per second through a pod's interface, in the namespace lab, with cn2mirror and
with the kernel's own copiers, every figure a ratio to "no program" in the same round.

Traffic: trafgen in the client pod sends one UDP flow of 64-byte frames to the web pod
(routed through the node: client veth -> node -> web veth). The web pod's eth0 counts
and drops them in an nft netdev ingress hook (production delivered); the analyzer pod's
eth0 does the same for copies (copies delivered). All the scenarios mirror the web pod's
interface, every packet, to the analyzer pod on the same node:

  none             nothing attached (the baseline of every ratio)
  cn2m_nomatch     cn2mirror attached, a policy on the interface matching nothing
                   (every packet: interface lookup, parse, flow-table lookup)
  cn2m_flow_all    cn2mirror, a policy matching every flow: jmirror copies (no copy
                   budget: every packet copied)
  cn2m_flow_all_budget  the same within the node's default copy budget
                   (layout.default_node_copy_budget): copies over it not made, counted
  cn2m_flow_all_budget_<N>k  the same within a node budget of N thousand copies/s: how
                   much production a lower budget buys back
  cn2m_port_all    cn2mirror, port mirroring (annotation) both ways: jmirror copies
  tc_mirred        tc u32 match-all + mirred egress mirror to the analyzer's veth
  nft_dup          nftables `dup to <analyzer> device <its veth>` in postrouting
  iptables_tee     iptables -t mangle ... -j TEE --gateway <analyzer>
  userspace        AF_PACKET in Python: read the pod's host veth, send each frame out
                   of the analyzer's veth

The kernel copiers send the frame (or packet) as it is; cn2mirror wraps each copy in
IP/UDP/jmirror (36 bytes), with mirror and session ids, and counts it.

Rounds run every scenario in a rotating order; each measurement is a window of steady
traffic (after a warm-up) read from the receivers' counters. A separate round with BPF
run-time statistics gives the programs' own ns per packet in this traffic.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time

from cn2mirror.agent.programmer import CopyBudget
from cn2mirror.agent.state import Direction

from . import common as cm

BUDGET_SWEEP = ("cn2m_flow_all_budget_25k", "cn2m_flow_all_budget_50k",
                "cn2m_flow_all_budget_100k")
SCENARIOS = ("none", "cn2m_nomatch", "cn2m_flow_all", "cn2m_flow_all_budget",
             *BUDGET_SWEEP, "cn2m_port_all", "tc_mirred", "nft_dup", "iptables_tee",
             "userspace")
QUICK_SCENARIOS = ("none", "cn2m_nomatch", "cn2m_flow_all", "cn2m_flow_all_budget",
                   "tc_mirred")
CN2M = ("cn2m_nomatch", "cn2m_flow_all", "cn2m_flow_all_budget", *BUDGET_SWEEP,
        "cn2m_port_all")

USERSPACE_COPIER = r"""
import socket, sys
src, dst = sys.argv[1], sys.argv[2]
rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: no global sysctl
rx.bind((src, 0))
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
tx.bind((dst, 0))
buf = bytearray(65536)
view = memoryview(buf)
print("ready", flush=True)
recv, send = rx.recv_into, tx.send
while True:
    n = recv(buf)
    send(view[:n])
"""


class Bench:
    def __init__(self, lab, node, procs: cm.Procs, tmp: str):
        self.lab, self.node, self.procs, self.tmp = lab, node, procs, tmp
        self.node_ns = lab.nodes["node1"].netns
        self.web, self.client, self.an = (lab.pods[n] for n in ("web", "client", "analyzer"))
        self.copier = None
        self.trafgen_cfg = os.path.join(tmp, "udp64.cfg")
        vmac = json.loads(cm.ns_sh(self.node_ns, "ip", "-j", "link", "show",
                                   self.client.host_ifname).stdout)[0]["address"]
        with open(self.trafgen_cfg, "w") as f:
            f.write(f"{{ eth(da={vmac}, sa={self.client.mac}), "
                    f"ipv4(saddr={self.client.ip}, daddr={self.web.ip}, ttl=64), "
                    f"udp(sp=40000, dp={cm.PROD_PORT}), fill(0x41, 18) }}\n")
        cm.install_sink(self.web.netns, f"udp dport {cm.PROD_PORT}")
        cm.install_sink(self.an.netns)

    # ------------------------------------------------------------------ scenarios
    def _no_cn2m(self):
        self.node.apply(cm.state(self.lab, interfaces=()))
        self._del_clsact()

    def _del_clsact(self):
        cm.tc_mirred_stop(self.node_ns, self.web.host_ifname, self.client.host_ifname)

    def enter(self, name: str) -> None:
        web_if, an_if = self.web.host_ifname, self.an.host_ifname
        if name == "cn2m_nomatch":
            self.node.apply(cm.state(self.lab, [cm.match_nothing_policy()]))
        elif name == "cn2m_flow_all":
            self.node.apply(cm.state(self.lab, [cm.mirror_all_policy()]))
        elif name.startswith("cn2m_flow_all_budget"):
            # The node's default budget, or N thousand copies/s (no bit budget).
            k = name.removeprefix("cn2m_flow_all_budget").strip("_").removesuffix("k")
            self.node.copy_budget = CopyBudget(int(k) * 1000, 0) if k else CopyBudget()
            self.node.apply(cm.state(self.lab, [cm.mirror_all_policy()]))
        elif name == "cn2m_port_all":
            self.node.apply(cm.state(self.lab, port_mirror=Direction.BOTH))
        else:
            self._no_cn2m()
        if name == "tc_mirred":
            cm.tc_mirred_start(self.node_ns, web_if, an_if)
        elif name == "nft_dup":
            cm.nft_dup_start(self.node_ns, web_if, self.an.ip, an_if)
        elif name == "iptables_tee":
            for chain, opt in (("POSTROUTING", "-o"), ("PREROUTING", "-i")):
                cm.ns_sh(self.node_ns, "iptables", "-t", "mangle", "-A", chain, opt, web_if,
                         "-j", "TEE", "--gateway", self.an.ip)
        elif name == "userspace":
            self.copier = self.procs.start(self.node_ns, sys.executable, "-c", USERSPACE_COPIER,
                                           web_if, an_if)
            line = self.copier.stdout.readline().decode().strip()
            if line != "ready":
                raise cm.BenchError(f"userspace copier did not start: {line!r}")

    def leave(self, name: str) -> None:
        self.node.copy_budget = cm.NO_COPY_BUDGET  # the other scenarios copy everything
        if name == "tc_mirred":
            self._del_clsact()
        elif name == "nft_dup":
            cm.nft_dup_stop(self.node_ns)
        elif name == "iptables_tee":
            # Flushing leaves the base chains hooked: remove the whole table.
            cm.ns_sh(self.node_ns, "iptables", "-t", "mangle", "-F", check=False)
            cm.ns_sh(self.node_ns, "nft", "delete", "table", "ip", "mangle", check=False)
        elif name == "userspace" and self.copier is not None:
            self.procs.stop(self.copier, signal.SIGKILL)
            self.copier = None

    def cleanup(self) -> None:
        for name in ("tc_mirred", "nft_dup", "iptables_tee", "userspace"):
            try:
                self.leave(name)
            except Exception:
                pass

    # ------------------------------------------------------------------ measuring
    def counts(self) -> tuple[int, int]:
        return cm.sink_count(self.web.netns), cm.sink_count(self.an.netns)

    def window(self, name: str, warmup: float, seconds: float, stats: bool = False) -> dict:
        """Traffic for warmup + seconds; rates from the steady window, accounting over the
        whole run (read after the pipeline has drained)."""
        web0, an0 = self.counts()
        dp0 = cm.datapath_counters(self.node) if name in CN2M else None
        port0 = cm.link_stats(self.node_ns, "cn2m-tx")["tx_packets"] if dp0 else 0
        links0 = self.links()
        progs0 = self.prog_stats() if stats else None
        cpu0 = _proc_cpu_s(self.copier.pid) if self.copier else None
        tg = self.procs.start(self.client.netns, "trafgen", "--dev", "eth0", "--conf",
                              self.trafgen_cfg, "--cpus", "1", "--no-sock-mem",
                              "--notouch-irq", "--no-cpu-stats")
        try:
            time.sleep(warmup)
            if tg.poll() is not None:
                raise cm.BenchError(f"trafgen exited: {tg.stderr.read().decode()[-500:]}")
            senders = _tree(tg.pid) + _ksoftirqd()
            t0 = time.monotonic()
            w0, a0 = self.counts()
            r0 = _runtime_ns(senders)
            t0 = (t0 + time.monotonic()) / 2
            time.sleep(seconds)
            t1 = time.monotonic()
            w1, a1 = self.counts()
            r1 = _runtime_ns(senders)
            t1 = (t1 + time.monotonic()) / 2
            cpu1 = _proc_cpu_s(self.copier.pid) if self.copier else None
        finally:
            out, err = self.procs.stop(tg, signal.SIGINT)
        time.sleep(0.2)  # let the backlogs drain
        web2, an2 = self.counts()
        res = {"prod_pps": (w1 - w0) / (t1 - t0), "copy_pps": (a1 - a0) / (t1 - t0),
               "cpu_ns_per_packet": (r1 - r0) / max(1, w1 - w0),
               "window_s": round(t1 - t0, 3), "prod_total": web2 - web0,
               "copies_total": an2 - an0, "trafgen_sent": _trafgen_sent(out + err)}
        if cpu0 is not None:
            # The copier runs on the other CPU: its own CPU time per copy delivered.
            res["copier_cpu_share"] = (cpu1 - cpu0) / (t1 - t0)
            res["copier_cpu_ns_per_copy"] = (cpu1 - cpu0) * 1e9 / max(1, a1 - a0)
        links1 = self.links()
        res["drops"] = {k: links1[k] - links0[k] for k in links0 if links1[k] - links0[k]}
        if dp0 is not None:
            d = cm.counters_delta(cm.datapath_counters(self.node), dp0)
            # Copies that crossed the mirror port's veth (the rest were wrapped inline).
            through_port = cm.link_stats(self.node_ns, "cn2m-tx")["tx_packets"] - port0
            res["datapath"] = {"cloned": d["cloned"], "sent": d["packets"],
                               "truncated": d["truncated"], "through_port": through_port,
                               "drops": {k: v for k, v in d["drops"].items() if v}}
        if stats:
            p1 = self.prog_stats()
            res["bpf_stats"] = {n: {"runs": p1[n][0] - progs0[n][0],
                                    "ns_per_run": ((p1[n][1] - progs0[n][1]) /
                                                   (p1[n][0] - progs0[n][0]))
                                    if p1[n][0] - progs0[n][0] else None}
                                for n in p1}
        return res

    def profile(self, name: str, seconds: float = 2.0) -> dict | None:
        """perf on the CPU that sends (and, in softirq, carries) the traffic."""
        tg = self.procs.start(self.client.netns, "trafgen", "--dev", "eth0", "--conf",
                              self.trafgen_cfg, "--cpus", "1", "--no-sock-mem",
                              "--notouch-irq", "--no-cpu-stats")
        try:
            time.sleep(0.3)
            sender = _tree(tg.pid)[-1]
            with open(f"/proc/{sender}/stat") as f:
                cpu = int(f.read().rsplit(")", 1)[1].split()[36])
            return cm.perf_profile(seconds, cpu, self.tmp)
        finally:
            self.procs.stop(tg, signal.SIGINT)

    def links(self) -> dict:
        """Drop counters on the way: veth drops (backlog full) on every hop."""
        out = {}
        for ns, ifname, key in ((self.node_ns, self.web.host_ifname, "web_veth"),
                                (self.node_ns, self.an.host_ifname, "analyzer_veth"),
                                (self.node_ns, self.client.host_ifname, "client_veth"),
                                (self.node_ns, "cn2m-tx", "mirror_tx"),
                                (self.node_ns, "cn2m-rx", "mirror_rx")):
            try:
                s = cm.link_stats(ns, ifname)
            except cm.BenchError:
                continue
            out[f"{key}_tx_dropped"] = s["tx_dropped"]
            out[f"{key}_rx_dropped"] = s["rx_dropped"]
        return out

    def prog_stats(self) -> dict:
        root = self.node.datapath.pin_root
        return {n: cm.prog_stats(f"{root}/prog_{n}")
                for n in ("classify_to_pod", "classify_from_pod", "mirror_wrap_inline",
                          "mirror_wrap")}


def _tree(pid: int) -> list[int]:
    """A process and its descendants (trafgen forks its senders)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _ksoftirqd() -> list[int]:
    """Softirq work the kernel defers runs in ksoftirqd, not in the sender."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().startswith("ksoftirqd/"):
                        out.append(int(d))
            except OSError:
                pass
    return out


def _runtime_ns(pids: list[int]) -> int:
    """CPU time the tasks have run (scheduler clock, ns; includes the softirqs run in
    their context: this kernel has no IRQ time accounting)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _trafgen_sent(text: str) -> int | None:
    for line in text.splitlines():
        if "packets outgoing" in line:
            try:
                return int(line.split()[0])
            except ValueError:
                return None
    return None


def run(quick: bool = False, log=print) -> dict:
    scenarios = QUICK_SCENARIOS if quick else SCENARIOS
    rounds = 1 if quick else 6
    warmup, seconds = (0.3, 0.5) if quick else (0.3, 1.0)
    out = {"method": {"generator": "trafgen, 1 CPU, one UDP flow, 64-byte frames",
                      "rounds": rounds, "window_s": seconds, "warmup_s": warmup,
                      "baseline": "none (same round)", "scenarios": list(scenarios)},
           "machine": cm.machine(), "rounds": []}
    procs = cm.Procs()
    with cm.sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="cn2mbench") as tmp, \
            cm.bench_lab() as lab, cm.bench_node(lab) as node:
        b = Bench(lab, node, procs, tmp)
        out["lab_prefix"] = lab.prefix
        try:
            for r in range(rounds):
                order = list(scenarios[r % len(scenarios):] + scenarios[: r % len(scenarios)])
                row = {}
                for name in order:
                    b.enter(name)
                    try:
                        row[name] = b.window(name, warmup, seconds)
                    finally:
                        b.leave(name)
                out["rounds"].append(row)
                log(f"  pps round {r + 1}/{rounds}: " + ", ".join(
                    f"{n} {row[n]['prod_pps'] / 1000:.0f}k" for n in scenarios))
            # Programs' own cost in this traffic (run-time statistics on: not timed).
            stats = {}
            with cm.bpf_run_stats():
                for name in (CN2M if not quick else ("cn2m_flow_all",)):
                    b.enter(name)
                    try:
                        stats[name] = b.window(name, warmup, seconds, stats=True)["bpf_stats"]
                    finally:
                        b.leave(name)
            out["bpf_stats"] = stats
            if not quick:
                prof = {}
                for name in ("none", "cn2m_nomatch", "cn2m_flow_all", "tc_mirred"):
                    b.enter(name)
                    try:
                        prof[name] = b.profile(name)
                    finally:
                        b.leave(name)
                out["perf"] = prof
        finally:
            b.cleanup()
            procs.stop_all()
    out["machine"]["cpu_busy_after"] = round(cm.cpu_busy(), 3)
    out["summary"] = summarize(out["rounds"], scenarios)
    out["copy_budget"] = budget_summary(out["summary"])
    log("  " + out["copy_budget"]["text"])
    return out


def budget_summary(s: dict) -> dict:
    """Production under a mirror-everything policy, as a ratio to no mirroring, with the
    node's default copy budget, without any budget, and with tc mirred (issue 15)."""
    def ratio(name: str) -> float | None:
        return s[name]["prod_ratio"]["median"] if name in s else None

    out = {"default_pps": CopyBudget().pps, "default_bps": CopyBudget().bps,
           "prod_ratio_default_budget": ratio("cn2m_flow_all_budget"),
           "prod_ratio_unlimited": ratio("cn2m_flow_all"),
           "prod_ratio_tc_mirred": ratio("tc_mirred"),
           "copy_pps_default_budget": s.get("cn2m_flow_all_budget", {}).get(
               "copy_pps", {}).get("median")}
    out["sweep"] = {name.rsplit("_", 1)[1]: {
        "prod_ratio": ratio(name),
        "copy_pps": s.get(name, {}).get("copy_pps", {}).get("median")}
        for name in BUDGET_SWEEP if name in s}
    fmt = {k: "-" if not isinstance(v, int | float) else f"{v:.2f}" for k, v in out.items()}
    out["text"] = (f"mirror everything, production vs none: default budget "
                   f"({out['default_pps']:,} copies/s, {out['default_bps'] / 1e9:g} Gbit/s) "
                   f"{fmt['prod_ratio_default_budget']}, no budget "
                   f"{fmt['prod_ratio_unlimited']}, tc mirred {fmt['prod_ratio_tc_mirred']}; "
                   f"copies/s within the budget {out['copy_pps_default_budget'] or 0:,.0f}"
                   + "".join(f"; budget {k}/s: production {v['prod_ratio']:.2f}, copies "
                             f"{v['copy_pps'] or 0:,.0f}/s" for k, v in out["sweep"].items()
                             if v["prod_ratio"] is not None))
    return out


def summarize(rounds: list[dict], scenarios) -> dict:
    s = {}
    for name in scenarios:
        prod = [r[name]["prod_pps"] for r in rounds]
        base = [r["none"]["prod_pps"] for r in rounds]
        copies = [r[name]["copies_total"] / r[name]["prod_total"]
                  if r[name]["prod_total"] else 0.0 for r in rounds]
        added = [1e9 / p - 1e9 / b for p, b in zip(prod, base, strict=True) if p and b]
        cpu = [r[name]["cpu_ns_per_packet"] for r in rounds]
        cpu_base = [r["none"]["cpu_ns_per_packet"] for r in rounds]
        s[name] = {"prod_pps": cm.summary(prod), "prod_ratio": cm.summary(cm.ratios(prod, base)),
                   "added_ns_per_packet": cm.summary(added),
                   "cpu_ns_per_packet": cm.summary(cpu),
                   "cpu_ratio": cm.summary(cm.ratios(cpu, cpu_base)),
                   "cpu_added_ns": cm.summary([c - b for c, b in zip(cpu, cpu_base,
                                                                      strict=True)]),
                   "copies_per_prod": cm.summary(copies),
                   "copy_pps": cm.summary([r[name]["copy_pps"] for r in rounds]),
                   "copies_ratio_to_none_prod": cm.summary(
                       cm.ratios([r[name]["copy_pps"] for r in rounds], base))}
        if name == "userspace":
            s[name]["copier_cpu_ns_per_copy"] = cm.summary(
                [r[name].get("copier_cpu_ns_per_copy") for r in rounds])
            s[name]["copier_cpu_share"] = cm.summary(
                [r[name].get("copier_cpu_share") for r in rounds])
        if name in CN2M:
            tot = {"cloned": 0, "sent": 0, "through_port": 0, "delivered": 0, "prod": 0,
                   "drops": {}}
            for r in rounds:
                d = r[name].get("datapath", {})
                tot["cloned"] += d.get("cloned", 0)
                tot["sent"] += d.get("sent", 0)
                tot["through_port"] += d.get("through_port", 0)
                tot["delivered"] += r[name]["copies_total"]
                tot["prod"] += r[name]["prod_total"]
                for k, v in d.get("drops", {}).items():
                    tot["drops"][k] = tot["drops"].get(k, 0) + v
            s[name]["accounting"] = tot
    return s
