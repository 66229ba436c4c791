"""The Kubernetes API as the agent's source of objects: list, watch, cache, snapshot.

``KubeSource`` implements the runtime's ``Source`` protocol: ``start(on_change)`` calls
``on_change`` with a complete :class:`Snapshot` (every watched kind listed at least once)
whenever the objects changed, debounced; ``ready()`` says whether the source is in sync
with the API server; ``stop()`` ends it.

What is watched
  Pods and Namespaces (all of them: remote pods make endpoint sets and analyzers), and
  MirrorDestination, ContrailSecurityPolicy and GlobalContrailSecurityPolicy under this
  project's group and under CN2's (core.contrail.juniper.net) where the API server serves
  them, found by discovery (and looked for again every ``rediscover`` seconds, so CRDs
  installed later are picked up). One version per group is watched: the server's
  preferred one when cn2mirror reads it, else the newest one it reads.

How
  One thread per resource, a reflector as client-go has them: a paginated list, then a
  watch from the list's resourceVersion with bookmarks. A watch that ends (server
  timeout) or breaks (connection cut mid-stream) is resumed from the last
  resourceVersion seen, immediately the first time and with exponential backoff (with
  jitter) after that; 410 Gone (the version was compacted) relists. Each resource keeps
  a cache keyed by namespace/name holding the object's uid and resourceVersion: an
  event for an older or equal version of the same object is ignored (never applied
  twice), a relist replaces the cache and removes what is gone (nothing lost). While a
  resource cannot reach the API server ``ready()`` is False and snapshots stop; the
  runtime keeps the datapath as it is. A line that is not JSON, or an event whose object
  has no name, is counted and logged and skipped; the stream goes on.

Objects are trimmed as they arrive (managedFields and last-applied annotations go; pods
keep only what the compiler reads), which keeps the agent small with 10,000 pods and
means a pod status update that changes nothing cn2mirror reads makes no snapshot.
Changes of ``status`` alone on cn2mirror's own objects (the status writer's) do not
make one either.

The kubeconfig/in-cluster choice, the command-line options (``kube_options``) and the
wiring of status, leader election and metrics (``KubeOptions.start_services``) are at the
end of this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .model import (
    GROUP_VERSIONS,
    KIND_NAMESPACE,
    KIND_POD,
    MIRROR_KINDS,
)
from .snapshot import FIELDS, Snapshot

log = logging.getLogger(__name__)

# Pod annotations the model reads start with one of these; the others are dropped.
POD_ANNOTATION_PREFIXES = ("core.juniper.net/", "cn2mirror.io/", "k8s.v1.cni.cncf.io/")
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

# Quiet time before a snapshot is made. Short: a reconcile of a few changed objects is
# cheap (incremental compile and plan), and snapshots that arrive while one runs are
# coalesced by the Agent (only the newest is applied).
DEFAULT_DEBOUNCE = 0.005
DEFAULT_MAX_DELAY = 0.5  # longest a change waits for a snapshot while changes keep coming
DEFAULT_WATCH_TIMEOUT = 300  # server-side timeoutSeconds (randomised up to twice as much)
DEFAULT_PAGE_SIZE = 100  # a page is decoded whole: smaller pages, a smaller peak (agent RSS)
DEFAULT_BACKOFF = (0.2, 30.0)  # first retry delay, cap
DEFAULT_REDISCOVER = 60.0


class Gone(Exception):
    """410: the resourceVersion (or continue token) is too old; relist."""


class Vanished(Exception):
    """404 on list: the resource is no longer served (its CRD was removed)."""


def _raise_stream_error(e: Exception) -> None:
    """Raise what a failed list or watch call (an ApiException) means for the stream, if
    it means one: Gone (410: relist) or Vanished (404: the kind is not served)."""
    if e.status == 410:
        raise Gone() from e
    if e.status == 404:
        raise Vanished() from e


# --- Resources -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchedResource:
    kind: str  # one of snapshot.FIELDS
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def name(self) -> str:
        """For logs and metric labels: pods, mirrordestinations.mirror.cn2mirror.io."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


PODS = WatchedResource(KIND_POD, "", "v1", "pods", True)
NAMESPACES = WatchedResource(KIND_NAMESPACE, "", "v1", "namespaces", False)


