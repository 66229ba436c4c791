"""The agent end to end in namespaces: YAML files in, real traffic, jmirror copies out.

Long-lived flows (a UDP stream with fixed ports, pings with one ICMP id) keep running
while policies are applied, edited and deleted: the copies must follow every change, with
the compiler's mirror and session ids, and nothing a rule does not select may be copied.
A restarted agent (the CLI, in a subprocess) must adopt the pinned datapath with no copy
lost while no agent runs.
"""

from __future__ import annotations

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

import pytest
import yaml

from cn2mirror.agent import jmirror
from cn2mirror.agent import layout as L
from cn2mirror.agent.compiler import compile_node, rule_key
from cn2mirror.agent.filesource import FileSource
from cn2mirror.agent.lab import CopyReceiver
from cn2mirror.agent.netns import entered
from cn2mirror.agent.node import Node
from cn2mirror.agent.pinned import PinnedMaps
from cn2mirror.agent.runtime import Agent
from cn2mirror.agent.snapshot import load_paths

from .builders import mirror_policy, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

GRACE = 0.3  # copies already on their way when a change is applied
INTERVAL = 0.02  # the UDP streams: 50 packets a second


# ---------------------------------------------------------------------------- helpers


class Analyzer:
    """An analyzer that decodes and keeps every jmirror copy it gets:
    (arrival, mirror id, session id, flow_of(inner), inner)."""

    def __init__(self, netns: str, port: int = 30030):
        self.copies: list[tuple[float, int, int, tuple, bytes]] = []
        self.not_jmirror = 0
        self._receiver = CopyReceiver(netns, self._copy, port)

    def _copy(self, now: float, data: bytes) -> None:
        try:
            d = jmirror.decode(data, strict=True)
        except jmirror.NotJMirror:
            self.not_jmirror += 1
            return
        self.copies.append((now, d.mirror_id, d.session_id, flow_of(d.inner), d.inner))

    def between(self, t0: float, t1: float = float("inf")) -> list:
        return [c for c in list(self.copies) if t0 <= c[0] < t1]

    def close(self) -> None:
        self._receiver.close()


def flow_of(ip: bytes) -> tuple:
    """(protocol, src, sport, dst, dport) of an IPv4 packet; ICMP echo id as both ports."""
    proto, at = ip[9], (ip[0] & 0x0F) * 4
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    l4 = ip[at:]
    if proto in (6, 17):
        return proto, src, int.from_bytes(l4[0:2], "big"), dst, int.from_bytes(l4[2:4], "big")
    if proto == 1 and l4[0] in (0, 8):
        ident = int.from_bytes(l4[4:6], "big")
        return proto, src, ident, dst, ident
    return proto, src, None, dst, None


class UdpStream:
    """client -> server:port every INTERVAL from one socket (one flow), sequence-numbered;
    the server side listens, so nothing answers with port unreachable."""

    def __init__(self, client_ns: str, server_ns: str, ip: str, port: int):
        with entered(server_ns):
            self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind((ip, port))
        self.server.setblocking(False)
        with entered(client_ns):
            self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.connect((ip, port))
        self.sport, self.port = self.client.getsockname()[1], port
        self.sent: list[tuple[float, int]] = []
        self.received: set[int] = set()  # the sequence numbers that reached the server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        while not self._stop.wait(INTERVAL):
            self.sent.append((time.monotonic(), seq))
            with contextlib.suppress(OSError):  # a full socket buffer under a flood
                self.client.send(seq.to_bytes(4, "big") + b"p" * 60)
            seq += 1
            with contextlib.suppress(BlockingIOError):
                while True:
                    data, (_, sport) = self.server.recvfrom(2048)
                    if sport == self.sport:
                        self.received.add(int.from_bytes(data[:4], "big"))

    def key(self, src: str, dst: str) -> tuple:
        return 17, src, self.sport, dst, self.port

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()
        self.server.close()


def seq_of(inner: bytes) -> int:
    at = (inner[0] & 0x0F) * 4 + 8
    return int.from_bytes(inner[at:at + 4], "big")


def md_objects(lab) -> list[dict]:
    return [
        {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "MirrorDestination",
         "metadata": {"name": "analyzer1",
                      "labels": {"core.juniper.net/analyzer-pod-selector": "analyzer1"}},
         "spec": {"juniperHeader": True}},
        {"apiVersion": "core.contrail.juniper.net/v4", "kind": "MirrorDestination",
         "metadata": {"name": "external"},
         "spec": {"externalAnalyzer": True, "analyzerIP": lab.external_ip}},
    ]


