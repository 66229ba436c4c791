"""The CRDs: generated, well formed, the same in both API groups, and as strict as the model.

Objects are checked offline as the API server would: defaults applied, then the CRD's
openAPIV3Schema (jsonschema), unknown fields (kubectl's strict field validation), then the
x-kubernetes-validations CEL rules through Python twins kept here next to the rule text.
"""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cn2mirror.agent import admission, model

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "manifests" / "crds"
EXAMPLES = ROOT / "manifests" / "examples"


def _load_generator():
    spec = importlib.util.spec_from_file_location("crd_generate", CRD_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()
CRDS = {
    (d["spec"]["group"], d["spec"]["names"]["kind"]): d
    for d in (yaml.safe_load(p.read_text()) for p in sorted(CRD_DIR.glob("*_*.yaml")))
}


def schema_of(api_version: str, kind: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    crd = CRDS[group, kind]
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)[
        "schema"]["openAPIV3Schema"]


# --- The API server's validation, offline: agent/admission.py (file mode uses it too) ----

CEL_TWINS = admission.CEL_TWINS
apply_defaults = admission.apply_defaults
walk = admission.walk
unknown_fields = admission.unknown_fields
cel_violations = admission.cel_violations


def api_server_errors(obj: dict[str, Any]) -> list[str]:
    """What the API server would say of ``obj`` (with the CRDs installed); [] if accepted."""
    return admission.admission_errors(obj)


def test_admission_reads_the_crds_of_this_tree():
    """The package data the agent validates with is these files."""
    assert admission.crds() == CRDS


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.name}[{i}]", doc)
        for p in sorted(EXAMPLES.glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(p.read_text()))
        if doc
    ]


# --- The files -------------------------------------------------------------------------------


def test_crd_files_are_generated_from_the_schema_definition():
    assert generate.main(["--check"]) == 0, "run manifests/crds/generate.py"
    assert {p.name for p in CRD_DIR.glob("*_*.yaml")} == {p.name for p in generate.files()}


