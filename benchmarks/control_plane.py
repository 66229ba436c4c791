"""Control plane: from one change in the Kubernetes API to the node's maps updated.

    .venv/bin/python -m benchmarks.control_plane            # 10,000 pods, 1,000 policies
    .venv/bin/python -m benchmarks.control_plane --quick    # 500 pods, 50 policies
    .venv/bin/python -m benchmarks.control_plane --profile  # also profile one reconcile

Three processes: the API server, the agent and this harness. The API server is
tests/kube_emulator.py, holding N pods (3 of them the lab's real pods on node1, the
others spread over 100 other nodes, with realistic status, managedFields and
annotations), 50 namespaces and P ContrailSecurityPolicies: P - 10 select pods of other
nodes, 10 select the lab's web pod. The agent is the runtime's Agent on KubeSource with
the real datapath (Node) in the lab's node1, as `cn2mirror agent --kubernetes` runs it
(without the status writer: one agent of the cluster does that), in a process of its
own, so that its memory is measured alone (VmRSS/VmHWM of that process; `make bench`
runs every benchmark in one process, whose memory says nothing about the agent's); a
probe in it timestamps snapshots and reconciles (CLOCK_MONOTONIC, shared by all
processes) and answers the harness over a pipe.

Measured, interleaved, for each of R rounds:
- change: a rule of a policy applied to web is edited through the API (merge patch);
  time until the Agent reports the reconcile that wrote the maps (changes > 0);
- noop (the baseline): the same edit on a policy that selects no pod of node1: the
  same watch, snapshot and compile, but nothing to write: time until its reconcile;
- for both, when the source handed the snapshot on (API -> watch -> cache -> debounce).
Figures are p50/p99 and ratios to the noop baseline of the same run. Also: the initial
sync (start -> first reconcile), a full resync (history compacted and every watch cut:
410 Gone, every resource relisted), a forced full reconcile of the complete snapshot,
and the agent's resident memory (VmRSS, VmHWM) before and after.

Writes benchmarks/results/control_plane.json (and prints a summary).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import multiprocessing
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "control_plane.json"
GROUP = "mirror.cn2mirror.io"
V = f"{GROUP}/v1alpha1"
N_NAMESPACES = 50
N_REMOTE_NODES = 100
LOCAL_POLICIES = 10
TARGET_P99_S = 0.100
TARGET_RSS_MB = 150


# --------------------------------------------------------------------------- objects


def _pod(i: int) -> dict:
    """A pod as the API server returns it: status, conditions and managedFields included."""
    ns, node = f"ns{i % N_NAMESPACES}", f"node{2 + i % N_REMOTE_NODES}"
    ip = f"198.18.{16 + i // 250}.{1 + i % 250}"
    name = f"app{i % 200}-{i:05d}"
    stamp = "2026-01-01T00:00:00Z"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "generateName": f"app{i % 200}-",
            "labels": {"app": f"app{i % 200}", "tier": f"t{i % 7}",
                       "pod-template-hash": "5d8f7c9b6"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": stamp,
                            "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": f"app{i % 200}-5d8f7c9b6", "uid": str(uuid.uuid4()),
                                 "controller": True, "blockOwnerDeletion": True}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update",
                 "apiVersion": "v1", "time": stamp, "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}, "f:tier": {}}},
                              "f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {}}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                 "time": stamp, "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:podIP": {},
                                           "f:podIPs": {}, "f:phase": {}}}}]},
        "spec": {
            "nodeName": node, "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "main", "image": "registry.example/app:1.2.3",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "production"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "volumeMounts": [{"name": "kube-api-access", "readOnly": True,
                                  "mountPath": "/var/run/secrets/kubernetes.io/"
                                               "serviceaccount"}]}],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}]},
        "status": {
            "phase": "Running", "hostIP": "198.19.0.1", "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": stamp, "qosClass": "Burstable",
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": stamp}
                           for t in ("Initialized", "Ready", "ContainersReady",
                                     "PodScheduled")],
            "containerStatuses": [{"name": "main", "ready": True, "restartCount": 0,
                                   "image": "registry.example/app:1.2.3",
                                   "imageID": "registry.example/app@sha256:" + "0" * 64,
                                   "containerID": "containerd://" + "1" * 64,
                                   "started": True,
                                   "state": {"running": {"startedAt": stamp}}}]},
    }


def _policy(name: str, ns: str, app: str, port: int, tier: str) -> dict:
    return {"apiVersion": V, "kind": "ContrailSecurityPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": app}}}],
                     "rules": _rules(port, tier)}}


def _rules(port: int, tier: str) -> list[dict]:
    return [
        {"srcEP": {"endPoints": [{"namespaceSelector": {},
                                  "podSelector": {"matchLabels": {"tier": tier}}}]},
         "ports": [{"protocol": "TCP", "port": port}],
         "secondaryActions": {"mirrorTo": "analyzer1"}},
        {"dstEP": {"endPoints": [{"ipBlock": {"cidr": "198.18.0.0/15"}}]},
         "ports": [{"protocol": "UDP"}]},
    ]


def cluster(n_pods: int, n_policies: int, lab_objects: list[dict]) -> list[dict]:
    objs = [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": f"ns{i}", "labels": {"kubernetes.io/metadata.name": f"ns{i}",
                                                      "team": f"team{i % 5}"}}}
            for i in range(N_NAMESPACES)]
    objs += lab_objects
    objs += [_pod(i) for i in range(n_pods - sum(1 for o in lab_objects if o["kind"] == "Pod"))]
    objs.append({"apiVersion": V, "kind": "MirrorDestination",
                 "metadata": {"name": "analyzer1", "labels": {
                     "core.juniper.net/analyzer-pod-selector": "analyzer1"}},
                 "spec": {"udpPort": 30030}})
    for k in range(LOCAL_POLICIES):
        objs.append(_policy(f"web-{k}", "demo", "web", 8000 + k, f"t{k % 7}"))
    for k in range(n_policies - LOCAL_POLICIES):
        objs.append(_policy(f"pol-{k}", f"ns{k % N_NAMESPACES}", f"app{k % 200}",
                            80 + k % 10, f"t{k % 7}"))
    return objs


# --------------------------------------------------------------------------- the API server


def serve(conn, n_pods: int, n_policies: int, lab_objects: list[dict], root: str) -> None:
    """The emulated API server, in its own process; commands come over ``conn``."""
    sys.path.insert(0, root)
    from tests.kube_emulator import KubeEmulator, crd_files

    emu = KubeEmulator(bookmark_interval=30)
    emu.install_crd_files(crd_files(GROUP))
    for obj in cluster(n_pods, n_policies, lab_objects):
        emu.apply(obj)
    emu.start()
    conn.send(emu.port)
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        if cmd == "resync":  # every watch must relist: history gone, streams cut
            emu.compact(everyone=True)
            emu.cut_watches()
        conn.send("ok")
    emu.stop()
    conn.send("stopped")


# --------------------------------------------------------------------------- measuring


def rss(pid: int | str = "self") -> dict:
    """Resident memory of a process (VmRSS) and its peak (VmHWM), in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": round(out.get("VmRSS", 0), 1), "peak_mb": round(out.get("VmHWM", 0), 1)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[int(q) - 1]


