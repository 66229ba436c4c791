"""Shared pieces of the datapath tests: a node in a throwaway namespace, state builders,
reading flows and counters back from the maps."""

from __future__ import annotations

import ctypes as C
import ipaddress
import subprocess
import uuid

from cn2mirror.agent import layout as L
from cn2mirror.agent.bpfsys import test_run
from cn2mirror.agent.netns import entered
from cn2mirror.agent.node import Node
from cn2mirror.agent.pinned import sum_counters
from cn2mirror.agent.state import (
    Cidr,
    DeliveryMode,
    Destination,
    Direction,
    Interface,
    NodeState,
    Policy,
    PortMirror,
    PortRange,
    Rule,
    Sampling,
)

TC_ACT_UNSPEC = -1
POD_IF = "vpod"  # the fake pod's host-side interface in the packet-test namespace
ANALYZER = "198.18.200.10"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class PacketNode:
    """A Node in its own namespace with one fake pod interface, for BPF_PROG_TEST_RUN."""

    def __init__(self, max_flow_dests: int = L.DEFAULT_MAX_FLOW_DESTS,
                 flow_table_size: int | None = None):
        self.tag = uuid.uuid4().hex[:6]
        self.netns = f"cn2m-pkt-{self.tag}"
        self.pin_root = f"/sys/fs/bpf/cn2m-test-{self.tag}"
        ip("netns", "add", self.netns)
        try:
            ip("-n", self.netns, "link", "set", "lo", "up")
            ip("-n", self.netns, "link", "add", POD_IF, "type", "veth", "peer", "name", "vpeer")
            ip("-n", self.netns, "link", "add", "an0", "type", "veth", "peer", "name", "an1")
            for dev in (POD_IF, "vpeer", "an0", "an1"):
                # No IPv6 or multicast chatter of their own: only test packets cross them.
                subprocess.run(["ip", "netns", "exec", self.netns, "sysctl", "-qw",
                                f"net.ipv6.conf.{dev}.disable_ipv6=1"], check=True)
                ip("-n", self.netns, "link", "set", dev, "multicast", "off", "up")
            ip("-n", self.netns, "addr", "add", "198.18.200.1/24", "dev", "an0")
            self.node = Node(self.pin_root, netns=self.netns, max_flow_dests=max_flow_dests)
            self.node.datapath.flow_table_size = flow_table_size  # None: the default
            self.node.start()
            self.ifindex = self.node.datapath.ifindex(POD_IF)
        except BaseException:
            self.close()
            raise

    def apply(self, state: NodeState):
        return self.node.apply(state)

    def run(self, prog: str, packet: bytes, mark: int = 0) -> tuple[int, bytes]:
        """Run a classifier on a packet as if it crossed the fake pod interface."""
        with entered(self.netns):
            rc, out, _ = test_run(self.node.datapath.prog_fd(prog), packet,
                                  ifindex=self.ifindex, mark=mark)
        return rc, out

    def repeat(self, prog: str, packet: bytes, times: int) -> tuple[int, bytes]:
        """Run a classifier `times` times on the same packet in one BPF_PROG_TEST_RUN
        (the last run's verdict and packet)."""
        with entered(self.netns):
            rc, out, _ = test_run(self.node.datapath.prog_fd(prog), packet,
                                  ifindex=self.ifindex, repeat=times)
        return rc, out

    def from_pod(self, packet: bytes, mark: int = 0) -> tuple[int, bytes]:
        return self.run("classify_from_pod", packet, mark)

    def to_pod(self, packet: bytes) -> tuple[int, bytes]:
        return self.run("classify_to_pod", packet)

    # ------------------------------------------------------------------ reading back
    def flows(self) -> list[tuple[L.FlowKey, C.Structure]]:
        m = self.node.datapath.maps["flows"]
        entry = L.flow_entry_type(self.node.datapath.max_flow_dests)
        return [(L.FlowKey.from_buffer_copy(k), entry.from_buffer_copy(v)) for k, v in m.items()]

    def clear_flows(self) -> None:
        """Empty the flow table and the per-CPU flow cache (verdicts start again)."""
        m = self.node.datapath.maps["flows"]
        for k in list(m.keys()):
            m.delete(k)
        # Nothing created since it was emptied: created - present stays the evictions.
        stats = self.node.datapath.maps["flow_table_stats"]
        stats.update(bytes(4), bytes(stats.value_size))
        # A zero tag matches no probe: every slot is then as good as empty.
        tags = self.node.datapath.maps["flow_cache_tags"]
        tags.update(bytes(4), bytes(tags.value_size))

    def cache_entries(self) -> list[L.FlowCacheEntry]:
        """Every live flow cache slot (tagged), of every CPU."""
        c = self.node.datapath.maps["flow_cache"]
        out = []
        for cpu, raw in enumerate(self.node.datapath.maps["flow_cache_tags"].lookup(bytes(4))):
            tags = L.FlowCacheTags.from_buffer_copy(raw).tag
            out += [L.FlowCacheEntry.from_buffer_copy(c.lookup(slot.to_bytes(4, "little"))[cpu])
                    for slot in range(L.FLOW_CACHE_SLOTS) if tags[slot]]
        return out

    def cached(self, packet: bytes, direction: int = L.Dir.EGRESS) -> L.FlowCacheEntry | None:
        """The flow cache slot holding this packet's flow (plain Ethernet + IP + TCP/UDP),
        found where flow_cache_hash() says it must be, with the tag it must carry."""
        probe = probe_of(packet, self.ifindex, direction, self.generation())
        slot, tag = L.flow_cache_hash(probe)
        tags = self.node.datapath.maps["flow_cache_tags"].lookup(bytes(4))
        for cpu, raw in enumerate(self.node.datapath.maps["flow_cache"].lookup(
                slot.to_bytes(4, "little"))):
            e = L.FlowCacheEntry.from_buffer_copy(raw)
            if bytes(e)[:L.FLOW_CACHE_KEY_BYTES] == bytes(probe)[:L.FLOW_CACHE_KEY_BYTES]:
                assert L.FlowCacheTags.from_buffer_copy(tags[cpu]).tag[slot] == tag
                return e
        return None

    def generation(self) -> int:
        return L.Config.from_buffer_copy(self.node.datapath.maps["config"].lookup(
            bytes(4))).generation

    def flow_rules(self, a: str, b: str) -> list[tuple[str, int]] | None:
        """(policy, rule index) the flow between addresses a and b is mirrored by."""
        want = {ipaddress.ip_address(a).packed.ljust(16, b"\0"),
                ipaddress.ip_address(b).packed.ljust(16, b"\0")}
        slots = self.node.last.plan.rule_slots
        for key, entry in self.flows():
            if {bytes(key.addr_lo), bytes(key.addr_hi)} == want:
                return [slots[entry.rules[i] & ~L.FLOW_RULE_SAMPLED_OUT]
                        for i in range(entry.n_rules)]
        return None

    def counters(self, kind: str, slot: int):
        raw = self.node.datapath.maps[f"stats_{kind}"].lookup(slot.to_bytes(4, "little"))
        return sum_counters(raw)

    def rule_slot(self, policy: str, index: int) -> int:
        return next(s for s, (p, i) in self.node.last.plan.rule_slots.items()
                    if p == policy and i == index)

    def close(self) -> None:
        node = getattr(self, "node", None)
        if node is not None:
            try:
                node.stop(cleanup=True)
            except Exception:
                pass
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["rm", "-rf", self.pin_root], capture_output=True)


