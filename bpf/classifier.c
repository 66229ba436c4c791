/* Pod-interface classifier: TC ingress (out of the pod) and egress (into the pod) of the
 * pod's host-side interface.
 *
 * For every packet: port mirroring (no flow lookup), then flow mirroring: the flow table
 * caches the verdict of the flow's first packet, evaluated against the rules in the maps.
 * Each copy is a clone handed to the mirror port with its (interface, rule) in skb->mark;
 * the production packet's mark is restored and it always continues with TC_ACT_UNSPEC,
 * unchanged, so the CNI's own programs still run after us.
 */

#include "lib/common.h"
#include "lib/parse.h"
#include "lib/flow.h"
#include "lib/flow_cache.h"
#include "lib/rule_walk.h"
#include "lib/clone.h"
#include "lib/counters.h"

/* `ifindex`: the pod's host-side interface (the key of `interfaces`); `peer_secret`: 0
 * on the host side, else the pod-side attachment's secret (see send_copy). */
static __always_inline int classify(struct __sk_buff *skb, int dir, __u32 ifindex,
                                    __u64 peer_secret)
{
    if (skb->mark == COPY_MARK)
        return TC_ACT_UNSPEC;  /* one of our own copies passing by: never mirror it */
    __u32 zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->mirror_ifindex)
        return TC_ACT_UNSPEC;
    /* Read before anything the verdict depends on: the agent bumps the generation after
     * writing the maps, so a verdict cached under it never mixes in older maps. */
    __u32 generation = cfg->generation;

    /* An established flow mirrored by no rule: the per-CPU flow cache. The slot is read
     * only when its tag matches: a new flow's probe then touches only the small, hot tag
     * array, not a cold slot. (The probe's words are written by cache_probe() before any
     * read: left uninitialised here, which the fast path notices.) */
    union cache_probe probe;
    probe.w[6] = (__u32)bpf_jiffies64();  /* tick; port_rule 0 */
    probe.w[7] = 0;
    int cacheable = cache_probe(skb, &probe, (__u64)ifindex << 32,
                                ((__u64)generation << 32) | ((__u64)(dir & 0xFF) << 16));
    __u64 h = 0;
    if (cacheable) {
        h = flow_cache_hash(&probe);
        __u32 slot = CACHE_SLOT(h);
        struct flow_cache_tags *t = flow_cache_tags.lookup(&zero);
        if (t && t->tag[slot & (FLOW_CACHE_SLOTS - 1)] == CACHE_TAG(h)) {
            struct flow_cache_entry *c = flow_cache.lookup(&slot);
            if (c && cache_same(c, &probe) && c->tick == probe.e.tick) {
                if (c->port_rule)
                    send_copy(skb, cfg->mirror_ifindex, c->ifslot, c->port_rule, 0,
                              peer_secret);
                return TC_ACT_UNSPEC;
            }
        }
    }

    struct iface_entry *ifc = interfaces.lookup(&ifindex);
    if (!ifc)
        return TC_ACT_UNSPEC;
    __u16 ifslot = ifc->ifslot;
    __u32 port_rule = ifc->port_rule[dir & 1];
    if (!(ifc->flags & IFACE_HAS_POLICIES) && !port_rule)
        return TC_ACT_UNSPEC;

    struct parsed p = {};
    parse(skb, &p);
    /* Copies on their way to an analyzer (from another node) are never mirrored. Per
     * packet only for port mirroring; a flow is checked once, when it is evaluated. */
    __u32 port_copy = 0;
    if (port_rule && !(p.ok && is_copy_stream(&p))) {
        port_copy = port_rule;
        send_copy(skb, cfg->mirror_ifindex, ifslot, port_rule, 0, peer_secret);
    }

    if (!(ifc->flags & IFACE_HAS_POLICIES) || !p.ok)
        return TC_ACT_UNSPEC;

    make_key(&p, ifslot);
    cacheable = cacheable && probe_is(&probe, &p);
    struct flow_entry *fe = flows.lookup(&p.key);
    if (fe && fe->generation == generation) {
        mirror_flow(skb, cfg->mirror_ifindex, ifslot, fe, peer_secret);
        if (cacheable && !fe->n_rules)
            cache_fill(&probe, h, port_copy, ifslot);
        return TC_ACT_UNSPEC;
    }
    /* First packet of the flow, or the policy changed since: evaluate it, in
     * eval_continue (a tail call, so that the walk gets its own verifier budget). */
    struct eval_scratch *s = eval_scratch_map.lookup(&zero);
    if (!s)
        return TC_ACT_UNSPEC;
    s->p = p;
    s->ifindex = ifindex;
    s->orientation = 0;
    s->n = 0;
    s->overflow = 0;
    s->started = 0;
    s->never = is_copy_stream(&p);
    s->generation = generation;
    s->had_old = fe != NULL;
    s->peer_secret = peer_secret;
    eval_progs.call(skb, 0);
    /* Only reached when the continuation is missing (agent mid-restart). */
    count_node(DROP_NO_DESTINATION);
    return TC_ACT_UNSPEC;
}

