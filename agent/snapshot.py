"""A snapshot of the cluster objects the compiler reads, and a loader for YAML files.

The snapshot keeps the objects as plain dicts, exactly as they were read (from files here,
from the API by the agent's watcher): parsing happens in the compiler. The file loader
rejects documents that are not Kubernetes objects at all, or that it cannot place (no
kind, no name, an apiVersion the kind is not served as), and mirroring objects that the
API server would refuse (agent/admission.py: the CRD's schema, unknown fields, its CEL
rules), with the API server's message: files stand in for the API server.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .model import (
    API_VERSIONS,
    KIND_CSP,
    KIND_GCSP,
    KIND_MD,
    KIND_NAMESPACE,
    KIND_POD,
    NAMESPACED_KINDS,
)

Obj = Mapping[str, Any]

# Which Snapshot field holds each kind.
FIELDS = {
    KIND_POD: "pods",
    KIND_NAMESPACE: "namespaces",
    KIND_MD: "destinations",
    KIND_CSP: "policies",
    KIND_GCSP: "global_policies",
}
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Snapshot:
    """The objects of one cluster that concern mirroring, as plain dicts."""

    pods: tuple[Obj, ...] = ()
    namespaces: tuple[Obj, ...] = ()
    destinations: tuple[Obj, ...] = ()  # MirrorDestinations
    policies: tuple[Obj, ...] = ()  # ContrailSecurityPolicies
    global_policies: tuple[Obj, ...] = ()  # GlobalContrailSecurityPolicies

    def objects(self) -> tuple[Obj, ...]:
        return sum((getattr(self, f) for f in FIELDS.values()), ())

    def by_kind(self) -> dict[str, tuple[Obj, ...]]:
        return {kind: getattr(self, f) for kind, f in FIELDS.items()}

    def merged(self, other: Snapshot) -> Snapshot:
        return Snapshot(**{f: getattr(self, f) + getattr(other, f) for f in FIELDS.values()})


@dataclass(frozen=True)
class LoadError:
    """A document that could not be loaded; everything else in the file still is."""

    path: str
    document: int  # 1-based among the file's non-empty documents; 0: the file itself
    reason: str
    line: int | None = None  # 1-based line where the document starts
    # The object refused (kind, namespace, name) when it was one the API server would
    # have refused; its last accepted version may stay in use (agent/filesource.py).
    rejected: tuple[str, str, str] | None = None

    def __str__(self) -> str:
        where = self.path
        if self.document:
            where += f": document {self.document}"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.reason}"


def snapshot_from_objects(objects: Iterable[Any], source: str = "<objects>",
                          ) -> tuple[Snapshot, list[LoadError]]:
    """Sorts objects (and the items of Kubernetes List objects) into a Snapshot.

    Kinds cn2mirror does not read are skipped. ``document`` in errors is the 1-based
    position of the object in ``objects``.
    """
    buckets: dict[str, list[Obj]] = {f: [] for f in FIELDS.values()}
    errors: list[LoadError] = []
    for index, obj in enumerate(objects, start=1):
        for accepted, reason in _accept(obj):
            if reason is not None:
                errors.append(LoadError(source, index, reason))
            else:
                buckets[FIELDS[accepted["kind"]]].append(accepted)
    return Snapshot(**{f: tuple(v) for f, v in buckets.items()}), errors


def _accept(obj: Any, where: str = "") -> Iterable[tuple[Obj, str | None]]:
    """(object, None) for each object to keep, ({}, reason) for each one to reject."""
    prefix = f"{where}: " if where else ""
    if not isinstance(obj, Mapping):
        yield {}, f"{prefix}not a mapping but {type(obj).__name__}"
        return
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        yield {}, f"{prefix}no kind"
        return
    if isinstance(obj.get("items"), list) and kind.endswith("List"):
        # `kubectl get -o yaml` gives kind List; the API gives typed lists (PodList) whose
        # items carry no kind or apiVersion of their own.
        item_kind = kind[: -len("List")] or None
        for i, item in enumerate(obj["items"]):
            if isinstance(item, Mapping) and item_kind and "kind" not in item:
                item = {"kind": item_kind, "apiVersion": obj.get("apiVersion"), **item}
            yield from _accept(item, f"{where}.items[{i}]" if where else f"items[{i}]")
        return
    if kind not in FIELDS:
        return  # a kind cn2mirror does not read: ignored
    if obj.get("apiVersion") not in API_VERSIONS[kind]:
        yield {}, (f"{prefix}{kind} is served as {', '.join(API_VERSIONS[kind])}, "
                   f"not {obj.get('apiVersion')!r}")
        return
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        yield {}, f"{prefix}{kind} has no metadata"
        return
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        yield {}, f"{prefix}{kind} has no metadata.name"
        return
    if kind in NAMESPACED_KINDS and not meta.get("namespace"):
        # As kubectl would, with the default namespace as the context's.
        obj = {**obj, "metadata": {**meta, "namespace": "default"}}
    yield obj, None


# A line that starts a YAML document ("---", possibly followed by content) or ends one.
_DOC_START = re.compile(r"^---(\s|$)")
_DOC_END = re.compile(r"^\.\.\.\s*$")


def _split_documents(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each document, split at --- and ... markers.

    Each document is then parsed on its own, so that a syntax error in one does not stop
    the others from loading (PyYAML's load_all stops at the first error).
    """
    docs: list[tuple[int, str]] = []
    start, lines = 1, []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if _DOC_START.match(line):
            docs.append((start, "".join(lines)))
            start, lines = number, [line[3:].lstrip(" \t") if line.strip() != "---" else ""]
        elif _DOC_END.match(line):
            docs.append((start, "".join(lines)))
            start, lines = number + 1, []
        else:
            lines.append(line)
    docs.append((start, "".join(lines)))
    return docs


