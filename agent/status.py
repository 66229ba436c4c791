"""Object status and Events, written by one agent of the cluster at a time.

Every node compiles the same objects, so one agent is enough to tell users what became
of them. ``LeaderElector`` elects it with a coordination.k8s.io/v1 Lease in the agents'
namespace (client-go's algorithm: expiry judged by the local clock from when the lease
record last changed, optimistic concurrency on the Lease's resourceVersion, a leader
that cannot renew within ``renew_deadline`` stops acting before anyone else may take
over after ``lease_duration``). ``StatusWriter`` writes, while leader:

- MirrorDestination status: the chosen analyzer (pod, IP, MAC, interface, mode) and a
  Ready condition whose message also names the analyzer's node; or Ready False with the
  reason it cannot be used;
- ContrailSecurityPolicy / GlobalContrailSecurityPolicy status: Ready True "Accepted"
  with the mirror id of each mirroring rule in the message (the ids every node puts on
  the wire), or Ready False with the precise error;
- one object given under both API groups: the ignored copy says so.

The CRDs' status schemas have no fields for the analyzer's node or the mirror ids, so
they go into the condition messages (fields would be pruned by the API server).

Statuses are compared before writing (ignoring lastTransitionTime), so an unchanged
object is never patched. ``EventRecorder`` emits events.k8s.io/v1 Events for errors a
user must act on, once per object, reason and message (a repeat after
``repeat_interval`` bumps the Event's series count instead of making a new one); an
error that goes away and comes back makes a new Event. The leader reports errors of
MirrorDestinations and policies; every node reports (``NodeReporter``) the errors of its
own pods and what its datapath could not set up.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import math
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import encap
from .compiler import DestinationView, cluster_view
from .model import (
    KIND_CSP,
    KIND_GCSP,
    KIND_MD,
    KIND_POD,
    NAMESPACED_KINDS,
    object_name,
)
from .snapshot import Snapshot
from .state import SAMPLING_BY_FLOW, DeliveryMode, Destination

log = logging.getLogger(__name__)

LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL = "coordination.k8s.io", "v1", "leases"
EVENT_GROUP, EVENT_VERSION, EVENT_PLURAL = "events.k8s.io", "v1", "events"
CONDITION_READY = "Ready"
MD_STATUS_FIELDS = ("analyzerPod", "analyzerIP", "analyzerInterface", "analyzerMac", "mode")
NOTE_MAX = 1024


def micro_time() -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status_code(e: Exception) -> int | None:
    return getattr(e, "status", None)


# --- Leader election --------------------------------------------------------------------------


class LeaderElector:
    """Holds or waits for a Lease; ``is_leader()`` says whether to act now."""

    def __init__(self, api_client: Any, namespace: str, name: str, identity: str, *,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0, request_timeout: float | None = None):
        from kubernetes import client

        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("need lease_duration > renew_deadline > retry_period > 0")
        self.api = client.CustomObjectsApi(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.request_timeout = request_timeout or max(1.0, renew_deadline / 2)
        self._leader = False
        self._observed: tuple | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._on_started: list[Callable[[], None]] = []
        self._on_stopped: list[Callable[[], None]] = []
        self.transitions = 0  # times this agent became leader
        self.attempts_failed = 0
        self.holder: str | None = None  # the holder last seen

    def on_change(self, started: Callable[[], None] | None = None,
                  stopped: Callable[[], None] | None = None) -> None:
        if started:
            self._on_started.append(started)
        if stopped:
            self._on_stopped.append(stopped)

    def is_leader(self) -> bool:
        """True only while the lease was renewed within renew_deadline."""
        with self._lock:
            if self._leader and time.monotonic() - self._last_renew > self.renew_deadline:
                return False
            return self._leader

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cn2mirror-lease",
                                        daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Stop renewing without giving the lease up (as a hung agent would)."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def stop(self, release: bool = True) -> None:
        """Stop; with ``release``, a held lease is given up so another agent takes over
        at once rather than after lease_duration."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.request_timeout * 2 + 1)
        was = self._leader
        self._set_leader(False)
        if release and was:
            self._release()

    def _set_leader(self, leader: bool) -> None:
        with self._lock:
            changed = leader != self._leader
            self._leader = leader
        if not changed:
            return
        if leader:
            self.transitions += 1
            log.info("%s: now writing status (lease %s/%s)", self.identity, self.namespace,
                     self.name)
        else:
            log.info("%s: no longer writing status", self.identity)
        for fn in self._on_started if leader else self._on_stopped:
            try:
                fn()
            except Exception:
                log.exception("leader callback failed")

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._paused.is_set():
                held = self._try()
                now = time.monotonic()
                if held:
                    with self._lock:
                        self._last_renew = now
                    self._set_leader(True)
                elif self._leader and (now - self._last_renew > self.renew_deadline or
                                       (self.holder not in (None, "", self.identity))):
                    self._set_leader(False)
            elif self._leader and time.monotonic() - self._last_renew > self.renew_deadline:
                self._set_leader(False)
            jitter = 1.0 if self._leader else 1.0 + random.random() * 0.2
            self._stop.wait(self.retry_period * jitter)

    def _get(self) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(
                LEASE_GROUP, LEASE_VERSION, self.namespace, LEASE_PLURAL, self.name,
                _request_timeout=self.request_timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _try(self) -> bool:
        """One attempt to acquire or renew; True if this agent holds the lease after it."""
        from kubernetes.client.exceptions import ApiException

        now = time.monotonic()
        stamp = micro_time()
        duration = int(math.ceil(self.lease_duration))
        try:
            lease = self._get()
            if lease is None:
                body = {"apiVersion": f"{LEASE_GROUP}/{LEASE_VERSION}", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": {"holderIdentity": self.identity,
                                 "leaseDurationSeconds": duration, "acquireTime": stamp,
                                 "renewTime": stamp, "leaseTransitions": 0}}
                self.api.create_namespaced_custom_object(
                    LEASE_GROUP, LEASE_VERSION, self.namespace, LEASE_PLURAL, body,
                    _request_timeout=self.request_timeout)
                self._observed, self._observed_at = (self.identity, stamp, 0), now
                self.holder = self.identity
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
            if record != self._observed:
                self._observed, self._observed_at = record, now
            self.holder = holder
            held_for = spec.get("leaseDurationSeconds") or duration
            if holder and holder != self.identity and now < self._observed_at + held_for:
                return False  # someone else holds it and has renewed recently
            new_spec = {**spec, "holderIdentity": self.identity,
                        "leaseDurationSeconds": duration, "renewTime": stamp}
            if holder != self.identity:
                new_spec["acquireTime"] = stamp
                new_spec["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + (
                    1 if holder else 0)
            body = {**lease, "spec": new_spec}  # metadata.resourceVersion: no lost update
            self.api.replace_namespaced_custom_object(
                LEASE_GROUP, LEASE_VERSION, self.namespace, LEASE_PLURAL, self.name, body,
                _request_timeout=self.request_timeout)
            self._observed = (self.identity, stamp, new_spec.get("leaseTransitions"))
            self._observed_at = now
            self.holder = self.identity
            return True
        except ApiException as e:
            self.attempts_failed += 1
            if e.status != 409:
                log.debug("lease %s/%s: %s", self.namespace, self.name, e.reason)
            return False
        except Exception as e:  # the API server is unreachable
            self.attempts_failed += 1
            log.debug("lease %s/%s: %s", self.namespace, self.name, e)
            return False

    def _release(self) -> None:
        try:
            lease = self._get()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1,
                    "renewTime": micro_time()}
            self.api.replace_namespaced_custom_object(
                LEASE_GROUP, LEASE_VERSION, self.namespace, LEASE_PLURAL, self.name,
                {**lease, "spec": spec}, _request_timeout=self.request_timeout)
            log.info("%s: released lease %s/%s", self.identity, self.namespace, self.name)
        except Exception as e:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, e)

    def collect(self) -> Iterable:
        from .metrics import Family

        yield Family("cn2mirror_leader", "gauge",
                     "1 while this agent writes status and Events.").add(int(self.is_leader()))
        yield Family("cn2mirror_leader_transitions_total", "counter",
                     "Times this agent became the status writer.").add(self.transitions)


