"""Status, Events, leader election and metrics against the emulated API server.

Two agents (each its own client, source, elector and writer, told apart by User-Agent)
share the emulator: only the leader writes, the statuses land on the right objects and
say what the compiler does, nothing is written twice, and when the leader stops renewing
the other one takes over.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jsonschema
import pytest
from kubernetes import client

from cn2mirror.agent.compiler import compile_node, rule_key
from cn2mirror.agent.kube import KubeSource
from cn2mirror.agent.metrics import MetricsServer, Registry, SyncMetrics, render
from cn2mirror.agent.model import CN2_GROUP, GROUP
from cn2mirror.agent.state import ObjectError
from cn2mirror.agent.status import (
    EventRecorder,
    EventSpec,
    LeaderElector,
    NodeReporter,
    StatusWriter,
    desired_statuses,
)

from .builders import http_get, md, namespace, wait_until
from .builders import mirror_policy as csp
from .kube_emulator import crd_files
from .test_crds import schema_of, unknown_fields
from .test_kube import ADMIN_TOOLS, ANALYZER, pod

V = f"{GROUP}/v1alpha1"
NS = "cn2mirror-system"


def objects() -> list[dict]:
    bad = csp("bad", "demo", "web", "analyzer1",
              rules=[{"ports": [{"protocol": "TCP", "port": 99999}]}])
    two_rules = csp("mirror-web", "demo", "web", "analyzer1", rules=[
        {"ports": [{"protocol": "TCP", "port": "http"}]},
        {"ports": [{"protocol": "UDP"}], "secondaryActions": {"mirrorTo": "ext"}}])
    return [
        namespace("demo"), namespace("tools", **ADMIN_TOOLS), namespace("other"),
        pod("web", "demo", "node1", "198.18.1.2", {"app": "web"}),
        pod("analyzer", "tools", "node2", "198.18.2.10", ANALYZER,
            {"cn2mirror.io/mac": "02:00:00:00:02:10"}),
        md("analyzer1", "analyzer1"),
        md("analyzer1", "analyzer1", api=f"{CN2_GROUP}/v4"),  # given twice
        md("nowhere", "nowhere"),
        md("ext", externalAnalyzer=True, analyzerIP="192.0.2.1"),
        two_rules,
        csp("mirror-web", "other", "web", "missing"),  # same name, another namespace
        bad,
    ]


@dataclass
class AgentUnderTest:
    name: str
    api: client.ApiClient
    source: KubeSource
    elector: LeaderElector
    events: EventRecorder
    writer: StatusWriter

    def stop(self, release: bool = True) -> None:
        self.writer.stop()
        self.elector.stop(release=release)
        self.source.stop()
        self.api.close()


@pytest.fixture
def emu(emu):
    """conftest's, with CN2's CRDs too."""
    emu.install_crd_files(crd_files(CN2_GROUP))
    return emu


@pytest.fixture
def agents(emu):
    made: list[AgentUnderTest] = []

    def make(name: str, lease=(2.0, 1.0, 0.2), start_elector: bool = True) -> AgentUnderTest:
        api = client.ApiClient(emu.configuration())
        api.user_agent = name
        src = KubeSource(api, node_name=name, debounce=0.01, backoff=(0.05, 0.3))
        elector = LeaderElector(api, NS, "cn2mirror-status", name, lease_duration=lease[0],
                                renew_deadline=lease[1], retry_period=lease[2])
        events = EventRecorder(api, instance=name)
        writer = StatusWriter(api, src, elector, events, resync=0.5, min_interval=0.05)
        src.start(lambda s: None)
        writer.start()
        if start_elector:
            elector.start()
        a = AgentUnderTest(name, api, src, elector, events, writer)
        made.append(a)
        wait_until(src.ready, 10)
        return a

    yield make
    for a in made:
        a.stop()


def status_of(emu, api_version, kind, name, ns=None) -> dict:
    return emu.read(api_version, kind, name, ns).get("status") or {}


def ready(status: dict) -> dict:
    (cond,) = [c for c in status.get("conditions") or [] if c["type"] == "Ready"]
    return cond


def status_patches(emu, user_agent=None):
    return [q for q in emu.requests_matching("PATCH", "/status", user_agent)]


# ---------------------------------------------------------------------------- tests


def test_status_lands_on_each_object_and_says_what_nodes_do(emu, agents):
    for o in objects():
        emu.apply(o)
    a = agents("node1")
    wait_until(a.elector.is_leader, 5)
    b = agents("node2")  # a second agent: never the leader here
    wait_until(lambda: "conditions" in status_of(emu, V, "ContrailSecurityPolicy", "bad",
                                                 "demo"), what="the statuses")
    wait_until(lambda: a.writer.rounds >= 2)

    md1 = status_of(emu, V, "MirrorDestination", "analyzer1")
    assert {k: md1.get(k) for k in ("analyzerPod", "analyzerIP", "analyzerMac",
                                    "analyzerInterface", "mode", "observedGeneration")} == {
        "analyzerPod": "tools/analyzer", "analyzerIP": "198.18.2.10",
        "analyzerMac": "02:00:00:00:02:10", "analyzerInterface": "eth0", "mode": "jmirror",
        "observedGeneration": 1}
    assert ready(md1)["status"] == "True" and "on node node2" in ready(md1)["message"]
    dup = status_of(emu, f"{CN2_GROUP}/v4", "MirrorDestination", "analyzer1")
    assert ready(dup)["reason"] == "Duplicate" and "analyzerPod" not in dup
    nowhere = ready(status_of(emu, V, "MirrorDestination", "nowhere"))
    assert (nowhere["status"], nowhere["reason"]) == ("False", "AnalyzerUnavailable")
    assert nowhere["message"] == "no pod has label core.juniper.net/analyzer-pod=nowhere"
    ext = status_of(emu, V, "MirrorDestination", "ext")
    assert ext["analyzerIP"] == "192.0.2.1" and "analyzerPod" not in ext
    assert ready(ext)["message"] == "external analyzer 192.0.2.1:30030"

    # The mirror ids in the status are the ones the nodes put on the wire.
    state = compile_node(a.source.snapshot(), "node1")
    (policy,) = state.policies
    ids = {r.index: r.mirror_id for r in policy.rules}
    accepted = ready(status_of(emu, V, "ContrailSecurityPolicy", "mirror-web", "demo"))
    assert accepted["status"] == "True" and accepted["reason"] == "Accepted"
    assert accepted["message"] == (f"mirrors rule 0 to analyzer1 as mirror id {ids[0]}; "
                                   f"rule 1 to ext as mirror id {ids[1]}")
    other = ready(status_of(emu, V, "ContrailSecurityPolicy", "mirror-web", "other"))
    assert (other["status"], other["reason"]) == ("False", "DestinationUnavailable")
    assert other["message"] == "mirrorTo missing: no MirrorDestination named missing"
    bad = ready(status_of(emu, V, "ContrailSecurityPolicy", "bad", "demo"))
    assert bad["reason"] == "Invalid"
    assert bad["message"].startswith("spec.rules[0].ports[0].port: must be between 1 and 65535")

    # Every status written fits the CRDs' status schemas.
    for obj in emu.items(V, "MirrorDestination") + emu.items(V, "ContrailSecurityPolicy"):
        schema = schema_of(obj["apiVersion"], obj["kind"])["properties"]["status"]
        jsonschema.Draft7Validator(schema).validate(obj["status"])
        assert unknown_fields(schema, obj["status"]) == []

    # Only the leader wrote; Events for the four objects a user must fix, once each.
    assert status_patches(emu, "node2") == []
    assert len(status_patches(emu, "node1")) == 7
    events = emu.items("events.k8s.io/v1", "Event")
    assert sorted((e["regarding"]["kind"], e["regarding"]["name"], e["metadata"]["namespace"],
                   e["reason"]) for e in events) == [
        ("ContrailSecurityPolicy", "bad", "demo", "Invalid"),
        ("ContrailSecurityPolicy", "mirror-web", "other", "DestinationUnavailable"),
        ("MirrorDestination", "analyzer1", "default", "Duplicate"),
        ("MirrorDestination", "nowhere", "default", "AnalyzerUnavailable")]
    uids = {o["metadata"]["uid"] for o in emu.items(V, "ContrailSecurityPolicy")}
    assert all(e["regarding"]["uid"] in uids for e in events
               if e["regarding"]["kind"] == "ContrailSecurityPolicy")
    assert all(e["type"] == "Warning" and e["reportingInstance"] == "node1" for e in events)

    # Nothing changes: nothing is written again (several rounds of resync).
    rounds = a.writer.rounds
    wait_until(lambda: a.writer.rounds >= rounds + 2)
    assert len(status_patches(emu)) == 7
    assert len(emu.items("events.k8s.io/v1", "Event")) == 4

    # The bad policy is fixed: Ready turns True (new transition time), generation seen.
    before = ready(status_of(emu, V, "ContrailSecurityPolicy", "bad", "demo"))
    fixed = csp("bad", "demo", "web", "analyzer1", rules=[{"ports": [{"port": 443}]}])
    emu.apply(fixed)
    wait_until(lambda: ready(status_of(emu, V, "ContrailSecurityPolicy", "bad", "demo"))
               ["status"] == "True")
    after = status_of(emu, V, "ContrailSecurityPolicy", "bad", "demo")
    assert after["observedGeneration"] == 2 == ready(after)["observedGeneration"]
    assert ready(after)["lastTransitionTime"] >= before["lastTransitionTime"]
    assert status_patches(emu, "node2") == []
    del b


def test_leader_hand_over(emu, agents):
    for o in objects()[:6]:
        emu.apply(o)
    a = agents("node1")
    wait_until(a.elector.is_leader, 5)
    b = agents("node2")
    wait_until(lambda: ready(status_of(emu, V, "MirrorDestination", "analyzer1")))
    assert not b.elector.is_leader()
    lease = emu.read("coordination.k8s.io/v1", "Lease", "cn2mirror-status", NS)
    assert lease["spec"]["holderIdentity"] == "node1"

    # node1 hangs: it stops renewing, and stops writing on its own before the lease ends.
    a.elector.pause()
    wait_until(lambda: not a.elector.is_leader(), 2, what="node1 to step down")
    wait_until(b.elector.is_leader, 5, what="node2 to take over")
    lease = emu.read("coordination.k8s.io/v1", "Lease", "cn2mirror-status", NS)
    assert lease["spec"]["holderIdentity"] == "node2"
    assert lease["spec"]["leaseTransitions"] == 1
    emu.apply(md("late", "analyzer1"))
    wait_until(lambda: status_of(emu, V, "MirrorDestination", "late").get("analyzerPod"),
               what="the new leader's status")
    late = [q for q in status_patches(emu) if q.path.endswith("/late/status")]
    assert [q.user_agent for q in late] == ["node2"]

    # node1 comes back while node2 holds the lease: it waits. node2 leaves cleanly: the
    # lease is released and node1 takes over at once (no lease_duration wait).
    a.elector.resume()
    time.sleep(0.5)
    assert not a.elector.is_leader() and b.elector.is_leader()
    b.elector.stop(release=True)
    released = emu.read("coordination.k8s.io/v1", "Lease", "cn2mirror-status", NS)
    assert not released["spec"].get("holderIdentity")
    t0 = time.monotonic()
    wait_until(a.elector.is_leader, 3)
    assert time.monotonic() - t0 < 1.5
    emu.apply(md("later", "analyzer1"))
    wait_until(lambda: status_of(emu, V, "MirrorDestination", "later").get("analyzerPod"))
    later = [q for q in status_patches(emu) if q.path.endswith("/later/status")]
    assert [q.user_agent for q in later] == ["node1"]


def test_leader_without_api_server_steps_down(emu, agents):
    a = agents("node1")
    wait_until(a.elector.is_leader, 5)
    emu.go_down()
    wait_until(lambda: not a.elector.is_leader(), 3, what="the leader to step down")
    emu.come_up()
    wait_until(a.elector.is_leader, 5, what="the lease to be renewed")


def test_elector_refuses_unsafe_timings(emu):
    api = client.ApiClient(emu.configuration())
    with pytest.raises(ValueError):
        LeaderElector(api, NS, "x", "me", lease_duration=5, renew_deadline=6, retry_period=1)


def test_event_series_and_recurrence(emu):
    api = client.ApiClient(emu.configuration())
    rec = EventRecorder(api, instance="node1", repeat_interval=0)
    target = emu.apply(md("a", "x"))
    spec = EventSpec.about(target, "AnalyzerUnavailable", "no pod")
    rec.reconcile("status", [spec])
    rec.reconcile("status", [spec])  # again, past the repeat interval: the series grows
    (event,) = emu.items("events.k8s.io/v1", "Event")
    assert event["series"]["count"] == 2 and event["note"] == "no pod"
    assert event["regarding"]["uid"] == target["metadata"]["uid"]
    rec.reconcile("status", [])  # resolved
    rec.reconcile("status", [spec])  # and back: a new Event
    assert len(emu.items("events.k8s.io/v1", "Event")) == 2
    rec.repeat_interval = 600
    rec.reconcile("status", [spec])
    assert len(emu.items("events.k8s.io/v1", "Event")) == 2 and rec.counts["deduplicated"] == 1


def test_node_reports_its_own_pods_and_datapath_problems(emu):
    """Every node (leader or not) reports what only it sees: its pods' annotation errors
    and what its datapath could not set up, as Events on those pods and destinations."""
    from types import SimpleNamespace

    from cn2mirror.agent.snapshot import snapshot_from_objects

    api = client.ApiClient(emu.configuration())
    objs = [emu.apply(o) for o in (namespace("demo"),
                                   pod("web", "demo", "node1", "198.18.1.2", {"app": "web"}),
                                   md("ext", externalAnalyzer=True, analyzerIP="192.0.2.1"))]
    snap, _ = snapshot_from_objects(objs)
    reporter = NodeReporter(EventRecorder(api, instance="node1"), "node1")
    state = SimpleNamespace(errors=(ObjectError("Pod", "demo/web", "annotation x: bad"),
                                    ObjectError("MirrorDestination", "ext", "not mine")))
    result = SimpleNamespace(problems={"Interface demo/web/eth0": "no local route",
                                       "MirrorDestination ext": "no route to analyzer"})
    reporter.report(state, result, snap)
    reporter.report(state, result, snap)  # the same again: deduplicated
    events = emu.items("events.k8s.io/v1", "Event")
    assert sorted((e["regarding"]["kind"], e["reason"], e["note"]) for e in events) == [
        ("MirrorDestination", "AnalyzerUnreachable", "node node1: no route to analyzer"),
        ("Pod", "InterfaceNotFound", "node node1: no local route"),
        ("Pod", "PortMirrorError", "annotation x: bad")]
    web_uid = objs[1]["metadata"]["uid"]
    assert {e["regarding"]["uid"] for e in events if e["regarding"]["kind"] == "Pod"} == {
        web_uid}


def test_desired_statuses_need_no_api():
    from cn2mirror.agent.snapshot import snapshot_from_objects

    snap, errors = snapshot_from_objects(objects())
    assert errors == []
    out = {(o["apiVersion"], o["metadata"].get("namespace"), o["metadata"]["name"]):
           s["conditions"][0]["reason"] for o, s in desired_statuses(snap)}
    assert out == {
        (V, None, "analyzer1"): "Resolved", (f"{CN2_GROUP}/v4", None, "analyzer1"): "Duplicate",
        (V, None, "nowhere"): "AnalyzerUnavailable", (V, None, "ext"): "Resolved",
        (V, "demo", "mirror-web"): "Accepted", (V, "other", "mirror-web"):
        "DestinationUnavailable", (V, "demo", "bad"): "Invalid"}
    assert rule_key("demo/mirror-web", 0) == "csp/demo/mirror-web/rule/0"


def test_status_names_labelled_pods_an_admin_did_not_allow():
    from cn2mirror.agent.snapshot import snapshot_from_objects

    # A tenant labels its pod as analyzer1's (issue 11): the status says it was refused,
    # and the analyzer stays the one in the admin's namespace.
    sink = pod("sink", "evil", "node1", "198.18.1.66", ANALYZER)
    snap, errors = snapshot_from_objects([*objects(), namespace("evil"), sink])
    assert errors == []
    (status,) = [s for o, s in desired_statuses(snap)
                 if o["metadata"]["name"] == "analyzer1" and o["apiVersion"] == V]
    assert status["analyzerPod"] == "tools/analyzer"
    ready = status["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("True", "Resolved")
    assert ready["message"].endswith("; not chosen as the analyzer: pod evil/sink is in "
                                     "namespace evil, which no admin allowed analyzers in")


# ---------------------------------------------------------------------------- metrics

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})?'
                    r' (-?[0-9.e+-]+|NaN|\+Inf|-Inf)$')


def check_exposition(text: str) -> dict[str, float]:
    """Checks the text format line by line; returns {sample with labels: value}."""
    values, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "histogram"), line
            assert name not in typed, f"{name} typed twice"
            typed.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            assert SAMPLE.match(line), line
            key, value = line.rsplit(" ", 1)
            assert key not in values, f"duplicate sample {key}"
            values[key] = float(value)
    return values




def test_metrics_health_and_readiness(emu, agents):
    for o in objects()[:6]:
        emu.apply(o)
    a = agents("node1")
    sync = SyncMetrics()
    registry = Registry()
    for c in (a.source, sync, a.elector, a.writer, a.events):
        registry.register(c)
    sync.observe(0.004, latency=0.02, errors=1, problems=0)
    # cache_seconds=0: this test reads values as they change from one scrape to the next
    server = MetricsServer(registry, "127.0.0.1:0", {"source": a.source.healthy},
                           {"source": a.source.ready}, cache_seconds=0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        wait_until(a.elector.is_leader, 5)
        code, text = http_get(base + "/metrics")
        assert code == 200
        values = check_exposition(text)
        assert values['cn2mirror_kube_objects{resource="pods"}'] == 2
        assert values['cn2mirror_kube_objects{resource="mirrordestinations.mirror.cn2mirror.io"}'
                      ] == 1
        assert values['cn2mirror_kube_relists_total{resource="pods"}'] == 1
        assert values["cn2mirror_kube_local_pods"] == 1
        assert values["cn2mirror_leader"] == 1
        assert values['cn2mirror_sync_duration_seconds_bucket{le="0.005"}'] == 1
        assert values['cn2mirror_sync_latency_seconds_bucket{le="0.01"}'] == 0
        assert values["cn2mirror_sync_latency_seconds_count"] == 1
        assert values["cn2mirror_object_errors"] == 1
        assert http_get(base + "/healthz")[0] == 200
        assert http_get(base + "/readyz") == (200, "[+]source ok\nok\n")
        assert http_get(base + "/nothing")[0] == 404

        emu.cut_watches()
        emu.go_down()
        wait_until(lambda: http_get(base + "/readyz")[0] == 503, 5)
        assert http_get(base + "/healthz")[0] == 200  # alive: no restart for an absent API
        code, text = http_get(base + "/metrics")
        values = check_exposition(text)
        assert values["cn2mirror_kube_ready"] == 0
        assert values['cn2mirror_kube_watch_restarts_total{resource="pods",reason="error"}'] >= 1
        emu.come_up()
        wait_until(lambda: http_get(base + "/readyz")[0] == 200, 10)
    finally:
        server.stop()


def test_render_escapes_and_orders():
    from cn2mirror.agent.metrics import Counter, Family, Histogram

    c = Counter("x_total", "Help with \\ and\nnewline.", ("a",))
    c.inc(a='q"uo\\te\n')
    h = Histogram("h_seconds", "h", (0.1, 1))
    h.observe(0.5)
    text = render([*c.collect(), *h.collect(), Family("x_total", "gauge", "dup")])
    assert 'x_total{a="q\\"uo\\\\te\\n"} 1' in text
    assert "# HELP x_total Help with \\\\ and newline." in text
    assert text.count("# TYPE x_total") == 1
    assert 'h_seconds_bucket{le="0.1"} 0' in text and 'h_seconds_bucket{le="+Inf"} 1' in text
    assert "h_seconds_sum 0.5" in text and "h_seconds_count 1" in text
    check_exposition(text)


def test_objects_left_out_for_capacity_get_an_event_naming_why(emu):
    """The capacity pass's rejections (agent/capacity.py) are said on the objects."""
    from types import SimpleNamespace

    from cn2mirror.agent.snapshot import snapshot_from_objects

    api = client.ApiClient(emu.configuration())
    objs = [emu.apply(o) for o in (namespace("demo"),
                                   pod("web", "demo", "node1", "198.18.1.2", {"app": "web"}),
                                   md("ext", externalAnalyzer=True, analyzerIP="192.0.2.1"),
                                   csp("big", "demo", "web", "ext"))]
    snap, _ = snapshot_from_objects(objs)
    reporter = NodeReporter(EventRecorder(api, instance="node1"), "node1")
    result = SimpleNamespace(problems={
        "ContrailSecurityPolicy demo/big": "the node's rule slots are full: left out",
        "Pod demo/web": "namespace demo may use 2 interface slots: left out"})
    reporter.report(SimpleNamespace(errors=()), result, snap)
    events = emu.items("events.k8s.io/v1", "Event")
    assert sorted((e["regarding"]["kind"], e["regarding"]["name"], e["reason"], e["note"])
                  for e in events) == [
        ("ContrailSecurityPolicy", "big", "CapacityExceeded",
         "node node1: the node's rule slots are full: left out"),
        ("Pod", "web", "CapacityExceeded",
         "node node1: namespace demo may use 2 interface slots: left out")]
