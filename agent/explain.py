"""Explaining a flow: which policies and rules of a node's state match its first packet,
in order, and where its copies go, as the datapath decides (its flow evaluation is
described in agent/compiler.py). Used by ``cn2mirror explain``, the demo and the agent
(Agent.explain), and by the tests as the oracle the kernel is checked against.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from . import layout as L
from .compiler import in_endpoints
from .protocols import API_NUMBERS, TCP
from .state import (
    SAMPLING_BY_FLOW,
    SAMPLING_BY_PACKET,
    Direction,
    Interface,
    NodeState,
    Policy,
    Rule,
    Sampling,
)

FORWARD = "forward"
REVERSE = "reverse"


@dataclass(frozen=True)
class PolicyMatch:
    """How one policy decided for a flow on one interface."""

    policy: str
    orientation: str  # FORWARD: as the packet goes; REVERSE: the fallback, src and dst swapped
    matching_rules: tuple[int, ...]  # indexes of every matching rule, in order
    deciding_rule: int  # the first of them
    destination: str | None
    mirror_id: int


@dataclass(frozen=True)
class Copy:
    """One mirrored copy: where it goes and what identifies it on the wire."""

    destination: str
    mirror_id: int
    session_id: int
    interface: str
    cause: str  # "policy <name> rule <i>" or "port mirror <direction>"
    sampling: str | None = None  # how 1:N sampling treats this flow's copies; None: all made


@dataclass(frozen=True)
class InterfaceExplanation:
    interface: str
    direction: Direction | None  # EGRESS: the packet leaves the pod; None: neither end is it
    matches: tuple[PolicyMatch, ...]  # the policies that matched, in evaluation order
    unmatched: tuple[str, ...]  # the policies on this interface that matched nothing
    copies: tuple[Copy, ...]


@dataclass(frozen=True)
class Explanation:
    src_ip: str
    dst_ip: str
    protocol: int
    dst_port: int | None
    src_port: int | None
    interfaces: tuple[InterfaceExplanation, ...]

    @property
    def copies(self) -> tuple[Copy, ...]:
        return tuple(c for i in self.interfaces for c in i.copies)

    def lines(self) -> list[str]:
        """A readable account, for the command line."""
        flow = f"{self.src_ip}:{self.src_port or '*'} -> {self.dst_ip}:{self.dst_port or '*'}"
        out = [f"flow {flow} protocol {self.protocol}"]
        if not self.interfaces:
            out.append("  no local interface sees this flow")
        for i in self.interfaces:
            direction = i.direction.value if i.direction else "transit"
            out.append(f"  interface {i.interface} ({direction})")
            for m in i.matches:
                rules = ", ".join(map(str, m.matching_rules))
                dest = f"mirror to {m.destination} (id {m.mirror_id})" if m.destination \
                    else "no mirror"
                out.append(f"    policy {m.policy}: {m.orientation} rules [{rules}] match, "
                           f"rule {m.deciding_rule} decides: {dest}")
            for name in i.unmatched:
                out.append(f"    policy {name}: no rule matches")
            for c in i.copies:
                out.append(f"    copy -> {c.destination} mirror id {c.mirror_id} "
                           f"session id {c.session_id} ({c.cause})"
                           + (f"; sampling: {c.sampling}" if c.sampling else ""))
        return out


def sampling_note(every: int, mode: str, flow: tuple | None, port_mirror: bool,
                  seed: int | None) -> str | None:
    """How sampling 1:``every`` by ``mode`` treats a flow's copies (None: every packet
    copied). ``flow``: (src, dst, sport, dport, protocol), the ports None when unknown;
    ``seed``: the node's flow sampling seed (None: not known)."""
    if every <= 1:
        return None
    if mode != SAMPLING_BY_FLOW or port_mirror:
        return f"1 packet in {every}, at random"
    if flow is None or flow[2] is None or flow[3] is None:
        return f"1 flow in {every}, whole: which, depends on the ports (give both)"
    if seed is None:
        return f"1 flow in {every}, whole: which, depends on the node's sampling seed"
    src, dst, sport, dport, proto = flow
    key = L.canonical_flow_key(src, dst, sport, dport, proto)
    chosen = L.flow_sample_hash(bytes(key), seed) % every == 0
    return f"1 flow in {every}, whole: this flow is " + (
        "copied" if chosen else "not copied (its packets count as sampled_out)")


def _protocol_number(protocol: int | str) -> int:
    return protocol if isinstance(protocol, int) else API_NUMBERS[protocol]


