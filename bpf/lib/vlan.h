/* VLAN tags on a copy. */
#ifndef CN2M_LIB_VLAN_H
#define CN2M_LIB_VLAN_H

#include "lib/common.h"

/* Remove VLAN tags: jmirror carries the packet from its IP header on. Returns the
 * ethertype the frame ends with (still a VLAN one if a tag could not be removed), or 0
 * if it cannot be read. */
static __always_inline __u16 strip_vlans(struct __sk_buff *skb)
{
    __u16 proto = 0;
#pragma unroll
    for (int i = 0; i < 3; i++) {
        if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
            return 0;
        if (!skb->vlan_present && proto != bpf_htons(ETH_P_8021Q) &&
            proto != bpf_htons(ETH_P_8021AD))
            return proto;
        if (bpf_skb_vlan_pop(skb) < 0)
            return proto;
    }
    if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
        return 0;
    return proto;
}

/* What a Linux receiver's VLAN untagging needs after the Ethernet header: the tag (4
 * bytes) and the 2 bytes after it (skb_vlan_untag). A tagged frame shorter than that is
 * freed, counted nowhere, before any TC program of that device sees it. */
#define VLAN_UNTAG_MIN 6

/* A frame with its VLAN tag in the data (none in skb metadata) that a Linux receiver
 * would drop unseen: a veth (the mirror port's far end, a local analyzer's interface) or
 * a VTEP's VXLAN device. A NIC would have padded it to the Ethernet minimum. */
static __always_inline int tagged_too_short(struct __sk_buff *skb)
{
    __u16 proto = 0;
    if (skb->vlan_present || skb->len >= ETH_HLEN + VLAN_UNTAG_MIN ||
        bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
        return 0;
    return proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD);
}

/* Such a frame padded with zeros to the Ethernet minimum (60 bytes), as the wire carries
 * it, for copies handed on as frames (raw L2, VXLAN). 0, or a negative error. */
static __always_inline int pad_to_eth_min(struct __sk_buff *skb)
{
    __u8 head[ETH_HLEN + VLAN_UNTAG_MIN] = {};
    __u8 zeros[ETH_ZLEN - sizeof(head)] = {};
    __u32 len = skb->len;
    /* bpf_skb_change_tail leaves what it adds as it found it: the frame is written back
     * whole, its bytes and zeros after them. */
#pragma unroll
    for (int i = 0; i < (int)sizeof(head); i++) {
        if (i < len && bpf_skb_load_bytes(skb, i, &head[i], 1) < 0)
            return -1;
    }
    if (bpf_skb_change_tail(skb, ETH_ZLEN, 0) < 0 ||
        bpf_skb_store_bytes(skb, 0, head, sizeof(head), 0) < 0 ||
        bpf_skb_store_bytes(skb, sizeof(head), zeros, sizeof(zeros), 0) < 0)
        return -1;
    return 0;
}

#endif /* CN2M_LIB_VLAN_H */
