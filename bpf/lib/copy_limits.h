/* Snap length, sampling and copy budgets (issue 15). Sampling and budgets: whether a copy is made at all, decided in the
 * classifier before the clone, so that a copy not made costs no clone, no head copy of
 * the production packet, no wrap. The limits come from the copy_limits map
 * (agent/layout.py CopyLimits): one entry per destination slot, the node's in slot
 * COPY_LIMITS_NODE (0, which no destination has).
 *
 * Sampling: one packet in `sample_every` (SAMPLE_BY_PACKET), chosen at random per packet
 * (bpf_get_prandom_u32): no aliasing with periodic traffic (a request/response pair and
 * 1:2 would otherwise copy one direction only). A GSO super-packet is one packet here: it
 * is copied, all its segments, or not at all. Or one flow in `sample_every`
 * (SAMPLE_BY_FLOW): decided once, when the flow is evaluated, by flow_sample_hash() of
 * its canonical 5-tuple (so both directions, and every interface and node, decide
 * alike), and kept in the flow entry (FLOW_RULE_SAMPLED_OUT on the rule's slot). Port
 * mirroring has no flows: it samples by packet whatever the mode. A rule's own sampling
 * (rule_sampling, set from its policy) replaces its destination's. Copies not made are
 * counted as sampled_out (not a drop: it is what was asked for).
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

/* MurmurHash3 (x86, 32 bits) of a flow key's 5-tuple, the interface slot left out: the
 * twin of agent/layout.py flow_sample_hash(), which tests predict the sampled flows by. */
static __always_inline __u32 murmur_mix(__u32 h, __u32 k)
{
    k *= 0xcc9e2d51U;
    k = (k << 15) | (k >> 17);
    k *= 0x1b873593U;
    h ^= k;
    h = (h << 13) | (h >> 19);
    return h * 5 + 0xe6546b64U;
}

static __always_inline __u32 flow_sample_hash(struct flow_key *key, __u32 seed)
{
    __u32 w[10];
    __builtin_memcpy(w, key, sizeof(w));
    w[9] &= 0xFFFF;  /* proto, family; not ifslot */
    __u32 h = seed ? seed : SAMPLE_SEED;  /* the node's (config), else the default */
#pragma unroll
    for (int i = 0; i < 10; i++)
        h = murmur_mix(h, w[i]);
    h ^= 40;
    h ^= h >> 16;
    h *= 0x85ebca6bU;
    h ^= h >> 13;
    h *= 0xc2b2ae35U;
    return h ^ (h >> 16);
}

/* The sampling that applies to a rule's copies: the rule's own when it has one
 * (RULE_OWN_SAMPLING: only then is rule_sampling looked up), else its destination's
 * (`dl`, may be NULL). */
static __always_inline __u32 sampling_of(__u32 rule_slot, struct rule_entry *r,
                                         struct copy_limits_entry *dl, __u32 *by)
{
    if (r && (r->flags & RULE_OWN_SAMPLING)) {
        struct rule_sampling_entry *rs = rule_sampling.lookup(&rule_slot);
        if (rs && rs->sample_every) {
            *by = rs->sample_by;
            return rs->sample_every;
        }
    }
    *by = dl ? dl->sample_by : SAMPLE_BY_PACKET;
    return dl ? dl->sample_every : 0;
}

/* When a flow is evaluated: its rule slot as the flow entry keeps it, with
 * FLOW_RULE_SAMPLED_OUT when the rule samples by flow and this flow is not one of its 1
 * in N. */
static __always_inline __u32 flow_rule_ref(__u32 rule_slot, __u32 flow_hash)
{
    struct rule_entry *r = rules.lookup(&rule_slot);
    __u32 dest_slot = r ? r->dest : 0;
    struct copy_limits_entry *dl = dest_slot ? copy_limits.lookup(&dest_slot) : NULL;
    __u32 by = SAMPLE_BY_PACKET;
    __u32 every = sampling_of(rule_slot, r, dl, &by);
    if (by == SAMPLE_BY_FLOW && every > 1 && flow_hash % every)
        return rule_slot | FLOW_RULE_SAMPLED_OUT;
    return rule_slot;
}

/* Whether the copy of this packet for `rule_ref` (a rule slot; from a flow entry, maybe
 * with FLOW_RULE_SAMPLED_OUT) is to be made: sampling, then the destination's budget,
 * then the node's. `of_flow`: the packet's flow was evaluated (flow mirroring), so
 * sampling by flow was decided then. */
static __always_inline int copy_admitted(struct __sk_buff *skb, __u16 ifslot,
                                         __u32 rule_ref, int of_flow)
{
    __u32 rule_slot = rule_ref & ~FLOW_RULE_SAMPLED_OUT;
    struct rule_entry *r = rules.lookup(&rule_slot);
    __u32 dest_slot = r ? r->dest : 0;
    if (rule_ref & FLOW_RULE_SAMPLED_OUT) {  /* decided when the flow was evaluated */
        count_not_made(rule_slot, ifslot, dest_slot, 1);
        return 0;
    }
    struct copy_limits_entry *dl = dest_slot ? copy_limits.lookup(&dest_slot) : NULL;
    __u32 by = SAMPLE_BY_PACKET;
    __u32 every = sampling_of(rule_slot, r, dl, &by);
    if (every > 1 && (by == SAMPLE_BY_PACKET || !of_flow) &&
        bpf_get_prandom_u32() % every) {
        count_not_made(rule_slot, ifslot, dest_slot, 1);
        return 0;
    }
    __u32 node_slot = COPY_LIMITS_NODE;
    struct copy_limits_entry *nl = copy_limits.lookup(&node_slot);
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