def probe_of(packet: bytes, ifindex: int, direction: int, generation: int) -> L.FlowCacheEntry:
    """The flow cache key the classifier builds for a plain IPv4/IPv6 TCP or UDP frame."""
    e = L.FlowCacheEntry()
    ethertype = int.from_bytes(packet[12:14], "big")
    if ethertype == 0x0800:
        e.family, e.proto, l4 = L.FAMILY_V4, packet[23], 14 + 20
        C.memmove(C.addressof(e.src), packet[26:30], 4)
        C.memmove(C.addressof(e.dst), packet[30:34], 4)
    else:
        e.family, e.proto, l4 = L.FAMILY_V6, packet[20], 14 + 40
        C.memmove(C.addressof(e.src), packet[22:38], 16)
        C.memmove(C.addressof(e.dst), packet[38:54], 16)
    e.sport = int.from_bytes(packet[l4:l4 + 2], "little")  # kept in network order
    e.dport = int.from_bytes(packet[l4 + 2:l4 + 4], "little")
    e.ifindex, e.dir, e.generation = ifindex, direction, generation
    return e


# ---------------------------------------------------------------------- state builders
def analyzer(name: str = "an", ip_addr: str = ANALYZER, port: int = 30030) -> Destination:
    return Destination(name, DeliveryMode.JMIRROR, analyzer_ip=ip_addr, udp_port=port)


def pod_iface(session: int = 7, port_mirrors=()) -> Interface:
    return Interface("demo/web", session_id=session, host_ifname=POD_IF,
                     port_mirrors=tuple(port_mirrors))


def blocks(*cidrs: str) -> tuple[Cidr, ...]:
    return tuple(Cidr(c) for c in cidrs)


def rule(policy: str, index: int, *, src=None, dst=None, ports=(), dest: str | None = "an",
         mirror_id: int | None = None, sampling: Sampling | None = None) -> Rule:
    return Rule(policy, index, src, dst, tuple(ports), dest,
                mirror_id if mirror_id is not None else 1000 + index, sampling)


def policy(name: str, *rules: Rule) -> Policy:
    return Policy(name, tuple(rules), frozenset({"demo/web/eth0"}))


def state(*policies: Policy, dests=None, iface: Interface | None = None) -> NodeState:
    return NodeState("node1", interfaces=(iface or pod_iface(),), policies=tuple(policies),
                     destinations=tuple(dests or (analyzer(),)))


def tcp_ports(lo: int, hi: int | None = None) -> PortRange:
    return PortRange(6, lo, hi if hi is not None else lo)


__all__ = ["PacketNode", "analyzer", "pod_iface", "blocks", "rule", "policy", "state", "Sampling",
           "tcp_ports", "PortMirror", "Direction", "PortRange", "Cidr", "TC_ACT_UNSPEC"]
