/* Pod-interface classifier: TC ingress (out of the pod) and egress (into the pod) of the
 * pod's host-side interface.
 *
 * For every packet: port mirroring (no flow lookup), then flow mirroring: the flow table
 * caches the verdict of the flow's first packet, evaluated against the rules in the maps.
 * Each copy is a clone handed to the mirror port with its (interface, rule) in skb->mark;
 * the production packet's mark is restored and it always continues with TC_ACT_UNSPEC,
 * unchanged, so the CNI's own programs still run after us.
 */

struct parsed {
    struct flow_key key;     /* canonical: lower (addr, port) side first */
    __u32 src[4], dst[4];    /* as seen in this packet, network order */
    __u16 sport, dport;      /* network order; 0 when the packet has none */
    __u8 proto;
    __u8 family;
    __u8 tcp_syn_only;       /* SYN without ACK: certainly the flow's first packet */
    __u8 ok;                 /* an IP packet we could read the addresses of */
    __u8 src_is_lo;          /* this packet travels from the key's lower side */
    __u8 quoted_udp;         /* an ICMP error quoting a UDP datagram: */
    __u16 quoted_dport;      /*   its destination port, network order */
    __u32 quoted_dst[4];     /*   and address */
};

/* Returns a pointer to len bytes at off: straight into the packet when they are in the
 * linear area, else copied into buf. NULL when the packet is shorter. */
/* skb->data and skb->data_end as direct context loads: left to itself, clang may form
 * a pointer into the context first, which the verifier refuses. */
#define CTX_LOAD(skb, field) ({                                                 \
    void *v_;                                                                   \
    asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(v_)                           \
                 : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, field))); \
    v_; })

static __always_inline void *header(struct __sk_buff *skb, __u32 off, void *buf, __u32 len)
{
    void *data = CTX_LOAD(skb, data);
    void *data_end = CTX_LOAD(skb, data_end);
    if (off > 0xFFFF)
        return NULL;
    if (data + off + len <= data_end)
        return data + off;
    if (bpf_skb_load_bytes(skb, off, buf, len) < 0)
        return NULL;
    return buf;
}

static __always_inline int is_ipv6_ext(__u8 nh)
{
    return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
           nh == IPPROTO_FRAGMENT || nh == IPPROTO_AH;
}

/* An ICMP error quotes the packet it answers. When that packet was a UDP datagram, note
 * where it went: an error about a copy sent to an analyzer is part of the copy stream. */
static __always_inline void parse_quoted(struct __sk_buff *skb, __u32 off, struct parsed *p)
{
    __u8 buf[44];
    if (p->family == FAMILY_V4) {
        struct iphdr *ip = header(skb, off, buf, sizeof(*ip));
        if (!ip || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
            return;
        p->quoted_dst[0] = ip->daddr;
        __u16 *ports = header(skb, off + ip->ihl * 4, buf, 4);
        if (!ports)
            return;
        p->quoted_dport = ports[1];
        p->quoted_udp = 1;
    } else {
        __u8 *ip6 = header(skb, off, buf, 44);
        if (!ip6 || ip6[6] != IPPROTO_UDP)
            return;
        __builtin_memcpy(p->quoted_dst, &ip6[24], 16);
        p->quoted_dport = *(__u16 *)&ip6[42];
        p->quoted_udp = 1;
    }
}

/* Ports of TCP, UDP and SCTP (same place), ICMP echo identifiers as both ports (so the
 * request and its reply share a flow); zero for everything else. */
static __always_inline void parse_l4(struct __sk_buff *skb, __u32 off, struct parsed *p)
{
    __u8 buf[14];
    if (p->proto == IPPROTO_TCP) {
        __u8 *h = header(skb, off, buf, 14);
        if (!h)
            return;
        p->sport = *(__u16 *)&h[0];
        p->dport = *(__u16 *)&h[2];
        p->tcp_syn_only = (h[13] & 0x12) == 0x02;
    } else if (p->proto == IPPROTO_UDP || p->proto == IPPROTO_SCTP ||
               p->proto == IPPROTO_UDPLITE) {
        __u8 *h = header(skb, off, buf, 4);
        if (!h)
            return;
        p->sport = *(__u16 *)&h[0];
        p->dport = *(__u16 *)&h[2];
    } else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
        __u8 *h = header(skb, off, buf, 6);
        if (!h)
            return;
        __u8 type = h[0];
        if ((p->proto == IPPROTO_ICMP && (type == 8 || type == 0)) ||
            (p->proto == IPPROTO_ICMPV6 && (type == 128 || type == 129))) {
            p->sport = *(__u16 *)&h[4];
            p->dport = p->sport;
        } else if ((p->proto == IPPROTO_ICMP && (type == 3 || type == 11 || type == 12)) ||
                   (p->proto == IPPROTO_ICMPV6 && type >= 1 && type <= 4)) {
            parse_quoted(skb, off + 8, p);
        }
    }
}

