"""The policy compiler: Snapshot -> NodeState, and explain()."""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cn2mirror.agent.compiler import (
    assign_ids,
    compile_node,
    id_table,
    port_key,
    rule_key,
    session_table,
    stable_id,
)
from cn2mirror.agent.explain import REVERSE, explain, rule_matches
from cn2mirror.agent.model import CN2_GROUP, GROUP, ModelError, parse_mirror_destination
from cn2mirror.agent.snapshot import FIELDS, Snapshot, load_paths, snapshot_from_objects
from cn2mirror.agent.state import (
    ANY,
    MIRROR_ID_MAX,
    SESSION_ID_MAX,
    Cidr,
    DeliveryMode,
    Destination,
    Direction,
    Encapsulation,
    Interface,
    NodeState,
    ObjectError,
    PortMirror,
    PortRange,
    Rule,
)

from .builders import (
    ANALYZER_POD,
    ANALYZER_SELECTOR,
    NODE,
    csp,
    gcsp,
    md,
    namespace,
    pod,
)
from .builders import match_labels as labels

ROOT = Path(__file__).resolve().parent.parent
ANALYZER_SEL = ANALYZER_SELECTOR
MIRROR_ANN = "core.juniper.net/mirror-destination"
NETWORKS = "k8s.v1.cni.cncf.io/networks"
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
ANALYZER_NS = "cn2mirror.io/analyzer-namespace"
TRUSTED = "cn2mirror.io/trusted-network-annotations"

# --- Object builders -----------------------------------------------------------------------------


def eps(*endpoints: dict) -> dict:
    return {"endPoints": list(endpoints)}


def mirror(name: str) -> dict:
    return {"mirrorTo": name}


def snapshot(*objects: dict) -> Snapshot:
    snap, errors = snapshot_from_objects(objects)
    assert errors == []
    return snap


def raw(*objects: dict) -> Snapshot:
    """A snapshot of objects as given, unchecked (as a watcher might hand them over)."""
    return Snapshot(**{f: tuple(o for o in objects if FIELDS[o["kind"]] == f)
                       for f in FIELDS.values()})


def build(*objects: dict, node: str = NODE) -> NodeState:
    return compile_node(snapshot(*objects), node)


def host(*ips: str) -> tuple[Cidr, ...]:
    return tuple(sorted(Cidr(f"{ip}/{128 if ':' in ip else 32}") for ip in ips))


# The cluster most tests start from. Node n1: web-1, other-web, db; node n2: the rest.
WORLD = [
    namespace("demo", team="a", **{ANALYZER_NS: "true"}),
    namespace("other", team="b"),
    pod("web-1", labels={"app": "web", "track": "stable"}, ips=("198.18.1.1", "fd00::1:1"),
        ports=(("http", 80, "TCP"), ("metrics", 9100, "TCP"))),
    pod("web-2", node="n2", labels={"app": "web", "track": "canary"}, ips=("198.18.1.2",),
        ports=(("http", 8080, "TCP"),)),
    pod("client", node="n2", labels={"app": "client"}, ips=("198.18.2.1",)),
    pod("db", labels={"app": "db"}, ips=("198.18.4.1",), ports=(("http", 5000, "UDP"),)),
    pod("other-web", ns="other", labels={"app": "web"}, ips=("198.18.3.1",)),
    pod("analyzer", node="n2", labels={ANALYZER_POD: "analyzer1"}, ips=("198.18.9.9",)),
    md("analyzer1", "analyzer1"),
    md("external", externalAnalyzer=True, analyzerIP="198.19.0.10", trafficDirection="ingress"),
]


def world(*extra: dict, without: tuple[str, ...] = ()) -> list[dict]:
    return [o for o in WORLD if o["metadata"]["name"] not in without] + list(extra)


def trusted_world(*extra: dict) -> list[dict]:
    """WORLD with namespace demo trusted for its pods' network annotations (an admin's
    label): Multus interfaces, MACs and host interfaces are believed there."""
    return world(namespace("demo", team="a", **{ANALYZER_NS: "true", TRUSTED: "true"}),
                 *extra, without=("demo",))


def only_policy(state: NodeState):
    assert state.errors == ()
    assert len(state.policies) == 1
    return state.policies[0]


# --- Which pods a policy applies to --------------------------------------------------------------


@pytest.mark.parametrize("selectors, expected", [
    ([{"podSelector": labels(app="web")}], {"demo/web-1/eth0"}),
    ([{"podSelector": labels(app="db")}, {"podSelector": labels(track="stable")}],
     {"demo/web-1/eth0", "demo/db/eth0"}),
    ([{"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn",
                                             "values": ["web"]}]}}], {"demo/db/eth0"}),
    ([{"podSelector": {"matchExpressions": [{"key": "track", "operator": "DoesNotExist"}]}}],
     {"demo/db/eth0"}),
    ([], {"demo/web-1/eth0", "demo/db/eth0"}),  # no selectors: every pod of the namespace
    ([{}], {"demo/web-1/eth0", "demo/db/eth0"}),
    ([{"podSelector": labels(app="client")}], None),  # the only client is on n2
])
def test_csp_applies_to_local_pods_of_its_namespace(selectors, expected):
    state = build(*world(csp("p", selectors=selectors, secondaryActions=mirror("analyzer1"))))
    assert state.errors == ()
    if expected is None:
        assert state.policies == () and state.interfaces == ()
    else:
        assert state.policies[0].interfaces == frozenset(expected)
        assert {i.key for i in state.interfaces} == expected


@pytest.mark.parametrize("selectors, expected", [
    ([{"podSelector": labels(app="web")}], {"demo/web-1/eth0", "other/other-web/eth0"}),
    ([{"namespaceSelector": labels(team="b")}], {"other/other-web/eth0"}),
    ([{"namespaceSelector": labels(team="a"), "podSelector": labels(app="web")}],
     {"demo/web-1/eth0"}),
    ([{"namespaceSelector": labels(**{"kubernetes.io/metadata.name": "other"})}],
     {"other/other-web/eth0"}),
    ([], {"demo/web-1/eth0", "demo/db/eth0", "other/other-web/eth0"}),
])
def test_gcsp_applies_across_namespaces(selectors, expected):
    state = build(*world(gcsp("g", selectors=selectors, secondaryActions=mirror("analyzer1"))))
    assert only_policy(state).interfaces == frozenset(expected)


def test_policy_applies_on_the_node_of_the_pods():
    objects = world(csp("p", selectors=[{"podSelector": labels(app="web")}],
                        secondaryActions=mirror("analyzer1")))
    assert only_policy(build(*objects, node="n2")).interfaces == {"demo/web-2/eth0"}
    assert build(*objects, node="n3").policies == ()


def test_finished_and_host_network_pods_are_not_attached():
    objects = world(
        pod("done", labels={"app": "web"}, ips=("198.18.7.1",), phase="Succeeded"),
        pod("hostnet", labels={"app": "web"}, ips=("198.18.0.100",), host_network=True),
        csp("p", selectors=[{"podSelector": labels(app="web")}],
            rules=[{"srcEP": eps({"podSelector": labels(app="web")}),
                    "secondaryActions": mirror("analyzer1")}]),
    )
    policy = only_policy(build(*objects))
    assert policy.interfaces == {"demo/web-1/eth0"}
    # Nor are their addresses endpoints (a host-network pod's address is its node's).
    assert policy.rules[0].src == host("198.18.1.1", "fd00::1:1", "198.18.1.2")


# --- Endpoints -----------------------------------------------------------------------------------


NOTHING = "no address"


