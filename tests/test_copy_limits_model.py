"""Snap length, sampling and copy budgets (issue 15) from the objects to the maps' bytes:
fields of this project's MirrorDestination, annotations of CN2's (whose own fields stay
CN2's), the CRD's checks, the compiler's destinations and the planner's copy_limits
entries. Pure Python: the datapath side is tests/test_copy_limits.py."""

from __future__ import annotations

import dataclasses

import pytest

from cn2mirror.agent import admission, model
from cn2mirror.agent import layout as L
from cn2mirror.agent.programmer import CopyBudget, ResolvedDestination, plan
from cn2mirror.agent.state import NodeState

FIELDS = {"snapLength": 128, "sampling": 10,
          "copyBudget": {"packetsPerSecond": 5000, "bitsPerSecond": 100_000_000}}
ANNOTATIONS = {model.ANN_SNAP_LENGTH: "128", model.ANN_SAMPLING: "10",
               model.ANN_BUDGET_PPS: "5000", model.ANN_BUDGET_BPS: "100000000"}
LIMITS = {"snap_length": 128, "sampling": 10, "budget_pps": 5000, "budget_bps": 100_000_000}


def md_obj(group: str, spec=None, annotations=None) -> dict:
    meta = {"name": "md1"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": f"{group}/v1alpha1", "kind": model.KIND_MD, "metadata": meta,
            "spec": spec or {}}


def limits_of(md: model.MirrorDestination) -> dict:
    return {k: getattr(md, k) for k in LIMITS}


@pytest.mark.parametrize("group", [model.GROUP, model.CN2_GROUP])
def test_no_limits_by_default(group):
    assert limits_of(model.parse_mirror_destination(md_obj(group))) == {
        "snap_length": 0, "sampling": 1, "budget_pps": 0, "budget_bps": 0}


def test_fields_in_this_projects_group():
    md = model.parse_mirror_destination(md_obj(model.GROUP, FIELDS))
    assert limits_of(md) == LIMITS
    assert not admission.admission_errors(md_obj(model.GROUP, FIELDS))


def test_annotations_in_cn2s_group_whose_fields_stay_cn2s():
    md = model.parse_mirror_destination(md_obj(model.CN2_GROUP, annotations=ANNOTATIONS))
    assert limits_of(md) == LIMITS
    # CN2's schema has no such fields: the API server would prune them, the model refuses
    # nothing but takes only the annotations.
    md = model.parse_mirror_destination(md_obj(model.CN2_GROUP, FIELDS))
    assert limits_of(md)["snap_length"] == 0
    # And this project's group ignores the annotations (an admin writes the fields there).
    md = model.parse_mirror_destination(md_obj(model.GROUP, annotations=ANNOTATIONS))
    assert limits_of(md)["sampling"] == 1


@pytest.mark.parametrize("spec, where", [
    ({"snapLength": 10}, "spec.snapLength"),
    ({"snapLength": 70000}, "spec.snapLength"),
    ({"sampling": 0}, "spec.sampling"),
    ({"sampling": "10"}, "spec.sampling"),
    ({"copyBudget": {"bitsPerSecond": 999}}, "spec.copyBudget.bitsPerSecond"),
    ({"copyBudget": {"packetsPerSecond": -1}}, "spec.copyBudget.packetsPerSecond"),
])
def test_bad_fields_are_refused_by_the_model_and_the_crd(spec, where):
    with pytest.raises(model.ModelError, match=where.replace(".", r"\.")):
        model.parse_mirror_destination(md_obj(model.GROUP, spec))
    assert admission.admission_errors(md_obj(model.GROUP, spec))


@pytest.mark.parametrize("annotation, value", [
    (model.ANN_SNAP_LENGTH, "10"), (model.ANN_SAMPLING, "0"), (model.ANN_SAMPLING, "1/10"),
    (model.ANN_BUDGET_BPS, "999"), (model.ANN_BUDGET_PPS, "-5"), (model.ANN_BUDGET_PPS, "lots"),
])
def test_bad_annotations_are_refused(annotation, value):
    with pytest.raises(model.ModelError, match="metadata.annotations"):
        model.parse_mirror_destination(md_obj(model.CN2_GROUP, annotations={annotation: value}))