def stats_ms(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2),
            "min_ms": round(min(ms), 2) if ms else None,
            "max_ms": round(max(ms), 2) if ms else None, "n": len(ms)}


def _port_of(snapshot, ns: str, name: str) -> int | None:
    """The port of the first rule of policy ns/name in a snapshot (None: not there)."""
    for p in snapshot.policies:
        meta = p["metadata"]
        if meta["name"] == name and meta.get("namespace") == ns:
            return p["spec"]["rules"][0]["ports"][0]["port"]
    return None


class Probe:
    """In the agent's process: when the source handed on, and when the Agent applied, a
    snapshot in which a given policy has a given port (timestamps: CLOCK_MONOTONIC,
    which every process of the machine shares)."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.cond = threading.Condition()
        self.target: tuple[str, str, int] | None = None
        self.snapshot_at: float | None = None
        self.report: tuple[float, object] | None = None
        self.reports = 0
        self.last = None
        self.first_snapshot_at: float | None = None
        self.gc: dict[int, list[float]] = {0: [], 1: [], 2: []}  # generation -> durations
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc[info["generation"]].append(time.perf_counter() - self._gc_start)

    def expect(self, ns: str, name: str, port: int) -> None:
        with self.cond:
            self.target, self.snapshot_at, self.report = (ns, name, port), None, None

    def on_snapshot(self, snapshot) -> None:
        now = time.monotonic()
        with self.cond:
            if self.first_snapshot_at is None:
                self.first_snapshot_at = now
            if self.target and self.snapshot_at is None and \
                    _port_of(snapshot, *self.target[:2]) == self.target[2]:
                self.snapshot_at = now
                self.cond.notify_all()

    def on_report(self, report) -> None:
        # On the Agent's worker right after the reconcile: last_snapshot is the one that
        # reconcile compiled.
        now = time.monotonic()
        snap = self.agent.last_snapshot
        with self.cond:
            self.reports += 1
            self.last = report
            if self.target and self.report is None and snap is not None and \
                    _port_of(snap, *self.target[:2]) == self.target[2]:
                self.report = (now, report)
            self.cond.notify_all()

    def wait(self, predicate, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"nothing within {timeout} s")
                self.cond.wait(left)


def deep_size(obj, seen=None) -> int:
    """Bytes of an object graph of dicts, lists, tuples and scalars (shared parts once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        size += sum(deep_size(v, seen) for v in obj)
    return size


def agent_process(conn, port: int, netns: str, pin_root: str, state_dir: str,
                  root: str) -> None:
    """The agent, in a process of its own (as `cn2mirror agent --kubernetes` runs, without
    the status writer: one agent of the cluster does that), driven over ``conn``."""
    sys.path.insert(0, root)
    import logging

    from kubernetes import client

    from cn2mirror.agent.compiler import compile_node
    from cn2mirror.agent.kube import PODS, KubeSource
    from cn2mirror.agent.node import Node
    from cn2mirror.agent.runtime import Agent

    logging.basicConfig(level=logging.ERROR)
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.connection_pool_maxsize = 32
    configuration.retries = False
    source = KubeSource(client.ApiClient(configuration), node_name="node1")
    node = Node(pin_root, netns=netns)
    agent = Agent(source, "node1", node, state_dir, resync_interval=3600)
    probe = Probe(agent)
    source.add_listener(probe.on_snapshot)
    agent.add_listener(probe.on_report)
    started: list[float] = []
    start_source = source.start

    datapath_memory: dict = {}

    def start(fn):  # the Agent starts the source right after the datapath
        started.append(time.monotonic())
        datapath_memory.update(rss())
        start_source(fn)

    source.start = start
    conn.send("ready")
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            agent.stop(True)  # cleanup: detach, unpin
            conn.send("stopped")
            return
        if cmd == "start":
            t0 = time.monotonic()
            agent.start()
            probe.wait(lambda: probe.reports > 0, 300)
            first = probe.last
            conn.send({
                "t_start": t0, "t_first_report": time.monotonic(),
                "t_source_started": started[0],
                "t_first_snapshot": probe.first_snapshot_at,
                "list_s_by_resource": {r.name: round(x.stats.list_seconds, 3)
                                       for r, x in source.reflectors.items()},
                "first_reconcile_duration_s": round(first.duration_s, 3),
                "node_state": {"policies": first.policies, "rules": first.rules,
                               "interfaces": first.interfaces,
                               "map_changes": first.changes},
                "ok": first.ok, "summary": first.summary(),
                "memory_after_datapath_start": datapath_memory})
        elif cmd == "expect":
            probe.expect(*args)
            conn.send("ok")
        elif cmd == "wait":
            probe.wait(lambda: probe.snapshot_at is not None and probe.report is not None)
            t_rep, rep = probe.report
            conn.send({"t_snapshot": probe.snapshot_at, "t_report": t_rep, "ok": rep.ok,
                       "changes": rep.changes, "duration_s": rep.duration_s,
                       "summary": rep.summary()})
        elif cmd == "relists":
            conn.send({r: (x.stats.relists, x.connected)
                       for r, x in source.reflectors.items()})
        elif cmd == "await_relists":
            before, deadline = args[0], time.monotonic() + 120
            while any(x.stats.relists <= before[r] or not x.connected
                      for r, x in source.reflectors.items()):
                if time.monotonic() > deadline:
                    raise TimeoutError("the relists did not finish")
                time.sleep(0.005)
            conn.send({"t_done": time.monotonic(),
                       "pods_list_s": source.reflectors[PODS].stats.list_seconds})
        elif cmd == "full":  # a full reconcile of the complete snapshot (as on restart)
            n = probe.reports
            agent.on_change(source.snapshot())
            probe.wait(lambda n=n: probe.reports > n)
            conn.send(probe.last.duration_s)
        elif cmd == "gc":  # the garbage collector's passes since the last ask
            conn.send({g: stats_ms(d) for g, d in probe.gc.items()})
            for d in probe.gc.values():
                d.clear()
        elif cmd == "cache_mb":
            seen: set[int] = set()
            conn.send(round(sum(deep_size(x.cache, seen)
                                for x in source.reflectors.values()) / 2**20, 1))
        elif cmd == "timings":  # where a reconcile's time goes, while the worker is idle
            profile = args[0]
            snapshot = source.snapshot()
            out = {}
            t0 = time.perf_counter()
            state = compile_node(snapshot, "node1")
            out["compile_node_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            t0 = time.perf_counter()
            agent.compiler.compile(snapshot)
            out["compile_unchanged_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            t0 = time.perf_counter()
            node.apply(state)
            out["node_apply_unchanged_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            if profile:
                for what, fn in (("compile_node",
                                  lambda s=snapshot: compile_node(s, "node1")),
                                 ("node_apply", lambda s=state: node.apply(s))):
                    prof = cProfile.Profile()
                    prof.enable()
                    fn()
                    prof.disable()
                    text = io.StringIO()
                    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(20)
                    out[f"profile_{what}"] = [line for line in text.getvalue().splitlines()
                                              if line.strip()][:40]
            conn.send(out)


def run(quick: bool = False, log=print, rounds: int | None = None, profile: bool = False,
        pods: int | None = None, policies: int | None = None) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("the control-plane benchmark needs root (namespaces, BPF)")
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from kubernetes import client

    from .common import bench_lab

    n_pods = pods or (500 if quick else 10_000)
    n_policies = policies or (50 if quick else 1000)
    rounds = rounds or (3 if quick else 50)
    result: dict = {"pods": n_pods, "policies": n_policies, "namespaces": N_NAMESPACES,
                    "rounds": rounds, "targets": {"p99_ms": TARGET_P99_S * 1000,
                                                  "rss_mb": TARGET_RSS_MB},
                    "memory_measured": "VmRSS and VmHWM of the agent's own process (the "
                                       "API server and this harness run in others)"}
    ctx = multiprocessing.get_context("spawn")
    with bench_lab() as lab, contextlib.ExitStack() as stack:
        # The lab's pods as the API has them (namespaces demo and tools), labelled.
        labels = {"web": {"app": "web"}, "client": {"app": "client", "tier": "t0"},
                  "analyzer": {"core.juniper.net/analyzer-pod": "analyzer1"}}
        lab_objects = lab.pod_objects()
        for o in lab_objects:
            if o["kind"] == "Pod":
                o["metadata"]["labels"] = labels[o["metadata"]["name"]]
        parent, child = ctx.Pipe()
        server = ctx.Process(target=serve, args=(child, n_pods, n_policies, lab_objects, root),
                             daemon=True)
        t0 = time.monotonic()
        server.start()
        stack.callback(lambda: (server.is_alive() and server.terminate()))
        if not parent.poll(600):
            raise RuntimeError("the emulated API server did not start")
        port = parent.recv()
        result["api_server_fill_s"] = round(time.monotonic() - t0, 2)
        log(f"  API server (emulated, own process) holds {n_pods} pods and {n_policies} "
            f"policies after {result['api_server_fill_s']} s")

        def command(cmd: str) -> None:
            parent.send(cmd)
            parent.recv()

        stack.callback(lambda: server.is_alive() and (parent.send("stop"), server.join(10)))
        writer_api = client.CustomObjectsApi(client.ApiClient(_configuration(port)))

        pin_root = f"/sys/fs/bpf/{lab.prefix}"
        state_dir = tempfile.mkdtemp(prefix="cn2m-bench-state-")
        stack.callback(shutil.rmtree, state_dir, True)
        stack.callback(shutil.rmtree, pin_root, True)
        to_agent, agent_end = ctx.Pipe()
        agent = ctx.Process(target=agent_process, daemon=True,
                            args=(agent_end, port, lab.nodes["node1"].netns, pin_root,
                                  state_dir, root))
        agent.start()
        stack.callback(lambda: (agent.is_alive() and agent.terminate()))

        def answer(what: str, timeout: float):
            deadline = time.monotonic() + timeout
            while not to_agent.poll(0.5):
                if not agent.is_alive():
                    raise RuntimeError(f"the agent process died (exit code {agent.exitcode}) "
                                       f"before answering {what}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the agent did not answer {what} within {timeout} s")
            return to_agent.recv()

        def ask(*cmd, timeout: float = 600):
            to_agent.send(cmd)
            return answer(cmd[0], timeout)

        answer("its start", 120)

        def stop_agent():
            if agent.is_alive():
                ask("stop", timeout=60)
                agent.join(10)

        stack.callback(stop_agent)
        result["memory_before"] = rss(agent.pid)  # the agent's imports, nothing started
        sync = ask("start")
        assert sync["ok"] and sync["node_state"]["policies"] == LOCAL_POLICIES, sync["summary"]
        result["memory_after_datapath_start"] = sync["memory_after_datapath_start"]
        result["memory_after_sync"] = rss(agent.pid)
        result["initial_sync"] = {
            "start_to_first_reconcile_s": round(sync["t_first_report"] - sync["t_start"], 2),
            "datapath_start_s": round(sync["t_source_started"] - sync["t_start"], 2),
            "source_start_to_first_snapshot_s": round(sync["t_first_snapshot"]
                                                      - sync["t_source_started"], 2),
            "list_s_by_resource": sync["list_s_by_resource"],
            "first_reconcile_duration_s": sync["first_reconcile_duration_s"],
            "node_state": sync["node_state"]}
        log(f"  initial sync: {result['initial_sync']}")

        ask("gc")  # from here on: the collector's passes during the rounds
        memory_by_round: dict[int, float] = {}
        change_to_snapshot, change_to_maps = [], []
        noop_to_snapshot, noop_to_maps = [], []
        compile_apply = {"change": [], "noop": []}
        for i in range(rounds):
            for kind in ("change", "noop"):
                if kind == "change":
                    ns, name, base = "demo", f"web-{i % LOCAL_POLICIES}", 8000
                else:
                    k = i % (n_policies - LOCAL_POLICIES)
                    ns, name, base = f"ns{k % N_NAMESPACES}", f"pol-{k}", 80
                port = base + 1000 + i  # a new port every round
                tier = f"t{i % 7}"
                ask("expect", ns, name, port)
                t0 = time.monotonic()
                writer_api.patch_namespaced_custom_object(
                    GROUP, "v1alpha1", ns, "contrailsecuritypolicies", name,
                    {"spec": {"rules": _rules(port, tier)}})
                rep = ask("wait")
                assert rep["ok"], rep["summary"]
                if kind == "change":
                    assert rep["changes"] > 0, f"round {i}: nothing written: {rep['summary']}"
                    change_to_snapshot.append(rep["t_snapshot"] - t0)
                    change_to_maps.append(rep["t_report"] - t0)
                else:
                    assert rep["changes"] == 0, f"round {i}: noop wrote: {rep['summary']}"
                    noop_to_snapshot.append(rep["t_snapshot"] - t0)
                    noop_to_maps.append(rep["t_report"] - t0)
                compile_apply[kind].append(rep["duration_s"])
            if (i + 1) % 10 == 0:
                memory_by_round[i + 1] = rss(agent.pid)["rss_mb"]
                log(f"  {i + 1}/{rounds} rounds, agent RSS {memory_by_round[i + 1]} MB")

        result["gc_passes_during_rounds_by_generation"] = ask("gc")
        result["memory_rss_mb_by_round"] = memory_by_round
        result["memory_after_rounds"] = rss(agent.pid)
        result["change_to_maps"] = stats_ms(change_to_maps)
        result["change_to_snapshot"] = stats_ms(change_to_snapshot)
        result["noop_to_reconciled"] = stats_ms(noop_to_maps)
        result["noop_to_snapshot"] = stats_ms(noop_to_snapshot)
        result["reconcile_duration"] = {k: stats_ms(v) for k, v in compile_apply.items()}
        base = result["noop_to_reconciled"]["p50_ms"]
        result["ratios_to_noop_p50"] = {
            "change_to_maps_p50": round(result["change_to_maps"]["p50_ms"] / base, 2),
            "change_to_maps_p99": round(result["change_to_maps"]["p99_ms"] / base, 2),
            "snapshot_share_of_change_p50": round(
                result["change_to_snapshot"]["p50_ms"] / result["change_to_maps"]["p50_ms"], 3),
        }

        # Full resync: 410 for every watch, every resource relisted.
        resyncs, pods_list_s = [], []
        for _ in range(1 if quick else 3):
            before = ask("relists")
            t0 = time.monotonic()
            command("resync")
            done = ask("await_relists", {r: n for r, (n, _) in before.items()})
            resyncs.append(done["t_done"] - t0)
            pods_list_s.append(done["pods_list_s"])
        # ...and a full reconcile of the complete snapshot (as after a restart).
        full = [ask("full") for _ in range(1 if quick else 3)]
        result["full_resync_relist"] = stats_ms(resyncs)
        result["full_resync_pods_list"] = stats_ms(pods_list_s)
        result["full_reconcile"] = stats_ms(full)
        result["memory_end"] = rss(agent.pid)
        result["source_cache_mb"] = ask("cache_mb")
        result.update(ask("timings", profile))

    result["verdict"] = {
        "p99_under_target": result["change_to_maps"]["p99_ms"] < TARGET_P99_S * 1000,
        "rss_under_target": result["memory_end"]["peak_mb"] < TARGET_RSS_MB,
    }
    return result


def _configuration(port: int):
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.connection_pool_maxsize = 32
    configuration.retries = False
    return configuration


def _print(result: dict) -> None:
    print(f"control plane: {result['pods']} pods, {result['policies']} policies, "
          f"{result['rounds']} rounds")
    for key in ("change_to_maps", "change_to_snapshot", "noop_to_reconciled",
                "noop_to_snapshot"):
        s = result[key]
        print(f"  {key:22s} p50 {s['p50_ms']:8.1f} ms   p99 {s['p99_ms']:8.1f} ms")
    for k, s in result["reconcile_duration"].items():
        print(f"  reconcile ({k:6s})      p50 {s['p50_ms']:8.1f} ms   p99 {s['p99_ms']:8.1f} ms")
    print(f"  compile_node (full)    {result['compile_node_ms']:8.1f} ms")
    print(f"  Compiler, no change    {result['compile_unchanged_ms']:8.1f} ms")
    print(f"  Node.apply, no change  {result['node_apply_unchanged_ms']:8.1f} ms")
    print(f"  ratios to noop p50     {result['ratios_to_noop_p50']}")
    print(f"  full resync (relist)   p50 {result['full_resync_relist']['p50_ms']:8.1f} ms")
    print(f"  full reconcile         p50 {result['full_reconcile']['p50_ms']:8.1f} ms")
    print(f"  initial sync           {result['initial_sync']}")
    print(f"  agent memory ({result['memory_measured']}):")
    print(f"    before {result['memory_before']}, after the datapath started "
          f"{result['memory_after_datapath_start']}, after sync "
          f"{result['memory_after_sync']}, after the rounds {result['memory_after_rounds']}, "
          f"end (after resyncs) {result['memory_end']}")
    print(f"  RSS by round: {result['memory_rss_mb_by_round']}")
    print(f"  garbage collector during the rounds: "
          f"{result['gc_passes_during_rounds_by_generation']}")
    print(f"  the source's cache (deep size of the trimmed objects): "
          f"{result['source_cache_mb']} MB")
    print(f"  verdict: {result['verdict']} (targets p99 < {TARGET_P99_S * 1000:.0f} ms, "
          f"RSS < {TARGET_RSS_MB} MB)")
    for key in ("profile_compile_node", "profile_node_apply"):
        for line in result.get(key, []):
            print("   ", line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.control_plane",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--pods", type=int)
    ap.add_argument("--policies", type=int)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    result = run(args.quick, rounds=args.rounds, profile=args.profile, pods=args.pods,
                 policies=args.policies)
    _print(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