def load_text(text: str, source: str = "<text>") -> tuple[Snapshot, list[LoadError]]:
    """Loads a multi-document YAML text; errors name ``source``."""
    objects: list[tuple[int, int, Any]] = []
    errors: list[LoadError] = []
    index = 0
    for line, chunk in _split_documents(text):
        try:
            data = yaml.safe_load(chunk)
        except yaml.YAMLError as e:
            index += 1
            errors.append(LoadError(source, index, _yaml_reason(e, line), line))
            continue
        if data is None:
            continue  # empty, or only comments: not counted as a document
        index += 1
        objects.append((index, line, data))
    snapshot = Snapshot()
    for index, line, data in objects:
        part, errs = snapshot_from_objects([data], source)
        part, refused = _admitted(part)
        snapshot = snapshot.merged(part)
        errors += [LoadError(source, index, e.reason, line) for e in errs]
        errors += [LoadError(source, index, reason, line, rejected=ident)
                   for ident, reason in refused]
    errors.sort(key=lambda e: e.document)
    return snapshot, errors


def identity(obj: Obj) -> tuple[str, str, str]:
    """(kind, namespace, name): what the API server keys an object by."""
    meta = obj.get("metadata") or {}
    return obj.get("kind", ""), meta.get("namespace") or "", meta.get("name") or ""


def _admitted(snapshot: Snapshot) -> tuple[Snapshot, list[tuple[tuple[str, str, str], str]]]:
    """The objects the API server would accept, and the refused ones with why."""
    from .admission import admission_errors

    refused = []
    kept: dict[str, list[Obj]] = {}
    for kind, objs in snapshot.by_kind().items():
        kept[FIELDS[kind]] = []
        for obj in objs:
            errors = admission_errors(obj)
            if errors:
                kind_, ns, name = identity(obj)
                shown = f"{ns}/{name}" if ns else name
                refused.append((identity(obj), f"{kind_} {shown} is invalid (the API server "
                                f"would refuse it): " + "; ".join(errors)))
            else:
                kept[FIELDS[kind]].append(obj)
    return Snapshot(**{f: tuple(v) for f, v in kept.items()}), refused


def _yaml_reason(error: yaml.YAMLError, first_line: int) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"invalid YAML at line {first_line + mark.line}: {problem}"
    return f"invalid YAML: {problem}"


def _yaml_files(path: Path) -> list[Path]:
    if path.is_dir():
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            found += [Path(root, f) for f in sorted(files) if f.endswith(YAML_SUFFIXES)]
        return found
    return [path]


def load_paths(paths: Iterable[str | os.PathLike[str]]) -> tuple[Snapshot, list[LoadError]]:
    """Loads YAML files, and directories recursively (their *.yaml and *.yml files).

    Files are read in the order given, each directory's in name order. A file given by
    name is read whatever its suffix.
    """
    snapshot, errors = Snapshot(), []
    for given in paths:
        given = Path(given)
        if not given.exists():
            errors.append(LoadError(str(given), 0, "no such file or directory"))
            continue
        for path in _yaml_files(given):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                errors.append(LoadError(str(path), 0, f"cannot read: {e}"))
                continue
            part, errs = load_text(text, str(path))
            snapshot = snapshot.merged(part)
            errors += errs
    return snapshot, errors
