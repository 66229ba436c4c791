"""Per-packet cost of the classifier in the kernel, with BPF_PROG_TEST_RUN.

Every cost is the classifier's time minus the floor's, measured in the same run and
interleaved with it: the floor is an empty SCHED_CLS program (returns TC_ACT_UNSPEC)
run on the same packet with the same context. What is measured, per rule count
(N generated rules, plus one mirroring rule for the copy case):

- established flow, matching nothing, IPv4 and IPv6, on both of its paths:
  * flow cache hit (`udp4_nomatch`, `udp6_nomatch`): the flow's second packet cached it
    in the per-CPU flow cache; repeat=R per measurement, so every run but the first of
    each jiffy (which takes the full path once, by design) is a hit;
  * flow cache miss (`udp4_nomatch_miss`, `udp6_nomatch_miss`): two established flows
    whose probes land in the same cache slot, alternated by a wrapper program (two_flows)
    on every run, so that every run finds the slot holding the other flow: the flow-table
    path plus the refill of the slot. Its floor is the wrapper calling the empty program;
- established flow, one copy per packet: the clone goes to the node's mirror port, is
  wrapped in jmirror by mirror_wrap and delivered to the analyzer pod's veth, where an
  nft netdev hook counts and drops it (BPF_PROG_TEST_RUN runs the softirq that carries
  the clone inside its timed loop, so this is the whole copy path);
- first packet of a flow: a wrapper program (new_flow) rewrites the source address and
  port on every run and tail-calls the classifier, so each of the `repeat` runs is a
  new flow (caches warm, as in a stream of connection openings); the floor is the same
  wrapper tail-calling the empty program. A TCP SYN whose rule walk ends on a rule (the
  walk continues in the tail-called eval_continue), then the flow-table insert, IPv4
  and IPv6; and a UDP packet matching nothing (both orientations walked, inserted).
  Measured twice: with the flow table (LRU, 131,072 entries) emptied first, and with it
  full, where every insert evicts (flows are never deleted, only evicted, so a node
  reaches that state after 131,072 flows and stays there). The table is filled and
  emptied once before the first measurement, so that its free list is in the scattered
  order of a running node for every rule count.

Rule set ("targeted", as the compiler produces for per-application policies): policies
of 10 rules, all applied to the measured interface. Policy k selects one destination
pod (a /32 and a /128); rules 0..8 mirror TCP ports 8000..8008 to the analyzer, rule 9
ends the policy for every other TCP port without a copy. The first-packet flow goes to
the last policy's pod on TCP port 9999: the walk ends on the last rule of all.

Also measured, to attribute the costs: building blocks (one kernel timestamp, jiffies,
one lookup in each of the datapath's maps, a flow cache slot, one flow-table lookup and
insert, also into a flow table with BPF_F_NO_COMMON_LRU) with tiny programs; ablations
(the classifier compiled with one per-packet step removed, in memory); BPF run-time
statistics of classifier and wrapper on the copy path; and a walk longer than the
tail-call budget (thousands of policies all matching one flow).

Run alone: `python -m benchmarks.percpu_cost --help`.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import ipaddress
import struct
import time

from cn2mirror.agent import datapath as dpmod
from cn2mirror.agent import layout as L
from cn2mirror.agent.bpfsys import test_run
from cn2mirror.agent.loader import CFLAGS_WARNINGS
from cn2mirror.agent.netns import entered
from cn2mirror.agent.state import Cidr, Policy, PortRange, Rule

from . import common as cm

CLIENT4, CLIENT6 = "198.18.1.2", "2001:2:0:1::2"  # the web pod: packets leave it
COPY4, COPY6 = "198.19.255.1", "2001:2:0:fd::1"  # the mirroring rule's destination
POD4_BASE, POD6_BASE = "198.19.128.0", "2001:2:0:fe::"

EMPTY_PROG = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
int empty_cls(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
"""

# A stream of new flows inside one BPF_PROG_TEST_RUN: each run rewrites the packet's
# source address and port (a per-CPU sequence, the CPU number in the address) and tail
# calls the measured program, so that every one of the `repeat` runs is a first packet.
NEWFLOW_PROG = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
BPF_PROG_ARRAY(nf_next, 1);
BPF_PERCPU_ARRAY(nf_seq, __u32, 1);
int new_flow(struct __sk_buff *skb)
{
    __u32 zero = 0;
    __u32 *c = nf_seq.lookup(&zero);
    if (!c)
        return TC_ACT_UNSPEC;
    __u32 v = *c + 1;
    *c = v;
    __u32 cpu = bpf_get_smp_processor_id() & 1;
    __u16 port = bpf_htons(1024 + (v & 0x7FFF));
    if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        __u32 low = bpf_htonl((cpu << 20) | (v >> 15));  /* 2001:2:0:40::/64 */
        bpf_skb_store_bytes(skb, ETH_HLEN + 8 + 12, &low, 4, 0);
        bpf_skb_store_bytes(skb, ETH_HLEN + 40, &port, 2, 0);
    } else {
        __u32 low = bpf_htonl(0xC6128000 | (cpu << 14) | ((v >> 15) & 0x3FFF));
        bpf_skb_store_bytes(skb, ETH_HLEN + 12, &low, 4, 0);  /* 198.18.128.0/17 */
        bpf_skb_store_bytes(skb, ETH_HLEN + 20, &port, 2, 0);
    }
    nf_next.call(skb, 0);
    return TC_ACT_UNSPEC;
}
"""

# Two established flows alternated inside one BPF_PROG_TEST_RUN: each run writes one of
# two source ports (set from Python, network order) into the packet and tail-calls the
# measured program. With two ports whose flow cache probes share a slot, every run is a
# flow cache miss of an established flow.
TWOFLOWS_PROG = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
BPF_PROG_ARRAY(tf_next, 1);
BPF_PERCPU_ARRAY(tf_seq, __u32, 1);
BPF_ARRAY(tf_ports, __u16, 2);
int two_flows(struct __sk_buff *skb)
{
    __u32 zero = 0;
    __u32 *c = tf_seq.lookup(&zero);
    if (!c)
        return TC_ACT_UNSPEC;
    __u32 v = (*c + 1) & 1;
    *c = v;
    __u16 *port = tf_ports.lookup(&v);
    if (!port)
        return TC_ACT_UNSPEC;
    __u16 p = *port;
    __u32 off = skb->protocol == bpf_htons(ETH_P_IPV6) ? ETH_HLEN + 40 : ETH_HLEN + 20;
    bpf_skb_store_bytes(skb, off, &p, 2, 0);
    tf_next.call(skb, 0);
    return TC_ACT_UNSPEC;
}
"""

