/* Flows: the canonical key both directions of a connection share, and the streams of
 * copies (to an analyzer) that are never mirrored themselves. */
#ifndef CN2M_LIB_FLOW_H
#define CN2M_LIB_FLOW_H

#include "lib/common.h"

/* Fill the canonical key: both directions of a connection give the same key. */
static __always_inline void make_key(struct parsed *p, __u16 ifslot)
{
    int src_lower = 0;
    int decided = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (!decided && p->src[i] != p->dst[i]) {
            src_lower = bpf_ntohl(p->src[i]) < bpf_ntohl(p->dst[i]);
            decided = 1;
        }
    }
    if (!decided)
        src_lower = bpf_ntohs(p->sport) <= bpf_ntohs(p->dport);
    struct flow_key *k = &p->key;
    p->src_is_lo = src_lower;
    if (src_lower) {
        __builtin_memcpy(k->addr_lo, p->src, 16);
        __builtin_memcpy(k->addr_hi, p->dst, 16);
        k->port_lo = p->sport;
        k->port_hi = p->dport;
    } else {
        __builtin_memcpy(k->addr_lo, p->dst, 16);
        __builtin_memcpy(k->addr_hi, p->src, 16);
        k->port_lo = p->dport;
        k->port_hi = p->sport;
    }
    k->proto = p->proto;
    k->family = p->family;
    k->ifslot = ifslot;
}

/* Copies on their way to an analyzer, and the analyzer's ICMP errors about them. */
static __always_inline int is_copy_stream(struct parsed *p)
{
    struct analyzer_key k = {.family = p->family};
    if (p->proto == IPPROTO_UDP) {
        k.port = p->dport;
        __builtin_memcpy(k.addr, p->dst, 16);
    } else if (p->quoted_udp) {
        k.port = p->quoted_dport;
        __builtin_memcpy(k.addr, p->quoted_dst, 16);
    } else {
        return 0;
    }
    return analyzers.lookup(&k) != NULL;
}

#endif /* CN2M_LIB_FLOW_H */
