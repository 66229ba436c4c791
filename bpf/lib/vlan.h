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

#endif /* CN2M_LIB_VLAN_H */