@pytest.mark.parametrize("src, expected", [
    (None, ANY),
    ({}, ANY),
    (eps(), ANY),
    (eps({"podSelector": labels(app="web")}), host("198.18.1.1", "fd00::1:1", "198.18.1.2")),
    (eps({"podSelector": labels(app="client")}), host("198.18.2.1")),  # a remote pod
    (eps({"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["client", "db"]}]}}),
     host("198.18.2.1", "198.18.4.1")),
    (eps({"podSelector": {"matchExpressions": [{"key": "track", "operator": "Exists"}]}}),
     host("198.18.1.1", "fd00::1:1", "198.18.1.2")),
    (eps({"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "NotIn", "values": ["web", "client", "db"]}]}}),
     host("198.18.9.9")),  # the analyzer has no app label: NotIn matches it
    (eps({"podSelector": labels(app="client")}, {"podSelector": labels(app="db")}),
     host("198.18.2.1", "198.18.4.1")),
    (eps({"namespaceSelector": labels(team="b")}), host("198.18.3.1")),
    (eps({"namespaceSelector": {}}),
     host("198.18.1.1", "fd00::1:1", "198.18.1.2", "198.18.2.1", "198.18.4.1", "198.18.3.1",
          "198.18.9.9")),
    (eps({"namespaceSelector": labels(team="b"), "podSelector": labels(app="web")}),
     host("198.18.3.1")),
    (eps({"namespaceSelector": labels(team="b"), "podSelector": labels(app="db")}), NOTHING),
    (eps({"ipBlock": {"cidr": "198.18.1.7/16", "except": ["198.18.1.0/24", "198.18.1.0/24"]}}),
     (Cidr("198.18.0.0/16", ("198.18.1.0/24",)),)),
    (eps({"ipBlock": {"cidr": "fd00::/64"}}, {"podSelector": labels(app="db")}),
     (*host("198.18.4.1"), Cidr("fd00::/64"))),
])
def test_csp_endpoints_resolve_to_addresses(src, expected):
    rule: dict[str, Any] = {"secondaryActions": mirror("analyzer1")}
    if src is not None:
        rule["srcEP"] = src
    state = build(*world(csp("p", selectors=[{"podSelector": labels(app="web")}],
                             rules=[rule])))
    if expected is NOTHING:  # the endpoint set is empty: the rule can match nothing
        assert state.policies == () and state.errors == ()
        return
    assert only_policy(state).rules[0].src == expected
    assert only_policy(state).rules[0].dst is ANY


def test_gcsp_pod_selector_alone_spans_namespaces():
    state = build(*world(gcsp("g", selectors=[{"podSelector": labels(app="web")}], rules=[{
        "dstEP": eps({"podSelector": labels(app="web")}),
        "secondaryActions": mirror("analyzer1")}])))
    assert only_policy(state).rules[0].dst == host("198.18.1.1", "fd00::1:1", "198.18.1.2",
                                                    "198.18.3.1")


def test_namespace_without_object_has_its_name_label():
    objects = world(
        pod("lonely", ns="ghost", node="n2", labels={"app": "x"}, ips=("198.18.6.1",)),
        csp("p", selectors=[{"podSelector": labels(app="web")}], rules=[{
            "srcEP": eps({"namespaceSelector": labels(
                **{"kubernetes.io/metadata.name": "ghost"})}),
            "secondaryActions": mirror("analyzer1")}]),
    )
    assert only_policy(build(*objects)).rules[0].src == host("198.18.6.1")


# --- Ports ---------------------------------------------------------------------------------------

TCP, UDP = 6, 17


@pytest.mark.parametrize("ports, dst, expected", [
    ([], None, ()),
    ([{"port": 80}], None, (PortRange(TCP, 80, 80),)),
    ([{"protocol": "UDP"}], None, (PortRange(UDP),)),
    ([{"protocol": "SCTP", "port": 1000, "endPort": 2000}], None, (PortRange(132, 1000, 2000),)),
    ([{"protocol": "ICMPv6"}, {"protocol": "ICMP"}], None, (PortRange(1), PortRange(58))),
    ([{"port": 443}, {"port": 80}, {"port": 80}], None,
     (PortRange(TCP, 80, 80), PortRange(TCP, 443, 443))),
    # Named: through the containerPorts of the destination pods, per protocol.
    ([{"port": "http"}], None, (PortRange(TCP, 80, 80), PortRange(TCP, 8080, 8080))),
    ([{"port": "http"}], eps({"podSelector": labels(track="stable")}), (PortRange(TCP, 80, 80),)),
    ([{"port": "http"}], eps({"ipBlock": {"cidr": "198.18.1.2/32"}}),
     (PortRange(TCP, 8080, 8080),)),
    ([{"protocol": "UDP", "port": "http"}], None, (PortRange(UDP, 5000, 5000),)),
    ([{"port": "metrics"}, {"protocol": "UDP", "port": 53}], None,
     (PortRange(TCP, 9100, 9100), PortRange(UDP, 53, 53))),
    ([{"port": "nothing"}], None, None),  # resolves to nothing: the rule can match nothing
    ([{"protocol": "UDP", "port": "metrics"}], None, None),
    ([{"port": "http"}], eps({"podSelector": labels(app="client")}), None),
])
def test_ports(ports, dst, expected):
    rule: dict[str, Any] = {"ports": ports, "secondaryActions": mirror("analyzer1")}
    if dst:
        rule["dstEP"] = dst
    state = build(*world(csp("p", selectors=[{"podSelector": labels(app="web")}],
                             rules=[rule])))
    assert state.errors == ()
    if expected is None:
        assert state.policies == ()
    else:
        assert only_policy(state).rules[0].ports == expected


def test_rules_that_can_match_nothing_are_left_out_and_others_keep_their_index():
    state = build(*world(csp("p", selectors=[{"podSelector": labels(app="web")}],
                             secondaryActions=mirror("analyzer1"), rules=[
        {"srcEP": eps({"podSelector": labels(app="nobody")})},
        {"ports": [{"port": "unknown-name"}]},
        {"ports": [{"port": 80}]},
    ])))
    rules = only_policy(state).rules
    assert [r.index for r in rules] == [2]
    assert rules[0].mirror_id == stable_id("csp/demo/p/rule/2", MIRROR_ID_MAX)


# --- Policy-level and rule-level mirroring -------------------------------------------------------

SELECT_WEB = [{"podSelector": labels(app="web")}]
R_CLIENT = {"srcEP": eps({"podSelector": labels(app="client")})}
R_DB = {"srcEP": eps({"podSelector": labels(app="db")})}


def test_policy_level_mirrors_every_rule_and_rule_level_wins():
    state = build(*world(csp("p", selectors=SELECT_WEB, secondaryActions=mirror("analyzer1"),
                             rules=[R_CLIENT, {**R_DB, "secondaryActions": mirror("external")}])))
    rules = only_policy(state).rules
    assert [(r.index, r.destination) for r in rules] == [(0, "analyzer1"), (1, "external")]
    assert [r.mirror_id for r in rules] == [
        stable_id("csp/demo/p/rule/0", MIRROR_ID_MAX), stable_id("csp/demo/p/rule/1",
                                                                 MIRROR_ID_MAX)]
    assert [d.name for d in state.destinations] == ["analyzer1", "external"]


def test_rule_level_only_rules_without_mirror_still_match_but_mirror_nothing():
    state = build(*world(csp("p", selectors=SELECT_WEB, rules=[
        R_CLIENT, {**R_DB, "secondaryActions": mirror("external")}])))
    rules = only_policy(state).rules
    assert [(r.index, r.destination, r.mirror_id) for r in rules] == [
        (0, None, 0), (1, "external", stable_id("csp/demo/p/rule/1", MIRROR_ID_MAX))]
    assert [d.name for d in state.destinations] == ["external"]  # only what is used


def test_policy_without_rules_mirrors_every_flow():
    state = build(*world(csp("p", selectors=SELECT_WEB, secondaryActions=mirror("analyzer1"))))
    assert only_policy(state).rules == (Rule(
        policy="demo/p", index=0, src=ANY, dst=ANY, ports=(), destination="analyzer1",
        mirror_id=stable_id("csp/demo/p/rule/0", MIRROR_ID_MAX)),)


@pytest.mark.parametrize("spec", [
    {"selectors": SELECT_WEB},  # no rules, no mirror: matches nothing
    {"selectors": SELECT_WEB, "rules": [R_CLIENT, R_DB]},  # matches, never mirrors
])
def test_policies_that_never_mirror_are_left_out(spec):
    state = build(*world(csp("p", **spec)))
    assert state == NodeState(node=NODE)


def test_policy_order_globals_by_name_then_namespaced_by_namespace_and_name():
    policies = [csp("z"), gcsp("b"), csp("a", ns="other"), gcsp("a"), csp("a")]
    for p in policies:
        p["spec"] = {"secondaryActions": mirror("analyzer1")}
    random.Random(1).shuffle(policies)
    state = build(*world(*policies))
    assert [p.name for p in state.policies] == ["a", "b", "demo/a", "demo/z", "other/a"]
    assert [p.rules[0].policy for p in state.policies] == [p.name for p in state.policies]
    assert id_table(state)[state.policies[0].rules[0].mirror_id] == "gcsp/a/rule/0"


# --- Identifiers ---------------------------------------------------------------------------------


def test_ids_are_the_same_on_every_node_and_map_back_to_their_keys():
    objects = world(csp("p", selectors=SELECT_WEB, secondaryActions=mirror("analyzer1"),
                        rules=[R_CLIENT, R_DB]),
                    pod("tap", node="n2", ips=("198.18.8.1",),
                        annotations={MIRROR_ANN: "external"}))
    n1, n2 = build(*objects, node="n1"), build(*objects, node="n2")
    assert n1.policies[0].rules == n2.policies[0].rules
    assert id_table(n1) == {
        stable_id("csp/demo/p/rule/0", MIRROR_ID_MAX): "csp/demo/p/rule/0",
        stable_id("csp/demo/p/rule/1", MIRROR_ID_MAX): "csp/demo/p/rule/1",
    }
    tap = n2.interface("demo/tap/eth0")
    assert tap.port_mirrors == (PortMirror("external", Direction.INGRESS, stable_id(
        "port/demo/tap/eth0/external", MIRROR_ID_MAX)),)
    assert id_table(n2)[tap.port_mirrors[0].mirror_id] == port_key("demo/tap/eth0", "external")
    assert tap.session_id == stable_id("demo/tap/eth0", SESSION_ID_MAX)
    assert session_table(n2) == {i.session_id: i.key for i in n2.interfaces}
    assert session_table(n1) == {stable_id("demo/web-1/eth0", SESSION_ID_MAX): "demo/web-1/eth0"}


def test_ids_do_not_change_when_other_objects_come_and_go():
    base = world(csp("p", selectors=SELECT_WEB, secondaryActions=mirror("analyzer1")))
    more = base + [csp("q", selectors=SELECT_WEB, rules=[{"secondaryActions": mirror("external")}]),
                   pod("tap", ips=("198.18.8.1",), annotations={MIRROR_ANN: "analyzer1"})]
    before, after = build(*base), build(*more)
    assert before.policies[0] == after.policies[0]
    assert before.interface("demo/web-1/eth0") == after.interface("demo/web-1/eth0")


def test_rule_and_port_keys():
    assert rule_key("demo/p", 3) == "csp/demo/p/rule/3"
    assert rule_key("g", 0) == "gcsp/g/rule/0"
    assert port_key("demo/web/net1", "md") == "port/demo/web/net1/md"


# Generating text is slow only when the machine is busy (the suite's namespace tests): the
# property is what is checked, not the generator's speed.
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=30), st.integers(1, 2**32 - 1), st.integers(0, 5))
def test_stable_id_range(key, maximum, attempt):
    assert 1 <= stable_id(key, maximum, attempt) <= maximum


def _collision(maximum: int) -> tuple[str, str]:
    seen: dict[int, str] = {}
    for i in range(10 * maximum):
        key = f"key-{i}"
        if stable_id(key, maximum) in seen:
            return seen[stable_id(key, maximum)], key
        seen[stable_id(key, maximum)] = key
    raise AssertionError("no collision found")


def test_collisions_leave_the_first_key_its_hash_and_probe_for_the_others():
    first, second = _collision(1000)
    assert first < second
    ids = assign_ids([second, first], 1000)
    assert ids[first] == stable_id(first, 1000)
    attempt = 1
    while stable_id(second, 1000, attempt) == ids[first]:
        attempt += 1
    assert ids[second] == stable_id(second, 1000, attempt) != ids[first]


@given(st.lists(st.text(alphabet="abc/", max_size=6), unique=True, max_size=12), st.randoms())
def test_assign_ids_distinct_in_range_and_order_independent(keys, rnd):
    maximum = 16  # small, so that collisions happen
    ids = assign_ids(keys, maximum)
    assert set(ids) == set(keys)
    assert len(set(ids.values())) == len(keys)
    assert all(1 <= i <= maximum for i in ids.values())
    shuffled = list(keys)
    rnd.shuffle(shuffled)
    assert assign_ids(shuffled, maximum) == ids
    naturals = [stable_id(k, maximum) for k in keys]
    for key, natural in zip(keys, naturals, strict=True):
        if naturals.count(natural) == 1:
            assert ids[key] == natural or natural in {ids[k] for k in keys if k < key}


def test_assign_ids_refuses_more_keys_than_ids():
    with pytest.raises(ValueError):
        assign_ids(["a", "b", "c"], 2)


# --- Destinations --------------------------------------------------------------------------------


def state_with_md(*objects: dict, name: str = "d") -> NodeState:
    return build(*world(*objects, csp("p", selectors=SELECT_WEB, secondaryActions=mirror(name))))


def trusted_state_with_md(*objects: dict, name: str = "d") -> NodeState:
    return build(*trusted_world(*objects, csp("p", selectors=SELECT_WEB,
                                               secondaryActions=mirror(name))))


def test_internal_analyzer():
    state = state_with_md(md("d", "analyzer1", udpPort=8099))
    assert state.errors == ()
    assert state.destinations == (Destination(
        name="d", mode=DeliveryMode.JMIRROR, analyzer_ip="198.18.9.9", udp_port=8099,
        analyzer_pod="demo/analyzer"),)


def test_default_udp_port_is_30030():
    assert state_with_md(md("d", "analyzer1")).destination("d").udp_port == 30030


@pytest.mark.parametrize("api", [f"{CN2_GROUP}/v1alpha1", f"{CN2_GROUP}/v4"])
def test_cn2_group_default_udp_port_is_cn2s_8099(api):
    """A CN2 MirrorDestination without udpPort reaches the analyzer as CN2 would."""
    assert state_with_md(md("d", "analyzer1", api=api)).destination("d").udp_port == 8099
    assert state_with_md(md("d", "analyzer1", api=api, udpPort=30030)).destination(
        "d").udp_port == 30030


@pytest.mark.parametrize("ips, expected", [
    (("fd00::9", "198.18.9.8"), "198.18.9.8"),  # IPv4 first: jmirror's outer header is IPv4
    (("fd00::9",), "fd00::9"),
])
def test_analyzer_address_family(ips, expected):
    state = state_with_md(md("d", "sel"), pod("a", labels={ANALYZER_POD: "sel"}, ips=ips))
    assert state.destination("d").analyzer_ip == expected


@pytest.mark.parametrize("candidates, chosen", [
    # (namespace, name, phase, ips)
    ([("b", "a", "Running", ("198.18.9.1",)), ("a", "z", "Running", ("198.18.9.2",))], "a/z"),
    ([("a", "a", "Pending", ()), ("b", "b", "Running", ("198.18.9.2",))], "b/b"),
    ([("a", "a", "Running", ()), ("b", "b", "Pending", ("198.18.9.2",))], "b/b"),
    ([("a", "a", "Pending", ("198.18.9.1",)), ("b", "b", "Running", ("198.18.9.2",))], "b/b"),
    ([("a", "a", "Succeeded", ("198.18.9.1",)), ("b", "b", "Pending", ("198.18.9.2",))], "b/b"),
])
def test_one_analyzer_pod_is_chosen_deterministically(candidates, chosen):
    pods = [pod(name, ns=ns, phase=phase, ips=ips, labels={ANALYZER_POD: "sel"})
            for ns, name, phase, ips in candidates]
    for order in (pods, pods[::-1]):
        state = state_with_md(md("d", "sel", analyzerNamespaces=["a", "b"]), *order)
        assert state.destination("d").analyzer_pod == chosen


def test_analyzer_is_chosen_again_when_it_goes_away():
    a = pod("a", labels={ANALYZER_POD: "sel"}, ips=("198.18.9.1",))
    b = pod("b", labels={ANALYZER_POD: "sel"}, ips=("198.18.9.2",))
    assert state_with_md(md("d", "sel"), a, b).destination("d").analyzer_ip == "198.18.9.1"
    assert state_with_md(md("d", "sel"), b).destination("d").analyzer_ip == "198.18.9.2"


def test_analyzer_interface_on_a_multus_network():
    status = [{"name": "k8s-pod-network", "interface": "eth0", "ips": ["198.18.9.1"],
               "default": True},
              {"name": "demo/tap-net", "interface": "net1", "ips": ["198.18.200.5"],
               "mac": "02:00:00:00:00:05"}]
    networks = [{"name": "tap-net", "cni-args": {
        "core.juniper.net/analyzer-interface": "true"}}]
    analyzer = pod("a", labels={ANALYZER_POD: "sel"}, ips=("198.18.9.1",), annotations={
        NETWORKS: json.dumps(networks), NETWORK_STATUS: json.dumps(status)})
    state = trusted_state_with_md(md("d", "sel"), analyzer)
    assert state.destination("d").analyzer_ip == "198.18.200.5"
    state = trusted_state_with_md(md("d", "sel", juniperHeader=False), analyzer)
    assert state.destination("d").analyzer_mac == "02:00:00:00:00:05"
    # Without network-status, the marked interface has no address yet.
    del analyzer["metadata"]["annotations"][NETWORK_STATUS]
    state = trusted_state_with_md(md("d", "sel"), analyzer)
    assert ObjectError("MirrorDestination", "d", "analyzer pod demo/a has no IP on net1 yet") \
        in state.errors


def test_external_analyzer():
    state = state_with_md(md("d", externalAnalyzer=True, analyzerIP="198.19.0.10", udpPort=4789))
    assert state.destinations == (Destination(
        name="d", mode=DeliveryMode.JMIRROR, analyzer_ip="198.19.0.10", udp_port=4789),)


def test_l2_analyzer_mac_from_annotation_and_local_host_interface():
    analyzer = pod("a", labels={ANALYZER_POD: "sel"}, ips=("198.18.9.1",), annotations={
        "cn2mirror.io/mac": "02:AA:00:00:00:01", "cn2mirror.io/host-interface": "veth-a"})
    state = trusted_state_with_md(md("d", "sel", juniperHeader=False), analyzer)
    assert state.destinations == (Destination(
        name="d", mode=DeliveryMode.L2, analyzer_ip="198.18.9.1",
        analyzer_mac="02:aa:00:00:00:01", analyzer_ifname="veth-a", analyzer_pod="demo/a"),)
    analyzer["spec"]["nodeName"] = "n2"  # elsewhere: the datapath finds it by MAC
    state = trusted_state_with_md(md("d", "sel", juniperHeader=False), analyzer)
    assert state.destination("d").analyzer_ifname is None


def test_l2_analyzer_mac_from_network_status_and_preferred_over_one_without():
    status = [{"interface": "eth0", "ips": ["198.18.9.2"], "mac": "02:00:00:00:00:02",
               "default": True}]
    without = pod("a", labels={ANALYZER_POD: "sel"}, ips=("198.18.9.1",))
    with_mac = pod("b", labels={ANALYZER_POD: "sel"}, ips=("198.18.9.2",),
                   annotations={NETWORK_STATUS: json.dumps(status)})
    state = trusted_state_with_md(md("d", "sel", juniperHeader=False), without, with_mac)
    assert (state.destination("d").analyzer_pod, state.destination("d").analyzer_mac) == (
        "demo/b", "02:00:00:00:00:02")


def test_l2_without_mac_is_an_error_on_the_destination_and_its_policies():
    state = state_with_md(md("d", "analyzer1", juniperHeader=False))
    assert state.policies == () and state.destinations == ()
    reason = ("juniperHeader false sends the frame to the analyzer's MAC, and none is known for "
              "pod demo/analyzer interface eth0 (annotation cn2mirror.io/mac or "
              "k8s.v1.cni.cncf.io/network-status)")
    assert state.errors == (
        ObjectError("ContrailSecurityPolicy", "demo/p", f"mirrorTo d: MirrorDestination d is "
                                                          f"not usable: {reason}"),
        ObjectError("MirrorDestination", "d", reason),
    )


def test_static_vxlan_and_nic_assisted_vlan():
    state = build(*world(
        md("vx", juniperHeader=False, nextHopMode="static", staticNextHopHeader={
            "vTEPDestinationIP": "198.19.0.20", "vTEPDestinationMac": "02:00:C6:13:00:14",
            "vxlanID": 5001}),
        md("vl", nicAssistedMirroring=True, nicAssistedVlanID=100),
        csp("p", selectors=SELECT_WEB, rules=[
            {**R_CLIENT, "secondaryActions": mirror("vx")},
            {**R_DB, "secondaryActions": mirror("vl")}]),
    ))
    assert state.errors == ()
    assert state.destinations == (
        Destination(name="vl", mode=DeliveryMode.VLAN, vlan_id=100),
        Destination(name="vx", mode=DeliveryMode.VXLAN, vtep_ip="198.19.0.20",
                    vtep_mac="02:00:c6:13:00:14", vni=5001),
    )


# --- Errors: precise, and nothing else changes ---------------------------------------------------


@pytest.mark.parametrize("objects, kind, name, reason", [
    ([csp("p", selectors=SELECT_WEB, secondaryActions=mirror("nope"))],
     "ContrailSecurityPolicy", "demo/p", "mirrorTo nope: no MirrorDestination named nope"),
    ([csp("p", selectors=SELECT_WEB, rules=[{"secondaryActions": mirror("nope")}])],
     "ContrailSecurityPolicy", "demo/p", "mirrorTo nope: no MirrorDestination named nope"),
    ([csp("p", rules=[{"srcEP": eps({"ipBlock": {"cidr": "198.18.0.0/40"}})}])],
     "ContrailSecurityPolicy", "demo/p",
     "spec.rules[0].srcEP.endPoints[0].ipBlock.cidr: '198.18.0.0/40' is not a CIDR"),
    ([gcsp("g", rules=[{"ports": [{"port": 80, "endPort": 79}]}])],
     "GlobalContrailSecurityPolicy", "g", "spec.rules[0].ports[0].endPort: must not be below"),
    ([md("bad", "analyzer1", nextHopMode="static", staticNextHopHeader={
        "vTEPDestinationIP": "198.19.0.20", "vxlanID": 1})],
     "MirrorDestination", "bad", "spec: nextHopMode static carries the raw frame in VXLAN"),
    ([md("bad", externalAnalyzer=True)], "MirrorDestination", "bad",
     "spec: externalAnalyzer requires analyzerIP"),
    ([md("bad", "nobody")], "MirrorDestination", "bad",
     "no pod has label core.juniper.net/analyzer-pod=nobody"),
    ([md("bad")], "MirrorDestination", "bad",
     "no analyzer: label the MirrorDestination core.juniper.net/analyzer-pod-selector"),
    ([md("bad", externalAnalyzer=True, analyzerIP="198.19.0.1", juniperHeader=False)],
     "MirrorDestination", "bad", "juniperHeader false sends the frame to the analyzer's MAC, "
                                 "which is not known for external analyzer 198.19.0.1"),
    ([md("bad", "analyzer1", api=f"{CN2_GROUP}/v3")], "MirrorDestination", "bad",
     "apiVersion: MirrorDestination is served as"),
    ([md("bad", "analyzer1", nextHopMode="static", staticNextHopHeader={
        "vTEPDestinationIP": "198.19.0.20", "vxlanID": 1}),
      csp("p", selectors=SELECT_WEB, secondaryActions=mirror("bad"))],
     "ContrailSecurityPolicy", "demo/p", "mirrorTo bad: MirrorDestination bad is not usable: "
                                         "spec: nextHopMode static"),
    ([md("bad", "nobody"), gcsp("g", rules=[{"secondaryActions": mirror("bad")}])],
     "GlobalContrailSecurityPolicy", "g", "mirrorTo bad: MirrorDestination bad is not usable: "
                                          "no pod has label"),
])
def test_invalid_objects_are_errors_and_change_nothing_else(objects, kind, name, reason):
    good = world(csp("good", selectors=SELECT_WEB, secondaryActions=mirror("analyzer1")))
    expected = build(*good)
    # Straight into a Snapshot: the loader would refuse some of these objects itself.
    state = compile_node(raw(*good, *objects), NODE)
    matching = [e for e in state.errors if (e.kind, e.name) == (kind, name)]
    assert len(matching) == 1 and matching[0].reason.startswith(reason), state.errors
    assert (state.interfaces, state.policies, state.destinations) == (
        expected.interfaces, expected.policies, expected.destinations)


def test_errors_are_reported_by_every_node_but_pod_errors_by_their_own():
    objects = world(md("bad", "nobody"),
                    pod("tap", node="n2", annotations={MIRROR_ANN: "nope"}))
    n1, n2 = build(*objects, node="n1"), build(*objects, node="n2")
    assert [e.kind for e in n1.errors] == ["MirrorDestination"]
    assert [e.kind for e in n2.errors] == ["MirrorDestination", "Pod"]


def test_an_object_given_in_both_groups_is_used_once():
    ours = md("d", "analyzer1", udpPort=1111)
    cn2_v4 = md("d", "analyzer1", api=f"{CN2_GROUP}/v4", udpPort=2222)
    cn2_v1 = md("d", "analyzer1", api=f"{CN2_GROUP}/v1alpha1", udpPort=3333)
    for order in ([ours, cn2_v4, cn2_v1], [cn2_v1, cn2_v4, ours]):
        state = state_with_md(*order)
        assert state.destination("d").udp_port == 1111
        assert [e.reason for e in state.errors] == [
            f"given more than once; the {GROUP}/v1alpha1 object is used, this "
            f"{CN2_GROUP}/v1alpha1 one is ignored",
            f"given more than once; the {GROUP}/v1alpha1 object is used, this "
            f"{CN2_GROUP}/v4 one is ignored"]
    state = state_with_md(cn2_v1, cn2_v4)
    assert state.destination("d").udp_port == 2222  # CN2's storage version next


def test_cn2_group_objects_compile_like_ours():
    # Alike but for the default port: CN2's group defaults to CN2's 8099 (issue 15).
    ours = build(*world(md("d", "analyzer1", udpPort=8099), csp("p", selectors=SELECT_WEB,
                                                   secondaryActions=mirror("d"))))
    cn2 = build(*world(md("d", "analyzer1", api=f"{CN2_GROUP}/v1alpha1"),
                       csp("p", api=f"{CN2_GROUP}/v4", selectors=SELECT_WEB,
                           secondaryActions=mirror("d"))))
    assert ours == cn2 and ours.errors == ()


# --- Port mirroring and interfaces ---------------------------------------------------------------


def test_port_mirroring_of_the_default_interface():
    state = build(*trusted_world(pod("tap", labels={"app": "tap"}, ips=("198.18.8.1", "fd00::8:1"),
                             annotations={MIRROR_ANN: "external",
                                          "cn2mirror.io/mac": "02:00:00:00:08:01",
                                          "cn2mirror.io/host-interface": "cali123"})))
    assert state.errors == () and state.policies == ()
    assert state.interfaces == (Interface(
        pod="demo/tap", pod_ifname="eth0", session_id=stable_id("demo/tap/eth0", SESSION_ID_MAX),
        ips=("198.18.8.1", "fd00::8:1"), mac="02:00:00:00:08:01", host_ifname="cali123",
        port_mirrors=(PortMirror("external", Direction.INGRESS,
                                 stable_id("port/demo/tap/eth0/external", MIRROR_ID_MAX)),),
        from_annotations=True),)
    assert [d.name for d in state.destinations] == ["external"]


def test_port_mirroring_of_multus_interfaces():
    networks = [{"name": "macvlan", "cni-args": {MIRROR_ANN: "analyzer1"}},
                {"name": "sriov", "namespace": "infra", "interface": "eth5",
                 "cni-args": {MIRROR_ANN: "external"}},
                {"name": "plain"}]
    status = [{"name": "cbr0", "interface": "eth0", "ips": ["198.18.8.1"], "default": True,
               "mac": "02:00:00:00:00:01"},
              {"name": "demo/macvlan", "interface": "net1", "ips": ["198.18.200.1", "bad"],
               "mac": "02:00:00:00:00:02"}]
    state = build(*trusted_world(pod("tap", ips=("198.18.8.1",), annotations={
        NETWORKS: json.dumps(networks), NETWORK_STATUS: json.dumps(status)})))
    # The default interface and net3 are not mirrored, so not attached.
    assert [(i.pod_ifname, i.ips, i.mac, [m.destination for m in i.port_mirrors])
            for i in state.interfaces] == [
        ("eth5", (), None, ["external"]),
        ("net1", ("198.18.200.1",), "02:00:00:00:00:02", ["analyzer1"])]
    assert state.errors == (ObjectError(
        "Pod", "demo/tap", "k8s.v1.cni.cncf.io/network-status interface net1 ips: 'bad' is not "
                           "an IP address"),)


def test_policy_attaches_to_every_interface_of_its_pods():
    multi = pod("multi", labels={"app": "web"}, ips=("198.18.8.1",),
                annotations={NETWORKS: "macvlan, infra/sriov@eth5"})
    state = build(*trusted_world(multi,
        csp("p", selectors=SELECT_WEB, secondaryActions=mirror("analyzer1"))))
    assert only_policy(state).interfaces == {
        "demo/multi/eth0", "demo/multi/net1", "demo/multi/eth5", "demo/web-1/eth0"}
    assert [i.key for i in state.interfaces] == sorted(state.policies[0].interfaces)


@pytest.mark.parametrize("annotations, reason", [
    ({MIRROR_ANN: "nope"}, "core.juniper.net/mirror-destination on eth0: no MirrorDestination "
                           "named nope"),
    ({MIRROR_ANN: "Not A Name"}, "annotation core.juniper.net/mirror-destination: 'Not A Name' "
                                 "is not a MirrorDestination name"),
    ({NETWORKS: "[{"}, "annotation k8s.v1.cni.cncf.io/networks: invalid JSON"),
    ({NETWORKS: '{"name": "x"}'}, "annotation k8s.v1.cni.cncf.io/networks: must be a JSON list"),
    ({NETWORKS: '[{"interface": "net1"}]'}, "annotation k8s.v1.cni.cncf.io/networks: entry 0 "
                                            "has no name"),
    ({NETWORKS: '[{"name": "a", "interface": "eth0"}]'},
     "k8s.v1.cni.cncf.io/networks: interface eth0 appears twice"),
    ({"cn2mirror.io/mac": "zz"}, "annotation cn2mirror.io/mac: 'zz' is not a MAC address"),
])
def test_pod_annotation_problems_are_errors_on_the_pod(annotations, reason):
    state = build(*world(pod("tap", ips=("198.18.8.1",), annotations=annotations)))
    assert len(state.errors) == 1
    assert state.errors[0].kind == "Pod" and state.errors[0].name == "demo/tap"
    assert state.errors[0].reason.startswith(reason), state.errors[0].reason
    assert state.interfaces == ()


def test_port_mirroring_of_broken_destination_or_host_network_pod():
    state = build(*world(
        md("bad", "nobody"),
        pod("tap", ips=("198.18.8.1",), annotations={MIRROR_ANN: "bad"}),
        pod("hn", ips=("198.18.0.1",), host_network=True, annotations={MIRROR_ANN: "analyzer1"}),
        pod("done", phase="Failed", annotations={MIRROR_ANN: "nope"}),
    ))
    assert state.interfaces == ()
    assert state.errors == (
        ObjectError("MirrorDestination", "bad", "no pod has label "
                                                "core.juniper.net/analyzer-pod=nobody"),
        ObjectError("Pod", "demo/hn", "core.juniper.net/mirror-destination on eth0: a "
                                      "hostNetwork pod has no interface of its own"),
        ObjectError("Pod", "demo/tap", "core.juniper.net/mirror-destination on eth0: "
                                       "MirrorDestination bad is not usable: no pod has label "
                                       "core.juniper.net/analyzer-pod=nobody"),
    )


# --- explain -------------------------------------------------------------------------------------

WEB1 = "demo/web-1/eth0"


@pytest.fixture(scope="module")
def scenario() -> NodeState:
    state = build(*world(
        pod("tap", ips=("198.18.8.1",), annotations={MIRROR_ANN: "external"}),
        csp("p", selectors=SELECT_WEB, rules=[
            {**R_CLIENT, "ports": [{"port": 80}], "secondaryActions": mirror("analyzer1")},
            R_CLIENT,
            {"ports": [{"protocol": "ICMP"}], "secondaryActions": mirror("external")},
        ]),
        gcsp("g", selectors=[{"podSelector": labels(app="web")}],
             secondaryActions=mirror("external"), rules=[{
                 "dstEP": eps({"ipBlock": {"cidr": "198.18.1.0/24",
                                           "except": ["198.18.1.2/32"]}}),
                 "ports": [{"protocol": "UDP"}]}]),
    ))
    assert state.errors == ()
    return state


def ids(state: NodeState, policy: str, index: int) -> int:
    return next(r.mirror_id for p in state.policies if p.name == policy for r in p.rules
                if r.index == index)


def summary(result) -> list[tuple]:
    return [(i.interface, i.direction, [(m.policy, m.orientation, m.matching_rules,
                                         m.deciding_rule, m.destination) for m in i.matches],
             list(i.unmatched), [(c.destination, c.cause) for c in i.copies])
            for i in result.interfaces]


def test_explain_first_matching_rule_decides(scenario):
    result = explain(scenario, "198.18.2.1", "198.18.1.1", "TCP", 80)
    assert summary(result) == [(WEB1, Direction.INGRESS,
                                [("demo/p", "forward", (0, 1), 0, "analyzer1")], ["g"],
                                [("analyzer1", "policy demo/p rule 0")])]
    copy_ = result.copies[0]
    assert copy_.mirror_id == ids(scenario, "demo/p", 0)
    assert copy_.session_id == scenario.interface(WEB1).session_id
    # Rule 1 matches other ports first, and mirrors nothing.
    result = explain(scenario, "198.18.2.1", "198.18.1.1", 6, 22)
    assert summary(result)[0][2] == [("demo/p", "forward", (1,), 1, None)]
    assert result.copies == ()


def test_explain_reverse_fallback(scenario):
    reply = dict(src_ip="198.18.1.1", dst_ip="198.18.2.1", protocol="TCP", dst_port=40000,
                 src_port=80)
    result = explain(scenario, **reply, tcp_syn=False)
    assert summary(result) == [(WEB1, Direction.EGRESS,
                                [("demo/p", REVERSE, (0, 1), 0, "analyzer1")], ["g"],
                                [("analyzer1", "policy demo/p rule 0")])]
    # A SYN (the default for TCP) is never reversed; nor is anything without the fallback.
    assert explain(scenario, **reply).copies == ()
    assert explain(scenario, **reply, tcp_syn=False, reverse_fallback=False).copies == ()
    # Reversed without a known source port, port-bound rules cannot match.
    assert summary(explain(scenario, "198.18.1.1", "198.18.2.1", "TCP", 40000,
                           tcp_syn=False))[0][2] == [("demo/p", REVERSE, (1,), 1, None)]


def test_explain_reverse_fallback_is_per_policy():
    """A policy deciding "no mirror" for the packet as it is does not stop another policy
    from matching it reversed."""
    state = build(*world(
        csp("a", selectors=SELECT_WEB, rules=[
            {"dstEP": eps({"podSelector": labels(app="client")})},  # matches the reply
            {"ports": [{"protocol": "SCTP"}], "secondaryActions": mirror("external")}]),
        csp("b", selectors=SELECT_WEB, rules=[
            {**R_CLIENT, "ports": [{"port": 80}], "secondaryActions": mirror("analyzer1")}]),
    ))
    result = explain(state, "198.18.1.1", "198.18.2.1", "TCP", 40000, src_port=80,
                     tcp_syn=False)
    assert summary(result)[0][2] == [("demo/a", "forward", (0,), 0, None),
                                     ("demo/b", REVERSE, (0,), 0, "analyzer1")]
    assert [c.destination for c in result.copies] == ["analyzer1"]


def test_explain_ip_block_with_except_and_interface_choice(scenario):
    result = explain(scenario, "198.18.5.5", "198.18.1.1", "UDP", 53)
    assert list(summary(result)[0][2:]) == [[("g", "forward", (0,), 0, "external")], ["demo/p"],
                                            [("external", "policy g rule 0")]]
    # 198.18.1.2 is excepted; looked at on web-1's interface, where it is neither end.
    result = explain(scenario, "198.18.5.5", "198.18.1.2", "UDP", 53, interface_key=WEB1)
    assert summary(result) == [(WEB1, None, [], ["g", "demo/p"], [])]


def test_explain_icmp_without_ports_and_ipv6(scenario):
    result = explain(scenario, "198.19.0.1", "198.18.1.1", "ICMP")
    assert summary(result)[0][4] == [("external", "policy demo/p rule 2")]
    assert explain(scenario, "fd00::9", "fd00::1:1", "ICMPv6").interfaces[0].interface == WEB1


def test_explain_port_mirrors_follow_the_direction(scenario):
    tap = scenario.interface("demo/tap/eth0")
    into = explain(scenario, "198.18.2.1", "198.18.8.1", "UDP", 9)
    assert [(c.destination, c.cause, c.mirror_id) for c in into.copies] == [
        ("external", "port mirror ingress", tap.port_mirrors[0].mirror_id)]
    out = explain(scenario, "198.18.8.1", "198.18.2.1", "UDP", 9)
    assert out.interfaces[0].direction is Direction.EGRESS and out.copies == ()


def test_explain_lines_and_unseen_flows(scenario):
    text = "\n".join(explain(scenario, "198.18.2.1", "198.18.1.1", "TCP", 80).lines())
    assert "interface demo/web-1/eth0 (ingress)" in text
    assert "policy demo/p: forward rules [0, 1] match, rule 0 decides: mirror to analyzer1" in text
    assert "policy g: no rule matches" in text
    assert f"mirror id {ids(scenario, 'demo/p', 0)}" in text
    unseen = explain(scenario, "198.18.100.1", "198.18.100.2", "TCP", 80)
    assert unseen.interfaces == () and "no local interface" in unseen.lines()[1]


def test_explain_reads_the_rules_the_compiler_wrote():
    """A flow matches exactly the rules whose sets contain its ends and port."""
    rule = Rule(policy="p", index=0, src=(Cidr("198.18.0.0/16", ("198.18.1.0/24",)),),
                dst=ANY, ports=(PortRange(TCP, 80, 90), PortRange(UDP)))
    assert rule_matches(rule, "198.18.2.1", "198.19.0.1", TCP, 85)
    assert not rule_matches(rule, "198.18.1.1", "198.19.0.1", TCP, 85)  # excepted
    assert not rule_matches(rule, "198.18.2.1", "198.19.0.1", TCP, 91)
    assert rule_matches(rule, "198.18.2.1", "198.19.0.1", UDP, None)
    assert not rule_matches(rule, "198.18.2.1", "198.19.0.1", TCP, None)
    assert not rule_matches(rule, "fd00::1", "198.19.0.1", UDP, 1)


# --- The examples compile into a working demo ----------------------------------------------------


def test_examples_compile_without_errors():
    snap, errors = load_paths([ROOT / "manifests" / "examples"])
    assert errors == []
    addresses = {"web": "198.18.0.10", "client": "198.18.0.11", "analyzer": "198.18.0.12",
                 "port-mirrored": "198.18.0.13", "multus-mirrored": "198.18.0.14"}
    pods = []
    for p in copy.deepcopy(list(snap.pods)):
        name = p["metadata"]["name"]
        p["spec"]["nodeName"] = NODE
        p["status"] = {"phase": "Running", "podIPs": [{"ip": addresses[name]}]}
        if name == "analyzer":  # as l2-analyzer.yaml tells to do
            p["metadata"]["annotations"]["cn2mirror.io/mac"] = "02:00:c6:12:00:0c"
        if name == "multus-mirrored":
            p["metadata"]["annotations"][NETWORK_STATUS] = json.dumps(
                [{"name": "demo/macvlan-demo", "interface": "net1", "ips": ["198.18.200.2"]}])
        pods.append(p)
    dns = pod("coredns", ns="kube-system", node="n2", labels={"k8s-app": "kube-dns"},
              ips=("198.18.0.2",))
    state = compile_node(Snapshot(pods=(*pods, dns), namespaces=snap.namespaces,
                                  destinations=snap.destinations, policies=snap.policies,
                                  global_policies=snap.global_policies), NODE)
    assert state.errors == ()
    assert [p.name for p in state.policies] == ["mirror-demo-dns", "demo/mirror-http-only",
                                                "demo/mirror-web"]
    assert {d.name: d.mode for d in state.destinations} == {
        "analyzer1": DeliveryMode.JMIRROR, "external-analyzer": DeliveryMode.JMIRROR,
        "vxlan-collector": DeliveryMode.VXLAN}
    assert state.destination("analyzer1").analyzer_ip == "198.18.0.12"
    mirrored = {i.key: [m.destination for m in i.port_mirrors] for i in state.interfaces}
    assert mirrored["demo/port-mirrored/eth0"] == ["analyzer1"]
    assert mirrored["demo/multus-mirrored/net1"] == ["external-analyzer"]
    # The client's HTTP request to web: both CSPs mirror it to analyzer1.
    result = explain(state, "198.18.0.11", "198.18.0.10", "TCP", 80, interface_key="demo/web/eth0")
    assert [(c.destination, c.cause) for c in result.copies] == [
        ("analyzer1", "policy demo/mirror-http-only rule 0"),
        ("analyzer1", "policy demo/mirror-web rule 0")]
    # A DNS query from the client goes to the VXLAN collector.
    result = explain(state, "198.18.0.11", "198.18.0.2", "UDP", 53)
    assert [c.destination for c in result.copies] == ["vxlan-collector"]


# --- Properties: deterministic, order-independent, pure ------------------------------------------

LABEL_VALUES = ["web", "client", "db"]
selector_st = st.one_of(
    st.just({}),
    st.sampled_from(LABEL_VALUES).map(lambda v: labels(app=v)),
    st.sampled_from(LABEL_VALUES).map(
        lambda v: {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [v]}]}),
)
endpoint_st = st.one_of(
    selector_st.map(lambda s: {"podSelector": s}),
    st.sampled_from(["a", "b"]).map(lambda t: {"namespaceSelector": labels(team=t)}),
    st.sampled_from(["198.18.0.0/16", "198.18.1.0/24", "fd00::/16"]).map(
        lambda c: {"ipBlock": {"cidr": c}}),
)
mirror_st = st.sampled_from([None, "analyzer1", "external", "missing"])
port_st = st.one_of(st.just({"port": 80}), st.just({"port": "http"}),
                    st.just({"protocol": "UDP"}), st.just({"protocol": "ICMP"}))


