"""`make soak`: the agent under mixed traffic, policy churn and restarts, for a long while.

    .venv/bin/python -m benchmarks.soak --duration 600      # make soak (10 minutes)

A namespace lab (agent/lab.py) and the real agent CLI in file mode on node1. For the whole
run:
- traffic: a long-lived UDP stream client -> web (200 packets/s, sequence-numbered),
  pings, and a churn of short UDP flows (new source ports, 50 flows/s) that keeps the
  flow table filling and evicting;
- policy churn: the policy file is rewritten every --churn seconds (ports, rules added
  and removed, the analyzer switched between the in-cluster and the external one);
- restarts: the agent is killed with SIGKILL every --restart seconds and started again.

Every 2 s it samples the agent's memory (RSS) and descriptors, the flow table's
occupancy, the datapath's drop counters (node-wide and per reason), copies received at
the analyzers, and how many BPF programs and pins exist. At the end it removes the agent
with `cn2mirror uninstall` and checks that nothing leaked: no program of ours left
loaded, no pins, no namespaces, no links. Results: benchmarks/results/soak.json and
soak.png (memory, occupancy and drops over time).

Exit status 0 when nothing leaked and the agent's memory stayed bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml

from cn2mirror.agent import jmirror
from cn2mirror.agent.lab import CopyReceiver, Lab
from cn2mirror.agent.netns import entered
from cn2mirror.agent.pinned import PinnedMaps, sum_counters

from .common import RESULTS_DIR, sigterm_as_exit

OUR_PROGRAMS = ("classify_from_p", "classify_to_pod", "eval_continue", "mirror_wrap",
                "mirror_wrap_inl", "analyzer_port_r")  # the kernel keeps 15 characters


def our_programs() -> int:
    r = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    if r.returncode:
        return -1
    return sum(1 for p in json.loads(r.stdout or "[]") if p.get("name") in OUR_PROGRAMS)


def rss_kb(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Counter:
    """Copies arriving at one analyzer, counted (ten minutes of copies are not kept),
    and the sequence numbers of the UDP stream's copies."""

    def __init__(self, netns: str, port: int = 30030):
        self.copies = 0
        self.stream_seqs: set[int] = set()
        self._receiver = CopyReceiver(netns, self._copy, port, rcvbuf=8 << 20)

    def _copy(self, _now: float, data: bytes) -> None:
        self.copies += 1
        with contextlib.suppress(jmirror.NotJMirror):
            inner = jmirror.decode(data).inner
            if inner[9] == 17 and inner[22:24] == (5000).to_bytes(2, "big"):
                self.stream_seqs.add(int.from_bytes(inner[28:32], "big"))

    def close(self) -> None:
        self._receiver.close()


