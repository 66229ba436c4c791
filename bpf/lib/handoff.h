/* Unfinished single copies handed straight to a local analyzer pod's veth. */
#ifndef CN2M_LIB_HANDOFF_H
#define CN2M_LIB_HANDOFF_H

#include "lib/common.h"
#include "lib/copy_ref.h"

/* A copy whose checksum the kernel has still to finish (CHECKSUM_PARTIAL, not GSO) and
 * that goes to a local analyzer pod's veth set up for the hand-off (DEST_GSO_HANDOFF:
 * that veth finishes checksums in software as it transmits, encapsulated copies'
 * included), fitting the path once wrapped: it can be wrapped inline and handed straight
 * to that veth. This spares it the mirror port's crossing, a backlog pass and a second
 * program run, all ahead of the production packet on its CPU (issue 12, production
 * first). A copy that would have to be cut or fragmented takes the port (a cut could fall
 * before the checksum field), and so does anything else this does not recognise. */
static __always_inline int finished_by_handoff(struct __sk_buff *skb)
{
    __u32 mark = skb->mark;
    if ((mark & CLONE_TAG_MASK) != CLONE_TAG || skb->vlan_present)
        return 0;
    struct copy_ref c;
    copy_ref_of(mark, &c);
    if (!c.d || c.d->mode != MODE_JMIRROR4 || !(c.d->flags & DEST_GSO_HANDOFF))
        return 0;
    __u16 proto = 0;
    if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0 ||
        (proto != bpf_htons(ETH_P_IP) && proto != bpf_htons(ETH_P_IPV6)))
        return 0;
    return !c.d->mtu || skb->len - ETH_HLEN + OUTER_IPV4_OVERHEAD <= c.d->mtu;
}

#endif
