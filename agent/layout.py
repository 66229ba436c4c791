"""The one definition of the datapath's map layouts and constants.

The structures are ctypes classes; ``c_header()`` turns them (and the constants and
maps) into bpf/gen/layout.h, which the C includes (``make gen`` writes it; a test checks
that the committed file is fresh), so Python and C can never disagree.
Readers of pinned maps (the CLI) use the same classes without compiling anything.
"""

from __future__ import annotations

import ctypes as C
import enum
from dataclasses import dataclass

# ---------------------------------------------------------------------------- sizes
MAX_RULES = 16384  # rule slots (policy rules and port mirrors); bits in a match bitmap
MAX_INTERFACES = 4096  # pod interfaces on one node
MAX_DESTINATIONS = 256  # vRouter allows 255 mirror entries
FLOW_TABLE_SIZE = 131072
DEFAULT_MAX_FLOW_DESTS = 4  # copies per flow (vRouter: 2)
RULE_WORDS = MAX_RULES // 64
SUMMARY_WORDS = RULE_WORDS // 64  # bit w of the summary: word w of the bitmap is non-zero
LPM_ENTRIES = 65536
FLOW_CACHE_BITS = 12
FLOW_CACHE_SLOTS = 1 << FLOW_CACHE_BITS  # per CPU, direct-mapped: see FlowCacheEntry

# ---------------------------------------------------------------------------- marks
# A clone travelling from a pod interface to the mirror port carries in skb->mark:
#   CLONE_TAG (4 bits) | interface slot (12 bits) | rule slot (16 bits).
# The mirror port only ever receives clones; the tag lets it recognise anything else.
CLONE_TAG = 0xC0000000
CLONE_TAG_MASK = 0xF0000000
CLONE_IFSLOT_SHIFT = 16
CLONE_IFSLOT_MASK = 0x0FFF
CLONE_RULE_MASK = 0xFFFF
# Set below the rule slot (rule slots stay under MAX_RULES, 14 bits) by the mirror port's
# sending end on a copy that goes on through the port, when the copy was going into the
# pod: the far end no longer sees where the copy was made (ERSPAN type III's direction).
CLONE_INTO_POD = 0x8000
# A copy wrapped inline on the mirror port's sending end whose next hop's MAC is not yet
# known goes on through the port with this tag instead (same slots below it): the far
# end only routes it (bpf_redirect_neigh), from a clean softirq context. Truncated: the
# second tag, so that the cut is still counted.
WRAPPED_TAG = 0xD0000000
WRAPPED_TRUNCATED_TAG = 0xE0000000
# A GSO super-packet wrapped once (UDP-tunnel GSO) on the sending end: the port's sending
# end (tunnel segmentation off) cuts it into wire-size wrapped segments, each still
# carrying this tag; the far end routes each one (and, for an IPv6 outer header, fills
# in its UDP checksum, which tunnel segmentation leaves at 0).
WRAPPED_SEGMENTS_TAG = 0xF0000000
# A wrapped copy too large for its path whose destination wants it whole: the far end
# hands it to the IP stack, which forwards it and fragments the outer IPv4 header.
WRAPPED_FRAGMENT_TAG = 0xB0000000
# A wrapped copy leaving the mirror port carries this mark, so that no classifier on
# this node mirrors it again (skb->mark survives within one network namespace).
COPY_MARK = 0x4A4D4952  # "JMIR"

# ---------------------------------------------------------------------------- jmirror
JMIRROR_HEADER_LEN = 8
JMIRROR_MID_MASK = (1 << 30) - 1
OUTER_IPV4_OVERHEAD = 20 + 8 + JMIRROR_HEADER_LEN  # 36
OUTER_IPV6_OVERHEAD = 40 + 8 + JMIRROR_HEADER_LEN  # 56
VXLAN_PORT = 4789


class Mode(enum.IntEnum):
    """Delivery mode of a destination, as the wrapper program sees it."""

    NONE = 0
    JMIRROR4 = 1
    JMIRROR6 = 2
    L2 = 3
    VXLAN = 4
    VLAN = 5
    ENCAP4 = 6  # routed over IPv4 in another output format: its header in `encaps`


# ---------------------------------------------------------------------------- formats
class EncapFormat(enum.IntEnum):
    """Output formats of ENCAP4 destinations (agent/encap.py builds their headers)."""

    ERSPAN2 = 1
    ERSPAN3 = 2
    GRE = 3
    GENEVE = 4
    VXLAN = 5
    CONTRAIL = 6


ENCAP_TMPL_MAX = 128  # outer IPv4 header up to the inner Ethernet header, at most
ENCAP_VNI_FROM_MID = 1  # EncapEntry.flags: VXLAN's VNI is the rule's mirror id (24 bits)
ENCAP_GRE = 2  # EncapEntry.flags: over GRE (GSO type GRE), else over UDP (UDP tunnel)
ETH_P_TEB = 0x6558  # transparent Ethernet bridging: the inner Ethernet frame
ETH_P_ERSPAN2 = 0x88BE
ETH_P_ERSPAN3 = 0x22EB
GENEVE_PORT = 6081
# The GENEVE option copies carry: class from the experimental range (0xFF00-0xFFFF),
# 8 bytes of data: the jmirror mirror id and session id, big-endian.
GENEVE_OPT_CLASS = 0xFF4A
GENEVE_OPT_TYPE = 0x01
# Byte offsets, from the outer IPv4 header, of the fields the wrapper fills in per copy.
ERSPAN_HDR_OFF = 20 + 8  # after the GRE header with its sequence number
GENEVE_OPT_DATA_OFF = 20 + 8 + 8 + 4
VXLAN_VNI_OFF = 20 + 8 + 4
CONTRAIL_TLV_MAX = ENCAP_TMPL_MAX - 20 - 8


class Dir(enum.IntEnum):
    """Index of the hook a packet was seen on, named from the pod's side."""

    EGRESS = 0  # out of the pod: TC ingress of the host-side interface
    INGRESS = 1  # into the pod: TC egress of the host-side interface


