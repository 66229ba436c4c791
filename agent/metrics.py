"""Prometheus /metrics, /healthz and /readyz for the node agent (stdlib only).

The exposition is the Prometheus text format 0.0.4, written here: a few counters, gauges
and one histogram do not need a client library. Collectors are anything with a
``collect() -> Iterable[Family]``; the registry asks each one at every scrape, so values
are read when they are asked for (the BPF counters straight from the pinned maps).

Datapath metrics come from the maps pinned under the pin root (agent/pinned.py) and the
names file the runtime writes at <state_dir>/names.json (read by agent/statefiles.py): slots
become policy, rule, destination and interface names. Counters are per slot, and the
map writer zeroes a slot's counters when the slot changes hands, so a series starts
again at zero when its rule, interface or destination is (re)written (rate() copes).

/healthz is the liveness check: it fails only when a part of the agent has died (a
registered health check says so), never because the API server is away. /readyz is the
readiness check: the source is in sync with the API server and the datapath applied.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from .defaults import DEFAULT_METRICS_ADDRESS as DEFAULT_ADDRESS

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = dict[str, str]


# --- Exposition ----------------------------------------------------------------------------


@dataclass
class Family:
    """One metric family: its samples are (name suffix, labels, value)."""

    name: str
    kind: str  # counter, gauge or histogram
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float, labels: Labels | None = None, suffix: str = "") -> Family:
        self.samples.append((suffix, dict(labels or {}), value))
        return self


class Collector(Protocol):
    def collect(self) -> Iterable[Family]: ...


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """Families in the Prometheus text format; one family per name (first one wins)."""
    out: list[str] = []
    seen: set[str] = set()
    for f in families:
        if f.name in seen:
            continue
        seen.add(f.name)
        out.append(f"# HELP {f.name} {f.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        out.append(f"# TYPE {f.name} {f.kind}")
        for suffix, labels, value in f.samples:
            name = f.name + suffix
            if labels:
                text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                out.append(f"{name}{{{text}}} {_number(value)}")
            else:
                out.append(f"{name} {_number(value)}")
    return "\n".join(out) + "\n"


class Counter:
    """A counter with labels: ``inc(**labels)``; its name should end in _total."""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help, labelnames
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        if not labelnames:
            self._values[()] = 0

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(str(labels[n]) for n in self.labelnames), 0)

    def collect(self) -> Iterable[Family]:
        f = Family(self.name, "counter", self.help)
        with self._lock:
            for key, v in sorted(self._values.items()):
                f.add(v, dict(zip(self.labelnames, key, strict=True)))
        yield f


class Gauge(Counter):
    def set(self, value: float, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            self._values[key] = value

    def collect(self) -> Iterable[Family]:
        for f in super().collect():
            f.kind = "gauge"
            yield f


class Histogram:
    DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = DEFAULT_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            self._count += 1
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self._counts[i] += 1

    @property
    def count(self) -> int:
        return self._count

    def collect(self) -> Iterable[Family]:
        f = Family(self.name, "histogram", self.help)
        with self._lock:
            for b, c in zip(self.buckets, self._counts, strict=True):
                f.add(c, {"le": _number(float(b))}, "_bucket")
            f.add(self._count, {"le": "+Inf"}, "_bucket")
            f.add(self._sum, None, "_sum")
            f.add(self._count, None, "_count")
        yield f


class Registry:
    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._lock = threading.Lock()

    def register(self, collector: Collector) -> Collector:
        with self._lock:
            self._collectors.append(collector)
        return collector

    def unregister(self, collector: Collector) -> None:
        with self._lock:
            if collector in self._collectors:
                self._collectors.remove(collector)

    def collect(self) -> list[Family]:
        with self._lock:
            collectors = list(self._collectors)
        families: list[Family] = []
        for c in collectors:
            try:
                families.extend(c.collect())
            except Exception as e:  # one broken collector must not hide the others
                log.warning("metrics collector %s failed: %s", type(c).__name__, e)
                families.append(Family("cn2mirror_collector_errors", "gauge",
                                       "1 for a collector that failed at this scrape.")
                                .add(1, {"collector": type(c).__name__}))
        return families

    def render(self) -> str:
        return render(self.collect())


# --- The agent's own metrics -------------------------------------------------------------


def serve_agent(agent, address: str, pin_root: str, state_dir: str) -> MetricsServer:
    """/metrics, /healthz and /readyz for an agent whatever its source (file mode; the
    Kubernetes source adds its own collectors in KubeOptions.start_services): process,
    reconciles, the datapath's counters, attachments, readiness."""
    registry = Registry()
    sync = SyncMetrics()
    registry.register(ProcessCollector())
    registry.register(sync)
    registry.register(DatapathCollector(pin_root, state_dir))
    if hasattr(getattr(agent, "node", None), "collect"):
        registry.register(agent.node)
    agent.add_listener(sync.observe_report)
    source = agent.source
    ready = {"agent": agent.ready}
    if hasattr(source, "ready"):
        ready["source"] = source.ready
    return MetricsServer(registry, address, {}, ready).start()


