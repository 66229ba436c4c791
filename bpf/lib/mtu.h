/* Fitting a copy to the MTU of its path: cut, or left whole to be fragmented. */
#ifndef CN2M_LIB_MTU_H
#define CN2M_LIB_MTU_H

#include "lib/common.h"
#include "lib/counters.h"

/* Fit the copy's L3 part, once `overhead` bytes of headers are added, to `mtu`. A copy
 * is never dropped for being too large: it is cut, or (when `whole` is allowed: outer
 * IPv4 and a destination that asks for it) left whole for the IP stack to fragment.
 * Either is counted. */
static __always_inline int fit_mtu(struct __sk_buff *skb, __u32 l2_len, __u32 overhead,
                                   __u32 mtu, int whole, int *fitted)
{
    if (!mtu)
        return 0;
    __u32 room = mtu > overhead ? mtu - overhead : 0;
    if (skb->len > l2_len + room) {
        if (whole) {
            *fitted = FIT_FRAGMENTED;
            return 0;
        }
        if (bpf_skb_change_tail(skb, l2_len + room, 0) < 0)
            return -1;
        *fitted = FIT_TRUNCATED;
    }
    return 0;
}

#endif /* CN2M_LIB_MTU_H */
