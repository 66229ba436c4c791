/* jmirror (Juniper's mirroring header) over UDP over IPv4 or IPv6: one copy at a time,
 * or a GSO super-packet wrapped once. */
#ifndef CN2M_LIB_ENCAP_JMIRROR_H
#define CN2M_LIB_ENCAP_JMIRROR_H

#include "lib/common.h"
#include "lib/csum.h"
#include "lib/gso.h"
#include "lib/mtu.h"
#include "lib/route.h"
#include "lib/vlan.h"

struct jmirror_v4 {
    struct iphdr ip;
    struct udphdr udp;
    __be32 mid;
    __be32 sid;
} __attribute__((packed));

struct jmirror_v6 {
    struct ipv6hdr ip;
    struct udphdr udp;
    __be32 mid;
    __be32 sid;
} __attribute__((packed));

/* The outer IP, UDP and jmirror headers, written at the front of a copy that
 * bpf_skb_adjust_room has made room for. `inner_len` is the inner packet's length (a
 * GSO super-packet's lengths are set again for each segment by the kernel). The UDP
 * checksum is left 0: IPv4 sends none; IPv6 fills it in afterwards (udp6_checksum). */
static __always_inline int write_jmirror(struct __sk_buff *skb, struct dest_entry *d,
                                         __u32 mirror_id, __u32 session_id, __u32 inner_len,
                                         int may_fragment)
{
    __u32 mid = bpf_htonl(mirror_id & JMIRROR_MID_MASK);  /* version 0 in the top bits */
    __u32 sid = bpf_htonl(session_id);
    __u32 udp_len = inner_len + sizeof(struct udphdr) + JMIRROR_HEADER_LEN;
    if (udp_len > 0xFFFF)
        udp_len = 0xFFFF;
    if (d->mode != MODE_JMIRROR6) {
        __u32 tot_len = inner_len + OUTER_IPV4_OVERHEAD;
        if (tot_len > 0xFFFF)
            tot_len = 0xFFFF;
        struct jmirror_v4 h = {};
        h.ip.version = 4;
        h.ip.ihl = 5;
        h.ip.ttl = 255;
        h.ip.protocol = IPPROTO_UDP;
        h.ip.tot_len = bpf_htons(tot_len);
        /* DF unless the destination wants oversized copies whole (fragmented). */
        h.ip.frag_off = may_fragment ? 0 : bpf_htons(0x4000);
        h.ip.saddr = d->src_addr[0];
        h.ip.daddr = d->dst_addr[0];
        h.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&h.ip, sizeof(h.ip), 0));
        h.udp.source = bpf_htons(d->udp_port);
        h.udp.dest = bpf_htons(d->udp_port);
        h.udp.len = bpf_htons(udp_len);
        h.udp.check = 0;  /* jmirror over IPv4 sends no UDP checksum */
        h.mid = mid;
        h.sid = sid;
        if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0) < 0)
            return -1;
        __u16 eth_proto = bpf_htons(ETH_P_IP);
        return bpf_skb_store_bytes(skb, 12, &eth_proto, 2, 0) < 0 ? -1 : 0;
    }
    struct jmirror_v6 h = {};
    h.ip.version = 6;
    h.ip.hop_limit = 255;
    h.ip.nexthdr = IPPROTO_UDP;
    h.ip.payload_len = bpf_htons(udp_len);
    __builtin_memcpy(&h.ip.saddr, d->src_addr, 16);
    __builtin_memcpy(&h.ip.daddr, d->dst_addr, 16);
    h.udp.source = bpf_htons(d->udp_port);
    h.udp.dest = bpf_htons(d->udp_port);
    h.udp.len = bpf_htons(udp_len);
    h.mid = mid;
    h.sid = sid;
    if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0) < 0)
        return -1;
    __u16 eth_proto = bpf_htons(ETH_P_IPV6);
    return bpf_skb_store_bytes(skb, 12, &eth_proto, 2, 0) < 0 ? -1 : 0;
}

/* IPv6 requires a UDP checksum: pseudo-header, then UDP header and payload, over the
 * datagram as it is now (one wrapped copy, or one segment of a wrapped super-packet). */
static __always_inline int udp6_checksum(struct __sk_buff *skb, struct dest_entry *d)
{
    __u32 udp_len = skb->len - ETH_HLEN - sizeof(struct ipv6hdr);
    __u16 zero = 0;
    if (bpf_skb_store_bytes(skb, ETH_HLEN + 40 + 6, &zero, 2, 0) < 0)
        return -1;
    __be32 pseudo[10] = {};
    __builtin_memcpy(pseudo, d->src_addr, 16);
    __builtin_memcpy(&pseudo[4], d->dst_addr, 16);
    pseudo[8] = bpf_htonl(udp_len);
    pseudo[9] = bpf_htonl(IPPROTO_UDP);
    __s64 sum = bpf_csum_diff(0, 0, pseudo, sizeof(pseudo), 0);
    sum = csum_payload(skb, ETH_HLEN + 40, ETH_HLEN + 40 + udp_len, sum);
    __u16 check = csum_fold(sum);
    if (check == 0)
        check = 0xFFFF;
    return bpf_skb_store_bytes(skb, ETH_HLEN + 40 + 6, &check, 2, 0) < 0 ? -1 : 0;
}