def _get_json(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    resp = fn(*args, _preload_content=False, **kwargs)
    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


def discover(api_client: Any, timeout: float = 10) -> list[WatchedResource]:
    """Pods, Namespaces, and the mirroring kinds of both groups the server serves."""
    from kubernetes import client

    found = [PODS, NAMESPACES]
    groups = _get_json(client.ApisApi(api_client).get_api_versions, _request_timeout=timeout)
    for g in groups.get("groups") or []:
        name = g.get("name")
        if name not in GROUP_VERSIONS:
            continue
        served = [v.get("version") for v in g.get("versions") or []]
        preferred = (g.get("preferredVersion") or {}).get("version")
        ours = GROUP_VERSIONS[name]
        version = preferred if preferred in ours else next(
            (v for v in reversed(ours) if v in served), None)
        if version is None:
            log.warning("API group %s is served as %s; cn2mirror reads %s: not watched",
                        name, ", ".join(served), ", ".join(ours))
            continue
        listing = _get_json(client.CustomObjectsApi(api_client).get_api_resources, name,
                            version, _request_timeout=timeout)
        for r in listing.get("resources") or []:
            if "/" not in r.get("name", "/") and r.get("kind") in MIRROR_KINDS:
                found.append(WatchedResource(r["kind"], name, version, r["name"],
                                             bool(r.get("namespaced"))))
    return found


# --- Trimming objects ------------------------------------------------------------------------


def _trim_meta(meta: dict, annotations: Callable[[str], bool] | None = None) -> dict:
    out = {k: v for k, v in meta.items() if k not in ("managedFields", "annotations")}
    ann = meta.get("annotations")
    if isinstance(ann, dict):
        kept = {k: v for k, v in ann.items()
                if k != LAST_APPLIED and (annotations is None or annotations(k))}
        if kept:
            out["annotations"] = kept
    return out


def _pod_annotation(key: str) -> bool:
    return key.startswith(POD_ANNOTATION_PREFIXES)


def _shared(value: Any) -> Any:
    """A copy of a decoded JSON value whose strings are the interpreter's shared copies:
    10,000 pods repeat the same namespaces, node names, labels and ports."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {sys.intern(k) if isinstance(k, str) else k: _shared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v) for v in value]
    return value


def trim(res: WatchedResource, obj: dict) -> dict:
    """The object as the cache keeps it, with apiVersion and kind set."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    if res.kind == KIND_POD:
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
        keep_meta = ("name", "namespace", "uid", "resourceVersion", "labels", "annotations",
                     "deletionTimestamp")
        out_spec: dict[str, Any] = {}
        for k in ("nodeName", "hostNetwork"):
            if k in spec:
                out_spec[k] = _shared(spec[k])
        containers = []
        for c in spec.get("containers") or []:
            if isinstance(c, dict):
                containers.append({k: _shared(c[k]) for k in ("name", "ports") if k in c})
        if containers:
            out_spec["containers"] = containers
        out_status = {k: _shared(status[k]) for k in ("phase", "podIP", "podIPs")
                      if k in status}
        out_meta = _trim_meta({k: meta[k] for k in keep_meta if k in meta}, _pod_annotation)
        for k in ("namespace", "labels"):
            if k in out_meta:
                out_meta[k] = _shared(out_meta[k])
        return {"apiVersion": res.api_version, "kind": res.kind, "metadata": out_meta,
                "spec": out_spec, "status": out_status}
    if res.kind == KIND_NAMESPACE:
        keep = ("name", "uid", "resourceVersion", "labels")
        return {"apiVersion": res.api_version, "kind": res.kind,
                "metadata": {k: meta[k] for k in keep if k in meta}}
    out = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    return {"apiVersion": res.api_version, "kind": res.kind, "metadata": _trim_meta(meta), **out}


def _content(res: WatchedResource, obj: dict) -> dict:
    """What decides whether an update changes anything: no resourceVersion, and for
    cn2mirror's own kinds no status and no generation (the status writer's own writes)."""
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    if res.kind in MIRROR_KINDS:
        meta.pop("generation", None)
        return {**{k: v for k, v in obj.items() if k not in ("status", "metadata")},
                "metadata": meta}
    return {**obj, "metadata": meta}


def _older_or_same(new_rv: str | None, old_rv: str | None) -> bool:
    """Whether new_rv is not newer than old_rv. resourceVersions are compared as numbers
    when both are (etcd's are); otherwise only equality counts."""
    if not new_rv or not old_rv:
        return False
    if new_rv.isdigit() and old_rv.isdigit():
        return int(new_rv) <= int(old_rv)
    return new_rv == old_rv


# --- Stats -------------------------------------------------------------------------------------


@dataclass
class ResourceStats:
    relists: int = 0
    list_seconds: float = 0.0  # the last full list: requests, decoding, trimming
    restarts: dict[str, int] = field(default_factory=dict)  # reason -> count
    events: dict[str, int] = field(default_factory=dict)  # type -> count
    ignored: int = 0  # events for a version already applied
    malformed: int = 0
    last_malformed: str = ""
    last_error: str = ""

    def restart(self, reason: str) -> None:
        self.restarts[reason] = self.restarts.get(reason, 0) + 1


# --- Reflector -----------------------------------------------------------------------------------


class _Reflector:
    """List and watch one resource into its cache."""

    def __init__(self, source: KubeSource, res: WatchedResource):
        self.source = source
        self.res = res
        self.cache: dict[tuple[str, str], dict] = {}
        self._objects: tuple[dict, ...] | None = None  # the cache's values, while unchanged
        self.rv: str | None = None
        self.synced = False
        self.connected = False
        self.stats = ResourceStats()
        self.stopped = threading.Event()
        self.vanished = False
        self.failures = 0  # consecutive failed attempts; reset by any list or watch that works
        self._resp = None
        self._thread = threading.Thread(target=self._run, name=f"cn2mirror-watch-{res.name}",
                                        daemon=True)

    # -- API calls
    def _call(self, **kwargs: Any) -> Any:
        from kubernetes import client

        api = self.source.api_client
        kwargs["_preload_content"] = False
        if self.res.group == "" and self.res.plural == "pods":
            return client.CoreV1Api(api).list_pod_for_all_namespaces(**kwargs)
        if self.res.group == "" and self.res.plural == "namespaces":
            return client.CoreV1Api(api).list_namespace(**kwargs)
        return client.CustomObjectsApi(api).list_cluster_custom_object(
            self.res.group, self.res.version, self.res.plural, **kwargs)

    def start(self) -> None:
        self._thread.start()

    def objects(self) -> tuple[dict, ...]:
        """The cached objects: the same tuple for as long as the cache is unchanged (the
        compiler then knows, at a glance, that nothing of this resource changed)."""
        if self._objects is None:
            self._objects = tuple(self.cache.values())
        return self._objects

    def changed(self) -> None:
        """Called, with the source's lock held, whenever the cache changes."""
        self._objects = None

    def stop(self) -> None:
        self.stopped.set()
        self._shutdown_response()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive() or self.stopped.is_set() or self.vanished

    def _shutdown_response(self) -> None:
        resp = self._resp
        if resp is None:
            return
        with contextlib.suppress(Exception):
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            resp.shutdown()

    # -- loop
    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        src = self.source
        while not self.stopped.is_set():
            try:
                if self.rv is None:
                    self._relist()
                started = time.monotonic()
                self._watch()
                self.stats.restart("timeout")  # the server ended the watch: resume
                if time.monotonic() - started < 1.0:
                    # Ended at once (a proxy closing streams?): do not spin.
                    self.stopped.wait(src._backoff(1))
            except Gone:
                self.stats.restart("expired")
                log.info("%s: resourceVersion %s expired: relisting", self.res.name, self.rv)
                self.rv = None
            except Vanished:
                log.warning("%s is no longer served: forgetting its objects", self.res.name)
                self.vanished = True
                src._forget(self)
                return
            except Exception as e:
                if self.stopped.is_set():
                    return
                if isinstance(e, ApiException) and e.status == 410:
                    self.stats.restart("expired")
                    self.rv = None
                    continue
                self.failures += 1
                failures = self.failures
                self.stats.restart("error")
                self.stats.last_error = f"{type(e).__name__}: {e}"[:500]
                # The first retry is immediate (a cut stream is usually resumed at once);
                # only a failing retry makes the source unready and backs off.
                if failures > 1:
                    if self.connected:
                        log.warning("%s: cannot list or watch (%s); keeping the last "
                                    "objects, retrying", self.res.name, self.stats.last_error)
                    self.connected = False
                    src._changed_readiness()
                    src._retry_wait(self.stopped, src._backoff(failures - 1))
                else:
                    log.info("%s: watch broke (%s): resuming", self.res.name,
                             self.stats.last_error)

    def _relist(self) -> None:
        from kubernetes.client.exceptions import ApiException

        items: dict[tuple[str, str], dict] = {}
        token = None
        rv = None
        started = time.monotonic()
        while True:
            try:
                data = _get_json(self._call, limit=self.source.page_size, _continue=token,
                                 _request_timeout=self.source.request_timeout)
            except ApiException as e:
                _raise_stream_error(e)
                raise
            for item in data.get("items") or []:
                obj = self._accept(item, self.cache)
                if obj is not None:
                    items[_key(obj)] = obj
            meta = data.get("metadata") or {}
            rv = meta.get("resourceVersion")
            token = meta.get("continue")
            if not token:
                break
        self.stats.relists += 1
        self.stats.list_seconds = time.monotonic() - started
        self.source._replace(self, items)
        self.rv = rv
        self.synced = True
        was_connected, self.connected = self.connected, True
        self.failures = 0
        self.source._changed_readiness()
        if not was_connected:
            self.source._server_back()
        log.debug("%s: listed %d objects at %s", self.res.name, len(items), rv)

    def _accept(self, raw: Any, known: dict | None = None) -> dict | None:
        """The trimmed object, or None (counted) when it cannot be placed. An object that
        ``known`` (the cache, on a relist) holds at the same uid and resourceVersion is
        that very object: nothing is trimmed or kept twice."""
        meta = raw.get("metadata") if isinstance(raw, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or \
                not meta["name"] or (self.res.namespaced and not meta.get("namespace")):
            self.stats.malformed += 1
            self.stats.last_malformed = "an object without name or namespace: " + \
                json.dumps(raw, default=str)[:200]
            log.warning("%s: skipping %s", self.res.name, self.stats.last_malformed)
            return None
        if known:
            prev = known.get((meta.get("namespace") or "", meta["name"]))
            if prev is not None and meta.get("resourceVersion") and \
                    prev["metadata"].get("resourceVersion") == meta["resourceVersion"] and \
                    prev["metadata"].get("uid") == meta.get("uid"):
                return prev
        return trim(self.res, raw)

    def _watch(self) -> None:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        src = self.source
        timeout = int(src.watch_timeout * (1 + random.random()))
        try:
            resp = self._call(watch=True, resource_version=self.rv, allow_watch_bookmarks=True,
                              timeout_seconds=timeout,
                              _request_timeout=(src.request_timeout, timeout + 30))
        except ApiException as e:
            _raise_stream_error(e)
            raise
        self._resp = resp
        if self.stopped.is_set():
            self._shutdown_response()
        was_connected = self.connected
        if not was_connected:
            log.info("%s: watching again from %s", self.res.name, self.rv)
        self.connected = True
        self.failures = 0
        src._changed_readiness()
        if not was_connected:
            src._server_back()
        try:
            for line in iter_resp_lines(resp):
                if self.stopped.is_set():
                    return
                if not line.strip():
                    continue
                self._event(line)
        finally:
            self._resp = None
            with contextlib.suppress(Exception):
                resp.release_conn()

    def _event(self, line: str) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
            raw = event["object"]
        except (ValueError, KeyError, TypeError):
            self.stats.malformed += 1
            self.stats.last_malformed = f"a watch line that is not an event: {line[:200]}"
            log.warning("%s: skipping %s", self.res.name, self.stats.last_malformed)
            return
        self.stats.events[kind] = self.stats.events.get(kind, 0) + 1
        if kind == "ERROR":
            code = raw.get("code") if isinstance(raw, dict) else None
            if code == 410:
                raise Gone()
            raise RuntimeError(f"watch error {code}: {raw.get('message') if raw else raw}")
        rv = ((raw or {}).get("metadata") or {}).get("resourceVersion") \
            if isinstance(raw, dict) else None
        if kind == "BOOKMARK":
            if rv:
                self.rv = rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            self.stats.malformed += 1
            log.warning("%s: unknown watch event type %r", self.res.name, kind)
            return
        obj = self._accept(raw)
        if obj is None:
            if rv:
                self.rv = rv
            return
        self.source._apply(self, kind, obj)
        if rv:
            self.rv = rv


def _key(obj: dict) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


# --- Source --------------------------------------------------------------------------------------


class KubeSource:
    """Lists and watches the API server; see the module's documentation."""

    def __init__(self, api_client: Any, *, node_name: str | None = None,
                 debounce: float = DEFAULT_DEBOUNCE, max_delay: float = DEFAULT_MAX_DELAY,
                 watch_timeout: float = DEFAULT_WATCH_TIMEOUT,
                 page_size: int = DEFAULT_PAGE_SIZE,
                 backoff: tuple[float, float] = DEFAULT_BACKOFF,
                 rediscover: float = DEFAULT_REDISCOVER, request_timeout: float = 30):
        self.api_client = api_client
        self.node_name = node_name
        self.debounce = debounce
        self.max_delay = max_delay
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self.backoff = backoff
        self.rediscover = rediscover
        self.request_timeout = request_timeout
        self.reflectors: dict[WatchedResource, _Reflector] = {}
        self._on_change: Callable[[Snapshot], None] | None = None
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._dirty = True  # the first complete snapshot is always delivered
        self._first_change = 0.0
        self._last_change = 0.0
        self._stop = threading.Event()
        self._retry_cond = threading.Condition()  # failed reflectors wait here
        self._server_back_generation = 0  # bumped when a reflector reconnects
        self._discovered = False
        self._required: set[WatchedResource] = set()  # must be listed before a snapshot
        self._threads: list[threading.Thread] = []
        self.snapshots = 0
        self.discovery_errors = 0
        self.last_snapshot: Snapshot | None = None
        self._built: dict[str, tuple[list[tuple], tuple]] = {}  # field -> (parts, objects)
        self.last_snapshot_time = 0.0
        self.dispatch_errors = 0
        # The runtime's optional Source.errors: what is wrong with the inputs now.
        self.errors: tuple[str, ...] = ()

    # -- Source protocol
    def start(self, on_change: Callable[[Snapshot], None]) -> None:
        self._on_change = on_change
        for target, name in ((self._discovery_loop, "discovery"),
                             (self._dispatch_loop, "dispatch")):
            t = threading.Thread(target=target, name=f"cn2mirror-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        reflectors = list(self.reflectors.values())
        for r in reflectors:
            r.stop()
        for r in reflectors:
            r.join(5)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5)

    def ready(self) -> bool:
        """In sync: discovery done, every resource listed and its watch connected."""
        with self._lock:
            reflectors = list(self.reflectors.values())
        return (self._discovered and not self._stop.is_set() and bool(reflectors)
                and all(r.synced and r.connected for r in reflectors))

    # -- extras
    def add_listener(self, listener: Callable[[Snapshot], None]) -> None:
        """Also called with every snapshot, after on_change (the status writer uses it)."""
        self._listeners.append(listener)

    def healthy(self) -> bool:
        """Liveness: the threads are running (whether or not the API server answers)."""
        if self._stop.is_set():
            return True
        return all(t.is_alive() for t in self._threads) and all(
            r.alive() for r in list(self.reflectors.values()))

    def snapshot(self) -> Snapshot | None:
        """The current objects, or None before every resource was listed once."""
        with self._lock:
            if not self._complete():
                return None
            return self._build()

    def resources(self) -> list[WatchedResource]:
        with self._lock:
            return list(self.reflectors)

    def resource_for(self, api_version: str, kind: str) -> WatchedResource | None:
        with self._lock:
            return next((r for r in self.reflectors
                         if r.api_version == api_version and r.kind == kind), None)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            time.sleep(0.02)
        return False

    # -- internals used by reflectors
    def _retry_wait(self, stopped: threading.Event, delay: float) -> None:
        """A failed reflector's backoff, cut short when another reflector reaches the API
        server again: after an outage every kind retries at once, none waits out its own
        (up to 30 s) backoff."""
        with self._retry_cond:
            generation = self._server_back_generation
            deadline = time.monotonic() + delay
            while not stopped.is_set() and generation == self._server_back_generation:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._retry_cond.wait(min(left, 0.5))  # 0.5: notice stop() promptly

    def _server_back(self) -> None:
        with self._retry_cond:
            self._server_back_generation += 1
            self._retry_cond.notify_all()

    def _backoff(self, attempt: int) -> float:
        first, cap = self.backoff
        delay = min(cap, first * (2 ** (attempt - 1)))
        return delay * (0.5 + random.random() / 2)

    def _mark(self) -> None:  # with the lock held
        now = time.monotonic()
        if not self._dirty:
            self._first_change = now
        self._dirty = True
        self._last_change = now
        self._cond.notify_all()

    def _changed_readiness(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _apply(self, refl: _Reflector, kind: str, obj: dict) -> None:
        key = _key(obj)
        meta = obj["metadata"]
        with self._lock:
            old = refl.cache.get(key)
            same_uid = old is not None and old["metadata"].get("uid") == meta.get("uid")
            if kind == "DELETED":
                if old is None or (meta.get("uid") and old["metadata"].get("uid") and
                                   not same_uid):
                    refl.stats.ignored += 1  # never seen, or an older incarnation's
                    return
                del refl.cache[key]
                refl.changed()
                self._mark()
                return
            if same_uid and _older_or_same(meta.get("resourceVersion"),
                                           old["metadata"].get("resourceVersion")):
                refl.stats.ignored += 1  # already applied (a replayed event)
                return
            refl.cache[key] = obj
            refl.changed()
            if old is None or _content(refl.res, old) != _content(refl.res, obj):
                self._mark()

    def _replace(self, refl: _Reflector, items: dict[tuple[str, str], dict]) -> None:
        with self._lock:
            old = refl.cache
            changed = not refl.synced or old.keys() != items.keys()
            for k, v in items.items():
                prev = old.get(k)
                if prev is None:
                    continue
                if prev["metadata"].get("resourceVersion") == v["metadata"].get(
                        "resourceVersion") and prev["metadata"].get("uid") == v[
                        "metadata"].get("uid"):
                    items[k] = prev  # the same version: keep the object snapshots share
                elif not changed and _content(refl.res, prev) != _content(refl.res, v):
                    changed = True
            if not (refl.synced and len(items) == len(old) and all(
                    old.get(k) is v for k, v in items.items())):
                refl.cache = items  # (every object the very same: the cache stays as it is)
                refl.changed()
            if changed:
                self._mark()

    def _forget(self, refl: _Reflector) -> None:
        with self._lock:
            if self.reflectors.get(refl.res) is refl:
                del self.reflectors[refl.res]
            self._required.discard(refl.res)
            if refl.cache:
                refl.cache = {}
                refl.changed()
                self._mark()
            self._cond.notify_all()

    def _complete(self) -> bool:  # with the lock held
        return self._discovered and all(
            self.reflectors[r].synced for r in self._required if r in self.reflectors)

    def _build(self) -> Snapshot:  # with the lock held
        parts: dict[str, list[tuple[dict, ...]]] = {f: [] for f in FIELDS.values()}
        for res, refl in sorted(self.reflectors.items(), key=lambda kv: kv[0].name):
            if refl.synced:
                parts[FIELDS[res.kind]].append(refl.objects())
        fields = {}
        for f, tuples in parts.items():
            # A kind whose objects did not change is handed over as the same tuple.
            last = self._built.get(f)
            if last is not None and len(last[0]) == len(tuples) and all(
                    a is b for a, b in zip(last[0], tuples, strict=True)):
                fields[f] = last[1]
            else:
                fields[f] = tuples[0] if len(tuples) == 1 else tuple(
                    o for t in tuples for o in t)
                self._built[f] = (tuples, fields[f])
        return Snapshot(**fields)

    # -- threads
    def _start_reflectors(self, found: Iterable[WatchedResource], required: bool) -> None:
        with self._lock:
            new = [r for r in found if r not in self.reflectors]
            for res in new:
                self.reflectors[res] = _Reflector(self, res)
                if required:
                    self._required.add(res)
        for res in new:
            log.info("watching %s (%s)", res.name, res.api_version)
            self.reflectors[res].start()

    def _discovery_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                found = discover(self.api_client, self.request_timeout)
            except Exception as e:
                self.discovery_errors += 1
                attempt += 1
                if not self._discovered:
                    log.warning("API discovery failed (%s: %s); retrying",
                                type(e).__name__, e)
                    self._stop.wait(self._backoff(attempt))
                else:
                    self._stop.wait(self.rediscover)
                continue
            attempt = 0
            first = not self._discovered
            self._start_reflectors(found, required=first)
            if first:
                with self._cond:
                    self._discovered = True
                    self._cond.notify_all()
            else:
                gone = [r for r in self.resources() if r not in found]
                for res in gone:
                    refl = self.reflectors.get(res)
                    if refl is not None:
                        log.warning("%s is no longer served", res.name)
                        refl.stop()
                        self._forget(refl)
            self._stop.wait(self.rediscover)

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not (self._dirty and self._complete()):
                    self._cond.wait(1.0)
                if self._stop.is_set():
                    return
                while not self._stop.is_set():  # debounce
                    now = time.monotonic()
                    wake = min(self._last_change + self.debounce,
                               self._first_change + self.max_delay)
                    if now >= wake:
                        break
                    self._cond.wait(wake - now)
                snapshot = self._build()
                self._dirty = False
            self.errors = self._errors()
            self.snapshots += 1
            self.last_snapshot = snapshot
            self.last_snapshot_time = time.time()
            for fn in [self._on_change, *self._listeners]:
                if fn is None:
                    continue
                try:
                    fn(snapshot)
                except Exception:
                    self.dispatch_errors += 1
                    log.exception("snapshot consumer %r failed", fn)

    def _errors(self) -> tuple[str, ...]:
        out = []
        for r in list(self.reflectors.values()):
            if not r.connected:
                out.append(f"{r.res.name}: not connected to the API server "
                           f"({r.stats.last_error or 'connecting'}); the last objects are used")
            if r.stats.malformed:
                out.append(f"{r.res.name}: skipped {r.stats.malformed} malformed watch lines "
                           f"or objects, the last: {r.stats.last_malformed}")
        return tuple(out)

    # -- metrics
    def collect(self) -> Iterable:
        from .metrics import Family

        objects = Family("cn2mirror_kube_objects", "gauge",
                         "Objects in the agent's cache, by resource.")
        local = Family("cn2mirror_kube_local_pods", "gauge", "Pods on this node.")
        synced = Family("cn2mirror_kube_synced", "gauge",
                        "1 when the resource was listed and its watch is connected.")
        restarts = Family("cn2mirror_kube_watch_restarts_total", "counter",
                          "Watches started again, by reason (timeout: the server ended it; "
                          "expired: 410 Gone, relisted; error: broken or refused).")
        relists = Family("cn2mirror_kube_relists_total", "counter", "Full lists, by resource.")
        list_time = Family("cn2mirror_kube_last_list_seconds", "gauge",
                           "How long the last full list took, by resource.")
        events = Family("cn2mirror_kube_watch_events_total", "counter",
                        "Watch events received, by resource and type.")
        ignored = Family("cn2mirror_kube_stale_events_total", "counter",
                         "Events for a version already applied (ignored).")
        malformed = Family("cn2mirror_kube_malformed_total", "counter",
                           "Watch lines or objects that could not be used (skipped).")
        with self._lock:
            reflectors = list(self.reflectors.values())
            pods_here = 0
            if self.node_name:
                for r in reflectors:
                    if r.res.kind == KIND_POD:
                        pods_here += sum(1 for p in r.cache.values()
                                         if p["spec"].get("nodeName") == self.node_name)
            sizes = {r.res: len(r.cache) for r in reflectors}
        for r in reflectors:
            lab = {"resource": r.res.name}
            objects.add(sizes[r.res], lab)
            synced.add(int(r.synced and r.connected), lab)
            for reason in ("timeout", "expired", "error"):
                restarts.add(r.stats.restarts.get(reason, 0), {**lab, "reason": reason})
            relists.add(r.stats.relists, lab)
            list_time.add(round(r.stats.list_seconds, 6), lab)
            for t, n in sorted(r.stats.events.items()):
                events.add(n, {**lab, "type": t})
            ignored.add(r.stats.ignored, lab)
            malformed.add(r.stats.malformed, lab)
        local.add(pods_here)
        snaps = Family("cn2mirror_kube_snapshots_total", "counter",
                       "Snapshots handed to the runtime.").add(self.snapshots)
        ready = Family("cn2mirror_kube_ready", "gauge",
                       "1 when in sync with the API server.").add(int(self.ready()))
        return [objects, local, synced, restarts, relists, list_time, events, ignored,
                malformed, snaps, ready]


# --- Connecting ----------------------------------------------------------------------------------


def api_client(kubeconfig: str | None = None, context: str | None = None,
               in_cluster: bool | None = None, pool_size: int = 32) -> Any:
    """An ApiClient: in-cluster config when running in a pod (or asked for), otherwise the
    kubeconfig (``kubeconfig``, $KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if in_cluster is None:
        in_cluster = kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if in_cluster:
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context,
                                client_configuration=configuration)
    # Watches hold a connection each; the status writer and the lease need their own.
    configuration.connection_pool_maxsize = pool_size
    # The source and the elector retry on their own terms (backoff, deadlines).
    configuration.retries = False
    return client.ApiClient(configuration)


def default_namespace() -> str:
    """The agent's own namespace: $POD_NAMESPACE, the service account's, or kube-system."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    with contextlib.suppress(OSError):
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    return "cn2mirror-system"


@dataclass
class KubeOptions:
    """The Kubernetes options of ``cn2mirror agent`` (see ``kube_options``)."""

    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool | None = None
    namespace: str | None = None
    lease_name: str = "cn2mirror-status"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    status: bool = True
    metrics_address: str | None = None
    debounce: float = DEFAULT_DEBOUNCE
    identity: str | None = None
    _client: Any = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> KubeOptions | None:
        """Takes (pops) the ``kube_*`` parameters that ``kube_options`` added from a
        click command's parameters; a KubeOptions with --kubernetes, else None."""
        values = {k[len("kube_"):]: params.pop(k) for k in list(params)
                  if k.startswith("kube_")}
        if not values.pop("enabled", False):
            return None
        options = cls(**values)
        if not options.lease_duration > options.renew_deadline > options.retry_period > 0:
            import click

            raise click.BadParameter("need --lease-duration > --renew-deadline > "
                                     "--retry-period > 0")
        return options

    def api_client(self) -> Any:
        if self._client is None:
            self._client = api_client(self.kubeconfig, self.context, self.in_cluster)
        return self._client

    def source(self, node_name: str | None = None) -> KubeSource:
        return KubeSource(self.api_client(), node_name=node_name, debounce=self.debounce)

    def start_services(self, source: KubeSource, node_name: str, *, agent: Any = None,
                       pin_root: str | None = None, state_dir: str | None = None,
                       registry: Any = None) -> Services:
        """Metrics server, leader election, status writer and Events, around a source.

        ``agent`` is the runtime's Agent: its ``ready()`` joins /readyz, and its
        reconcile reports (``add_listener``) feed the sync metrics and the node's own
        Events. Stop it all with ``Services.stop()`` (the lease is released)."""
        from .metrics import DatapathCollector, MetricsServer, ProcessCollector, Registry
        from .status import EventRecorder, LeaderElector, NodeReporter, StatusWriter

        api = self.api_client()
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
        namespace = self.namespace or default_namespace()
        identity = self.identity or os.environ.get("POD_NAME") or node_name
        events = EventRecorder(api, component="agent", instance=node_name)
        services.events = events
        registry.register(events)
        if self.status:
            elector = LeaderElector(api, namespace, self.lease_name, identity,
                                    lease_duration=self.lease_duration,
                                    renew_deadline=self.renew_deadline,
                                    retry_period=self.retry_period)
            writer = StatusWriter(api, source, elector, events)
            services.elector, services.writer = elector, writer
            registry.register(elector)
            registry.register(writer)
            writer.start()
            elector.start()
        services.reporter = NodeReporter(events, node_name)
        if agent is not None and hasattr(agent, "add_listener"):
            services.watch_agent()
        if self.metrics_address:
            ready = {"source": source.ready}
            if agent is not None:
                ready["agent"] = agent.ready
            services.server = MetricsServer(registry, self.metrics_address,
                                            {"source": source.healthy}, ready)
            services.server.start()
            from .metrics import parse_address

            log.info("serving /metrics, /healthz and /readyz on %s:%d",
                     parse_address(self.metrics_address)[0], services.server.port)
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
    datapath: Any = None
    sync: Any = None
    _thread: threading.Thread | None = None
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        from .metrics import SyncMetrics

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
        if self.elector is not None:
            self.elector.stop(release=True)
        if self._thread is not None:
            self._thread.join(5)
        if self.datapath is not None:
            self.datapath.close()


def kube_options(f: Callable | None = None) -> Any:
    """The Kubernetes options of ``cn2mirror agent``, as click options.

    ``kube_options()`` is the list (to add to cli/agent_cmd.py's SOURCE_OPTIONS);
    ``@kube_options`` decorates a command with them. Either way the command receives
    them as ``kube_*`` parameters, which ``KubeOptions.from_params(params)`` takes.
    """
    import click

    options = [
        click.option("--kubernetes", "kube_enabled", is_flag=True,
                     help="Read objects from the Kubernetes API (in-cluster config in a "
                          "pod, else the kubeconfig)."),
        click.option("--kubeconfig", "kube_kubeconfig", metavar="FILE",
                     type=click.Path(dir_okay=False), default=None,
                     help="Kubeconfig file [default: in a pod the in-cluster config, "
                          "else $KUBECONFIG or ~/.kube/config]."),
        click.option("--context", "kube_context", metavar="NAME", default=None,
                     help="Kubeconfig context to use."),
        click.option("--namespace", "kube_namespace", envvar="POD_NAMESPACE", metavar="NS",
                     default=None,
                     help="The agent's namespace, for its Lease [default: $POD_NAMESPACE, "
                          "else the pod's]."),
        click.option("--lease-name", "kube_lease_name", default="cn2mirror-status",
                     show_default=True, metavar="NAME",
                     help="The Lease that elects the agent writing status and Events."),
        click.option("--lease-duration", "kube_lease_duration", type=float, default=15.0,
                     show_default=True, metavar="SECONDS",
                     help="How long a lease holds without renewal."),
        click.option("--renew-deadline", "kube_renew_deadline", type=float, default=10.0,
                     show_default=True, metavar="SECONDS",
                     help="How long the leader tries to renew before it stops writing."),
        click.option("--retry-period", "kube_retry_period", type=float, default=2.0,
                     show_default=True, metavar="SECONDS",
                     help="Time between lease attempts."),
        click.option("--status/--no-status", "kube_status", default=True, show_default=True,
                     help="Take part in the election to write object status and Events."),
        click.option("--metrics-address", "kube_metrics_address", envvar="METRICS_ADDRESS",
                     metavar="HOST:PORT", default=None,
                     help="Serve /metrics, /healthz and /readyz here (any source): "
                          "HOST:PORT, e.g. "
                          "the node's address $(NODE_IP):9464 for Prometheus; :9464 is "
                          "127.0.0.1:9464 (this node only)."),
        click.option("--debounce", "kube_debounce", type=float, default=DEFAULT_DEBOUNCE,
                     show_default=True, metavar="SECONDS",
                     help="Quiet time after an API change before it is applied."),
    ]
    if f is None:
        return options
    for option in reversed(options):
        f = option(f)
    return f
