"""The planner kept across states (programmer.Planner) against a fresh plan of each state,
and the tries' contents against the rules they stand for (a longest-prefix lookup of any
address gives exactly the rules whose address sets hold it)."""

from __future__ import annotations

import ctypes as C
import ipaddress
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cn2mirror.agent import layout as L
from cn2mirror.agent.compiler import in_endpoints
from cn2mirror.agent.programmer import Planner, ResolvedDestination, _lpm_key, _Trie, plan
from cn2mirror.agent.state import (
    Cidr,
    DeliveryMode,
    Destination,
    Interface,
    NodeState,
    Policy,
    PortRange,
    Rule,
)

BLOCKS = [Cidr("198.18.0.0/16"), Cidr("198.18.0.0/16", ("198.18.1.0/24",)),
          Cidr("198.18.1.0/24"), Cidr("198.18.1.7/32"), Cidr("198.18.2.9/32"),
          Cidr("0.0.0.0/0", ("198.18.0.0/15",)), Cidr("fd00::/16"),
          Cidr("fd00::/16", ("fd00:1::/32",)), Cidr("fd00:1::5/128")]
PORTS = [PortRange(6, 80, 80), PortRange(6, 1000, 1999), PortRange(17), PortRange(1),
         PortRange(6, 0x8000, 0xFFFF)]
ADDRESSES = ["198.18.0.1", "198.18.1.1", "198.18.1.7", "198.18.2.9", "10.0.0.1",
             "198.19.0.1", "fd00::1", "fd00:1::5", "fd00:1::6", "2001:db8::1"]
IFACES = ["demo/a/eth0", "demo/b/eth0", "demo/c/net1"]

endpoints_st = st.one_of(st.none(), st.lists(st.sampled_from(BLOCKS), max_size=3).map(
    lambda bs: tuple(sorted(set(bs)))))


@st.composite
def state_st(draw):
    policies = []
    for p in range(draw(st.integers(0, 4))):
        rules = tuple(Rule(f"ns/p{p}", i, draw(endpoints_st), draw(endpoints_st),
                           tuple(draw(st.lists(st.sampled_from(PORTS), max_size=2,
                                               unique=True))),
                           draw(st.sampled_from([None, "a1"])), 100 + i)
                      for i in range(draw(st.integers(1, 3))))
        policies.append(Policy(f"ns/p{p}", rules,
                               frozenset(draw(st.lists(st.sampled_from(IFACES), max_size=2)))))
    interfaces = tuple(Interface(pod=k.rsplit("/", 1)[0], pod_ifname=k.rsplit("/", 1)[1],
                                 session_id=7 + n)
                       for n, k in enumerate(IFACES) if draw(st.booleans()))
    return NodeState("n1", interfaces, tuple(policies),
                     (Destination("a1", DeliveryMode.JMIRROR, analyzer_ip="198.18.9.9"),))


def arguments(state: NodeState):
    ifindexes = {i.key: 10 + n for n, i in enumerate(state.interfaces)}
    destinations = {"a1": ResolvedDestination(L.Mode.JMIRROR4, "198.18.9.9", "198.18.0.1",
                                              30030)}
    return ifindexes, destinations, {}


def lookup(entries: dict[bytes, bytes], addr: str) -> int:
    """Longest-prefix match as the kernel does it: the bitmap of the longest key."""
    ip = ipaddress.ip_address(addr)
    nbytes, cls = (4, L.LpmV4Key) if ip.version == 4 else (16, L.LpmV6Key)
    width = nbytes * 8
    value = int(ip)
    for plen in range(width, -1, -1):
        shift = width - plen
        raw = entries.get(_lpm_key(cls, plen, value >> shift << shift, nbytes))
        if raw is not None:
            bits = L.MatchBits.from_buffer_copy(raw)
            return sum(w << (64 * i) for i, w in enumerate(bits.bits))
    return 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(state_st(), min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_planner_equals_a_fresh_plan_and_the_tries_hold_the_rules(states, rnd):
    planner = Planner()
    for state in states:
        if rnd.random() < 0.3:  # the same endpoint sets as new tuples (a recompile)
            state = NodeState(state.node, state.interfaces, tuple(
                Policy(p.name, tuple(Rule(r.policy, r.index,
                                          None if r.src is None else tuple(list(r.src)),
                                          r.dst, r.ports, r.destination, r.mirror_id)
                                     for r in p.rules), p.interfaces)
                for p in state.policies), state.destinations)
        got = planner.plan(state, *arguments(state))
        assert got == plan(state, *arguments(state))
        slots = {slot: (owner, i) for slot, (owner, i) in got.rule_slots.items()}
        rules = {slot: next(r for p in state.policies if p.name == owner
                            for r in p.rules if r.index == i)
                 for slot, (owner, i) in slots.items()}
        for addr in ADDRESSES:
            fam = "v4" if ":" not in addr else "v6"
            for side in ("src", "dst"):
                want = sum(1 << slot for slot, r in rules.items()
                           if in_endpoints(getattr(r, side), addr))
                assert lookup(got.maps[f"{side}_{fam}"], addr) == want, (side, addr)


def test_lpm_keys_are_the_layout_structures():
    for cls, nbytes, plen, value in ((L.LpmV4Key, 4, 24, 0xC6120100),
                                     (L.LpmV6Key, 16, 64, 0xFD00 << 112),
                                     (L.LpmPortKey, 3, 24, (6 << 16) | 443)):
        k = cls()
        k.prefixlen = plen
        C.memmove(C.addressof(k) + 4, value.to_bytes(nbytes, "big"), nbytes)
        assert _lpm_key(cls, plen, value, nbytes) == bytes(k)


def test_a_changed_host_set_works_out_only_its_keys(monkeypatch):
    """10,000 host addresses in one rule, another rule's 500 hosts changed: the next plan
    works out the keys of that rule alone."""
    hosts = [Cidr(f"198.18.{i // 250}.{i % 250 + 1}/32") for i in range(10_000)]
    rnd = random.Random(3)

    def state(second: tuple[Cidr, ...]) -> NodeState:
        rules = (Rule("ns/p", 0, tuple(hosts), None, (), "a1", 1),
                 Rule("ns/p", 1, second, None, (PortRange(17),), "a1", 2))
        return NodeState("n1", (Interface("demo/a"),), (Policy("ns/p", rules,
                                                               frozenset({"demo/a/eth0"})),),
                         (Destination("a1", DeliveryMode.JMIRROR, analyzer_ip="198.18.9.9"),))

    planner = Planner()
    old = tuple(sorted(rnd.sample(hosts, 500)))
    first = state(old)
    planner.plan(first, *arguments(first))
    new = tuple(sorted(rnd.sample(hosts, 500)))
    second = state(new)
    worked_out = []
    real = _Trie._bits

    def counting(self, key, lengths):
        worked_out.append(key)
        return real(self, key, lengths)

    monkeypatch.setattr(_Trie, "_bits", counting)
    after = planner.plan(second, *arguments(second))
    assert len(worked_out) == len(set(old) | set(new))  # of 10,000 keys
    monkeypatch.undo()
    assert after == plan(second, *arguments(second))