class Drop(enum.IntEnum):
    """Why a copy was not delivered. Every copy not delivered is counted under one."""

    CLONE_FAILED = 0  # bpf_clone_redirect to the mirror port failed
    FLOW_LIMIT = 1  # more destinations matched than a flow may have
    NO_DESTINATION = 2  # rule or destination slot not configured (agent mid-update)
    NO_ROUTE = 3  # FIB lookup found no way to the analyzer
    NOT_IP = 4  # jmirror carries IP packets only; an ARP frame, say, cannot be wrapped
    WRAP_FAILED = 5  # growing or writing the headers failed
    REDIRECT_FAILED = 6
    FOREIGN = 7  # something on the mirror port that was not one of our clones
    RX_BLOCKED = 8  # incoming traffic on the analyzer port (dropped by XDP)
    RATE_LIMITED = 9  # over its destination's or the node's copy budget: not made (issue 15)


N_DROPS = len(Drop)

# flags
IFACE_HAS_POLICIES = 1  # flow evaluation is needed on this interface
RULE_MIRRORS = 1  # the rule sends copies (a rule without it only ends its policy)
# The rule has its own sampling (rule_sampling): without the flag, a copy's path never
# looks that map up.
RULE_OWN_SAMPLING = 2
FLOW_INITIATOR_LO = 1  # the flow's first packet came from the lower (addr, port) side
FLOW_NEVER_MIRROR = 2  # the flow is itself a stream of copies to an analyzer
DEST_VTEP_IPV6 = 1  # a VXLAN destination whose VTEP address is IPv6
# How jmirror copies of GSO super-packets fit the path (neither flag: exact when the
# wire's segments plus the outer headers fit the path MTU, fit otherwise):
DEST_SEGMENTS_EXACT = 2  # always the wire's segment size (BPF_F_ADJ_ROOM_FIXED_GSO)
DEST_SEGMENTS_FIT = 4  # always segments that fit the path (gso_size lowered by the overhead)
DEST_FRAGMENT = 8  # a copy too large for the path is sent whole, fragmented; else cut
# The device copies to this destination leave by segments UDP-tunnel GSO packets itself,
# with finished inner checksums (the agent turned its tunnel segmentation and checksum
# offload off): super-packets wrapped once are handed to it directly, not through the port.
DEST_GSO_HANDOFF = 16
FLOW_OVERFLOW = 4  # more rules matched than the flow could take, or the walk was cut short
# Set on a rule slot in FlowEntry.rules when sampling by flow left this flow out of the
# rule's copies (decided when the flow is evaluated; its packets count as sampled_out).
# Rule slots stay under MAX_RULES (14 bits), so the bit is free.
FLOW_RULE_SAMPLED_OUT = 1 << 31

FAMILY_V4 = 4  # the family tag in flow keys (not the kernel's AF_INET)
FAMILY_V6 = 6


# ---------------------------------------------------------------------------- structs
u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64


class FlowKey(C.Structure):
    """Both directions of a connection share one key: (addr_lo, port_lo) is the lower side."""

    _fields_ = [
        ("addr_lo", u32 * 4),  # network order; IPv4 in word 0
        ("addr_hi", u32 * 4),
        ("port_lo", u16),  # network order
        ("port_hi", u16),
        ("proto", u8),
        ("family", u8),  # FAMILY_V4 or FAMILY_V6
        ("ifslot", u16),
    ]


class FlowEntry(C.Structure):
    _fields_ = [
        ("generation", u32),
        ("n_rules", u8),
        ("flags", u8),
        ("pad", u16),
        ("rules", u32 * DEFAULT_MAX_FLOW_DESTS),  # replaced by the configured size
        ("packets", u64),  # packets of this flow that were mirrored (approximate on SMP)
        ("bytes", u64),
        ("first_seen_ns", u64),
        ("last_seen_ns", u64),
    ]


class FlowCacheEntry(C.Structure):
    """One slot of the per-CPU flow cache in front of the flow table (bpf/classifier.c).

    It holds the verdict of an established flow that is mirrored by no rule, as seen in
    one direction on one interface: the addresses and ports as they are in the packet
    (not canonical), so that a hit needs no interface lookup, no key ordering and no hash
    table. The first FLOW_CACHE_KEY_BYTES (through `generation`) are compared whole with
    the packet's probe, so a slot filled under an older generation never matches. Slots
    are filled from flow-table hits only; flows with copies are never cached, so every
    packet of theirs reaches the flow table, which counts it. `tick` is the jiffy the slot
    was filled in: a hit in a later jiffy takes the full path once more (refreshing the
    flow entry's last_seen_ns and LRU age, and re-checking the verdict). Pinned like the
    flow table: a restarted agent adopts it, and a slot serves at most until the next
    jiffy before the flow table is asked again.
    """

    _fields_ = [
        ("src", u32 * 4),  # network order, as in the packet; IPv4 in word 0
        ("dst", u32 * 4),
        ("sport", u16),  # network order
        ("dport", u16),
        ("ifindex", u32),
        ("proto", u8),
        ("family", u8),  # FAMILY_V4 or FAMILY_V6
        ("dir", u8),  # Dir
        ("pad", u8),
        ("generation", u32),  # Config.generation the verdict belongs to
        ("tick", u32),  # low 32 bits of jiffies when it was filled
        ("port_rule", u32),  # port mirror rule slot of this direction; 0 none (or a copy stream)
        ("ifslot", u16),
        ("pad2", u16),
        ("pad3", u32),
    ]


FLOW_CACHE_KEY_BYTES = FlowCacheEntry.tick.offset  # compared as six 64-bit words


class FlowCacheTags(C.Structure):
    """Per CPU, a 16-bit tag per flow cache slot (never 0 when filled): a probe reads its
    slot only when the tag matches, so that a new flow touches this small array only."""

    _fields_ = [("tag", u16 * FLOW_CACHE_SLOTS)]


