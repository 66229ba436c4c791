/* Generated from agent/layout.py by `python -m cn2mirror.agent.layout --write` (make gen):
 * do not edit. tests/test_layout_header.py checks that it is fresh. */
#ifndef CN2M_GEN_LAYOUT_H
#define CN2M_GEN_LAYOUT_H

#include <linux/types.h>

/* Set at load time (agent/datapath.py, bpf_source); these defaults are for editors. */
#ifndef CN2M_PIN_ROOT
#define CN2M_PIN_ROOT "/sys/fs/bpf/cn2mirror"
#endif
#ifndef MAX_FLOW_DESTS
#define MAX_FLOW_DESTS 4
#endif
#ifndef CN2M_SCRATCH_DIGEST
#define CN2M_SCRATCH_DIGEST "0"
#endif
#ifndef MAP_ENTRIES_CONFIG
#define MAP_ENTRIES_CONFIG 1
#endif
#ifndef MAP_ENTRIES_INTERFACES
#define MAP_ENTRIES_INTERFACES 4096
#endif
#ifndef MAP_ENTRIES_SESSIONS
#define MAP_ENTRIES_SESSIONS 4096
#endif
#ifndef MAP_ENTRIES_RULES
#define MAP_ENTRIES_RULES 16384
#endif
#ifndef MAP_ENTRIES_DESTINATIONS
#define MAP_ENTRIES_DESTINATIONS 256
#endif
#ifndef MAP_ENTRIES_ENCAPS
#define MAP_ENTRIES_ENCAPS 256
#endif
#ifndef MAP_ENTRIES_FLOWS
#define MAP_ENTRIES_FLOWS 131072
#endif
#ifndef MAP_ENTRIES_FLOW_CACHE
#define MAP_ENTRIES_FLOW_CACHE 4096
#endif
#ifndef MAP_ENTRIES_FLOW_CACHE_TAGS
#define MAP_ENTRIES_FLOW_CACHE_TAGS 1
#endif
#ifndef MAP_ENTRIES_SRC_V4
#define MAP_ENTRIES_SRC_V4 65536
#endif
#ifndef MAP_ENTRIES_DST_V4
#define MAP_ENTRIES_DST_V4 65536
#endif
#ifndef MAP_ENTRIES_SRC_V6
#define MAP_ENTRIES_SRC_V6 65536
#endif
#ifndef MAP_ENTRIES_DST_V6
#define MAP_ENTRIES_DST_V6 65536
#endif
#ifndef MAP_ENTRIES_PORTS
#define MAP_ENTRIES_PORTS 65536
#endif
#ifndef MAP_ENTRIES_ANALYZERS
#define MAP_ENTRIES_ANALYZERS 512
#endif
#ifndef MAP_ENTRIES_STATS_RULE
#define MAP_ENTRIES_STATS_RULE 16384
#endif
#ifndef MAP_ENTRIES_STATS_IFACE
#define MAP_ENTRIES_STATS_IFACE 4096
#endif
#ifndef MAP_ENTRIES_STATS_DEST
#define MAP_ENTRIES_STATS_DEST 256
#endif
#ifndef MAP_ENTRIES_STATS_NODE
#define MAP_ENTRIES_STATS_NODE 1
#endif
#ifndef MAP_ENTRIES_FLOW_TABLE_STATS
#define MAP_ENTRIES_FLOW_TABLE_STATS 1
#endif
#ifndef MAP_ENTRIES_EVAL_PROGS
#define MAP_ENTRIES_EVAL_PROGS 1
#endif
#ifndef MAP_ENTRIES_PEER_PROGS
#define MAP_ENTRIES_PEER_PROGS 1
#endif
#ifndef MAP_ENTRIES_PEER_CONFIG
#define MAP_ENTRIES_PEER_CONFIG 1
#endif
#ifndef MAP_ENTRIES_EVAL_SCRATCH_MAP
#define MAP_ENTRIES_EVAL_SCRATCH_MAP 1
#endif
#ifndef MAP_ENTRIES_CSUM_SCRATCH
#define MAP_ENTRIES_CSUM_SCRATCH 1
#endif
#ifndef MAP_ENTRIES_ENCAP_SCRATCH
#define MAP_ENTRIES_ENCAP_SCRATCH 1
#endif
#ifndef MAP_ENTRIES_COPY_LIMITS
#define MAP_ENTRIES_COPY_LIMITS 256
#endif
#ifndef MAP_ENTRIES_COPY_BUDGET
#define MAP_ENTRIES_COPY_BUDGET 256
#endif
#ifndef MAP_ENTRIES_RULE_SAMPLING
#define MAP_ENTRIES_RULE_SAMPLING 16384
#endif