# Building blocks, on the datapath's own pinned maps where it has them (interfaces,
# analyzers, the tries), on a flow table of the same sizes otherwise, with the
# classifier's own parse, flow key and flow cache probe (bpf/lib/). Each block writes
# what it read into cb[] so that nothing is optimised out.
BLOCKS_PROG = r"""
#include "lib/common.h"
#include "lib/parse.h"
#include "lib/flow.h"
#include "lib/flow_cache.h"
BPF_TABLE("lru_hash", struct flow_key, struct flow_entry, bb_flows, 131072);
BPF_F_TABLE("lru_hash", struct flow_key, struct flow_entry, bb_flows_nc, 131072, 2);
BPF_PERCPU_ARRAY(bb_seq, __u32, 1);

static __always_inline struct iphdr *ip_of(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + ETH_HLEN;
    if ((void *)(ip + 1) + 4 > end)
        return NULL;
    return ip;
}
/* The classifier's flow key of the packet (interface slot 0). */
static __always_inline int key_of(struct __sk_buff *skb, struct flow_key *k)
{
    struct parsed p = {};
    parse(skb, &p);
    if (!p.ok)
        return 0;
    make_key(&p, 0);
    *k = p.key;
    return 1;
}
int bb_parse(struct __sk_buff *skb)
{
    struct flow_key k = {};
    if (key_of(skb, &k))
        skb->cb[0] = k.port_lo;
    return TC_ACT_UNSPEC;
}
int bb_ktime(struct __sk_buff *skb)
{
    skb->cb[0] = (__u32)bpf_ktime_get_ns();
    return TC_ACT_UNSPEC;
}
int bb_jiffies(struct __sk_buff *skb)
{
    skb->cb[0] = (__u32)bpf_jiffies64();
    return TC_ACT_UNSPEC;
}
int bb_cache_slot(struct __sk_buff *skb)
{
    union cache_probe probe = {};
    if (!cache_probe(skb, &probe, (__u64)skb->ifindex << 32, (__u64)FAMILY_V4 << 8))
        return TC_ACT_UNSPEC;
    __u32 slot = CACHE_SLOT(flow_cache_hash(&probe));
    struct flow_cache_entry *c = flow_cache.lookup(&slot);
    if (c)
        skb->cb[0] = c->generation;
    return TC_ACT_UNSPEC;
}
int bb_iface(struct __sk_buff *skb)
{
    __u32 k = skb->ifindex;
    struct iface_entry *v = interfaces.lookup(&k);
    if (v)
        skb->cb[0] = v->ifslot;
    return TC_ACT_UNSPEC;
}
int bb_analyzer(struct __sk_buff *skb)
{
    struct iphdr *ip = ip_of(skb);
    if (!ip)
        return TC_ACT_UNSPEC;
    struct analyzer_key k = {.port = ((__u16 *)(ip + 1))[1], .family = 4};
    k.addr[0] = ip->daddr;
    skb->cb[0] = analyzers.lookup(&k) != NULL;
    return TC_ACT_UNSPEC;
}
int bb_lpm_dst4(struct __sk_buff *skb)
{
    struct iphdr *ip = ip_of(skb);
    if (!ip)
        return TC_ACT_UNSPEC;
    struct lpm_v4_key k = {.prefixlen = 32};
    __builtin_memcpy(k.addr, &ip->daddr, 4);
    struct match_bits *m = dst_v4.lookup(&k);
    if (m)
        skb->cb[0] = m->summary[0];
    return TC_ACT_UNSPEC;
}
int bb_lpm_port(struct __sk_buff *skb)
{
    struct iphdr *ip = ip_of(skb);
    if (!ip)
        return TC_ACT_UNSPEC;
    struct lpm_port_key k = {.prefixlen = 24};
    k.data[0] = ip->protocol;
    __builtin_memcpy(&k.data[1], &((__u16 *)(ip + 1))[1], 2);
    struct match_bits *m = ports.lookup(&k);
    if (m)
        skb->cb[0] = m->summary[0];
    return TC_ACT_UNSPEC;
}
int bb_flow_hit(struct __sk_buff *skb)
{
    struct flow_key k = {};
    if (!key_of(skb, &k))
        return TC_ACT_UNSPEC;
    struct flow_entry *v = bb_flows.lookup(&k);
    if (v)
        skb->cb[0] = v->generation;
    return TC_ACT_UNSPEC;
}
int bb_seq_parse(struct __sk_buff *skb)
{
    __u32 zero = 0;
    __u32 *c = bb_seq.lookup(&zero);
    struct flow_key k = {};
    if (!c || !key_of(skb, &k))
        return TC_ACT_UNSPEC;
    __u32 v = *c + 1;
    *c = v;
    k.addr_lo[1] = v;
    k.addr_lo[2] = bpf_get_smp_processor_id();
    skb->cb[0] = k.addr_lo[1];
    return TC_ACT_UNSPEC;
}
static __always_inline void bb_insert(struct __sk_buff *skb, int no_common)
{
    __u32 zero = 0;
    __u32 *c = bb_seq.lookup(&zero);
    struct flow_key k = {};
    if (!c || !key_of(skb, &k))
        return;
    __u32 v = *c + 1;
    *c = v;
    k.addr_lo[1] = v;  /* a new key every run */
    k.addr_lo[2] = bpf_get_smp_processor_id();
    struct flow_entry e = {};
    e.generation = 1;
    if (no_common)
        bb_flows_nc.insert(&k, &e);
    else
        bb_flows.insert(&k, &e);
}
int bb_flow_insert_nc(struct __sk_buff *skb)
{
    bb_insert(skb, 1);
    return TC_ACT_UNSPEC;
}
int bb_flow_insert(struct __sk_buff *skb)
{
    bb_insert(skb, 0);
    return TC_ACT_UNSPEC;
}
"""


