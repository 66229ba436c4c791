"""Control plane: from one change in the Kubernetes API to the node's maps updated.

    .venv/bin/python -m benchmarks.control_plane            # 10,000 pods, 1,000 policies
    .venv/bin/python -m benchmarks.control_plane --quick    # 500 pods, 50 policies
    .venv/bin/python -m benchmarks.control_plane --profile  # also profile one reconcile

The API server is tests/kube_emulator.py in a process of its own (so that the agent's
memory is measured alone), holding N pods (3 of them the lab's real pods on node1, the
others spread over 100 other nodes, with realistic status, managedFields and
annotations), 50 namespaces and P ContrailSecurityPolicies: P - 10 select pods of other
nodes, 10 select the lab's web pod. The agent is the runtime's Agent on KubeSource with
the real datapath (Node) in the lab's node1, as `cn2mirror agent --kubernetes` runs it
(without the status writer: one agent of the cluster does that).

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


def rss() -> dict:
    out = {}
    with open("/proc/self/status") as f:
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


class Watcher:
    """Timestamps of the source's snapshots and of the Agent's reconcile reports."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.snapshots: list[tuple[float, object]] = []
        self.reports: list[tuple[float, object]] = []  # (time, (report, its snapshot))
        self.agent = None

    def on_snapshot(self, snapshot) -> None:
        # Only a digest is kept: holding snapshots would keep old objects alive and
        # inflate the memory measured.
        with self.cond:
            self.snapshots.append((time.monotonic(), _ports(snapshot)))
            self.cond.notify_all()

    def on_report(self, report) -> None:
        # Called on the Agent's worker right after the reconcile: last_snapshot is the
        # snapshot that reconcile compiled.
        ports = _ports(self.agent.last_snapshot) if self.agent.last_snapshot else {}
        with self.cond:
            self.reports.append((time.monotonic(), (report, ports)))
            self.cond.notify_all()

    def wait(self, what: str, after: int, predicate, timeout: float = 60.0):
        items = self.snapshots if what == "snapshot" else self.reports
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(items)):
                    if predicate(items[i][1]):
                        return items[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout} s")
                self.cond.wait(left)


def _ports(snapshot) -> dict[tuple[str, str], int]:
    """(namespace, name) -> the port of the first rule, for every policy."""
    return {(p["metadata"]["namespace"], p["metadata"]["name"]):
            p["spec"]["rules"][0]["ports"][0]["port"] for p in snapshot.policies}


def _has_port(ports: dict, ns: str, name: str, port: int) -> bool:
    return ports.get((ns, name)) == port


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