#define MAX_RULES 16384
#define MAX_INTERFACES 4096
#define MAX_DESTINATIONS 256
#define RULE_WORDS 256
#define SUMMARY_WORDS 4
#define FLOW_CACHE_BITS 12
#define FLOW_CACHE_SLOTS 4096
#define FLOW_CACHE_KEY_BYTES 48
#define CLONE_TAG 0xc0000000U
#define CLONE_TAG_MASK 0xf0000000U
#define CLONE_IFSLOT_SHIFT 16
#define CLONE_IFSLOT_MASK 0xfff
#define CLONE_RULE_MASK 0xffff
#define WRAPPED_TAG 0xd0000000U
#define WRAPPED_TRUNCATED_TAG 0xe0000000U
#define WRAPPED_SEGMENTS_TAG 0xf0000000U
#define WRAPPED_FRAGMENT_TAG 0xb0000000U
#define JMIRROR_HEADER_LEN 8
#define COPY_MARK 0x4a4d4952U
#define JMIRROR_MID_MASK 0x3fffffff
#define OUTER_IPV4_OVERHEAD 36
#define OUTER_IPV6_OVERHEAD 56
#define IFACE_HAS_POLICIES 1
#define RULE_MIRRORS 1
#define RULE_OWN_SAMPLING 2
#define FLOW_INITIATOR_LO 1
#define FLOW_NEVER_MIRROR 2
#define FLOW_OVERFLOW 4
#define FLOW_RULE_SAMPLED_OUT 0x80000000U
#define SAMPLE_BY_PACKET 0
#define SAMPLE_BY_FLOW 1
#define SAMPLE_SEED 0x636e326dU
#define DEST_VTEP_IPV6 1
#define DEST_SEGMENTS_EXACT 2
#define DEST_SEGMENTS_FIT 4
#define DEST_FRAGMENT 8
#define DEST_GSO_HANDOFF 16
#define FAMILY_V4 4
#define FAMILY_V6 6
#define N_DROPS 10
#define POD_SIDE_CB 3
#define CLONE_INTO_POD 0x8000
#define ENCAP_TMPL_MAX 128
#define ENCAP_VNI_FROM_MID 1
#define ENCAP_GRE 2
#define ERSPAN_HDR_OFF 28
#define GENEVE_OPT_DATA_OFF 40
#define VXLAN_VNI_OFF 32
#define CSUM_CHUNK 512
#define COPY_LIMITS_NODE 0
#define BUDGET_COST_SHIFT 16
#define MODE_NONE 0
#define MODE_JMIRROR4 1
#define MODE_JMIRROR6 2
#define MODE_L2 3
#define MODE_VXLAN 4
#define MODE_VLAN 5
#define MODE_ENCAP4 6
#define DIR_EGRESS 0
#define DIR_INGRESS 1
#define DROP_CLONE_FAILED 0
#define DROP_FLOW_LIMIT 1
#define DROP_NO_DESTINATION 2
#define DROP_NO_ROUTE 3
#define DROP_NOT_IP 4
#define DROP_WRAP_FAILED 5
#define DROP_REDIRECT_FAILED 6
#define DROP_FOREIGN 7
#define DROP_RX_BLOCKED 8
#define DROP_RATE_LIMITED 9
#define FORMAT_ERSPAN2 1
#define FORMAT_ERSPAN3 2
#define FORMAT_GRE 3
#define FORMAT_GENEVE 4
#define FORMAT_VXLAN 5
#define FORMAT_CONTRAIL 6

