/* Internet checksums: folding, over a copy's payload, and whether one is unfinished. */
#ifndef CN2M_LIB_CSUM_H
#define CN2M_LIB_CSUM_H

#include "lib/common.h"

static __always_inline __u16 csum_fold(__u64 sum)
{
    sum = (sum & 0xFFFFFFFF) + (sum >> 32);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    return ~sum & 0xFFFF;
}

/* Whole 512-byte chunks (the most bpf_csum_diff takes) and then the tail: copies of up
 * to 10 KB, which the agent guarantees by capping the MTU of IPv6 jmirror destinations. */
#define CSUM_CHUNKS 20

static __always_inline __s64 csum_payload(struct __sk_buff *skb, __u32 off, __u32 end,
                                          __s64 sum)
{
    __u32 zero = 0;
    struct csum_buf *cb = csum_scratch.lookup(&zero);
    if (!cb)
        return sum;
    for (int i = 0; i < CSUM_CHUNKS; i++) {
        if (off + 512 > end)
            break;
        if (bpf_skb_load_bytes(skb, off, cb->b, 512) < 0)
            return sum;
        sum = bpf_csum_diff(0, 0, (__be32 *)cb->b, 512, sum);
        off += 512;
    }
    __u32 tail = (end - off) & 0x1FF;
    if (tail) {
        __u32 padded = (tail + 3) & 0x3FC;  /* at most 512; the buffer has slack */
        *(__u32 *)&cb->b[(padded - 4) & 0x1FC] = 0;  /* zero-pad a partial last word */
        if (bpf_skb_load_bytes(skb, off, cb->b, tail) < 0)
            return sum;
        sum = bpf_csum_diff(0, 0, (__be32 *)cb->b, padded, sum);
    }
    return sum;
}

/* Whether the kernel still has to finish a TCP or UDP checksum of this copy. The sender
 * of a CHECKSUM_PARTIAL packet leaves in the checksum field the folded sum of the
 * pseudo-header alone (for the hardware, or the kernel, to complete); __sk_buff does not
 * show ip_summed, so the field is compared with that sum. A finished checksum equal to
 * it by chance (1 in 65,536) only sends that copy the long way: never a wrong copy. */
static __always_inline int l4_csum_unfinished(struct __sk_buff *skb, __u32 l4_off, __u8 proto,
                                              __u32 pseudo_sum, __u32 l4_len)
{
    __u16 check = 0;
    if (proto == IPPROTO_TCP) {
        if (bpf_skb_load_bytes(skb, l4_off + 16, &check, 2) < 0)
            return 1;
    } else if (proto == IPPROTO_UDP) {
        if (bpf_skb_load_bytes(skb, l4_off + 6, &check, 2) < 0)
            return 1;
        /* UDP over IPv4 without a checksum is mostly a tunnel (VXLAN, say), whose inner
         * packet's checksum may be the one left unfinished: take the port. */
        if (!check)
            return 1;
    } else {
        return proto == IPPROTO_SCTP;  /* CRC32c offload: also PARTIAL */
    }
    pseudo_sum += bpf_htons(proto) + bpf_htons(l4_len);
    return check == (__u16)~csum_fold(pseudo_sum);  /* the folded sum, uncomplemented */
}

#endif /* CN2M_LIB_CSUM_H */
