"""The incremental compiler (compiler.Compiler) against a full compile of every snapshot.

A Compiler kept across snapshots must give exactly what compile_node (a fresh Compiler)
gives for the same snapshot, whatever changed in between: pods coming, going, relabelled
or moved, namespaces relabelled, destinations changed or broken, policies edited,
duplicated or invalid. Objects that did not change are handed over as the same dicts
(as the Kubernetes source does), sometimes as equal copies (as after a relist).
"""

from __future__ import annotations

import copy
import json
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cn2mirror.agent.compiler import Compiler, compile_node
from cn2mirror.agent.model import CN2_GROUP
from cn2mirror.agent.snapshot import FIELDS, Snapshot

from .builders import ANALYZER_POD, csp, md, namespace, pod
from .builders import match_labels as labels
from .test_compiler import ANALYZER_NS, TRUSTED, cluster_st, eps, mirror

NODES = ("n1", "n2")


@st.composite
def step_st(draw):
    """One state of the cluster: cluster_st's, with namespaces, analyzers and
    destinations varied too, and now and then a duplicate or an invalid object."""
    objects = draw(cluster_st())
    out = []
    for o in objects:
        if o["kind"] == "Namespace" and draw(st.booleans()):
            # An admin allows or disallows analyzers there, or vouches for annotations.
            admin = draw(st.sampled_from([{}, {ANALYZER_NS: "true"}, {TRUSTED: "true"},
                                          {ANALYZER_NS: "true", TRUSTED: "true"}]))
            o = namespace(o["metadata"]["name"], team=draw(st.sampled_from(["a", "b", "c"])),
                          **admin)
        elif o["kind"] == "Pod" and o["metadata"]["name"] == "analyzer":
            choice = draw(st.sampled_from(["same", "moved", "gone", "no-ip"]))
            if choice == "gone":
                continue
            if choice != "same":
                o = pod("analyzer", node="n1" if choice == "moved" else "n2",
                        labels={ANALYZER_POD: "analyzer1"},
                        ips=() if choice == "no-ip" else ("198.18.9.9",))
        elif o["kind"] == "MirrorDestination" and o["metadata"]["name"] == "analyzer1":
            choice = draw(st.sampled_from(["same", "other-selector", "broken", "gone"]))
            if choice == "gone":
                continue
            if choice == "other-selector":
                o = md("analyzer1", "analyzer2")
            elif choice == "broken":
                o = md("analyzer1", "analyzer1", udpPort=0)
        out.append(o)
    if draw(st.booleans()):  # a second analyzer candidate, on a node of its own
        out.append(pod("analyzer-b", ns="other", node=draw(st.sampled_from(NODES)),
                       labels={ANALYZER_POD: draw(st.sampled_from(["analyzer1", "analyzer2"]))},
                       ips=("198.18.9.10",)))
    if draw(st.booleans()):  # a policy given under both API groups
        spec = {"rules": [{"dstEP": eps({"podSelector": labels(app="web")}),
                           "secondaryActions": mirror("analyzer1")}]}
        out.append(csp("dup", **spec))
        out.append(csp("dup", api=f"{CN2_GROUP}/v4", **spec))
    if draw(st.booleans()):  # an invalid policy
        out.append(csp("bad", rules=[{"ports": [{"port": 0}]}]))
    return out


class Handover:
    """Hands objects over as a watcher would: unchanged objects as the same dicts, and a
    kind none of whose objects changed as the same tuple (the Kubernetes source does)."""

    def __init__(self, rnd: random.Random):
        self.rnd = rnd
        self.known: dict[str, dict] = {}
        self.last: dict[str, tuple] = {}

    def snapshot(self, objects: list[dict]) -> Snapshot:
        known, kept = {}, []
        for o in objects:
            text = json.dumps(o, sort_keys=True)
            same = self.known.get(text)
            if same is None or self.rnd.random() < 0.1:  # new, changed, or relisted
                same = copy.deepcopy(o)
            known[text] = same
            kept.append(same)
        self.known = known
        if self.rnd.random() < 0.5:
            self.rnd.shuffle(kept)
        fields = {}
        for f in FIELDS.values():
            objs = tuple(o for o in kept if FIELDS[o["kind"]] == f)
            last = self.last.get(f, ())
            if len(objs) == len(last) and all(a is b for a, b in zip(objs, last, strict=True)):
                objs = last
            fields[f] = objs
        self.last = fields
        return Snapshot(**fields)


def _key(o: dict) -> tuple[str, str, str]:
    return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]


