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
 * copy for its destination (jmirror over IPv4/IPv6, raw L2, VXLAN or VLAN), fits it to
 * the path MTU (cut, or sent whole to be fragmented by the IP stack on the far end), and
 * redirects it on. Nothing on this path touches production packets.
 *
 * analyzer_port_rx (XDP on mirror-tx) drops anything that tries to come in through the
 * mirror port: like a JUNOSe analyzer port, it only sends.
 */

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* The kernel's signature (bcc 0.26 declares it with one argument too few). */
static long (*redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
                              __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

struct jmirror_v4 {
    struct iphdr ip;
    struct udphdr udp;
    __be32 mid;
    __be32 sid;
} __attribute__((packed));

struct jmirror_v6 {
    struct ipv6hdr ip;
    struct udphdr udp;
    __be32 mid;
    __be32 sid;
} __attribute__((packed));

struct csum_buf {
    __u8 b[520];  /* 512 and slack the verifier can see past the padding */
};
BPF_PERCPU_ARRAY(csum_scratch, struct csum_buf, 1);

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

/* Fit the copy's L3 part, once `overhead` bytes of headers are added, to `mtu`. A copy
 * is never dropped for being too large: it is cut, or (when `whole` is allowed: outer
 * IPv4 and a destination that asks for it) left whole for the IP stack to fragment.
 * Either is counted. */
static __always_inline int fit_mtu(struct __sk_buff *skb, __u32 l2_len, __u32 overhead,
                                   __u32 mtu, int whole, int *fitted)
{
    if (!mtu)
        return 0;
    __u32 room = mtu > overhead ? mtu - overhead : 0;
    if (skb->len > l2_len + room) {
        if (whole) {
            *fitted = FIT_FRAGMENTED;
            return 0;
        }
        if (bpf_skb_change_tail(skb, l2_len + room, 0) < 0)
            return -1;
        *fitted = FIT_TRUNCATED;
    }
    return 0;
}

/* Remove VLAN tags: jmirror carries the packet from its IP header on. Returns the
 * ethertype the frame ends with (still a VLAN one if a tag could not be removed), or 0
 * if it cannot be read. */
static __always_inline __u16 strip_vlans(struct __sk_buff *skb)
{
    __u16 proto = 0;
#pragma unroll
    for (int i = 0; i < 3; i++) {
        if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
            return 0;
        if (!skb->vlan_present && proto != bpf_htons(ETH_P_8021Q) &&
            proto != bpf_htons(ETH_P_8021AD))
            return proto;
        if (bpf_skb_vlan_pop(skb) < 0)
            return proto;
    }
    if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
        return 0;
    return proto;
}

/* Internal result: wrapped inline, but the next hop's MAC is unknown: go on through the
 * port, whose far end resolves it (bpf_redirect_neigh from within another device's
 * transmit lost the packet and addressed the neighbour on the wrong device, seen on 6.18). */
#define PASS_TO_PORT 1000

static __always_inline int send_routed(struct __sk_buff *skb, int family, __u32 *src,
                                       __u32 *dst, __u16 port, __u32 l3_len, int in_line)
{
    struct bpf_fib_lookup fib = {};
    fib.family = family == FAMILY_V4 ? AF_INET : AF_INET6;
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = bpf_htons(port);
    fib.dport = bpf_htons(port);
    fib.tot_len = l3_len;
    fib.ifindex = skb->ifindex;
    if (family == FAMILY_V4) {
        fib.ipv4_src = src[0];
        fib.ipv4_dst = dst[0];
    } else {
        __builtin_memcpy(fib.ipv6_src, src, 16);
        __builtin_memcpy(fib.ipv6_dst, dst, 16);
    }
    long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    skb->mark = COPY_MARK;
    if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
        if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) < 0 ||
            bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0) < 0)
            return -DROP_WRAP_FAILED;
        return bpf_redirect(fib.ifindex, 0);
    }
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH && in_line)
        return PASS_TO_PORT;
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
        /* Next hop known, neighbour not yet resolved: let the kernel resolve it. It
         * rebuilds the Ethernet header, but refuses a frame whose destination is still
         * multicast (the mirrored packet's own, as for IPv6 neighbour discovery). */
        __u8 no_macs[12] = {};
        if (bpf_skb_store_bytes(skb, 0, no_macs, sizeof(no_macs), 0) < 0)
            return -DROP_WRAP_FAILED;
        struct bpf_redir_neigh nh = {};
        if (family == FAMILY_V4) {
            nh.nh_family = AF_INET;
            nh.ipv4_nh = fib.ipv4_dst;
        } else {
            nh.nh_family = AF_INET6;
            __builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
        }
        return redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
    }
    return -DROP_NO_ROUTE;
}

