"""A small Kubernetes API server on 127.0.0.1, for tests that use the real client.

It speaks enough of the API for cn2mirror's agent: discovery (/api, /apis and their
group versions), list (with limit/continue), watch (resourceVersion, bookmarks,
timeoutSeconds, 410 Gone for a compacted resourceVersion), get, create, replace (with
resourceVersion conflicts), merge patch, delete, and the status subresource, for pods,
namespaces, leases, events and any CustomResourceDefinition installed from YAML.

Objects can also be changed directly from the test (``apply``, ``delete``), and faults
injected: ``cut_watches`` (streams broken mid-line), ``compact`` (later watches from an
older resourceVersion get 410), ``inject_line`` (a malformed line in every stream),
``go_down``/``come_up`` (the port refuses connections, then serves again).

It is not a validating server: CRD schemas are not checked, except that the main
resource ignores status and the status subresource ignores everything else.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import itertools
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from .builders import wait_until


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = False  # has a status subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def store(self) -> tuple[str, str]:
        """Objects are shared between the versions of a resource."""
        return self.group, self.plural


BUILTIN = (
    Resource("", "v1", "pods", "Pod", True, True),
    Resource("", "v1", "namespaces", "Namespace", False, True),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
    Resource("events.k8s.io", "v1", "events", "Event", True),
)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict
    body: Any
    user_agent: str


@dataclass
class _Watch:
    resource: Resource
    namespace: str | None
    queue: queue.Queue = field(default_factory=queue.Queue)
    sock: socket.socket | None = None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


class KubeEmulator:
    """Start with start() (or a with block); stop() closes everything."""

    def __init__(self, bookmark_interval: float | None = None):
        self.lock = threading.RLock()
        self.resources: list[Resource] = list(BUILTIN)
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self.rv = 1
        self.compacted_rv = 0  # watches from a resourceVersion below this get 410
        self.history: list[tuple[int, tuple[str, str], str, dict]] = []
        self.watches: list[_Watch] = []
        self.bookmark_interval = bookmark_interval
        self.requests: list[Request] = []
        self.fail_next: list[tuple[str, int]] = []  # (path prefix, HTTP status) to fail once
        self.continues: dict[str, tuple[int, list[dict]]] = {}
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.host = "127.0.0.1"
        self.down = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> KubeEmulator:
        emulator = self

        class Handler(_Handler):
            emu = emulator

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.down = False
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._cut_connections()

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def configuration(self):
        from kubernetes import client

        c = client.Configuration()
        c.host = self.url
        c.connection_pool_maxsize = 32
        c.retries = False  # as agent.kube.api_client() sets it
        return c

    # ------------------------------------------------------------------ faults
    def go_down(self) -> None:
        """Refuse connections (the port is closed) and break every open one."""
        self.stop()
        self.down = True

    def come_up(self) -> None:
        self.start()

    def cut_watches(self) -> int:
        """Break every watch stream in the middle of a line; returns how many."""
        with self.lock:
            watches = list(self.watches)
        for w in watches:
            w.queue.put(("cut", None))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with self.lock:
                if not any(w in self.watches for w in watches):
                    break
            time.sleep(0.01)
        return len(watches)

    def watching(self, plural: str) -> bool:
        """Whether a watch stream of ``plural`` is open (lines injected before are lost)."""
        with self.lock:
            return any(w.resource.plural == plural for w in self.watches)

    def inject_line(self, line: str, plural: str | None = None) -> None:
        """Send a raw line (a malformed event, say) into the open watch streams."""
        with self.lock:
            for w in self.watches:
                if plural is None or w.resource.plural == plural:
                    w.queue.put(("raw", line))

    def compact(self, everyone: bool = False) -> int:
        """Forget the history: a watch from an older resourceVersion gets 410 Gone.
        ``everyone``: first move the resourceVersion on (as other resources' changes do),
        so that even a client that saw the very last event must relist."""
        with self.lock:
            if everyone:
                self.rv += 1
            self.compacted_rv = self.rv
            self.history.clear()
            self.continues.clear()
            return self.rv

    def send_bookmarks(self) -> None:
        with self.lock:
            for w in self.watches:
                w.queue.put(("bookmark", None))

    def watch_count(self, plural: str | None = None) -> int:
        with self.lock:
            return sum(1 for w in self.watches if plural is None or w.resource.plural == plural)

    def _cut_connections(self) -> None:
        with self.lock:
            conns = list(self._connections)
            watches = list(self.watches)
        for w in watches:
            w.queue.put(("cut", None))
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ resources
    def install_crd(self, crd: dict) -> list[Resource]:
        spec = crd["spec"]
        added = []
        for v in spec["versions"]:
            if not v.get("served", True):
                continue
            r = Resource(spec["group"], v["name"], spec["names"]["plural"],
                         spec["names"]["kind"], spec["scope"] == "Namespaced",
                         "status" in (v.get("subresources") or spec.get("subresources") or {}))
            with self.lock:
                if r not in self.resources:
                    self.resources.append(r)
                    added.append(r)
        return added

    def install_crd_files(self, paths: Iterable[str]) -> None:
        for path in paths:
            with open(path) as f:
                for doc in yaml.safe_load_all(f):
                    if doc and doc.get("kind") == "CustomResourceDefinition":
                        self.install_crd(doc)

    def remove_group(self, group: str) -> None:
        with self.lock:
            self.resources = [r for r in self.resources if r.group != group]

    def resource(self, api_version: str, kind: str) -> Resource:
        group, _, version = api_version.rpartition("/")
        for r in self.resources:
            if r.group == group and r.version == version and r.kind == kind:
                return r
        raise ApiError(404, "NotFound", f"no resource for {api_version} {kind}")

    def _by_plural(self, group: str, version: str, plural: str) -> Resource:
        for r in self.resources:
            if r.group == group and r.version == version and r.plural == plural:
                return r
        raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                                        f"({group}/{version} {plural})")

    # ------------------------------------------------------------------ storage
    def _out(self, r: Resource, obj: dict) -> dict:
        out = copy.deepcopy(obj)
        out["apiVersion"], out["kind"] = r.api_version, r.kind
        return out

    def _record(self, r: Resource, event: str, obj: dict) -> None:
        stored = copy.deepcopy(obj)
        self.history.append((self.rv, r.store, event, stored))
        for w in self.watches:
            if w.resource.store == r.store and (
                    w.namespace is None or stored["metadata"].get("namespace") == w.namespace):
                w.queue.put(("event", (event, stored)))

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def create(self, r: Resource, obj: dict, namespace: str | None = None) -> dict:
        with self.lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name"):
                if meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                else:
                    raise ApiError(422, "Invalid", "metadata.name: Required value")
            if r.namespaced:
                meta["namespace"] = namespace or meta.get("namespace") or "default"
            else:
                meta.pop("namespace", None)
            key = (meta.get("namespace") or "", meta["name"])
            store = self.objects.setdefault(r.store, {})
            if key in store:
                raise ApiError(409, "AlreadyExists",
                               f'{r.plural} "{meta["name"]}" already exists')
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
            meta["resourceVersion"] = self._next_rv()
            obj["apiVersion"], obj["kind"] = r.api_version, r.kind
            store[key] = obj
            self._record(r, "ADDED", obj)
            return self._out(r, obj)

    def get(self, r: Resource, name: str, namespace: str | None = None) -> dict:
        with self.lock:
            obj = self.objects.get(r.store, {}).get((namespace or "", name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{r.plural} "{name}" not found')
            return self._out(r, obj)

    def update(self, r: Resource, name: str, namespace: str | None, new: dict,
               subresource: str | None = None, check_rv: bool = True) -> dict:
        with self.lock:
            store = self.objects.get(r.store, {})
            key = (namespace or "", name)
            old = store.get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{r.plural} "{name}" not found')
            given_rv = (new.get("metadata") or {}).get("resourceVersion")
            if check_rv and given_rv and given_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {r.plural} '
                               f'"{name}": the object has been modified; please apply your '
                               'changes to the latest version and try again')
            obj = copy.deepcopy(old)
            if subresource == "status":
                obj["status"] = copy.deepcopy(new.get("status"))
            else:
                keep_meta = {k: old["metadata"][k] for k in
                             ("uid", "creationTimestamp", "generation", "name", "namespace")
                             if k in old["metadata"]}
                obj = copy.deepcopy(new)
                obj["metadata"] = {**(new.get("metadata") or {}), **keep_meta}
                if r.status:
                    obj["status"] = copy.deepcopy(old.get("status"))
                    if obj.get("status") is None:
                        obj.pop("status", None)
                if obj.get("spec") != old.get("spec"):
                    obj["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            obj["apiVersion"], obj["kind"] = r.api_version, r.kind
            obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if obj == {**old, "apiVersion": r.api_version, "kind": r.kind}:
                return self._out(r, old)  # no change: no new resourceVersion, no event
            obj["metadata"]["resourceVersion"] = self._next_rv()
            store[key] = obj
            self._record(r, "MODIFIED", obj)
            return self._out(r, obj)

    def patch(self, r: Resource, name: str, namespace: str | None, patch: Any,
              subresource: str | None = None) -> dict:
        with self.lock:
            current = self.get(r, name, namespace)
            if not isinstance(patch, dict):
                raise ApiError(415, "UnsupportedMediaType", "only merge patches are served")
            merged = merge_patch(current, patch)
            merged.setdefault("metadata", {}).pop("resourceVersion", None)
            if (patch.get("metadata") or {}).get("resourceVersion"):
                merged["metadata"]["resourceVersion"] = patch["metadata"]["resourceVersion"]
            return self.update(r, name, namespace, merged, subresource)

    def remove(self, r: Resource, name: str, namespace: str | None = None) -> dict:
        with self.lock:
            store = self.objects.get(r.store, {})
            obj = store.pop((namespace or "", name), None)
            if obj is None:
                raise ApiError(404, "NotFound", f'{r.plural} "{name}" not found')
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = self._next_rv()
            self._record(r, "DELETED", obj)
            return self._out(r, obj)

    def list(self, r: Resource, namespace: str | None = None) -> tuple[int, list[dict]]:
        """Shallow copies: stored objects are replaced on change, never changed in place."""
        with self.lock:
            items = [{**o, "apiVersion": r.api_version, "kind": r.kind}
                     for (ns, _), o in sorted(self.objects.get(r.store, {}).items())
                     if namespace is None or ns == namespace]
            return self.rv, items

    # ------------------------------------------------------------------ test helpers
    def apply(self, obj: dict) -> dict:
        """Create or replace (keeping status) an object given with apiVersion and kind."""
        r = self.resource(obj["apiVersion"], obj["kind"])
        meta = obj.get("metadata") or {}
        ns = (meta.get("namespace") or "default") if r.namespaced else None
        with self.lock:
            try:
                self.get(r, meta["name"], ns)
            except ApiError:
                created = self.create(r, obj, ns)
                if r.status and obj.get("status") is not None:
                    return self.update(r, meta["name"], ns, obj, "status", check_rv=False)
                return created
            new = copy.deepcopy(obj)
            new.setdefault("metadata", {}).pop("resourceVersion", None)
            out = self.update(r, meta["name"], ns, new)
            if r.status and obj.get("status") is not None:
                out = self.update(r, meta["name"], ns, obj, "status", check_rv=False)
            return out

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None
               ) -> dict:
        r = self.resource(api_version, kind)
        return self.remove(r, name, (namespace or "default") if r.namespaced else None)

    def read(self, api_version: str, kind: str, name: str, namespace: str | None = None
             ) -> dict:
        r = self.resource(api_version, kind)
        return self.get(r, name, (namespace or "default") if r.namespaced else None)

    def items(self, api_version: str, kind: str) -> list[dict]:
        return self.list(self.resource(api_version, kind))[1]

    def requests_matching(self, method: str, fragment: str = "", user_agent: str | None = None
                          ) -> list[Request]:
        with self.lock:
            return [q for q in self.requests if q.method == method and fragment in q.path
                    and (user_agent is None or q.user_agent == user_agent)]

    # ------------------------------------------------------------------ discovery
    def discovery(self, path: list[str]) -> dict:
        with self.lock:
            resources = list(self.resources)
        if path == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                    "serverAddress": self.url}]}
        if path == ["apis"]:
            groups: dict[str, list[str]] = {}
            for r in resources:
                if r.group:
                    versions = groups.setdefault(r.group, [])
                    if r.version not in versions:
                        versions.append(r.version)
            out = []
            for g, versions in groups.items():
                # The preferred version: the last one installed (CRDs list storage last).
                vs = [{"groupVersion": f"{g}/{v}", "version": v} for v in versions]
                out.append({"name": g, "versions": vs, "preferredVersion": vs[-1]})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": out}
        if path[0] == "api":
            group, version = "", path[1]
        else:
            group, version = path[1], path[2]
        found = [r for r in resources if r.group == group and r.version == version]
        if not found:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        listed = []
        for r in found:
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            listed.append({"name": r.plural, "singularName": r.kind.lower(),
                           "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs})
            if r.status:
                listed.append({"name": f"{r.plural}/status", "singularName": "",
                               "namespaced": r.namespaced, "kind": r.kind,
                               "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": listed}


_continue_ids = itertools.count(1)


class _Handler(BaseHTTPRequestHandler):
    emu: KubeEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm
        # and the client's delayed ACK add 40 ms to every request on a kept-alive
        # connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.emu.lock:
            self.emu._connections.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.emu.lock:
            self.emu._connections.discard(self.connection)

    # ------------------------------------------------------------------ plumbing
    def _send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else None

    def _route(self, method: str) -> None:
        emu = self.emu
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        body = None
        try:
            if method in ("POST", "PUT", "PATCH"):
                body = self._body()
            with emu.lock:
                emu.requests.append(Request(method, url.path, query, body,
                                            self.headers.get("User-Agent", "")))
                for i, (prefix, code) in enumerate(emu.fail_next):
                    if url.path.startswith(prefix):
                        del emu.fail_next[i]
                        raise ApiError(code, "InternalError", "injected failure")
            if method == "GET" and (parts in (["api"], ["apis"]) or
                                    (parts[:1] == ["api"] and len(parts) == 2) or
                                    (parts[:1] == ["apis"] and len(parts) == 3)):
                return self._send_json(200, emu.discovery(parts))
            if parts == ["version"]:
                return self._send_json(200, {"major": "1", "minor": "31",
                                             "gitVersion": "v1.31.0-emulated"})
            r, namespace, name, sub = self._target(parts)
            if method == "GET" and name is None:
                if query.get("watch") in ("true", "1"):
                    return self._watch(r, namespace, query)
                return self._list(r, namespace, query)
            if method == "GET":
                return self._send_json(200, emu.get(r, name, namespace))
            if method == "POST":
                return self._send_json(201, emu.create(r, body or {}, namespace))
            if method == "PUT":
                return self._send_json(200, emu.update(r, name, namespace, body or {}, sub))
            if method == "PATCH":
                ctype = self.headers.get("Content-Type", "")
                if "json-patch" in ctype or "apply-patch" in ctype:
                    raise ApiError(415, "UnsupportedMediaType", f"{ctype} is not served here")
                return self._send_json(200, emu.patch(r, name, namespace, body, sub))
            if method == "DELETE":
                return self._send_json(200, emu.remove(r, name, namespace))
            raise ApiError(405, "MethodNotAllowed", method)
        except ApiError as e:
            self._send_json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass

    def _target(self, parts: list[str]) -> tuple[Resource, str | None, str | None, str | None]:
        emu = self.emu
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "not found")
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        with emu.lock:
            r = emu._by_plural(group, version, rest[0])
        if namespace is not None and not r.namespaced:
            raise ApiError(404, "NotFound", "not found")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and (sub != "status" or not r.status):
            raise ApiError(404, "NotFound", f"no subresource {sub}")
        return r, namespace, name, sub

    def _list(self, r: Resource, namespace: str | None, query: dict) -> None:
        emu = self.emu
        token = query.get("continue")
        limit = int(query.get("limit") or 0)
        with emu.lock:
            if token:
                if token not in emu.continues:
                    raise ApiError(410, "Expired", "The provided continue parameter is too "
                                                   "old to display a consistent list result.")
                rv, items = emu.continues.pop(token)
            else:
                rv, items = emu.list(r, namespace)
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                next_token = f"c{next(_continue_ids)}"
                emu.continues[next_token] = (rv, items[limit:])
                items = items[:limit]
                meta["continue"] = next_token
        for item in items:  # typed lists carry no kind or apiVersion on their items
            item.pop("kind", None)
            item.pop("apiVersion", None)
        self._send_json(200, {"kind": f"{r.kind}List", "apiVersion": r.api_version,
                              "metadata": meta, "items": items})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, r: Resource, namespace: str | None, query: dict) -> None:
        emu = self.emu
        rv_text = query.get("resourceVersion") or "0"
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        w = _Watch(r, namespace, sock=self.connection)
        backlog: list[tuple[str, Any]] = []
        gone = None
        with emu.lock:
            start_rv = int(rv_text)
            if start_rv == 0:
                _, items = emu.list(r, namespace)
                backlog = [("event", ("ADDED", o)) for o in items]
            elif start_rv < emu.compacted_rv:
                gone = start_rv
            else:
                backlog = [("event", (e, o)) for rv, store, e, o in emu.history
                           if rv > start_rv and store == r.store and
                           (namespace is None or o["metadata"].get("namespace") == namespace)]
            if gone is None:
                emu.watches.append(w)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if gone is not None:
                status = ApiError(410, "Expired", f"too old resource version: {gone} "
                                                  f"({emu.compacted_rv})").status()
                self._chunk(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                self._chunk(b"")
                return
            for item in backlog:
                w.queue.put(item)
            deadline = time.monotonic() + timeout
            last_bookmark = time.monotonic()
            while True:
                now = time.monotonic()
                if now >= deadline:
                    self._chunk(b"")
                    return
                if (bookmarks and emu.bookmark_interval and
                        now - last_bookmark >= emu.bookmark_interval):
                    w.queue.put(("bookmark", None))
                    last_bookmark = now
                try:
                    what, data = w.queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if what == "cut":
                    # Half an event, then the connection breaks.
                    self._chunk(b'{"type": "MODIFIED", "object": {"metadata": {"na')
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if what == "raw":
                    self._chunk(data.encode() + b"\n")
                elif what == "bookmark":
                    if not bookmarks:
                        continue
                    with emu.lock:
                        pending = not w.queue.empty()
                        rv = emu.rv
                    if pending:
                        continue  # a bookmark's version must follow every event sent
                    self._chunk(json.dumps({"type": "BOOKMARK", "object": {
                        "kind": r.kind, "apiVersion": r.api_version,
                        "metadata": {"resourceVersion": str(rv)}}}).encode() + b"\n")
                else:
                    event, obj = data
                    line = json.dumps({"type": event, "object": emu._out(r, obj)})
                    self._chunk(line.encode() + b"\n")
        except OSError:
            self.close_connection = True
        finally:
            with emu.lock:
                if w in emu.watches:
                    emu.watches.remove(w)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_DELETE(self) -> None:
        self._route("DELETE")


# --- Helpers for the tests that use the emulator ---------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "manifests" / "crds"


def crd_files(group: str) -> list[str]:
    return sorted(str(p) for p in CRD_DIR.glob(f"{group}_*.yaml"))


class Snapshots:
    """Collects the snapshots a source delivers (its on_change)."""

    def __init__(self) -> None:
        self.all: list = []
        self._lock = threading.Lock()

    def __call__(self, snapshot) -> None:
        with self._lock:
            self.all.append(snapshot)

    @property
    def count(self) -> int:
        return len(self.all)

    @property
    def last(self):
        return self.all[-1] if self.all else None

    def wait(self, predicate, timeout: float = 5.0, what: str = ""):
        """The first snapshot (newest first) that satisfies predicate, waiting for it."""
        def found():
            snap = self.last
            return snap if snap is not None and predicate(snap) else None
        return wait_until(found, timeout, what=what)


def names(objs) -> list[str]:
    return sorted(f"{o['metadata'].get('namespace', '')}/{o['metadata']['name']}".lstrip("/")
                  for o in objs)