@st.composite
def rule_st(draw):
    rule: dict[str, Any] = {}
    for side in ("srcEP", "dstEP"):
        if draw(st.booleans()):
            rule[side] = eps(*draw(st.lists(endpoint_st, max_size=2)))
    if draw(st.booleans()):
        rule["ports"] = draw(st.lists(port_st, max_size=2))
    if (target := draw(mirror_st)) is not None:
        rule["secondaryActions"] = mirror(target)
    return rule


@st.composite
def policy_st(draw, index):
    spec: dict[str, Any] = {
        "selectors": [{"podSelector": s} for s in draw(st.lists(selector_st, max_size=2))],
        "rules": draw(st.lists(rule_st(), max_size=3)),
    }
    if (target := draw(mirror_st)) is not None:
        spec["secondaryActions"] = mirror(target)
    if draw(st.booleans()):
        return gcsp(f"g{index}", **spec)
    return csp(f"p{index}", ns=draw(st.sampled_from(["demo", "other"])), **spec)


@st.composite
def cluster_st(draw):
    pods = []
    for i in range(draw(st.integers(0, 8))):
        annotations = {}
        if (target := draw(mirror_st)) is not None:
            annotations[MIRROR_ANN] = target
        pods.append(pod(
            f"pod{i}", ns=draw(st.sampled_from(["demo", "other"])),
            node=draw(st.sampled_from(["n1", "n2"])),
            labels={"app": draw(st.sampled_from(LABEL_VALUES))},
            ips=draw(st.sampled_from([(f"198.18.0.{i + 1}",),
                                      (f"198.18.1.{i + 1}", f"fd00::{i + 1}"), ()])),
            phase=draw(st.sampled_from(["Running", "Running", "Pending", "Succeeded"])),
            ports=draw(st.sampled_from([(), (("http", 80 + i, "TCP"),)])),
            annotations=annotations))
    policies = [draw(policy_st(i)) for i in range(draw(st.integers(0, 4)))]
    return [*WORLD[:2], *WORLD[-3:], *pods, *policies]