# --- Events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventSpec:
    regarding: tuple[tuple[str, str], ...]  # apiVersion, kind, name, namespace, uid
    reason: str
    note: str
    type: str = "Warning"

    @staticmethod
    def about(obj: Mapping[str, Any], reason: str, note: str, type: str = "Warning"
              ) -> EventSpec:
        meta = obj.get("metadata") or {}
        ref = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
               "name": meta.get("name"), "namespace": meta.get("namespace"),
               "uid": meta.get("uid")}
        return EventSpec(tuple(sorted((k, v) for k, v in ref.items() if v)), reason,
                         note[:NOTE_MAX], type)

    @property
    def ref(self) -> dict[str, str]:
        return dict(self.regarding)


class EventRecorder:
    """Creates events.k8s.io/v1 Events, deduplicated; see the module's documentation."""

    def __init__(self, api_client: Any, component: str = "cn2mirror-agent",
                 instance: str | None = None, repeat_interval: float = 600.0,
                 default_namespace: str = "default"):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.component = component
        self.instance = instance or component
        self.repeat_interval = repeat_interval
        self.default_namespace = default_namespace
        self._active: dict[str, dict[EventSpec, dict]] = defaultdict(dict)  # scope -> ...
        self._lock = threading.Lock()
        self.counts = {"created": 0, "updated": 0, "deduplicated": 0, "failed": 0}

    def reconcile(self, scope: str, wanted: Iterable[EventSpec]) -> None:
        """Emit what is wanted now; forget what is not (it may come back as a new Event)."""
        wanted = list(dict.fromkeys(wanted))
        for spec in wanted:
            self.emit(spec, scope)
        keep = set(wanted)
        with self._lock:
            active = self._active[scope]
            for spec in [s for s in active if s not in keep]:
                del active[spec]

    def emit(self, spec: EventSpec, scope: str = "default") -> None:
        now = time.monotonic()
        with self._lock:
            seen = self._active[scope].get(spec)
            if seen is not None and now - seen["at"] < self.repeat_interval:
                self.counts["deduplicated"] += 1
                return
        try:
            if seen is None:
                seen = self._create(spec)
                self.counts["created"] += 1
            else:
                seen["count"] += 1
                self.api.patch_namespaced_custom_object(
                    EVENT_GROUP, EVENT_VERSION, seen["namespace"], EVENT_PLURAL, seen["name"],
                    {"series": {"count": seen["count"], "lastObservedTime": micro_time()}},
                    _request_timeout=10)
                self.counts["updated"] += 1
        except Exception as e:
            self.counts["failed"] += 1
            log.warning("could not record Event %s for %s: %s", spec.reason,
                        spec.ref.get("name"), e)
            return
        seen["at"] = now
        with self._lock:
            self._active[scope][spec] = seen

    def _create(self, spec: EventSpec) -> dict:
        ref = spec.ref
        namespace = ref.get("namespace") or self.default_namespace
        name = f"{ref.get('name', 'cn2mirror')}.{uuid.uuid4().hex[:12]}"
        body = {"apiVersion": f"{EVENT_GROUP}/{EVENT_VERSION}", "kind": "Event",
                "metadata": {"name": name, "namespace": namespace},
                "eventTime": micro_time(), "type": spec.type, "reason": spec.reason,
                "note": spec.note, "action": "Reconcile",
                "reportingController": f"cn2mirror.io/{self.component}",
                "reportingInstance": self.instance, "regarding": ref}
        self.api.create_namespaced_custom_object(EVENT_GROUP, EVENT_VERSION, namespace,
                                                 EVENT_PLURAL, body, _request_timeout=10)
        return {"name": name, "namespace": namespace, "count": 1, "at": 0.0}

    def collect(self) -> Iterable:
        from .metrics import Family

        f = Family("cn2mirror_events_total", "counter",
                   "Kubernetes Events: created, updated (series), deduplicated, failed.")
        for k, v in sorted(self.counts.items()):
            f.add(v, {"result": k})
        yield f


