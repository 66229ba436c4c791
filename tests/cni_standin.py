"""A stand-in for an eBPF CNI's datapath programs, to test how ours coexist with them.

It stands in for Cilium >= 1.16 in the ways that matter to our attachment: its programs
are tcx links anchored at the *tail* of the chain of a pod's host-side veth
(BPF_F_AFTER, as Cilium attaches by default), and they end the packet's
journey through tc with a verdict of their own: ``TC_ACT_OK`` (Cilium's "pass to the
stack") or ``TC_ACT_REDIRECT`` (Cilium's routing to a local pod: ``bpf_redirect`` to the
pod's host veth, or with BPF host routing ``bpf_redirect_peer`` straight into the pod's
eth0). Either verdict stops the chain: nothing attached behind it, and no legacy tc
filter, runs. It also does what Cilium's loader does after attaching: it can delete
every legacy tc filter of the interface.

Each program counts the packets of the test flow (IPv4 UDP to TEST_PORT) it sees in a
map, so a test can prove that it ran on every packet; redirected packets get the target
pod's MAC addresses (as Cilium rewrites them) so that the pod accepts them.
"""

from __future__ import annotations

import ctypes as C
import os
import socket
import subprocess

from cn2mirror.agent import bpfsys
from cn2mirror.agent.netns import entered

TEST_PORT = 7300
TC_ACT_OK, TC_ACT_REDIRECT = 0, 7

_SOURCE = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>

BPF_ARRAY(seen, u64, 1);

static __always_inline int test_flow(struct __sk_buff *skb)
{
    struct ethhdr eth;
    struct iphdr iph;
    __u16 dport;
    if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) || eth.h_proto != htons(ETH_P_IP))
        return 0;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)) || iph.protocol != IPPROTO_UDP)
        return 0;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + iph.ihl * 4 + 2, &dport, 2))
        return 0;
    if (dport != htons(TEST_PORT))
        return 0;
    int zero = 0;
    u64 *n = seen.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 1;
}

int cni_pass(struct __sk_buff *skb)
{
    test_flow(skb);
    return TC_ACT_OK;
}

int cni_redirect(struct __sk_buff *skb)
{
    if (!test_flow(skb))
        return TC_ACT_OK;
    unsigned char macs[12] = {TARGET_MACS};
    bpf_skb_store_bytes(skb, 0, macs, 12, 0);
    return PEER ? bpf_redirect_peer(TARGET_IFINDEX, 0) : bpf_redirect(TARGET_IFINDEX, 0);
}
"""


def _mac_bytes(mac: str) -> list[int]:
    return [int(x, 16) for x in mac.split(":")]


class StandInCni:
    """One stand-in program on one direction of an interface (a tcx link at the tail).

    ``verdict``: "pass" (TC_ACT_OK) or "redirect"/"redirect_peer" (TC_ACT_REDIRECT to
    ``target_ifindex``, with ``dst_mac``/``src_mac`` written into the frame);
    ``at_head``: jump the queue (BPF_F_BEFORE) instead of joining its tail."""

    def __init__(self, netns: str, ifname: str, direction: str, verdict: str = "pass",
                 target_ifindex: int = 0, dst_mac: str = "", src_mac: str = "",
                 at_head: bool = False):
        from bcc import BPF

        self.netns, self.ifname = netns, ifname
        macs = _mac_bytes(dst_mac) + _mac_bytes(src_mac) if dst_mac else [0] * 12
        cflags = [f"-DTEST_PORT={TEST_PORT}", f"-DTARGET_IFINDEX={target_ifindex}",
                  f"-DPEER={int(verdict == 'redirect_peer')}",
                  "-DTARGET_MACS=" + ",".join(str(b) for b in macs), "-w"]
        self.bpf = BPF(text=_SOURCE, cflags=cflags)
        fn = self.bpf.load_func(b"cni_pass" if verdict == "pass" else b"cni_redirect",
                                BPF.SCHED_CLS)
        self.prog_id = bpfsys.prog_id(fn.fd)
        self.ifindex = ifindex(netns, ifname)
        kind = bpfsys.BPF_TCX_INGRESS if direction == "ingress" else bpfsys.BPF_TCX_EGRESS
        with entered(netns):
            self.link_fd = bpfsys.tcx_attach(fn.fd, self.ifindex, kind, bpfsys.BPF_F_BEFORE
                                             if at_head else bpfsys.BPF_F_AFTER)

    def seen(self) -> int:
        return self.bpf[b"seen"][C.c_int(0)].value

    def close(self) -> None:
        if self.link_fd >= 0:
            try:
                bpfsys.link_detach(self.link_fd)
            except OSError:
                pass
            os.close(self.link_fd)
            self.link_fd = -1
        self.bpf.cleanup()


def ifindex(netns: str, ifname: str) -> int:
    with entered(netns):  # the ioctl's socket is made in the namespace
        return socket.if_nametoindex(ifname)


def delete_legacy_filters(netns: str, ifname: str) -> None:
    """What Cilium's loader does after attaching with tcx: every legacy filter of the
    interface, in both directions, deleted."""
    for parent in ("ingress", "egress"):
        subprocess.run(["ip", "netns", "exec", netns, "tc", "filter", "del", "dev", ifname,
                        parent], capture_output=True)


def legacy_filters(netns: str, ifname: str) -> str:
    return "".join(subprocess.run(["ip", "netns", "exec", netns, "tc", "filter", "show", "dev",
                                   ifname, parent], capture_output=True, text=True).stdout
                   for parent in ("ingress", "egress"))