def flow_cache_hash(e: FlowCacheEntry) -> tuple[int, int]:
    """(slot, tag) of a probe: the same hash as flow_cache_hash() in bpf/classifier.c
    (the tests check that the two agree)."""
    raw = bytes(e)
    w = [int.from_bytes(raw[i * 8: i * 8 + 8], "little") for i in range(6)]
    m = (1 << 64) - 1
    h = ((w[0] ^ w[1]) * 0x9E3779B97F4A7C15) & m
    h = ((h ^ w[2] ^ w[3]) * 0xC2B2AE3D27D4EB4F) & m
    h = ((h ^ w[4] ^ (w[5] & 0xFFFFFFFF)) * 0x165667B19E3779F9) & m
    return h >> (64 - FLOW_CACHE_BITS), ((h >> 32) & 0xFFFF) | 1


class InterfaceEntry(C.Structure):
    _fields_ = [
        ("ifslot", u16),
        ("flags", u16),
        ("session_id", u32),
        ("port_rule", u32 * 2),  # rule slot per Dir for port mirroring; 0 none
        ("summary", u64 * SUMMARY_WORDS),
        ("bits", u64 * RULE_WORDS),  # the rules of the policies applied to this interface
    ]


class MatchBits(C.Structure):
    """Value of the match tries: the rules an address (or protocol and port) satisfies."""

    _fields_ = [
        ("summary", u64 * SUMMARY_WORDS),
        ("bits", u64 * RULE_WORDS),
    ]


class RuleEntry(C.Structure):
    _fields_ = [
        ("mirror_id", u32),
        ("dest", u16),  # destination slot
        ("flags", u16),
        ("policy_end", u32),  # first slot after this rule's policy: the rest is skipped
    ]


class DestEntry(C.Structure):
    _fields_ = [
        ("mode", u8),
        ("flags", u8),
        ("udp_port", u16),  # host order
        ("vlan_id", u16),
        ("pad", u16),
        ("vni", u32),
        ("out_ifindex", u32),  # L2: where the MAC lives; VXLAN: the device; VLAN: uplink
        ("mtu", u32),  # L3 MTU on the way to the analyzer; copies are cut to fit
        ("src_addr", u32 * 4),  # network order
        ("dst_addr", u32 * 4),
        ("mac", u8 * 6),  # L2: analyzer MAC; VXLAN: inner destination MAC
        ("pad2", u8 * 2),
    ]


class EncapEntry(C.Structure):
    """Per destination slot, for ENCAP4 destinations: the headers copies get, as a
    template the wrapper copies and completes (lengths, checksum, per-copy ids)."""

    _fields_ = [
        ("format", u8),  # EncapFormat
        ("flags", u8),  # ENCAP_*
        ("hdr_len", u16),  # template bytes: outer IPv4 up to the inner Ethernet header
        ("pad", u32),
        ("tmpl", u8 * ENCAP_TMPL_MAX),
    ]


class Counters(C.Structure):
    """Per-CPU counters, kept per rule, per interface, per destination and node-wide."""

    _fields_ = [
        ("cloned", u64),  # clones handed to the mirror port
        ("packets", u64),  # copies sent towards the analyzer
        ("bytes", u64),  # their bytes, as sent (wrapped)
        ("truncated", u64),  # copies cut to fit the MTU (also counted in packets)
        ("drops", u64 * N_DROPS),
        ("fragmented", u64),  # copies sent whole in outer IPv4 fragments (also in packets)
        ("gso_wrapped", u64),  # GSO super-packets wrapped once (their segments in packets)
        ("gso_by_segment", u64),  # super-packets that could not be (UDP GSO, already
        #   encapsulated, too large to fit): segmented first, wrapped segment by segment
        ("sampled_out", u64),  # copies not made by 1:N sampling (the destination's or the
        #   rule's own; by design, so not among the drops)
    ]


class FlowTableStats(C.Structure):
    """Per CPU: flow entries the classifier created (eval_continue; a stale entry rewritten
    in place is not created again). The flow table is an LRU hash and the only thing that
    ever removes an entry is its eviction (the agent never deletes flows: a policy change
    bumps the generation instead), which makes no sound: readers count the evictions as
    created - present (agent/pinned.py, PinnedMaps.flow_table())."""

    _fields_ = [("created", u64)]


class Config(C.Structure):
    _fields_ = [
        ("generation", u32),  # bumped on every policy change: cached verdicts re-evaluate
        ("mirror_ifindex", u32),  # the sending end of the mirror port
        ("flags", u32),
        ("sample_seed", u32),  # flow sampling's hash seed (flow_sample_hash); 0: SAMPLE_SEED
    ]


