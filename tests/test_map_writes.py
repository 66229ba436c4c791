"""All-or-nothing map writes, with the real classifier in the kernel (BPF_PROG_TEST_RUN).

A write that fails part-way must leave the previous state whole: the same map contents
byte for byte, the same verdicts for new flows, the same mirror ids on the copies of
established flows, the counters as they were; a state that does not fit is cut down
object by object (agent/capacity.py) instead of being written half-way.
"""

from __future__ import annotations

import errno

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from cn2mirror.agent import layout as L
from cn2mirror.agent.bpfsys import map_info
from cn2mirror.agent.node import ApplyError
from cn2mirror.agent.programmer import MANAGED_MAPS
from cn2mirror.agent.state import Interface, NodeState, Policy

from .dp_helpers import (
    TC_ACT_UNSPEC,
    PacketNode,
    analyzer,
    blocks,
    ip,
    pod_iface,
    policy,
    rule,
    state,
    tcp_ports,
)

pytestmark = [pytest.mark.bpf]

POD, PEER = "198.18.10.2", "198.18.20.5"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def tcp(sport: int, flags: str = "S", dport: int = 80) -> bytes:
    return bytes(ETH / IP(src=POD, dst=PEER) / TCP(sport=sport, dport=dport, flags=flags))


def send(pn: PacketNode, pkt: bytes) -> None:
    rc, out = pn.from_pod(pkt)
    assert rc == TC_ACT_UNSPEC and out == pkt


def copies_of(pn: PacketNode, sport: int) -> list[tuple[int, int]]:
    """(mirror id, destination slot) of each copy the flow from `sport` gets now: the
    flow entry's rule slots, read through the rules map as the mirror port reads them."""
    for key, entry in pn.flows():
        ports = {int.from_bytes(key.port_lo.to_bytes(2, "little"), "big"),
                 int.from_bytes(key.port_hi.to_bytes(2, "little"), "big")}
        if sport in ports:
            out = []
            for i in range(entry.n_rules):
                slot = entry.rules[i] & ~L.FLOW_RULE_SAMPLED_OUT
                raw = pn.node.datapath.maps["rules"].lookup(slot.to_bytes(4, "little"))
                r = L.RuleEntry.from_buffer_copy(raw)
                out.append((r.mirror_id, r.dest))
            return out
    raise AssertionError(f"no flow from port {sport}")


def dump(pn: PacketNode) -> dict[str, dict[bytes, bytes]]:
    return {m: dict(pn.node.datapath.maps[m].items()) for m in MANAGED_MAPS}