static __always_inline void parse(struct __sk_buff *skb, struct parsed *p)
{
    __u8 buf[40];
    __u32 off = ETH_HLEN;
    __u16 proto = skb->protocol;  /* the frame's type, after any offloaded VLAN tag */
    __u16 *eth_proto = header(skb, 12, buf, 2);
    if (!eth_proto)
        return;
    proto = *eth_proto;
    /* Up to two VLAN tags in the packet itself (offloaded tags are not in the data). */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
            break;
        __u16 *inner = header(skb, off + 2, buf, 2);
        if (!inner)
            return;
        proto = *inner;
        off += 4;
    }

    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = header(skb, off, buf, sizeof(*ip));
        if (!ip || ip->version != 4 || ip->ihl < 5)
            return;
        p->family = FAMILY_V4;
        p->proto = ip->protocol;
        p->src[0] = ip->saddr;
        p->dst[0] = ip->daddr;
        p->ok = 1;
        /* A non-first fragment has no ports: it is evaluated with ports 0 (it matches
         * rules without port restrictions) and forms its own flow entry. */
        if (ip->frag_off & bpf_htons(0x1FFF))
            return;
        parse_l4(skb, off + ip->ihl * 4, p);
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = header(skb, off, buf, sizeof(*ip6));
        if (!ip6 || ip6->version != 6)
            return;
        p->family = FAMILY_V6;
        __builtin_memcpy(p->src, &ip6->saddr, 16);
        __builtin_memcpy(p->dst, &ip6->daddr, 16);
        p->ok = 1;
        __u8 nh = ip6->nexthdr;
        off += sizeof(*ip6);
        /* Walk up to six extension headers to the transport header. */
#pragma unroll
        for (int i = 0; i < 6; i++) {
            if (!is_ipv6_ext(nh))
                break;
            __u8 *ext = header(skb, off, buf, 8);
            if (!ext) {
                nh = IPPROTO_NONE;
                break;
            }
            if (nh == IPPROTO_FRAGMENT) {
                __u16 frag = *(__u16 *)&ext[2];
                nh = ext[0];
                off += 8;
                if (frag & bpf_htons(0xFFF8)) {  /* non-first fragment: no ports */
                    p->proto = nh;
                    return;
                }
                continue;
            }
            __u32 len = nh == IPPROTO_AH ? (ext[1] + 2) * 4 : (ext[1] + 1) * 8;
            nh = ext[0];
            off += len;
        }
        p->proto = nh;
        if (!is_ipv6_ext(nh))
            parse_l4(skb, off, p);
    }
}

/* Fill the canonical key: both directions of a connection give the same key. */
static __always_inline void make_key(struct parsed *p, __u16 ifslot)
{
    int src_lower = 0;
    int decided = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (!decided && p->src[i] != p->dst[i]) {
            src_lower = bpf_ntohl(p->src[i]) < bpf_ntohl(p->dst[i]);
            decided = 1;
        }
    }
    if (!decided)
        src_lower = bpf_ntohs(p->sport) <= bpf_ntohs(p->dport);
    struct flow_key *k = &p->key;
    p->src_is_lo = src_lower;
    if (src_lower) {
        __builtin_memcpy(k->addr_lo, p->src, 16);
        __builtin_memcpy(k->addr_hi, p->dst, 16);
        k->port_lo = p->sport;
        k->port_hi = p->dport;
    } else {
        __builtin_memcpy(k->addr_lo, p->dst, 16);
        __builtin_memcpy(k->addr_hi, p->src, 16);
        k->port_lo = p->dport;
        k->port_hi = p->sport;
    }
    k->proto = p->proto;
    k->family = p->family;
    k->ifslot = ifslot;
}

/* ------------------------------------------------------------------ rule evaluation */
/* The rules a flow matches are the AND of four bitmaps: the interface's (policies that
 * apply to the pod), the source address's, the destination address's and the
 * (protocol, port)'s, each found with one lookup. Bits are ordered by policy, then rule,
 * so the lowest matching bit of a policy is its first matching rule; the rest of that
 * policy is then skipped. Summary bits mark the non-zero words, so only words that can
 * match are read: the cost follows the number of candidate words, not of rules.
 *
 * The walk keeps its scalars in a per-CPU map value rather than on the stack: values
 * read back from a map are unknown to the verifier, so after the bounds checks every
 * path reaches the loop head in the same state and the verifier prunes them. */