/* Internal result: wrapped, to be handed whole to the IP stack on the port's far end,
 * which forwards it and fragments its outer IPv4 header to fit the path. */
#define PASS_TO_STACK 1001
/* Internal result: a GSO super-packet wrapped once: on into the port, whose sending end
 * cuts it into wrapped wire-size segments (UDP-tunnel segmentation). */
#define PASS_SEGMENTS 1002
/* Internal result: a GSO super-packet that cannot be wrapped once (UDP GSO that must
 * change size, already encapsulated, segments too large for the path): on into the
 * port unwrapped, to be segmented and wrapped one segment at a time. */
#define PASS_BY_SEGMENT 1003

/* The outer IP, UDP and jmirror headers, written at the front of a copy that
 * bpf_skb_adjust_room has made room for. `inner_len` is the inner packet's length (a
 * GSO super-packet's lengths are set again for each segment by the kernel). The UDP
 * checksum is left 0: IPv4 sends none; IPv6 fills it in afterwards (udp6_checksum). */
static __always_inline int write_jmirror(struct __sk_buff *skb, struct dest_entry *d,
                                         __u32 mirror_id, __u32 session_id, __u32 inner_len,
                                         int may_fragment)
{
    __u32 mid = bpf_htonl(mirror_id & JMIRROR_MID_MASK);  /* version 0 in the top bits */
    __u32 sid = bpf_htonl(session_id);
    __u32 udp_len = inner_len + sizeof(struct udphdr) + JMIRROR_HEADER_LEN;
    if (udp_len > 0xFFFF)
        udp_len = 0xFFFF;
    if (d->mode != MODE_JMIRROR6) {
        __u32 tot_len = inner_len + OUTER_IPV4_OVERHEAD;
        if (tot_len > 0xFFFF)
            tot_len = 0xFFFF;
        struct jmirror_v4 h = {};
        h.ip.version = 4;
        h.ip.ihl = 5;
        h.ip.ttl = 255;
        h.ip.protocol = IPPROTO_UDP;
        h.ip.tot_len = bpf_htons(tot_len);
        /* DF unless the destination wants oversized copies whole (fragmented). */
        h.ip.frag_off = may_fragment ? 0 : bpf_htons(0x4000);
        h.ip.saddr = d->src_addr[0];
        h.ip.daddr = d->dst_addr[0];
        h.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&h.ip, sizeof(h.ip), 0));
        h.udp.source = bpf_htons(d->udp_port);
        h.udp.dest = bpf_htons(d->udp_port);
        h.udp.len = bpf_htons(udp_len);
        h.udp.check = 0;  /* jmirror over IPv4 sends no UDP checksum */
        h.mid = mid;
        h.sid = sid;
        if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0) < 0)
            return -1;
        __u16 eth_proto = bpf_htons(ETH_P_IP);
        return bpf_skb_store_bytes(skb, 12, &eth_proto, 2, 0) < 0 ? -1 : 0;
    }
    struct jmirror_v6 h = {};
    h.ip.version = 6;
    h.ip.hop_limit = 255;
    h.ip.nexthdr = IPPROTO_UDP;
    h.ip.payload_len = bpf_htons(udp_len);
    __builtin_memcpy(&h.ip.saddr, d->src_addr, 16);
    __builtin_memcpy(&h.ip.daddr, d->dst_addr, 16);
    h.udp.source = bpf_htons(d->udp_port);
    h.udp.dest = bpf_htons(d->udp_port);
    h.udp.len = bpf_htons(udp_len);
    h.mid = mid;
    h.sid = sid;
    if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0) < 0)
        return -1;
    __u16 eth_proto = bpf_htons(ETH_P_IPV6);
    return bpf_skb_store_bytes(skb, 12, &eth_proto, 2, 0) < 0 ? -1 : 0;
}