# ---------------------------------------------------------------------------- copy limits
# Snap length, sampling and copy budgets (issue 15), checked by the classifier before it
# makes a copy (bpf/copy_limits.h; the snap length by the wrapper). One entry per
# destination slot; slot 0 (no destination has it) holds the node's budget.
COPY_LIMITS_NODE = 0
BUDGET_COST_SHIFT = 16  # costs are nanoseconds of budget in 16.16 fixed point
BUDGET_BURST_NS = 100_000_000  # how much unused budget may be saved up: 100 ms of it
SNAP_LENGTH_MIN = 64  # bytes after the Ethernet header: room for IPv6 + TCP headers
SNAP_LENGTH_MAX = 65535
SAMPLING_MAX = 1 << 24
# How 1:N is chosen. By packet: at random, each packet on its own. By flow: a flow is
# copied whole or not at all, by flow_sample_hash() of its canonical 5-tuple (both
# directions, every interface and node decide alike); port mirroring, which has no
# flows, samples by packet.
SAMPLE_BY_PACKET = 0
SAMPLE_BY_FLOW = 1
# flow_sample_hash's seed when the node is given none (Config.sample_seed 0): public, so
# a pod's owner could pick ports that are never sampled; `cn2mirror agent
# --flow-sampling-seed` (the same secret on every node) prevents that.
SAMPLE_SEED = 0x636E326D  # "cn2m"
SAMPLE_SEED_MAX = 0xFFFFFFFF


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def canonical_flow_key(src: str, dst: str, sport: int, dport: int, proto: int,
                       ifslot: int = 0) -> FlowKey:
    """The flow table's key of a packet (bpf/lib/flow.h make_key): the lower (address,
    port) side first, so both directions of a connection give the same key."""
    import ipaddress

    a, b = (ipaddress.ip_address(x) for x in (src, dst))
    k = FlowKey()
    src_lower = a.packed < b.packed if a != b else sport <= dport
    lo, hi = (a, b) if src_lower else (b, a)
    plo, phi = (sport, dport) if src_lower else (dport, sport)
    C.memmove(C.addressof(k) + FlowKey.addr_lo.offset, lo.packed, len(lo.packed))
    C.memmove(C.addressof(k) + FlowKey.addr_hi.offset, hi.packed, len(hi.packed))
    k.port_lo = int.from_bytes(plo.to_bytes(2, "big"), "little")
    k.port_hi = int.from_bytes(phi.to_bytes(2, "big"), "little")
    k.proto = proto
    k.family = FAMILY_V6 if a.version == 6 else FAMILY_V4
    k.ifslot = ifslot
    return k


def flow_sample_hash(key: bytes, seed: int = 0) -> int:
    """MurmurHash3 (x86, 32 bits; ``seed``, 0: SAMPLE_SEED) of a FlowKey's 5-tuple: its first
    36 bytes (addresses, ports) and the proto and family bytes, as ten little-endian
    words, the interface slot left out. The datapath's twin is flow_sample_hash() in
    bpf/lib/copy_limits.h; a flow is sampled in when hash % N == 0."""
    words = list(int.from_bytes(key[i:i + 4], "little") for i in range(0, 40, 4))
    words[9] &= 0xFFFF  # proto, family; not ifslot
    h = seed or SAMPLE_SEED
    for k in words:
        k = (k * 0xCC9E2D51) & 0xFFFFFFFF
        k = _rotl32(k, 15)
        k = (k * 0x1B873593) & 0xFFFFFFFF
        h ^= k
        h = _rotl32(h, 13)
        h = (h * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= 40
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)
BUDGET_PPS_MAX = 1 << 32  # 4 G copies/s: no limit in practice
BUDGET_BPS_MIN = 1000  # below it a 64 KB super-packet's cost would overflow the clock
BUDGET_BPS_MAX = 1 << 50
# The node's default budget, per CPU of the node (copies cost CPU in softirq, on every
# CPU whatever the agent's own limits): under a mirror-everything policy of 64-byte UDP
# on this 2-CPU machine, 25,000/s per CPU kept production at 0.84 of no mirroring (0.58
# with no budget, 0.80 with tc mirred; benchmarks/throughput.py, cn2m_flow_all_budget*).
DEFAULT_NODE_COPY_PPS_PER_CPU = 25_000
DEFAULT_NODE_COPY_BPS_PER_CPU = 500_000_000


def default_node_copy_budget(cpus: int | None = None) -> tuple[int, int]:
    """(copies/s, bits/s): the node's default copy budget for ``cpus`` CPUs (this
    machine's when None)."""
    import os

    n = cpus or os.cpu_count() or 1
    return n * DEFAULT_NODE_COPY_PPS_PER_CPU, n * DEFAULT_NODE_COPY_BPS_PER_CPU


class CopyLimits(C.Structure):
    """What a destination's copies (or, in slot COPY_LIMITS_NODE, all the node's) may
    take. Zero everywhere: no limit."""

    _fields_ = [
        ("sample_every", u32),  # one packet (or flow) in N is copied; 0, 1: all
        ("snap_length", u16),  # copies cut to this many bytes after the Ethernet header
        ("sample_by", u8),  # SAMPLE_BY_PACKET or SAMPLE_BY_FLOW
        ("pad", u8),
        ("packet_cost", u64),  # budget one copy takes: ns << BUDGET_COST_SHIFT; 0: none
        ("byte_cost", u64),  # budget one byte takes: ns << BUDGET_COST_SHIFT; 0: none
        ("burst_ns", u64),  # how far behind real time the budget clocks may fall
    ]


class RuleSampling(C.Structure):
    """A rule's own sampling, per rule slot (this project's API group: the policy's or
    the rule's secondaryActions.sampling). It replaces the destination's for the rule's
    copies; sample_every 0: the destination's sampling applies."""

    _fields_ = [
        ("sample_every", u32),  # one packet (or flow) in N is copied; 1: all; 0: unset
        ("sample_by", u8),  # SAMPLE_BY_PACKET or SAMPLE_BY_FLOW
        ("pad", u8 * 3),
    ]


class CopyBudgetClock(C.Structure):
    """A token bucket as a virtual clock (GCRA): each copy made moves it on by its cost;
    a copy is made only while the clock is not ahead of real time. Shared by every CPU
    (atomic adds), so the budget is the node's whatever CPU the traffic lands on."""

    _fields_ = [
        ("packet_ns", u64),  # ktime_get_ns() the packet budget is spent up to
        ("byte_ns", u64),
    ]


def budget_cost(per_second: int, unit: int = 1) -> int:
    """The 16.16 nanoseconds one unit (a packet; a byte = 8 bits) takes of a budget of
    ``per_second`` units (packets or bits) a second; 0 when there is no budget."""
    if not per_second:
        return 0
    return (unit * 1_000_000_000 << BUDGET_COST_SHIFT) // per_second


