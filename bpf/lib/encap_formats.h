/* Output formats other than jmirror: ERSPAN type II and III and plain GRE (over GRE),
 * GENEVE, VXLAN and Contrail's header (over UDP), all over IPv4, all carrying the
 * mirrored Ethernet frame. The agent writes each destination's headers as a template
 * (encaps map, agent/encap.py); a copy gets the template, completed (lengths, IPv4
 * checksum, per-copy ids), followed by its own Ethernet header:
 *
 *   [Ethernet, routed][outer IPv4][UDP or GRE][format header][the copy's frame]
 *
 * GSO super-packets are wrapped once, as for jmirror: bpf_skb_adjust_room marks them a
 * UDP-tunnel (SKB_GSO_UDP_TUNNEL) or GRE (SKB_GSO_GRE) packet whose inner MAC header is
 * the copied Ethernet header (ENCAP_L2(14) | ENCAP_L2_ETH: inner protocol ETH_P_TEB), so
 * that __skb_udp_tunnel_segment / gre_gso_segment repeat everything up to it in every
 * segment. All per-copy fields are the same in each segment of one super-packet (ERSPAN
 * type III's timestamp, GRE's sequence number, which stays 0).
 */

#ifndef CN2M_LIB_ENCAP_FORMATS_H
#define CN2M_LIB_ENCAP_FORMATS_H

#include "lib/common.h"
#include "lib/counters.h"
#include "lib/csum.h"
#include "lib/gso.h"
#include "lib/mtu.h"
#include "lib/route.h"

#ifndef BPF_F_ADJ_ROOM_ENCAP_L2_ETH
#define BPF_F_ADJ_ROOM_ENCAP_L2_ETH (1ULL << 6)
#endif

/* The template is completed in encap_scratch (struct encap_buf, agent/layout.py), with
 * room for the copied Ethernet header after it. */

/* Whether a copy was going into the pod (ERSPAN type III's direction bit). On the mirror
 * port's sending end, from where the clone was made: a copy made at the ingress hook of
 * the pod's host-side interface (ingress_ifindex is that interface) came out of the pod.
 * Further on, the sending end has recorded it in the mark (CLONE_INTO_POD). */
static __always_inline int copy_into_pod(struct __sk_buff *skb, __u32 mark, __u32 ifslot,
                                         int on_sending_end)
{
    if (!on_sending_end)
        return !!(mark & CLONE_INTO_POD);
    __u32 iif = skb->ingress_ifindex;
    struct iface_entry *ie = interfaces.lookup(&iif);
    return !(ie && ie->ifslot == ifslot);
}

/* A copy going on through the port, unwrapped: record its direction for the far end. */
static __always_inline int mark_direction(struct __sk_buff *skb, int rc)
{
    __u32 mark = skb->mark;
    if (rc != TC_ACT_OK || (mark & CLONE_TAG_MASK) != CLONE_TAG)
        return rc;
    __u32 ifslot = (mark >> CLONE_IFSLOT_SHIFT) & CLONE_IFSLOT_MASK;
    if (copy_into_pod(skb, mark, ifslot, 1))
        skb->mark = mark | CLONE_INTO_POD;
    return rc;
}

/* Complete the template for one copy whose IP packet is `inner_len` bytes. */
static __always_inline int fill_template(struct encap_buf *buf, struct encap_entry *e,
                                         __u32 mirror_id, __u32 session_id, int into_pod,
                                         __u32 inner_len, int may_fragment)
{
    __builtin_memcpy(buf->b, e->tmpl, ENCAP_TMPL_MAX);
    __u32 hdr = e->hdr_len;
    __u32 tot_len = inner_len + hdr + ETH_HLEN;
    if (tot_len > 0xFFFF)
        tot_len = 0xFFFF;  /* a super-packet: the kernel sets it again per segment */
    *(__be16 *)&buf->b[2] = bpf_htons(tot_len);
    if (may_fragment)
        *(__be16 *)&buf->b[6] = 0;  /* no DF: the IP stack may fragment it on the way */
    *(__be16 *)&buf->b[10] = 0;
    *(__be16 *)&buf->b[10] = csum_fold(bpf_csum_diff(0, 0, (__be32 *)buf->b, 20, 0));
    if (!(e->flags & ENCAP_GRE))
        *(__be16 *)&buf->b[24] = bpf_htons(tot_len - 20);  /* UDP length */
    switch (e->format) {
    case FORMAT_ERSPAN2:
        /* Version 1, session id (10 bits: the rule's mirror id); index (20 bits: the
         * interface's session id). */
        *(__be32 *)&buf->b[ERSPAN_HDR_OFF] = bpf_htonl((1U << 28) | (mirror_id & 0x3FF));
        *(__be32 *)&buf->b[ERSPAN_HDR_OFF + 4] = bpf_htonl(session_id & 0xFFFFF);
        break;
    case FORMAT_ERSPAN3:
        /* Version 2, session id; timestamp in 100-microsecond units (granularity 00);
         * D set for a copy going into the pod (egress of its switch port). */
        *(__be32 *)&buf->b[ERSPAN_HDR_OFF] = bpf_htonl((2U << 28) | (mirror_id & 0x3FF));
        *(__be32 *)&buf->b[ERSPAN_HDR_OFF + 4] = bpf_htonl((__u32)(bpf_ktime_get_ns() / 100000));
        *(__be32 *)&buf->b[ERSPAN_HDR_OFF + 8] = bpf_htonl(into_pod ? 1U << 3 : 0);
        break;
    case FORMAT_GENEVE:
        *(__be32 *)&buf->b[GENEVE_OPT_DATA_OFF] = bpf_htonl(mirror_id);
        *(__be32 *)&buf->b[GENEVE_OPT_DATA_OFF + 4] = bpf_htonl(session_id);
        break;
    case FORMAT_VXLAN:
        if (e->flags & ENCAP_VNI_FROM_MID)
            *(__be32 *)&buf->b[VXLAN_VNI_OFF] = bpf_htonl((mirror_id & 0xFFFFFF) << 8);
        break;
    }
    return 0;
}