/* IPv6 requires a UDP checksum: pseudo-header, then UDP header and payload, over the
 * datagram as it is now (one wrapped copy, or one segment of a wrapped super-packet). */
static __always_inline int udp6_checksum(struct __sk_buff *skb, struct dest_entry *d)
{
    __u32 udp_len = skb->len - ETH_HLEN - sizeof(struct ipv6hdr);
    __u16 zero = 0;
    if (bpf_skb_store_bytes(skb, ETH_HLEN + 40 + 6, &zero, 2, 0) < 0)
        return -1;
    __be32 pseudo[10] = {};
    __builtin_memcpy(pseudo, d->src_addr, 16);
    __builtin_memcpy(&pseudo[4], d->dst_addr, 16);
    pseudo[8] = bpf_htonl(udp_len);
    pseudo[9] = bpf_htonl(IPPROTO_UDP);
    __s64 sum = bpf_csum_diff(0, 0, pseudo, sizeof(pseudo), 0);
    sum = csum_payload(skb, ETH_HLEN + 40, ETH_HLEN + 40 + udp_len, sum);
    __u16 check = csum_fold(sum);
    if (check == 0)
        check = 0xFFFF;
    return bpf_skb_store_bytes(skb, ETH_HLEN + 40 + 6, &check, 2, 0) < 0 ? -1 : 0;
}

/* Length of the inner IP and TCP/UDP headers of a GSO super-packet (the part the kernel
 * repeats in every segment), or 0 when they cannot be read. */
static __always_inline __u32 gso_header_len(struct __sk_buff *skb, __u16 proto)
{
    __u32 l3 = 0;
    __u8 l4 = 0;
    if (proto == bpf_htons(ETH_P_IP)) {
        __u8 vihl = 0;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0 ||
            bpf_skb_load_bytes(skb, ETH_HLEN + 9, &l4, 1) < 0)
            return 0;
        l3 = (vihl & 0xF) * 4;
    } else {
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &l4, 1) < 0)
            return 0;
        l3 = sizeof(struct ipv6hdr);
    }
    if (l4 == IPPROTO_UDP)
        return l3 + sizeof(struct udphdr);
    if (l4 != IPPROTO_TCP)
        return 0;
    __u8 doff = 0;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + (l3 & 0x3C) + 12, &doff, 1) < 0)
        return 0;
    return l3 + (doff >> 4) * 4;
}

/* One wrap for a whole GSO super-packet: bpf_skb_adjust_room marks it a UDP tunnel
 * packet (outer IP and UDP, the jmirror header as its 8-byte "inner L2"), and the
 * kernel later segments it, repeating the outer headers in every segment. Exact: the
 * wire's segment size (needs the path MTU to take the overhead); fit: the kernel
 * lowers gso_size by the overhead, so segments are the wire's size once wrapped.
 * Returns PASS_SEGMENTS, PASS_BY_SEGMENT when the kernel refuses (or the segments would
 * not fit either way), or a negative drop. */