# --- Desired status ----------------------------------------------------------------------------


def _condition(ok: bool, reason: str, message: str, generation: Any) -> dict:
    c = {"type": CONDITION_READY, "status": "True" if ok else "False", "reason": reason,
         "message": message[:32768]}
    if isinstance(generation, int):
        c["observedGeneration"] = generation
    return c


def _status(obj: Mapping[str, Any], ok: bool, reason: str, message: str,
            fields: Mapping[str, Any] | None = None) -> dict:
    generation = (obj.get("metadata") or {}).get("generation")
    status: dict[str, Any] = {}
    if obj.get("kind") == KIND_MD:
        status.update({k: None for k in MD_STATUS_FIELDS})
        status.update(fields or {})
    if isinstance(generation, int):
        status["observedGeneration"] = generation
    status["conditions"] = [_condition(ok, reason, message, generation)]
    return status


def _destination_fields(d: Destination, view: DestinationView) -> tuple[dict, str]:
    fields: dict[str, Any] = {"mode": d.mode.value}
    if d.mode is DeliveryMode.VXLAN:
        fields["analyzerIP"] = d.vtep_ip
        fields["analyzerMac"] = d.vtep_mac
        return fields, f"VXLAN VNI {d.vni} to VTEP {d.vtep_ip}"
    if d.mode is DeliveryMode.VLAN:
        return fields, f"tagged with VLAN {d.vlan_id} out of each node's uplink"
    fields["analyzerIP"] = d.analyzer_ip
    where = f"{d.analyzer_ip}:{d.udp_port}" if d.mode is DeliveryMode.JMIRROR \
        else f"{d.analyzer_ip} (MAC {d.analyzer_mac})"
    if d.mode is DeliveryMode.JMIRROR and d.encapsulation.format != "jmirror":
        # Another output format (docs/formats.md): its own port, or none over GRE.
        port = encap.udp_port_of(d.encapsulation, d.udp_port)
        where = f"{d.analyzer_ip}" + (f":{port}" if port else "") + \
            f" in {d.encapsulation.format}"
    if d.analyzer_pod is None:
        return fields, f"external analyzer {where}"
    fields["analyzerPod"] = d.analyzer_pod
    iface = view.analyzer_interface
    if iface is not None:
        fields["analyzerInterface"] = iface.name
        fields["analyzerMac"] = iface.mac
    node = f"node {view.analyzer_node}" if view.analyzer_node else "an unscheduled node"
    return fields, (f"analyzer pod {d.analyzer_pod} on {node}, interface "
                    f"{fields.get('analyzerInterface', '?')}, {where}")