struct flow_key {
    __u32 addr_lo[4];
    __u32 addr_hi[4];
    __u16 port_lo;
    __u16 port_hi;
    __u8 proto;
    __u8 family;
    __u16 ifslot;
};
_Static_assert(sizeof(struct flow_key) == 40, "flow_key layout");

struct flow_entry {
    __u32 generation;
    __u8 n_rules;
    __u8 flags;
    __u16 pad;
    __u32 rules[MAX_FLOW_DESTS];
    __u64 packets;
    __u64 bytes;
    __u64 first_seen_ns;
    __u64 last_seen_ns;
};
_Static_assert(sizeof(struct flow_entry) == (8 + 4 * MAX_FLOW_DESTS + 7) / 8 * 8 + 32, "flow_entry layout");

struct flow_cache_entry {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;
    __u16 dport;
    __u32 ifindex;
    __u8 proto;
    __u8 family;
    __u8 dir;
    __u8 pad;
    __u32 generation;
    __u32 tick;
    __u32 port_rule;
    __u16 ifslot;
    __u16 pad2;
    __u32 pad3;
};
_Static_assert(sizeof(struct flow_cache_entry) == 64, "flow_cache_entry layout");

struct flow_cache_tags {
    __u16 tag[4096];
};
_Static_assert(sizeof(struct flow_cache_tags) == 8192, "flow_cache_tags layout");

struct iface_entry {
    __u16 ifslot;
    __u16 flags;
    __u32 session_id;
    __u32 port_rule[2];
    __u64 summary[4];
    __u64 bits[256];
};
_Static_assert(sizeof(struct iface_entry) == 2096, "iface_entry layout");

struct match_bits {
    __u64 summary[4];
    __u64 bits[256];
};
_Static_assert(sizeof(struct match_bits) == 2080, "match_bits layout");

struct rule_entry {
    __u32 mirror_id;
    __u16 dest;
    __u16 flags;
    __u32 policy_end;
};
_Static_assert(sizeof(struct rule_entry) == 12, "rule_entry layout");

struct dest_entry {
    __u8 mode;
    __u8 flags;
    __u16 udp_port;
    __u16 vlan_id;
    __u16 pad;
    __u32 vni;
    __u32 out_ifindex;
    __u32 mtu;
    __u32 src_addr[4];
    __u32 dst_addr[4];
    __u8 mac[6];
    __u8 pad2[2];
};
_Static_assert(sizeof(struct dest_entry) == 60, "dest_entry layout");

struct encap_entry {
    __u8 format;
    __u8 flags;
    __u16 hdr_len;
    __u32 pad;
    __u8 tmpl[128];
};
_Static_assert(sizeof(struct encap_entry) == 136, "encap_entry layout");

struct counters {
    __u64 cloned;
    __u64 packets;
    __u64 bytes;
    __u64 truncated;
    __u64 drops[10];
    __u64 fragmented;
    __u64 gso_wrapped;
    __u64 gso_by_segment;
    __u64 sampled_out;
};
_Static_assert(sizeof(struct counters) == 144, "counters layout");

struct config {
    __u32 generation;
    __u32 mirror_ifindex;
    __u32 flags;
    __u32 sample_seed;
};
_Static_assert(sizeof(struct config) == 16, "config layout");

struct analyzer_key {
    __u32 addr[4];
    __u16 port;
    __u8 family;
    __u8 pad;
};
_Static_assert(sizeof(struct analyzer_key) == 20, "analyzer_key layout");

struct lpm_v4_key {
    __u32 prefixlen;
    __u8 addr[4];
};
_Static_assert(sizeof(struct lpm_v4_key) == 8, "lpm_v4_key layout");

struct lpm_v6_key {
    __u32 prefixlen;
    __u8 addr[16];
};
_Static_assert(sizeof(struct lpm_v6_key) == 20, "lpm_v6_key layout");

