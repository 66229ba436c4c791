/* Counting: every copy not delivered is counted under one drop reason (enum Drop in
 * agent/layout.py), per rule, interface and destination, or node-wide when it belongs to
 * none of them. Per-CPU counters (struct counters); the CLI and metrics sum the CPUs. */
#ifndef CN2M_LIB_COUNTERS_H
#define CN2M_LIB_COUNTERS_H

#include "lib/common.h"

/* A node-wide drop (one that belongs to no rule, interface or destination). */
static __always_inline void count_node(int drop)
{
    __u32 zero = 0;
    struct counters *c = stats_node.lookup(&zero);
    if (c && drop >= 0 && drop < N_DROPS)
        c->drops[drop]++;
}

/* How a delivered copy was fitted to its path, for its counters. */
#define FIT_WHOLE 0
#define FIT_TRUNCATED 1
#define FIT_FRAGMENTED 2

/* The counters a copy is counted under: its rule's, its interface's, its destination's. */
static __always_inline void copy_counters(__u32 rule_slot, __u32 ifslot, __u32 dest_slot,
                                          struct counters *cs[3])
{
    cs[0] = stats_rule.lookup(&rule_slot);
    cs[1] = stats_iface.lookup(&ifslot);
    cs[2] = stats_dest.lookup(&dest_slot);
}

static __always_inline void count_copy(__u32 rule_slot, __u32 ifslot, __u32 dest_slot,
                                       int drop, __u32 bytes, int fitted)
{
    struct counters *cs[3];
    copy_counters(rule_slot, ifslot, dest_slot, cs);
#pragma unroll
    for (int i = 0; i < 3; i++) {
        struct counters *c = cs[i];
        if (!c)
            continue;
        if (drop >= 0) {
            if (drop < N_DROPS)
                c->drops[drop]++;
        } else {
            c->packets++;
            c->bytes += bytes;
            c->truncated += fitted == FIT_TRUNCATED;
            c->fragmented += fitted == FIT_FRAGMENTED;
        }
    }
}

/* A GSO super-packet's way through the port, counted per rule, interface and
 * destination: wrapped once, or (when that was refused) segmented and wrapped one by
 * one. Its segments are counted as copies as they leave. */
static __always_inline void count_super_packet(__u32 rule_slot, __u32 ifslot,
                                               __u32 dest_slot, int wrapped_once)
{
    struct counters *cs[3];
    copy_counters(rule_slot, ifslot, dest_slot, cs);
#pragma unroll
    for (int i = 0; i < 3; i++) {
        struct counters *c = cs[i];
        if (!c)
            continue;
        if (wrapped_once)
            c->gso_wrapped++;
        else
            c->gso_by_segment++;
    }
}

/* Copies of one super-packet handed to a device that segments it: counted as the
 * segments it becomes. */
static __always_inline void count_segments(__u32 rule_slot, __u32 ifslot, __u32 dest_slot,
                                           __u32 segs, __u32 bytes)
{
    struct counters *cs[3];
    copy_counters(rule_slot, ifslot, dest_slot, cs);
#pragma unroll
    for (int i = 0; i < 3; i++) {
        struct counters *c = cs[i];
        if (c) {
            c->packets += segs;
            c->bytes += bytes;
        }
    }
}

static __always_inline int count_result(__u32 rule_slot, __u32 ifslot, __u32 dest_slot,
                                        int rc, __u32 len, int fitted)
{
    if (rc == TC_ACT_REDIRECT) {
        count_copy(rule_slot, ifslot, dest_slot, -1, len, fitted);
        return rc;
    }
    count_copy(rule_slot, ifslot, dest_slot, rc < 0 ? -rc : DROP_REDIRECT_FAILED, 0, 0);
    return TC_ACT_SHOT;
}

#endif /* CN2M_LIB_COUNTERS_H */
