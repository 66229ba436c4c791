/* Rule evaluation: which rules a flow matches, walked over the match bitmaps. */
#ifndef CN2M_LIB_RULE_WALK_H
#define CN2M_LIB_RULE_WALK_H

#include "lib/common.h"

/* Index of the single set bit of v, without branches (BPF has no ctz, and every branch
 * in the rule walk costs verifier states): the number of bits below it. */
static __always_inline __u32 bit_index(__u64 v)
{
    __u64 x = v - 1;
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (x * 0x0101010101010101ULL) >> 56;
}

/* The rules a flow matches are the AND of four bitmaps: the interface's (policies that
 * apply to the pod), the source address's, the destination address's and the
 * (protocol, port)'s, each found with one lookup. Bits are ordered by policy, then rule,
 * so the lowest matching bit of a policy is its first matching rule; the rest of that
 * policy is then skipped. Summary bits mark the non-zero words, so only words that can
 * match are read: the cost follows the number of candidate words, not of rules.
 *
 * The walk keeps its state in struct eval_scratch (eval_scratch_map, per CPU, pinned:
 * see agent/layout.py) and continues in eval_continue (bpf/classifier.c) by tail calls. */

struct eval_bitmaps {
    struct match_bits *src, *dst, *port;
    struct iface_entry *ifc;
};

/* Bits of `word` at or above rule slot `slot`, without branches. */
static __always_inline __u64 mask_from(__u32 word, __u32 slot)
{
    __s64 d = (__s64)slot - (__s64)word * 64;
    d &= ~(d >> 63);                       /* below the word: every bit */
    __u64 past = (__u64)((63 - d) >> 63);  /* 1 when the slot is past the word */
    return (~0ULL << (d & 63)) & (past - 1);
}

/* Steps per program run. The walk continues in the next run (a tail call of
 * eval_continue into itself) until it is done: one step per candidate word, one per
 * policy that decided, one per summary word, so at most RULE_WORDS + 64 + SUMMARY_WORDS
 * per orientation, well inside the 33 tail calls the kernel allows. */
#define EVAL_STEPS 96

/* Returns 1 when the walk is done, 0 when it needs another run. */
static __always_inline int eval_walk(struct eval_scratch *s, struct eval_bitmaps *b)
{
    for (int i = 0; i < EVAL_STEPS; i++) {
        if (!s->bits) {
            if (!s->cur) {
                __u32 sw = s->sw + 1;
                if (sw >= SUMMARY_WORDS)
                    return 1;  /* no candidates left: done */
                s->sw = sw;
                s->cur = s->cand[sw];
                continue;
            }
            /* The next candidate word. */
            __u64 low = s->cur & -s->cur;
            s->cur ^= low;
            __u32 sw = s->sw;
            if (sw >= SUMMARY_WORDS)
                return 1;
            __u32 w = sw * 64 + bit_index(low);
            if (w >= RULE_WORDS)
                return 1;
            s->word = w;
            s->bits = b->src->bits[w] & b->dst->bits[w] & b->port->bits[w] &
                      b->ifc->bits[w] & mask_from(w, s->skip_below);
            continue;
        }
        __u64 low = s->bits & -s->bits;
        __u32 slot = s->word * 64 + bit_index(low);
        s->bits ^= low;
        struct rule_entry *r = rules.lookup(&slot);
        if (!r)
            continue;
        if (r->flags & RULE_MIRRORS) {
            __u32 n = s->n;
            if (n < MAX_FLOW_DESTS) {
                s->rules[n] = slot;
                s->n = n + 1;
            } else {
                s->overflow++;  /* the flow is full: nothing further can be added */
                return 1;
            }
        }
        /* The first matching rule of a policy decides: skip the rest of the policy. */
        s->skip_below = r->policy_end;
        s->bits &= mask_from(s->word, r->policy_end);
    }
    return 0;
}

static __always_inline struct match_bits *lookup_addr(int src_side, __u8 family, __u32 *addr)
{
    if (family == FAMILY_V4) {
        struct lpm_v4_key k = {.prefixlen = 32};
        __builtin_memcpy(k.addr, addr, 4);
        return src_side ? src_v4.lookup(&k) : dst_v4.lookup(&k);
    }
    struct lpm_v6_key k = {.prefixlen = 128};
    __builtin_memcpy(k.addr, addr, 16);
    return src_side ? src_v6.lookup(&k) : dst_v6.lookup(&k);
}

/* The four bitmaps of the orientation being evaluated; 0 when one is missing (then
 * nothing can match that way round). */
static __always_inline int eval_bitmaps(struct eval_scratch *s, struct eval_bitmaps *b)
{
    struct parsed *p = &s->p;
    __u32 ifindex = s->ifindex;
    b->ifc = interfaces.lookup(&ifindex);
    int rev = s->orientation;
    b->src = lookup_addr(1, p->family, rev ? p->dst : p->src);
    b->dst = lookup_addr(0, p->family, rev ? p->src : p->dst);
    struct lpm_port_key pk = {.prefixlen = 24};
    pk.data[0] = p->proto;
    __u16 dport = rev ? p->sport : p->dport;
    __builtin_memcpy(&pk.data[1], &dport, 2);
    b->port = ports.lookup(&pk);
    return b->ifc && b->src && b->dst && b->port;
}

/* Start the walk of the current orientation. */
static __always_inline void eval_start(struct eval_scratch *s, struct eval_bitmaps *b)
{
#pragma unroll
    for (int j = 0; j < SUMMARY_WORDS; j++)
        s->cand[j] = b->src->summary[j] & b->dst->summary[j] & b->port->summary[j] &
                     b->ifc->summary[j];
    s->sw = 0;
    s->cur = s->cand[0];
    s->bits = 0;
    s->skip_below = 0;
}

#endif /* CN2M_LIB_RULE_WALK_H */