struct eval_scratch {
    struct parsed p;            /* the packet being evaluated */
    __u32 ifindex;
    __u32 orientation;          /* 0: as the packet travels; 1: reversed */
    __u32 started;              /* the walk of this orientation has begun */
    __u32 never;                /* a stream of copies: never mirrored, not walked */
    __u64 cand[SUMMARY_WORDS];  /* candidate words per summary word */
    __u64 cur;                  /* candidate words left in summary word `sw` */
    __u64 bits;                 /* matching bits left in the current word */
    __u32 sw;
    __u32 word;
    __u32 skip_below;           /* first rule slot not yet decided by its policy */
    __u32 n;
    __u32 overflow;
    __u32 generation;           /* the policy generation the walk started under */
    __u32 had_old;              /* the flow table held a stale entry for the flow */
    __u32 rules[MAX_FLOW_DESTS];
    __u64 peer_secret;          /* the copies go the pod-side way (see send_copy) */
};
/* Pinned (EVAL_SCRATCH_PIN, see agent/layout.py): during an agent restart the old
 * classifiers tail-call the new eval_continue, which must read what they wrote. */
BPF_TABLE_PINNED("percpu_array", __u32, struct eval_scratch, eval_scratch_map, 1,
                 EVAL_SCRATCH_PIN);

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

/* ------------------------------------------------------------------ copies */
static __always_inline void send_copy(struct __sk_buff *skb, __u32 mirror_ifindex,
                                      __u16 ifslot, __u32 rule_slot, __u64 peer_secret)
{
    /* Sampling and copy budgets (copy_limits.h): a copy not made costs no clone. */
    if (!copy_admitted(skb, ifslot, rule_slot))
        return;
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
            send_copy(skb, mirror_ifindex, ifslot, fe->rules[i], peer_secret);
    }
}

/* ------------------------------------------------------------------ flow cache */
/* A per-CPU, direct-mapped cache in front of the flow table for established flows that
 * are mirrored by no rule (FlowCacheEntry in agent/layout.py): a hit is two inlined
 * array lookups and a few compares, no hash table, no interface lookup, no clock.
 *
 * - Filled only from a flow-table hit with a current verdict and no copies (the flow's
 *   second packet in a direction, or later): a flow's first packet pays no fill, and
 *   flows with copies always reach the flow table, which counts their packets.
 * - The key holds the generation: after a policy change no slot matches.
 * - A slot serves for the jiffy it was filled in; the flow's first packet in a later
 *   jiffy takes the full path again, which refreshes the flow entry's last_seen_ns (as
 *   coarse as before: the coarse clock ticks in jiffies) and its LRU age, re-checks the
 *   verdict, and fills the slot again.
 * - Only plain packets have a probe: TCP (not a bare SYN: that opens a flow) or UDP in
 *   IPv4 without options or IPv6 without extension headers, no VLAN tag in the data,
 *   the transport header as far as parse_l4() reads it in the linear area. The probe is
 *   then what the full parse reads (probe_is() checks it before a fill), so a hit gives
 *   the verdict the flow table gives. Any other packet takes the full path. */
union cache_probe {
    struct flow_cache_entry e;
    __u64 w[8];  /* w[0..5]: the compared key (FLOW_CACHE_KEY_BYTES) */
};

static __always_inline int cache_probe(struct __sk_buff *skb, union cache_probe *k,
                                       __u64 w4, __u64 w5)
{
    void *data = CTX_LOAD(skb, data);
    void *data_end = CTX_LOAD(skb, data_end);
    if (data + ETH_HLEN > data_end)
        return 0;
    __u16 eth_proto = *(__u16 *)(data + 12);
    __u8 *l4;
    __u8 proto;
    if (eth_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + ETH_HLEN;
        if ((void *)(ip + 1) > data_end)
            return 0;
        if (*(__u8 *)ip != 0x45 || (ip->frag_off & bpf_htons(0x1FFF)))
            return 0;
        proto = ip->protocol;
        k->w[0] = ip->saddr;
        k->w[1] = 0;
        k->w[2] = ip->daddr;
        k->w[3] = 0;
        w5 |= (__u64)FAMILY_V4 << 8;
        l4 = (void *)(ip + 1);
    } else if (eth_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + ETH_HLEN;
        if ((void *)(ip6 + 1) > data_end)
            return 0;
        if ((*(__u8 *)ip6 >> 4) != 6)
            return 0;
        proto = ip6->nexthdr;
        __u64 *a = (__u64 *)&ip6->saddr;
        k->w[0] = a[0];
        k->w[1] = a[1];
        k->w[2] = a[2];
        k->w[3] = a[3];
        w5 |= (__u64)FAMILY_V6 << 8;
        l4 = (void *)(ip6 + 1);
    } else {
        return 0;
    }
    if (proto == IPPROTO_TCP) {
        if ((void *)(l4 + 14) > data_end)
            return 0;
        /* A SYN without ACK opens a flow: nothing to find here, take the full path. */
        if ((l4[13] & 0x12) == 0x02)
            return 0;
    } else if (proto == IPPROTO_UDP) {
        if ((void *)(l4 + 4) > data_end)
            return 0;
    } else {
        return 0;
    }
    k->w[4] = w4 | *(__u32 *)l4;  /* the ports; the interface above them */
    k->w[5] = w5 | proto;
    return 1;
}

