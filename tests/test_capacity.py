"""Fair capacity (agent/capacity.py): what does not fit is left out one object at a time,
named, by a deterministic rule; the rest is kept."""

from __future__ import annotations

from cn2mirror.agent.capacity import Limits, fit
from cn2mirror.agent.state import (
    Cidr,
    DeliveryMode,
    Destination,
    Direction,
    Interface,
    NodeState,
    Policy,
    PortMirror,
    Rule,
)


def pol(name: str, n_rules: int, blocks_per_rule: int = 1, base: int = 0) -> Policy:
    rules = []
    for i in range(n_rules):
        cidrs = tuple(Cidr(f"198.18.{(base + i) % 256}.{j % 256}/32")
                      for j in range(blocks_per_rule))
        rules.append(Rule(name, i, None, cidrs, (), "an", 100 + i))
    return Policy(name, tuple(rules), frozenset())


def iface(pod: str, n: int) -> Interface:
    return Interface(pod, f"net{n}", session_id=n)


def node(policies=(), interfaces=(), destinations=()) -> NodeState:
    return NodeState("node1", interfaces=tuple(interfaces), policies=tuple(policies),
                     destinations=tuple(destinations))


def test_a_state_that_fits_is_kept_whole():
    s = node([pol("a/p", 3), pol("b/q", 2)])
    kept, rejected = fit(s, set(), Limits(rules=5))
    assert kept is s and rejected == {}


def test_over_the_rule_slots_the_largest_policy_is_left_out_and_named():
    s = node([pol("a/small", 3), pol("evil/huge", 50), pol("b/mid", 10)])
    kept, rejected = fit(s, set(), Limits(rules=20))
    assert [p.name for p in kept.policies] == ["a/small", "b/mid"]
    assert list(rejected) == ["ContrailSecurityPolicy evil/huge"]
    why = rejected["ContrailSecurityPolicy evil/huge"]
    assert "rule slots are full: 63 wanted, 20 available" in why and "uses 50" in why


def test_ties_are_broken_by_name_the_last_first_and_the_result_is_deterministic():
    a = node([pol("x/b", 5), pol("x/a", 5), pol("y/c", 5)])
    b = node([pol("y/c", 5), pol("x/a", 5), pol("x/b", 5)])
    ra = fit(a, set(), Limits(rules=10))[1]
    rb = fit(b, set(), Limits(rules=10))[1]
    assert list(ra) == list(rb) == ["ContrailSecurityPolicy y/c"]


def test_namespaced_policies_go_before_cluster_scoped_ones():
    s = node([pol("global-big", 30), pol("t/p", 10)])
    kept, rejected = fit(s, set(), Limits(rules=35))
    assert list(rejected) == ["ContrailSecurityPolicy t/p"]
    assert [p.name for p in kept.policies] == ["global-big"]


def test_trie_entries_count_shared_keys_once_and_the_biggest_user_goes():
    # 9 policies of 8 rules with 64 /32 destinations each (the shape, scaled
    # down): 4,608 distinct keys against 1,100 entries.
    policies = [pol(f"ns{i}/p", 8, 64, base=i * 8) for i in range(9)]
    small = [pol("other/a", 2, 1, base=200), pol("other/b", 2, 1, base=200)]  # shared keys
    limits = Limits(tries={"src_v4": 1100, "dst_v4": 1100, "src_v6": 1100, "dst_v6": 1100,
                           "ports": 1100})
    kept, rejected = fit(node(policies + small), set(), limits)
    names = [p.name for p in kept.policies]
    assert "other/a" in names and "other/b" in names
    # 512 keys each: two fit next to the small ones, the rest are left out, the names
    # sorting last first among equals.
    assert sorted(rejected) == sorted(f"ContrailSecurityPolicy ns{i}/p" for i in range(2, 9))
    assert all("IPv4 destination-address entries are full" in r for r in rejected.values())


def test_per_namespace_rule_limit_leaves_out_the_largest_of_that_namespace_only():
    s = node([pol("t/a", 40), pol("t/b", 30), pol("t/c", 5), pol("u/a", 60),
              pol("global", 200)])
    kept, rejected = fit(s, set(), Limits(max_rules_per_namespace=64), node=False)
    assert list(rejected) == ["ContrailSecurityPolicy t/a"]
    assert "namespace t may use 64 rule slots" in rejected["ContrailSecurityPolicy t/a"]
    assert "--max-rules-per-namespace" in rejected["ContrailSecurityPolicy t/a"]
    assert [p.name for p in kept.policies] == ["t/b", "t/c", "u/a", "global"]


def test_pods_with_many_interfaces_are_left_out_whole_and_unresolved_ones_do_not_count():
    flood = [iface("evil/flood", n) for n in range(40)]
    normal = [iface(f"ok/pod{i}", 0) for i in range(5)]
    ghost = [iface("ok/ghost", n) for n in range(100)]  # not on this node: no slots
    resolved = {i.key for i in flood + normal}
    kept, rejected = fit(node(interfaces=flood + normal + ghost), resolved,
                         Limits(interfaces=20))
    assert list(rejected) == ["Pod evil/flood"]
    assert {i.pod for i in kept.interfaces} == {f"ok/pod{i}" for i in range(5)} | {"ok/ghost"}


def test_per_namespace_interface_limit_and_port_mirrors_take_rule_slots():
    pm = (PortMirror("an", Direction.BOTH, 5),)
    pods = [Interface("t/a", f"net{n}", port_mirrors=pm) for n in range(3)] + \
        [Interface("t/b", "eth0", port_mirrors=pm)]
    resolved = {i.key for i in pods}
    kept, rejected = fit(node(interfaces=pods), resolved,
                         Limits(max_interfaces_per_namespace=2))
    assert list(rejected) == ["Pod t/a"]
    kept, rejected = fit(node([pol("t/p", 3)], interfaces=pods), resolved, Limits(rules=4))
    # 3 rules (one policy) against 1 port mirror per interface, 3 on pod t/a: equal
    # size, and t/p sorts after t/a.
    assert list(rejected) == ["ContrailSecurityPolicy t/p"]
    assert len(kept.interfaces) == 4


def test_destinations_beyond_the_slots_are_left_out_by_name():
    dests = [Destination(f"d{i:02}", DeliveryMode.JMIRROR, analyzer_ip="198.18.0.1")
             for i in range(5)]
    kept, rejected = fit(node(destinations=dests), set(), Limits(destinations=3))
    assert [d.name for d in kept.destinations] == ["d00", "d01", "d02"]
    assert sorted(rejected) == ["MirrorDestination d03", "MirrorDestination d04"]