/* Put the completed headers in front of the copy's Ethernet frame: room after its
 * Ethernet header for the template and a copy of that header, written in one store;
 * the front Ethernet header becomes the outer one (addresses set when routed). */
static __always_inline int push_headers(struct __sk_buff *skb, struct encap_buf *buf,
                                        __u32 hdr, __u64 flags)
{
    hdr &= 0xFF;
    if (hdr < 28 || hdr > ENCAP_TMPL_MAX)
        return -1;
    if (bpf_skb_load_bytes(skb, 0, &buf->b[hdr], ETH_HLEN) < 0)
        return -1;
    if (bpf_skb_adjust_room(skb, hdr + ETH_HLEN, BPF_ADJ_ROOM_MAC, flags) < 0)
        return -2;
    __u32 len = hdr + ETH_HLEN;
    if (len > sizeof(buf->b))
        return -1;
    if (bpf_skb_store_bytes(skb, ETH_HLEN, buf->b, len, 0) < 0)
        return -1;
    __u16 eth_proto = bpf_htons(ETH_P_IP);
    return bpf_skb_store_bytes(skb, 12, &eth_proto, 2, 0) < 0 ? -1 : 0;
}

static __always_inline struct encap_entry *encap_of(__u32 dest_slot)
{
    return encaps.lookup(&dest_slot);
}

/* One finished copy (not GSO) in a format: fitted to the path, wrapped, routed. */
static __always_inline int wrap_format(struct __sk_buff *skb, struct dest_entry *d,
                                       __u32 dest_slot, __u32 mirror_id, __u32 session_id,
                                       int into_pod, int *fitted, int in_line)
{
    struct encap_entry *e = encap_of(dest_slot);
    __u32 zero = 0;
    struct encap_buf *buf = encap_scratch.lookup(&zero);
    if (!e || !e->hdr_len || !buf)
        return -DROP_NO_DESTINATION;
    if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
        return -DROP_NOT_IP;  /* bpf_skb_adjust_room makes room in IP packets only */
    __u32 overhead = e->hdr_len + ETH_HLEN;
    int whole = (d->flags & DEST_FRAGMENT) != 0;
    if (fit_mtu(skb, ETH_HLEN, overhead, d->mtu, whole, fitted) < 0)
        return -DROP_WRAP_FAILED;
    __u32 inner_len = skb->len - ETH_HLEN;
    fill_template(buf, e, mirror_id, session_id, into_pod, inner_len,
                  *fitted == FIT_FRAGMENTED);
    if (push_headers(skb, buf, e->hdr_len, 0) < 0)
        return -DROP_WRAP_FAILED;
    if (*fitted == FIT_FRAGMENTED)
        return PASS_TO_STACK;
    return send_routed(skb, FAMILY_V4, d->src_addr, d->dst_addr, d->udp_port,
                       inner_len + overhead, in_line);
}

/* A GSO super-packet in a format: wrapped once (see the top of this file). Returns
 * PASS_SEGMENTS, PASS_BY_SEGMENT when the kernel refuses it (UDP GSO that must change
 * size, already encapsulated, not TCP/UDP over IP) or its segments would not fit, or a
 * negative drop. */
static __always_inline int wrap_format_gso(struct __sk_buff *skb, struct dest_entry *d,
                                           __u32 dest_slot, __u32 mirror_id,
                                           __u32 session_id, int into_pod)
{
    struct encap_entry *e = encap_of(dest_slot);
    __u32 zero = 0;
    struct encap_buf *buf = encap_scratch.lookup(&zero);
    if (!e || !e->hdr_len || !buf)
        return PASS_BY_SEGMENT;  /* the far end counts it as it finds it */
    __u16 proto = 0;
    if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0 ||
        (proto != bpf_htons(ETH_P_IP) && proto != bpf_htons(ETH_P_IPV6)))
        return PASS_BY_SEGMENT;
    __u32 hdrs = gso_header_len(skb, proto);
    if (!hdrs)
        return PASS_BY_SEGMENT;
    __u32 overhead = e->hdr_len + ETH_HLEN;
    __u32 wire = hdrs + skb->gso_size;
    __u32 mtu = d->mtu ? d->mtu : 0xFFFF;
    int exact = !(d->flags & DEST_SEGMENTS_FIT) &&
                ((d->flags & DEST_SEGMENTS_EXACT) || wire + overhead <= mtu);
    if (exact ? wire + overhead > mtu : wire > mtu)
        return PASS_BY_SEGMENT;
    __u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
                  ((e->flags & ENCAP_GRE) ? BPF_F_ADJ_ROOM_ENCAP_L4_GRE :
                                            BPF_F_ADJ_ROOM_ENCAP_L4_UDP) |
                  BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN) | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
                  (exact ? BPF_F_ADJ_ROOM_FIXED_GSO : 0);
    fill_template(buf, e, mirror_id, session_id, into_pod, skb->len - ETH_HLEN, 0);
    int rc = push_headers(skb, buf, e->hdr_len, flags);
    if (rc == -2)
        return PASS_BY_SEGMENT;
    return rc < 0 ? -DROP_WRAP_FAILED : PASS_SEGMENTS;
}

#endif /* CN2M_LIB_ENCAP_FORMATS_H */