/* Continue (or start) the rule walk of the flow in the scratch area; when it is done,
 * cache the verdict in the flow table and send this packet's copies. */
int eval_continue(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct eval_scratch *s = eval_scratch_map.lookup(&zero);
    struct config *cfg = config.lookup(&zero);
    if (!s || !cfg)
        return TC_ACT_UNSPEC;
    struct eval_bitmaps b = {};
    int have = eval_bitmaps(s, &b);
    if (have && !s->started) {
        eval_start(s, &b);  /* first run of this orientation */
        s->started = 1;
    }
    int done = s->never || !have || eval_walk(s, &b);
    if (!done) {
        eval_progs.call(skb, 0);
        /* Out of tail calls: keep what the walk found, marked and counted as cut short,
         * rather than leave the flow to be walked again on every packet. */
        s->overflow++;
    } else if (s->orientation == 0 && s->n == 0 && s->overflow == 0 && !s->never &&
               !s->p.tcp_syn_only) {
        /* Seen mid-connection (not a TCP SYN) and nothing mirrored this way round: the
         * packet may be a reply, so try the flow's other orientation too. */
        s->orientation = 1;
        s->started = 0;
        eval_progs.call(skb, 0);
    }
    struct flow_key key = s->p.key;
    __u64 now = bpf_ktime_get_coarse_ns();
    struct flow_entry fresh = {};
    fresh.generation = s->generation;
    __u32 n_rules = s->n;
    fresh.n_rules = n_rules < MAX_FLOW_DESTS ? n_rules : MAX_FLOW_DESTS;
    /* Sampling by flow is decided here, once per flow (lib/copy_limits.h). */
    __u32 sample_hash = n_rules ? flow_sample_hash(&key, cfg->sample_seed) : 0;
#pragma unroll
    for (int i = 0; i < MAX_FLOW_DESTS; i++)
        fresh.rules[i] = i < n_rules ? flow_rule_ref(s->rules[i], sample_hash) : 0;
    __u32 overflow = s->overflow;
    fresh.flags = (overflow ? FLOW_OVERFLOW : 0) | (s->never ? FLOW_NEVER_MIRROR : 0) |
                  (s->p.src_is_lo ? FLOW_INITIATOR_LO : 0);
    fresh.first_seen_ns = now;
    fresh.last_seen_ns = now;
    __u32 n = fresh.n_rules;
    if (n) {
        fresh.packets = 1;
        fresh.bytes = skb->len;
    }
    /* A new flow is inserted (BPF_NOEXIST: no lookup first); a flow re-evaluated after a
     * policy change is rewritten in place and keeps its history. */
    struct flow_entry *old = NULL;
    if (s->had_old)
        old = flows.lookup(&key);
    else if (flows.insert(&key, &fresh) == 0)
        count_flow_created();  /* every entry created is counted: see count_flow_created */
    else
        old = flows.lookup(&key);  /* another CPU inserted it meanwhile */
    if (old) {
        old->n_rules = fresh.n_rules;
#pragma unroll
        for (int i = 0; i < MAX_FLOW_DESTS; i++)
            old->rules[i] = fresh.rules[i];
        old->flags = (fresh.flags & ~FLOW_INITIATOR_LO) | (old->flags & FLOW_INITIATOR_LO);
        old->last_seen_ns = now;
        if (n) {
            old->packets++;
            old->bytes += skb->len;
        }
        /* The generation last: a reader that sees it sees the verdict it belongs to. */
        asm volatile("" ::: "memory");
        old->generation = fresh.generation;
    } else if (s->had_old) {
        /* Evicted meanwhile: created again. (When another CPU has just created it,
         * its entry stays: no write here ever creates an entry uncounted.) */
        if (flows.insert(&key, &fresh) == 0)
            count_flow_created();
    }
    if (overflow) {
        __u32 slot = key.ifslot;
        struct counters *c = stats_iface.lookup(&slot);
        if (c)
            c->drops[DROP_FLOW_LIMIT] += overflow;
    }
    /* This packet's copies, from the entry just built (no second lookup). */
#pragma unroll
    for (int i = 0; i < MAX_FLOW_DESTS; i++) {
        if (i < n && cfg->mirror_ifindex)
            send_copy(skb, cfg->mirror_ifindex, key.ifslot, fresh.rules[i], 1,
                      s->peer_secret);
    }
    return TC_ACT_UNSPEC;
}