def run(quick: bool = False, log=print, rounds: int | None = None, profile: bool = False,
        pods: int | None = None, policies: int | None = None) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("the control-plane benchmark needs root (namespaces, BPF)")
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from kubernetes import client

    from cn2mirror.agent.compiler import compile_node
    from cn2mirror.agent.kube import PODS, KubeSource
    from cn2mirror.agent.node import Node
    from cn2mirror.agent.runtime import Agent

    from .common import bench_lab

    n_pods = pods or (500 if quick else 10_000)
    n_policies = policies or (50 if quick else 1000)
    rounds = rounds or (3 if quick else 50)
    result: dict = {"pods": n_pods, "policies": n_policies, "namespaces": N_NAMESPACES,
                    "rounds": rounds, "targets": {"p99_ms": TARGET_P99_S * 1000,
                                                  "rss_mb": TARGET_RSS_MB}}
    result["memory_before"] = rss()
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
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{port}"
        configuration.connection_pool_maxsize = 32
        configuration.retries = False
        api = client.ApiClient(configuration)
        writer_api = client.CustomObjectsApi(client.ApiClient(configuration))

        pin_root = f"/sys/fs/bpf/{lab.prefix}"
        state_dir = tempfile.mkdtemp(prefix="cn2m-bench-state-")
        stack.callback(shutil.rmtree, state_dir, True)
        stack.callback(shutil.rmtree, pin_root, True)
        source = KubeSource(api, node_name="node1")
        node = Node(pin_root, netns=lab.nodes["node1"].netns)
        agent = Agent(source, "node1", node, state_dir, resync_interval=3600)
        watch = Watcher()
        watch.agent = agent
        source.add_listener(watch.on_snapshot)
        agent.add_listener(watch.on_report)
        source_started = []
        start_source = source.start
        datapath_memory = {}

        def start(fn):  # the Agent starts the source right after the datapath
            source_started.append(time.monotonic())
            datapath_memory.update(rss())
            start_source(fn)

        source.start = start
        t0 = time.monotonic()
        agent.start()
        stack.callback(agent.stop, True)
        t_first, (first, _) = watch.wait("report", 0, lambda r: True, 300)
        result["initial_sync"] = {
            "start_to_first_reconcile_s": round(t_first - t0, 2),
            "datapath_start_s": round(source_started[0] - t0, 2),
            "source_start_to_first_snapshot_s": round(watch.snapshots[0][0]
                                                      - source_started[0], 2),
            "list_s_by_resource": {r.name: round(x.stats.list_seconds, 3)
                                   for r, x in source.reflectors.items()},
            "first_reconcile_duration_s": round(first.duration_s, 3),
            "node_state": {"policies": first.policies, "rules": first.rules,
                           "interfaces": first.interfaces, "map_changes": first.changes}}
        assert first.ok and first.policies == LOCAL_POLICIES, first.summary()
        result["memory_after_datapath_start"] = datapath_memory
        result["memory_after_sync"] = rss()
        log(f"  initial sync: first reconcile {result['initial_sync']} ")

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
                with watch.cond:  # keep no history: it would count as the agent's memory
                    watch.snapshots.clear()
                    watch.reports.clear()
                n_snap, n_rep = 0, 0
                t0 = time.monotonic()
                writer_api.patch_namespaced_custom_object(
                    GROUP, "v1alpha1", ns, "contrailsecuritypolicies", name,
                    {"spec": {"rules": _rules(port, tier)}})
                t_snap, snap = watch.wait("snapshot", n_snap,
                                          lambda s, ns=ns, name=name, port=port:
                                          _has_port(s, ns, name, port))
                t_rep, (rep, _) = watch.wait("report", n_rep,
                                             lambda r, ns=ns, name=name, port=port:
                                             r[1] is not None and _has_port(r[1], ns, name,
                                                                            port))
                assert rep.ok, rep.summary()
                if kind == "change":
                    assert rep.changes > 0, f"round {i}: nothing written: {rep.summary()}"
                    change_to_snapshot.append(t_snap - t0)
                    change_to_maps.append(t_rep - t0)
                else:
                    assert rep.changes == 0, f"round {i}: noop wrote: {rep.summary()}"
                    noop_to_snapshot.append(t_snap - t0)
                    noop_to_maps.append(t_rep - t0)
                compile_apply[kind].append(rep.duration_s)
            if (i + 1) % 10 == 0:
                memory_by_round[i + 1] = rss()["rss_mb"]
                log(f"  {i + 1}/{rounds} rounds, RSS {memory_by_round[i + 1]} MB")

        result["memory_rss_mb_by_round"] = memory_by_round
        result["memory_after_rounds"] = rss()
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
            before = {r: x.stats.relists for r, x in source.reflectors.items()}
            t0 = time.monotonic()
            command("resync")
            deadline = time.monotonic() + 120
            while any(x.stats.relists <= before[r] or not x.connected
                      for r, x in source.reflectors.items()):
                if time.monotonic() > deadline:
                    raise TimeoutError("the relists did not finish")
                time.sleep(0.005)
            resyncs.append(time.monotonic() - t0)
            pods_list_s.append(source.reflectors[PODS].stats.list_seconds)
        # ...and a full reconcile of the complete snapshot (as after a restart).
        full = []
        for _ in range(1 if quick else 3):
            with watch.cond:
                watch.reports.clear()
            n_rep = 0
            t0 = time.monotonic()
            agent.on_change(source.snapshot())
            _, (rep, _) = watch.wait("report", n_rep, lambda r: True)
            full.append(rep.duration_s)
        result["full_resync_relist"] = stats_ms(resyncs)
        result["full_resync_pods_list"] = stats_ms(pods_list_s)
        result["full_reconcile"] = stats_ms(full)
        result["memory_end"] = rss()
        seen: set[int] = set()
        result["source_cache_mb"] = round(sum(
            deep_size(x.cache, seen) for x in source.reflectors.values()) / 2**20, 1)

        # Where a reconcile's time goes.
        snapshot = source.snapshot()
        t0 = time.perf_counter()
        compile_node(snapshot, "node1")
        result["compile_node_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        state = compile_node(snapshot, "node1")
        t0 = time.perf_counter()
        node.apply(state)  # the worker is idle: nothing is pending
        result["node_apply_unchanged_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        if profile:
            for what, fn in (("compile_node", lambda: compile_node(snapshot, "node1")),
                             ("node_apply", lambda: node.apply(state))):
                prof = cProfile.Profile()
                prof.enable()
                fn()
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(20)
                result[f"profile_{what}"] = [line for line in out.getvalue().splitlines()
                                             if line.strip()][:40]

    result["verdict"] = {
        "p99_under_target": result["change_to_maps"]["p99_ms"] < TARGET_P99_S * 1000,
        "rss_under_target": result["memory_end"]["peak_mb"] < TARGET_RSS_MB,
    }
    return result


def _print(result: dict) -> None:
    print(f"control plane: {result['pods']} pods, {result['policies']} policies, "
          f"{result['rounds']} rounds")
    for key in ("change_to_maps", "change_to_snapshot", "noop_to_reconciled",
                "noop_to_snapshot"):
        s = result[key]
        print(f"  {key:22s} p50 {s['p50_ms']:8.1f} ms   p99 {s['p99_ms']:8.1f} ms")
    for k, s in result["reconcile_duration"].items():
        print(f"  reconcile ({k:6s})      p50 {s['p50_ms']:8.1f} ms   p99 {s['p99_ms']:8.1f} ms")
    print(f"  compile_node alone     {result['compile_node_ms']:8.1f} ms")
    print(f"  Node.apply, no change  {result['node_apply_unchanged_ms']:8.1f} ms")
    print(f"  ratios to noop p50     {result['ratios_to_noop_p50']}")
    print(f"  full resync (relist)   p50 {result['full_resync_relist']['p50_ms']:8.1f} ms")
    print(f"  full reconcile         p50 {result['full_reconcile']['p50_ms']:8.1f} ms")
    print(f"  initial sync           {result['initial_sync']}")
    print(f"  memory: before {result['memory_before']}, after the datapath started "
          f"{result['memory_after_datapath_start']}, after sync "
          f"{result['memory_after_sync']}, after the rounds {result['memory_after_rounds']}, "
          f"end (after resyncs) {result['memory_end']}")
    print(f"  RSS by round: {result['memory_rss_mb_by_round']}")
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