struct lpm_port_key {
    __u32 prefixlen;
    __u8 data[3];
};
_Static_assert(sizeof(struct lpm_port_key) == 8, "lpm_port_key layout");

struct peer_config_entry {
    __u64 secret;
};
_Static_assert(sizeof(struct peer_config_entry) == 8, "peer_config_entry layout");

struct parsed {
    struct flow_key key;
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;
    __u16 dport;
    __u8 proto;
    __u8 family;
    __u8 tcp_syn_only;
    __u8 ok;
    __u8 src_is_lo;
    __u8 quoted_udp;
    __u16 quoted_dport;
    __u32 quoted_dst[4];
};
_Static_assert(sizeof(struct parsed) == 100, "parsed layout");

struct eval_scratch {
    struct parsed p;
    __u32 ifindex;
    __u32 orientation;
    __u32 started;
    __u32 never;
    __u64 cand[4];
    __u64 cur;
    __u64 bits;
    __u32 sw;
    __u32 word;
    __u32 skip_below;
    __u32 n;
    __u32 overflow;
    __u32 generation;
    __u32 had_old;
    __u32 rules[MAX_FLOW_DESTS];
    __u64 peer_secret;
};
_Static_assert(sizeof(struct eval_scratch) == (196 + 4 * MAX_FLOW_DESTS + 7) / 8 * 8 + 8, "eval_scratch layout");

struct csum_buf {
    __u8 b[520];
};
_Static_assert(sizeof(struct csum_buf) == 520, "csum_buf layout");

struct encap_buf {
    __u8 b[144];
};
_Static_assert(sizeof(struct encap_buf) == 144, "encap_buf layout");

struct copy_limits_entry {
    __u32 sample_every;
    __u16 snap_length;
    __u8 sample_by;
    __u8 pad;
    __u64 packet_cost;
    __u64 byte_cost;
    __u64 burst_ns;
};
_Static_assert(sizeof(struct copy_limits_entry) == 32, "copy_limits_entry layout");

struct copy_budget_clock {
    __u64 packet_ns;
    __u64 byte_ns;
};
_Static_assert(sizeof(struct copy_budget_clock) == 16, "copy_budget_clock layout");

struct rule_sampling_entry {
    __u32 sample_every;
    __u8 sample_by;
    __u8 pad[3];
};
_Static_assert(sizeof(struct rule_sampling_entry) == 8, "rule_sampling_entry layout");

struct flow_table_stats {
    __u64 created;
};
_Static_assert(sizeof(struct flow_table_stats) == 8, "flow_table_stats layout");

