"""The agent's services around its source and reconcile loop, wired together: the
metrics server (/metrics, /healthz, /readyz), leader election, the status writer and
Events (agent/status.py), the datapath's counters (agent/metrics.py).

``start_services`` starts what the options ask for; ``Services.stop()`` ends it all.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from . import defaults as D
from .kube.client import KubeOptions, default_namespace
from .kube.source import KubeSource
from .metrics import (
    DatapathCollector,
    MetricsServer,
    ProcessCollector,
    Registry,
    SyncMetrics,
    parse_address,
)
from .status import (
    CopyCountReporter,
    EventRecorder,
    LeaderElector,
    NodeReporter,
    StatusWriter,
)

log = logging.getLogger(__name__)


def start_services(options: KubeOptions, source: KubeSource, node_name: str, *,
                   agent: Any = None, pin_root: str | None = None,
                   state_dir: str | None = None, registry: Any = None,
                   copy_counts_interval: float = D.DEFAULT_COPY_COUNTS_INTERVAL) -> Services:
    """Metrics server, leader election, status writer and Events, around a source.

    ``agent`` is the runtime's Agent: its ``ready()`` joins /readyz, and its
    reconcile reports (``add_listener``) feed the sync metrics and the node's own
    Events. Stop it all with ``Services.stop()`` (the lease is released)."""
    api = options.api_client()
    registry = registry or Registry()
    services = Services(registry=registry, source=source, agent=agent)
    registry.register(source)
    registry.register(ProcessCollector())
    registry.register(services.sync)
    if agent is not None and hasattr(getattr(agent, "node", None), "collect"):
        registry.register(agent.node)  # attachment mode and repairs
    if pin_root and state_dir:
        services.datapath = DatapathCollector(pin_root, state_dir)
        registry.register(services.datapath)
    namespace = options.namespace or default_namespace()
    identity = options.identity or os.environ.get("POD_NAME") or node_name
    events = EventRecorder(api, component="agent", instance=node_name)
    services.events = events
    registry.register(events)
    if options.status:
        elector = LeaderElector(api, namespace, options.lease_name, identity,
                                lease_duration=options.lease_duration,
                                renew_deadline=options.renew_deadline,
                                retry_period=options.retry_period)
        writer = StatusWriter(api, source, elector, events)
        services.elector, services.writer = elector, writer
        registry.register(elector)
        registry.register(writer)
        writer.start()
        elector.start()
    services.reporter = NodeReporter(events, node_name)
    if options.status and services.datapath is not None:
        # Every node, leader or not: its own counts, in status.copies.<node>.
        services.copy_counts = CopyCountReporter(
            api, source, node_name, services.datapath.destination_counters,
            interval=copy_counts_interval)
        registry.register(services.copy_counts)
        services.copy_counts.start()
    if agent is not None and hasattr(agent, "add_listener"):
        services.watch_agent()
    if options.metrics_address:
        ready = {"source": source.ready}
        if agent is not None:
            ready["agent"] = agent.ready
        services.server = MetricsServer(registry, options.metrics_address,
                                        {"source": source.healthy}, ready)
        services.server.start()
        log.info("serving /metrics, /healthz and /readyz on %s:%d",
                 parse_address(options.metrics_address)[0], services.server.port)
    return services


@dataclass
class Services:
    """What start_services started; ``stop()`` ends it all."""

    registry: Any
    source: KubeSource
    agent: Any = None
    server: Any = None
    elector: Any = None
    writer: Any = None
    events: Any = None
    reporter: Any = None
    copy_counts: Any = None
    datapath: Any = None
    sync: Any = None
    _thread: threading.Thread | None = None
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.sync is None:
            self.sync = SyncMetrics()

    def watch_agent(self) -> None:
        """Every reconcile report: sync metrics at once (on the agent's worker), the
        node's Events on a thread of ours (they make API calls)."""
        self.agent.add_listener(self.on_report)
        self._thread = threading.Thread(target=self._report_loop, name="cn2mirror-events",
                                        daemon=True)
        self._thread.start()

    def on_report(self, report: Any) -> None:
        self.sync.observe_report(report)
        self._wake.set()

    def _report_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(5.0)
            if self._stop.is_set():
                return
            if not self._wake.is_set():
                continue
            self._wake.clear()
            state = getattr(self.agent, "last_state", None)
            result = getattr(self.agent, "last_result", None)
            if state is None or self.reporter is None:
                continue
            try:
                self.reporter.report(state, result, self.source.snapshot())
            except Exception:
                log.exception("reporting the node's problems failed")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.server is not None:
            self.server.stop()
        if self.writer is not None:
            self.writer.stop()
        if self.copy_counts is not None:
            self.copy_counts.stop()
        if self.elector is not None:
            self.elector.stop(release=True)
        if self._thread is not None:
            self._thread.join(5)
        if self.datapath is not None:
            self.datapath.close()
