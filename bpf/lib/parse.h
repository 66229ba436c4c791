/* Parsing a packet on a pod interface into struct parsed (addresses, ports, protocol),
 * through up to two VLAN tags and six IPv6 extension headers. Never writes the packet. */
#ifndef CN2M_LIB_PARSE_H
#define CN2M_LIB_PARSE_H

#include "lib/common.h"

/* Returns a pointer to len bytes at off: straight into the packet when they are in the
 * linear area, else copied into buf. NULL when the packet is shorter. */
static __always_inline void *header(struct __sk_buff *skb, __u32 off, void *buf, __u32 len)
{
    void *data = CTX_LOAD(skb, data);
    void *data_end = CTX_LOAD(skb, data_end);
    if (off > 0xFFFF)
        return NULL;
    if (data + off + len <= data_end)
        return data + off;
    if (bpf_skb_load_bytes(skb, off, buf, len) < 0)
        return NULL;
    return buf;
}

static __always_inline int is_ipv6_ext(__u8 nh)
{
    return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
           nh == IPPROTO_FRAGMENT || nh == IPPROTO_AH;
}

/* An ICMP error quotes the packet it answers. When that packet was a UDP datagram, note
 * where it went: an error about a copy sent to an analyzer is part of the copy stream. */
static __always_inline void parse_quoted(struct __sk_buff *skb, __u32 off, struct parsed *p)
{
    __u8 buf[44];
    if (p->family == FAMILY_V4) {
        struct iphdr *ip = header(skb, off, buf, sizeof(*ip));
        if (!ip || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
            return;
        p->quoted_dst[0] = ip->daddr;
        __u16 *ports = header(skb, off + ip->ihl * 4, buf, 4);
        if (!ports)
            return;
        p->quoted_dport = ports[1];
        p->quoted_udp = 1;
    } else {
        __u8 *ip6 = header(skb, off, buf, 44);
        if (!ip6 || ip6[6] != IPPROTO_UDP)
            return;
        __builtin_memcpy(p->quoted_dst, &ip6[24], 16);
        p->quoted_dport = *(__u16 *)&ip6[42];
        p->quoted_udp = 1;
    }
}

/* Ports of TCP, UDP and SCTP (same place), ICMP echo identifiers as both ports (so the
 * request and its reply share a flow); zero for everything else. */
static __always_inline void parse_l4(struct __sk_buff *skb, __u32 off, struct parsed *p)
{
    __u8 buf[14];
    if (p->proto == IPPROTO_TCP) {
        __u8 *h = header(skb, off, buf, 14);
        if (!h)
            return;
        p->sport = *(__u16 *)&h[0];
        p->dport = *(__u16 *)&h[2];
        p->tcp_syn_only = (h[13] & 0x12) == 0x02;
    } else if (p->proto == IPPROTO_UDP || p->proto == IPPROTO_SCTP ||
               p->proto == IPPROTO_UDPLITE) {
        __u8 *h = header(skb, off, buf, 4);
        if (!h)
            return;
        p->sport = *(__u16 *)&h[0];
        p->dport = *(__u16 *)&h[2];
    } else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
        __u8 *h = header(skb, off, buf, 6);
        if (!h)
            return;
        __u8 type = h[0];
        if ((p->proto == IPPROTO_ICMP && (type == 8 || type == 0)) ||
            (p->proto == IPPROTO_ICMPV6 && (type == 128 || type == 129))) {
            p->sport = *(__u16 *)&h[4];
            p->dport = p->sport;
        } else if ((p->proto == IPPROTO_ICMP && (type == 3 || type == 11 || type == 12)) ||
                   (p->proto == IPPROTO_ICMPV6 && type >= 1 && type <= 4)) {
            parse_quoted(skb, off + 8, p);
        }
    }
}

static __always_inline void parse(struct __sk_buff *skb, struct parsed *p)
{
    __u8 buf[40];
    __u32 off = ETH_HLEN;
    __u16 *eth_proto = header(skb, 12, buf, 2);
    if (!eth_proto)
        return;
    __u16 proto = *eth_proto;  /* the frame's own type (an offloaded VLAN tag is not in it) */
    /* Up to two VLAN tags in the packet itself (offloaded tags are not in the data). */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
            break;
        __u16 *inner = header(skb, off + 2, buf, 2);
        if (!inner)
            return;
        proto = *inner;
        off += 4;
    }

    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = header(skb, off, buf, sizeof(*ip));
        if (!ip || ip->version != 4 || ip->ihl < 5)
            return;
        p->family = FAMILY_V4;
        p->proto = ip->protocol;
        p->src[0] = ip->saddr;
        p->dst[0] = ip->daddr;
        p->ok = 1;
        /* A non-first fragment has no ports: it is evaluated with ports 0 (it matches
         * rules without port restrictions) and forms its own flow entry. */
        if (ip->frag_off & bpf_htons(0x1FFF))
            return;
        parse_l4(skb, off + ip->ihl * 4, p);
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = header(skb, off, buf, sizeof(*ip6));
        if (!ip6 || ip6->version != 6)
            return;
        p->family = FAMILY_V6;
        __builtin_memcpy(p->src, &ip6->saddr, 16);
        __builtin_memcpy(p->dst, &ip6->daddr, 16);
        p->ok = 1;
        __u8 nh = ip6->nexthdr;
        off += sizeof(*ip6);
        /* Walk up to six extension headers to the transport header. */
#pragma unroll
        for (int i = 0; i < 6; i++) {
            if (!is_ipv6_ext(nh))
                break;
            __u8 *ext = header(skb, off, buf, 8);
            if (!ext) {
                nh = IPPROTO_NONE;
                break;
            }
            if (nh == IPPROTO_FRAGMENT) {
                __u16 frag = *(__u16 *)&ext[2];
                nh = ext[0];
                off += 8;
                if (frag & bpf_htons(0xFFF8)) {  /* non-first fragment: no ports */
                    p->proto = nh;
                    return;
                }
                continue;
            }
            __u32 len = nh == IPPROTO_AH ? (ext[1] + 2) * 4 : (ext[1] + 1) * 8;
            nh = ext[0];
            off += len;
        }
        p->proto = nh;
        if (!is_ipv6_ext(nh))
            parse_l4(skb, off, p);
    }
}

#endif /* CN2M_LIB_PARSE_H */
