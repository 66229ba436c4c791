/* Snap length, sampling and copy budgets (issue 15). Sampling and budgets: whether a copy is made at all, decided in the
 * classifier before the clone, so that a copy not made costs no clone, no head copy of
 * the production packet, no wrap. The limits come from the copy_limits map
 * (agent/layout.py CopyLimits): one entry per destination slot, the node's in slot
 * COPY_LIMITS_NODE (0, which no destination has).
 *
 * Sampling: one packet in `sample_every`, chosen at random per packet
 * (bpf_get_prandom_u32): no aliasing with periodic traffic (a request/response pair and
 * 1:2 would otherwise copy one direction only). A GSO super-packet is one packet here: it
 * is copied, all its segments, or not at all. Copies not made are counted as
 * sampled_out (not a drop: it is what was asked for).
 *
 * Budgets: packets/s and bits/s per destination and for the node, each a token bucket
 * kept as a virtual clock (GCRA): a copy of cost c is made when the clock, brought up to
 * at least now - burst, is still at or behind now - c; making it moves the clock on by c.
 * The clocks are shared by all CPUs (copy_budget, an ordinary array) and moved with
 * atomic adds: per-CPU buckets would split each budget by the number of CPUs and starve
 * a destination whose traffic lands on one CPU (one flow, one RSS queue). Contention is
 * on one cache line per destination, touched only by packets that are copied anyway
 * (each of which also pays a clone). The read-check-add is not one atomic step: CPUs
 * that check at the same instant may each take the last c, so a budget can be overrun
 * by one copy per CPU at a time, never over a second. A copy refused by a later bucket
 * gives back what the earlier ones took. The packet cost of a GSO super-packet is its
 * segment count; the byte cost its length (the mirrored bytes, before the wrap's
 * headers). Copies not made are counted as the drop rate_limited. */

#ifndef CN2M_LIB_COPY_LIMITS_H
#define CN2M_LIB_COPY_LIMITS_H

#include "lib/common.h"

static __always_inline int budget_take(__u64 *clock, __u64 cost, __u64 burst, __u64 now)
{
    __u64 t = *(volatile __u64 *)clock;
    __u64 floor = now > burst ? now - burst : 0;
    if (t < floor) {
        /* Idle for longer than the burst: the bucket is full. (A plain store: an add of
         * another CPU in this instant may be lost, letting one more copy through.) */
        *(volatile __u64 *)clock = floor;
        t = floor;
    }
    if (t + cost > now)
        return 0;
    __sync_fetch_and_add(clock, cost);
    return 1;
}

static __always_inline void budget_give_back(__u64 *clock, __u64 cost)
{
    __sync_fetch_and_add(clock, -cost);
}

/* Take a copy's cost from one scope's buckets (a destination's, or the node's); 1 when
 * both had room (or the scope has no budget). */
static __always_inline int budget_admit(__u32 slot, struct copy_limits_entry *lim,
                                        __u64 segs, __u64 bytes, __u64 now)
{
    if (!lim->packet_cost && !lim->byte_cost)
        return 1;
    struct copy_budget_clock *clk = copy_budget.lookup(&slot);
    if (!clk)
        return 1;
    __u64 pcost = (segs * lim->packet_cost) >> BUDGET_COST_SHIFT;
    __u64 bcost = (bytes * lim->byte_cost) >> BUDGET_COST_SHIFT;
    if (lim->packet_cost && !budget_take(&clk->packet_ns, pcost, lim->burst_ns, now))
        return 0;
    if (lim->byte_cost && !budget_take(&clk->byte_ns, bcost, lim->burst_ns, now)) {
        if (lim->packet_cost)
            budget_give_back(&clk->packet_ns, pcost);
        return 0;
    }
    return 1;
}