def test_zero_means_no_limit_in_fields_and_crd():
    spec = {"snapLength": 0, "copyBudget": {"packetsPerSecond": 0, "bitsPerSecond": 0}}
    md = model.parse_mirror_destination(md_obj(model.GROUP, spec))
    assert limits_of(md) == {"snap_length": 0, "sampling": 1, "budget_pps": 0, "budget_bps": 0}
    assert not admission.admission_errors(md_obj(model.GROUP, spec))


def test_the_planner_writes_each_destinations_limits_and_the_node_budget():
    dests = {"a": ResolvedDestination(L.Mode.JMIRROR4, "198.18.1.10", "198.18.0.1", 30030,
                                      **LIMITS),
             "b": ResolvedDestination(L.Mode.JMIRROR4, "198.18.1.11", "198.18.0.1", 30030)}
    p = plan(NodeState("n1", (), (), ()), {}, dests, {}, CopyBudget(200_000, 2_000_000_000))
    entries = {int.from_bytes(k, "little"): L.CopyLimits.from_buffer_copy(v)
               for k, v in p.maps["copy_limits"].items()}
    assert set(entries) == {L.COPY_LIMITS_NODE, p.dest_slots["a"]}  # b has none
    a = entries[p.dest_slots["a"]]
    assert (a.sample_every, a.snap_length) == (10, 128)
    # 5,000 copies/s: 200 us each; 100 Mbit/s: 80 ns a byte (16.16 fixed point).
    assert a.packet_cost >> L.BUDGET_COST_SHIFT == 200_000
    assert a.byte_cost >> L.BUDGET_COST_SHIFT == 80
    node = entries[L.COPY_LIMITS_NODE]
    assert node.packet_cost >> L.BUDGET_COST_SHIFT == 5_000
    assert node.byte_cost >> L.BUDGET_COST_SHIFT == 4
    assert (node.sample_every, node.snap_length) == (0, 0)
    # A burst holds at least one 64 KB super-packet's bits, so it can ever pass.
    assert a.burst_ns >= (65536 * a.byte_cost) >> L.BUDGET_COST_SHIFT
    assert not plan(NodeState("n1", (), (), ()), {}, {}, {}, CopyBudget(0, 0)).maps[
        "copy_limits"]


def test_the_compiler_carries_the_limits_to_the_destination_in_every_mode():
    from cn2mirror.agent import compiler
    from cn2mirror.agent.snapshot import Snapshot

    for spec in ({"externalAnalyzer": True, "analyzerIP": "198.18.5.5"},
                 {"nicAssistedMirroring": True, "nicAssistedVlanID": 100},
                 {"juniperHeader": False, "nextHopMode": "static",
                  "staticNextHopHeader": {"vTEPDestinationIP": "198.18.5.6", "vxlanID": 7}}):
        obj = md_obj(model.GROUP, {**spec, **FIELDS})
        world = compiler._parse(Snapshot(destinations=(obj,)))
        d = compiler._resolve(world.destinations["md1"], world, "n1")
        assert not isinstance(d, str), d
        assert {k: getattr(d, k) for k in LIMITS} == LIMITS


# ------------------------------------------------------------- sampling mode, rules' own
def test_sampling_mode_field_annotation_and_default():
    assert model.parse_mirror_destination(md_obj(model.GROUP)).sampling_mode == "packet"
    md = model.parse_mirror_destination(md_obj(model.GROUP, {"sampling": 8,
                                                             "samplingMode": "flow"}))
    assert (md.sampling, md.sampling_mode) == (8, "flow")
    assert not admission.admission_errors(md_obj(model.GROUP, {"samplingMode": "flow"}))
    md = model.parse_mirror_destination(md_obj(
        model.CN2_GROUP, annotations={model.ANN_SAMPLING: "8", model.ANN_SAMPLING_MODE: "flow"}))
    assert (md.sampling, md.sampling_mode) == (8, "flow")
    with pytest.raises(model.ModelError, match=r"spec\.samplingMode"):
        model.parse_mirror_destination(md_obj(model.GROUP, {"samplingMode": "byte"}))
    assert admission.admission_errors(md_obj(model.GROUP, {"samplingMode": "byte"}))
    with pytest.raises(model.ModelError, match="sampling-mode"):
        model.parse_mirror_destination(md_obj(
            model.CN2_GROUP, annotations={model.ANN_SAMPLING_MODE: "sometimes"}))