def shuffled(objects: list[dict], rnd: random.Random) -> Snapshot:
    objects = list(objects)
    rnd.shuffle(objects)
    return snapshot(*objects)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_st(), st.randoms(use_true_random=False))
def test_compile_is_deterministic_and_order_independent(objects, rnd):
    snap = snapshot(*objects)
    frozen = copy.deepcopy(snap)
    state = compile_node(snap, "n1")
    assert snap == frozen  # pure: the input is untouched
    assert compile_node(snap, "n1") == state
    assert compile_node(shuffled(objects, rnd), "n1") == state


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_st())
def test_compiled_state_is_consistent(objects):
    state = compile_node(snapshot(*objects), "n1")
    keys = {i.key for i in state.interfaces}
    names = {d.name for d in state.destinations}
    mirror_ids = []
    for p in state.policies:
        assert p.interfaces and p.interfaces <= keys
        assert any(r.destination for r in p.rules)
        assert [r.index for r in p.rules] == sorted({r.index for r in p.rules})
        for r in p.rules:
            assert r.policy == p.name and r.src != () and r.dst != ()
            if r.destination is None:
                assert r.mirror_id == 0
            else:
                assert r.destination in names and 1 <= r.mirror_id <= MIRROR_ID_MAX
                mirror_ids.append(r.mirror_id)
    for i in state.interfaces:
        assert i.key.split("/")[0] in ("demo", "other") and 1 <= i.session_id <= SESSION_ID_MAX
        for m in i.port_mirrors:
            assert m.destination in names
            mirror_ids.append(m.mirror_id)
    assert len(mirror_ids) == len(set(mirror_ids))
    assert len({i.session_id for i in state.interfaces}) == len(state.interfaces)
    assert all(d.name in names for d in state.destinations)
    referenced = {r.destination for p in state.policies for r in p.rules} | {
        m.destination for i in state.interfaces for m in i.port_mirrors}
    assert names == referenced - {None}
    # Every policy or pod that names a missing destination is reported.
    for o in objects:
        spec = json.dumps(o.get("spec", {})) + json.dumps(o["metadata"].get("annotations", {}))
        if '"missing"' in spec and (o["kind"] != "Pod" or (
                o["spec"].get("nodeName") == "n1" and o["status"]["phase"] != "Succeeded")):
            assert any(e.name.endswith(o["metadata"]["name"]) for e in state.errors), o