static __always_inline void budget_refund(__u32 slot, struct copy_limits_entry *lim,
                                          __u64 segs, __u64 bytes)
{
    struct copy_budget_clock *clk = copy_budget.lookup(&slot);
    if (!clk)
        return;
    if (lim->packet_cost)
        budget_give_back(&clk->packet_ns, (segs * lim->packet_cost) >> BUDGET_COST_SHIFT);
    if (lim->byte_cost)
        budget_give_back(&clk->byte_ns, (bytes * lim->byte_cost) >> BUDGET_COST_SHIFT);
}

/* A copy not made, counted under its rule, interface and destination (like a copy). */
static __always_inline void count_not_made(__u32 rule_slot, __u16 ifslot, __u32 dest_slot,
                                           int sampled_out)
{
    __u32 islot = ifslot;
    struct counters *cs[3];
    cs[0] = stats_rule.lookup(&rule_slot);
    cs[1] = stats_iface.lookup(&islot);
    cs[2] = stats_dest.lookup(&dest_slot);
#pragma unroll
    for (int i = 0; i < 3; i++) {
        struct counters *c = cs[i];
        if (!c)
            continue;
        if (sampled_out)
            c->sampled_out++;
        else
            c->drops[DROP_RATE_LIMITED]++;
    }
}

/* Whether the copy of this packet for `rule_slot` is to be made: sampling, then the
 * destination's budget, then the node's. */
static __always_inline int copy_admitted(struct __sk_buff *skb, __u16 ifslot,
                                         __u32 rule_slot)
{
    struct rule_entry *r = rules.lookup(&rule_slot);
    __u32 dest_slot = r ? r->dest : 0;
    __u32 node_slot = COPY_LIMITS_NODE;
    struct copy_limits_entry *dl = dest_slot ? copy_limits.lookup(&dest_slot) : NULL;
    struct copy_limits_entry *nl = copy_limits.lookup(&node_slot);
    if (dl && dl->sample_every > 1 && bpf_get_prandom_u32() % dl->sample_every) {
        count_not_made(rule_slot, ifslot, dest_slot, 1);
        return 0;
    }
    int dest_budget = dl && (dl->packet_cost || dl->byte_cost);
    int node_budget = nl && (nl->packet_cost || nl->byte_cost);
    if (!dest_budget && !node_budget)
        return 1;
    __u64 segs = skb->gso_segs ? skb->gso_segs : 1;
    __u64 bytes = skb->len;
    __u64 now = bpf_ktime_get_ns();
    if (dest_budget && !budget_admit(dest_slot, dl, segs, bytes, now)) {
        count_not_made(rule_slot, ifslot, dest_slot, 0);
        return 0;
    }
    if (node_budget && !budget_admit(node_slot, nl, segs, bytes, now)) {
        if (dest_budget)
            budget_refund(dest_slot, dl, segs, bytes);
        count_not_made(rule_slot, ifslot, dest_slot, 0);
        return 0;
    }
    return 1;
}

/* Snap length: a copy cut to `snap_length` bytes after its Ethernet header before it is
 * wrapped (like AWS Traffic Mirroring's PacketLength). Only the tail goes: the IP header
 * keeps the original total length and the TCP/UDP header its original checksum, so an
 * analyzer sees that the packet was cut, and the checksum never verifies over the bytes
 * it got (it is the whole packet's). Counted as truncated, like a copy cut to fit the
 * path. Never applied to a GSO super-packet (bpf_skb_change_tail would linearize it
 * whole): those are segmented first and each segment is cut (snap_applies_whole). */
static __always_inline int snap_length_of(__u32 dest_slot)
{
    struct copy_limits_entry *lim = copy_limits.lookup(&dest_slot);
    return lim ? lim->snap_length : 0;
}

/* 1: cut; 0: short enough already; -1: the cut failed. */
static __always_inline int snap_copy(struct __sk_buff *skb, __u32 dest_slot)
{
    __u32 snap = snap_length_of(dest_slot);
    if (!snap || skb->len <= ETH_HLEN + snap)
        return 0;
    return bpf_skb_change_tail(skb, ETH_HLEN + snap, 0) < 0 ? -1 : 1;
}

#endif /* CN2M_LIB_COPY_LIMITS_H */