static __always_inline int wrap_jmirror_gso(struct __sk_buff *skb, struct dest_entry *d,
                                            __u32 mirror_id, __u32 session_id)
{
    __u16 proto = strip_vlans(skb);
    if (proto != bpf_htons(ETH_P_IP) && proto != bpf_htons(ETH_P_IPV6))
        return PASS_BY_SEGMENT;
    int v6 = d->mode == MODE_JMIRROR6;
    __u32 overhead = v6 ? OUTER_IPV6_OVERHEAD : OUTER_IPV4_OVERHEAD;
    __u32 hdrs = gso_header_len(skb, proto);
    if (!hdrs)
        return PASS_BY_SEGMENT;
    __u32 wire = hdrs + skb->gso_size;  /* L3 size of the wire's segments */
    __u32 mtu = d->mtu ? d->mtu : 0xFFFF;
    int exact = !(d->flags & DEST_SEGMENTS_FIT) &&
                ((d->flags & DEST_SEGMENTS_EXACT) || wire + overhead <= mtu);
    if (exact ? wire + overhead > mtu : wire > mtu)
        return PASS_BY_SEGMENT;  /* too large either way: cut or fragmented one by one */
    __u32 inner_len = skb->len - ETH_HLEN;
    __u64 flags = BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
                  (v6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) |
                  BPF_F_ADJ_ROOM_ENCAP_L2(JMIRROR_HEADER_LEN) |
                  (exact ? BPF_F_ADJ_ROOM_FIXED_GSO : 0);
    /* Refused for a packet already encapsulated (-EALREADY) and for UDP GSO whose size
     * would change: those are segmented first, then wrapped one by one. */
    if (bpf_skb_adjust_room(skb, overhead, BPF_ADJ_ROOM_MAC, flags) < 0)
        return PASS_BY_SEGMENT;
    if (write_jmirror(skb, d, mirror_id, session_id, inner_len, 0) < 0)
        return -DROP_WRAP_FAILED;
    return PASS_SEGMENTS;
}

static __always_inline int wrap_jmirror(struct __sk_buff *skb, struct dest_entry *d,
                                        __u32 mirror_id, __u32 session_id, int *fitted,
                                        int in_line)
{
    __u16 proto = strip_vlans(skb);
    if (!proto)
        return -DROP_WRAP_FAILED;
    if (proto != bpf_htons(ETH_P_IP) && proto != bpf_htons(ETH_P_IPV6))
        return -DROP_NOT_IP;
    int v6 = d->mode == MODE_JMIRROR6;
    __u32 overhead = v6 ? OUTER_IPV6_OVERHEAD : OUTER_IPV4_OVERHEAD;
    /* Outer IPv6 is never fragmented on the way: oversized copies over it are cut. */
    int whole = !v6 && (d->flags & DEST_FRAGMENT);
    if (fit_mtu(skb, ETH_HLEN, overhead, d->mtu, whole, fitted) < 0)
        return -DROP_WRAP_FAILED;
    __u32 inner_len = skb->len - ETH_HLEN;
    __u64 flags = BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
                  (v6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV4);
    /* A copy of a tunnel packet (a pod's own VXLAN, say) is refused as already
     * encapsulated (-EALREADY): a single finished packet needs no tunnel marks, so it
     * gets plain room instead. */
    if (bpf_skb_adjust_room(skb, overhead, BPF_ADJ_ROOM_MAC, flags) < 0 &&
        bpf_skb_adjust_room(skb, overhead, BPF_ADJ_ROOM_MAC, 0) < 0)
        return -DROP_WRAP_FAILED;
    if (write_jmirror(skb, d, mirror_id, session_id, inner_len, whole) < 0)
        return -DROP_WRAP_FAILED;
    if (*fitted == FIT_FRAGMENTED)
        return PASS_TO_STACK;
    if (v6 && udp6_checksum(skb, d) < 0)
        return -DROP_WRAP_FAILED;
    return send_routed(skb, v6 ? FAMILY_V6 : FAMILY_V4, d->src_addr, d->dst_addr,
                       d->udp_port, inner_len + overhead, in_line);
}

