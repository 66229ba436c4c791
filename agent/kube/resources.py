"""What the Kubernetes source watches (``WatchedResource``, found by ``discover``) and how
an object is trimmed as it arrives: managedFields and last-applied annotations go; pods
keep only what the compiler reads (10,000 pods stay small, and a pod status update that
changes nothing cn2mirror reads makes no snapshot)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..model import GROUP_VERSIONS, KIND_NAMESPACE, KIND_POD, MIRROR_KINDS

log = logging.getLogger(__name__)

# Pod annotations the model reads start with one of these; the others are dropped.
POD_ANNOTATION_PREFIXES = ("core.juniper.net/", "cn2mirror.io/", "k8s.v1.cni.cncf.io/")
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


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


def get_json(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    resp = fn(*args, _preload_content=False, **kwargs)
    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


def discover(api_client: Any, timeout: float = 10) -> list[WatchedResource]:
    """Pods, Namespaces, and the mirroring kinds of both groups the server serves."""
    from kubernetes import client

    found = [PODS, NAMESPACES]
    groups = get_json(client.ApisApi(api_client).get_api_versions, _request_timeout=timeout)
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
        listing = get_json(client.CustomObjectsApi(api_client).get_api_resources, name,
                            version, _request_timeout=timeout)
        for r in listing.get("resources") or []:
            if "/" not in r.get("name", "/") and r.get("kind") in MIRROR_KINDS:
                found.append(WatchedResource(r["kind"], name, version, r["name"],
                                             bool(r.get("namespaced"))))
    return found


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


def content(res: WatchedResource, obj: dict) -> dict:
    """What decides whether an update changes anything: no resourceVersion, and for
    cn2mirror's own kinds no status and no generation (the status writer's own writes)."""
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    if res.kind in MIRROR_KINDS:
        meta.pop("generation", None)
        return {**{k: v for k, v in obj.items() if k not in ("status", "metadata")},
                "metadata": meta}
    return {**obj, "metadata": meta}


def older_or_same(new_rv: str | None, old_rv: str | None) -> bool:
    """Whether new_rv is not newer than old_rv. resourceVersions are compared as numbers
    when both are (etcd's are); otherwise only equality counts."""
    if not new_rv or not old_rv:
        return False
    if new_rv.isdigit() and old_rv.isdigit():
        return int(new_rv) <= int(old_rv)
    return new_rv == old_rv


def object_key(obj: dict) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]