/* Maps: every one of layout.map_specs(); pinned ones under CN2M_PIN_ROOT. */
BPF_TABLE_PINNED("array", __u32, struct config, config, MAP_ENTRIES_CONFIG, CN2M_PIN_ROOT "/config");
BPF_TABLE_PINNED("hash", __u32, struct iface_entry, interfaces, MAP_ENTRIES_INTERFACES, CN2M_PIN_ROOT "/interfaces");
BPF_TABLE_PINNED("array", __u32, __u32, sessions, MAP_ENTRIES_SESSIONS, CN2M_PIN_ROOT "/sessions");
BPF_TABLE_PINNED("array", __u32, struct rule_entry, rules, MAP_ENTRIES_RULES, CN2M_PIN_ROOT "/rules");
BPF_TABLE_PINNED("array", __u32, struct dest_entry, destinations, MAP_ENTRIES_DESTINATIONS, CN2M_PIN_ROOT "/destinations");
BPF_TABLE_PINNED("array", __u32, struct encap_entry, encaps, MAP_ENTRIES_ENCAPS, CN2M_PIN_ROOT "/encaps");
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_entry, flows, MAP_ENTRIES_FLOWS, CN2M_PIN_ROOT "/flows");
BPF_TABLE_PINNED("percpu_array", __u32, struct flow_cache_entry, flow_cache, MAP_ENTRIES_FLOW_CACHE, CN2M_PIN_ROOT "/flow_cache");
BPF_TABLE_PINNED("percpu_array", __u32, struct flow_cache_tags, flow_cache_tags, MAP_ENTRIES_FLOW_CACHE_TAGS, CN2M_PIN_ROOT "/flow_cache_tags");
BPF_TABLE_PINNED("lpm_trie", struct lpm_v4_key, struct match_bits, src_v4, MAP_ENTRIES_SRC_V4, CN2M_PIN_ROOT "/src_v4", 1);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v4_key, struct match_bits, dst_v4, MAP_ENTRIES_DST_V4, CN2M_PIN_ROOT "/dst_v4", 1);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v6_key, struct match_bits, src_v6, MAP_ENTRIES_SRC_V6, CN2M_PIN_ROOT "/src_v6", 1);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v6_key, struct match_bits, dst_v6, MAP_ENTRIES_DST_V6, CN2M_PIN_ROOT "/dst_v6", 1);
BPF_TABLE_PINNED("lpm_trie", struct lpm_port_key, struct match_bits, ports, MAP_ENTRIES_PORTS, CN2M_PIN_ROOT "/ports", 1);
BPF_TABLE_PINNED("hash", struct analyzer_key, __u8, analyzers, MAP_ENTRIES_ANALYZERS, CN2M_PIN_ROOT "/analyzers");
BPF_TABLE_PINNED("percpu_array", __u32, struct counters, stats_rule, MAP_ENTRIES_STATS_RULE, CN2M_PIN_ROOT "/stats_rule");
BPF_TABLE_PINNED("percpu_array", __u32, struct counters, stats_iface, MAP_ENTRIES_STATS_IFACE, CN2M_PIN_ROOT "/stats_iface");
BPF_TABLE_PINNED("percpu_array", __u32, struct counters, stats_dest, MAP_ENTRIES_STATS_DEST, CN2M_PIN_ROOT "/stats_dest");
BPF_TABLE_PINNED("percpu_array", __u32, struct counters, stats_node, MAP_ENTRIES_STATS_NODE, CN2M_PIN_ROOT "/stats_node");
BPF_TABLE_PINNED("percpu_array", __u32, struct flow_table_stats, flow_table_stats, MAP_ENTRIES_FLOW_TABLE_STATS, CN2M_PIN_ROOT "/flow_table_stats");
BPF_TABLE_PINNED("prog", __u32, __u32, eval_progs, MAP_ENTRIES_EVAL_PROGS, CN2M_PIN_ROOT "/eval_progs");
BPF_TABLE_PINNED("prog", __u32, __u32, peer_progs, MAP_ENTRIES_PEER_PROGS, CN2M_PIN_ROOT "/peer_progs");
BPF_TABLE_PINNED("array", __u32, struct peer_config_entry, peer_config, MAP_ENTRIES_PEER_CONFIG, CN2M_PIN_ROOT "/peer_config");
BPF_TABLE_PINNED("percpu_array", __u32, struct eval_scratch, eval_scratch_map, MAP_ENTRIES_EVAL_SCRATCH_MAP, CN2M_PIN_ROOT "/eval_scratch_map_" CN2M_SCRATCH_DIGEST);
BPF_F_TABLE("percpu_array", __u32, struct csum_buf, csum_scratch, MAP_ENTRIES_CSUM_SCRATCH, 0);
BPF_F_TABLE("percpu_array", __u32, struct encap_buf, encap_scratch, MAP_ENTRIES_ENCAP_SCRATCH, 0);
BPF_TABLE_PINNED("array", __u32, struct copy_limits_entry, copy_limits, MAP_ENTRIES_COPY_LIMITS, CN2M_PIN_ROOT "/copy_limits");
BPF_TABLE_PINNED("array", __u32, struct copy_budget_clock, copy_budget, MAP_ENTRIES_COPY_BUDGET, CN2M_PIN_ROOT "/copy_budget");
BPF_TABLE_PINNED("array", __u32, struct rule_sampling_entry, rule_sampling, MAP_ENTRIES_RULE_SAMPLING, CN2M_PIN_ROOT "/rule_sampling");

#endif /* CN2M_GEN_LAYOUT_H */