def objects(lab: Lab, step: int) -> list[dict]:
    """The cluster's objects at churn step ``step``."""
    dests = [
        {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "MirrorDestination",
         "metadata": {"name": "analyzer1",
                      "labels": {"core.juniper.net/analyzer-pod-selector": "analyzer1"}},
         "spec": {"juniperHeader": True}},
        {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "MirrorDestination",
         "metadata": {"name": "external"},
         "spec": {"externalAnalyzer": True, "analyzerIP": lab.external_ip}},
    ]
    rules = [{"ports": [{"protocol": "UDP", "port": 5000}],
              "secondaryActions": {"mirrorTo": "analyzer1"}},
             {"ports": [{"protocol": "UDP", "port": 6000, "endPort": 6000 + step % 50}],
              "secondaryActions": {"mirrorTo": ("analyzer1", "external")[step % 2]}}]
    if step % 3 == 0:
        rules.append({"ports": [{"protocol": "ICMP"}],
                      "secondaryActions": {"mirrorTo": "external"}})
    policy = {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "ContrailSecurityPolicy",
              "metadata": {"name": "soak", "namespace": "demo"},
              "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                       "rules": rules}}
    return lab.pod_objects() + dests + [policy]


def write_yaml(path: Path, objs: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(objs))
    os.replace(tmp, path)


class Traffic:
    def __init__(self, lab: Lab):
        client, web = lab.pods["client"], lab.pods["web"]
        self.web_ip = web.ip
        with entered(web.netns):
            self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.churn_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind((web.ip, 5000))
        self.churn_server.bind((web.ip, 6000))
        for s in (self.server, self.churn_server):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.client_ns = client.netns
        with entered(client.netns):
            self.stream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.stream.connect((web.ip, 5000))
        self.sent: list[tuple[float, int]] = []
        self.flows_opened = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._stream, self._churn, self._drain)]
        self.ping = subprocess.Popen(["ip", "netns", "exec", client.netns, "ping", "-q", "-i",
                                      "0.2", web.ip], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for t in self.threads:
            t.start()

    def _stream(self) -> None:
        seq = 0
        while not self.stop.wait(0.005):
            self.sent.append((time.monotonic(), seq))
            with contextlib.suppress(OSError):
                self.stream.send(seq.to_bytes(4, "big") + b"s" * 60)
            seq += 1

    def _churn(self) -> None:
        while not self.stop.wait(0.02):
            with entered(self.client_ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with contextlib.suppress(OSError):
                s.sendto(b"c" * 32, (self.web_ip, 6000))
            s.close()
            self.flows_opened += 1

    def _drain(self) -> None:
        while not self.stop.wait(0.05):
            for s in (self.server, self.churn_server):
                with contextlib.suppress(BlockingIOError, OSError):
                    while True:
                        s.recv(2048)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        self.ping.kill()
        self.ping.wait()
        for s in (self.server, self.churn_server, self.stream):
            s.close()


def start_agent(objdir: Path, lab: Lab, pin_root: str, state_dir: str, log) -> subprocess.Popen:
    argv = [sys.executable, "-m", "cn2mirror.cli.main", "agent", "--source", str(objdir),
            "--node", "node1", "--netns", lab.nodes["node1"].netns, "--pin-root", pin_root,
            "--state-dir", state_dir, "--poll-interval", "0.2", "--resync-interval", "5"]
    return subprocess.Popen(argv, stderr=log, stdout=log)


def wait_applied(state_dir: str, proc: subprocess.Popen, timeout: float = 90) -> bool:
    deadline = time.monotonic() + timeout
    path = os.path.join(state_dir, "status.json")
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            s = json.load(open(path))
            if s.get("ready") and s.get("reconciles", 0) >= 1:
                return True
        time.sleep(0.1)
    return False


def sample(pin_root: str, agent: subprocess.Popen | None) -> dict:
    out: dict = {"t": time.monotonic(), "rss_kb": None, "fds": None, "flows": None,
                 "drops": {}, "programs": our_programs()}
    if agent is not None and agent.poll() is None:
        out["rss_kb"], out["fds"] = rss_kb(agent.pid), fds(agent.pid)
    with contextlib.suppress(Exception):
        pm = PinnedMaps(pin_root)
        try:
            out["flows"] = sum(1 for _ in pm.map("flows").keys())
            total: dict[str, int] = {}
            for kind in ("rule", "iface", "dest"):
                for _, v in pm.map(f"stats_{kind}").items():
                    for reason, n in (sum_counters(v).drops or {}).items():
                        total[reason] = total.get(reason, 0) + n
            for reason, n in (pm.counters("node", 0).drops or {}).items():
                total[reason] = total.get(reason, 0) + n
            out["drops"] = {k: v for k, v in total.items() if v}
        finally:
            pm.close()
    return out


def plot(samples: list[dict], restarts: list[float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t0 = samples[0]["t"]
    ts = [(s["t"] - t0) / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(ts, [(s["rss_kb"] or 0) / 1024 for s in samples])
    axes[0].set_ylabel("agent RSS (MiB)")
    axes[1].plot(ts, [s["flows"] or 0 for s in samples])
    axes[1].set_ylabel("flow table entries")
    reasons = sorted({r for s in samples for r in s["drops"]})
    for r in reasons:
        axes[2].plot(ts, [s["drops"].get(r, 0) for s in samples], label=r)
    if reasons:
        axes[2].legend(fontsize=7)
    axes[2].set_ylabel("drops (cumulative)")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for r in restarts:
            ax.axvline((r - t0) / 60, color="grey", alpha=0.3, linewidth=0.8)
    fig.suptitle("cn2mirror soak: memory, flow table, drops (grey: kill -9 and restart)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run(duration: float, churn: float, restart_every: float, out: Path) -> dict:
    tag = uuid.uuid4().hex[:6]
    lab = Lab(prefix=f"cn2k{tag}")
    pin_root = f"/sys/fs/bpf/cn2m-soak-{tag}"
    state_dir = tempfile.mkdtemp(prefix="cn2m-soak-state-")
    objdir = Path(tempfile.mkdtemp(prefix="cn2m-soak-objects-"))
    programs_before = our_programs()
    samples: list[dict] = []
    restarts: list[float] = []
    log = tempfile.TemporaryFile()
    agent = traffic = a1 = ext = None
    result: dict = {}
    try:
        lab.up_default()
        step = 0
        write_yaml(objdir / "cluster.yaml", objects(lab, step))
        a1, ext = Counter(lab.pods["analyzer"].netns), Counter(lab.external)
        agent = start_agent(objdir, lab, pin_root, state_dir, log)
        if not wait_applied(state_dir, agent):
            raise RuntimeError("the agent did not apply its state")
        traffic = Traffic(lab)
        t_start = time.monotonic()
        next_churn, next_restart, next_sample = t_start + churn, t_start + restart_every, 0.0
        while (now := time.monotonic()) < t_start + duration:
            if now >= next_sample:
                samples.append(sample(pin_root, agent))
                next_sample = now + 2.0
            if now >= next_churn:
                step += 1
                write_yaml(objdir / "cluster.yaml", objects(lab, step))
                next_churn = now + churn
            if now >= next_restart:
                agent.send_signal(signal.SIGKILL)
                agent.wait()
                restarts.append(time.monotonic())
                agent = start_agent(objdir, lab, pin_root, state_dir, log)
                next_restart = now + restart_every
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited with {agent.returncode}")
            time.sleep(0.1)
        time.sleep(0.5)
        sent = [seq for t, seq in traffic.sent if t < time.monotonic() - 0.5]
        got = a1.stream_seqs
        missing = sorted(set(sent) - got)
        rss = [s["rss_kb"] for s in samples if s["rss_kb"]]
        result = {
            "duration_s": duration, "policy_changes": step, "restarts": len(restarts),
            "stream_sent": len(sent), "stream_copied": len(got & set(sent)),
            "stream_missing": len(missing),
            "short_flows_opened": traffic.flows_opened,
            "copies_at_analyzer": a1.copies, "copies_at_external": ext.copies,
            "agent_rss_mb": {"first": rss[0] / 1024 if rss else None,
                             "max": max(rss) / 1024 if rss else None,
                             "last": rss[-1] / 1024 if rss else None},
            "flow_table_max": max((s["flows"] or 0) for s in samples) if samples else 0,
            "drops_at_end": samples[-1]["drops"] if samples else {},
        }
    finally:
        if traffic is not None:
            traffic.close()
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(30)
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        for c in (a1, ext):
            if c is not None:
                c.close()
        un = subprocess.run([sys.executable, "-m", "cn2mirror.cli.main", "uninstall",
                             "--netns", lab.nodes["node1"].netns if "node1" in lab.nodes
                             else "", "--pin-root", pin_root, "--state-dir", state_dir,
                             "-o", "json"], capture_output=True, text=True)
        lab.down()
        with contextlib.suppress(OSError):
            objdir.joinpath("cluster.yaml").unlink()
            objdir.rmdir()
    leftover_ns = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                             text=True).stdout.split() if tag in n]
    result["uninstall"] = json.loads(un.stdout) if un.stdout.strip().startswith("{") \
        else {"error": un.stderr.strip()}
    result["leaks"] = {
        "programs_loaded": our_programs() - programs_before,
        "pins": os.path.exists(pin_root),
        "namespaces": leftover_ns,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"result": result, "samples": samples,
                                               "restarts": restarts}, indent=1))
    if samples:
        plot(samples, restarts, out / "soak.png")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    ap.add_argument("--churn", type=float, default=7, help="seconds between policy edits")
    ap.add_argument("--restart", type=float, default=45, help="seconds between kill -9s")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    with sigterm_as_exit():
        result = run(args.duration, args.churn, args.restart, args.out)
    print(json.dumps(result, indent=2))
    leaks = result["leaks"]
    rss = result["agent_rss_mb"]
    bounded = rss["max"] is not None and rss["max"] < 300
    ok = (not leaks["pins"] and not leaks["namespaces"] and leaks["programs_loaded"] <= 0
          and result["uninstall"].get("clean") and bounded)
    print("soak:", "nothing leaked, memory bounded" if ok else "PROBLEM (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
