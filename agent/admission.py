"""What the API server would say of a mirroring object, offline: defaults applied, the
CRD's openAPIV3Schema, unknown fields rejected (strict field validation), then the CRD's
CEL rules (``x-kubernetes-validations``).

File mode has no API server in front of it. Objects read from files go through this, so
that an object a cluster would refuse is refused here too, with the same message, and
never reaches the compiler (agent/snapshot.py). The schemas are the generated CRDs
(manifests/crds, installed as the package data ``cn2mirror.crds``).

CEL is not evaluated by a CEL engine: each rule the CRDs carry has a Python twin in
CEL_TWINS, next to the rule's text. tests/test_crds.py checks that every rule of the
CRDs has its twin and every twin is used, and that twin and model agree.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from typing import Any

import jsonschema
import yaml

from .layout import BUDGET_BPS_MIN, SNAP_LENGTH_MIN
from .model import MIRROR_KINDS


def _is_ip(s: Any) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except (ValueError, TypeError):
        return False


def _is_cidr(s: Any) -> bool:
    try:
        ipaddress.ip_network(s, strict=False)
        return "/" in s
    except (ValueError, TypeError):
        return False


def _contains(outer: str, inner: str) -> bool:
    a, b = ipaddress.ip_network(outer, strict=False), ipaddress.ip_network(inner, strict=False)
    return a.version == b.version and b.subnet_of(a)


# Every CEL rule of the CRDs, as written there, and the same rule in Python.
CEL_TWINS: dict[str, Callable[[Any], bool]] = {
    "!has(self.nextHopMode) || self.nextHopMode != 'static' || has(self.staticNextHopHeader)":
        lambda s: s.get("nextHopMode") != "static" or "staticNextHopHeader" in s,
    "!has(self.nextHopMode) || self.nextHopMode != 'static' || "
    "(has(self.juniperHeader) && !self.juniperHeader)":
        lambda s: s.get("nextHopMode") != "static" or s.get("juniperHeader") is False,
    "!has(self.externalAnalyzer) || !self.externalAnalyzer || has(self.analyzerIP)":
        lambda s: not s.get("externalAnalyzer") or "analyzerIP" in s,
    "!has(self.nicAssistedMirroring) || !self.nicAssistedMirroring || "
    "has(self.nicAssistedVlanID)":
        lambda s: not s.get("nicAssistedMirroring") or "nicAssistedVlanID" in s,
    "!has(self.nicAssistedMirroring) || !self.nicAssistedMirroring || "
    "!has(self.nextHopMode) || self.nextHopMode != 'static'":
        lambda s: not (s.get("nicAssistedMirroring") and s.get("nextHopMode") == "static"),
    "!has(self.externalAnalyzer) || !self.externalAnalyzer || "
    "((!has(self.nextHopMode) || self.nextHopMode != 'static') && "
    "(!has(self.nicAssistedMirroring) || !self.nicAssistedMirroring))":
        lambda s: not s.get("externalAnalyzer")
        or (s.get("nextHopMode") != "static" and not s.get("nicAssistedMirroring")),
    # Output formats (issue 15): routed destinations only; sub-fields of their format.
    "!has(self.encapsulation) || !has(self.encapsulation.format) || "
    "self.encapsulation.format == 'jmirror' || "
    "((!has(self.juniperHeader) || self.juniperHeader) && "
    "(!has(self.nextHopMode) || self.nextHopMode == 'dynamic') && "
    "(!has(self.nicAssistedMirroring) || !self.nicAssistedMirroring))":
        lambda s: s.get("encapsulation", {}).get("format", "jmirror") == "jmirror"
        or (s.get("juniperHeader", True) and s.get("nextHopMode", "dynamic") == "dynamic"
            and not s.get("nicAssistedMirroring")),
    "!has(self.vni) || (has(self.format) && self.format in ['vxlan', 'geneve'])":
        lambda s: "vni" not in s or s.get("format") in ("vxlan", "geneve"),
    "!has(self.greKey) || (has(self.format) && self.format == 'gre')":
        lambda s: "greKey" not in s or s.get("format") == "gre",
    "!has(self.network) || (has(self.format) && self.format == 'contrail')":
        lambda s: "network" not in s or s.get("format") == "contrail",
    "isIP(self)": _is_ip,
    "isCIDR(self)": _is_cidr,
    "!has(self.except) || !isCIDR(self.cidr) || "
    "self.except.all(e, !isCIDR(e) || cidr(self.cidr).containsCIDR(e))":
        lambda s: "except" not in s or not _is_cidr(s["cidr"])
        or all(not _is_cidr(e) or _contains(s["cidr"], e) for e in s["except"]),
    "has(self.podSelector) || has(self.namespaceSelector) || has(self.ipBlock)":
        lambda s: bool({"podSelector", "namespaceSelector", "ipBlock"} & set(s)),
    "!has(self.ipBlock) || (!has(self.podSelector) && !has(self.namespaceSelector))":
        lambda s: "ipBlock" not in s or not ({"podSelector", "namespaceSelector"} & set(s)),
    # Copy limits (issue 15): snapLength and copyBudget.bitsPerSecond, 0 or a minimum.
    f"self == 0 || self >= {SNAP_LENGTH_MIN}": lambda s: s == 0 or s >= SNAP_LENGTH_MIN,
    f"self == 0 || self >= {BUDGET_BPS_MIN}": lambda s: s == 0 or s >= BUDGET_BPS_MIN,
    "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : "
    "(!has(self.values) || size(self.values) == 0)":
        lambda s: bool(s.get("values")) if s["operator"] in ("In", "NotIn")
        else not s.get("values"),
    "!has(self.endPort) || (has(self.port) && type(self.port) == int && "
    "self.endPort >= self.port)":
        lambda s: "endPort" not in s or (
            isinstance(s.get("port"), int) and not isinstance(s.get("port"), bool)
            and s["endPort"] >= s["port"]),
    "!has(self.port) || !has(self.protocol) || !(self.protocol in ['ICMP', 'ICMPv6'])":
        lambda s: "port" not in s or s.get("protocol") not in ("ICMP", "ICMPv6"),
}


@functools.cache
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(group, kind) -> the CRD, from the generated files shipped with the package."""
    out = {}
    for entry in resources.files("cn2mirror.crds").iterdir():
        if entry.name.endswith(".yaml") and "_" in entry.name:
            crd = yaml.safe_load(entry.read_text(encoding="utf-8"))
            out[crd["spec"]["group"], crd["spec"]["names"]["kind"]] = crd
    return out