def evolve(before: list[dict], drawn: list[dict], rnd: random.Random) -> list[dict]:
    """The next state: a few objects of ``drawn`` replace, join or remove their namesakes
    in ``before``; the rest stays as it was."""
    now = {}
    for o in before:
        now.setdefault(_key(o), []).append(o)
    new: dict = {}
    for o in drawn:
        new.setdefault(_key(o), []).append(o)
    for key in sorted(set(now) | set(new)):
        if rnd.random() < 0.25:  # this object changes (or comes, or goes)
            if key in new:
                now[key] = new[key]
            else:
                now.pop(key, None)
    return [o for objs in now.values() for o in objs]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(step_st(), st.lists(step_st(), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_incremental_compile_equals_full_compile(first, steps, rnd):
    compilers = {node: Compiler(node) for node in NODES}
    handover = Handover(rnd)
    objects = first
    for drawn in [first, *steps]:
        objects = evolve(objects, drawn, rnd) if drawn is not first else first
        snap = handover.snapshot(objects)
        for node, compiler in compilers.items():
            assert compiler.compile(snap) == compile_node(snap, node)


def test_one_changed_policy_is_the_only_one_compiled_again(monkeypatch):
    """With nothing else changed, a policy edit recompiles that policy alone."""
    objects = [namespace("demo", team="a", **{ANALYZER_NS: "true"}),
               md("analyzer1", "analyzer1"),
               pod("analyzer", node="n2", labels={ANALYZER_POD: "analyzer1"},
                   ips=("198.18.9.9",)),
               *[pod(f"p{i}", node="n1" if i < 3 else "n2", labels={"app": f"a{i % 4}"},
                     ips=(f"198.18.0.{i + 1}",)) for i in range(40)],
               *[csp(f"pol{k}", selectors=[{"podSelector": labels(app=f"a{k % 4}")}],
                     rules=[{"srcEP": eps({"podSelector": labels(app=f"a{(k + 1) % 4}")}),
                             "ports": [{"port": 80 + k}],
                             "secondaryActions": mirror("analyzer1")}])
                 for k in range(12)]]
    handover = Handover(random.Random(0))
    compiler = Compiler("n1")
    compiler.compile(handover.snapshot(objects))
    calls = []
    real = Compiler._compile_policy

    def counting(self, policy, *args):
        calls.append(policy.key)
        return real(self, policy, *args)

    monkeypatch.setattr(Compiler, "_compile_policy", counting)
    # No handover randomness: everything but the edited policy is the same dict.
    handover.rnd.random = lambda: 1.0  # type: ignore[method-assign]
    objects[-2] = csp("pol10", selectors=[{"podSelector": labels(app="a2")}],
                      rules=[{"srcEP": eps({"podSelector": labels(app="a3")}),
                              "ports": [{"port": 9999}], "secondaryActions": mirror("analyzer1")}])
    snap = handover.snapshot(objects)
    state = compiler.compile(snap)
    assert calls == ["demo/pol10"]
    assert state == compile_node(snap, "n1")
    assert [r.ports[0].port_lo for p in state.policies for r in p.rules
            if p.name == "demo/pol10"] == [9999]
    # A remote pod relabelled: only the policies whose endpoints it enters or leaves.
    calls.clear()
    objects[3 + 10] = pod("p10", node="n2", labels={"app": "a1"}, ips=("198.18.0.11",))
    snap = handover.snapshot(objects)
    state = compiler.compile(snap)
    # p10 left a2 (the sources of pol1, pol5, pol9) and joined a1 (pol0, pol4, pol8); of
    # those, the policies applying on n1 (pods p0-p2: a0, a1, a2) are compiled again.
    assert sorted(calls) == ["demo/pol0", "demo/pol1", "demo/pol4", "demo/pol5",
                             "demo/pol8", "demo/pol9"]
    assert state == compile_node(snap, "n1")


def test_named_ports_follow_the_pods_that_define_them():
    objects = [namespace("demo", team="a", **{ANALYZER_NS: "true"}), md("analyzer1", "analyzer1"),
               pod("analyzer", node="n2", labels={ANALYZER_POD: "analyzer1"},
                   ips=("198.18.9.9",)),
               pod("web", labels={"app": "web"}, ips=("198.18.0.1",)),
               pod("srv", node="n2", ips=("198.18.0.2",), ports=(("http", 8080, "TCP"),)),
               csp("p", selectors=[{"podSelector": labels(app="web")}],
                   rules=[{"ports": [{"port": "http"}], "secondaryActions": mirror("analyzer1")}])]
    handover = Handover(random.Random(0))
    handover.rnd.random = lambda: 1.0  # type: ignore[method-assign]
    compiler = Compiler("n1")
    compiler.compile(handover.snapshot(objects))
    objects[4] = pod("srv", node="n2", ips=("198.18.0.2",), ports=(("http", 8081, "TCP"),))
    snap = handover.snapshot(objects)
    state = compiler.compile(snap)
    assert state == compile_node(snap, "n1")
    assert [r.ports for p in state.policies for r in p.rules][0][0].port_lo == 8081