class SyncMetrics:
    """Control-plane timings from the runtime's reconcile reports (one ``observe`` each)."""

    def __init__(self) -> None:
        self.duration = Histogram(
            "cn2mirror_sync_duration_seconds",
            "Time one reconcile took: compile, apply to the maps, write the names files.")
        self.latency = Histogram(
            "cn2mirror_sync_latency_seconds",
            "From a changed snapshot's arrival at the runtime to its maps written.")
        self.syncs = Counter("cn2mirror_syncs_total", "Reconciles of the datapath, by result.",
                             ("result",))
        self.last = Gauge("cn2mirror_last_sync_timestamp_seconds",
                          "Unix time of the last successful reconcile.")
        self.errors = Gauge("cn2mirror_object_errors",
                            "Objects the last compile could not apply (see status and Events).")
        self.problems = Gauge("cn2mirror_datapath_problems",
                              "Interfaces and destinations the last apply could not set up.")

    def observe_report(self, report) -> None:
        """One reconcile report of the runtime (agent/runtime.py ReconcileReport)."""
        problems = getattr(report, "problems", ()) or ()
        self.observe(report.duration_s, ok=report.ok, latency=getattr(report, "latency_s", None),
                     errors=sum(1 for p in problems if p.origin == "compiler"),
                     problems=sum(1 for p in problems if p.origin == "datapath"))

    def observe(self, seconds: float, ok: bool = True, latency: float | None = None,
                errors: int | None = None, problems: int | None = None) -> None:
        self.duration.observe(seconds)
        if latency is not None:
            self.latency.observe(latency)
        self.syncs.inc(result="ok" if ok else "error")
        if ok:
            self.last.set(time.time())
        if errors is not None:
            self.errors.set(errors)
        if problems is not None:
            self.problems.set(problems)

    def collect(self) -> Iterable[Family]:
        for part in (self.duration, self.latency, self.syncs, self.last, self.errors,
                     self.problems):
            yield from part.collect()


class ProcessCollector:
    """Resident memory and CPU time of this process (from /proc)."""

    def collect(self) -> Iterable[Family]:
        rss = 0
        with contextlib.suppress(OSError):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
        t = os.times()
        yield Family("process_resident_memory_bytes", "gauge", "Resident memory size.").add(rss)
        yield Family("process_cpu_seconds_total", "counter", "User and system CPU time.").add(
            t.user + t.system)


# --- The datapath's counters -----------------------------------------------------------------


COUNTER_HELP = {
    "packets": ("mirrored_packets_total", "Copies delivered to the analyzer."),
    "bytes": ("mirrored_bytes_total", "Bytes of the copies delivered (after truncation)."),
    "truncated": ("truncated_packets_total",
                  "Copies cut to fit the path to the analyzer or to the snap length."),
    "sampled_out": ("sampled_out_packets_total",
                    "Copies not made by 1:N sampling (the destination's, or its policy's or "
                    "rule's own; issue 15); copies "
                    "over a copy budget are the dropped reason rate_limited."),
    "fragmented": ("fragmented_packets_total",
                   "Copies too large for the path sent whole in outer IPv4 fragments."),
    "cloned": ("cloned_packets_total", "Packets cloned towards the mirror port."),
}
SCOPES = ("rule", "interface", "destination")
SCOPE_MAP = {"rule": "rule", "interface": "iface", "destination": "dest"}


