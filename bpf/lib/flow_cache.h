/* The per-CPU flow cache in front of the flow table (flow_cache, flow_cache_tags). */
#ifndef CN2M_LIB_FLOW_CACHE_H
#define CN2M_LIB_FLOW_CACHE_H

#include "lib/common.h"
#include "lib/parse.h"

/* A per-CPU, direct-mapped cache in front of the flow table for established flows that
 * are mirrored by no rule (FlowCacheEntry in agent/layout.py): a hit is two inlined
 * array lookups and a few compares, no hash table, no interface lookup, no clock.
 *
 * - Filled only from a flow-table hit with a current verdict and no copies (the flow's
 *   second packet in a direction, or later): a flow's first packet pays no fill, and
 *   flows with copies always reach the flow table, which counts their packets.
 * - The key holds the generation: after a policy change no slot matches.
 * - A slot serves for the jiffy it was filled in; the flow's first packet in a later
 *   jiffy takes the full path again, which refreshes the flow entry's last_seen_ns (as
 *   coarse as before: the coarse clock ticks in jiffies) and its LRU age, re-checks the
 *   verdict, and fills the slot again.
 * - Only plain packets have a probe: TCP (not a bare SYN: that opens a flow) or UDP in
 *   IPv4 without options or IPv6 without extension headers, no VLAN tag in the data,
 *   the transport header as far as parse_l4() reads it in the linear area. The probe is
 *   then what the full parse reads (probe_is() checks it before a fill), so a hit gives
 *   the verdict the flow table gives. Any other packet takes the full path. */
union cache_probe {
    struct flow_cache_entry e;
    __u64 w[8];  /* w[0..5]: the compared key (FLOW_CACHE_KEY_BYTES) */
};

static __always_inline int cache_probe(struct __sk_buff *skb, union cache_probe *k,
                                       __u64 w4, __u64 w5)
{
    void *data = CTX_LOAD(skb, data);
    void *data_end = CTX_LOAD(skb, data_end);
    if (data + ETH_HLEN > data_end)
        return 0;
    __u16 eth_proto = *(__u16 *)(data + 12);
    __u8 *l4;
    __u8 proto;
    if (eth_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + ETH_HLEN;
        if ((void *)(ip + 1) > data_end)
            return 0;
        if (*(__u8 *)ip != 0x45 || (ip->frag_off & bpf_htons(0x1FFF)))
            return 0;
        proto = ip->protocol;
        k->w[0] = ip->saddr;
        k->w[1] = 0;
        k->w[2] = ip->daddr;
        k->w[3] = 0;
        w5 |= (__u64)FAMILY_V4 << 8;
        l4 = (void *)(ip + 1);
    } else if (eth_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + ETH_HLEN;
        if ((void *)(ip6 + 1) > data_end)
            return 0;
        if ((*(__u8 *)ip6 >> 4) != 6)
            return 0;
        proto = ip6->nexthdr;
        __u64 *a = (__u64 *)&ip6->saddr;
        k->w[0] = a[0];
        k->w[1] = a[1];
        k->w[2] = a[2];
        k->w[3] = a[3];
        w5 |= (__u64)FAMILY_V6 << 8;
        l4 = (void *)(ip6 + 1);
    } else {
        return 0;
    }
    if (proto == IPPROTO_TCP) {
        if ((void *)(l4 + 14) > data_end)
            return 0;
        /* A SYN without ACK opens a flow: nothing to find here, take the full path. */
        if ((l4[13] & 0x12) == 0x02)
            return 0;
    } else if (proto == IPPROTO_UDP) {
        if ((void *)(l4 + 4) > data_end)
            return 0;
    } else {
        return 0;
    }
    k->w[4] = w4 | *(__u32 *)l4;  /* the ports; the interface above them */
    k->w[5] = w5 | proto;
    return 1;
}

/* The probe's hash: the slot is its top FLOW_CACHE_BITS bits, the tag (never 0) 16 bits
 * from its middle. Keep in step with flow_cache_hash() in agent/layout.py. */
static __always_inline __u64 flow_cache_hash(union cache_probe *k)
{
    __u64 h = (k->w[0] ^ k->w[1]) * 0x9E3779B97F4A7C15ULL;
    h = (h ^ k->w[2] ^ k->w[3]) * 0xC2B2AE3D27D4EB4FULL;
    return (h ^ k->w[4] ^ (__u32)k->w[5]) * 0x165667B19E3779F9ULL;
}

#define CACHE_SLOT(h) ((__u32)((h) >> (64 - FLOW_CACHE_BITS)))
#define CACHE_TAG(h) ((__u16)((h) >> 32) | 1)

/* The first FLOW_CACHE_KEY_BYTES (addresses, ports, interface, protocol, direction and
 * generation) are equal. */
static __always_inline int cache_same(struct flow_cache_entry *c, union cache_probe *k)
{
    __u64 *a = (__u64 *)c, *b = k->w;
    return !((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) |
             (a[4] ^ b[4]) | (a[5] ^ b[5]));
}

/* The full parse read the same flow as the probe (a safety net: then a hit and the flow
 * table give the same verdict). */
static __always_inline int probe_is(union cache_probe *u, struct parsed *p)
{
    struct flow_cache_entry *k = &u->e;
    __u32 d = 0;
#pragma unroll
    for (int i = 0; i < 4; i++)
        d |= (k->src[i] ^ p->src[i]) | (k->dst[i] ^ p->dst[i]);
    return p->ok && !d && k->sport == p->sport && k->dport == p->dport &&
           k->proto == p->proto && k->family == p->family;
}

static __always_inline void cache_fill(union cache_probe *k, __u64 h, __u32 port_rule,
                                       __u16 ifslot)
{
    __u32 slot = CACHE_SLOT(h);
    __u32 zero = 0;
    struct flow_cache_entry *c = flow_cache.lookup(&slot);
    struct flow_cache_tags *t = flow_cache_tags.lookup(&zero);
    if (!c || !t)
        return;
    k->e.port_rule = port_rule;
    k->e.ifslot = ifslot;
    *c = k->e;
    t->tag[slot & (FLOW_CACHE_SLOTS - 1)] = CACHE_TAG(h);
}

#endif /* CN2M_LIB_FLOW_CACHE_H */
