"""The Kubernetes source against an emulated API server, through the real client.

Each test starts tests/kube_emulator.py on 127.0.0.1 with the CRDs of manifests/crds,
runs agent.kube.KubeSource on it, changes objects and breaks the connection in the ways
an API server does (watch cut mid-line, 410 Gone after compaction, the server away,
malformed lines), and checks the snapshots the source hands on and what the compiler
makes of them.
"""

from __future__ import annotations

import json
import time

import click
import pytest
from click.testing import CliRunner
from kubernetes import client

from cn2mirror.agent import kube
from cn2mirror.agent.compiler import compile_node
from cn2mirror.agent.kube import KubeSource, trim
from cn2mirror.agent.model import CN2_GROUP, GROUP
from cn2mirror.cli.kube_options import kube_options, kube_options_from_params

from . import builders
from .builders import md, namespace, wait_until
from .builders import mirror_policy as csp
from .kube_emulator import Snapshots, crd_files, names

MD_V = builders.API


# ---------------------------------------------------------------------------- objects


def pod(name: str, ns: str, node: str, ip: str, labels: dict | None = None,
        annotations: dict | None = None, phase: str = "Running") -> dict:
    """A pod as this API server holds it: one address, a MAC annotation, a named port."""
    return builders.pod(name, ns, node, labels, (ip,),
                        {"cn2mirror.io/mac": "02:00:00:00:00:01", **(annotations or {})},
                        phase, ports=(("http", 80, "TCP"),), container="main", image="busybox")


ANALYZER = {"core.juniper.net/analyzer-pod": "analyzer1"}
# What an admin sets on the analyzers' namespace: analyzers allowed there, and their own
# network annotations (the MAC) believed.
ADMIN_TOOLS = {"cn2mirror.io/analyzer-namespace": "true",
               "cn2mirror.io/trusted-network-annotations": "true"}


def cluster() -> list[dict]:
    """web and client on node1, db and the analyzer on node2."""
    return [
        namespace("demo"), namespace("tools", **ADMIN_TOOLS),
        pod("web", "demo", "node1", "198.18.1.2", {"app": "web"}),
        pod("client", "demo", "node1", "198.18.1.3", {"app": "client"}),
        pod("db", "demo", "node2", "198.18.2.2", {"app": "db"}),
        pod("analyzer", "tools", "node2", "198.18.2.10", ANALYZER),
        md("analyzer1", "analyzer1"),
    ]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def api(emu):
    c = client.ApiClient(emu.configuration())
    yield c
    c.close()


@pytest.fixture
def make_source(api):
    started: list[KubeSource] = []

    def make(objects=(), emu=None, **kwargs):
        for o in objects:
            emu.apply(o)
        options = {"debounce": 0.01, "backoff": (0.05, 0.3), "rediscover": 0.3,
                   "page_size": 2, **kwargs}
        src = KubeSource(api, node_name="node1", **options)
        snaps = Snapshots()
        src.start(snaps)
        started.append(src)
        wait_until(src.ready, 10, what="the source to sync")
        snaps.wait(lambda s: True, what="the first snapshot")
        return src, snaps

    yield make
    for s in started:
        s.stop()


def state_of(snapshot, node="node1"):
    return compile_node(snapshot, node)


# ---------------------------------------------------------------------------- tests