def rule_matches(rule: Rule, src_ip: str, dst_ip: str, protocol: int,
                 dst_port: int | None) -> bool:
    """Whether a flow matches a rule; a None port matches only rules without port bounds."""
    if not (in_endpoints(rule.src, src_ip) and in_endpoints(rule.dst, dst_ip)):
        return False
    if not rule.ports:
        return True
    return any(
        p.protocol == protocol and (
            p.port_lo is None or (dst_port is not None and p.port_lo <= dst_port <= p.port_hi)
        )
        for p in rule.ports
    )


def _evaluate(policy: Policy, src_ip: str, dst_ip: str, protocol: int, dst_port: int | None,
              orientation: str) -> PolicyMatch | None:
    matching = tuple(r for r in policy.rules if rule_matches(r, src_ip, dst_ip, protocol, dst_port))
    if not matching:
        return None
    first = matching[0]
    return PolicyMatch(policy.name, orientation, tuple(r.index for r in matching), first.index,
                       first.destination, first.mirror_id)


def explain(state: NodeState, src_ip: str, dst_ip: str, protocol: int | str,
            dst_port: int | None = None, interface_key: str | None = None, *,
            src_port: int | None = None, reverse_fallback: bool = True,
            tcp_syn: bool | None = None, sampling_seed: int | None = None) -> Explanation:
    """Which policies and rules match a flow's first packet, and where copies go.

    The packet is looked at on ``interface_key``, or else on every local interface whose
    addresses include src_ip (egress) or dst_ip (ingress). On each, every policy applying
    to it is evaluated on its own: its first matching rule decides. With
    ``reverse_fallback``, when no policy mirrors the packet, every policy is evaluated
    again with the packet's orientation reversed (src and dst swapped, src_port as the
    destination port), as the datapath does, unless the packet is a TCP SYN
    (``tcp_syn``; None: a TCP packet is taken to be a SYN, the first packet of a new
    flow). Port mirrors add a copy when their direction covers the packet's.
    ``sampling_seed``: the node's flow sampling seed (Config.sample_seed), to say whether
    a flow is the 1 in N of a destination sampling by flow (None: unknown).
    """
    proto = _protocol_number(protocol)
    syn = tcp_syn if tcp_syn is not None else proto == TCP
    src, dst = ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip)

    def own(i: Interface, addr: Any) -> bool:
        return any(ipaddress.ip_address(ip) == addr for ip in i.ips)

    destinations = {d.name: d for d in state.destinations}
    flow = (src_ip, dst_ip, src_port, dst_port, proto)

    def note(dest: str, own_sampling: Sampling | None, port_mirror: bool) -> str | None:
        d = destinations.get(dest)
        every, mode = (d.sampling, d.sampling_mode) if d else (1, SAMPLING_BY_PACKET)
        if own_sampling:
            every, mode = own_sampling.over(every, mode)
        return sampling_note(every, mode, flow, port_mirror, sampling_seed)

    if interface_key is not None:
        seen = [i for i in state.interfaces if i.key == interface_key]
    else:
        seen = [i for i in state.interfaces if own(i, src) or own(i, dst)]

    results = []
    for iface in seen:
        direction = Direction.EGRESS if own(iface, src) else \
            Direction.INGRESS if own(iface, dst) else None
        matches, unmatched, copies = [], [], []
        applying = [p for p in state.policies if iface.key in p.interfaces]
        decided = {p.name: _evaluate(p, src_ip, dst_ip, proto, dst_port, FORWARD)
                   for p in applying}
        # The datapath tries the other orientation only when nothing mirrors this one.
        if reverse_fallback and not syn and not any(
                m is not None and m.destination is not None for m in decided.values()):
            for p in applying:
                again = _evaluate(p, dst_ip, src_ip, proto, src_port, REVERSE)
                if again is not None:
                    decided[p.name] = again
        for policy in applying:
            match = decided[policy.name]
            if match is None:
                unmatched.append(policy.name)
                continue
            matches.append(match)
            if match.destination is not None:
                rule = next(r for r in policy.rules if r.index == match.deciding_rule)
                copies.append(Copy(match.destination, match.mirror_id, iface.session_id,
                                   iface.key, f"policy {match.policy} rule {match.deciding_rule}",
                                   note(match.destination, rule.sampling, False)))
        for m in iface.port_mirrors:
            # A packet between two addresses of the same pod is both egress and ingress.
            for d in (Direction.EGRESS, Direction.INGRESS):
                if m.direction.covers(d) and own(iface, src if d is Direction.EGRESS else dst):
                    copies.append(Copy(m.destination, m.mirror_id, iface.session_id, iface.key,
                                       f"port mirror {d.value}", note(m.destination, None, True)))
        results.append(InterfaceExplanation(iface.key, direction, tuple(matches),
                                            tuple(unmatched), tuple(copies)))
    return Explanation(str(src), str(dst), proto, dst_port, src_port, tuple(results))
