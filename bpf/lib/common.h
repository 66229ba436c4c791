/* What every cn2mirror program includes: the kernel's UAPI headers it reads packets
 * with, and the generated layout (bpf/gen/layout.h: every map, struct and constant,
 * from agent/layout.py). */
#ifndef CN2M_LIB_COMMON_H
#define CN2M_LIB_COMMON_H

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

#include "gen/layout.h"

/* Address families for bpf_fib_lookup (no libc headers here). */
#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* skb->data and skb->data_end as direct context loads: left to itself, clang may form
 * a pointer into the context first, which the verifier refuses. */
#define CTX_LOAD(skb, field) ({                                                 \
    void *v_;                                                                   \
    asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(v_)                           \
                 : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, field))); \
    v_; })

#endif /* CN2M_LIB_COMMON_H */