def policy_obj(group: str, spec: dict) -> dict:
    return {"apiVersion": f"{group}/v1alpha1", "kind": model.KIND_CSP,
            "metadata": {"name": "p", "namespace": "demo"}, "spec": spec}


OWN_SAMPLING = {
    "secondaryActions": {"mirrorTo": "md1", "sampling": 10},
    "rules": [{"secondaryActions": {"mirrorTo": "md2", "sampling": 3, "samplingMode": "flow"}},
              {"ports": [{"protocol": "UDP"}]},
              {"secondaryActions": {"samplingMode": "flow"}}],
}


def test_a_policys_and_its_rules_own_sampling_in_this_projects_group():
    p = model.parse_policy(policy_obj(model.GROUP, OWN_SAMPLING))
    assert p.sampling == model.Sampling(every=10)
    assert [r.sampling for r in p.rules] == [model.Sampling(3, "flow"), None,
                                             model.Sampling(None, "flow")]
    assert not admission.admission_errors(policy_obj(model.GROUP, OWN_SAMPLING))
    # CN2's schema has no such fields: an API server prunes them; files are refused.
    assert admission.admission_errors(policy_obj(model.CN2_GROUP, OWN_SAMPLING))
    p = model.parse_policy(policy_obj(model.CN2_GROUP, OWN_SAMPLING))
    assert p.sampling is None and all(r.sampling is None for r in p.rules)
    bad = {"secondaryActions": {"mirrorTo": "md1", "sampling": 0}}
    with pytest.raises(model.ModelError, match=r"spec\.secondaryActions\.sampling"):
        model.parse_policy(policy_obj(model.GROUP, bad))
    assert admission.admission_errors(policy_obj(model.GROUP, bad))


def test_the_compiler_gives_each_rule_its_own_sampling_else_its_policys():
    """And the planner fills in what neither gives from the destination."""
    from cn2mirror.agent import compiler
    from cn2mirror.agent.snapshot import snapshot_from_objects

    from .builders import namespace, pod

    external = {"externalAnalyzer": True, "analyzerIP": "198.18.5.5"}
    snap, errors = snapshot_from_objects((
        namespace("demo"), pod("web", "demo", "node1", ips=("198.18.1.2",)),
        md_obj(model.GROUP, external), {**md_obj(model.GROUP, external),
                                        "metadata": {"name": "md2"}},
        policy_obj(model.GROUP, OWN_SAMPLING)))
    assert not errors
    state = compiler.compile_node(snap, "node1")
    [p] = state.policies
    # Each of N and the mode: the rule's own, else the policy's.
    assert [(r.destination, r.sampling) for r in p.rules] == [
        ("md2", model.Sampling(3, "flow")), ("md1", model.Sampling(every=10)),
        ("md1", model.Sampling(10, "flow"))]
    dests = {"md1": ResolvedDestination(L.Mode.JMIRROR4, "198.18.5.5", "198.18.0.1", 30030,
                                        sampling=4, sampling_mode="flow"),
             "md2": ResolvedDestination(L.Mode.JMIRROR4, "198.18.5.6", "198.18.0.1", 30030)}
    rules = (dataclasses.replace(p.rules[0], destination="md1", sampling=model.Sampling()),
             dataclasses.replace(p.rules[1], sampling=model.Sampling(mode="packet")),
             dataclasses.replace(p.rules[2], sampling=None))
    pl = plan(NodeState("node1", (), (dataclasses.replace(p, rules=rules),), ()), {},
              dests, {})
    got = {int.from_bytes(k, "little"): (e.sample_every, e.sample_by) for k, e in (
        (k, L.RuleSampling.from_buffer_copy(v)) for k, v in pl.maps["rule_sampling"].items())}
    assert got == {1: (4, L.SAMPLE_BY_FLOW), 2: (4, L.SAMPLE_BY_PACKET)}  # 3: none
    # Only rules with their own sampling are flagged: the others' copies never look the
    # map up.
    own = {int.from_bytes(k, "little") for k, v in pl.maps["rules"].items()
           if L.RuleEntry.from_buffer_copy(v).flags & L.RULE_OWN_SAMPLING}
    assert own == {1, 2}