def _limits_text(d: Destination) -> str:
    """The destination's own copy limits (issue 15), for its Ready condition's message;
    "" when it has none (every node's budget still applies: cn2mirror agent
    --copy-budget-pps/--copy-budget-bps)."""
    parts = []
    if d.snap_length:
        parts.append(f"cut to {d.snap_length} bytes after the Ethernet header")
    if d.sampling > 1:
        unit = "flow (whole, both directions)" if d.sampling_mode == SAMPLING_BY_FLOW \
            else "packet"
        parts.append(f"1 {unit} in {d.sampling} copied (the rest counted as sampled_out)")
    budget = ([f"{d.budget_pps} copies/s"] if d.budget_pps else []) + \
        ([f"{d.budget_bps} bit/s"] if d.budget_bps else [])
    if budget:
        parts.append(f"at most {' and '.join(budget)} from each node (the rest not made, "
                     "counted as rate_limited: cn2mirror show stats, metric "
                     "cn2mirror_destination_dropped_packets_total{reason=\"rate_limited\"})")
    return "; copies " + ", ".join(parts) if parts else ""


def desired_statuses(snapshot: Snapshot) -> list[tuple[Mapping[str, Any], dict]]:
    """(object, the status it should have) for every MirrorDestination and policy.

    Reports the compiler's own view of the cluster (compiler.cluster_view: its parsing,
    choice among duplicates, analyzer choice and id assignment), so the status says
    exactly what the nodes do.
    """
    view = cluster_view(snapshot)
    out: list[tuple[Mapping[str, Any], dict]] = []
    for o in view.objects:
        chosen = o.object
        for other in o.ignored:
            out.append((other, _status(other, False, "Duplicate", (
                f"{o.kind} {o.name} is also given as {chosen.get('apiVersion')}; that object "
                f"is used and this {other.get('apiVersion')} one is ignored"))))
        if o.error is not None:
            out.append((chosen, _status(chosen, False, "Invalid", o.error)))
            continue
        if o.kind == KIND_MD:
            d = view.destinations.get(o.parsed.name)
            if d is not None and d.destination is not None:
                fields, message = _destination_fields(d.destination, d)
                message += _limits_text(d.destination)
                if d.refused:  # labelled pods an admin did not allow: never chosen
                    message += "; not chosen as the analyzer: " + "; ".join(d.refused)
                out.append((chosen, _status(chosen, True, "Resolved", message, fields)))
            else:
                out.append((chosen, _status(chosen, False, "AnalyzerUnavailable",
                                            (d.problem if d else None) or "not resolved")))
            continue
        policy = view.policies.get((o.kind, o.parsed.key))
        if policy is None:
            out.append((chosen, _status(chosen, False, "Invalid", "not read by the compiler")))
            continue
        if policy.problems:
            out.append((chosen, _status(chosen, False, "DestinationUnavailable",
                                        "; ".join(policy.problems))))
            continue
        parts = [f"rule {m.rule} to {m.destination} as mirror id {m.mirror_id}"
                 for m in policy.mirrors]
        message = "mirrors " + "; ".join(parts) if parts else "accepted; no rule mirrors"
        out.append((chosen, _status(chosen, True, "Accepted", message)))
    return out