def test_initial_list_is_complete_and_compiles(emu, make_source):
    """Paginated lists (page size 2) of every kind make the first snapshot; remote pods
    are in it (the analyzer on node2 is chosen, db is an endpoint)."""
    rule = {"srcEP": {"endPoints": [{"podSelector": {"matchLabels": {"app": "db"}}}]},
            "secondaryActions": {"mirrorTo": "analyzer1"}}
    objs = cluster() + [csp("web-from-db", "demo", "web", "analyzer1", rules=[rule])]
    src, snaps = make_source(objs, emu)
    snap = snaps.last
    assert names(snap.pods) == ["demo/client", "demo/db", "demo/web", "tools/analyzer"]
    assert names(snap.namespaces) == ["demo", "tools"]
    assert names(snap.destinations) == ["analyzer1"]
    assert names(snap.policies) == ["demo/web-from-db"]
    assert snaps.count == 1
    assert all(o["apiVersion"] and o["kind"] for o in snap.objects())

    state = state_of(snap)
    assert state.errors == ()
    assert [i.key for i in state.interfaces] == ["demo/web/eth0"]
    (policy,) = state.policies
    assert policy.rules[0].src[0].cidr == "198.18.2.2/32"  # db, a remote pod
    assert state.destination("analyzer1").analyzer_ip == "198.18.2.10"
    assert state.destination("analyzer1").analyzer_pod == "tools/analyzer"
    assert all(r.stats.relists == 1 for r in src.reflectors.values())
    pages = [q for q in emu.requests_matching("GET", "/api/v1/pods") if "continue" in q.query]
    assert len(pages) == 1  # 4 pods, 2 a page


def test_add_modify_delete(emu, make_source):
    src, snaps = make_source(cluster(), emu)
    assert state_of(snaps.last).policies == ()

    emu.apply(csp("mirror-web", "demo", "web", "analyzer1"))
    snap = snaps.wait(lambda s: s.policies, what="the policy")
    assert [p.name for p in state_of(snap).policies] == ["demo/mirror-web"]

    emu.apply(csp("mirror-web", "demo", "client", "analyzer1"))  # now selects client
    snap = snaps.wait(lambda s: s.policies and s.policies[0]["spec"]["selectors"][0]
                      ["podSelector"]["matchLabels"]["app"] == "client", what="the change")
    (policy,) = state_of(snap).policies
    assert policy.interfaces == frozenset({"demo/client/eth0"})

    emu.delete(MD_V, "ContrailSecurityPolicy", "mirror-web", "demo")
    snap = snaps.wait(lambda s: not s.policies, what="the deletion")
    assert state_of(snap).policies == ()
    # A pod moving to another address is followed too.
    moved = pod("analyzer", "tools", "node2", "198.18.2.11", ANALYZER)
    emu.apply(moved)
    snap = snaps.wait(lambda s: any(p["status"]["podIP"] == "198.18.2.11" for p in s.pods))
    emu.apply(csp("again", "demo", "web", "analyzer1"))
    snap = snaps.wait(lambda s: s.policies)
    assert state_of(snap).destination("analyzer1").analyzer_ip == "198.18.2.11"


