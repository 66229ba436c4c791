/* Copies handed to a device as frames: raw L2 to the analyzer's MAC, VXLAN through a
 * VXLAN device (metadata mode), VLAN-tagged onto an uplink. Each returns a TC verdict
 * (bpf_redirect) or a negative drop reason, with *fitted set by fit_mtu.
 *
 * A new encapsulation: a header of its own (lib/encap_<name>.h) with one such function,
 * a Mode in agent/layout.py and a case in wrap_copy (bpf/mirror_port.c). */
#ifndef CN2M_LIB_ENCAP_L2_H
#define CN2M_LIB_ENCAP_L2_H

#include "lib/common.h"
#include "lib/mtu.h"

static __always_inline int has_mac(struct dest_entry *d)
{
    return d->mac[0] | d->mac[1] | d->mac[2] | d->mac[3] | d->mac[4] | d->mac[5];
}

/* MODE_L2: the frame as it is, to the analyzer's MAC, out of out_ifindex. */
static __always_inline int wrap_l2(struct __sk_buff *skb, struct dest_entry *d, int *fitted)
{
    if (fit_mtu(skb, ETH_HLEN, 0, d->mtu, 0, fitted) < 0 ||
        bpf_skb_store_bytes(skb, 0, d->mac, 6, 0) < 0)
        return -DROP_WRAP_FAILED;
    skb->mark = COPY_MARK;
    return bpf_redirect(d->out_ifindex, 0);
}

/* MODE_VXLAN: the frame with tunnel metadata (VNI, remote VTEP) to a VXLAN device. */
static __always_inline int wrap_vxlan(struct __sk_buff *skb, struct dest_entry *d,
                                      int *fitted)
{
    struct bpf_tunnel_key key = {};
    __u64 tflags = 0;
    if (fit_mtu(skb, ETH_HLEN, 0, d->mtu, 0, fitted) < 0)
        return -DROP_WRAP_FAILED;
    key.tunnel_id = d->vni;
    key.tunnel_ttl = 64;
    if (d->flags & DEST_VTEP_IPV6) {
        __builtin_memcpy(key.remote_ipv6, d->dst_addr, 16);
        tflags = BPF_F_TUNINFO_IPV6;
    } else {
        key.remote_ipv4 = bpf_ntohl(d->dst_addr[0]);
    }
    if ((has_mac(d) && bpf_skb_store_bytes(skb, 0, d->mac, 6, 0) < 0) ||
        bpf_skb_set_tunnel_key(skb, &key, sizeof(key), tflags) < 0)
        return -DROP_WRAP_FAILED;
    skb->mark = COPY_MARK;
    return bpf_redirect(d->out_ifindex, 0);
}

/* MODE_VLAN: the frame with an 802.1Q tag pushed, onto the uplink. */
static __always_inline int wrap_vlan(struct __sk_buff *skb, struct dest_entry *d,
                                     int *fitted)
{
    if (fit_mtu(skb, ETH_HLEN, 0, d->mtu, 0, fitted) < 0 ||
        bpf_skb_vlan_push(skb, bpf_htons(ETH_P_8021Q), d->vlan_id) < 0)
        return -DROP_WRAP_FAILED;
    skb->mark = COPY_MARK;
    return bpf_redirect(d->out_ifindex, 0);
}

#endif /* CN2M_LIB_ENCAP_L2_H */
