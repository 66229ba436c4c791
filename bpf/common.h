/* Shared helpers of the cn2mirror programs. The map layouts and constants come from the
 * generated declarations (agent/layout.py), prepended by the loader. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

#ifndef ETH_P_8021AD
#define ETH_P_8021AD 0x88A8
#endif

/* A node-wide drop (one that belongs to no rule, interface or destination). */
static __always_inline void count_node(int drop)
{
    __u32 zero = 0;
    struct counters *c = stats_node.lookup(&zero);
    if (c && drop >= 0 && drop < N_DROPS)
        c->drops[drop]++;
}

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