/* The probe's hash: the slot is its top FLOW_CACHE_BITS bits, the tag (never 0) 16 bits
 * from its middle. Keep in step with flow_cache_hash() in agent/layout.py. */
static __always_inline __u64 flow_cache_hash(union cache_probe *k)
{
    __u64 h = (k->w[0] ^ k->w[1]) * 0x9E3779B97F4A7C15ULL;
    h = (h ^ k->w[2] ^ k->w[3]) * 0xC2B2AE3D27D4EB4FULL;
    return (h ^ k->w[4] ^ (__u32)k->w[5]) * 0x165667B19E3779F9ULL;
}

#define CACHE_SLOT(h) ((__u32)((h) >> (64 - FLOW_CACHE_BITS)))
#define CACHE_TAG(h) ((__u16)((h) >> 32) | 1)

/* The first FLOW_CACHE_KEY_BYTES (addresses, ports, interface, protocol, direction and
 * generation) are equal. */
static __always_inline int cache_same(struct flow_cache_entry *c, union cache_probe *k)
{
    __u64 *a = (__u64 *)c, *b = k->w;
    return !((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) |
             (a[4] ^ b[4]) | (a[5] ^ b[5]));
}

/* The full parse read the same flow as the probe (a safety net: then a hit and the flow
 * table give the same verdict). */
static __always_inline int probe_is(union cache_probe *u, struct parsed *p)
{
    struct flow_cache_entry *k = &u->e;
    __u32 d = 0;
#pragma unroll
    for (int i = 0; i < 4; i++)
        d |= (k->src[i] ^ p->src[i]) | (k->dst[i] ^ p->dst[i]);
    return p->ok && !d && k->sport == p->sport && k->dport == p->dport &&
           k->proto == p->proto && k->family == p->family;
}

static __always_inline void cache_fill(union cache_probe *k, __u64 h, __u32 port_rule,
                                       __u16 ifslot)
{
    __u32 slot = CACHE_SLOT(h);
    __u32 zero = 0;
    struct flow_cache_entry *c = flow_cache.lookup(&slot);
    struct flow_cache_tags *t = flow_cache_tags.lookup(&zero);
    if (!c || !t)
        return;
    k->e.port_rule = port_rule;
    k->e.ifslot = ifslot;
    *c = k->e;
    t->tag[slot & (FLOW_CACHE_SLOTS - 1)] = CACHE_TAG(h);
}

/* Copies on their way to an analyzer, and the analyzer's ICMP errors about them. */
static __always_inline int is_copy_stream(struct parsed *p)
{
    struct analyzer_key k = {.family = p->family};
    if (p->proto == IPPROTO_UDP) {
        k.port = p->dport;
        __builtin_memcpy(k.addr, p->dst, 16);
    } else if (p->quoted_udp) {
        k.port = p->quoted_dport;
        __builtin_memcpy(k.addr, p->quoted_dst, 16);
    } else {
        return 0;
    }
    return analyzers.lookup(&k) != NULL;
}

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
                    send_copy(skb, cfg->mirror_ifindex, c->ifslot, c->port_rule,
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
        send_copy(skb, cfg->mirror_ifindex, ifslot, port_rule, peer_secret);
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
#pragma unroll
    for (int i = 0; i < MAX_FLOW_DESTS; i++)
        fresh.rules[i] = i < n_rules ? s->rules[i] : 0;
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
    if (s->had_old || flows.insert(&key, &fresh) != 0)
        old = flows.lookup(&key);  /* or another CPU inserted it meanwhile */
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
        flows.update(&key, &fresh);  /* evicted meanwhile */
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
            send_copy(skb, cfg->mirror_ifindex, key.ifslot, fresh.rules[i], s->peer_secret);
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