def copy_limits_entry(sample_every: int = 0, snap_length: int = 0, pps: int = 0,
                      bps: int = 0, sample_by: int = 0) -> CopyLimits:
    e = CopyLimits()
    e.sample_every = sample_every if sample_every > 1 else 0
    e.sample_by = sample_by if e.sample_every else SAMPLE_BY_PACKET
    e.snap_length = snap_length
    e.packet_cost = budget_cost(pps)
    e.byte_cost = budget_cost(bps, 8)
    e.burst_ns = BUDGET_BURST_NS if (pps or bps) else 0
    # A burst must hold one whole copy of a 64 KB super-packet, or it would never pass.
    if e.byte_cost:
        e.burst_ns = max(e.burst_ns, 2 * ((65536 * e.byte_cost) >> BUDGET_COST_SHIFT))
    if e.packet_cost:
        e.burst_ns = max(e.burst_ns, 2 * ((64 * e.packet_cost) >> BUDGET_COST_SHIFT))
    return e


# skb->cb[] word in which a pod-side stub hands the pod's host-side ifindex to
# classify_to_pod_peer (words 0-2 carry a pod-side copy's secret and tag).
POD_SIDE_CB = 3


class PeerConfig(C.Structure):
    """The pod-side attachment's shared secret: a copy made inside a pod's namespace
    crosses the pod's veth with it in skb->cb[0..1] (and its mark in cb[2]), and only a
    packet carrying it is taken for a copy on the host side."""

    _fields_ = [("secret", u64)]


class AnalyzerKey(C.Structure):
    """An (address, UDP port) copies are sent to: traffic to it is never mirrored."""

    _fields_ = [("addr", u32 * 4), ("port", u16), ("family", u8), ("pad", u8)]


class LpmV4Key(C.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 4)]


class LpmV6Key(C.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 16)]


class LpmPortKey(C.Structure):
    """(protocol, destination port) as a 24-bit string, so that port ranges are prefixes."""

    _fields_ = [("prefixlen", u32), ("data", u8 * 3)]


class Parsed(C.Structure):
    """What the classifier read of a packet (parse() in bpf/lib/parse.h)."""

    _fields_ = [
        ("key", FlowKey),  # canonical: lower (addr, port) side first
        ("src", u32 * 4),  # as seen in this packet, network order
        ("dst", u32 * 4),
        ("sport", u16),  # network order; 0 when the packet has none
        ("dport", u16),
        ("proto", u8),
        ("family", u8),
        ("tcp_syn_only", u8),  # SYN without ACK: certainly the flow's first packet
        ("ok", u8),  # an IP packet we could read the addresses of
        ("src_is_lo", u8),  # this packet travels from the key's lower side
        ("quoted_udp", u8),  # an ICMP error quoting a UDP datagram:
        ("quoted_dport", u16),  # its destination port, network order
        ("quoted_dst", u32 * 4),  # and address
    ]


class EvalScratch(C.Structure):
    """The rule walk's state between the runs of eval_continue (bpf/lib/rule_walk.h).

    Kept in a per-CPU map value rather than on the stack: values read back from a map
    are unknown to the verifier, so after the bounds checks every path reaches the loop
    head in the same state and the verifier prunes them."""

    _fields_ = [
        ("p", Parsed),  # the packet being evaluated
        ("ifindex", u32),
        ("orientation", u32),  # 0: as the packet travels; 1: reversed
        ("started", u32),  # the walk of this orientation has begun
        ("never", u32),  # a stream of copies: never mirrored, not walked
        ("cand", u64 * SUMMARY_WORDS),  # candidate words per summary word
        ("cur", u64),  # candidate words left in summary word `sw`
        ("bits", u64),  # matching bits left in the current word
        ("sw", u32),
        ("word", u32),
        ("skip_below", u32),  # first rule slot not yet decided by its policy
        ("n", u32),
        ("overflow", u32),
        ("generation", u32),  # the policy generation the walk started under
        ("had_old", u32),  # the flow table held a stale entry for the flow
        ("rules", u32 * DEFAULT_MAX_FLOW_DESTS),  # replaced by the configured size
        ("peer_secret", u64),  # the copies go the pod-side way (see send_copy)
    ]


CSUM_CHUNK = 512  # the most bpf_csum_diff takes at once


class CsumBuf(C.Structure):
    """Per-CPU buffer the IPv6 UDP checksum reads a copy into, chunk by chunk."""

    _fields_ = [("b", u8 * (CSUM_CHUNK + 8))]  # slack the verifier can see past the padding


class EncapBuf(C.Structure):
    """Per-CPU buffer a format's header template is completed in (lib/encap_formats.h),
    with room for the copied Ethernet header after it."""

    _fields_ = [("b", u8 * (ENCAP_TMPL_MAX + 14 + 2))]


def _with_flow_dests(cls: type[C.Structure], max_flow_dests: int) -> type[C.Structure]:
    """``cls`` with its ``rules`` array holding ``max_flow_dests`` entries."""
    if max_flow_dests == DEFAULT_MAX_FLOW_DESTS:
        return cls
    fields = [(n, u32 * max_flow_dests) if n == "rules" else (n, t) for n, t in cls._fields_]
    return type(cls.__name__, (C.Structure,), {"_fields_": fields})


def eval_scratch_type(max_flow_dests: int) -> type[C.Structure]:
    """EvalScratch with room for ``max_flow_dests`` rules per flow."""
    return _with_flow_dests(EvalScratch, max_flow_dests)


def flow_entry_type(max_flow_dests: int) -> type[C.Structure]:
    """FlowEntry with room for ``max_flow_dests`` rules per flow."""
    return _with_flow_dests(FlowEntry, max_flow_dests)


# ---------------------------------------------------------------------------- maps
PIN_BY_NAME = "name"  # <pin root>/<name>
PIN_BY_LAYOUT = "layout"  # <pin root>/<name>_<digest of its layout> (eval_scratch_pin)
NOT_PINNED = ""  # private to one loaded program set


@dataclass(frozen=True)
class MapSpec:
    name: str
    kind: str  # bcc table type
    key: type
    value: type
    entries: int
    flags: int = 0
    pin: str = PIN_BY_NAME