def blocks_source(dp) -> str:
    """BLOCKS_PROG as the loader compiles the datapath: the same load-time defines (so
    that the maps it declares are the node's pinned ones), bpf/ includes inlined."""
    defines = "".join(f"#define {k} {v}\n"
                      for k, v in dpmod.load_time_defines(dp.pin_root, dp.max_flow_dests).items())
    return dpmod.inline_includes(defines + BLOCKS_PROG, dpmod.bpf_dir(), "blocks.c")


BLOCKS = ("bb_parse", "bb_ktime", "bb_jiffies", "bb_iface", "bb_analyzer", "bb_lpm_dst4",
          "bb_lpm_port", "bb_cache_slot", "bb_flow_hit", "bb_seq_parse", "bb_flow_insert",
          "bb_flow_insert_nc")

# Ablations: the classifier compiled with one per-packet step of the established path
# removed (text replacements on bpf/classifier.c, in memory only), to attribute cost.
ABLATIONS = {
    # every packet takes the flow-table path (the classifier as it was before the cache,
    # plus the probe): what the flow cache saves on an established flow
    "no_flow_cache": [("    if (cacheable) {\n        h = flow_cache_hash(&probe);",
                       "    if (0) {\n        h = flow_cache_hash(&probe);")],
    # ... and on that path, the flow entry's last-seen timestamp
    "no_flow_cache_no_timestamp": [
        ("    if (cacheable) {\n        h = flow_cache_hash(&probe);",
         "    if (0) {\n        h = flow_cache_hash(&probe);"),
        ("fe->last_seen_ns = bpf_ktime_get_coarse_ns();", "")],
}


# ------------------------------------------------------------------ packets
def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def packet(src: str, dst: str, proto: str, sport: int, dport: int, size: int = 64) -> bytes:
    """An Ethernet frame: IPv4 or IPv6, UDP or TCP (SYN), padded to `size` bytes."""
    v6 = ":" in src
    if proto == "udp":
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
        pn = 17
    else:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
        pn = 6
    if v6:
        l3 = struct.pack("!IHBB", 6 << 28, len(l4), pn, 64) + \
            ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
        et = 0x86DD
    else:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, pn, 0,
                          ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
        l3 = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        et = 0x0800
    eth = bytes.fromhex("02aabbccdd01") + bytes.fromhex("02aabbccdd02") + struct.pack("!H", et)
    frame = eth + l3 + l4
    return frame.ljust(max(size, len(frame)), b"\0")


# ------------------------------------------------------------------ rule sets
def pod_addr(k: int) -> tuple[str, str]:
    return (str(ipaddress.ip_address(POD4_BASE) + k), str(ipaddress.ip_address(POD6_BASE) + k))


def targeted_policies(n_rules: int) -> list[Policy]:
    """N rules in policies of 10 (see the module doc), plus the mirroring rule's policy."""
    pols = []
    k = 0
    while k * 10 < n_rules:
        a4, a6 = pod_addr(k)
        dst = (Cidr(a4 + "/32"), Cidr(a6 + "/128"))
        name = f"bench/app{k:05d}"
        count = min(10, n_rules - k * 10)
        rules = []
        for j in range(count):
            last = j == count - 1
            if last:  # ends the policy for every other TCP port, no copy
                rules.append(Rule(name, j, None, dst, (PortRange(6),), None, 0))
            else:
                rules.append(Rule(name, j, None, dst, (PortRange(6, 8000 + j, 8000 + j),),
                                  cm.ANALYZER, 10 + k * 10 + j))
        pols.append(Policy(name, tuple(rules), frozenset({cm.WEB_KEY})))
        k += 1
    pols.append(Policy("bench/zz-copy", (Rule("bench/zz-copy", 0, None,
                                              (Cidr(COPY4 + "/32"), Cidr(COPY6 + "/128")),
                                              (PortRange(17),), cm.ANALYZER, 5),),
                       frozenset({cm.WEB_KEY})))
    return pols


