/* Copies made on a pod interface: a clone of the packet handed to the mirror port with
 * its (interface, rule) in skb->mark (or, pod-side, back out of the pod's device). */
#ifndef CN2M_LIB_CLONE_H
#define CN2M_LIB_CLONE_H

#include "lib/common.h"
#include "lib/copy_limits.h"

/* `rule_ref`: the rule slot, from a flow entry maybe marked FLOW_RULE_SAMPLED_OUT;
 * `of_flow`: flow mirroring (0: port mirroring). */
static __always_inline void send_copy(struct __sk_buff *skb, __u32 mirror_ifindex,
                                      __u16 ifslot, __u32 rule_ref, int of_flow,
                                      __u64 peer_secret)
{
    /* Sampling and copy budgets (lib/copy_limits.h): a copy not made costs no clone. */
    if (!copy_admitted(skb, ifslot, rule_ref, of_flow))
        return;
    __u32 rule_slot = rule_ref & ~FLOW_RULE_SAMPLED_OUT;
    __u32 tag = CLONE_TAG | ((__u32)ifslot << CLONE_IFSLOT_SHIFT) | (rule_slot & CLONE_RULE_MASK);
    long err;
    if (peer_secret) {
        /* Inside a pod's namespace (pod-side attachment): the mirror port is out of
         * reach and the mark does not survive the veth, so the clone goes back out of
         * the pod's own device with the secret and its tag in cb[], and the host side
         * (classify_from_pod_peer) hands it to the mirror port. */
        __u32 c0 = skb->cb[0], c1 = skb->cb[1], c2 = skb->cb[2];
        skb->cb[0] = (__u32)peer_secret;
        skb->cb[1] = (__u32)(peer_secret >> 32);
        skb->cb[2] = tag;
        err = bpf_clone_redirect(skb, skb->ifindex, 0);
        skb->cb[0] = c0;
        skb->cb[1] = c1;
        skb->cb[2] = c2;
    } else {
        __u32 saved = skb->mark;
        skb->mark = tag;
        err = bpf_clone_redirect(skb, mirror_ifindex, 0);
        skb->mark = saved;
    }
    struct counters *c = stats_rule.lookup(&rule_slot);
    if (c) {
        if (err)
            c->drops[DROP_CLONE_FAILED]++;
        else
            c->cloned++;
    }
}

/* The copies of one packet of an evaluated flow. */
static __always_inline void mirror_flow(struct __sk_buff *skb, __u32 mirror_ifindex,
                                        __u16 ifslot, struct flow_entry *fe,
                                        __u64 peer_secret)
{
    fe->last_seen_ns = bpf_ktime_get_coarse_ns();  /* cheaper; jiffy resolution */
    __u32 n = fe->n_rules;
    if (!n)
        return;
    fe->packets++;
    fe->bytes += skb->len;
#pragma unroll
    for (int i = 0; i < MAX_FLOW_DESTS; i++) {
        if (i < n)
            send_copy(skb, mirror_ifindex, ifslot, fe->rules[i], 1, peer_secret);
    }
}

#endif /* CN2M_LIB_CLONE_H */