class DatapathCollector:
    """Per-rule, per-interface and per-destination counters from the pinned maps."""

    def __init__(self, pin_root: str, state_dir: str):
        from .statefiles import NamesCache

        self.pin_root = pin_root
        self._names = NamesCache(state_dir)
        self._maps = None
        self._lock = threading.Lock()

    def _open(self):
        """The pinned maps, opened at every scrape (a few syscalls): a datapath removed
        and pinned again is never read through stale descriptors."""
        from .pinned import PinnedMaps

        self.close()
        self._maps = PinnedMaps(self.pin_root)
        return self._maps

    def _labels(self, scope: str, slot: int, entry: dict) -> Labels:
        if scope == "rule":
            return {"policy": entry.get("policy") or "",
                    "rule": "" if entry.get("rule") is None else str(entry["rule"]),
                    "port_mirror": entry.get("port_mirror") or "",
                    "destination": entry.get("destination") or "",
                    "mirror_id": "" if entry.get("mirror_id") is None else str(entry["mirror_id"])}
        if scope == "interface":
            return {"interface": entry.get("key") or "", "pod": entry.get("pod") or "",
                    "session_id": "" if entry.get("session_id") is None
                    else str(entry["session_id"])}
        return {"destination": entry.get("name") or "", "mode": entry.get("mode") or ""}

    def collect(self) -> Iterable[Family]:
        with self._lock:  # scrapes may come concurrently
            return list(self._collect())

    def _collect(self) -> Iterable[Family]:
        from .layout import Drop
        from .pinned import NotPinned

        up = Family("cn2mirror_datapath_up", "gauge",
                    "1 when the pinned maps can be read.")
        try:
            maps = self._open()
        except (NotPinned, OSError) as e:
            log.debug("datapath metrics: %s", e)
            yield up.add(0)
            return
        names = self._names.get()
        reasons = [d.name.lower() for d in Drop]
        families: dict[str, Family] = {}

        def family(name: str, help: str) -> Family:
            if name not in families:
                families[name] = Family(name, "counter", help)
            return families[name]

        try:
            for scope in SCOPES:
                entries = {"rule": names.rules, "interface": names.interfaces,
                           "destination": names.destinations}[scope]
                for slot, entry in sorted(entries.items()):
                    totals = maps.counters(SCOPE_MAP[scope], slot)
                    labels = self._labels(scope, slot, entry)
                    for attr, (suffix, help) in COUNTER_HELP.items():
                        if attr == "cloned" and scope != "rule":
                            continue
                        family(f"cn2mirror_{scope}_{suffix}", help).add(
                            getattr(totals, attr), labels)
                    drops = family(f"cn2mirror_{scope}_dropped_packets_total",
                                   "Copies not delivered, by reason.")
                    for r in reasons:
                        drops.add((totals.drops or {}).get(r, 0), {**labels, "reason": r})
            node = maps.counters("node", 0)
            nd = family("cn2mirror_node_dropped_packets_total",
                        "Copies or packets the node's mirror port dropped, by reason.")
            for r in reasons:
                nd.add((node.drops or {}).get(r, 0), {"reason": r})
            try:
                ft = maps.flow_table()
            except NotPinned:  # pinned by a version without the flow table's counter
                ft = None
            if ft is not None:
                for name, help, value in (
                        ("cn2mirror_flow_table_entries", "Flows in the flow table.",
                         ft.entries),
                        ("cn2mirror_flow_table_capacity", "Flows the flow table can hold.",
                         ft.capacity)):
                    families[name] = Family(name, "gauge", help).add(value)
                family("cn2mirror_flow_table_created_total",
                       "Flow entries the classifier created.").add(ft.created)
                family("cn2mirror_flow_table_evicted_total",
                       "Flow entries the flow table (an LRU hash) evicted to make room: "
                       "created minus present.").add(ft.evicted)
        except OSError as e:
            log.debug("datapath metrics: %s", e)
            yield up.add(0)
            return
        finally:
            self.close()
        yield up.add(1)
        yield from families.values()
        info = Family("cn2mirror_datapath_problem", "gauge",
                      "Objects this node could not apply, with the reason (value 1).")
        for obj, why in sorted(names.problems.items()):
            info.add(1, {"object": obj, "reason": why[:200]})
        yield info

    def destination_counters(self) -> dict:
        """{MirrorDestination name: its CounterTotals on this node}; {} when nothing is
        pinned (agent/status.py CopyCountReporter writes them into status)."""
        from .pinned import NotPinned

        with self._lock:
            try:
                maps = self._open()
                return {entry["name"]: maps.counters("dest", slot)
                        for slot, entry in sorted(self._names.get().destinations.items())
                        if entry.get("name")}
            except (NotPinned, OSError) as e:
                log.debug("destination counters: %s", e)
                return {}
            finally:
                self.close()

    def close(self) -> None:
        if self._maps is not None:
            with contextlib.suppress(Exception):
                self._maps.close()
            self._maps = None


# --- HTTP server -------------------------------------------------------------------------------

Check = Callable[[], bool]


DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_REQUEST_TIMEOUT = 5.0
DEFAULT_CACHE_SECONDS = 5.0
LISTEN_BACKLOG = 256  # connections the kernel may hold for accept(): see Server