BPF_F_NO_PREALLOC = 1


def map_specs(max_flow_dests: int = DEFAULT_MAX_FLOW_DESTS,
              flow_table_size: int | None = None) -> tuple[MapSpec, ...]:
    """Every map the programs use; all but the scratch areas pinned under the pin root by
    their name. ``flow_table_size``: the flow table's entries (default FLOW_TABLE_SIZE)."""
    return (
        MapSpec("config", "array", u32, Config, 1),
        MapSpec("interfaces", "hash", u32, InterfaceEntry, MAX_INTERFACES),  # by ifindex
        MapSpec("sessions", "array", u32, u32, MAX_INTERFACES),  # ifslot -> session id
        MapSpec("rules", "array", u32, RuleEntry, MAX_RULES),
        MapSpec("destinations", "array", u32, DestEntry, MAX_DESTINATIONS),
        MapSpec("encaps", "array", u32, EncapEntry, MAX_DESTINATIONS),  # by destination slot
        MapSpec("flows", "lru_hash", FlowKey, flow_entry_type(max_flow_dests),
                flow_table_size or FLOW_TABLE_SIZE),
        MapSpec("flow_cache", "percpu_array", u32, FlowCacheEntry, FLOW_CACHE_SLOTS),
        MapSpec("flow_cache_tags", "percpu_array", u32, FlowCacheTags, 1),
        MapSpec("src_v4", "lpm_trie", LpmV4Key, MatchBits, LPM_ENTRIES, BPF_F_NO_PREALLOC),
        MapSpec("dst_v4", "lpm_trie", LpmV4Key, MatchBits, LPM_ENTRIES, BPF_F_NO_PREALLOC),
        MapSpec("src_v6", "lpm_trie", LpmV6Key, MatchBits, LPM_ENTRIES, BPF_F_NO_PREALLOC),
        MapSpec("dst_v6", "lpm_trie", LpmV6Key, MatchBits, LPM_ENTRIES, BPF_F_NO_PREALLOC),
        MapSpec("ports", "lpm_trie", LpmPortKey, MatchBits, LPM_ENTRIES, BPF_F_NO_PREALLOC),
        MapSpec("analyzers", "hash", AnalyzerKey, u8, MAX_DESTINATIONS * 2),
        MapSpec("stats_rule", "percpu_array", u32, Counters, MAX_RULES),
        MapSpec("stats_iface", "percpu_array", u32, Counters, MAX_INTERFACES),
        MapSpec("stats_dest", "percpu_array", u32, Counters, MAX_DESTINATIONS),
        MapSpec("stats_node", "percpu_array", u32, Counters, 1),
        # Flow entries created, to count the flow table's evictions (FlowTableStats).
        MapSpec("flow_table_stats", "percpu_array", u32, FlowTableStats, 1),
        # The rule walk's continuation program (pinned: an unpinned program array is
        # emptied when its last user reference closes, which would stop evaluation when
        # the agent exits).
        MapSpec("eval_progs", "prog", u32, u32, 1),
        # Pod-side attachments (agent/datapath.py): the classifier their per-pod stubs
        # tail-call, and the secret their copies carry back to the host side.
        MapSpec("peer_progs", "prog", u32, u32, 1),
        MapSpec("peer_config", "array", u32, PeerConfig, 1),
        # The rule walk's scratch area, pinned by its layout (see EVAL_SCRATCH_MAP).
        MapSpec("eval_scratch_map", "percpu_array", u32, eval_scratch_type(max_flow_dests), 1,
                pin=PIN_BY_LAYOUT),
        # The IPv6 UDP checksum's buffer (the wrapper's own: nothing else reads it).
        MapSpec("csum_scratch", "percpu_array", u32, CsumBuf, 1, pin=NOT_PINNED),
        MapSpec("encap_scratch", "percpu_array", u32, EncapBuf, 1, pin=NOT_PINNED),
        # Snap length, sampling and budgets per destination slot, the node's in slot 0;
        # and the budgets' clocks, written by the datapath only (issue 15).
        MapSpec("copy_limits", "array", u32, CopyLimits, MAX_DESTINATIONS),
        MapSpec("copy_budget", "array", u32, CopyBudgetClock, MAX_DESTINATIONS),
        # A rule's own sampling, per rule slot (RuleSampling).
        MapSpec("rule_sampling", "array", u32, RuleSampling, MAX_RULES),
    )


# The rule walk's scratch area (EvalScratch) is pinned too: while an agent restarts, the
# old classifiers still attached tail-call the new continuation (eval_progs[0] is
# repointed when the new programs load), and both must use the same scratch map, or the
# flows that start in that window are evaluated on an empty scratch area and not
# mirrored. The pin's name carries a digest of the scratch area's C definition
# (datapath.scratch_digest), so programs of different layouts never share one.
EVAL_SCRATCH_MAP = "eval_scratch_map"


def eval_scratch_pin(pin_root: str, digest: str) -> str:
    return f"{pin_root.rstrip('/')}/{EVAL_SCRATCH_MAP}_{digest}"


# ---------------------------------------------------------------------------- C text
# bpf/gen/layout.h is generated from this module (c_header()) and committed, so that a
# reader (or an editor) of the C finds every map, struct and constant declared; a test
# checks that it is fresh. Regenerate it with `make gen` or
# `python -m cn2mirror.agent.layout --write`.
GENERATED_HEADER = "gen/layout.h"  # under bpf/
# What varies at load time: defined by agent/datapath.py (bpf_source) before the header
# is read; the defaults are for editors and for programs that only read the maps. Each
# map's size is one too (map_entries_define), so that a node can be given another flow
# table size, and tests small maps.
LOAD_TIME_DEFINES = {
    "CN2M_PIN_ROOT": '"/sys/fs/bpf/cn2mirror"',  # where the maps are pinned
    "MAX_FLOW_DESTS": DEFAULT_MAX_FLOW_DESTS,  # copies per flow
    "CN2M_SCRATCH_DIGEST": '"0"',  # datapath.scratch_digest(): names the scratch pin
}