# --- Only admins decide where traffic goes (issue 11) --------------------------------------------
# Each test is an attack a tenant can make with nothing but the right to create, label and
# annotate pods in its own namespace; the compiler is the one every node runs.

EVIL = "evil"


def tenant_world(*extra: dict) -> list[dict]:
    """WORLD plus a tenant namespace that no admin labelled."""
    return world(namespace(EVIL), *extra)


def test_analyzer_hijack_from_another_namespace_is_refused_and_reported():
    # evil/sink sorts before demo/analyzer and carries the same label: it took md
    # analyzer1 over (every copy of another namespace went to the tenant).
    sink = pod("sink", ns=EVIL, node="n2", labels={ANALYZER_POD: "analyzer1"},
               ips=("198.18.66.6",))
    state = build(*tenant_world(sink, csp("p", selectors=SELECT_WEB,
                                          secondaryActions=mirror("analyzer1"))))
    assert state.destination("analyzer1").analyzer_pod == "demo/analyzer"
    assert state.destination("analyzer1").analyzer_ip == "198.18.9.9"
    assert ObjectError("MirrorDestination", "analyzer1", (
        "not chosen as the analyzer: pod evil/sink is in namespace evil, which no admin "
        "allowed analyzers in")) in state.errors


def test_analyzer_only_in_namespaces_the_destination_or_a_namespace_label_allows():
    sink = pod("sink", ns=EVIL, node="n2", labels={ANALYZER_POD: "s"}, ips=("198.18.66.6",))
    state = build(*tenant_world(sink, md("d", "s"), csp("p", selectors=SELECT_WEB,
                                                         secondaryActions=mirror("d"))))
    assert state.destinations == () and state.policies == ()
    (error,) = [e for e in state.errors if e.kind == "MirrorDestination"]
    assert error.reason.startswith("no pod labelled core.juniper.net/analyzer-pod=s may be "
                                   "the analyzer (pod evil/sink is in namespace evil, which "
                                   "no admin allowed analyzers in): allow a namespace with "
                                   "`kubectl label namespace <ns> cn2mirror.io/analyzer-"
                                   "namespace=true`")
    # The admin's three ways: the spec field (this project's group), the annotation (both
    # groups: CN2's schema has no such field), the namespace label.
    by_field = md("d", "s", analyzerNamespaces=[EVIL])
    by_annotation = md("d", "s", api=f"{CN2_GROUP}/v4")
    by_annotation["metadata"]["annotations"] = {"cn2mirror.io/analyzer-namespaces": "x, evil"}
    for allowed in ([by_field, namespace(EVIL)], [by_annotation, namespace(EVIL)],
                    [md("d", "s"), namespace(EVIL, **{ANALYZER_NS: "true"})]):
        state = build(*world(sink, *allowed, csp("p", selectors=SELECT_WEB,
                                                 secondaryActions=mirror("d"))))
        assert state.errors == ()
        assert state.destination("d").analyzer_pod == "evil/sink"
    # A label value other than "true" allows nothing; a Namespace object that does not
    # exist carries no label.
    for ns_obj in ([namespace(EVIL, **{ANALYZER_NS: "yes"})], []):
        state = build(*world(sink, md("d", "s"), *ns_obj, csp(
            "p", selectors=SELECT_WEB, secondaryActions=mirror("d"))))
        assert state.destinations == ()


