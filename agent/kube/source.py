"""``KubeSource``: the runtime's Source over the Kubernetes API. It discovers what to
watch, runs one Reflector per resource, and hands the runtime a complete Snapshot when
the objects changed, debounced; ready() while in sync with the API server; its metrics
(collect()) count objects, watches, relists and events."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..defaults import DEFAULT_DEBOUNCE
from ..model import KIND_POD
from ..snapshot import FIELDS, Snapshot
from .reflector import Reflector
from .resources import WatchedResource, content, discover, object_key, older_or_same

log = logging.getLogger(__name__)

DEFAULT_MAX_DELAY = 0.5  # longest a change waits for a snapshot while changes keep coming
DEFAULT_WATCH_TIMEOUT = 300  # server-side timeoutSeconds (randomised up to twice as much)
DEFAULT_PAGE_SIZE = 100  # a page is decoded whole: smaller pages, a smaller peak (agent RSS)
DEFAULT_BACKOFF = (0.2, 30.0)  # first retry delay, cap
DEFAULT_REDISCOVER = 60.0


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
        self.reflectors: dict[WatchedResource, Reflector] = {}
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

    def _apply(self, refl: Reflector, kind: str, obj: dict) -> None:
        key = object_key(obj)
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
            if same_uid and older_or_same(meta.get("resourceVersion"),
                                           old["metadata"].get("resourceVersion")):
                refl.stats.ignored += 1  # already applied (a replayed event)
                return
            refl.cache[key] = obj
            refl.changed()
            if old is None or content(refl.res, old) != content(refl.res, obj):
                self._mark()

    def _replace(self, refl: Reflector, items: dict[tuple[str, str], dict]) -> None:
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
                elif not changed and content(refl.res, prev) != content(refl.res, v):
                    changed = True
            if not (refl.synced and len(items) == len(old) and all(
                    old.get(k) is v for k, v in items.items())):
                refl.cache = items  # (every object the very same: the cache stays as it is)
                refl.changed()
            if changed:
                self._mark()

    def _forget(self, refl: Reflector) -> None:
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
                self.reflectors[res] = Reflector(self, res)
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
        from ..metrics import Family

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
