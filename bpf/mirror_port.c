/* The mirror port: a veth pair owned by cn2mirror.
 *
 * Clones enter its sending end (mirror-tx). Two paths, one wrapper (wrap_copy):
 *  - inline: mirror_wrap_inline runs on mirror-tx's TC egress, before the device, and
 *    wraps and redirects a copy right there when the copy is already finished: not a GSO
 *    super-packet, and no checksum left for the hardware (CHECKSUM_PARTIAL). This skips
 *    the veth crossing and a second softirq pass, most of what a small copy costs.
 *  - through the port: anything else goes on into the veth. Mirror-tx has TSO, GSO and
 *    tx checksumming off, so the kernel cuts super-packets into wire-size segments and
 *    finishes their checksums before they cross to the receiving end (mirror-rx), where
 *    mirror_wrap runs on TC ingress.
 *  - GSO super-packets for jmirror destinations are wrapped once on mirror-tx's egress
 *    (wrap_super_packet: a UDP-tunnel GSO packet whose "inner L2" is the jmirror
 *    header). To a local analyzer pod's veth set up for it (DEST_GSO_HANDOFF) they are
 *    redirected whole and that veth segments them; otherwise they go on into the veth,
 *    whose sending end (tunnel segmentation off) cuts them into wrapped wire-size
 *    segments that the far end only routes (route_wrapped).
 * The wrapper reads the (interface, rule) the classifier put in skb->mark, wraps the
 * copy for its destination (jmirror over IPv4/IPv6, another output format over IPv4:
 * lib/encap_formats.h, raw L2, VXLAN or VLAN), fits it to
 * the path MTU (cut, or sent whole to be fragmented by the IP stack on the far end), and
 * redirects it on. Nothing on this path touches production packets.
 *
 * analyzer_port_rx (XDP on mirror-tx) drops anything that tries to come in through the
 * mirror port: like a JUNOSe analyzer port, it only sends.
 */

#include "lib/common.h"
#include "lib/counters.h"
#include "lib/copy_ref.h"
#include "lib/gso.h"
#include "lib/mtu.h"
#include "lib/route.h"
#include "lib/encap_jmirror.h"
#include "lib/encap_l2.h"
#include "lib/encap_formats.h"
#include "lib/copy_limits.h"

/* One copy (a clone from a pod interface, finished): wrapped for its destination and
 * sent on, or counted under a drop reason. `in_line`: on mirror-tx's egress, where a
 * copy whose next hop needs resolving goes on through the port instead.
 *
 * Per-destination policies that decide whether (or how much of) a copy is sent belong
 * between copy_ref_of and the mode switch, each in a header of its own under lib/. */