def test_host_network_pod_is_never_the_analyzer():
    node_pod = pod("agent", ns="demo", node="n2", labels={ANALYZER_POD: "analyzer1"},
                   ips=("198.18.0.2",), host_network=True)
    state = state_with_md(node_pod, name="analyzer1")
    assert state.destination("analyzer1").analyzer_pod == "demo/analyzer"
    assert ObjectError("MirrorDestination", "analyzer1", (
        "not chosen as the analyzer: pod demo/agent is on the host network (never an "
        "analyzer)")) in state.errors
    alone = build(*world(node_pod, csp("p", selectors=SELECT_WEB,
                                       secondaryActions=mirror("analyzer1")),
                         without=("analyzer",)))
    assert alone.destinations == ()


def _multus_analyzer(ns: str, address: str) -> dict:
    status = [{"name": "k8s-pod-network", "interface": "eth0", "ips": ["198.18.9.1"],
               "default": True},
              {"name": f"{ns}/tap", "interface": "net1", "ips": [address],
               "mac": "02:00:00:00:00:05"}]
    networks = [{"name": "tap", "cni-args": {"core.juniper.net/analyzer-interface": "true"}}]
    return pod("a", ns=ns, labels={ANALYZER_POD: "sel"}, ips=("198.18.9.1",), annotations={
        NETWORKS: json.dumps(networks), NETWORK_STATUS: json.dumps(status)})