def test_updates_that_change_nothing_read_make_no_snapshot(emu, make_source):
    """A pod status update (conditions), an unrelated annotation, or a status written on
    a policy are stored but hand the runtime nothing new."""
    objs = cluster() + [csp("mirror-web", "demo", "web", "analyzer1")]
    src, snaps = make_source(objs, emu)
    before = snaps.count
    web = emu.read("v1", "Pod", "web", "demo")
    web["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    web["metadata"]["annotations"]["example.com/unrelated"] = "x" * 1000
    web["metadata"]["managedFields"] = [{"manager": "kubelet", "operation": "Update"}]
    emu.apply(web)
    r = emu.resource(MD_V, "ContrailSecurityPolicy")
    emu.update(r, "mirror-web", "demo", {"status": {"observedGeneration": 1}}, "status")
    pods = src.reflectors[kube.PODS]
    web_rv = emu.read("v1", "Pod", "web", "demo")["metadata"]["resourceVersion"]
    wait_until(lambda: pods.cache[("demo", "web")]["metadata"]["resourceVersion"] == web_rv,
               what="the pod's update to arrive")
    policies = next(r for res, r in src.reflectors.items() if res.kind == "ContrailSecurityPolicy")
    wait_until(lambda: policies.cache[("demo", "mirror-web")].get("status"))
    time.sleep(0.1)  # longer than the debounce
    assert snaps.count == before
    cached = pods.cache[("demo", "web")]
    assert "managedFields" not in cached["metadata"]
    assert set(cached["metadata"]["annotations"]) == {"cn2mirror.io/mac"}
    assert "conditions" not in cached["status"]
    # ...whereas a label change is news.
    web = emu.read("v1", "Pod", "web", "demo")
    web["metadata"]["labels"]["tier"] = "front"
    emu.apply(web)
    snaps.wait(lambda s: any(p["metadata"]["labels"].get("tier") for p in s.pods))


def test_trim_keeps_what_the_model_reads():
    big = pod("web", "demo", "node1", "198.18.1.2", {"app": "web"},
              {"k8s.v1.cni.cncf.io/networks": "net1", "core.juniper.net/mirror-destination":
               "a1", "kubectl.kubernetes.io/last-applied-configuration": "{}", "other": "x"})
    big["spec"]["volumes"] = [{"name": "v", "emptyDir": {}}]
    big["spec"]["hostNetwork"] = False
    big["status"]["containerStatuses"] = [{"name": "main", "ready": True}]
    t = trim(kube.PODS, big)
    assert set(t["metadata"]["annotations"]) == {"k8s.v1.cni.cncf.io/networks",
                                                  "core.juniper.net/mirror-destination",
                                                  "cn2mirror.io/mac"}
    assert t["spec"] == {"nodeName": "node1", "hostNetwork": False,
                         "containers": [{"name": "main", "ports": big["spec"]["containers"][0]
                                         ["ports"]}]}
    assert t["status"] == {"phase": "Running", "podIP": "198.18.1.2",
                           "podIPs": [{"ip": "198.18.1.2"}]}
    from cn2mirror.agent.model import parse_pod

    assert parse_pod(t) == parse_pod(big)


def test_watch_cut_mid_stream_is_resumed_without_relist(emu, make_source, caplog):
    src, snaps = make_source(cluster(), emu)
    assert emu.watch_count() == 5
    assert emu.cut_watches() == 5  # half an event, then the connection breaks
    emu.apply(csp("during-cut", "demo", "web", "analyzer1"))
    emu.delete("v1", "Pod", "client", "demo")
    snap = snaps.wait(lambda s: s.policies and "demo/client" not in names(s.pods),
                      what="the changes made during the cut")
    assert names(snap.policies) == ["demo/during-cut"]
    wait_until(lambda: emu.watch_count() == 5, what="every watch to be back")
    for r in src.reflectors.values():
        assert r.stats.relists == 1, r.res.name  # resumed from its resourceVersion
        assert r.stats.restarts.get("error", 0) >= 1
        assert r.stats.malformed == 0  # the half line was never parsed
    assert src.ready()
    # Every watch resumed from a version it had seen: the emulator replayed the rest.
    resumed = [q for q in emu.requests_matching("GET") if q.query.get("watch") == "true"]
    assert all(q.query.get("resourceVersion") not in (None, "0") for q in resumed)
    assert [p.name for p in state_of(snap).policies] == ["demo/during-cut"]
    # Cut again: each cut is resumed at once, never counted as an outage.
    emu.cut_watches()
    # The emulator counts a watch when its request arrives, before the reflector has
    # its response: wait for the reflectors to be watching again...
    wait_until(lambda: emu.watch_count() == 5 and all(
        r.failures == 0 and r.connected and r.stats.restarts.get("error") == 2
        for r in src.reflectors.values()))
    # ...with no failed retry in between (one would add an "error" restart).
    assert all(r.stats.restarts.get("error") == 2 for r in src.reflectors.values())
    assert "cannot list or watch" not in caplog.text


def test_no_event_is_applied_twice(emu, make_source):
    """Replayed or stale events (same uid, old resourceVersion) and deletions of objects
    the cache never had are ignored; a recreated object (new uid) is taken."""
    src, snaps = make_source(cluster() + [csp("p", "demo", "web", "analyzer1")], emu)
    old = emu.read(MD_V, "ContrailSecurityPolicy", "p", "demo")
    emu.apply(csp("p", "demo", "client", "analyzer1"))
    snaps.wait(lambda s: s.policies[0]["spec"]["selectors"][0]["podSelector"]
               ["matchLabels"]["app"] == "client")
    count = snaps.count
    policies = next(r for res, r in src.reflectors.items() if res.kind == "ContrailSecurityPolicy")
    ignored = policies.stats.ignored
    emu.inject_line(json.dumps({"type": "MODIFIED", "object": old}), "contrailsecuritypolicies")
    ghost = csp("ghost", "demo", "web", "analyzer1")
    ghost["metadata"].update(uid="0000", resourceVersion="1")
    emu.inject_line(json.dumps({"type": "DELETED", "object": ghost}), "contrailsecuritypolicies")
    wait_until(lambda: policies.stats.ignored == ignored + 2, what="the stale events")
    assert policies.cache[("demo", "p")]["spec"]["selectors"][0]["podSelector"][
        "matchLabels"]["app"] == "client"
    # Deleted and created again under the same name: a new uid, taken at once.
    emu.delete(MD_V, "ContrailSecurityPolicy", "p", "demo")
    emu.apply(csp("p", "demo", "db", "analyzer1"))
    snap = snaps.wait(lambda s: s.policies and s.policies[0]["spec"]["selectors"][0]
                      ["podSelector"]["matchLabels"]["app"] == "db")
    assert snap.policies[0]["metadata"]["uid"] != old["metadata"]["uid"]
    assert snaps.count > count


def test_410_gone_relists_and_converges(emu, make_source):
    """The API server goes away; while it is away ready() is False and the last objects
    stay; changes made meanwhile are compacted, so the resumed watch gets 410 Gone and
    the source relists: deletions it never saw as events are applied too."""
    src, snaps = make_source(cluster() + [csp("old", "demo", "web", "analyzer1")], emu)
    emu.go_down()
    wait_until(lambda: not src.ready(), what="ready() to turn False")
    count = snaps.count
    assert names(src.snapshot().policies) == ["demo/old"]  # the last objects are kept
    emu.delete(MD_V, "ContrailSecurityPolicy", "old", "demo")
    emu.apply(csp("new", "demo", "client", "analyzer1"))
    emu.delete("v1", "Pod", "db", "demo")
    emu.compact()
    assert snaps.count == count  # nothing while away
    emu.come_up()
    # Resources converge each on its own (as informers do); wait for all of them.
    snap = snaps.wait(lambda s: names(s.policies) == ["demo/new"] and
                      "demo/db" not in names(s.pods), timeout=10, what="convergence after 410")
    wait_until(src.ready, 5)
    for r in src.reflectors.values():
        assert r.stats.restarts.get("expired", 0) >= 1, r.res.name
        assert r.stats.relists == 2, r.res.name
    (policy,) = state_of(snap).policies
    assert policy.interfaces == frozenset({"demo/client/eth0"})


def test_after_an_outage_every_kind_comes_back_promptly(emu, make_source):
    """With the production backoff (0.2 s doubling to 30 s, per kind), a 10 s outage
    leaves each kind waiting out a backoff of several seconds. As soon as one kind
    reaches the API server again, the others retry too: they all reconnect within a
    second of the first, none lagging its own backoff (up to ~30 s) behind."""
    src, snaps = make_source(cluster(), emu, backoff=(0.2, 30.0))
    emu.go_down()
    wait_until(lambda: not src.ready(), what="ready() to turn False")
    time.sleep(10)
    emu.apply(csp("during", "demo", "web", "analyzer1"))
    emu.come_up()
    back: dict[str, float] = {}
    deadline = time.monotonic() + 40
    while len(back) < len(src.reflectors) and time.monotonic() < deadline:
        for r in list(src.reflectors.values()):
            if r.connected and r.res.name not in back:
                back[r.res.name] = time.monotonic()
        time.sleep(0.01)
    assert len(back) == len(src.reflectors) >= 5
    spread = max(back.values()) - min(back.values())
    assert spread < 1.0, {k: round(v - min(back.values()), 2) for k, v in back.items()}
    snaps.wait(lambda s: "demo/during" in names(s.policies), timeout=5, what="the change")
    wait_until(src.ready, 5)


def test_malformed_lines_and_objects_are_skipped(emu, make_source):
    """A line that is not JSON, an event without a name: counted, reported in errors,
    and the stream goes on. An object the model rejects is the compiler's ObjectError
    and every other object still applies."""
    src, snaps = make_source(cluster(), emu)
    wait_until(lambda: emu.watching("pods"), what="the pods watch")
    emu.inject_line("this is not JSON", "pods")
    emu.inject_line(json.dumps({"type": "ADDED", "object": {"metadata": {}}}), "pods")
    bad = csp("bad", "demo", "client", "analyzer1",
              rules=[{"ports": [{"protocol": "TCP", "port": 99999}]}])
    emu.apply(bad)
    emu.apply(csp("good", "demo", "web", "analyzer1"))
    snap = snaps.wait(lambda s: len(s.policies) == 2)
    pods = src.reflectors[kube.PODS]
    wait_until(lambda: pods.stats.malformed == 2)
    emu.apply(pod("late", "demo", "node1", "198.18.1.9", {"app": "late"}))
    snap = snaps.wait(lambda s: "demo/late" in names(s.pods))
    assert any("pods: skipped 2 malformed" in e and "without name" in e for e in src.errors)
    state = state_of(snap)
    assert [p.name for p in state.policies] == ["demo/good"]
    (error,) = [e for e in state.errors if e.name == "demo/bad"]
    assert "spec.rules[0].ports[0].port" in error.reason and "99999" in error.reason
    assert src.ready()


def test_cn2_group_is_discovered_and_watched(emu, make_source):
    """CN2's CRDs installed after the agent started are found by rediscovery; their
    preferred version (v4) is the one watched, once."""
    src, snaps = make_source(cluster(), emu)
    assert {r.group for r in src.resources()} == {"", GROUP}
    emu.install_crd_files(crd_files(CN2_GROUP))
    # The three CRDs are installed one by one: a rediscovery may see part of the group.
    wait_until(lambda: sum(r.group == CN2_GROUP for r in src.resources()) == 3, 10,
               what="rediscovery")
    cn2 = sorted((r.kind, r.version) for r in src.resources() if r.group == CN2_GROUP)
    assert cn2 == [("ContrailSecurityPolicy", "v4"), ("GlobalContrailSecurityPolicy", "v4"),
                   ("MirrorDestination", "v4")]
    emu.apply(md("juniper", "analyzer1", api=f"{CN2_GROUP}/v1alpha1"))
    emu.apply(csp("cn2-policy", "demo", "web", "juniper", f"{CN2_GROUP}/v1alpha1"))
    snap = snaps.wait(lambda s: s.policies and len(s.destinations) == 2)
    assert {o["apiVersion"] for o in snap.policies} == {f"{CN2_GROUP}/v4"}
    state = state_of(snap)
    assert [p.name for p in state.policies] == ["demo/cn2-policy"]
    assert state.destination("juniper").analyzer_ip == "198.18.2.10"
    wait_until(src.ready)
    # The group goes away again: its objects are forgotten.
    emu.remove_group(CN2_GROUP)
    snap = snaps.wait(lambda s: not s.policies and len(s.destinations) == 1, timeout=5)


def test_discovery_waits_for_the_api_server(emu, api):
    emu.go_down()
    src = KubeSource(api, debounce=0.01, backoff=(0.05, 0.2))
    snaps = Snapshots()
    src.start(snaps)
    try:
        time.sleep(0.3)
        assert not src.ready() and snaps.count == 0 and src.discovery_errors >= 1
        emu.come_up()
        wait_until(src.ready, 10)
        snaps.wait(lambda s: True)
    finally:
        src.stop()
    assert not src.ready()


# ---------------------------------------------------------------------------- options


def test_kube_options_and_kubeconfig(emu, tmp_path):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u"}}]}))
    seen = {}

    @click.command()
    @click.option("--node", envvar="NODE_NAME")
    @kube_options
    def cmd(node, **params):
        seen["kube"] = kube_options_from_params(params)
        seen["rest"] = params

    runner = CliRunner()
    r = runner.invoke(cmd, ["--kubernetes", "--kubeconfig", str(kubeconfig),
                            "--lease-duration", "20", "--metrics-address", ":9999"],
                      env={"NODE_NAME": "node7", "POD_NAMESPACE": "mirror"})
    assert r.exit_code == 0, r.output
    opts = seen["kube"]
    assert opts.kubeconfig == str(kubeconfig) and opts.namespace == "mirror"
    assert opts.lease_duration == 20 and opts.metrics_address == ":9999"
    assert seen["rest"] == {}
    src = opts.source("node7")
    assert src.api_client.configuration.host == emu.url
    assert [r.plural for r in kube.discover(src.api_client)][:2] == ["pods", "namespaces"]

    r = runner.invoke(cmd, [])
    assert r.exit_code == 0 and seen["kube"] is None
    r = runner.invoke(cmd, ["--kubernetes", "--renew-deadline", "30"])
    assert r.exit_code != 0 and "--lease-duration" in r.output
    assert len(kube_options()) == 11


def test_in_cluster_config(monkeypatch, tmp_path):
    from kubernetes.config import incluster_config

    token, cert = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("secret-token")
    cert.write_text("not used here")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    c = kube.api_client()  # no kubeconfig, in a pod: in-cluster
    assert c.configuration.host == "https://127.0.0.1:6443"
    assert c.configuration.api_key["BearerToken"].endswith("secret-token")
    assert c.configuration.ssl_ca_cert == str(cert)
    assert c.configuration.retries is False


def test_unchanged_kinds_and_objects_are_handed_over_as_the_same_objects(emu, make_source):
    """What the incremental compiler relies on: a kind none of whose objects changed comes
    as the same tuple, an unchanged object as the same dict, also across a relist (an
    object whose uid and resourceVersion did not change is not trimmed or kept again)."""
    src, snaps = make_source(cluster(), emu)
    first = snaps.last
    emu.apply(csp("mirror-web", "demo", "web", "analyzer1"))
    second = snaps.wait(lambda s: s.policies, what="the policy")
    assert second.pods is first.pods and second.namespaces is first.namespaces
    assert second.policies is not first.policies
    # A pod changes: a new pods tuple, in which the other pods are the same dicts.
    emu.apply(pod("client", "demo", "node1", "198.18.1.99", {"app": "client"}))
    third = snaps.wait(lambda s: any(p["status"]["podIP"] == "198.18.1.99" for p in s.pods))
    assert third.pods is not second.pods and third.policies is second.policies
    before = {id(p) for p in second.pods}
    assert sorted(n for p in third.pods if id(p) not in before
                  for n in [p["metadata"]["name"]]) == ["client"]
    # Every watch cut and history compacted: a full relist, the objects kept as they were.
    relists = {r: x.stats.relists for r, x in src.reflectors.items()}
    emu.compact(everyone=True)
    emu.cut_watches()
    wait_until(lambda: all(x.stats.relists > relists[r] and x.connected
                           for r, x in src.reflectors.items()), 10, what="the relists")
    pods = src.reflectors[kube.PODS]
    assert pods.objects() is third.pods  # the same dicts: even the same tuple
    assert src.snapshot().pods is third.pods