def _comparable(status: Mapping[str, Any] | None) -> dict:
    """A status without timestamps and absent (None) fields, for comparison; without
    the nodes' own counts too (COPIES_FIELD), which the leader never writes."""
    status = dict(status or {})
    out = {k: v for k, v in status.items()
           if v is not None and k not in ("conditions", COPIES_FIELD)}
    out["conditions"] = sorted(
        ({k: v for k, v in c.items() if k != "lastTransitionTime"}
         for c in status.get("conditions") or [] if isinstance(c, Mapping)),
        key=lambda c: str(c.get("type")))
    return out


def _with_times(desired: dict, current: Mapping[str, Any] | None) -> dict:
    """Desired status with lastTransitionTime kept where a condition did not change."""
    old = {c.get("type"): c for c in (current or {}).get("conditions") or []
           if isinstance(c, Mapping)}
    status = copy.deepcopy(desired)
    for c in status.get("conditions") or []:
        prev = old.get(c["type"])
        if prev is not None and prev.get("status") == c["status"] and \
                prev.get("lastTransitionTime"):
            c["lastTransitionTime"] = prev["lastTransitionTime"]
        else:
            c["lastTransitionTime"] = rfc3339()
    return status


# --- The writer ----------------------------------------------------------------------------------


class StatusWriter:
    """Writes status and the leader's Events, when this agent is the leader."""

    def __init__(self, api_client: Any, source: Any, elector: LeaderElector | None,
                 events: EventRecorder | None = None, resync: float = 60.0,
                 min_interval: float = 1.0):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.source = source
        self.elector = elector
        self.events = events
        self.resync = resync
        # Computing every status parses the whole snapshot: on a busy cluster, at most
        # one round per min_interval (changes meanwhile are coalesced into the next).
        self.min_interval = min_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: dict[str, tuple[str | None, dict]] = {}  # uid -> (rv after, status)
        self.counts = {"patched": 0, "unchanged": 0, "failed": 0, "gone": 0}
        self.rounds = 0
        if hasattr(source, "add_listener"):
            source.add_listener(self.notify)
        if elector is not None:
            elector.on_change(started=self.notify)

    def notify(self, *_: Any) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cn2mirror-status",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def leading(self) -> bool:
        return self.elector is None or self.elector.is_leader()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.resync)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self.leading():
                continue
            snapshot = self.source.snapshot()
            if snapshot is None:
                continue
            try:
                self.reconcile(snapshot)
            except Exception:
                log.exception("writing status failed")
            self._stop.wait(self.min_interval)

    def reconcile(self, snapshot: Snapshot) -> int:
        """Patch every status that differs; emit Events for the errors. Returns patches."""
        patched = 0
        wanted_events = []
        for obj, desired in desired_statuses(snapshot):
            ready = desired["conditions"][0]
            if ready["status"] == "False":
                wanted_events.append(EventSpec.about(obj, ready["reason"], ready["message"]))
            if not self.leading():
                return patched  # lost the lease: stop at once
            if self._write(obj, desired):
                patched += 1
        if self.events is not None and self.leading():
            self.events.reconcile("status", wanted_events)
        self.rounds += 1
        return patched

    def _write(self, obj: Mapping[str, Any], desired: dict) -> bool:

        meta = obj.get("metadata") or {}
        uid = meta.get("uid") or f"{obj.get('apiVersion')}/{object_name(obj)}"
        current = obj.get("status")
        want = _comparable(desired)
        if _comparable(current) == want:
            self.counts["unchanged"] += 1
            return False
        written = self._written.get(uid)
        if written is not None and written[1] == want and not _newer(meta.get(
                "resourceVersion"), written[0]):
            self.counts["unchanged"] += 1  # written already; the cache has not caught up
            return False
        result = patch_status(self.api, self.source, obj, _with_times(desired, current),
                              self.counts)
        if result is None:
            return False
        rv = (result.get("metadata") or {}).get("resourceVersion")
        self._written[uid] = (rv, want)
        return True

    def collect(self) -> Iterable:
        from .metrics import Family

        f = Family("cn2mirror_status_writes_total", "counter",
                   "Status patches of MirrorDestinations and policies, by result.")
        for k, v in sorted(self.counts.items()):
            f.add(v, {"result": k})
        yield f