def schema_of(api_version: str, kind: str) -> dict[str, Any] | None:
    group, _, version = api_version.rpartition("/")
    crd = crds().get((group, kind))
    if crd is None:
        return None
    return next((v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]
                 if v["name"] == version), None)


def apply_defaults(schema: dict[str, Any], value: Any) -> None:
    """Structural defaulting, as the API server does before validating."""
    if schema.get("type") == "object" and isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
    elif schema.get("type") == "array" and isinstance(value, list):
        for item in value:
            apply_defaults(schema["items"], item)


def walk(schema: dict[str, Any], value: Any, path: str = "") -> Iterator[tuple]:
    """(schema, value, path) for every value, depth first."""
    yield schema, value, path
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                yield from walk(sub, value[key], f"{path}.{key}")
        if isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                yield from walk(schema["additionalProperties"], item, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from walk(schema["items"], item, f"{path}[{i}]")


def unknown_fields(schema: dict[str, Any], value: Any) -> list[str]:
    return [
        f"{path}.{key}"
        for sub, v, path in walk(schema, value)
        if isinstance(v, dict) and "properties" in sub
        for key in v
        if key not in sub["properties"]
    ]


def cel_violations(schema: dict[str, Any], value: Any) -> list[str]:
    return [
        f"{path or '.'}: {rule['message']}"
        for sub, v, path in walk(schema, value)
        for rule in sub.get("x-kubernetes-validations", [])
        if not CEL_TWINS[rule["rule"]](v)
    ]


def admission_errors(obj: Mapping[str, Any]) -> list[str]:
    """What the API server would say of ``obj`` (with the CRDs installed); [] if it would
    accept it. Kinds that are not ours (Pods, Namespaces) are the kubelet's and the API
    server's business: accepted."""
    if obj.get("kind") not in MIRROR_KINDS:
        return []
    schema = schema_of(str(obj.get("apiVersion")), obj["kind"])
    if schema is None:
        return [f"no CRD serves {obj.get('apiVersion')} {obj['kind']}"]
    obj = copy.deepcopy(dict(obj))
    apply_defaults(schema, obj)
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(obj)
    ]
    errors += [f"unknown field {p}" for p in unknown_fields(schema, obj)]
    # The API server runs CEL rules only on values of the declared types.
    return errors or cel_violations(schema, obj)