def stream_objects(tmp_path, lab):
    """A source directory: the lab's pods and namespaces, its two MirrorDestinations and
    a policy mirroring web's UDP 5000 (the UdpStream's port) to analyzer1."""
    objects = tmp_path / "objects"
    objects.mkdir()
    write_yaml(objects / "all.yaml", lab.pod_objects() + md_objects(lab) + [
        policy(rule([{"protocol": "UDP", "port": 5000}], "analyzer1"))])
    return objects


def policy(*rules: dict) -> dict:
    """Policy demo/p on web with these rules."""
    return mirror_policy("p", "demo", "web", None, rules=list(rules))


def rule(ports: list[dict], mirror_to: str, src_app: str | None = "client") -> dict:
    r: dict = {"ports": ports, "secondaryActions": {"mirrorTo": mirror_to}}
    if src_app:
        r["srcEP"] = {"endPoints": [{"podSelector": {"matchLabels": {"app": src_app}}}]}
    return r


def write_yaml(path, objs) -> None:
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump_all(objs, f)
    os.replace(tmp, path)


def compiled(objects_dir) -> tuple[dict[int, str], int]:
    """The compiler's own ids for the files: mirror id -> "policy rule i", and web's
    session id."""
    snapshot, errors = load_paths([objects_dir])
    assert not errors
    state = compile_node(snapshot, "node1")
    mids = {r.mirror_id: rule_key(p.name, r.index) for p in state.policies for r in p.rules}
    web = state.interface("demo/web/eth0")
    return mids, web.session_id if web else 0