def patch_status(api: Any, source: Any, obj: Mapping[str, Any], status: dict,
                 counts: dict[str, int]) -> Mapping[str, Any] | None:
    """Merge-patch ``status`` into the object's status subresource, counting the result
    in ``counts`` (patched, gone, failed); the API's answer, or None when not written."""
    from kubernetes.client.exceptions import ApiException

    res = source.resource_for(obj.get("apiVersion"), obj.get("kind"))
    if res is None:
        return None
    meta = obj.get("metadata") or {}
    body = {"status": status}
    try:
        if obj.get("kind") in NAMESPACED_KINDS:
            result = api.patch_namespaced_custom_object_status(
                res.group, res.version, meta.get("namespace"), res.plural, meta["name"],
                body, _request_timeout=10)
        else:
            result = api.patch_cluster_custom_object_status(
                res.group, res.version, res.plural, meta["name"], body, _request_timeout=10)
    except ApiException as e:
        counts["gone" if e.status == 404 else "failed"] += 1
        if e.status != 404:
            log.warning("status of %s %s: %s", obj.get("kind"), object_name(obj), e.reason)
        return None
    counts["patched"] += 1
    return result if isinstance(result, Mapping) else {}


def _newer(rv: str | None, than: str | None) -> bool:
    if not rv or not than:
        return False
    if rv.isdigit() and than.isdigit():
        return int(rv) > int(than)
    return rv != than


# --- The node's counts of copies ---------------------------------------------------------------

COPIES_FIELD = "copies"  # status.copies.<node>: written by each node, never by the leader


def copy_counts_entry(totals: Any, updated: str) -> dict[str, Any]:
    """One node's counts for one destination, as they appear in status.copies.<node>
    (the same numbers as `cn2mirror show stats` and the metrics, since the datapath
    was loaded on that node)."""
    drops = dict(totals.drops or {})
    rate_limited = drops.pop("rate_limited", 0)
    return {"copied": totals.packets, "bytes": totals.bytes,
            "rateLimited": rate_limited, "sampledOut": totals.sampled_out,
            "truncated": totals.truncated, "dropped": sum(drops.values()),
            "updated": updated}


def _without_time(entry: Mapping[str, Any]) -> dict:
    return {k: v for k, v in entry.items() if k != "updated"}