def test_exfiltration_through_a_self_written_network_status_is_refused():
    # A pod in an analyzer namespace marks a Multus interface as its receiving interface and
    # writes its own network-status with any address: the destination resolved to it.
    outside = "203.0.113.7"
    state = state_with_md(md("d", "sel"), _multus_analyzer("demo", outside))
    assert state.destinations == ()
    assert ObjectError("MirrorDestination", "d", (
        "analyzer pod demo/a marks net1 as its receiving interface, whose addresses come "
        "from its own network-status annotation, and namespace demo is not labelled "
        "cn2mirror.io/trusted-network-annotations=true, so the pod's own network "
        "annotations are not believed")) in state.errors
    # The default interface's address comes from the kubelet, never from network-status.
    status = [{"interface": "eth0", "ips": [outside], "default": True}]
    no_kubelet_ip = pod("b", labels={ANALYZER_POD: "sel2"},
                        annotations={NETWORK_STATUS: json.dumps(status)})
    state = state_with_md(md("d", "sel2"), no_kubelet_ip)
    assert state.destinations == ()
    assert ObjectError("MirrorDestination", "d", "analyzer pod demo/b has no IP on eth0 yet") \
        in state.errors
    # An admin's label on the namespace opts in.
    state = trusted_state_with_md(md("d", "sel"), _multus_analyzer("demo", outside))
    assert state.destination("d").analyzer_ip == outside


