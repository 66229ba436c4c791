"""The snapshot loader: multi-document YAML files and directories into a Snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from cn2mirror.agent.model import CN2_GROUP, GROUP
from cn2mirror.agent.snapshot import (
    LoadError,
    Snapshot,
    load_paths,
    load_text,
    snapshot_from_objects,
)

ROOT = Path(__file__).resolve().parent.parent

POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: web}}
spec: {nodeName: n1}
status: {podIPs: [{ip: 198.18.0.2}]}
"""
MD = f"""\
apiVersion: {GROUP}/v1alpha1
kind: MirrorDestination
metadata: {{name: analyzer1}}
spec: {{}}
"""
CN2_CSP = f"""\
apiVersion: {CN2_GROUP}/v4
kind: ContrailSecurityPolicy
metadata: {{name: p, namespace: demo}}
spec: {{}}
"""
CN2_GCSP = f"""\
apiVersion: {CN2_GROUP}/v1alpha1
kind: GlobalContrailSecurityPolicy
metadata: {{name: g}}
"""
NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n"


def names(objects) -> list[str]:
    return [o["metadata"]["name"] for o in objects]


def test_multi_document_text_sorts_objects_by_kind():
    text = "---\n".join([NAMESPACE, POD, MD, CN2_CSP, CN2_GCSP])
    snapshot, errors = load_text(text)
    assert errors == []
    assert names(snapshot.namespaces) == ["demo"]
    assert names(snapshot.pods) == ["web"]
    assert names(snapshot.destinations) == ["analyzer1"]
    assert names(snapshot.policies) == ["p"]
    assert names(snapshot.global_policies) == ["g"]
    assert snapshot.pods[0]["status"]["podIPs"] == [{"ip": "198.18.0.2"}]
    assert len(snapshot.objects()) == 5


def test_unknown_kinds_are_ignored():
    text = "---\n".join([
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
        "metadata: {name: c}\n",
        "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata: {name: n}\n",
        POD,
    ])
    snapshot, errors = load_text(text)
    assert errors == [] and names(snapshot.objects()) == ["web"]


def test_list_kinds_and_typed_lists_without_item_kinds():
    text = f"""\
apiVersion: v1
kind: List
items:
- {{apiVersion: v1, kind: Namespace, metadata: {{name: demo}}}}
- {{apiVersion: {GROUP}/v1alpha1, kind: MirrorDestination, metadata: {{name: m}}}}
---
apiVersion: v1
kind: PodList
items:
- metadata: {{name: a, namespace: demo}}
- metadata: {{name: b, namespace: demo}}
"""
    snapshot, errors = load_text(text)
    assert errors == []
    assert names(snapshot.namespaces) == ["demo"] and names(snapshot.destinations) == ["m"]
    assert names(snapshot.pods) == ["a", "b"]
    assert all(p["kind"] == "Pod" and p["apiVersion"] == "v1" for p in snapshot.pods)


def test_a_syntax_error_spoils_only_its_document():
    text = POD + "---\nkind: Pod\nmetadata: {name: [unclosed\n---\n" + MD
    snapshot, errors = load_text(text, "f.yaml")
    assert names(snapshot.pods) == ["web"] and names(snapshot.destinations) == ["analyzer1"]
    assert len(errors) == 1
    e = errors[0]
    assert (e.path, e.document, e.line) == ("f.yaml", 2, 6)
    assert e.reason.startswith("invalid YAML at line 8")  # where the parser noticed
    assert str(e).startswith("f.yaml: document 2 (line 6): invalid YAML")


@pytest.mark.parametrize("document, reason", [
    ("- a\n- b\n", "not a mapping but list"),
    ("just a string\n", "not a mapping but str"),
    ("apiVersion: v1\nmetadata: {name: x}\n", "no kind"),
    ("apiVersion: v1\nkind: Pod\n", "Pod has no metadata"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {namespace: demo}\n", "Pod has no metadata.name"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: 7}\n", "Pod has no metadata.name"),
    (f"apiVersion: {CN2_GROUP}/v1\nkind: MirrorDestination\nmetadata: {{name: m}}\n",
     f"MirrorDestination is served as {GROUP}/v1alpha1, {CN2_GROUP}/v4, {CN2_GROUP}/v1alpha1, "
     f"not '{CN2_GROUP}/v1'"),
    ("kind: ContrailSecurityPolicy\nmetadata: {name: p}\n", "not None"),
    ("apiVersion: v1\nkind: List\nitems: [{kind: Pod, apiVersion: v1}, 3]\n",
     "items[0]: Pod has no metadata"),
])
def test_malformed_documents_are_reported_precisely(document, reason):
    text = "# leading comment only\n---\n" + MD + "---\n" + document + "---\n" + POD
    snapshot, errors = load_text(text, "bad.yaml")
    assert [e.document for e in errors][:1] == [2]
    assert errors[0].reason.endswith(reason) or reason in errors[0].reason, errors
    assert errors[0].line == 7
    assert names(snapshot.destinations) == ["analyzer1"] and names(snapshot.pods) == ["web"]


