"""/metrics on a busy node: what a scrape costs, cached or not, and what idle clients cost.

    python -m benchmarks.metrics_scrape [--rules 10000] [--idle 2000]

A Node in a throwaway network namespace with `--rules` rules (real pinned maps and the
names file the agent writes), a DatapathCollector and a MetricsServer on 127.0.0.1.
Measured in the same run:

- CPU seconds of one scrape that renders (every counter of every rule read from the
  maps) against one served from the refresh window's cache (the ratio is the saving);
- threads while `--idle` clients hold idle connections: the server as configured
  (a connection cap of 16) against the same server with the cap out of the way
  (what the uncapped ThreadingHTTPServer did: a thread per connection).

Prints one JSON object. Needs root and bcc (make setup).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid

from cn2mirror.agent.metrics import DatapathCollector, MetricsServer, Registry
from cn2mirror.agent.node import Node, describe
from cn2mirror.agent.runtime import write_atomic
from cn2mirror.agent.state import (
    Cidr,
    DeliveryMode,
    Destination,
    Interface,
    NodeState,
    Policy,
    PortRange,
    Rule,
)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _state(n_rules: int) -> NodeState:
    iface = Interface("demo/web", session_id=7, host_ifname="vpod")
    policies = []
    for p in range(0, n_rules, 100):
        name = f"ns{p // 100}/p"
        rules = tuple(Rule(name, i, None, (Cidr(f"198.18.{(p + i) // 256 % 256}."
                                                 f"{(p + i) % 256}/32"),),
                           (PortRange(6, 80, 80),), "an", p + i + 1)
                      for i in range(min(100, n_rules - p)))
        policies.append(Policy(name, rules, frozenset({iface.key})))
    return NodeState("node1", interfaces=(iface,), policies=tuple(policies),
                     destinations=(Destination("an", DeliveryMode.JMIRROR,
                                               analyzer_ip="198.18.200.10"),))


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        return r.read().decode()


def _threads_under_idle(server: MetricsServer, n: int) -> int:
    before = threading.active_count()
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", server.port)))
        # The most threads seen over 3 s after the last connect (an idle client is held
        # for request_timeout at most; the uncapped server was given 60 s).
        peak, deadline = 0, time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, threading.active_count() - before)
            time.sleep(0.1)
        return peak
    finally:
        for s in socks:
            s.close()


def run(rules: int = 10000, idle: int = 2000) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # two fds per idle client
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * idle + 256)), hard))
    tag = uuid.uuid4().hex[:6]
    netns, pin_root = f"cn2m-msb-{tag}", f"/sys/fs/bpf/cn2m-bench-{tag}"
    state_dir = tempfile.mkdtemp(prefix="cn2m-msb-")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    node = None
    try:
        subprocess.run(["ip", "-n", netns, "link", "add", "vpod", "type", "veth", "peer",
                        "name", "vpeer"], check=True)
        node = Node(pin_root, netns=netns)
        node.start()
        state = _state(rules)
        result = node.apply(state)
        write_atomic(os.path.join(state_dir, "names.json"), describe(state, result))
        registry = Registry()
        registry.register(DatapathCollector(pin_root, state_dir))
        out: dict = {"rules": rules}

        server = MetricsServer(registry, "127.0.0.1:0", cache_seconds=3600).start()
        try:
            t0 = _cpu()
            text = _get(server.port)
            render_cpu = _cpu() - t0
            t0 = _cpu()
            cached = _get(server.port)
            cached_cpu = _cpu() - t0
            assert cached == text and server.renders == 1
            out.update(scrape_bytes=len(text), render_cpu_s=round(render_cpu, 4),
                       cached_cpu_s=round(cached_cpu, 4),
                       cached_over_render=round(cached_cpu / render_cpu, 4))
            out["threads_with_cap"] = _threads_under_idle(server, idle)
        finally:
            server.stop()
        uncapped = MetricsServer(registry, "127.0.0.1:0", max_connections=idle * 2,
                                 request_timeout=60).start()
        try:
            out["threads_without_cap"] = _threads_under_idle(uncapped, idle)
        finally:
            uncapped.stop()
        out["idle_connections"] = idle
        return out
    finally:
        if node is not None:
            node.stop(cleanup=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(pin_root, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rules", type=int, default=10000)
    ap.add_argument("--idle", type=int, default=2000)
    args = ap.parse_args()
    print(json.dumps(run(args.rules, args.idle), indent=2))


if __name__ == "__main__":
    main()