/* One wrap for a whole GSO super-packet: bpf_skb_adjust_room marks it a UDP tunnel
 * packet (outer IP and UDP, the jmirror header as its 8-byte "inner L2"), and the
 * kernel later segments it, repeating the outer headers in every segment. Exact: the
 * wire's segment size (needs the path MTU to take the overhead); fit: the kernel
 * lowers gso_size by the overhead, so segments are the wire's size once wrapped.
 * Returns PASS_SEGMENTS, PASS_BY_SEGMENT when the kernel refuses (or the segments would
 * not fit either way), or a negative drop. */
static __always_inline int wrap_jmirror_gso(struct __sk_buff *skb, struct dest_entry *d,
                                            __u32 mirror_id, __u32 session_id)
{
    __u16 proto = strip_vlans(skb);
    if (proto != bpf_htons(ETH_P_IP) && proto != bpf_htons(ETH_P_IPV6))
        return PASS_BY_SEGMENT;
    int v6 = d->mode == MODE_JMIRROR6;
    __u32 overhead = v6 ? OUTER_IPV6_OVERHEAD : OUTER_IPV4_OVERHEAD;
    __u32 hdrs = gso_header_len(skb, proto);
    if (!hdrs)
        return PASS_BY_SEGMENT;
    __u32 wire = hdrs + skb->gso_size;  /* L3 size of the wire's segments */
    __u32 mtu = d->mtu ? d->mtu : 0xFFFF;
    int exact = !(d->flags & DEST_SEGMENTS_FIT) &&
                ((d->flags & DEST_SEGMENTS_EXACT) || wire + overhead <= mtu);
    if (exact ? wire + overhead > mtu : wire > mtu)
        return PASS_BY_SEGMENT;  /* too large either way: cut or fragmented one by one */
    __u32 inner_len = skb->len - ETH_HLEN;
    __u64 flags = BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
                  (v6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) |
                  BPF_F_ADJ_ROOM_ENCAP_L2(JMIRROR_HEADER_LEN) |
                  (exact ? BPF_F_ADJ_ROOM_FIXED_GSO : 0);
    /* Refused for a packet already encapsulated (-EALREADY) and for UDP GSO whose size
     * would change: those are segmented first, then wrapped one by one. */
    if (bpf_skb_adjust_room(skb, overhead, BPF_ADJ_ROOM_MAC, flags) < 0)
        return PASS_BY_SEGMENT;
    if (write_jmirror(skb, d, mirror_id, session_id, inner_len, 0) < 0)
        return -DROP_WRAP_FAILED;
    return PASS_SEGMENTS;
}

static __always_inline int wrap_jmirror(struct __sk_buff *skb, struct dest_entry *d,
                                        __u32 mirror_id, __u32 session_id, int *fitted,
                                        int in_line)
{
    __u16 proto = strip_vlans(skb);
    if (!proto)
        return -DROP_WRAP_FAILED;
    if (proto != bpf_htons(ETH_P_IP) && proto != bpf_htons(ETH_P_IPV6))
        return -DROP_NOT_IP;
    int v6 = d->mode == MODE_JMIRROR6;
    __u32 overhead = v6 ? OUTER_IPV6_OVERHEAD : OUTER_IPV4_OVERHEAD;
    /* Outer IPv6 is never fragmented on the way: oversized copies over it are cut. */
    int whole = !v6 && (d->flags & DEST_FRAGMENT);
    if (fit_mtu(skb, ETH_HLEN, overhead, d->mtu, whole, fitted) < 0)
        return -DROP_WRAP_FAILED;
    __u32 inner_len = skb->len - ETH_HLEN;
    __u64 flags = BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
                  (v6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV4);
    /* A copy of a tunnel packet (a pod's own VXLAN, say) is refused as already
     * encapsulated (-EALREADY): a single finished packet needs no tunnel marks, so it
     * gets plain room instead. */
    if (bpf_skb_adjust_room(skb, overhead, BPF_ADJ_ROOM_MAC, flags) < 0 &&
        bpf_skb_adjust_room(skb, overhead, BPF_ADJ_ROOM_MAC, 0) < 0)
        return -DROP_WRAP_FAILED;
    if (write_jmirror(skb, d, mirror_id, session_id, inner_len, whole) < 0)
        return -DROP_WRAP_FAILED;
    if (*fitted == FIT_FRAGMENTED)
        return PASS_TO_STACK;
    if (v6 && udp6_checksum(skb, d) < 0)
        return -DROP_WRAP_FAILED;
    return send_routed(skb, v6 ? FAMILY_V6 : FAMILY_V4, d->src_addr, d->dst_addr,
                       d->udp_port, inner_len + overhead, in_line);
}

#endif /* CN2M_LIB_ENCAP_JMIRROR_H */