static __always_inline int has_mac(struct dest_entry *d)
{
    return d->mac[0] | d->mac[1] | d->mac[2] | d->mac[3] | d->mac[4] | d->mac[5];
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

/* What a copy's mark (clone or wrapped tag) refers to: its rule, interface and
 * destination, with the rule's and destination's entries (NULL when absent). */
struct copy_ref {
    __u32 rule_slot;
    __u32 ifslot;
    __u32 dest_slot;
    struct rule_entry *r;
    struct dest_entry *d;
};

static __always_inline void copy_ref_of(__u32 mark, struct copy_ref *c)
{
    c->rule_slot = mark & CLONE_RULE_MASK;
    c->ifslot = (mark >> CLONE_IFSLOT_SHIFT) & CLONE_IFSLOT_MASK;
    c->r = rules.lookup(&c->rule_slot);
    c->dest_slot = c->r ? c->r->dest : 0;
    c->d = destinations.lookup(&c->dest_slot);
}

/* A wrapped copy on the port's far end that goes whole to the IP stack: it forwards it
 * towards the analyzer and fragments the outer IPv4 header to fit the path. */
static __always_inline int hand_to_stack(struct __sk_buff *skb, struct copy_ref *c)
{
    skb->mark = COPY_MARK;
    if (bpf_skb_change_type(skb, 0 /* PACKET_HOST */) < 0) {
        count_copy(c->rule_slot, c->ifslot, c->dest_slot, DROP_WRAP_FAILED, 0, 0);
        return TC_ACT_SHOT;
    }
    count_copy(c->rule_slot, c->ifslot, c->dest_slot, -1, skb->len, FIT_FRAGMENTED);
    return TC_ACT_OK;
}

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
    /* The destination's snap length (copy_limits.h), before any wrap. */
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
    case MODE_L2:
        if (fit_mtu(skb, ETH_HLEN, 0, d->mtu, 0, &fitted) < 0 ||
            bpf_skb_store_bytes(skb, 0, d->mac, 6, 0) < 0) {
            rc = -DROP_WRAP_FAILED;
            break;
        }
        skb->mark = COPY_MARK;
        rc = bpf_redirect(d->out_ifindex, 0);
        break;
    case MODE_VXLAN: {
        struct bpf_tunnel_key key = {};
        __u64 tflags = 0;
        if (fit_mtu(skb, ETH_HLEN, 0, d->mtu, 0, &fitted) < 0) {
            rc = -DROP_WRAP_FAILED;
            break;
        }
        key.tunnel_id = d->vni;
        key.tunnel_ttl = 64;
        if (d->flags & DEST_VTEP_IPV6) {
            __builtin_memcpy(key.remote_ipv6, d->dst_addr, 16);
            tflags = BPF_F_TUNINFO_IPV6;
        } else {
            key.remote_ipv4 = bpf_ntohl(d->dst_addr[0]);
        }
        if ((has_mac(d) && bpf_skb_store_bytes(skb, 0, d->mac, 6, 0) < 0) ||
            bpf_skb_set_tunnel_key(skb, &key, sizeof(key), tflags) < 0) {
            rc = -DROP_WRAP_FAILED;
            break;
        }
        skb->mark = COPY_MARK;
        rc = bpf_redirect(d->out_ifindex, 0);
        break;
    }
    case MODE_VLAN:
        if (fit_mtu(skb, ETH_HLEN, 0, d->mtu, 0, &fitted) < 0 ||
            bpf_skb_vlan_push(skb, bpf_htons(ETH_P_8021Q), d->vlan_id) < 0) {
            rc = -DROP_WRAP_FAILED;
            break;
        }
        skb->mark = COPY_MARK;
        rc = bpf_redirect(d->out_ifindex, 0);
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

/* Bytes a wrapped super-packet repeats in each of its segments: Ethernet, outer IPv4,
 * UDP, jmirror, inner IP and TCP/UDP headers. */
static __always_inline __u32 gso_header_len_outer(struct __sk_buff *skb)
{
    __u8 v = 0;
    __u32 off = ETH_HLEN + OUTER_IPV4_OVERHEAD;
    if (bpf_skb_load_bytes(skb, off, &v, 1) < 0)
        return off;
    __u16 proto = (v >> 4) == 6 ? bpf_htons(ETH_P_IPV6) : bpf_htons(ETH_P_IP);
    /* gso_header_len reads from ETH_HLEN on: read the inner headers at their place. */
    __u32 l3 = 0;
    __u8 l4 = 0;
    if (proto == bpf_htons(ETH_P_IP)) {
        l3 = (v & 0xF) * 4;
        if (bpf_skb_load_bytes(skb, off + 9, &l4, 1) < 0)
            return off;
    } else {
        l3 = sizeof(struct ipv6hdr);
        if (bpf_skb_load_bytes(skb, off + 6, &l4, 1) < 0)
            return off;
    }
    if (l4 == IPPROTO_UDP)
        return off + l3 + sizeof(struct udphdr);
    __u8 doff = 0;
    if (bpf_skb_load_bytes(skb, off + (l3 & 0x3C) + 12, &doff, 1) < 0)
        return off + l3;
    return off + l3 + (doff >> 4) * 4;
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
    if (!c.r || !c.d || (c.d->mode != MODE_JMIRROR4 && c.d->mode != MODE_JMIRROR6))
        return TC_ACT_OK;
    /* A snap length applies per wire segment: segmented first, each segment cut and
     * wrapped on the far end. */
    if (snap_length_of(c.dest_slot)) {
        count_super_packet(c.rule_slot, c.ifslot, c.dest_slot, 0);
        return TC_ACT_OK;
    }
    __u32 *sid = sessions.lookup(&c.ifslot);
    int rc = wrap_jmirror_gso(skb, c.d, c.r->mirror_id, sid ? *sid : 0);
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

/* Whether a copy must go through the port for the kernel to finish it (segmentation,
 * checksums). Anything this does not understand takes the port: the safe way. */
static __always_inline int needs_kernel_finish(struct __sk_buff *skb)
{
    if (skb->gso_size)
        return 1;
    __u16 proto = 0;
    if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
        return 1;
    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
            return 1;
        if (ip.frag_off & bpf_htons(0x3FFF))  /* more fragments, or an offset */
            return 0;  /* fragments never carry an unfinished checksum */
        __u32 hlen = ip.ihl * 4;
        __u32 sum = (ip.saddr & 0xFFFF) + (ip.saddr >> 16) + (ip.daddr & 0xFFFF) +
                    (ip.daddr >> 16);
        return l4_csum_unfinished(skb, ETH_HLEN + hlen, ip.protocol, sum,
                                  bpf_ntohs(ip.tot_len) - hlen);
    }
    if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
            return 1;
        __u8 nh = ip6.nexthdr;
        if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_FRAGMENT ||
            nh == IPPROTO_DSTOPTS || nh == IPPROTO_AH)
            return 1;
        __u16 *words = (__u16 *)&ip6.saddr;  /* saddr and daddr: 16 words */
        __u32 sum = 0;
#pragma unroll
        for (int i = 0; i < 16; i++)
            sum += words[i];
        return l4_csum_unfinished(skb, ETH_HLEN + sizeof(ip6), nh, sum,
                                  bpf_ntohs(ip6.payload_len));
    }
    /* ARP never needs finishing; VLAN-tagged and other frames take the long way. */
    return proto != bpf_htons(ETH_P_ARP);
}

/* Copies on mirror-tx's TC egress: finished ones are wrapped here, inline; the rest go
 * on into the veth (TC_ACT_OK) to be finished by the kernel and wrapped on the far end. */
int mirror_wrap_inline(struct __sk_buff *skb)
{
    if (skb->gso_size)
        return wrap_super_packet(skb);
    if (needs_kernel_finish(skb))
        return TC_ACT_OK;
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