static __always_inline int wrap_copy(struct __sk_buff *skb, int in_line)
{
    __u32 mark = skb->mark;
    if ((mark & CLONE_TAG_MASK) != CLONE_TAG) {
        count_node(DROP_FOREIGN);
        return TC_ACT_SHOT;
    }
    struct copy_ref c;
    copy_ref_of(mark, &c);
    struct rule_entry *r = c.r;
    struct dest_entry *d = c.d;
    if (!r || !d || d->mode == MODE_NONE) {
        count_copy(c.rule_slot, c.ifslot, c.dest_slot, DROP_NO_DESTINATION, 0, 0);
        return TC_ACT_SHOT;
    }
    __u32 *sid = sessions.lookup(&c.ifslot);
    int fitted = FIT_WHOLE;
    int rc;
    /* The destination's snap length (lib/copy_limits.h), before any wrap. */
    int snapped = snap_copy(skb, c.dest_slot);
    if (snapped < 0) {
        count_copy(c.rule_slot, c.ifslot, c.dest_slot, DROP_WRAP_FAILED, 0, 0);
        return TC_ACT_SHOT;
    }
    if (snapped)
        fitted = FIT_TRUNCATED;
    switch (d->mode) {
    case MODE_JMIRROR4:
    case MODE_JMIRROR6:
        rc = wrap_jmirror(skb, d, r->mirror_id, sid ? *sid : 0, &fitted, in_line);
        break;
    case MODE_ENCAP4:
        rc = wrap_format(skb, d, c.dest_slot, r->mirror_id, sid ? *sid : 0,
                         copy_into_pod(skb, mark, c.ifslot, in_line), &fitted, in_line);
        break;
    case MODE_L2:
        rc = wrap_l2(skb, d, &fitted);
        break;
    case MODE_VXLAN:
        rc = wrap_vxlan(skb, d, &fitted);
        break;
    case MODE_VLAN:
        rc = wrap_vlan(skb, d, &fitted);
        break;
    default:
        rc = -DROP_NO_DESTINATION;
    }
    if (rc == PASS_TO_STACK && !in_line)
        return hand_to_stack(skb, &c);
    if (rc == PASS_TO_PORT || rc == PASS_TO_STACK) {  /* counted by the far end */
        __u32 tag = rc == PASS_TO_STACK ? WRAPPED_FRAGMENT_TAG :
                    fitted == FIT_TRUNCATED ? WRAPPED_TRUNCATED_TAG : WRAPPED_TAG;
        skb->mark = tag | (mark & ~CLONE_TAG_MASK);
        return TC_ACT_OK;
    }
    return count_result(c.rule_slot, c.ifslot, c.dest_slot, rc, skb->len, fitted);
}

/* A GSO super-packet on the port's sending end. jmirror: wrapped once, then on into the
 * port, whose sending end (UDP-tunnel segmentation off) cuts it into wrapped wire-size
 * segments; the far end only routes them. Refused by the kernel (see
 * wrap_jmirror_gso), or another mode: on into the port unwrapped, segmented there and
 * wrapped one segment at a time by the far end. */
static __always_inline int wrap_super_packet(struct __sk_buff *skb)
{
    __u32 mark = skb->mark;
    if ((mark & CLONE_TAG_MASK) != CLONE_TAG)
        return TC_ACT_OK;  /* the far end counts and drops it */
    struct copy_ref c;
    copy_ref_of(mark, &c);
    if (!c.r || !c.d || (c.d->mode != MODE_JMIRROR4 && c.d->mode != MODE_JMIRROR6 &&
                         c.d->mode != MODE_ENCAP4))
        return TC_ACT_OK;
    /* A snap length applies per wire segment: segmented first, each segment cut and
     * wrapped on the far end. */
    if (snap_length_of(c.dest_slot)) {
        count_super_packet(c.rule_slot, c.ifslot, c.dest_slot, 0);
        return TC_ACT_OK;
    }
    __u32 *sid = sessions.lookup(&c.ifslot);
    int rc = c.d->mode == MODE_ENCAP4 ?
        wrap_format_gso(skb, c.d, c.dest_slot, c.r->mirror_id, sid ? *sid : 0,
                        copy_into_pod(skb, mark, c.ifslot, 1)) :
        wrap_jmirror_gso(skb, c.d, c.r->mirror_id, sid ? *sid : 0);
    if (rc == PASS_SEGMENTS && (c.d->flags & DEST_GSO_HANDOFF) &&
        c.d->mode == MODE_JMIRROR4) {
        /* Straight to the device, which segments it: its segments are counted here. */
        __u32 per_seg = skb->gso_size;
        __u32 hdrs = gso_header_len_outer(skb);
        __u32 payload = skb->len > hdrs ? skb->len - hdrs : 0;
        __u32 segs = per_seg ? (payload + per_seg - 1) / per_seg : 1;
        /* The FIB lookup checks the MTU against one segment, not the super-packet. */
        int sent = send_routed(skb, FAMILY_V4, c.d->src_addr, c.d->dst_addr, c.d->udp_port,
                               hdrs - ETH_HLEN + per_seg, 1);
        if (sent == TC_ACT_REDIRECT) {
            count_super_packet(c.rule_slot, c.ifslot, c.dest_slot, 1);
            count_segments(c.rule_slot, c.ifslot, c.dest_slot, segs,
                           skb->len + (segs - 1) * hdrs);
            return TC_ACT_REDIRECT;
        }
        if (sent != PASS_TO_PORT) {
            count_copy(c.rule_slot, c.ifslot, c.dest_slot,
                       sent < 0 ? -sent : DROP_REDIRECT_FAILED, 0, 0);
            return TC_ACT_STOLEN;
        }
    }
    if (rc == PASS_SEGMENTS || rc == PASS_BY_SEGMENT) {
        count_super_packet(c.rule_slot, c.ifslot, c.dest_slot, rc == PASS_SEGMENTS);
        if (rc == PASS_SEGMENTS)
            skb->mark = WRAPPED_SEGMENTS_TAG | (mark & ~CLONE_TAG_MASK);
        return TC_ACT_OK;
    }
    count_copy(c.rule_slot, c.ifslot, c.dest_slot, rc < 0 ? -rc : DROP_WRAP_FAILED, 0, 0);
    return TC_ACT_STOLEN;  /* counted; TC_ACT_SHOT would count it once more (see below) */
}