def test_list_item_errors_name_the_item():
    _, errors = load_text("apiVersion: v1\nkind: List\nitems: [{kind: Pod, apiVersion: v1}, 3]\n")
    assert [e.reason for e in errors] == ["items[0]: Pod has no metadata",
                                          "items[1]: not a mapping but int"]


def test_namespace_defaults_to_default():
    snapshot, _ = load_text("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n")
    assert snapshot.pods[0]["metadata"]["namespace"] == "default"
    snapshot, _ = load_text(MD)
    assert "namespace" not in snapshot.destinations[0]["metadata"]  # cluster-scoped


def test_empty_documents_and_end_markers():
    text = "---\n# nothing\n---\n" + POD + "...\n---\n\n---\n" + MD + "...\n"
    snapshot, errors = load_text(text)
    assert errors == []
    assert names(snapshot.objects()) == ["web", "analyzer1"]
    _, errors = load_text("---\n\n---\n" + POD + "---\n: : :\n")
    assert [(e.document, e.line) for e in errors] == [(2, 9)]


def test_document_start_with_content_on_the_same_line():
    snapshot, errors = load_text("--- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n"
                                 "--- # a comment\n" + NAMESPACE)
    assert errors == [] and names(snapshot.namespaces) == ["a", "demo"]


def test_directories_are_read_recursively_in_name_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c").mkdir()
    (tmp_path / "b" / "c" / "2.yml").write_text(POD.replace("web", "pod-2"))
    (tmp_path / "b" / "1.yaml").write_text(POD.replace("web", "pod-1"))
    (tmp_path / "a.yaml").write_text(POD.replace("web", "pod-0"))
    (tmp_path / "notes.txt").write_text(POD.replace("web", "ignored"))
    (tmp_path / "b" / "README.md").write_text("# not YAML: skipped")
    snapshot, errors = load_paths([tmp_path])
    assert errors == []
    assert names(snapshot.pods) == ["pod-0", "pod-1", "pod-2"]
    # A file named explicitly is read whatever its suffix.
    snapshot, _ = load_paths([tmp_path / "notes.txt", tmp_path / "a.yaml"])
    assert names(snapshot.pods) == ["ignored", "pod-0"]


def test_unreadable_paths_are_errors_and_the_rest_loads(tmp_path):
    (tmp_path / "good.yaml").write_text(MD)
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00kind: Pod")
    snapshot, errors = load_paths([tmp_path / "missing.yaml", tmp_path])
    assert names(snapshot.destinations) == ["analyzer1"]
    assert [(Path(e.path).name, e.document) for e in errors] == [("missing.yaml", 0),
                                                                 ("binary.yaml", 0)]
    assert errors[0].reason == "no such file or directory"
    assert errors[1].reason.startswith("cannot read:")
    assert str(errors[0]).endswith("missing.yaml: no such file or directory")


def test_snapshot_from_objects_numbers_objects():
    snapshot, errors = snapshot_from_objects([
        {"kind": "Pod"},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
        {"apiVersion": "v1", "kind": "Pod"},
    ])
    assert errors == [LoadError("<objects>", 1, "Pod is served as v1, not None"),
                      LoadError("<objects>", 3, "Pod has no metadata")]
    assert names(snapshot.namespaces) == ["x"]


def test_merged_keeps_everything_in_order():
    a, _ = load_text(POD + "---\n" + MD)
    b, _ = load_text(POD.replace("web", "web2"))
    merged = a.merged(b)
    assert names(merged.pods) == ["web", "web2"] and names(merged.destinations) == ["analyzer1"]
    assert Snapshot().merged(a) == a


def test_examples_load_without_errors():
    snapshot, errors = load_paths([ROOT / "manifests" / "examples", ROOT / "manifests" / "crds"])
    assert errors == []
    assert sorted(names(snapshot.destinations)) == [
        "analyzer1", "analyzer1-l2", "external-analyzer", "vxlan-collector"]
    assert sorted(names(snapshot.policies)) == ["mirror-http-only", "mirror-web"]
    assert names(snapshot.global_policies) == ["mirror-demo-dns"]
    assert sorted(names(snapshot.pods)) == [
        "analyzer", "client", "multus-mirrored", "port-mirrored", "web"]