class FailingMap:
    """A map whose updates fail with a kernel error after `after` of them succeeded, as
    when the kernel runs out of memory, until an entry is deleted (memory freed)."""

    def __init__(self, inner, after: int, err: int = errno.ENOMEM):
        self.inner, self.after, self.err = inner, after, err
        self.failed = 0

    def update(self, key, value):
        if self.after <= 0:
            self.failed += 1
            raise OSError(self.err, "injected: " + errno.errorcode[self.err])
        self.after -= 1
        self.inner.update(key, value)

    def delete(self, key):
        self.after = max(self.after, 1 << 30)
        return self.inner.delete(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def other(mirror_id: int = 1001):
    return policy("other/p", rule("other/p", 0, dst=blocks("198.18.20.0/24"),
                                  ports=[tcp_ports(80)], mirror_id=mirror_id))


def tenant(n_rules: int, per_rule: int, mirror_base: int = 9000):
    """A policy sorting before other/p (its rules take the first slots), each rule with
    `per_rule` /32 destinations (one key each in dst_v4) that also match PEER."""
    return policy("aaa-tenant/big", *(
        rule("aaa-tenant/big", i, dst=blocks(PEER + "/32", *(
            f"198.19.{i}.{j}/32" for j in range(per_rule - 1))),
            ports=[tcp_ports(80)], mirror_id=mirror_base + i) for i in range(n_rules)))


@pytest.fixture
def small_tries(monkeypatch):
    """A node whose five tries hold 256 entries (the maps made that size in the kernel)."""
    monkeypatch.setattr(L, "LPM_ENTRIES", 256)
    pn = PacketNode()
    try:
        yield pn
    finally:
        pn.close()


@pytest.fixture(scope="module")
def shared_pn():
    node = PacketNode()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def pn(shared_pn):
    """The module's node (a load compiles and verifies the programs: about 8 s) as a
    fresh one: nothing applied (slots given anew, their counters from zero), no flows, its
    limits and the writer's map capacities as they were."""
    node = shared_pn.node
    limits, capacities = node.limits, dict(node.writer.capacities)

    def reset():
        node.limits = limits
        node.writer.capacities.clear()
        node.writer.capacities.update(capacities)
        shared_pn.apply(NodeState("node1"))
        shared_pn.clear_flows()

    reset()
    try:
        yield shared_pn
    finally:
        reset()


def test_a_tenant_filling_a_trie_is_left_out_and_the_others_keep_their_copies(small_tries):
    pn = small_tries
    assert map_info(pn.node.datapath.maps["dst_v4"].fd).max_entries == 256
    pn.apply(state(other()))
    send(pn, tcp(40000))
    assert copies_of(pn, 40000) == [(1001, 1)]
    gen = pn.generation()

    # 4 rules of 100 /32 destinations (PEER in each): 397 keys for a 256-entry trie.
    result = pn.apply(state(tenant(4, 100), other()))
    why = result.problems["ContrailSecurityPolicy aaa-tenant/big"]
    assert "IPv4 destination-address entries are full" in why and "uses 397" in why
    assert result.changes == 0 and pn.generation() == gen  # the maps did not move
    # The established flow's copies keep other/p's mirror id, new flows of other/p are
    # mirrored: 1,000 of them, each cloned once.
    send(pn, tcp(40000, "A"))
    assert copies_of(pn, 40000) == [(1001, 1)]
    slot = pn.rule_slot("other/p", 0)
    before = pn.counters("rule", slot).cloned
    for sport in range(41000, 42000):
        send(pn, tcp(sport))
    assert pn.counters("rule", slot).cloned == before + 1000
    assert copies_of(pn, 41999) == [(1001, 1)]
    # Nothing of the tenant's is in the maps.
    mirror_ids = {L.RuleEntry.from_buffer_copy(v).mirror_id
                  for v in pn.node.datapath.maps["rules"].items() for v in [v[1]]}
    assert not {m for m in mirror_ids if m >= 9000}


def test_a_write_failing_half_way_leaves_the_previous_state_whole(pn):
    old = state(other(), policy("b/q", rule("b/q", 0, dst=blocks("198.18.20.0/25"),
                                            ports=[tcp_ports(80)], mirror_id=2002)))
    pn.apply(old)
    send(pn, tcp(40000))
    assert copies_of(pn, 40000) == [(1001, 1), (2002, 1)]
    slot = pn.rule_slot("other/p", 0)
    cloned = pn.counters("rule", slot).cloned
    assert cloned == 1
    before, gen = dump(pn), pn.generation()

    # The new state moves every rule to another slot and adds 200 trie keys; the
    # destination trie fails (as the kernel does when it runs out of memory) after 50
    # of its writes, when rules, source keys and part of the destination keys are in.
    new = state(tenant(2, 100), other(1111))
    maps = pn.node.writer.maps
    maps["dst_v4"] = FailingMap(maps["dst_v4"], after=50)
    with pytest.raises(ApplyError) as e:
        pn.apply(new)
    assert maps["dst_v4"].failed == 1
    maps["dst_v4"] = maps["dst_v4"].inner
    assert e.value.datapath_unchanged
    assert "Cannot allocate memory" in str(e.value) or "ENOMEM" in str(e.value)
    assert "holds the previous state whole" in str(e.value)

    assert dump(pn) == before  # byte for byte, every managed map
    assert pn.generation() != gen  # verdicts taken mid-write are taken again
    assert pn.counters("rule", slot).cloned == cloned  # counters put back, not zeroed
    # The established flow: re-evaluated, the same copies with the same mirror ids.
    send(pn, tcp(40000, "A"))
    assert copies_of(pn, 40000) == [(1001, 1), (2002, 1)]
    # New flows: the previous verdict, every one of them.
    for sport in range(41000, 41200):
        send(pn, tcp(sport))
    assert pn.counters("rule", slot).cloned == cloned + 1 + 200
    assert copies_of(pn, 41199) == [(1001, 1), (2002, 1)]

    # Without the fault the same state is written whole.
    result = pn.apply(new)
    assert result.changes > 0
    send(pn, tcp(40000, "A"))
    assert copies_of(pn, 40000) == [(9000, 1), (1111, 1)]  # a policy's first match decides


def test_a_plan_over_a_maps_capacity_writes_nothing(pn):
    pn.apply(state(other()))
    before, gen = dump(pn), pn.generation()
    writer = pn.node.writer
    writer.capacities["dst_v4"] = 150  # as if the kernel's map were this small
    pn.node.limits = type(pn.node.limits)(tries={**pn.node.limits.tries, "dst_v4": 10**6})
    try:
        with pytest.raises(ApplyError, match=r"map dst_v4 holds 150 entries; the plan "
                                             r"needs 20\d; nothing was written"):
            pn.apply(state(tenant(2, 100), other()))
    finally:
        writer.capacities["dst_v4"] = 65536
    assert dump(pn) == before and pn.generation() == gen


def test_a_pod_with_more_interfaces_than_the_node_holds_is_left_out_not_the_node(
        monkeypatch):
    """The Multus flood: one pod's interfaces fill the interface slots. That pod is left
    out (not attached, named), the other pods are attached and mirrored."""
    monkeypatch.setattr(L, "MAX_INTERFACES", 8)  # maps made with 8 slots in the kernel
    pn = PacketNode()
    try:
        flood = []
        for n in range(10):
            ip("-n", pn.netns, "link", "add", f"vf{n}", "type", "veth", "peer", "name",
               f"vfp{n}")
            flood.append(Interface("aaa-flood/multus", f"net{n}", session_id=100 + n,
                                   host_ifname=f"vf{n}"))
        web = pod_iface()
        p = Policy("other/p", other().rules,
                   frozenset({web.key, *(i.key for i in flood)}))
        result = pn.apply(NodeState("node1", interfaces=(*flood, web), policies=(p,),
                                    destinations=(analyzer(),)))
        why = result.problems["Pod aaa-flood/multus"]
        assert "interface slots are full: 11 wanted, 7 available" in why
        assert set(result.ifindexes) == {web.key}
        assert pn.node.datapath.attached_ifindexes() == {pn.ifindex}  # no vf* attached
        send(pn, tcp(40000))
        assert copies_of(pn, 40000) == [(1001, 1)]
    finally:
        pn.close()


def test_per_namespace_limits_leave_out_the_namespaces_largest_object_only(pn):
    import dataclasses

    pn.node.limits = dataclasses.replace(pn.node.limits, max_rules_per_namespace=2,
                                         max_interfaces_per_namespace=1)
    ip("-n", pn.netns, "link", "add", "vt0", "type", "veth", "peer", "name", "vtp0")
    ip("-n", pn.netns, "link", "add", "vt1", "type", "veth", "peer", "name", "vtp1")
    web = pod_iface()
    tenant_pod = [Interface("aaa-tenant/two", f"net{n}", session_id=50 + n,
                            host_ifname=f"vt{n}") for n in range(2)]
    big = tenant(3, 1)  # 3 rules in namespace aaa-tenant, over its 2
    small = policy("aaa-tenant/small", rule("aaa-tenant/small", 0, ports=[tcp_ports(81)],
                                            mirror_id=7000))
    result = pn.apply(NodeState("node1", interfaces=(*tenant_pod, web),
                                policies=(big.__class__(big.name, big.rules,
                                                        frozenset({web.key})), small, other()),
                                destinations=(analyzer(),)))
    assert set(result.problems) == {"ContrailSecurityPolicy aaa-tenant/big",
                                    "Pod aaa-tenant/two"}
    assert "--max-rules-per-namespace" in result.problems["ContrailSecurityPolicy "
                                                          "aaa-tenant/big"]
    assert "--max-interfaces-per-namespace" in result.problems["Pod aaa-tenant/two"]
    assert pn.node.datapath.attached_ifindexes() == {pn.ifindex}  # vt0, vt1 not attached
    assert {p for p, _ in result.plan.rule_slots.values()} == {"aaa-tenant/small", "other/p"}
    send(pn, tcp(40000))
    assert copies_of(pn, 40000) == [(1001, 1)]


def test_counters_survive_a_destination_re_resolved_and_restart_for_another_object(pn):
    """A destination whose entry changes (re-resolved: here its port, as when its next
    hop, MTU or reachability changes) keeps its counters: the `no_route` drops counted
    while its analyzer was away are not erased when it comes back. Given to another
    destination, the slot's counters restart (they belong to what the slot holds)."""
    pn.apply(state(policy("p", rule("p", 0, ports=(tcp_ports(80),))), dests=[analyzer()]))
    slot = pn.node.last.plan.dest_slots["an"]
    key = slot.to_bytes(4, "little")
    stats = pn.node.datapath.maps["stats_dest"]
    counted = L.Counters()
    counted.packets = 100
    counted.drops[L.Drop.NO_ROUTE] = 6228
    stats.update_percpu(key, [bytes(counted)] + [bytes(L.Counters())] *
                        (len(stats.lookup(key)) - 1))
    before = pn.counters("dest", slot)
    assert before.drops["no_route"] == 6228 and before.packets == 100

    pn.apply(state(policy("p", rule("p", 0, ports=(tcp_ports(80),))),
                   dests=[analyzer(port=30031)]))
    assert pn.node.last.plan.dest_slots["an"] == slot and pn.node.last.changes > 0
    kept = pn.counters("dest", slot)
    assert kept.drops["no_route"] == 6228 and kept.packets == 100

    pn.apply(state(policy("p", rule("p", 0, ports=(tcp_ports(80),), dest="other")),
                   dests=[analyzer("other")]))
    assert pn.node.last.plan.dest_slots["other"] == slot
    fresh = pn.counters("dest", slot)
    assert fresh.packets == 0 and fresh.drops["no_route"] == 0

    # Another destination to the same analyzer: the slot's entry is byte for byte the
    # same (nothing to write), and still its counters restart.
    stats.update_percpu(key, [bytes(counted)] + [bytes(L.Counters())] *
                        (len(stats.lookup(key)) - 1))
    pn.apply(state(policy("p", rule("p", 0, ports=(tcp_ports(80),), dest="third")),
                   dests=[analyzer("third")]))
    assert pn.node.last.plan.dest_slots["third"] == slot
    assert pn.counters("dest", slot).packets == 0
