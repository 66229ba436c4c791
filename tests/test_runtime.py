"""agent/runtime.py: the reconcile loop, with a fake source and a fake node (no kernel).

The real datapath under the same loop is tests/test_agent_e2e.py.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from cn2mirror.agent import runtime
from cn2mirror.agent.compiler import rule_key
from cn2mirror.agent.node import ApplyError, ApplyResult
from cn2mirror.agent.programmer import Plan
from cn2mirror.agent.runtime import Agent, Problem, Source
from cn2mirror.agent.snapshot import LoadError, snapshot_from_objects


class FakeSource:
    def __init__(self):
        self.on_change = None
        self.is_ready = False
        self.errors: tuple = ()
        self.stopped = 0

    def start(self, on_change):
        self.on_change = on_change

    def stop(self):
        self.stopped += 1

    def ready(self):
        return self.is_ready

    def emit(self, snapshot):
        self.is_ready = True
        self.on_change(snapshot)


class FakeNode:
    """Records what it is asked to do; ``fail`` makes apply raise; ``gate`` blocks it."""

    def __init__(self):
        self.applied = []
        self.started = self.stopped = 0
        self.cleanup = None
        self.fail: Exception | None = None
        self.gate: threading.Event | None = None
        self.problems: dict[str, str] = {}

    def start(self):
        self.started += 1

    def apply(self, state):
        if self.gate is not None:
            self.gate.wait(5)
        self.applied.append(state)
        if self.fail is not None:
            raise self.fail
        ifindexes = {i.key: 10 + n for n, i in enumerate(state.interfaces)}
        return ApplyResult(Plan(maps={}), changes=len(self.applied), problems=dict(self.problems),
                           ifindexes=ifindexes)

    def stop(self, cleanup=False):
        self.stopped += 1
        self.cleanup = cleanup


def objects(port: int = 80, extra=()):
    return [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "web", "namespace": "demo", "labels": {"app": "web"}},
         "spec": {"nodeName": "node1"},
         "status": {"phase": "Running", "podIPs": [{"ip": "198.18.1.2"}]}},
        {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "MirrorDestination",
         "metadata": {"name": "ext"},
         "spec": {"externalAnalyzer": True, "analyzerIP": "198.19.1.10"}},
        {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "ContrailSecurityPolicy",
         "metadata": {"name": "p", "namespace": "demo"},
         "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                  "rules": [{"ports": [{"protocol": "TCP", "port": port}],
                             "secondaryActions": {"mirrorTo": "ext"}}]}},
        *extra,
    ]


def snap(port: int = 80, extra=()):
    snapshot, errors = snapshot_from_objects(objects(port, extra))
    assert not errors
    return snapshot


@pytest.fixture
def make_agent(state_dir):
    agents = []

    def make(resync: float = 60.0):
        source, node = FakeSource(), FakeNode()
        agent = Agent(source, "node1", node, state_dir, resync_interval=resync)
        agents.append(agent)
        return agent, source, node

    yield make
    for a in agents:
        a.stop()


def rule_ports(state):
    return [p.port_lo for r in state.policies[0].rules for p in r.ports]


def test_fake_source_is_a_source():
    assert isinstance(FakeSource(), Source)


def test_snapshot_is_compiled_applied_and_described(make_agent, state_dir):
    agent, source, node = make_agent()
    agent.start()
    assert node.started == 1 and source.on_change is not None
    assert not agent.ready()  # no snapshot yet
    source.emit(snap())
    assert agent.wait_for(1, 5)
    assert agent.ready()
    assert rule_ports(node.applied[0]) == [80]
    assert agent.last_state is node.applied[0] and agent.desired_state is agent.last_state
    assert agent.last_result.changes == 1
    report = agent.last_report
    assert report.ok and report.trigger == "snapshot" and report.number == 1
    assert (report.policies, report.rules, report.interfaces, report.attached_interfaces,
            report.destinations) == (1, 1, 1, 1, 1)
    assert 0 <= report.duration_s <= report.latency_s < 5
    assert "1 policies, 1 rules, 1/1 interfaces" in report.summary()

    names = json.load(open(os.path.join(state_dir, "names.json")))
    assert names["version"] == 1 and names["node"] == "node1"
    mid = agent.last_state.policies[0].rules[0].mirror_id
    capture = json.load(open(os.path.join(state_dir, "capture-names.json")))
    assert capture["mirror"] == {str(mid): "demo/p rule 0"}
    sid = agent.last_state.interfaces[0].session_id
    assert capture["session"] == {str(sid): "demo/web/eth0"}
    status = json.load(open(os.path.join(state_dir, "status.json")))
    assert status["ready"] and status["reconciles"] == 1 and status["errors"] == []
    assert status["last"]["ok"] and status["last"]["rules"] == 1
    assert not [f for f in os.listdir(state_dir) if f.startswith(".")]  # no temp files
    assert mid == agent.last_state.policies[0].rules[0].mirror_id
    assert rule_key("demo/p", 0) == "csp/demo/p/rule/0"


def test_errors_from_every_origin(make_agent):
    agent, source, node = make_agent()
    agent.start()
    bad = {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "MirrorDestination",
           "metadata": {"name": "broken"}, "spec": {"udpPort": 0}}
    source.errors = (LoadError("/x/a.yaml", 2, "invalid YAML at line 7: oops", 5),)
    node.problems = {"Interface demo/web/eth0": "no local route to 198.18.1.2"}
    source.emit(snap(extra=[bad]))
    assert agent.wait_for(1, 5)
    by_origin = {p.origin: p for p in agent.errors}
    assert by_origin["source"] == Problem("source", "File", "/x/a.yaml document 2 (line 5)",
                                          "invalid YAML at line 7: oops")
    assert by_origin["compiler"].kind == "MirrorDestination"
    assert by_origin["compiler"].name == "broken" and "udpPort" in by_origin["compiler"].reason
    assert by_origin["datapath"] == Problem("datapath", "Interface", "demo/web/eth0",
                                            "no local route to 198.18.1.2")
    assert str(by_origin["datapath"]) == "Interface demo/web/eth0: no local route to 198.18.1.2"
    # The valid objects are applied all the same.
    assert rule_ports(agent.last_state) == [80] and agent.last_report.ok


def test_a_failed_apply_keeps_the_loop_and_the_last_state(make_agent):
    agent, source, node = make_agent()
    agent.start()
    source.emit(snap(80))
    assert agent.wait_for(1, 5)
    good = agent.last_state

    node.fail = ApplyError("the state does not fit the datapath", datapath_unchanged=True)
    source.emit(snap(81))
    assert agent.wait_for(2, 5)
    report = agent.last_report
    assert not report.ok and "does not fit" in report.exception
    assert agent.last_state is good  # what worked stays what is applied
    assert rule_ports(agent.desired_state) == [81]
    assert agent.failed_count == 1
    (p,) = [p for p in agent.errors if p.origin == "agent"]
    assert "keeps what it last applied" in p.reason
    assert agent.ready()  # still serving the last good state

    # The status says what the datapath holds: not "keeps" when that is not so.
    node.fail = ApplyError("writing the maps failed", datapath_unchanged=False)
    source.emit(snap(83))
    assert agent.wait_for(3, 5)
    (p,) = [p for p in agent.errors if p.origin == "agent"]
    assert "holds part of the new state" in p.reason and "keeps" not in p.reason
    node.fail = RuntimeError("something unforeseen")
    source.emit(snap(84))
    assert agent.wait_for(4, 5)
    (p,) = [p for p in agent.errors if p.origin == "agent"]
    assert "not known" in p.reason and "keeps" not in p.reason

    node.fail = None
    source.emit(snap(82))
    assert wait_until(lambda: agent.last_report.ok, 5)
    assert rule_ports(agent.last_state) == [82]
    assert not [p for p in agent.errors if p.origin == "agent"]


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_failed_reconcile_is_retried_with_backoff(make_agent, caplog):
    """Not after the next resync (60 s here) but soon, backing off: 0.5, 1, 2 s...; the
    problem is logged once when it appears and once when it clears."""
    agent, source, node = make_agent(resync=60.0)
    agent.start()
    node.fail = OSError("the analyzer's route is not there yet")
    caplog.set_level("INFO", logger="cn2mirror.agent.runtime")
    t0 = time.monotonic()
    source.emit(snap(80))
    assert agent.wait_for(3, 5)  # the reconcile and two retries, within ~1.5 s
    times = [r.created for r in caplog.records if "applying the state failed" in r.message]
    assert len(times) >= 3 and time.monotonic() - t0 < 3
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 0.4 <= gaps[0] <= 1.0 and gaps[1] >= 0.9 and gaps[1] > gaps[0]
    assert agent.retry_delay() >= 2
    node.fail = None
    # (the failure count is reset last, once the reconcile is complete)
    assert wait_until(lambda: agent.last_report.ok and agent.consecutive_failures == 0, 6)
    assert agent.retry_delay() == 0.5
    appeared = [r for r in caplog.records if r.message.startswith("problem: Reconcile")]
    cleared = [r for r in caplog.records if r.message.startswith("cleared: Reconcile")]
    assert len(appeared) == 1 and len(cleared) == 1


def test_an_unresolved_destination_is_looked_at_again_soon(make_agent):
    """No route to an analyzer: the node's tables are read again after 0.5 s, 1 s,
    2 s ... (at most UNRESOLVED_RETRY_MAX), not at the next resync (60 s here); once it
    resolves, the resync interval is back."""
    agent, source, node = make_agent(resync=60.0)
    node.problems = {"MirrorDestination analyzer1": "no route to analyzer 198.18.1.10"}
    agent.start()
    t0 = time.monotonic()
    source.emit(snap(80))
    assert agent.wait_for(4, 6)  # the reconcile and three resyncs: 0.5 + 1 + 2 s
    assert 3.0 <= time.monotonic() - t0 < 5.5
    assert agent.consecutive_unresolved >= 4
    assert agent._settle_delay(node.apply(node.applied[-1])) == runtime.UNRESOLVED_RETRY_MAX
    node.problems = {"ClusterMirrorPolicy p1": "over capacity"}  # not a destination's
    n = agent.reconcile_count
    assert agent.wait_for(n + 1, 6)
    assert agent.consecutive_unresolved == 0
    assert agent._next_resync - time.monotonic() > 50


def test_a_compiler_crash_does_not_stop_the_agent(make_agent, monkeypatch):
    agent, source, node = make_agent()
    agent.start()
    real = runtime.Compiler.compile

    def crash(self, snapshot):
        raise ValueError("compiler bug")

    monkeypatch.setattr(runtime.Compiler, "compile", crash)
    source.emit(snap())
    assert agent.wait_for(1, 5)
    assert not agent.last_report.ok and "compiler bug" in agent.last_report.exception
    assert node.applied == []
    monkeypatch.setattr(runtime.Compiler, "compile", real)
    source.emit(snap())
    assert agent.wait_for(2, 5) and agent.last_report.ok


def test_snapshots_arriving_during_a_reconcile_are_coalesced(make_agent):
    agent, source, node = make_agent()
    node.gate = threading.Event()
    agent.start()
    source.emit(snap(80))
    time.sleep(0.2)  # the worker is now blocked in apply(80)
    for port in (81, 82, 83):
        source.emit(snap(port))
    node.gate.set()
    assert agent.wait_for(2, 5)
    time.sleep(0.2)
    assert [rule_ports(s) for s in node.applied] == [[80], [83]]
    assert agent.reconcile_count == 2


def test_resync_reapplies_and_retries(make_agent):
    agent, source, node = make_agent(resync=0.2)
    agent.start()
    node.fail = OSError("no route yet")
    source.emit(snap(80))
    assert agent.wait_for(1, 5) and not agent.last_report.ok
    node.fail = None  # the route appeared: the next resync applies the wanted state
    assert agent.wait_for(2, 5)
    report = agent.last_report
    assert report.ok and report.trigger == "resync"
    assert rule_ports(agent.last_state) == [80]
    assert agent.wait_for(4, 5)  # and keeps re-applying it
    assert all(s == node.applied[0] for s in node.applied)


def test_resync_now(make_agent):
    agent, source, node = make_agent(resync=60)
    agent.start()
    source.emit(snap())
    assert agent.wait_for(1, 5)
    agent.resync_now()
    assert agent.wait_for(2, 5) and agent.last_report.trigger == "resync"


def test_listeners_and_explain(make_agent):
    agent, source, node = make_agent()
    seen = []
    agent.add_listener(seen.append)
    agent.add_listener(lambda report: 1 / 0)  # a broken listener is logged, not fatal
    agent.start()
    assert agent.explain("198.18.1.3", "198.18.1.2", "TCP", 80) is None
    source.emit(snap())
    assert agent.wait_for(1, 5)
    source.emit(snap(90))
    assert agent.wait_for(2, 5)
    assert [r.number for r in seen] == [1, 2]
    e = agent.explain("198.18.1.3", "198.18.1.2", "TCP", 90)
    (copy,) = e.copies
    assert copy.destination == "ext" and copy.interface == "demo/web/eth0"
    assert agent.explain("198.18.1.3", "198.18.1.2", "TCP", 80).copies == ()


def test_stop_keeps_or_cleans_the_datapath(make_agent):
    agent, source, node = make_agent()
    agent.start()
    agent.stop()
    agent.stop()  # idempotent
    assert source.stopped == 1 and node.stopped == 1 and node.cleanup is False

    agent2, source2, node2 = make_agent()
    agent2.start()
    agent2.stop(cleanup=True)
    assert node2.cleanup is True


def test_unwritable_state_dir_is_reported_not_fatal(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    source, node = FakeSource(), FakeNode()
    agent = Agent(source, "node1", node, str(blocker / "state"))
    agent.start()
    try:
        source.emit(snap())
        assert agent.wait_for(1, 5) and agent.last_report.ok
    finally:
        agent.stop()


def test_state_files_are_readable_by_root_only(make_agent, state_dir):
    # A state directory left world-readable (by an earlier version, or made by hand),
    # with a file in it that was world-readable too.
    os.chmod(state_dir, 0o755)
    old = os.path.join(state_dir, "status.json")
    with open(old, "w") as f:
        f.write("{}")
    os.chmod(old, 0o644)
    agent, source, _ = make_agent()
    agent.start()
    source.emit(snap())
    assert agent.wait_for(1, 5)
    assert os.stat(state_dir).st_mode & 0o777 == 0o700
    names = sorted(os.listdir(state_dir))
    assert names == ["capture-names.json", "names.json", "status.json"]
    for name in names:
        assert os.stat(os.path.join(state_dir, name)).st_mode & 0o777 == 0o600, name
    # A state directory that does not exist yet is made 0700, parents included.
    from cn2mirror.agent.runtime import write_atomic

    deep = os.path.join(state_dir, "a", "b")
    write_atomic(os.path.join(deep, "x.json"), {})
    assert os.stat(deep).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(deep, "x.json")).st_mode & 0o777 == 0o600
