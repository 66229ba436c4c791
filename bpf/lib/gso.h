/* GSO super-packets and copies the kernel must still finish (segmentation, checksums). */
#ifndef CN2M_LIB_GSO_H
#define CN2M_LIB_GSO_H

#include "lib/common.h"
#include "lib/csum.h"

/* Length of the inner IP and TCP/UDP headers of a GSO super-packet (the part the kernel
 * repeats in every segment), or 0 when they cannot be read. */
static __always_inline __u32 gso_header_len(struct __sk_buff *skb, __u16 proto)
{
    __u32 l3 = 0;
    __u8 l4 = 0;
    if (proto == bpf_htons(ETH_P_IP)) {
        __u8 vihl = 0;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0 ||
            bpf_skb_load_bytes(skb, ETH_HLEN + 9, &l4, 1) < 0)
            return 0;
        l3 = (vihl & 0xF) * 4;
    } else {
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &l4, 1) < 0)
            return 0;
        l3 = sizeof(struct ipv6hdr);
    }
    if (l4 == IPPROTO_UDP)
        return l3 + sizeof(struct udphdr);
    if (l4 != IPPROTO_TCP)
        return 0;
    __u8 doff = 0;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + (l3 & 0x3C) + 12, &doff, 1) < 0)
        return 0;
    return l3 + (doff >> 4) * 4;
}

/* Bytes a wrapped super-packet repeats in each of its segments: Ethernet, outer IPv4,
 * UDP, jmirror, inner IP and TCP/UDP headers. */
static __always_inline __u32 gso_header_len_outer(struct __sk_buff *skb)
{
    __u8 v = 0;
    __u32 off = ETH_HLEN + OUTER_IPV4_OVERHEAD;
    if (bpf_skb_load_bytes(skb, off, &v, 1) < 0)
        return off;
    __u16 proto = (v >> 4) == 6 ? bpf_htons(ETH_P_IPV6) : bpf_htons(ETH_P_IP);
    /* gso_header_len reads from ETH_HLEN on: read the inner headers at their place. */
    __u32 l3 = 0;
    __u8 l4 = 0;
    if (proto == bpf_htons(ETH_P_IP)) {
        l3 = (v & 0xF) * 4;
        if (bpf_skb_load_bytes(skb, off + 9, &l4, 1) < 0)
            return off;
    } else {
        l3 = sizeof(struct ipv6hdr);
        if (bpf_skb_load_bytes(skb, off + 6, &l4, 1) < 0)
            return off;
    }
    if (l4 == IPPROTO_UDP)
        return off + l3 + sizeof(struct udphdr);
    __u8 doff = 0;
    if (bpf_skb_load_bytes(skb, off + (l3 & 0x3C) + 12, &doff, 1) < 0)
        return off + l3;
    return off + l3 + (doff >> 4) * 4;
}

/* Whether a copy must go through the port for the kernel to finish it (segmentation,
 * checksums). Anything this does not understand takes the port: the safe way. */
static __always_inline int needs_kernel_finish(struct __sk_buff *skb)
{
    if (skb->gso_size)
        return 1;
    __u16 proto = 0;
    if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
        return 1;
    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
            return 1;
        if (ip.frag_off & bpf_htons(0x3FFF))  /* more fragments, or an offset */
            return 0;  /* fragments never carry an unfinished checksum */
        __u32 hlen = ip.ihl * 4;
        __u32 sum = (ip.saddr & 0xFFFF) + (ip.saddr >> 16) + (ip.daddr & 0xFFFF) +
                    (ip.daddr >> 16);
        return l4_csum_unfinished(skb, ETH_HLEN + hlen, ip.protocol, sum,
                                  bpf_ntohs(ip.tot_len) - hlen);
    }
    if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
            return 1;
        __u8 nh = ip6.nexthdr;
        if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_FRAGMENT ||
            nh == IPPROTO_DSTOPTS || nh == IPPROTO_AH)
            return 1;
        __u16 *words = (__u16 *)&ip6.saddr;  /* saddr and daddr: 16 words */
        __u32 sum = 0;
#pragma unroll
        for (int i = 0; i < 16; i++)
            sum += words[i];
        return l4_csum_unfinished(skb, ETH_HLEN + sizeof(ip6), nh, sum,
                                  bpf_ntohs(ip6.payload_len));
    }
    /* ARP never needs finishing; VLAN-tagged and other frames take the long way. */
    return proto != bpf_htons(ETH_P_ARP);
}

#endif /* CN2M_LIB_GSO_H */