class CopyCountReporter:
    """Each node's own counts of the copies it made for each MirrorDestination (copied,
    rate_limited, sampled_out, truncated, other drops), in the object's status, under
    ``status.copies.<node>``: where an operator looks first, whichever node the copies
    come from.

    Every node writes only its own key with a JSON merge patch, so nodes never overwrite
    each other, and the leader's status patches (which never name ``copies``) leave them
    alone. A node writes at most every ``interval`` seconds and only what changed, and
    removes its key from a destination it no longer sends to. Counts are since the
    destination got its slot on that node (they survive restarts and re-resolution)."""

    def __init__(self, api_client: Any, source: Any, node_name: str,
                 read_counts: Callable[[], Mapping[str, Any]],
                 interval: float = 30.0):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.source = source
        self.node_name = node_name
        self.read_counts = read_counts
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counts = {"patched": 0, "failed": 0, "gone": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cn2mirror-copy-counts",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            snapshot = self.source.snapshot()
            if snapshot is None:
                continue
            try:
                self.report(snapshot)
            except Exception:
                log.exception("writing the node's copy counts failed")

    def report(self, snapshot: Snapshot) -> int:
        """Patch every destination whose counts on this node changed; returns patches."""
        totals = self.read_counts()
        now = rfc3339()
        patched = 0
        for obj in snapshot.destinations:
            name = object_name({**obj, "kind": KIND_MD})
            # What the object says now (the watch's copy: just after a write it may lag,
            # and the same counts are written once more).
            shown = ((obj.get("status") or {}).get(COPIES_FIELD) or {}).get(self.node_name)
            if name in totals:
                value: dict | None = copy_counts_entry(totals[name], now)
                if shown is not None and _without_time(shown) == _without_time(value):
                    continue
            elif shown is not None:
                value = None  # no longer sent to from here: the key goes
            else:
                continue
            if patch_status(self.api, self.source, obj, {COPIES_FIELD: {self.node_name: value}},
                            self.counts) is not None:
                patched += 1
        return patched

    def collect(self) -> Iterable:
        from .metrics import Family

        f = Family("cn2mirror_copy_count_writes_total", "counter",
                   "This node's patches of status.copies.<node> on MirrorDestinations.")
        for k, v in sorted(self.counts.items()):
            f.add(v, {"result": k})
        yield f


# --- The node's own Events -----------------------------------------------------------------------


class NodeReporter:
    """Events for what one node could not do: its pods' errors and datapath problems."""

    def __init__(self, events: EventRecorder, node_name: str):
        self.events = events
        self.node_name = node_name

    def report(self, state: Any, result: Any, snapshot: Snapshot | None) -> None:
        pods = {object_name({**p, "kind": KIND_POD}): p for p in (snapshot.pods if snapshot
                                                                   else ())}
        dests = {object_name({**d, "kind": KIND_MD}): d for d in (snapshot.destinations
                                                                  if snapshot else ())}
        policies = {}
        for kind, objs in ((KIND_CSP, snapshot.policies if snapshot else ()),
                           (KIND_GCSP, snapshot.global_policies if snapshot else ())):
            for o in objs:
                policies[kind, object_name({**o, "kind": kind})] = {**o, "kind": kind}
        wanted = []
        for e in getattr(state, "errors", ()) or ():
            if e.kind == KIND_POD and e.name in pods:
                wanted.append(EventSpec.about(pods[e.name], "PortMirrorError", e.reason))
        for what, why in sorted((getattr(result, "problems", None) or {}).items()):
            kind, _, name = what.partition(" ")
            note = f"node {self.node_name}: {why}"
            # Left out by the capacity pass (agent/capacity.py): said on the object.
            if kind == KIND_POD and name in pods:
                wanted.append(EventSpec.about(pods[name], "CapacityExceeded", note))
            elif (kind, name) in policies:
                wanted.append(EventSpec.about(policies[kind, name], "CapacityExceeded", note))
            elif kind == KIND_MD and name in dests and "left out" in why:
                wanted.append(EventSpec.about(dests[name], "CapacityExceeded", note))
            elif kind == "Interface":
                pod = "/".join(name.split("/")[:2])
                if pod in pods:
                    wanted.append(EventSpec.about(pods[pod], "InterfaceNotFound", note))
            elif kind == KIND_MD and name in dests:
                wanted.append(EventSpec.about(dests[name], "AnalyzerUnreachable", note))
        self.events.reconcile("node", wanted)
