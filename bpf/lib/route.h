/* Sending a wrapped copy on: a FIB lookup towards the analyzer and a redirect, or one of
 * the internal results (PASS_*) that send it another way. */
#ifndef CN2M_LIB_ROUTE_H
#define CN2M_LIB_ROUTE_H

#include "lib/common.h"
#include "lib/copy_ref.h"
#include "lib/counters.h"

/* The kernel's signature (bcc 0.26 declares it with one argument too few). */
static long (*redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
                              __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

/* Internal result: wrapped inline, but the next hop's MAC is unknown: go on through the
 * port, whose far end resolves it (bpf_redirect_neigh from within another device's
 * transmit lost the packet and addressed the neighbour on the wrong device, seen on 6.18). */
#define PASS_TO_PORT 1000

static __always_inline int send_routed(struct __sk_buff *skb, int family, __u32 *src,
                                       __u32 *dst, __u16 port, __u32 l3_len, int in_line)
{
    struct bpf_fib_lookup fib = {};
    fib.family = family == FAMILY_V4 ? AF_INET : AF_INET6;
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = bpf_htons(port);
    fib.dport = bpf_htons(port);
    fib.tot_len = l3_len;
    fib.ifindex = skb->ifindex;
    if (family == FAMILY_V4) {
        fib.ipv4_src = src[0];
        fib.ipv4_dst = dst[0];
    } else {
        __builtin_memcpy(fib.ipv6_src, src, 16);
        __builtin_memcpy(fib.ipv6_dst, dst, 16);
    }
    long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    skb->mark = COPY_MARK;
    if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
        if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) < 0 ||
            bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0) < 0)
            return -DROP_WRAP_FAILED;
        return bpf_redirect(fib.ifindex, 0);
    }
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH && in_line)
        return PASS_TO_PORT;
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
        /* Next hop known, neighbour not yet resolved: let the kernel resolve it. It
         * rebuilds the Ethernet header, but refuses a frame whose destination is still
         * multicast (the mirrored packet's own, as for IPv6 neighbour discovery). */
        __u8 no_macs[12] = {};
        if (bpf_skb_store_bytes(skb, 0, no_macs, sizeof(no_macs), 0) < 0)
            return -DROP_WRAP_FAILED;
        struct bpf_redir_neigh nh = {};
        if (family == FAMILY_V4) {
            nh.nh_family = AF_INET;
            nh.ipv4_nh = fib.ipv4_dst;
        } else {
            nh.nh_family = AF_INET6;
            __builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
        }
        return redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
    }
    return -DROP_NO_ROUTE;
}

/* Internal result: wrapped, to be handed whole to the IP stack on the port's far end,
 * which forwards it and fragments its outer IPv4 header to fit the path. */
#define PASS_TO_STACK 1001
/* Internal result: a GSO super-packet wrapped once: on into the port, whose sending end
 * cuts it into wrapped wire-size segments (UDP-tunnel segmentation). */
#define PASS_SEGMENTS 1002
/* Internal result: a GSO super-packet that cannot be wrapped once (UDP GSO that must
 * change size, already encapsulated, segments too large for the path): on into the
 * port unwrapped, to be segmented and wrapped one segment at a time. */
#define PASS_BY_SEGMENT 1003

/* A wrapped copy on the port's far end that goes whole to the IP stack: it forwards it
 * towards the analyzer and fragments the outer IPv4 header to fit the path. */
static __always_inline int hand_to_stack(struct __sk_buff *skb, struct copy_ref *c)
{
    skb->mark = COPY_MARK;
    if (bpf_skb_change_type(skb, 0 /* PACKET_HOST */) < 0) {
        count_copy(c->rule_slot, c->ifslot, c->dest_slot, DROP_WRAP_FAILED, 0, 0);
        return TC_ACT_SHOT;
    }
    count_copy(c->rule_slot, c->ifslot, c->dest_slot, -1, skb->len, FIT_FRAGMENTED);
    return TC_ACT_OK;
}

#endif /* CN2M_LIB_ROUTE_H */