def test_l2_analyzer_mac_and_host_interface_from_annotations_need_a_trusted_namespace():
    analyzer = pod("a", labels={ANALYZER_POD: "sel"}, ips=("198.18.9.1",), annotations={
        "cn2mirror.io/mac": "02:aa:00:00:00:01", "cn2mirror.io/host-interface": "cn2m-rx"})
    state = state_with_md(md("d", "sel", juniperHeader=False), analyzer)
    assert state.destinations == ()
    (error,) = [e for e in state.errors if e.kind == "MirrorDestination"]
    assert error.reason.endswith("namespace demo is not labelled cn2mirror.io/trusted-network-"
                                 "annotations=true, so the pod's own network annotations are "
                                 "not believed)")


def test_host_interface_annotation_ignored_outside_trusted_namespaces():
    # The annotation made the agent attach to another pod's interface.
    thief = pod("thief", ns=EVIL, labels={"app": "thief"}, ips=("198.18.66.1",), annotations={
        "cn2mirror.io/host-interface": "vweb", "cn2mirror.io/mac": "02:00:00:00:00:01"})
    state = build(*tenant_world(thief, csp("p", ns=EVIL, secondaryActions=mirror("external"))))
    (iface,) = state.interfaces
    assert (iface.key, iface.ips, iface.mac, iface.host_ifname) == (
        "evil/thief/eth0", ("198.18.66.1",), None, None)
    assert ObjectError("Pod", "evil/thief", (
        "annotation cn2mirror.io/host-interface ignored: namespace evil is not labelled "
        "cn2mirror.io/trusted-network-annotations=true, so the pod's own network annotations "
        "are not believed; the node finds the host interface from its own tables")) \
        in state.errors
    trusted = build(*world(namespace(EVIL, **{TRUSTED: "true"}), thief,
                           csp("p", ns=EVIL, secondaryActions=mirror("external"))))
    assert trusted.interfaces[0].host_ifname == "vweb"


def test_secondary_interface_claiming_a_victims_address_is_not_attached():
    # A self-written network-status gave a Multus interface web-1's address: the node's
    # route to it led to web-1's veth, which the tenant's policy then mirrored.
    status = [{"name": "k8s-pod-network", "interface": "eth0", "ips": ["198.18.66.1"],
               "default": True},
              {"name": "evil/net", "interface": "net1", "ips": ["198.18.1.1"]}]
    thief = pod("thief", ns=EVIL, ips=("198.18.66.1",), annotations={
        NETWORKS: "net", NETWORK_STATUS: json.dumps(status)})
    state = build(*tenant_world(thief, csp("p", ns=EVIL, secondaryActions=mirror("external"))))
    assert [i.key for i in state.interfaces] == ["evil/thief/eth0"]
    assert [p.interfaces for p in state.policies] == [frozenset({"evil/thief/eth0"})]
    assert any(e.name == "evil/thief" and "secondary interfaces net1 not mirrored" in e.reason
               for e in state.errors)
    # Port mirroring of that interface: refused the same way, and said.
    networks = [{"name": "net", "cni-args": {MIRROR_ANN: "external"}}]
    thief["metadata"]["annotations"][NETWORKS] = json.dumps(networks)
    state = build(*tenant_world(thief))
    assert state.interfaces == ()
    assert any(e.name == "evil/thief" and "mirror-destination on net1: not mirrored" in e.reason
               for e in state.errors)


# --- Output formats (issue 15) ------------------------------------------------------------


def md_annotated(name: str, annotation: str, **spec: Any) -> dict:
    obj = md(name, "analyzer1", api=f"{CN2_GROUP}/v4", **spec)
    obj["metadata"]["annotations"] = {"cn2mirror.io/encapsulation": annotation}
    return obj


@pytest.mark.parametrize("encap, port, expected", [
    ({"format": "erspan3"}, 30030, Encapsulation("erspan3")),
    ({"format": "gre", "greKey": 77}, 30030, Encapsulation("gre", key=77)),
    ({"format": "vxlan", "vni": 4242}, 30030, Encapsulation("vxlan", vni=4242)),
    ({"format": "geneve"}, 30030, Encapsulation("geneve")),
    ({"format": "contrail"}, 30030, Encapsulation("contrail", network="default-podnetwork")),
])
def test_encapsulation_field_in_this_projects_group(encap, port, expected):
    d = state_with_md(md("d", "analyzer1", encapsulation=encap)).destination("d")
    assert d.encapsulation == expected and d.udp_port == port


@pytest.mark.parametrize("annotation, expected", [
    ("erspan2", Encapsulation("erspan2")),
    ('{"format": "geneve", "vni": 9}', Encapsulation("geneve", vni=9)),
    ('{"format": "contrail", "network": "red"}', Encapsulation("contrail", network="red")),
])
def test_encapsulation_annotation_in_cn2s_group(annotation, expected):
    d = state_with_md(md_annotated("d", annotation)).destination("d")
    assert d.encapsulation == expected and d.udp_port == 8099


@pytest.mark.parametrize("encap, message", [
    ({"format": "ipip"}, "spec.encapsulation.format: must be one of"),
    ({"format": "gre", "vni": 3}, "spec.encapsulation.vni: only with format vxlan or geneve"),
    ({"format": "vxlan", "greKey": 3}, "spec.encapsulation.greKey: only with format gre"),
    ({"format": "vxlan", "vni": 1 << 24}, "spec.encapsulation.vni: must be between"),
    ({"format": "contrail", "network": "a b"}, "spec.encapsulation.network"),
    ({"format": "gre", "key": 1}, "spec.encapsulation.key: unknown field"),
])
def test_encapsulation_rejected(encap, message):
    with pytest.raises(ModelError, match=re.escape(message)):
        parse_mirror_destination(md("d", "analyzer1", encapsulation=encap))


def test_encapsulation_needs_a_routed_destination():
    with pytest.raises(ModelError, match="needs juniperHeader true"):
        parse_mirror_destination(md("d", "analyzer1", juniperHeader=False,
                                    encapsulation={"format": "gre"}))
    with pytest.raises(ModelError, match=re.escape("annotations[cn2mirror.io/encapsulation]")):
        parse_mirror_destination(md_annotated("d", "bogus"))


def test_encapsulation_field_is_not_read_from_cn2_objects():
    """CN2's group keeps CN2's fields: a spec.encapsulation there is not ours to read."""
    obj = md("d", "analyzer1", api=f"{CN2_GROUP}/v4", encapsulation={"format": "gre"})
    assert parse_mirror_destination(obj).encapsulation == Encapsulation()