def map_entries_define(name: str) -> str:
    """The macro that sizes map ``name`` in bpf/gen/layout.h."""
    return f"MAP_ENTRIES_{name.upper()}"
_C_TYPES = {C.c_uint8: "__u8", C.c_uint16: "__u16", C.c_uint32: "__u32", C.c_uint64: "__u64"}
# Arrays whose length is the load-time MAX_FLOW_DESTS (see _with_flow_dests).
_FLOW_DESTS_FIELD = "rules"


def _c_elem(ctype) -> str:
    if ctype in _C_TYPES:
        return _C_TYPES[ctype]
    return f"struct {_STRUCT_NAMES[ctype]}"


def _c_field(name: str, ctype, flow_dests_sized: bool) -> str:
    if hasattr(ctype, "_length_"):
        length = "MAX_FLOW_DESTS" if flow_dests_sized and name == _FLOW_DESTS_FIELD \
            else ctype._length_
        return f"{_c_elem(ctype._type_)} {name}[{length}];"
    return f"{_c_elem(ctype)} {name};"


def _c_struct(cname: str, cls) -> str:
    sized = cls in _FLOW_DESTS_SIZED
    body = "\n".join(f"    {_c_field(n, t, sized)}" for n, t in cls._fields_)
    out = f"struct {cname} {{\n{body}\n}};\n"
    if not sized:
        return out + f"_Static_assert(sizeof(struct {cname}) == {C.sizeof(cls)}, " \
            f"\"{cname} layout\");\n"
    # The size follows MAX_FLOW_DESTS: the fields after the array are 8-byte aligned
    # (test_layout_header checks the formula against ctypes for every allowed size).
    off = getattr(cls, _FLOW_DESTS_FIELD).offset
    tail = C.sizeof(cls) - ((off + 4 * DEFAULT_MAX_FLOW_DESTS + 7) // 8) * 8
    return out + f"_Static_assert(sizeof(struct {cname}) == ({off} + 4 * MAX_FLOW_DESTS + 7)" \
        f" / 8 * 8 + {tail}, \"{cname} layout\");\n"


def flow_dests_sized_size(cls, max_flow_dests: int) -> int:
    """The size _c_struct's assertion gives a MAX_FLOW_DESTS-sized struct."""
    off = getattr(cls, _FLOW_DESTS_FIELD).offset
    tail = C.sizeof(cls) - ((off + 4 * DEFAULT_MAX_FLOW_DESTS + 7) // 8) * 8
    return (off + 4 * max_flow_dests + 7) // 8 * 8 + tail


_STRUCT_NAMES = {
    FlowKey: "flow_key",
    FlowEntry: "flow_entry",
    FlowCacheEntry: "flow_cache_entry",
    FlowCacheTags: "flow_cache_tags",
    InterfaceEntry: "iface_entry",
    MatchBits: "match_bits",
    RuleEntry: "rule_entry",
    DestEntry: "dest_entry",
    EncapEntry: "encap_entry",
    Counters: "counters",
    Config: "config",
    AnalyzerKey: "analyzer_key",
    LpmV4Key: "lpm_v4_key",
    LpmV6Key: "lpm_v6_key",
    LpmPortKey: "lpm_port_key",
    PeerConfig: "peer_config_entry",
    Parsed: "parsed",
    EvalScratch: "eval_scratch",
    CsumBuf: "csum_buf",
    EncapBuf: "encap_buf",
    CopyLimits: "copy_limits_entry",
    CopyBudgetClock: "copy_budget_clock",
    RuleSampling: "rule_sampling_entry",
    FlowTableStats: "flow_table_stats",
}
_FLOW_DESTS_SIZED = (FlowEntry, EvalScratch)


def _c_type_name(t) -> str:
    if t in _C_TYPES:
        return _C_TYPES[t]
    for cls in _FLOW_DESTS_SIZED:  # the configured size of a MAX_FLOW_DESTS-sized struct
        if t.__name__ == cls.__name__:
            return f"struct {_STRUCT_NAMES[cls]}"
    return f"struct {_STRUCT_NAMES[t]}"


def c_constants() -> dict[str, object]:
    """Every constant the C uses from here, by its C name."""
    consts: dict[str, object] = {
        "MAX_RULES": MAX_RULES,
        "MAX_INTERFACES": MAX_INTERFACES,
        "MAX_DESTINATIONS": MAX_DESTINATIONS,
        "RULE_WORDS": RULE_WORDS,
        "SUMMARY_WORDS": SUMMARY_WORDS,
        "FLOW_CACHE_BITS": FLOW_CACHE_BITS,
        "FLOW_CACHE_SLOTS": FLOW_CACHE_SLOTS,
        "FLOW_CACHE_KEY_BYTES": FLOW_CACHE_KEY_BYTES,
        "CLONE_TAG": f"{CLONE_TAG:#x}U",
        "CLONE_TAG_MASK": f"{CLONE_TAG_MASK:#x}U",
        "CLONE_IFSLOT_SHIFT": CLONE_IFSLOT_SHIFT,
        "CLONE_IFSLOT_MASK": f"{CLONE_IFSLOT_MASK:#x}",
        "CLONE_RULE_MASK": f"{CLONE_RULE_MASK:#x}",
        "WRAPPED_TAG": f"{WRAPPED_TAG:#x}U",
        "WRAPPED_TRUNCATED_TAG": f"{WRAPPED_TRUNCATED_TAG:#x}U",
        "WRAPPED_SEGMENTS_TAG": f"{WRAPPED_SEGMENTS_TAG:#x}U",
        "WRAPPED_FRAGMENT_TAG": f"{WRAPPED_FRAGMENT_TAG:#x}U",
        "JMIRROR_HEADER_LEN": JMIRROR_HEADER_LEN,
        "COPY_MARK": f"{COPY_MARK:#x}U",
        "JMIRROR_MID_MASK": f"{JMIRROR_MID_MASK:#x}",
        "OUTER_IPV4_OVERHEAD": OUTER_IPV4_OVERHEAD,
        "OUTER_IPV6_OVERHEAD": OUTER_IPV6_OVERHEAD,
        "IFACE_HAS_POLICIES": IFACE_HAS_POLICIES,
        "RULE_MIRRORS": RULE_MIRRORS,
        "RULE_OWN_SAMPLING": RULE_OWN_SAMPLING,
        "FLOW_INITIATOR_LO": FLOW_INITIATOR_LO,
        "FLOW_NEVER_MIRROR": FLOW_NEVER_MIRROR,
        "FLOW_OVERFLOW": FLOW_OVERFLOW,
        "FLOW_RULE_SAMPLED_OUT": f"{FLOW_RULE_SAMPLED_OUT:#x}U",
        "SAMPLE_BY_PACKET": SAMPLE_BY_PACKET,
        "SAMPLE_BY_FLOW": SAMPLE_BY_FLOW,
        "SAMPLE_SEED": f"{SAMPLE_SEED:#x}U",
        "DEST_VTEP_IPV6": DEST_VTEP_IPV6,
        "DEST_SEGMENTS_EXACT": DEST_SEGMENTS_EXACT,
        "DEST_SEGMENTS_FIT": DEST_SEGMENTS_FIT,
        "DEST_FRAGMENT": DEST_FRAGMENT,
        "DEST_GSO_HANDOFF": DEST_GSO_HANDOFF,
        "FAMILY_V4": FAMILY_V4,
        "FAMILY_V6": FAMILY_V6,
        "N_DROPS": N_DROPS,
        "POD_SIDE_CB": POD_SIDE_CB,
        "CLONE_INTO_POD": f"{CLONE_INTO_POD:#x}",
        "ENCAP_TMPL_MAX": ENCAP_TMPL_MAX,
        "ENCAP_VNI_FROM_MID": ENCAP_VNI_FROM_MID,
        "ENCAP_GRE": ENCAP_GRE,
        "ERSPAN_HDR_OFF": ERSPAN_HDR_OFF,
        "GENEVE_OPT_DATA_OFF": GENEVE_OPT_DATA_OFF,
        "VXLAN_VNI_OFF": VXLAN_VNI_OFF,
        "CSUM_CHUNK": CSUM_CHUNK,
        "COPY_LIMITS_NODE": COPY_LIMITS_NODE,
        "BUDGET_COST_SHIFT": BUDGET_COST_SHIFT,
    }
    for enum_cls, prefix in ((Mode, "MODE_"), (Dir, "DIR_"), (Drop, "DROP_"),
                             (EncapFormat, "FORMAT_")):
        consts.update({prefix + m.name: int(m) for m in enum_cls})
    return consts


def _c_map(spec: MapSpec) -> str:
    key, value = _c_type_name(spec.key), _c_type_name(spec.value)
    entries = map_entries_define(spec.name)
    if spec.pin == NOT_PINNED:
        return f'BPF_F_TABLE("{spec.kind}", {key}, {value}, {spec.name}, {entries}, ' \
            f'{spec.flags});'
    path = f'CN2M_PIN_ROOT "/{spec.name}"'
    if spec.pin == PIN_BY_LAYOUT:
        path = f'CN2M_PIN_ROOT "/{spec.name}_" CN2M_SCRATCH_DIGEST'
    flags = f", {spec.flags}" if spec.flags else ""
    return f'BPF_TABLE_PINNED("{spec.kind}", {key}, {value}, {spec.name}, {entries}, ' \
        f'{path}{flags});'


def c_header() -> str:
    """bpf/gen/layout.h: constants, structs and maps (bcc's macros), as C."""
    out = ["/* Generated from agent/layout.py by `python -m cn2mirror.agent.layout --write`"
           " (make gen):",
           " * do not edit. tests/test_layout_header.py checks that it is fresh. */",
           "#ifndef CN2M_GEN_LAYOUT_H", "#define CN2M_GEN_LAYOUT_H", "",
           "#include <linux/types.h>", "",
           "/* Set at load time (agent/datapath.py, bpf_source); these defaults are for"
           " editors. */"]
    for name, default in LOAD_TIME_DEFINES.items():
        out += [f"#ifndef {name}", f"#define {name} {default}", "#endif"]
    for spec in map_specs():
        macro = map_entries_define(spec.name)
        out += [f"#ifndef {macro}", f"#define {macro} {spec.entries}", "#endif"]
    out.append("")
    out += [f"#define {k} {v}" for k, v in c_constants().items()]
    out.append("")
    for cls, cname in _STRUCT_NAMES.items():
        out.append(_c_struct(cname, cls))
    out.append("/* Maps: every one of layout.map_specs(); pinned ones under CN2M_PIN_ROOT. */")
    for spec in map_specs():
        out.append(_c_map(spec))
    out += ["", "#endif /* CN2M_GEN_LAYOUT_H */"]
    return "\n".join(out) + "\n"


def _bpf_dir():
    from importlib import resources

    return resources.files("cn2mirror.bpf")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m cn2mirror.agent.layout",
                                 description="Write or check bpf/gen/layout.h.")
    ap.add_argument("--write", action="store_true", help="(re)write bpf/gen/layout.h")
    ap.add_argument("--check", action="store_true", help="exit 1 when it is stale")
    args = ap.parse_args(argv)
    target = _bpf_dir() / GENERATED_HEADER
    text = c_header()
    if args.write:
        with open(str(target), "w") as f:
            f.write(text)
        print(f"wrote {target}")
        return 0
    if args.check:
        fresh = target.is_file() and target.read_text() == text
        if not fresh:
            print(f"{target} is stale: run make gen", file=sys.stderr)
        return 0 if fresh else 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