def start_ping(netns: str, dst: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", netns, "ping", "-i", "0.05", dst],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tc_filters(netns: str, dev: str) -> str:
    out = ""
    for parent in ("ingress", "egress"):
        out += subprocess.run(["ip", "netns", "exec", netns, "tc", "filter", "show", "dev",
                               dev, parent], capture_output=True, text=True).stdout
    return out


def classifiers_on(netns: str, dev: str) -> str:
    """The programs on a device's tc hooks, legacy filters and tcx links alike (the
    kernel's names, cut to 15 characters), as one string to search."""
    from cn2mirror.agent import bpfsys

    found = tc_filters(netns, dev)
    with entered(netns):
        idx = socket.if_nametoindex(dev)
        for hook in (bpfsys.BPF_TCX_INGRESS, bpfsys.BPF_TCX_EGRESS):
            with contextlib.suppress(bpfsys.BpfError):
                found += " ".join(bpfsys.prog_name(i) for i in bpfsys.tcx_query(idx, hook)[0])
    return found


def link_exists(netns: str, dev: str) -> bool:
    return subprocess.run(["ip", "-n", netns, "link", "show", dev],
                          capture_output=True).returncode == 0


# ---------------------------------------------------------------------------- in-process


def test_existing_flows_follow_apply_edit_delete(lab, pin_root, state_dir, tmp_path):
    client, web = lab.pods["client"], lab.pods["web"]
    node1 = lab.nodes["node1"].netns
    objects = tmp_path / "objects"
    objects.mkdir()
    write_yaml(objects / "pods.yaml", lab.pod_objects())
    write_yaml(objects / "destinations.yaml", md_objects(lab))
    policy_file = objects / "policy.yaml"

    a1 = Analyzer(lab.pods["analyzer"].netns)
    # "external" is in CN2's group without udpPort: CN2's default port, 8099.
    ext = Analyzer(lab.external, port=8099)
    s5000 = UdpStream(client.netns, web.netns, web.ip, 5000)
    s7000 = UdpStream(client.netns, web.netns, web.ip, 7000)
    ping = start_ping(client.netns, web.ip)
    agent = Agent(FileSource([objects], poll_interval=0.1, settle=0.05), "node1",
                  Node(pin_root, netns=node1), state_dir)
    try:
        agent.start()
        assert agent.wait_for(1, 30) and agent.last_report.ok
        assert agent.ready() and agent.last_state.policies == ()
        f5000 = s5000.key(client.ip, web.ip)
        f7000 = s7000.key(client.ip, web.ip)

        def seen(analyzer, t0, t1=float("inf")) -> set:
            """(mirror id, session id, flow) of the copies that arrived in [t0, t1)."""
            return {(mid, sid, f) for _, mid, sid, f, _ in analyzer.between(t0, t1)}

        def applied(predicate, what):
            wait_until(lambda: agent.last_state is not None and predicate(agent.last_state)
                       and agent.last_report.ok, 10, what)
            return time.monotonic()

        def phase(seconds=1.0):
            time.sleep(seconds)
            return time.monotonic()

        # No policy: nothing is mirrored, although traffic flows.
        t0 = time.monotonic()
        t0_end = phase(0.5)
        assert not a1.between(t0, t0_end) and not ext.between(t0, t0_end)

        # Apply: rule 0 mirrors the client's UDP to port 5000 into analyzer1. The stream
        # is already running: its next packets are mirrored.
        write_yaml(policy_file, [policy(rule([{"protocol": "UDP", "port": 5000}],
                                             "analyzer1"))])
        t1 = applied(lambda s: len(s.policies) == 1, "the policy")
        t1_end = phase()
        mids, sid = compiled(objects)
        (mid0,) = mids
        assert mids[mid0] == "csp/demo/p/rule/0"
        assert seen(a1, t1 + GRACE, t1_end) == {(mid0, sid, f5000)}
        assert len(a1.between(t1 + GRACE, t1_end)) >= 0.6 * (t1_end - t1 - GRACE) / INTERVAL
        assert not ext.between(t0, t1_end)
        names = json.load(open(os.path.join(state_dir, "names.json")))
        assert {r["mirror_id"] for r in names["rules"].values()} == {mid0}
        assert {i["session_id"] for i in names["interfaces"].values()} == {sid}
        # Each copy is the packet as the pod received it: IPv4, addresses unchanged.
        _, _, _, _, inner = a1.between(t1 + GRACE, t1_end)[0]
        assert (inner[0], flow_of(inner)) == (0x45, f5000)

        # Edit: rule 0 now takes port 7000 to the external analyzer, and rule 1 mirrors
        # ICMP to analyzer1. The 5000 stream stops being mirrored; the 7000 stream and the
        # pings (one ICMP id throughout) start.
        write_yaml(policy_file, [policy(
            rule([{"protocol": "UDP", "port": 7000}], "external"),
            rule([{"protocol": "ICMP"}], "analyzer1", src_app=None))])
        t2 = applied(lambda s: len(s.policies) == 1 and len(s.policies[0].rules) == 2,
                     "the edited policy")
        t2_end = phase()
        mids2, sid2 = compiled(objects)
        assert sid2 == sid and mids2[mid0] == "csp/demo/p/rule/0"  # same rule, same id
        (mid1,) = set(mids2) - {mid0}
        assert seen(ext, t2 + GRACE, t2_end) == {(mid0, sid, f7000)}
        got = seen(a1, t2 + GRACE, t2_end)
        assert {m for m, _, _ in got} == {mid1} and {s for _, s, _ in got} == {sid}
        icmp = {f for _, _, f in got}
        # Both directions of the ping flow, and nothing else.
        (ident,) = {f[2] for f in icmp}
        assert icmp == {(1, client.ip, ident, web.ip, ident), (1, web.ip, ident, client.ip,
                                                                ident)}
        assert not [c for c in a1.between(t2 + GRACE) if c[3] == f5000]

        # Delete: every copy stops.
        policy_file.unlink()
        t3 = applied(lambda s: s.policies == (), "the deletion")
        t3_end = phase(0.8)
        assert not a1.between(t3 + GRACE, t3_end) and not ext.between(t3 + GRACE, t3_end)
        assert a1.not_jmirror == ext.not_jmirror == 0
        # The interface is detached once no policy needs it.
        assert agent.last_result.detached and "classify" not in classifiers_on(node1, "vweb")
    finally:
        ping.terminate()
        ping.wait()
        s5000.close()
        s7000.close()
        agent.stop(cleanup=True)
        a1.close()
        ext.close()
    assert not os.path.exists(pin_root)
    assert not link_exists(node1, "cn2m-tx")


# ---------------------------------------------------------------------------- the CLI


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cn2mirror.cli.main", *args]


def agent_args(lab, objects, pin_root, state_dir, *extra: str) -> list[str]:
    return cli("agent", "--source", str(objects), "--node", "node1",
               "--netns", lab.nodes["node1"].netns, "--pin-root", pin_root,
               "--state-dir", state_dir, "--poll-interval", "0.2", *extra)


def start_agent(args: list[str], state_dir: str) -> subprocess.Popen:
    """The agent CLI in a subprocess, once it has applied its state."""
    with contextlib.suppress(FileNotFoundError):  # the last agent's: not this one's
        os.unlink(os.path.join(state_dir, "status.json"))
    # stderr to a file: a pipe nobody reads could fill up and block the agent.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, stderr=log)
    proc.log = log
    try:
        wait_ready(state_dir, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def log_of(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read().decode()


def wait_ready(state_dir: str, proc: subprocess.Popen, reconciles: int = 1) -> None:
    path = os.path.join(state_dir, "status.json")

    def ready():
        assert proc.poll() is None, log_of(proc)
        try:
            status = json.load(open(path))
        except (OSError, ValueError):
            return False
        return status["ready"] and status["reconciles"] >= reconciles

    wait_until(ready, 60, "the agent to apply its state")


def test_restarted_agent_adopts_the_datapath_without_a_gap(lab, pin_root, state_dir,
                                                           tmp_path):
    client, web = lab.pods["client"], lab.pods["web"]
    node1 = lab.nodes["node1"].netns
    objects = stream_objects(tmp_path, lab)
    mids, sid = compiled(objects)
    (mid,) = mids

    a1 = Analyzer(lab.pods["analyzer"].netns)
    stream = UdpStream(client.netns, web.netns, web.ip, 5000)
    procs: list[subprocess.Popen] = []
    try:
        # 1. --once: apply and exit; the datapath keeps mirroring without any agent.
        once = subprocess.run(agent_args(lab, objects, pin_root, state_dir, "--once"),
                              capture_output=True, text=True, timeout=90,
                              env={**os.environ, "CN2MIRROR_FLOW_SAMPLING_SEED": "4242"})
        assert once.returncode == 0, once.stderr
        assert "reconcile #1 (snapshot) applied" in once.stderr
        # The flow sampling seed, from the environment as the DaemonSet gives it.
        pm = PinnedMaps(pin_root)
        try:
            assert L.Config.from_buffer_copy(pm.map("config").lookup(bytes(4))).sample_seed \
                == 4242
        finally:
            pm.close()
        t_once = time.monotonic()
        time.sleep(0.5)
        assert len(a1.between(t_once)) >= 15

        # 2. A long-running agent adopts the pins and the attachment; stopped with
        # SIGTERM it leaves them in place.
        p2 = start_agent(agent_args(lab, objects, pin_root, state_dir), state_dir)
        procs.append(p2)
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(30) == 0
        assert "the datapath keeps mirroring" in log_of(p2)
        t_down = time.monotonic()
        time.sleep(0.5)
        assert len(a1.between(t_down)) >= 15

        # 3. Again, this time removing everything on exit.
        p3 = start_agent(agent_args(lab, objects, pin_root, state_dir, "--cleanup-on-exit"),
                         state_dir)
        procs.append(p3)
        time.sleep(0.3)
        t_stop = time.monotonic()
        p3.send_signal(signal.SIGTERM)
        assert p3.wait(30) == 0
        t_gone = time.monotonic()
        time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stream.close()
        a1.close()

    copies = a1.between(t_once - 5, t_stop)
    assert {(m, s, f) for _, m, s, f, _ in copies} == {(mid, sid, stream.key(client.ip,
                                                                             web.ip))}
    # Not one packet of the stream went unmirrored from the first copy until the last
    # agent was told to stop, across two agent exits and two adoptions.
    got = {seq_of(c[4]) for c in copies}
    first = min(got)
    sent = [seq for t, seq in stream.sent if seq >= first and t < t_stop - GRACE]
    missing = sorted(set(sent) - got)
    assert len(sent) > 100 and not missing, f"{len(missing)} of {len(sent)} not mirrored"
    gaps = [b[0] - a[0] for a, b in zip(copies, copies[1:], strict=False)]
    assert max(gaps) < 10 * INTERVAL
    # --cleanup-on-exit: no copies after, nothing pinned, nothing attached.
    assert not a1.between(t_gone + GRACE)
    assert not os.path.exists(pin_root)
    assert not link_exists(node1, "cn2m-tx")
    assert "classify" not in classifiers_on(node1, "vweb")


def test_agent_cli_errors(lab, pin_root, state_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    r = subprocess.run(cli("agent", "--source", str(tmp_path)), capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "--node" in r.stderr
    r = subprocess.run(cli("agent", "--source", str(tmp_path), "--netns", "cn2m-no-such-ns",
                           "--pin-root", pin_root, "--state-dir", state_dir),
                       capture_output=True, text=True, env={**env, "NODE_NAME": "node1"})
    assert r.returncode == 1
    assert "unknown network namespace 'cn2m-no-such-ns'" in r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(pin_root)
    # Not root: refused before anything is touched.
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        *cli("agent", "--source", str(tmp_path), "--node", "node1",
                             "--pin-root", pin_root, "--state-dir", state_dir)],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 1 and "must run as root" in r.stderr, r.stderr