def last_pod(n_rules: int) -> tuple[str, str]:
    return pod_addr((n_rules - 1) // 10)


def overlong_policies(n: int) -> list[Policy]:
    """n one-rule policies, every one matching every flow and mirroring it."""
    return [Policy(f"bench/all{k:05d}", (Rule(f"bench/all{k:05d}", 0, None, None, (),
                                               cm.ANALYZER, 100000 + k),),
                   frozenset({cm.WEB_KEY})) for k in range(n)]


# ------------------------------------------------------------------ measuring
class Runner:
    """Runs programs with BPF_PROG_TEST_RUN inside the node's namespace, with the pod's
    host-side ifindex in the context (the classifier finds the interface by it, and the
    clone must find the mirror port in the same namespace)."""

    def __init__(self, netns: str, ifindex: int):
        self.netns = netns
        self.ifindex = ifindex

    def avg(self, fd: int, pkt: bytes, repeat: int) -> int:
        with entered(self.netns):
            return test_run(fd, pkt, ifindex=self.ifindex, repeat=repeat)[2]


def _pair_summary(ns: list, floor: list) -> dict:
    return {"ns": cm.summary(ns), "floor_ns": cm.summary(floor),
            "over_floor_ns": cm.summary([c - f for c, f in zip(ns, floor, strict=True)]),
            "ratio": cm.summary(cm.ratios(ns, floor)), "rounds_ns": list(ns),
            "rounds_floor_ns": list(floor)}


def interleaved(run: Runner, cases: dict, rounds: int) -> dict:
    """cases: name -> (measure_case(), measure_floor()), each returning ns per run.
    Every round measures each case right after its floor (A B A B ...), in an order that
    rotates between rounds; the per-round differences and ratios are summarised."""
    names = list(cases)
    per = {n: ([], []) for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            case, floor = cases[n]
            per[n][1].append(floor())
            per[n][0].append(case())
    return {n: _pair_summary(c, f) for n, (c, f) in per.items()}


class Stream:
    """First packets: the new_flow wrapper tail-calls either the floor or the measured
    program; both measured with the same repeat on the same packet shape."""

    def __init__(self, run: Runner, wrapper_fd: int, table, floor_fd: int):
        self.run, self.wrapper_fd, self.table, self.floor_fd = run, wrapper_fd, table, floor_fd

    def _next(self, fd: int) -> None:
        self.table[C.c_int(0)] = C.c_int(fd)

    def measure(self, fd: int, pkt: bytes, repeat: int) -> int:
        self._next(fd)
        return self.run.avg(self.wrapper_fd, pkt, repeat)

    def case(self, fd: int, pkt: bytes, repeat: int):
        return (lambda: self.measure(fd, pkt, repeat),
                lambda: self.measure(self.floor_fd, pkt, repeat))


class TwoFlows(Stream):
    """Established flows alternating on every run: the two_flows wrapper writes one of
    two source ports and tail-calls the floor or the measured program."""

    def __init__(self, run: Runner, wrapper_fd: int, table, ports, floor_fd: int):
        super().__init__(run, wrapper_fd, table, floor_fd)
        self.ports = ports

    def case(self, fd: int, pkt: bytes, repeat: int, ports=(0, 0)):
        def set_ports():
            for i, port in enumerate(ports):
                self.ports[C.c_int(i)] = C.c_uint16(socket_htons(port))

        def measure(f):
            set_ports()
            return self.measure(f, pkt, repeat)

        return (lambda: measure(fd), lambda: measure(self.floor_fd))


def _probe(node, run_: Runner, pkt: bytes) -> L.FlowCacheEntry:
    """The flow cache probe classify_from_pod builds for a plain TCP/UDP frame."""
    e = L.FlowCacheEntry()
    v6 = pkt[12:14] == b"\x86\xdd"
    l4 = 14 + (40 if v6 else 20)
    addrs = (pkt[22:38], pkt[38:54]) if v6 else (pkt[26:30], pkt[30:34])
    C.memmove(C.addressof(e.src), addrs[0], len(addrs[0]))
    C.memmove(C.addressof(e.dst), addrs[1], len(addrs[1]))
    e.proto = pkt[20] if v6 else pkt[23]
    e.family = L.FAMILY_V6 if v6 else L.FAMILY_V4
    e.sport = int.from_bytes(pkt[l4:l4 + 2], "little")  # network order kept
    e.dport = int.from_bytes(pkt[l4 + 2:l4 + 4], "little")
    e.ifindex, e.dir = run_.ifindex, L.Dir.EGRESS
    e.generation = L.Config.from_buffer_copy(
        node.datapath.maps["config"].lookup(bytes(4))).generation
    return e


def colliding_port(node, run_: Runner, pkt: bytes) -> int:
    """A source port whose flow lands in the same flow cache slot as pkt's flow."""
    slot, _ = L.flow_cache_hash(_probe(node, run_, pkt))
    v6 = pkt[12:14] == b"\x86\xdd"
    off = 14 + (40 if v6 else 20)
    sport = int.from_bytes(pkt[off:off + 2], "big")
    for port in range(1024, 65536):
        if port == sport:
            continue
        other = pkt[:off] + port.to_bytes(2, "big") + pkt[off + 2:]
        if L.flow_cache_hash(_probe(node, run_, other))[0] == slot:
            return port
    raise cm.BenchError("no colliding source port")


def cache_slot_of(node, run_: Runner, pkt: bytes, any_port: bool = False):
    """The cache slot (of any CPU) holding pkt's flow, or with any_port, any flow that
    differs from it in the source port only; None when there is none."""
    probe = _probe(node, run_, pkt)
    slot, _ = L.flow_cache_hash(probe)
    tags = node.datapath.maps["flow_cache_tags"].lookup(bytes(4))
    for cpu, raw in enumerate(node.datapath.maps["flow_cache"].lookup(
            slot.to_bytes(4, "little"))):
        e = L.FlowCacheEntry.from_buffer_copy(raw)
        if not L.FlowCacheTags.from_buffer_copy(tags[cpu]).tag[slot]:
            continue
        if any_port:
            e.sport = probe.sport
        if bytes(e)[:L.FLOW_CACHE_KEY_BYTES] == bytes(probe)[:L.FLOW_CACHE_KEY_BYTES]:
            return e
    return None


def flow_count(node) -> int:
    return sum(1 for _ in node.datapath.maps["flows"].keys())


def flow_present(node, src: str, dst: str, sport: int, dport: int, proto: int,
                 ifslot: int) -> bool:
    """Is this packet's flow in the flow table (under its canonical key)?"""
    a = ipaddress.ip_address(src).packed.ljust(16, b"\0")
    b = ipaddress.ip_address(dst).packed.ljust(16, b"\0")
    src_lo = a < b if a != b else sport <= dport
    (la, lp), (ha, hp) = ((a, sport), (b, dport)) if src_lo else ((b, dport), (a, sport))
    family = 6 if ":" in src else 4  # the flow key's family tag
    key = la + ha + struct.pack("!HH", lp, hp) + bytes([proto, family]) + \
        struct.pack("<H", ifslot)
    assert len(key) == C.sizeof(L.FlowKey)
    return node.datapath.maps["flows"].lookup(key) is not None


# ------------------------------------------------------------------ the benchmark
def params(quick: bool, rule_counts=None, rounds=None) -> dict:
    prm = _params(quick)
    if rule_counts:
        prm["rule_counts"] = tuple(rule_counts)
    if rounds:
        prm["rounds"] = rounds
    return prm


def _params(quick: bool) -> dict:
    if quick:
        return {"rule_counts": (1, 100), "rounds": 3, "rounds_full": 1, "repeat": 20000,
                "repeat_copy": 2000, "repeat_first": 2000, "ablation": False,
                "overlong": None}
    # repeat_first x 3 cases x rounds stays below the flow table's capacity.
    return {"rule_counts": (1, 100, 1000, 10000), "rounds": 11, "rounds_full": 5,
            "repeat": 200000, "repeat_copy": 20000, "repeat_first": 3000, "ablation": True,
            "overlong": 4000}


def run(quick: bool = False, log=print, rule_counts=None, rounds=None,
        sections=("blocks", "overlong", "stats", "ablation")) -> dict:
    prm = params(quick, rule_counts, rounds)
    out: dict = {"method": {
        "tool": "BPF_PROG_TEST_RUN (ns per run, averaged by the kernel over `repeat`)",
        "rounds": prm["rounds"], "repeat": prm["repeat"], "repeat_copy": prm["repeat_copy"],
        "repeat_first_packet": prm["repeat_first"], "rounds_full_table": prm["rounds_full"],
        "packet_bytes": 64,
        "rule_set": "targeted: policies of 10 rules (see benchmarks/percpu_cost.py)",
        "floor": "empty SCHED_CLS program returning TC_ACT_UNSPEC, same packet and ctx"},
        "machine": cm.machine(), "by_rules": []}
    from bcc import BPF

    with cm.sigterm_as_exit(), cm.bench_lab() as lab, cm.bench_node(lab) as node:
        ns = lab.nodes["node1"].netns
        cm.install_sink(lab.pods["analyzer"].netns)
        out["lab_prefix"] = lab.prefix
        objs = []
        try:
            with entered(ns):
                empty = BPF(text=EMPTY_PROG, cflags=["-w"])
                objs.append(empty)
                floor_fd = empty.load_func("empty_cls", BPF.SCHED_CLS).fd
                nf = BPF(text=NEWFLOW_PROG, cflags=["-w"])
                objs.append(nf)
                wrapper_fd = nf.load_func("new_flow", BPF.SCHED_CLS).fd
                tf = BPF(text=TWOFLOWS_PROG, cflags=["-w"])
                objs.append(tf)
                tf_fd = tf.load_func("two_flows", BPF.SCHED_CLS).fd
            run_ = Runner(ns, node.datapath.ifindex(lab.pods["web"].host_ifname))
            stream = Stream(run_, wrapper_fd, nf.get_table("nf_next"), floor_fd)
            two = TwoFlows(run_, tf_fd, tf.get_table("tf_next"), tf.get_table("tf_ports"),
                           floor_fd)
            cls_fd = node.datapath.prog_fd("classify_from_pod")
            # Churn the flow table once (fill it, then _measure_rules empties it): its free
            # list is then in the scattered order of a node that has been running, not in
            # the order of a freshly allocated map, for every rule count alike.
            node.apply(cm.state(lab, targeted_policies(1)))
            stream.measure(cls_fd, packet("198.18.128.1", "198.19.202.1", "udp", 1,
                                          cm.PROD_PORT), L.FLOW_TABLE_SIZE + 1000)
            for n_rules in prm["rule_counts"]:
                t0 = time.time()
                res = node.apply(cm.state(lab, targeted_policies(n_rules)))
                t_apply = time.time() - t0
                row = _measure_rules(node, lab, run_, stream, two, cls_fd, floor_fd, n_rules,
                                     res.plan.ifslots[cm.WEB_KEY], prm)
                row["apply_s"] = round(t_apply, 2)
                out["by_rules"].append(row)
                est_ = row["established"]

                def med(d, k):
                    return d[k]["over_floor_ns"]["median"]

                log(f"  per-packet cost, {n_rules:>5} rules: established "
                    f"+{med(est_, 'udp4_nomatch'):.0f} ns (cache hit), "
                    f"+{med(est_, 'udp4_nomatch_miss'):.0f} ns (cache miss), 1 copy "
                    f"+{med(est_, 'udp4_copy'):.0f} ns, first packet (TCP SYN) "
                    f"+{med(row['first_packet'], 'syn4'):.0f} ns")
            # Building blocks on the datapath's maps as the largest rule set left them.
            if "blocks" in sections:
                with entered(ns):
                    blocks = BPF(text=blocks_source(node.datapath),
                                 cflags=CFLAGS_WARNINGS)
                    objs.append(blocks)
                out["blocks"] = _measure_blocks(run_, stream, blocks, floor_fd, prm,
                                                last_pod(prm["rule_counts"][-1])[0])
            if prm["overlong"] and "overlong" in sections:
                out["overlong_walk"] = _measure_overlong(node, lab, run_, cls_fd, floor_fd,
                                                         prm["overlong"])
            if "stats" in sections:
                out["bpf_stats"] = _stats_breakdown(node, lab, run_, cls_fd, prm)
            if prm["ablation"] and "ablation" in sections:
                out["ablation"] = _measure_ablation(lab, run_, floor_fd, prm, log)
        finally:
            for o in objs:
                o.cleanup()
    out["machine"]["cpu_busy_after"] = round(cm.cpu_busy(), 3)
    return out


def _measure_rules(node, lab, run_: Runner, stream: Stream, two_flows: TwoFlows, cls_fd,
                   floor_fd, n_rules, ifslot, prm) -> dict:
    pod4, pod6 = last_pod(n_rules)
    est = {
        "udp4_nomatch": (CLIENT4, "198.19.200.1", "udp", 40000, cm.PROD_PORT),
        "udp6_nomatch": (CLIENT6, "2001:2:0:fc::1", "udp", 40000, cm.PROD_PORT),
        "udp4_copy": (CLIENT4, COPY4, "udp", 40001, cm.PROD_PORT),
        "udp6_copy": (CLIENT6, COPY6, "udp", 40001, cm.PROD_PORT),
    }
    cases = {}
    for name, (src, dst, proto, sp, dp) in est.items():
        pkt = packet(src, dst, proto, sp, dp)
        run_.avg(cls_fd, pkt, 1)  # the first packet: evaluates the flow, inserts it
        run_.avg(cls_fd, pkt, 1)  # the second: a flow-table hit (and, no copies: cached)
        if not flow_present(node, src, dst, sp, dp, 17, ifslot):
            raise cm.BenchError(f"{name}: the flow was not in the flow table after its "
                                "first packet")
        if name.endswith("nomatch") and cache_slot_of(node, run_, pkt) is None:
            raise cm.BenchError(f"{name}: the flow was not cached after its second packet")
        rep = prm["repeat_copy"] if name.endswith("copy") else prm["repeat"]
        cases[name] = (lambda p=pkt, r=rep: run_.avg(cls_fd, p, r),
                       lambda p=pkt, r=rep: run_.avg(floor_fd, p, r))
    # Cache misses of established flows: two flows sharing a slot, alternated per run.
    for name in ("udp4_nomatch", "udp6_nomatch"):
        src, dst, proto, sp, dp = est[name]
        sp2 = colliding_port(node, run_, packet(src, dst, proto, sp, dp))
        for port in (sp, sp2):
            for _ in range(2):
                run_.avg(cls_fd, packet(src, dst, proto, port, dp), 1)
            if not flow_present(node, src, dst, port, dp, 17, ifslot):
                raise cm.BenchError(f"{name}_miss: flow with port {port} not in the table")
        two = two_flows.case(cls_fd, packet(src, dst, proto, sp, dp), prm["repeat"],
                             (sp, sp2))
        cases[name + "_miss"] = two
    sink_ns = lab.pods["analyzer"].netns
    before_sink = cm.sink_count(sink_ns)
    before = cm.datapath_counters(node)
    est_res = interleaved(run_, cases, prm["rounds"])
    copies = cm.counters_delta(cm.datapath_counters(node), before)
    delivered = cm.sink_count(sink_ns) - before_sink
    expected = 2 * prm["rounds"] * prm["repeat_copy"]  # runs of the two copy cases

    rf = prm["repeat_first"]
    first_cases = {
        "syn4": stream.case(cls_fd, packet("198.18.128.1", pod4, "tcp", 1, 9999), rf),
        "syn6": stream.case(cls_fd, packet("2001:2:0:40::1", pod6, "tcp", 1, 9999), rf),
        "udp4_nomatch": stream.case(cls_fd, packet("198.18.128.1", pod4, "udp", 1,
                                                   cm.PROD_PORT), rf),
    }
    # Regime 1: the flow table has room (emptied first; the run stays below capacity).
    clear_flows(node)
    flows_before = flow_count(node)
    first = interleaved(run_, first_cases, prm["rounds"])
    flows_after = flow_count(node)
    # Regime 2: the table is full, so every insert evicts. Entries are never deleted
    # (the LRU only evicts), so a node reaches this after 131,072 flows in its life.
    fill = packet("198.18.128.1", "198.19.202.1", "udp", 1, cm.PROD_PORT)
    stream.measure(cls_fd, fill, L.FLOW_TABLE_SIZE + 1000)
    full = interleaved(run_, first_cases, prm["rounds_full"])
    for name in ("udp4_nomatch", "udp6_nomatch"):  # the pair still shares one slot
        src, dst, proto, sp, dp = est[name]
        got = cache_slot_of(node, run_, packet(src, dst, proto, sp, dp), any_port=True)
        if got is None:
            raise cm.BenchError(f"{name}_miss: neither flow of the pair is in their slot")
    return {"rules": n_rules, "established": est_res, "first_packet": first,
            "first_packet_full": full,
            "copies": {"expected": expected, "cloned": copies["cloned"],
                       "wrapped_sent": copies["packets"],
                       "drops": {k: v for k, v in copies["drops"].items() if v},
                       "delivered_to_analyzer": delivered},
            "flow_table": {"before": flows_before, "after": flows_after,
                           "capacity": L.FLOW_TABLE_SIZE,
                           "new_flows_run": 3 * prm["rounds"] * rf,
                           "full_after": flow_count(node)}}


def clear_flows(node) -> None:
    flows = node.datapath.maps["flows"]
    for k in list(flows.keys()):
        flows.delete(k)


def _measure_blocks(run_: Runner, stream: Stream, blocks, floor_fd, prm, dst4: str) -> dict:
    from bcc import BPF

    fds = {n: blocks.load_func(n, BPF.SCHED_CLS).fd for n in BLOCKS}
    flows = blocks.get_table("bb_flows")
    pkt = packet(CLIENT4, dst4, "tcp", 40000, 9999)
    for table in (flows, blocks.get_table("bb_flows_nc")):
        for i in range(50000):  # populated flow tables, and the measured flow in one
            k = table.Key()
            k.addr_lo[0] = 0x0A000000 + i
            k.port_lo = i & 0xFFFF
            table[k] = table.Leaf()
    run_.avg(fds["bb_flow_insert"], pkt, 1)
    k = flows.Key()
    src, dst = ipaddress.ip_address(CLIENT4).packed, ipaddress.ip_address(dst4).packed
    k.addr_lo[0] = int.from_bytes(src, "little")
    k.addr_hi[0] = int.from_bytes(dst, "little")
    k.port_lo, k.port_hi = socket_htons(40000), socket_htons(9999)
    k.proto, k.family = 6, 4
    flows[k] = flows.Leaf()
    rep = {n: prm["repeat"] for n in BLOCKS}
    for n in ("bb_flow_insert", "bb_flow_insert_nc", "bb_seq_parse"):
        rep[n] = prm["repeat_first"]
    cases = {n: (lambda n=n: run_.avg(fds[n], pkt, rep[n]),
                 lambda n=n: run_.avg(floor_fd, pkt, rep[n])) for n in BLOCKS}
    res = interleaved(run_, cases, prm["rounds"])
    res["lpm_key"] = f"{dst4}/32 in dst_v4, (TCP, 9999) in ports"
    return res


def socket_htons(v: int) -> int:
    return int.from_bytes(v.to_bytes(2, "big"), "little")


def _measure_overlong(node, lab, run_: Runner, cls_fd, floor_fd, n: int) -> dict:
    """n one-rule policies matching the same flow: the walk needs more steps than 33 tail
    calls of EVAL_STEPS allow. Is the flow ever cached, and what does a packet cost?"""
    res = node.apply(cm.state(lab, overlong_policies(n)))
    ifslot = res.plan.ifslots[cm.WEB_KEY]
    pkt = packet(CLIENT4, "198.19.201.1", "udp", 40002, cm.PROD_PORT)
    before = cm.datapath_counters(node)
    per_packet, floor = [], []
    for _ in range(20):
        floor.append(run_.avg(floor_fd, pkt, 1))
        per_packet.append(run_.avg(cls_fd, pkt, 1))
    cached = flow_present(node, CLIENT4, "198.19.201.1", 40002, cm.PROD_PORT, 17, ifslot)
    d = cm.counters_delta(cm.datapath_counters(node), before)
    return {"policies_matching": n, "walk_steps_needed": n + (n + 63) // 64,
            "walk_steps_budget": 33 * 96, "packets": len(per_packet),
            "flow_cached": cached, "ns_per_packet": cm.median(per_packet),
            "floor_ns": cm.median(floor), "copies_cloned": d["cloned"],
            "drops": {k: v for k, v in d["drops"].items() if v}}


def _stats_breakdown(node, lab, run_: Runner, cls_fd, prm) -> dict:
    """Run-time statistics of the copy path (classifier, wrapper), measured apart from the
    timed runs: statistics cost two clock reads per program run."""
    node.apply(cm.state(lab, targeted_policies(100)))
    pkt = packet(CLIENT4, COPY4, "udp", 40003, cm.PROD_PORT)
    run_.avg(cls_fd, pkt, 1)
    root = node.datapath.pin_root
    names = ("classify_from_pod", "mirror_wrap")
    with cm.bpf_run_stats():
        before = {n: cm.prog_stats(f"{root}/prog_{n}") for n in names}
        total = run_.avg(cls_fd, pkt, prm["repeat_copy"])
        after = {n: cm.prog_stats(f"{root}/prog_{n}") for n in names}
    out = {"test_run_ns_per_packet": total}
    for n in names:
        cnt = after[n][0] - before[n][0]
        ns = after[n][1] - before[n][1]
        out[n] = {"runs": cnt, "ns_per_run": ns / cnt if cnt else None}
    return out


@contextlib.contextmanager
def _patched_source(replacements):
    original = dpmod.bpf_source

    def patched(pin_root, max_flow_dests):
        text = original(pin_root, max_flow_dests)
        for old, new in replacements:
            if old not in text:
                raise cm.BenchError(f"ablation: {old!r} is no longer in the classifier")
            text = text.replace(old, new)
        return text

    dpmod.bpf_source = patched
    try:
        yield
    finally:
        dpmod.bpf_source = original


def _measure_ablation(lab, run_: Runner, floor_fd, prm, log) -> dict:
    """The established flow (matching nothing, 100 rules) with the stock classifier and
    with per-packet steps removed: what each step costs, interleaved in one run."""
    from cn2mirror.agent.datapath import Datapath, DatapathError
    from cn2mirror.agent.programmer import MapWriter, ResolvedDestination, plan

    ns = lab.nodes["node1"].netns
    st = cm.state(lab, targeted_policies(100))
    dps = {}
    cases = {}
    pkt = packet(CLIENT4, "198.19.200.1", "udp", 40000, cm.PROD_PORT)
    try:
        for name, repl in [("stock", [])] + list(ABLATIONS.items()):
            dp = Datapath(f"/sys/fs/bpf/{lab.prefix}-abl-{name}", netns=ns)
            dps[name] = dp
            try:
                with _patched_source(repl):
                    dp.load()
            except (cm.BenchError, DatapathError) as e:
                log(f"  ablation {name} skipped: {e}")
                continue
            idx = run_.ifindex
            p = plan(st, {cm.WEB_KEY: idx},
                     {cm.ANALYZER: ResolvedDestination(L.Mode.JMIRROR4,
                                                       lab.pods["analyzer"].ip, None,
                                                       cm.JMIRROR_PORT)}, {})
            w = MapWriter(dp.maps, adopt=False)
            w.apply(p)
            w.set_mirror_port(idx)  # no copies are made on this flow
            fd = dp.prog_fd("classify_from_pod")
            run_.avg(fd, pkt, 1)  # evaluated, inserted
            run_.avg(fd, pkt, 1)  # a flow-table hit: cached (when the build has the cache)
            cases[name] = (lambda fd=fd: run_.avg(fd, pkt, prm["repeat"]),
                           lambda: run_.avg(floor_fd, pkt, prm["repeat"]))
        res = interleaved(run_, cases, prm["rounds"])
    finally:
        for dp in dps.values():
            dp.close()
            dp.remove_pins()
    return {"rules": 100, "flow": "established, matching nothing (UDP/IPv4)",
            "replacements": {k: v for k, v in ABLATIONS.items()}, "results": res}


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.percpu_cost",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small repeats, 1 and 100 rules, no ablation or long walk")
    ap.add_argument("--rules", help="comma-separated rule counts (default: by mode)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default: by mode)")
    ap.add_argument("--sections", default="blocks,overlong,stats,ablation",
                    help="extra sections to run: blocks, overlong, stats, ablation "
                         "(comma-separated; empty for none)")
    ap.add_argument("--json", help="also write the full results to this file")
    args = ap.parse_args(argv)
    rules = [int(x) for x in args.rules.split(",")] if args.rules else None
    res = run(args.quick, rule_counts=rules, rounds=args.rounds,
              sections=tuple(x for x in args.sections.split(",") if x))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    for row in res["by_rules"]:
        for part in ("established", "first_packet", "first_packet_full"):
            cells = ", ".join(f"{k} +{v['over_floor_ns']['median']:.0f}"
                              for k, v in row[part].items())
            print(f"{row['rules']:>6} rules, {part}: {cells} ns over the floor")
    for section in ("blocks", "ablation"):
        d = res.get(section) or {}
        d = d.get("results", d)
        cells = ", ".join(f"{k} {v['over_floor_ns']['median']:.0f}" for k, v in d.items()
                          if isinstance(v, dict) and "over_floor_ns" in v)
        if cells:
            print(f"{section}: {cells} ns over the floor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