@pytest.mark.parametrize("key", sorted(CRDS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_crd_is_a_valid_kubernetes_object(key):
    kubernetes_validate.validate(CRDS[key], kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("key", sorted(CRDS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_schema_is_structural(key):
    """Every node has a type (or is int-or-string), and no open objects are declared."""
    for version in CRDS[key]["spec"]["versions"]:
        stack = [("", version["schema"]["openAPIV3Schema"])]
        while stack:
            path, node = stack.pop()
            assert "type" in node or node.get("x-kubernetes-int-or-string"), path
            if node.get("x-kubernetes-int-or-string"):
                assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert node.get("additionalProperties") is not False, path
            stack += [(f"{path}.{k}", v) for k, v in node.get("properties", {}).items()]
            if isinstance(node.get("additionalProperties"), dict):
                stack.append((f"{path}.*", node["additionalProperties"]))
            if "items" in node:
                stack.append((f"{path}[]", node["items"]))
            for rule in node.get("x-kubernetes-validations", []):
                assert rule["rule"] in CEL_TWINS, f"{path}: CEL rule without a Python twin"


def test_every_cel_twin_is_used_and_carried_by_the_crds():
    rules = {
        rule["rule"]
        for crd in CRDS.values()
        for v in crd["spec"]["versions"]
        for schema, _, _ in walk_schema(v["schema"]["openAPIV3Schema"])
        for rule in schema.get("x-kubernetes-validations", [])
    }
    assert rules == set(CEL_TWINS)


def walk_schema(schema: dict[str, Any], path: str = ""):
    yield schema, None, path
    for key, sub in schema.get("properties", {}).items():
        yield from walk_schema(sub, f"{path}.{key}")
    if "items" in schema:
        yield from walk_schema(schema["items"], f"{path}[]")


def test_md_carries_the_static_next_hop_rule():
    spec = schema_of(f"{model.GROUP}/v1alpha1", model.KIND_MD)["properties"]["spec"]
    rules = {r["rule"]: r["message"] for r in spec["x-kubernetes-validations"]}
    assert rules["!has(self.nextHopMode) || self.nextHopMode != 'static' || "
                 "(has(self.juniperHeader) && !self.juniperHeader)"].startswith(
        "nextHopMode static")
    assert "has(self.staticNextHopHeader)" in " ".join(rules)
    assert rules["!has(self.externalAnalyzer) || !self.externalAnalyzer || "
                 "has(self.analyzerIP)"] == "externalAnalyzer requires analyzerIP"


@pytest.mark.parametrize("kind", model.MIRROR_KINDS)
def test_both_groups_define_the_same_schema(kind):
    ours = CRDS[model.GROUP, kind]["spec"]
    cn2 = CRDS[model.CN2_GROUP, kind]["spec"]
    assert [v["name"] for v in ours["versions"]] == ["v1alpha1"]
    assert [v["name"] for v in cn2["versions"]] == ["v1alpha1", "v4"]
    assert [v["name"] for v in cn2["versions"] if v["storage"]] == ["v4"]
    assert all(v["served"] for v in ours["versions"] + cn2["versions"])
    schemas = [copy.deepcopy(v["schema"]) for v in ours["versions"] + cn2["versions"]]
    if kind == model.KIND_MD:
        # This project's group adds: the namespaces analyzers may be in, and how copies
        # fit the path (CN2's group takes annotations for both); CN2's fields are kept.
        spec = schemas[0]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        assert spec.pop("analyzerNamespaces")["items"]["pattern"] == \
            model.NAMESPACE_NAME_PATTERN
        assert spec.pop("copySegments")["enum"] == ["auto", "exact", "fit"]
        assert spec.pop("copyTooLarge")["enum"] == ["truncate", "fragment"]
        # ... the output format (CN2's group: the annotation), with its CEL rule, and
        # udpPort's default (30030 here, CN2's 8099 there).
        assert spec.pop("encapsulation")["properties"]["format"]["enum"] == list(
            model.ENCAP_FORMATS)
        ours_spec = schemas[0]["openAPIV3Schema"]["properties"]["spec"]
        ours_spec["x-kubernetes-validations"].remove(generate.ENCAP_IS_ROUTED)
        assert spec["udpPort"].pop("default") == 30030
        for s in schemas[1:]:
            assert s["openAPIV3Schema"]["properties"]["spec"]["properties"]["udpPort"].pop(
                "default") == 8099
        # Issue 15's copy limits: fields here, annotations in CN2's group.
        assert spec.pop("snapLength")["minimum"] == 0
        assert spec.pop("sampling")["default"] == 1
        assert spec.pop("samplingMode")["enum"] == ["packet", "flow"]
        assert set(spec.pop("copyBudget")["properties"]) == {"packetsPerSecond",
                                                             "bitsPerSecond"}
        assert all("analyzerNamespaces" not in s["openAPIV3Schema"]["properties"]["spec"][
            "properties"] for s in schemas[1:])
    else:
        # A policy's and a rule's own sampling (secondaryActions), in this group only.
        spec = schemas[0]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        for actions in (spec["secondaryActions"],
                        spec["rules"]["items"]["properties"]["secondaryActions"]):
            assert "default" not in actions["properties"].pop("sampling")
            assert actions["properties"].pop("samplingMode")["enum"] == ["packet", "flow"]
    assert all(s == schemas[0] for s in schemas)
    assert ours["names"] == cn2["names"] and ours["scope"] == cn2["scope"]


@pytest.mark.parametrize("group", [model.GROUP, model.CN2_GROUP])
def test_copy_fit_choices_from_fields_or_cn2_annotations(group):
    """Fields in this project's group; CN2's fields stay CN2's, so there an annotation."""
    base = {"apiVersion": f"{group}/v1alpha1", "kind": model.KIND_MD,
            "metadata": {"name": "md1"}, "spec": {}}
    md = model.parse_mirror_destination(base)
    assert (md.copy_segments, md.copy_too_large) == ("auto", "fragment")
    if group == model.GROUP:
        obj = {**base, "spec": {"copySegments": "fit", "copyTooLarge": "truncate"}}
        bad = {**base, "spec": {"copySegments": "sometimes"}}
    else:
        obj = {**base, "metadata": {"name": "md1", "annotations": {
            model.ANN_COPY_SEGMENTS: "fit", model.ANN_COPY_TOO_LARGE: "truncate"}}}
        bad = {**base, "metadata": {"name": "md1", "annotations": {
            model.ANN_COPY_SEGMENTS: "sometimes"}}}
    md = model.parse_mirror_destination(obj)
    assert (md.copy_segments, md.copy_too_large) == ("fit", "truncate")
    with pytest.raises(model.ModelError):
        model.parse_mirror_destination(bad)


@pytest.mark.parametrize("kind, short, scope", [
    (model.KIND_MD, "md", "Cluster"),
    (model.KIND_CSP, "csp", "Namespaced"),
    (model.KIND_GCSP, "gcsp", "Cluster"),
])
def test_names_scope_status_and_columns(kind, short, scope):
    for group in (model.GROUP, model.CN2_GROUP):
        spec = CRDS[group, kind]["spec"]
        assert spec["names"]["shortNames"] == [short]
        assert spec["scope"] == scope
        for v in spec["versions"]:
            assert v["subresources"] == {"status": {}}
            schema = v["schema"]["openAPIV3Schema"]
            assert {"spec", "status"} <= set(schema["properties"])
            for column in v["additionalPrinterColumns"]:
                # Every column points at a field the schema declares.
                node = schema
                for part in re.sub(r"\[.*?\]", "", column["jsonPath"]).strip(".").split("."):
                    node = node.get("properties", {}).get(part) or node.get("items", {}).get(
                        "properties", {}).get(part)
                    if part == "metadata":
                        break
                    assert node is not None, column


@pytest.mark.parametrize("path, default", [
    ("spec.juniperHeader", True),
    ("spec.udpPort", 30030),
    ("spec.trafficDirection", "both"),
    ("spec.nextHopMode", "dynamic"),
    ("spec.nicAssistedMirroring", False),
    ("spec.externalAnalyzer", False),
])
def test_md_defaults_match_the_model(path, default):
    node = schema_of(f"{model.GROUP}/v1alpha1", model.KIND_MD)
    for part in path.split("."):
        node = node["properties"][part]
    assert node["default"] == default
    parsed = model.parse_mirror_destination(
        {"apiVersion": f"{model.GROUP}/v1alpha1", "kind": "MirrorDestination",
         "metadata": {"name": "d"}})
    field = {"juniperHeader": "juniper_header", "udpPort": "udp_port",
             "trafficDirection": "traffic_direction", "nextHopMode": "next_hop_mode",
             "nicAssistedMirroring": "nic_assisted_mirroring",
             "externalAnalyzer": "external_analyzer"}[path.split(".")[1]]
    assert getattr(parsed, field) == default


def test_cn2_group_udp_port_default_is_cn2s_8099():
    """CN2's group defaults udpPort to CN2's 8099, in the CRD and in the model (issue 15)."""
    for version in model.GROUP_VERSIONS[model.CN2_GROUP]:
        node = schema_of(f"{model.CN2_GROUP}/{version}", model.KIND_MD)
        assert node["properties"]["spec"]["properties"]["udpPort"]["default"] == 8099
        parsed = model.parse_mirror_destination(
            {"apiVersion": f"{model.CN2_GROUP}/{version}", "kind": "MirrorDestination",
             "metadata": {"name": "d"}})
        assert parsed.udp_port == 8099
    ours = schema_of(f"{model.GROUP}/v1alpha1", model.KIND_MD)
    assert ours["properties"]["spec"]["properties"]["udpPort"]["default"] == 30030


def test_policy_defaults_match_the_model():
    schema = schema_of(f"{model.GROUP}/v1alpha1", model.KIND_CSP)
    obj = {"apiVersion": f"{model.GROUP}/v1alpha1", "kind": model.KIND_CSP,
           "metadata": {"name": "p", "namespace": "demo"},
           "spec": {"rules": [{"ports": [{"port": 80}]}]}}
    defaulted = copy.deepcopy(obj)
    apply_defaults(schema, defaulted)
    assert defaulted["spec"]["action"] == "pass"
    assert defaulted["spec"]["rules"][0]["ports"][0]["protocol"] == "TCP"
    parsed = model.parse_policy(obj)
    assert parsed.action == "pass" and parsed.rules[0].ports[0].protocol == "TCP"


# --- Examples ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, doc", example_documents(), ids=lambda x: x if isinstance(x, str)
                         else "")
def test_example_is_accepted(name, doc):
    if doc["kind"] in model.MIRROR_KINDS:
        assert api_server_errors(doc) == []
        model.parse_object(doc)  # raises if the model disagrees
    else:
        try:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["kind"] == "NetworkAttachmentDefinition"  # Multus' own CRD
        if doc["kind"] == "Pod":
            assert model.parse_pod(doc).problems == ()


def test_examples_cover_every_mode_and_both_groups():
    docs = [d for _, d in example_documents() if d["kind"] in model.MIRROR_KINDS]
    modes = {model.parse_mirror_destination(d).mode for d in docs if d["kind"] == model.KIND_MD}
    assert {m.value for m in modes} == {"jmirror", "l2", "vxlan"}
    assert {d["apiVersion"].split("/")[0] for d in docs} == {model.GROUP, model.CN2_GROUP}
    policies = [model.parse_policy(d) for d in docs if d["kind"] != model.KIND_MD]
    assert any(p.mirror_to and p.rules for p in policies)  # policy level
    assert any(not p.mirror_to and any(r.mirror_to for r in p.rules) for p in policies)


# --- Invalid objects: the API server and the model both refuse them -----------------------------

MD = {"apiVersion": f"{model.GROUP}/v1alpha1", "kind": "MirrorDestination",
      "metadata": {"name": "d"}}
CSP = {"apiVersion": f"{model.CN2_GROUP}/v4", "kind": "ContrailSecurityPolicy",
       "metadata": {"name": "p", "namespace": "demo"}}
STATIC = {"vTEPDestinationIP": "198.19.0.20", "vxlanID": 7}


def md(**spec: Any) -> dict[str, Any]:
    return {**MD, "spec": spec}


def csp_rule(**rule: Any) -> dict[str, Any]:
    return {**CSP, "spec": {"rules": [rule]}}


def csp_port(**port: Any) -> dict[str, Any]:
    return csp_rule(ports=[port])


def csp_endpoint(**endpoint: Any) -> dict[str, Any]:
    return csp_rule(srcEP={"endPoints": [endpoint]})


INVALID = [
    # (id, object, what the API server says, what the model says)
    ("udpPort-0", md(udpPort=0), "less than the minimum", "spec.udpPort: must be between"),
    ("udpPort-65536", md(udpPort=65536), "greater than the maximum", "spec.udpPort"),
    ("udpPort-string", md(udpPort="30030"), "is not of type 'integer'", "must be int"),
    ("direction", md(trafficDirection="inbound"), "is not one of", "spec.trafficDirection"),
    ("nextHopMode", md(nextHopMode="fixed"), "is not one of", "spec.nextHopMode"),
    ("juniperHeader-string", md(juniperHeader="yes"), "is not of type 'boolean'", "must be bool"),
    ("static+juniperHeader-default", md(nextHopMode="static", staticNextHopHeader=STATIC),
     "requires juniperHeader false", "requires juniperHeader false"),
    ("static+juniperHeader-true",
     md(nextHopMode="static", juniperHeader=True, staticNextHopHeader=STATIC),
     "requires juniperHeader false", "requires juniperHeader false"),
    ("static-without-header", md(nextHopMode="static", juniperHeader=False),
     "requires staticNextHopHeader", "requires staticNextHopHeader"),
    ("vxlanID-range",
     md(nextHopMode="static", juniperHeader=False,
        staticNextHopHeader={**STATIC, "vxlanID": 1 << 24}),
     "greater than the maximum", "vxlanID: must be between"),
    ("vtep-ip", md(nextHopMode="static", juniperHeader=False,
                   staticNextHopHeader={**STATIC, "vTEPDestinationIP": "198.19.0.256"}),
     "does not match", "vTEPDestinationIP"),
    ("vtep-mac", md(nextHopMode="static", juniperHeader=False,
                    staticNextHopHeader={**STATIC, "vTEPDestinationMac": "02:00:00:00:00"}),
     "does not match", "is not a MAC address"),
    ("vxlanID-missing", md(nextHopMode="static", juniperHeader=False,
                           staticNextHopHeader={"vTEPDestinationIP": "198.19.0.20"}),
     "'vxlanID' is a required property", "vxlanID: is required"),
    ("external-without-ip", md(externalAnalyzer=True), "externalAnalyzer requires analyzerIP",
     "externalAnalyzer requires analyzerIP"),
    ("analyzerIP", md(externalAnalyzer=True, analyzerIP="198.19.0"), "does not match",
     "not an IPv4 or IPv6 address"),
    ("analyzerIP-v6", md(externalAnalyzer=True, analyzerIP="2001:db8::1::2"), "does not match",
     "not an IPv4 or IPv6 address"),
    ("external+static", md(externalAnalyzer=True, analyzerIP="198.19.0.10", juniperHeader=False,
                           nextHopMode="static", staticNextHopHeader=STATIC),
     "externalAnalyzer cannot be combined", "externalAnalyzer cannot be combined"),
    ("nic-without-vlan", md(nicAssistedMirroring=True), "requires nicAssistedVlanID",
     "requires nicAssistedVlanID"),
    ("vlan-0", md(nicAssistedMirroring=True, nicAssistedVlanID=0), "less than the minimum",
     "nicAssistedVlanID: must be between 1 and 4094"),
    ("vlan-4095", md(nicAssistedMirroring=True, nicAssistedVlanID=4095),
     "greater than the maximum", "nicAssistedVlanID"),
    ("nic+static", md(nicAssistedMirroring=True, nicAssistedVlanID=10, juniperHeader=False,
                      nextHopMode="static", staticNextHopHeader=STATIC),
     "are exclusive", "are exclusive"),
    ("action", {**CSP, "spec": {"action": "allow"}}, "is not one of", "spec.action"),
    ("csp-namespaceSelector-in-selectors",
     {**CSP, "spec": {"selectors": [{"namespaceSelector": {}}]}},
     "unknown field .spec.selectors[0].namespaceSelector", "only a GlobalContrailSecurityPolicy"),
    ("mirrorTo-name", {**CSP, "spec": {"secondaryActions": {"mirrorTo": "Analyzer_1"}}},
     "does not match", "not a valid object name"),
    ("port-0", csp_port(port=0), "less than the minimum", "ports[0].port: must be between"),
    ("port-65536", csp_port(port=65536), "greater than the maximum", "ports[0].port"),
    ("port-name-upper", csp_port(port="HTTP"), "does not match", "not a port number or port name"),
    ("port-name-digits", csp_port(port="8080"), "does not match", "not a port number or port"),
    ("port-name-long", csp_port(port="a-very-long-port-name"), "is too long",
     "not a port number or port name"),
    ("protocol", csp_port(protocol="tcp", port=80), "is not one of", "ports[0].protocol"),
    ("endPort-without-port", csp_port(endPort=90), "endPort needs a numeric port",
     "endPort: needs a numeric port"),
    ("endPort-named", csp_port(port="http", endPort=90), "endPort needs a numeric port",
     "needs a numeric port"),
    ("endPort-below", csp_port(port=90, endPort=80), "must not be below",
     "must not be below port (90)"),
    ("endPort-range", csp_port(port=90, endPort=70000), "greater than the maximum", "endPort"),
    ("icmp-port", csp_port(protocol="ICMP", port=8), "ICMP and ICMPv6 take no port",
     "ICMP takes no port"),
    ("empty-endpoint", csp_endpoint(), "an endpoint needs podSelector",
     "an endpoint needs podSelector, namespaceSelector or ipBlock"),
    ("ipBlock+podSelector", csp_endpoint(ipBlock={"cidr": "198.18.0.0/15"}, podSelector={}),
     "ipBlock cannot be combined", "ipBlock cannot be combined"),
    ("bad-cidr", csp_endpoint(ipBlock={"cidr": "198.18.0.0/33"}), "does not match",
     "is not a CIDR"),
    ("cidr-without-prefix", csp_endpoint(ipBlock={"cidr": "198.18.0.0"}), "does not match",
     None),  # Python reads a bare address as a /32; the API server needs the prefix
    ("except-outside", csp_endpoint(ipBlock={"cidr": "198.18.0.0/16",
                                             "except": ["198.19.0.0/24"]}),
     "every except block must be inside cidr", "is not inside 198.18.0.0/16"),
    ("except-family", csp_endpoint(ipBlock={"cidr": "198.18.0.0/16", "except": ["fd00::/64"]}),
     "every except block must be inside cidr", "is not inside"),
    ("in-without-values",
     csp_endpoint(podSelector={"matchExpressions": [{"key": "app", "operator": "In"}]}),
     "In and NotIn need values", "operator In needs values"),
    ("exists-with-values",
     csp_endpoint(podSelector={"matchExpressions": [{"key": "app", "operator": "Exists",
                                                     "values": ["x"]}]}),
     "Exists and DoesNotExist take none", "operator Exists takes no values"),
    ("operator", csp_endpoint(podSelector={"matchExpressions": [{"key": "app",
                                                                 "operator": "Has"}]}),
     "is not one of", "operator: must be one of"),
    ("label-value-type", csp_endpoint(podSelector={"matchLabels": {"tier": 1}}),
     "is not of type 'string'", "matchLabels.tier: must be a string"),
    ("typo", md(udpport=30030), "unknown field .spec.udpport", None),
]


@pytest.mark.parametrize("obj, server, _", [i[1:] for i in INVALID], ids=[i[0] for i in INVALID])
def test_api_server_refuses(obj, server, _):
    errors = api_server_errors(obj)
    assert any(server in e for e in errors), errors


@pytest.mark.parametrize("obj, _, message", [i[1:] for i in INVALID if i[3]],
                         ids=[i[0] for i in INVALID if i[3]])
def test_model_refuses(obj, _, message):
    with pytest.raises(model.ModelError, match=re.escape(message)):
        model.parse_object(obj)


VALID = [
    md(),
    md(juniperHeader=False, trafficDirection="egress", udpPort=8099),
    md(nextHopMode="static", juniperHeader=False, staticNextHopHeader=STATIC),
    md(externalAnalyzer=True, analyzerIP="2001:db8::10"),
    md(nicAssistedMirroring=True, nicAssistedVlanID=4094),
    md(analyzerIP="198.19.0.9"),  # ignored without externalAnalyzer, but valid
    csp_port(port="http"),
    csp_port(port="8080-alt"),
    csp_port(protocol="SCTP", port=1, endPort=65535),
    csp_port(protocol="ICMPv6"),
    csp_endpoint(ipBlock={"cidr": "fd00::/8", "except": ["fd00:1::/32"]}),
    csp_endpoint(podSelector={"matchLabels": {"app": "web"}}, namespaceSelector={}),
    {**CSP, "kind": model.KIND_GCSP, "metadata": {"name": "g"},
     "spec": {"selectors": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}},
]


@pytest.mark.parametrize("obj", VALID)
def test_valid_objects_are_accepted_by_both(obj):
    assert api_server_errors(obj) == []
    model.parse_object(obj)


# --- Address patterns, against Python's own parser ----------------------------------------------

IP_RE = re.compile(generate.IP_PATTERN)
CIDR_RE = re.compile(generate.CIDR_PATTERN)


def _parses(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


@given(st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                 st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)))
def test_ip_pattern_accepts_every_address(addr):
    for text in {str(addr), addr.exploded}:
        assert IP_RE.match(text), text
    if addr.version == 6:  # the forms with an IPv4 tail, which Python never prints
        tail = str(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        forms = [":".join(addr.exploded.split(":")[:6]) + ":" + tail]
        head = str(ipaddress.IPv6Address(int(addr) >> 32 << 32))
        if head.endswith("::") and len([g for g in head.split(":") if g]) <= 5:
            forms.append(head + tail)
        for text in forms:
            assert _parses(text) and IP_RE.match(text), text


@given(st.text(alphabet="0123456789abcdefABCDEF:.", max_size=45))
def test_ip_pattern_agrees_with_python(text):
    assert bool(IP_RE.match(text)) == _parses(text), text


@given(st.one_of(st.tuples(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                           st.integers(0, 32)),
                 st.tuples(st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
                           st.integers(0, 128))))
def test_cidr_pattern_accepts_every_block(block):
    addr, prefix = block
    assert CIDR_RE.match(f"{addr}/{prefix}")


@given(st.text(alphabet="0123456789abcdef:./", max_size=49))
def test_cidr_pattern_implies_python_accepts(text):
    if CIDR_RE.match(text):
        ipaddress.ip_network(text, strict=False)


@pytest.mark.parametrize("spec, api_error", [
    ({"encapsulation": {"format": "erspan3"}}, None),
    ({"encapsulation": {"format": "vxlan", "vni": 9}}, None),
    ({"encapsulation": {"format": "gre", "vni": 9}}, "vni: only with format vxlan or geneve"),
    ({"encapsulation": {"format": "geneve", "greKey": 1}}, "greKey: only with format gre"),
    ({"encapsulation": {"format": "gre", "network": "x"}}, "network: only with format contrail"),
    ({"encapsulation": {"format": "gre"}, "juniperHeader": False},
     "an encapsulation format wraps copies routed"),
    ({"encapsulation": {"format": "ipip"}}, "ipip"),
])
def test_encapsulation_admission_agrees_with_the_model(spec, api_error):
    """The CRD (schema and CEL twins) and the model accept and refuse the same formats."""
    errors = api_server_errors(md(**spec))
    try:
        model.parse_mirror_destination(md(**spec))
        model_ok = True
    except model.ModelError:
        model_ok = False
    if api_error is None:
        assert errors == [] and model_ok
    else:
        assert any(api_error in e for e in errors), errors
        assert not model_ok