/* A copy wrapped on the sending end, on the far end: routed as its destination says,
 * from this clean softirq context. Its tag says why it came this way: its next hop
 * needed resolving, it is one segment of a super-packet wrapped once (over IPv6 its UDP
 * checksum is filled in here, per segment), or it goes whole to the IP stack. */
static __always_inline int route_wrapped(struct __sk_buff *skb, __u32 mark)
{
    struct copy_ref c;
    copy_ref_of(mark, &c);
    __u32 tag = mark & CLONE_TAG_MASK;
    if (tag == WRAPPED_FRAGMENT_TAG)
        return hand_to_stack(skb, &c);
    int fitted = tag == WRAPPED_TRUNCATED_TAG ? FIT_TRUNCATED : FIT_WHOLE;
    int rc = -DROP_NO_DESTINATION;
    if (c.d) {
        int v6 = c.d->mode == MODE_JMIRROR6;
        if (v6 && tag == WRAPPED_SEGMENTS_TAG && udp6_checksum(skb, c.d) < 0)
            rc = -DROP_WRAP_FAILED;
        else
            rc = send_routed(skb, v6 ? FAMILY_V6 : FAMILY_V4, c.d->src_addr,
                             c.d->dst_addr, c.d->udp_port, skb->len - ETH_HLEN, 0);
    }
    return count_result(c.rule_slot, c.ifslot, c.dest_slot, rc, skb->len, fitted);
}

/* The copies that went through the port: segmented, checksums finished; or already
 * wrapped on the sending end. */
int mirror_wrap(struct __sk_buff *skb)
{
    __u32 tag = skb->mark & CLONE_TAG_MASK;
    if (tag == WRAPPED_TAG || tag == WRAPPED_TRUNCATED_TAG || tag == WRAPPED_SEGMENTS_TAG ||
        tag == WRAPPED_FRAGMENT_TAG)
        return route_wrapped(skb, skb->mark);
    return wrap_copy(skb, 0);
}

/* Copies on mirror-tx's TC egress: finished ones are wrapped here, inline; the rest go
 * on into the veth (TC_ACT_OK) to be finished by the kernel and wrapped on the far end. */
int mirror_wrap_inline(struct __sk_buff *skb)
{
    if (skb->gso_size)
        return mark_direction(skb, wrap_super_packet(skb));
    if (needs_kernel_finish(skb))
        return mark_direction(skb, TC_ACT_OK);
    int rc = wrap_copy(skb, 1);
    /* A copy dropped here is counted by the wrapper; TC_ACT_SHOT would also fail the
     * classifier's bpf_clone_redirect (NET_XMIT_DROP) and count it twice. */
    return rc == TC_ACT_SHOT ? TC_ACT_STOLEN : rc;
}

int analyzer_port_rx(struct xdp_md *ctx)
{
    count_node(DROP_RX_BLOCKED);
    return XDP_DROP;
}