int classify_from_pod(struct __sk_buff *skb)
{
    return classify(skb, DIR_EGRESS, skb->ifindex, 0);
}

int classify_to_pod(struct __sk_buff *skb)
{
    return classify(skb, DIR_INGRESS, skb->ifindex, 0);
}

/* ------------------------------------------------------------------ pod-side attachment
 * For CNIs that deliver pod-bound traffic with bpf_redirect_peer (Cilium with BPF host
 * routing), straight into the pod's eth0: the host-side veth's egress never sees it. The
 * to-pod direction is then classified on the ingress of the pod's own device, inside the
 * pod's network namespace (classify_to_pod_peer); the from-pod direction stays on the
 * host-side veth's ingress (classify_from_pod_peer), which also takes the copies the
 * pod side sends back and hands them to the mirror port. */
int classify_to_pod_peer(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct peer_config_entry *pc = peer_config.lookup(&zero);
    if (!pc || !pc->secret)
        return TC_ACT_UNSPEC;
    /* The pod's stub (agent/datapath.py) passed its host-side ifindex in cb[]: inside
     * the pod's namespace, skb->ifindex says nothing about which pod this is. */
    __u32 host = skb->cb[POD_SIDE_CB];
    skb->cb[POD_SIDE_CB] = 0;
    if (!host)
        return TC_ACT_UNSPEC;
    return classify(skb, DIR_INGRESS, host, pc->secret);
}

int classify_from_pod_peer(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct peer_config_entry *pc = peer_config.lookup(&zero);
    if (pc && pc->secret && skb->cb[0] == (__u32)pc->secret &&
        skb->cb[1] == (__u32)(pc->secret >> 32)) {
        /* A copy from the pod side (only our program knows the secret): never
         * production traffic, never handed to the CNI. */
        __u32 tag = skb->cb[2];
        skb->cb[0] = 0;
        skb->cb[1] = 0;
        skb->cb[2] = 0;
        struct config *cfg = config.lookup(&zero);
        if (!cfg || !cfg->mirror_ifindex || (tag & CLONE_TAG_MASK) != CLONE_TAG)
            return TC_ACT_SHOT;
        skb->mark = tag;
        return bpf_redirect(cfg->mirror_ifindex, 0);
    }
    return classify(skb, DIR_EGRESS, skb->ifindex, 0);
}