def parse_address(address: str) -> tuple[str, int]:
    """":9464" -> ("127.0.0.1", 9464): without a host, only this machine can scrape.
    "198.18.0.5:9464" (the node's address: Prometheus scrapes it there), "[::1]:9464" and
    "0.0.0.0:9464" (every address: say so explicitly) work too."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on a thread of its own.

    Hardened for a host-network pod: it listens only where it is told (localhost when
    no host is given); at most ``max_connections`` connections are served at once (one
    thread each; the rest are closed at once, so idle or slow clients cannot pile up
    threads); a request must arrive and be answered within ``request_timeout``
    seconds per socket operation, and one request per connection (HTTP/1.0); /metrics is
    rendered at most once per ``cache_seconds`` (reading every counter of 10k rules
    costs about a CPU-second: scrapes within the window get the same text).
    """

    def __init__(self, registry: Registry, address: str = DEFAULT_ADDRESS,
                 health_checks: dict[str, Check] | None = None,
                 ready_checks: dict[str, Check] | None = None, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 cache_seconds: float = DEFAULT_CACHE_SECONDS):
        if max_connections < 1 or request_timeout <= 0 or cache_seconds < 0:
            raise ValueError("need max_connections >= 1, request_timeout > 0 and "
                             "cache_seconds >= 0")
        self.registry = registry
        self.address = address
        self.health_checks = dict(health_checks or {})
        self.ready_checks = dict(ready_checks or {})
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.cache_seconds = cache_seconds
        self.renders = 0  # times /metrics was computed (not served from the cache)
        self.refused = 0  # connections closed at once: max_connections were busy
        self._cache: tuple[float, str] | None = None  # (monotonic time, text)
        self._render_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        registry.register(self)  # cn2mirror_ready

    def collect(self) -> Iterable[Family]:
        """cn2mirror_ready: /readyz's verdict, as a series alerts can watch (1 ready)."""
        ready, _ = self._results(self.ready_checks)
        yield Family("cn2mirror_ready", "gauge",
                     "1 when /readyz passes: the source is in sync and the state applied."
                     ).add(1 if ready else 0)

    def metrics_text(self) -> str:
        """The exposition, from the cache while it is fresh; one render at a time (a
        scrape arriving during a render waits for it and takes its result)."""
        with self._render_lock:
            now = time.monotonic()
            if self._cache is None or now - self._cache[0] >= self.cache_seconds:
                text = self.registry.render()
                self.renders += 1
                self._cache = (time.monotonic(), text)
            return self._cache[1]

    def _results(self, checks: dict[str, Check]) -> tuple[bool, str]:
        lines, ok = [], True
        for name, check in sorted(checks.items()):
            try:
                passed = bool(check())
            except Exception as e:
                passed = False
                name = f"{name} ({e})"
            ok &= passed
            lines.append(f"[{'+' if passed else '-'}]{name} {'ok' if passed else 'failed'}")
        lines.append("ok" if ok else "failed")
        return ok, "\n".join(lines) + "\n"

    def start(self) -> MetricsServer:
        outer = self
        host, port = parse_address(self.address)

        class Handler(BaseHTTPRequestHandler):
            timeout = outer.request_timeout  # on every read and write of the socket

            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: str, ctype: str = "text/plain; charset=utf-8"):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    return self._send(200, outer.metrics_text(), CONTENT_TYPE)
                if path in ("/healthz", "/livez"):
                    ok, text = outer._results(outer.health_checks)
                    return self._send(200 if ok else 503, text)
                if path == "/readyz":
                    ok, text = outer._results({**outer.health_checks, **outer.ready_checks})
                    return self._send(200 if ok else 503, text)
                return self._send(404, "not found: try /metrics, /healthz or /readyz\n")

            do_HEAD = do_GET

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            # The kernel's queue of connections not yet accepted. Not the cap on
            # connections (the slots are): a queue as short as the cap made a flood of
            # idle clients fill it, and a scraper's SYN then waited out a 1 s retransmit.
            # Accepted at once, a connection over the cap is closed at once.
            request_queue_size = max(outer.max_connections, LISTEN_BACKLOG)
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def process_request(self, request, client_address) -> None:
                # A thread only for a free slot; otherwise the connection is closed now.
                if not outer._slots.acquire(blocking=False):
                    outer.refused += 1
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    outer._slots.release()
                    raise

            def process_request_thread(self, request, client_address) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    outer._slots.release()

        self._server = Server((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="cn2mirror-metrics", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
