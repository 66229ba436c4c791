"""One resource listed and watched into its cache, as client-go's reflectors do: a
paginated list, then a watch from the list's resourceVersion with bookmarks; a watch
that ends or breaks is resumed from the last resourceVersion seen (backoff with jitter
after the first time), 410 Gone relists. The cache and what changed are handed to the
source (source.py), which makes snapshots."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .resources import WatchedResource, get_json, object_key, trim

if TYPE_CHECKING:
    from .source import KubeSource

log = logging.getLogger(__name__)


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


class Reflector:
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
                data = get_json(self._call, limit=self.source.page_size, _continue=token,
                                 _request_timeout=self.source.request_timeout)
            except ApiException as e:
                _raise_stream_error(e)
                raise
            for item in data.get("items") or []:
                obj = self._accept(item, self.cache)
                if obj is not None:
                    items[object_key(obj)] = obj
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
